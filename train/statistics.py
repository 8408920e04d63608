"""What the numpy statistics trainers share (`fluctuation`, `levels`, `knn`): per-window feature
vectors of normal audio split into fit, held-out and all, a Gaussian with Ledoit-Wolf
shrinkage, the held-out threshold and the manifest they write. No TensorFlow.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import soundfile as sf

from edge import __version__
from edge.audio_io import DeadChannelError, read_audio, read_each, sf_path
from edge.bundle import (
    ALL_CHANNELS,
    FORMAT,
    FORMAT_VERSION,
    id_stem,
    sha256_bytes,
    write_bundle,
)
from edge.detectors.base import MIN_FEATURE_STD
from edge.errors import AudioError
from edge.features import FeatureParams
from edge.learning import training_summary
from edge.machine_state import OFF, evidence_features, evidence_windows, machine_profile
from edge.scoring import FluctuationScorer
from edge.threshold import DEFAULT_FALSE_ALARMS_PER_DAY, RULE, score_stats
from train.dataset import (
    FLUCTUATION_HOP_DIVISOR,
    Holdout,
    dense_params,
    holdout_split,
    require_held_out,
    threshold_from_holdout,
    training_audio,
    warn_dead,
)
from train.progress import progress
from train.states import STATE_LEVELS, StateLevels, warn_not_apart, warn_off_near

log = logging.getLogger(__name__)

MIN_SHRINKAGE = 0.01
"""Least covariance shrinkage towards a scaled identity; more (Ledoit-Wolf) on little data."""
HOLDOUT_NOTE = "threshold from held-out audio scored by a model fitted without it"

Featurize = Callable[[np.ndarray], np.ndarray]
"""Log-mel windows (n, frames, mels) -> feature vectors (n, dim)."""
S = TypeVar("S", bound=FluctuationScorer)


STEADY = (
    "the normal audio's features do not vary ({why}): is the audio silent, a dead channel or "
    "a steady electrical signal rather than a microphone? pick a channel that hears the "
    "machine with --channel N"
)


def fit_statistics(
    f: np.ndarray,
    scorer: type[S] = FluctuationScorer,  # type: ignore[assignment]
    std_floor: float = 0.0,
) -> S:
    """Standardisation, centre and shrunk inverse covariance of feature vectors (n, dim).
    `std_floor`: the least spread a feature is given, for features known only to a resolution
    (an int8 output: one step), so one that happened not to move in training does not turn a
    one-step change into an enormous distance."""
    if len(f) < 2:
        raise AudioError("not enough audio to fit the normal statistics (need 2+ windows)")
    mean = f.mean(axis=0)
    # in float64, as knn's: float32 features floored in float32 fell just under the floor
    std = np.maximum(f.std(axis=0, dtype=np.float64), max(std_floor, MIN_FEATURE_STD))
    z = (f - mean) / std
    center = z.mean(axis=0)
    zc = z - center
    cov = zc.T @ zc / len(zc)
    alpha = max(MIN_SHRINKAGE, ledoit_wolf_shrinkage(zc))
    target = np.trace(cov) / len(cov) * np.eye(len(cov))
    try:
        precision = np.linalg.inv((1 - alpha) * cov + alpha * target)
    except np.linalg.LinAlgError:
        raise AudioError(STEADY.format(why="their covariance is singular")) from None
    return scorer(mean, std, center, precision)


def ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    """Ledoit-Wolf optimal shrinkage intensity for centred samples x (n, p)."""
    n, p = x.shape
    x2 = x**2
    trace = x2.sum(axis=0) / n
    mu = trace.sum() / p
    delta_ = float(np.sum((x.T @ x) ** 2)) / n**2
    beta_ = float(np.sum(x2.T @ x2))
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2 * mu * trace.sum() + p * mu**2) / p
    return 0.0 if delta <= 0 else float(min(beta, delta) / delta)


def channel_views(
    path: Path, params: FeatureParams, channel: int, all_channels: bool
) -> list[np.ndarray]:
    """The audio of one file: one channel (or a downmix), or every channel as its own view."""
    if not all_channels:
        return [read_audio(path, params.samplerate, channel, need_sound=True, mono_any=True)]
    try:
        n = sf.info(sf_path(path)).channels
    except (sf.LibsndfileError, RuntimeError):
        n = 1  # read_audio will say what is wrong with the file
    try:
        return [read_audio(path, params.samplerate, c, need_sound=True) for c in range(n)]
    except DeadChannelError as exc:  # its fix, --channel N, is refused beside --all-channels
        raise DeadChannelError(
            exc.path, exc.what, exc.channel, exc.channels,
            fix="--all-channels trains on every channel as a view: leave it out and pick one "
            f"that hears the machine with --channel N (of {exc.channels})",
        ) from None  # fmt: skip


@dataclass
class Run:
    """One training run of a statistics detector: its audio as feature vectors (fit and all
    at a dense hop, held-out at the edge's hop), where they came from, and, once set, the
    threshold the held-out audio gave."""

    out: Path
    params: FeatureParams
    holdout: Holdout
    fit: np.ndarray
    held: np.ndarray
    all: np.ndarray
    seconds: tuple[float, float]
    """Seconds of all audio and of the held-out audio (a recording counts once, however many
    channels it has as views)."""
    channel: int
    threshold: float = 0.0
    rule_params: dict[str, Any] = field(default_factory=dict)
    hold_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    machine: dict[str, Any] = field(default_factory=dict)
    """The manifest's `machine` section: how loud the machine runs, so the edge knows `off`."""
    held_pieces: list[int] | None = None
    """Held-out windows of each recording (or channel view), in order: each a stream of its own
    for the threshold's floors and correlation (edge.threshold.Pieces)."""
    running_seconds: float | None = None
    """Seconds of the audio whose windows were taken as the machine running (each recording's
    length times the share of its windows kept), the model's evidence."""
    states: list[str] | None = None
    """The state folders' names (`train --normal-states`), which the edge names."""
    state_levels: np.ndarray | None = None
    """(states, mels): each state's mean log-mel band levels, by which the edge names them."""
    validation: dict[str, Any] | None = None
    """The manifest's `validation`: with states, the seconds and recordings of each."""

    @property
    def state_arrays(self) -> dict[str, np.ndarray]:
        """The arrays a bundle of state folders carries besides its model's."""
        return {} if self.state_levels is None else {STATE_LEVELS: self.state_levels}

    def set_threshold(self, hold_scores: np.ndarray, false_alarms_per_day: float) -> None:
        """The budget threshold on scores of the held-out audio by a model fitted without it."""
        views = self.channel == ALL_CHANNELS  # the channels' scores span one recording's time
        value, rule_params = threshold_from_holdout(
            hold_scores, false_alarms_per_day, self.params.hop_seconds,
            self.seconds[1] if views else None, self.held_pieces,
        )  # fmt: skip
        rule_params["note"] = HOLDOUT_NOTE
        self.threshold, self.rule_params, self.hold_scores = value, rule_params, hold_scores


def collect(
    normal: list[str | Path] | None,
    out: str | Path,
    featurize: Featurize,
    params: FeatureParams,
    channel: int = 0,
    all_channels: bool = False,
    states: dict[str, list[Path]] | None = None,
) -> Run:
    """Feature vectors of the normal audio, split by the held-out rule of every trainer. With
    `states` (state name -> its recordings, `train.dataset.state_folders`) each state is split
    on its own, the machine's running level is each state's, a state `off` (the place with the
    machine stopped) is left out of the model, and the run keeps each state's level spectrum
    (`Run.states`), by which the edge names the state."""
    groups = states or {"": training_audio(normal or [], params.samplerate,
                                             params.window_seconds, channel)}  # fmt: skip
    holdouts = {name: holdout_split(files) for name, files in groups.items()}
    files = [f for group in groups.values() for f in group]
    label = {f: i for i, group in enumerate(groups.values()) for f in group}
    names = list(groups)
    views = _read_views(files, params, channel, all_channels)
    running_views = [(p, a) for p, _, a in views if names[label[p]] != OFF]
    machine = machine_profile(
        [a for _, a in running_views], params,
        groups=[label[p] for p, _ in running_views] if states else None, names=names,
    )  # fmt: skip
    levels = StateLevels(names, params) if states else None
    warn_dead(((p, a) for p, _, a in views if names[label[p]] != OFF), params)
    # only what the device scores: not a dropout, silence or the machine off
    off = machine.get("off_below_dbfs")
    stated = [(path, view, audio, label[path]) for path, view, audio in views]
    parts = _gather(stated, featurize, params, holdouts, names, levels, off)
    del views, stated, running_views  # the audio: its vectors are all the run needs from here
    where = ALL_CHANNELS if all_channels else channel
    run = _run_of(parts, out, featurize, params, holdouts, where)
    run.machine = machine
    if levels is not None:
        _keep_states(run, levels, names, groups, parts)
    run.held_pieces = [len(part) for part in parts.hold]
    run.running_seconds = parts.running
    return run


@dataclass
class _Parts:
    """What `collect` gathers from the channel views: feature vectors and seconds of audio."""

    fit: list[np.ndarray] = field(default_factory=list)
    hold: list[np.ndarray] = field(default_factory=list)
    whole: list[np.ndarray] = field(default_factory=list)
    held_by_state: dict[int, list[np.ndarray]] = field(default_factory=dict)
    state_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    hold_seconds: float = 0.0
    running: float = 0.0


def _read_views(
    files: list[Path], params: FeatureParams, channel: int, all_channels: bool
) -> list[tuple[Path, int, np.ndarray]]:
    """(file, channel view, audio) of every file, each unusable one named at once."""
    read = read_each(  # every file found unusable in reading named at once
        files,
        lambda path: channel_views(path, params, channel, all_channels),
        progress(files, "reading"),
    )
    return [
        (path, view, audio)
        for path, audio_views in zip(files, read, strict=True)
        for view, audio in enumerate(audio_views)
    ]


def _gather(
    views: list[tuple[Path, int, np.ndarray, int]],
    featurize: Featurize,
    params: FeatureParams,
    holdouts: dict[str, Holdout],
    names: list[str],
    levels: StateLevels | None,
    off: float | None,
) -> _Parts:
    """Fit, held-out and whole-file feature vectors of every (file, view, audio, state)."""
    dense = dense_params(params, FLUCTUATION_HOP_DIVISOR)
    parts = _Parts(state_seconds=dict.fromkeys(names, 0.0))
    for path, view, audio, state in progress(views, "features"):
        fit_audio, held_audio = holdouts[names[state]].parts(path, audio, params.window_samples)
        held = evidence_windows(held_audio, params, None if names[state] == OFF else off)
        if levels is not None:
            levels.add(state, fit_audio)
            parts.held_by_state.setdefault(state, []).append(held)
        if view == 0:  # the seconds of the recording, not of its channels
            parts.state_seconds[names[state]] += len(audio) / params.samplerate
        if names[state] == OFF:  # the place's own sound: named, never fitted, scored or counted
            continue  # (a site refit weighs the training audio by its seconds: a review)
        parts.fit.append(evidence_features(fit_audio, dense, off, featurize))
        parts.hold.append(featurize(held))
        parts.whole.append(evidence_features(audio, dense, off, featurize))
        if view == 0:
            parts.seconds += len(audio) / params.samplerate
            parts.hold_seconds += len(held_audio) / params.samplerate
            windows = max(dense.windows_in(len(audio)), 1)
            parts.running += len(audio) / params.samplerate * len(parts.whole[-1]) / windows
    return parts


def _run_of(
    parts: _Parts,
    out: str | Path,
    featurize: Featurize,
    params: FeatureParams,
    holdouts: dict[str, Holdout],
    where: int,
) -> Run:
    """The Run of the vectors gathered; refused when too little audio was held out."""
    empty = featurize(np.zeros((0, *params.shape)))
    hold_f = np.concatenate(parts.hold) if parts.hold else empty  # its pieces are counted later
    fit_f, all_f = _joined(parts.fit, empty), _joined(parts.whole, empty)
    model = [h for name, h in holdouts.items() if name != OFF]  # what the manifest's files are
    holdout = Holdout(
        sorted(f for h in model for f in h.fit), sorted(f for h in model for f in h.held)
    )
    require_held_out(len(hold_f), params, holdout.held)
    seconds = (parts.seconds, parts.hold_seconds)
    return Run(Path(out), params, holdout, fit_f, hold_f, all_f, seconds, where)


def _joined(vectors: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
    """The vectors of every view as one array; the list is emptied once they are joined, so
    the fit and the whole-audio vectors are not held twice at once (`subspace` keeps whole
    windows: an hour took 0.74 GB to train)."""
    joined = np.concatenate(vectors) if vectors else empty
    vectors.clear()
    return joined


def _keep_states(
    run: Run,
    levels: StateLevels,
    names: list[str],
    groups: dict[str, list[Path]],
    parts: _Parts,
) -> None:
    """Record each state's name, level spectrum and audio in `run`; warn of states too close."""
    run.states = names
    run.state_levels = levels.levels()
    run.validation = {  # as the CNN's trainer records them (edge.advice reads them)
        "state_seconds": {k: round(v, 1) for k, v in parts.state_seconds.items()},
        "state_recordings": {k: len(v) for k, v in groups.items()},
    }
    warn_not_apart(run.state_levels, names, {
        i: np.concatenate(w) for i, w in parts.held_by_state.items()
    })  # fmt: skip
    warn_off_near(run.state_levels, names)


@dataclass(frozen=True)
class Design:
    """What names a statistics detector in its manifest."""

    kind: str
    score: str
    feature: str
    architecture: str


def statistics_manifest(
    run: Run,
    design: Design,
    section: dict[str, Any],
    band_shares: np.ndarray,
    parameters: int,
    digest_of: np.ndarray,
) -> dict[str, Any]:
    """The manifest of a statistics bundle: `section` is its `statistics` (arrays in it go to
    arrays.npz), `band_shares` the held-out band evidence, `digest_of` names the model id."""
    digest = sha256_bytes(np.asarray(digest_of, np.float64).tobytes())[:8]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": f"{id_stem(run.out)}-{digest}",
        "kind": design.kind,
        "score": design.score,
        "features": run.params.to_dict(),
        "statistics": {"feature": design.feature, **section},
        "threshold": {"value": run.threshold, "rule": RULE, "params": run.rule_params},
        "normal_scores": score_stats(run.hold_scores, "held-out normal audio"),
        "machine": (run.machine | {"states": run.states}) if run.states else run.machine or None,
        "validation": run.validation,
        "normal_band_error": {
            "mean": band_shares.mean(axis=0).tolist(),
            "std": band_shares.std(axis=0).tolist(),
        },
        "training": {
            "files": run.holdout.all_names,  # the shipped model is fitted on all the audio
            "seconds": round(run.seconds[0], 3),
            "holdout_files": run.holdout.held_names,
            "holdout_seconds": round(run.seconds[1], 3),
            "fitted_seconds": round(run.seconds[0], 3),
            "running_seconds": None
            if run.running_seconds is None
            else round(min(run.running_seconds, run.seconds[0]), 3),
            "channel": run.channel,
            "epochs": 0,
            "seed": 0,
            "architecture": design.architecture,
            "parameters": parameters,
        },
        "versions": {
            "soundsentry": __version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


def gaussian_section(model: FluctuationScorer) -> dict[str, Any]:
    """The `statistics` arrays of a Gaussian model."""
    return {
        "feature_mean": model.mean.tolist(),
        "feature_std": model.std.tolist(),
        "center": model.center.tolist(),
        "precision": model.precision.tolist(),
    }


@dataclass(frozen=True)
class Trainer:
    """A numpy trainer: the features it models and the fit that writes its bundle. Called as
    `trainer(normal, out, channel=0, all_channels=False, params=None, false_alarms_per_day=1)`,
    the same for every numpy kind."""

    featurize: Featurize
    fit: Callable[[Run, float], Path]
    """Fits the model on a run's features, given the false-alarm budget; writes the bundle."""

    def __call__(
        self,
        normal: list[str | Path],
        out: str | Path,
        channel: int = 0,
        all_channels: bool = False,
        params: FeatureParams | None = None,
        false_alarms_per_day: float = DEFAULT_FALSE_ALARMS_PER_DAY,
        states: dict[str, list[Path]] | None = None,
    ) -> Path:
        """Fit on normal audio (or `states`: state name -> recordings) and write a bundle;
        returns its path."""
        params = params or FeatureParams()
        run = collect(normal, out, self.featurize, params, channel, all_channels, states)
        return self.fit(run, false_alarms_per_day)


def train_gaussian(
    run: Run,
    design: Design,
    scorer: type[FluctuationScorer],
    false_alarms_per_day: float,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Fit a shrunk Gaussian: the threshold from the held-out audio scored by a model fitted
    without it, the shipped model on all the audio. `extra`: more manifest fields."""
    provisional = fit_statistics(run.fit, scorer)
    run.set_threshold(provisional.distance(run.held), false_alarms_per_day)
    final = fit_statistics(run.all, scorer)
    dim = len(final.mean)
    manifest = statistics_manifest(
        run,
        design,
        gaussian_section(final),
        final.band_shares(run.held),
        dim * dim + 3 * dim,
        final.precision,
    )
    # What a refit on site pools with the site's audio (edge.learning).
    summary = training_summary(provisional, final, run.held)
    write_bundle(run.out, manifest | (extra or {}), {}, summary | run.state_arrays)
    log.info(
        "wrote %s (threshold %.4g on %d held-out windows)",
        run.out,
        run.threshold,
        len(run.hold_scores),
    )
    return run.out
