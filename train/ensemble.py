"""`soundsentry train --detector ensemble`: numpy detectors trained side by side on the same
audio and combined on one common scale (edge/detectors/ensemble.py).

Every member is trained by its own trainer with its defaults, on the same split: the held-out
windows are the same windows for every member, in the same order, scored by each member's
model fitted without them. Those scores give each member's common scale (median and spread of
the log scores) and the ensemble's own held-out scores, from which its threshold and CUSUM
come, as for any kind. The shipped members are fitted on all the audio.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge.bundle import load_bundle, write_bundle
from edge.detectors.ensemble import MEMBER_PLUGINS, combine, common_scale
from edge.errors import AudioError
from edge.features import FeatureParams, windows_of
from edge.scoring import Scorer
from edge.threshold import DEFAULT_FALSE_ALARMS_PER_DAY
from train.dataset import training_audio
from train.fluctuation import train_fluctuation
from train.knn import train_knn
from train.levels import train_levels
from train.statistics import (
    ALL_CHANNELS,
    Design,
    Run,
    Trainer,
    channel_views,
    collect,
    statistics_manifest,
)
from train.subspace import train_subspace

log = logging.getLogger(__name__)

TRAINERS: dict[str, Trainer] = {
    "fluctuation": train_fluctuation,
    "levels": train_levels,
    "knn": train_knn,
    "subspace": train_subspace,
}
MEMBERS = ("fluctuation", "subspace")
"""The default members: one statistic that ignores level (how each band fluctuates) and one
that models it (the subspace of stacked log-mel frames), chosen for what they look at, before
the machine benchmark was run with an ensemble."""
ARCHITECTURE = "ensemble-mean-z-v1"
DESIGN = Design("ensemble", "ensemble-mean-z", "members", ARCHITECTURE)


def train_ensemble(
    normal: list[str | Path],
    out: str | Path,
    channel: int = 0,
    all_channels: bool = False,
    params: FeatureParams | None = None,
    false_alarms_per_day: float = DEFAULT_FALSE_ALARMS_PER_DAY,
    members: Sequence[str] = MEMBERS,
) -> Path:
    """Train each member, put them on a common scale and write one `ensemble` bundle."""
    params = params or FeatureParams()
    unknown = [m for m in members if m not in TRAINERS]
    if unknown or not members or len(set(members)) != len(members):
        raise AudioError(
            f"ensemble members must be distinct kinds of {', '.join(TRAINERS)}; got {members}"
        )
    runs: list[Run] = []
    arrays: dict[str, np.ndarray] = {}
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, kind in enumerate(members):
            trainer = TRAINERS[kind]
            run = collect(normal, Path(tmp) / f"{kind}.bundle", trainer.featurize, params,
                          channel, all_channels)  # fmt: skip
            member = load_bundle(trainer.fit(run, false_alarms_per_day))
            runs.append(run)
            center, spread = common_scale(run.hold_scores)
            prefix = f"m{i}"
            entries.append(
                {
                    "kind": kind,
                    "score": MEMBER_PLUGINS[kind].score_name,
                    "prefix": prefix,
                    "center": center,
                    "spread": spread,
                    "statistics": member.manifest.statistics.model_dump()
                    if member.manifest.statistics
                    else None,
                }
            )
            arrays |= {
                f"{prefix}.{k}": v
                for k, v in member.arrays.items()
                if not k.startswith("normal_band_error.")
            }
    runs[0].out = Path(out)  # the members were written aside; the ensemble goes to `out`
    return _write(runs, entries, arrays, false_alarms_per_day, normal)


def _write(
    runs: list[Run],
    entries: list[dict],
    arrays: dict[str, np.ndarray],
    budget: float,
    normal: list[str | Path],
) -> Path:
    """The ensemble's threshold from its members' held-out scores; writes the bundle. The band
    reference is the shipped ensemble's band evidence on the held-out windows."""
    run = runs[0]
    scales = [(e["center"], e["spread"]) for e in entries]
    run.set_threshold(combine([r.hold_scores for r in runs], scales), budget)
    section = {"ensemble": {"combine": "mean-z", "members": entries}}
    parameters = sum(a.size for a in arrays.values())
    digest = np.concatenate([a.ravel()[:64] for _, a in sorted(arrays.items())])

    def manifest(bands: np.ndarray) -> dict:
        return statistics_manifest(run, DESIGN, {}, bands, parameters, digest) | section

    n_mels = run.params.n_mels
    write_bundle(run.out, manifest(np.zeros((1, n_mels))), {}, arrays)
    scorer = Scorer.from_bundle(load_bundle(run.out))
    bands = np.array([scorer.score(w).band_error for w in held_windows(run, normal)])
    write_bundle(run.out, manifest(bands if len(bands) else np.zeros((1, n_mels))), {}, arrays)
    log.info("wrote %s (%s, threshold %.4g)", run.out, "+".join(e["kind"] for e in entries),
             run.threshold)  # fmt: skip
    return run.out


def held_windows(run: Run, normal: list[str | Path]) -> np.ndarray:
    """The log-mel windows of the run's held-out audio."""
    parts = []
    for path in training_audio(normal):
        for audio in channel_views(
            path, run.params, max(run.channel, 0), run.channel == ALL_CHANNELS
        ):
            _, held = run.holdout.parts(path, audio, run.params.window_samples)
            parts.append(windows_of(held, run.params))
    return np.concatenate(parts) if parts else np.zeros((0, *run.params.shape))
