"""Peak memory of learning on site: a refit at the end of a period, and an event's evidence
clip marked normal, each in a process of its own (its peak resident set, `ru_maxrss`).

    python bench/site_memory.py [--windows 20000 1000000] [--clip-minutes 60]

The service runs under MemoryHigh=200M and MemoryMax=300M (deploy/soundsentry.service), and the
daemon holds 65 to 100 MB on its own: what a refit or a mark adds must stay well inside. The
refit is measured on a fluctuation bundle (64 features per window) and a levels bundle (192),
trained here on the test fixtures, with the period's store filled by the fixtures' windows
(plus a little noise) up to `max_windows` (which the site keeps within SITE_NUMBERS); the
clip is the fixtures' fan looped to the given length and written as 16-bit PCM at 16 kHz,
as the daemon writes its clips, and taken through `Detector._event_rows`' path.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = sorted((ROOT / "tests" / "data").glob("fan-normal-*.flac"))
DEMO = ROOT / "models" / "fan-demo.bundle"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def refit(bundle_path: Path, windows: int) -> dict[str, float]:
    """One period of `windows` windows and its refit; peak before and after, in MB."""
    import numpy as np

    from edge.adapt import Adapter
    from edge.audio_io import read_audio
    from edge.bundle import load_bundle
    from edge.features import windows_of
    from edge.learning import FEATURIZERS
    from edge.settings import load_settings

    bundle = load_bundle(bundle_path)
    featurize = FEATURIZERS[bundle.manifest.kind]
    rate = bundle.features.samplerate
    rows = np.concatenate(
        [featurize(windows_of(read_audio(f, rate), bundle.features)) for f in FIXTURES]
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        learning = {"max_windows": windows}
        settings = load_settings(None, model=bundle_path, data_dir=data, learning=learning)
        adapter = Adapter(data, settings.learning, bundle, bundle_path)
        adapter.start(10.0, bundle)
        assert adapter.period is not None
        store = adapter.period.store
        rng = np.random.default_rng(0)
        for i in range(0, windows, len(rows)):
            store.add(rows + rng.normal(0, 0.01, rows.shape).astype(np.float32), i // 20)
        adapter.period.collected_s = adapter.period.target_s = windows * 0.5
        kept, before = len(store), peak_mb()
        adapter.finish(bundle)
    return {
        "kept_windows": kept,
        "features": rows.shape[1],
        "before_mb": before,
        "peak_mb": peak_mb(),
    }


def mark(minutes: float) -> dict[str, float]:
    """The windows of a clip of `minutes` as `mark_normal` takes them; peak in MB."""
    import itertools

    import numpy as np
    import soundfile as sf

    from edge.audio_io import read_audio, stream_audio
    from edge.bundle import load_bundle
    from edge.daemon import FEATURIZE_BATCH
    from edge.learning import FEATURIZERS
    from edge.machine_state import evidence_stream

    bundle = load_bundle(DEMO)
    params = bundle.features
    featurize = FEATURIZERS[bundle.manifest.kind]
    fan = np.concatenate([read_audio(f, params.samplerate) for f in FIXTURES])
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.wav"
        with sf.SoundFile(clip, "w", params.samplerate, 1, "PCM_16") as out:
            for _ in range(int(minutes * 60 * params.samplerate) // len(fan)):
                out.write(fan)
        del fan
        before, started = peak_mb(), time.perf_counter()
        windows = evidence_stream(stream_audio(clip, params.samplerate), params, None)
        rows = []
        while batch := list(itertools.islice(windows, FEATURIZE_BATCH)):
            rows.append(featurize(np.stack(batch)))
        n = sum(len(r) for r in rows)
    return {
        "windows": n,
        "seconds": time.perf_counter() - started,
        "before_mb": before,
        "peak_mb": peak_mb(),
    }


def child(args: list[str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, nargs="+", default=[20000, 1_000_000])
    ap.add_argument("--clip-minutes", type=float, default=60.0)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        what, *rest = args.child
        result = refit(Path(rest[0]), int(rest[1])) if what == "refit" else mark(float(rest[0]))
        print(json.dumps(result))
        return
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(f"{stamp} on {platform.machine()}, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        levels = Path(tmp) / "levels.bundle"
        subprocess.run(
            [sys.executable, "-m", "soundsentry", "train", "--detector", "levels", "--normal",
             *map(str, FIXTURES), "--out", str(levels)],
            check=True, capture_output=True,
        )  # fmt: skip
        for name, path in (("fluctuation", DEMO), ("levels", levels)):
            for windows in args.windows:
                r = child(["refit", str(path), str(windows)])
                print(
                    f"refit, {name} ({r['features']} features), max_windows {windows}: "
                    f"{r['kept_windows']} windows kept, peak {r['peak_mb']:.0f} MB "
                    f"({r['peak_mb'] - r['before_mb']:+.0f} MB over the period's)"
                )
    r = child(["mark", str(args.clip_minutes)])
    print(
        f"mark_normal, a {args.clip_minutes:g}-min clip: {r['windows']} windows in "
        f"{r['seconds']:.1f} s, peak {r['peak_mb']:.0f} MB "
        f"({r['peak_mb'] - r['before_mb']:+.0f} MB)"
    )


if __name__ == "__main__":
    main()
