"""Operating point of the default detector (or another kind, or an ensemble) on MIMII fan
id_00, channel 0, at its default budget.

    .venv/bin/python bench/operating_quick.py [--data /work/shared/data] [--json out.json]
        [--false-alarms-per-day 1] [--no-integrate] [--kind embedding]
        [--members fluctuation embedding] [--persist 60]

Trains `fluctuation` on normal clips 0-9 (channel 0) with the trainer's defaults, then replays
every test clip (normal 10-19, anomalous 0-19) as its own stream through the real daemon path
(`edge.daemon.Detector` over a `FileSource`) with the bundle's default threshold and event
logic, and counts the clips that raise a `start`. Prints the counts, the threshold summary and
the normal/fault score maxima, and each clip's mean normalised log score z (the CUSUM's own
scale): a clip whose mean z stays below the CUSUM's drift would not raise an event however long
it lasted, so that count bounds what the integrated evidence can find with this statistic.

The threshold rule and the CUSUM's constants (module docstring of edge/threshold.py,
edge/events.py) were written down and committed before these counts were first looked at, and
the bundle's threshold and CUSUM come from held-out *normal* training audio only. One choice did
look at test clips: K = 3 of N = 4 was adopted by a rule written first but judged on
`bench/machines.py`'s counts, this fan's among them (bench/SELECTION.md, 2026-11-30).
`--no-integrate` runs the same bundle with K-of-N alone
(`detector.integrate = false`), to show what the CUSUM adds. `--kind` trains another kind with
its defaults (the int8 CNN never with the fan in its corpus); `--members` trains an `ensemble`
of those kinds instead (train.ensemble), to see a candidate's operating point the same way.
The threshold summary's first lines say what the held-out normal audio reached.
`--persist S` streams every test clip looped to S seconds instead (an equal-power crossfade of
0.5 s at each join, so the joins add no step a live microphone would not hear): a fault that
persists, as a worn bearing does for days, and normal running S seconds long, to show what the
integrated evidence finds when it has more than one clip's time, and whether the joins or the
longer exposure raise anything on normal running.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machines import TRAINERS  # noqa: E402

from edge.audio_io import read_audio  # noqa: E402
from edge.bundle import Bundle, load_bundle  # noqa: E402
from edge.daemon import Detector, Sink  # noqa: E402
from edge.events import Cusum  # noqa: E402
from edge.messages import EventMessage  # noqa: E402
from edge.pipeline import Step  # noqa: E402
from edge.settings import Settings  # noqa: E402
from edge.sources import FileSource  # noqa: E402
from edge.threshold import DEFAULT_FALSE_ALARMS_PER_DAY, describe  # noqa: E402

CHANNEL = 0
KINDS = {k: v for k, v in TRAINERS.items() if k not in ("ensemble", "autoencoder")}
"""Kinds to train alone, each with its trainer's defaults (module, function): the machine
benchmark's (an ensemble is `--members`; the autoencoder is left to bench/benchmark.py)."""
TRAIN_IDS = range(10)
NORMAL_TEST_IDS = range(10, 20)
FAULT_TEST_IDS = range(20)
Replayed = tuple[int, float, list[float]]
"""What `replay` finds in one clip: starts raised, the highest window score, all window scores."""
CROSSFADE_S = 0.5
"""Length of the equal-power crossfade at each join of a looped clip (`--persist`)."""


class Starts(Sink):
    """Counts `start` events."""

    def __init__(self) -> None:
        self.starts = 0

    def event(self, message: EventMessage) -> None:
        """Count a start."""
        self.starts += message.type == "start"


def clips(data: Path, kind: str, ids: range) -> list[Path]:
    """MIMII fan id_00 clips of one kind."""
    return [data / "mimii_fan_id00" / kind / f"{i:08d}.wav" for i in ids]


def looped(clip: Path, seconds: float, out: Path, samplerate: int) -> Path:
    """`clip`'s channel looped to `seconds`, each join an equal-power crossfade, written to
    `out` (float, so nothing is rounded)."""
    audio = read_audio(clip, samplerate, channel=CHANNEL)
    n = int(CROSSFADE_S * samplerate)
    angle = np.linspace(0.0, np.pi / 2, n, dtype=np.float32)
    join = audio[-n:] * np.cos(angle) + audio[:n] * np.sin(angle)  # the same at every join
    total, pieces, length = int(seconds * samplerate), [audio[:-n]], len(audio) - n
    while length < total:
        pieces += [join, audio[n:-n]]
        length += len(audio) - n
    pieces.append(audio[-n:])
    sf.write(out, np.concatenate(pieces)[:total], samplerate, subtype="FLOAT")
    return out


def replay(
    bundle_path: Path, clip: Path, workdir: Path, integrate: bool
) -> tuple[int, float, list[float]]:
    """Starts raised, the highest window score and all window scores when one clip is streamed
    on its own."""
    bundle = load_bundle(bundle_path)
    settings = Settings(
        device_id="bench",
        model=bundle_path,
        data_dir=workdir,
        clips={"enabled": False},
        detector={"integrate": integrate},
    )
    sink = Starts()
    scores: list[float] = []

    def on_step(step: Step) -> None:
        scores.append(step.window.score)

    detector = Detector(settings, bundle, [sink], on_step=on_step)
    detector.run(FileSource([clip], bundle.features.samplerate, channel=CHANNEL))
    return sink.starts, max(scores, default=float("-inf")), scores


def mean_z(scores: list[float], cusum: Cusum) -> float:
    """A clip's mean normalised log score on the CUSUM's scale."""
    return float(np.mean([cusum.normalise(s) for s in scores]))


def main() -> int:
    """Train, replay, print the counts."""
    args = parse_args()
    integrate = not args.no_integrate
    bundle, normal, fault = train_and_replay(args, integrate)
    cusum = Cusum.from_params(bundle.manifest.threshold.params)
    figures = tally(args, integrate, bundle, normal, fault, cusum)
    print(describe(bundle.threshold, bundle.manifest.threshold.params))
    print_counts(figures, args.persist)
    if cusum:
        print_mean_z(cusum, figures["normal_clip_mean_z"], figures["fault_clip_mean_z"])
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=float) + "\n")
    return 0 if np.isfinite(figures["normal_test_window_max"]) else 1


def parse_args() -> argparse.Namespace:
    """The command line, with --persist checked."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--false-alarms-per-day", type=float, default=DEFAULT_FALSE_ALARMS_PER_DAY)
    ap.add_argument("--no-integrate", action="store_true", help="K-of-N alone, no CUSUM")
    ap.add_argument("--members", nargs="+", help="train an ensemble of these kinds instead")
    ap.add_argument("--kind", choices=sorted(KINDS), default="fluctuation", help="kind to train")
    ap.add_argument(
        "--persist", type=float, metavar="S", help="loop every test clip to S seconds (>= 10)"
    )
    args = ap.parse_args()
    if args.persist is not None and args.persist < 10:
        ap.error("--persist: at least the clips' own 10 s")
    return args


def trainer(args: argparse.Namespace) -> Callable[..., Path]:
    """The trainer of --kind, or of an ensemble of --members."""
    module, function = KINDS[args.kind]
    train = getattr(importlib.import_module(module), function)
    if args.kind == "embedding":  # the machine under test is never "another machine"
        train = partial(train, exclude=["fan_id00"])
    if args.members:
        from train.ensemble import train_ensemble

        train = partial(train_ensemble, members=args.members, exclude=["fan_id00"])
    return train


def train_and_replay(
    args: argparse.Namespace, integrate: bool
) -> tuple[Bundle, list[Replayed], list[Replayed]]:
    """The bundle trained on the normal training clips, and every normal and fault test clip
    replayed through it."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train = trainer(args)
        bundle_path = train(
            clips(args.data, "normal", TRAIN_IDS),
            work / "fan.bundle",
            channel=CHANNEL,
            false_alarms_per_day=args.false_alarms_per_day,
        )
        bundle = load_bundle(bundle_path)
        rate = bundle.features.samplerate

        def stream(clip: Path) -> Path:
            if args.persist is None:
                return clip
            return looped(clip, args.persist, work / f"{clip.parent.name}-{clip.name}", rate)

        normal = [
            replay(bundle_path, stream(c), work, integrate)
            for c in clips(args.data, "normal", NORMAL_TEST_IDS)
        ]
        fault = [
            replay(bundle_path, stream(c), work, integrate)
            for c in clips(args.data, "anomalous", FAULT_TEST_IDS)
        ]
    return bundle, normal, fault


def tally(
    args: argparse.Namespace,
    integrate: bool,
    bundle: Bundle,
    normal: list[Replayed],
    fault: list[Replayed],
    cusum: Cusum | None,
) -> dict[str, Any]:
    """The figures: counts, peaks and mean z of the normal and fault test clips."""
    normal_max = max(p for _, p, _ in normal)
    z_normal = [round(mean_z(w, cusum), 3) for _, _, w in normal] if cusum else []
    z_fault = [round(mean_z(w, cusum), 3) for _, _, w in fault] if cusum else []
    return {
        "detector": f"ensemble of {' + '.join(args.members)}" if args.members else args.kind,
        "false_alarms_per_day": args.false_alarms_per_day,
        "integrate": integrate,
        "persist_s": args.persist,
        "threshold": bundle.threshold,
        "params": bundle.manifest.threshold.params,
        "normal_clips_with_event": sum(s > 0 for s, _, _ in normal),
        "normal_clips": len(normal),
        "fault_clips_with_event": sum(s > 0 for s, _, _ in fault),
        "fault_clips": len(fault),
        "normal_test_window_max": normal_max,
        "fault_clips_above_all_normal_windows": sum(p > normal_max for _, p, _ in fault),
        "fault_clip_peaks": [round(p, 4) for _, p, _ in fault],
        "fault_clip_starts": [s for s, _, _ in fault],
        "normal_clip_mean_z": z_normal,
        "fault_clip_mean_z": z_fault,
    }


def print_counts(figures: dict[str, Any], persist: float | None) -> None:
    """The counts line, then the fault clips' starts and peaks."""
    looping = f"each clip looped to {persist:g} s; " if persist else ""
    print(
        f"integrate {figures['integrate']}; {looping}"
        f"threshold {figures['threshold']:.4g}; "
        f"fault clips with an event: {figures['fault_clips_with_event']}/{figures['fault_clips']}; "
        f"normal clips with an event: {figures['normal_clips_with_event']}/"
        f"{figures['normal_clips']}; "
        f"highest normal test window {figures['normal_test_window_max']:.4g}; fault clips with "
        f"a window above it: {figures['fault_clips_above_all_normal_windows']}/"
        f"{figures['fault_clips']}"
    )
    print("fault starts per clip:", figures["fault_clip_starts"])
    print("fault peaks per clip:", figures["fault_clip_peaks"])


def print_mean_z(cusum: Cusum, z_normal: list[float], z_fault: list[float]) -> None:
    """How the clips' mean z stand against the CUSUM's drift."""
    drift = cusum.drift
    print(
        f"mean z per clip (CUSUM drift {drift:g}): faults above it "
        f"{sum(z > drift for z in z_fault)}/{len(z_fault)}, normals above it "
        f"{sum(z > drift for z in z_normal)}/{len(z_normal)}; highest normal "
        f"{max(z_normal):.2f}, faults above the highest normal "
        f"{sum(z > max(z_normal) for z in z_fault)}/{len(z_fault)}"
    )


if __name__ == "__main__":
    sys.exit(main())
