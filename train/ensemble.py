"""`soundsentry train --detector ensemble`: detectors trained side by side on the same audio and
combined on one common scale (edge/detectors/ensemble.py): numpy kinds, and at most one network,
the int8 CNN (`--members fluctuation embedding`), whose model becomes the bundle's.

Every member is trained by its own trainer with its defaults, on the same split: the held-out
windows are the same windows for every member, in the same order, scored by each member's
model fitted without them. Those scores give each member's common scale (median and spread of
the log scores) and the ensemble's own held-out scores, from which its threshold and CUSUM
come, as for any kind. The shipped members are fitted on all the audio.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from edge.bundle import MODEL_FLOAT, MODEL_INT8, Bundle, Manifest, load_bundle, write_bundle
from edge.detectors.ensemble import MEMBER_PLUGINS, combine, common_scale
from edge.errors import AudioError
from edge.features import FeatureParams
from edge.machine_state import evidence_windows, said_once
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
NETWORK_MEMBERS = ("embedding",)
"""Members with a network (train.embedding, TensorFlow to train; LiteRT on the edge): at most one
per ensemble, whose int8 model is the bundle's."""
MEMBERS = ("fluctuation", "subspace")
"""The default members: one statistic that ignores level (how each band fluctuates) and one
that models it (the subspace of stacked log-mel frames), chosen for what they look at, before
the machine benchmark was run with an ensemble."""
ARCHITECTURE = "ensemble-mean-z-v1"
DESIGN = Design("ensemble", "ensemble-mean-z", "members", ARCHITECTURE)


def _check_members(members: Sequence[str]) -> None:
    """Refuse members that are not distinct kinds, at least one numpy and at most one network."""
    known = (*TRAINERS, *NETWORK_MEMBERS)
    unknown = [m for m in members if m not in known]
    networks = [m for m in members if m in NETWORK_MEMBERS]
    numpy_kinds = [m for m in members if m in TRAINERS]
    if unknown or not numpy_kinds or len(set(members)) != len(members) or len(networks) > 1:
        raise AudioError(
            f"ensemble members must be distinct kinds of {', '.join(known)}, at least one of "
            f"them numpy and at most one a network ({', '.join(NETWORK_MEMBERS)}); got "
            f"{list(members)}"
        )


def _fit_network_member(
    normal: list[str | Path],
    path: Path,
    channel: int,
    all_channels: bool,
    params: FeatureParams,
    false_alarms_per_day: float,
    exclude: Iterable[str],
    epochs: int | None,
    epoch_windows: int | None,
    seed: int,
) -> tuple[Path, np.ndarray]:
    """The network member's bundle at `path` and its held-out scores."""
    from train.embedding import DEFAULT_EPOCHS, fit_embedding  # TensorFlow: only here

    return fit_embedding(
        normal, path, channel=channel, params=params,
        false_alarms_per_day=false_alarms_per_day, exclude=exclude,
        all_channels=all_channels, epochs=epochs or DEFAULT_EPOCHS,
        epoch_windows=epoch_windows, seed=seed,
    )  # fmt: skip


def _entry(kind: str, prefix: str, member: Bundle, scores: np.ndarray) -> dict:
    """The manifest's entry of a member: its kind, score, arrays' prefix and common scale."""
    center, spread = common_scale(scores)
    return {
        "kind": kind,
        "score": MEMBER_PLUGINS[kind].score_name,
        "prefix": prefix,
        "center": center,
        "spread": spread,
        "statistics": member.manifest.statistics.model_dump()
        if member.manifest.statistics
        else None,
    }


def _member_arrays(prefix: str, member: Bundle) -> dict[str, np.ndarray]:
    """A member's arrays under its prefix, without its band reference and machine levels."""
    return {
        f"{prefix}.{k}": v
        for k, v in member.arrays.items()
        if not k.startswith("normal_band_error.") and not k.startswith("machine.")
    }


def _require_same_windows(members: Sequence[str], held: list[np.ndarray]) -> None:
    """Refuse members whose held-out scores are not of the same windows."""
    if len({len(h) for h in held}) != 1:  # the same windows, or the scales mean nothing
        raise AudioError(
            "ensemble members held out different audio: "
            + ", ".join(f"{m} {len(h)} windows" for m, h in zip(members, held, strict=True))
        )


def train_ensemble(
    normal: list[str | Path],
    out: str | Path,
    channel: int = 0,
    all_channels: bool = False,
    params: FeatureParams | None = None,
    false_alarms_per_day: float = DEFAULT_FALSE_ALARMS_PER_DAY,
    members: Sequence[str] = MEMBERS,
    exclude: Iterable[str] = (),
    epochs: int | None = None,
    epoch_windows: int | None = None,
    seed: int = 0,
) -> Path:
    """Train each member, put them on a common scale and write one `ensemble` bundle. `exclude`
    keeps corpus machines out of the network member's training, `epochs` and `epoch_windows`
    size it (train.embedding's defaults when None), `seed` seeds it."""
    params = params or FeatureParams()
    _check_members(members)
    # searched, checked and rid of copies once, so that each member does not warn of them again
    normal = list(training_audio(normal, params.samplerate, params.window_seconds, channel))
    runs: list[Run] = []
    held: list[np.ndarray] = []
    arrays: dict[str, np.ndarray] = {}
    files: dict[str, bytes] = {}
    network: Manifest | None = None
    entries = []
    with tempfile.TemporaryDirectory() as tmp, said_once():
        for i, kind in enumerate(members):
            path = Path(tmp) / f"{kind}.bundle"
            if kind in NETWORK_MEMBERS:
                path, scores = _fit_network_member(
                    normal, path, channel, all_channels, params, false_alarms_per_day, exclude,
                    epochs, epoch_windows, seed,
                )  # fmt: skip
            else:
                trainer = TRAINERS[kind]
                run = collect(normal, path, trainer.featurize, params, channel, all_channels)
                path, scores = trainer.fit(run, false_alarms_per_day), run.hold_scores
                runs.append(run)
            member = load_bundle(path)
            held.append(scores)
            entries.append(_entry(kind, f"m{i}", member, scores))
            arrays |= _member_arrays(f"m{i}", member)
            if kind in NETWORK_MEMBERS:  # the bundle's one network is this member's
                files = {name: member.file_bytes(name) for name in (MODEL_INT8, MODEL_FLOAT)}
                network = member.manifest
    _require_same_windows(members, held)
    runs[0].out = Path(out)  # the members were written aside; the ensemble goes to `out`
    return _write(runs[0], held, entries, arrays, files, network, false_alarms_per_day, normal)


def _write(
    run: Run,
    held: list[np.ndarray],
    entries: list[dict],
    arrays: dict[str, np.ndarray],
    files: dict[str, bytes],
    network: Manifest | None,
    budget: float,
    normal: list[str | Path],
) -> Path:
    """The ensemble's threshold from its members' held-out scores; writes the bundle. The band
    reference is the shipped ensemble's band evidence on the held-out windows. With a `network`
    member (its manifest), the bundle takes its tensors, epochs, seed, weights and task
    accuracy."""
    scales = [(e["center"], e["spread"]) for e in entries]
    run.set_threshold(combine(held, scales), budget)
    section = {"ensemble": {"combine": "mean-z", "members": entries}}
    parameters = sum(a.size for a in arrays.values())
    digest = np.concatenate([a.ravel()[:64] for _, a in sorted(arrays.items())])

    def manifest(bands: np.ndarray) -> dict:
        fields = statistics_manifest(run, DESIGN, {}, bands, parameters, digest) | section
        if network is not None:
            t, trained = fields["training"], network.training
            t |= {"epochs": trained.epochs, "seed": trained.seed}
            t["parameters"] += trained.parameters
            fields["input"] = network.input.model_dump() if network.input else None
            fields["output"] = network.output.model_dump() if network.output else None
            if network.validation:
                fields["validation"] = {"network": network.validation}
        return fields

    n_mels = run.params.n_mels
    # `out` is written once: a run stopped between two writes there left band references of
    # zeros in a bundle that loaded (deviations of 10^9)
    with tempfile.TemporaryDirectory() as tmp:
        draft = Path(tmp) / "draft.bundle"
        write_bundle(draft, manifest(np.zeros((1, n_mels))), files, arrays)
        scorer = Scorer.from_bundle(load_bundle(draft))
        bands = np.array([scorer.score(w).band_error for w in held_windows(run, normal)])
    write_bundle(run.out, manifest(bands if len(bands) else np.zeros((1, n_mels))), files, arrays)
    log.info("wrote %s (%s, threshold %.4g)", run.out, "+".join(e["kind"] for e in entries),
             run.threshold)  # fmt: skip
    return run.out


def held_windows(run: Run, normal: list[str | Path]) -> np.ndarray:
    """The log-mel windows of the run's held-out audio."""
    parts = []
    views = run.channel == ALL_CHANNELS
    off = run.machine.get("off_below_dbfs")
    for path in training_audio(normal):
        for audio in channel_views(path, run.params, 0 if views else run.channel, views):
            _, held = run.holdout.parts(path, audio, run.params.window_samples)
            parts.append(evidence_windows(held, run.params, off))  # as every member's
    return np.concatenate(parts) if parts else np.zeros((0, *run.params.shape))
