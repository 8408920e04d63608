"""Learning on site: the site's normal set as compact per-window features (not audio), kept
in bounded storage under `{data_dir}/learning/`, and the refit of the bundle from them together
with its training data, in numpy on the Pi.

The normal set is the features of a commissioning period (`learn`) and of every event an
operator marked as normal (`mark_normal`). For the Gaussian kinds (fluctuation, levels) the
per-window feature is the vector the Gaussian models (64 or 192 numbers, 256 or 768 bytes a
window, 2 windows a second). Beyond `max_windows` a uniform random sample is kept (reservoir
sampling), so a day-long period costs no more than an hour of it.

The refit pools the site's windows with the training data as one sample. The bundle keeps the
training Gaussian (centre and shrunk precision, i.e. mean and covariance of the standardised
features) and the training seconds, i.e. its sufficient statistics; pooling them with the
site's mean and covariance, weighted by window counts, is exactly the Gaussian fitted to both
(up to the training shrinkage). The threshold comes from the budget rule on held-out scores of
both: the site's windows scored leave-one-chunk-out (chunks of a minute, a marked event is one
chunk, at most 10 folds) against the pooled model fitted without them, and the training
held-out windows the bundle carries (`training.holdout_features`, written by `train` since this
version) against the pooled model. Those were in the training fit, so their scores are slightly
optimistic (a few per cent for 64 dimensions and thousands of windows). A bundle without them
has only the site to back its threshold, and then needs MIN_AUDIO_SECONDS of it.

A calibrated bundle hears another place than its training did (a moved microphone): its centre
is the calibration audio's, its threshold set on that audio left out a file at a time. Its
training held-out windows, of the old place against the old centre, would set a refit's
threshold as if the device still heard there: one mark after `calibrate` took the MIMII fan's
channel-4 threshold from the calibrated 1.96 back to 2.40 to 2.62, above the uncalibrated 2.51.
So `calibrate` records the calibration's held-out windows and the centre each was scored
against (CALIBRATION_*), and a refit of a calibrated bundle scores those instead, each against
its centre pooled with the site's windows.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge.advice import MIN_AUDIO_SECONDS
from edge.bundle import Bundle, npy_header
from edge.detectors.base import Refit, leave_one_out
from edge.detectors.fluctuation import FluctuationScorer, fluctuation_features
from edge.detectors.levels import level_features
from edge.detectors.registry import plugin_for
from edge.detectors.thresholds import EventLogic, refit_manifest
from edge.errors import SoundSentryError
from edge.private import atomic_write
from edge.threshold import count_events, cusum_floor, window_floor

log = logging.getLogger(__name__)

Featurize = Callable[[np.ndarray], np.ndarray]
FEATURIZERS: dict[str, Featurize] = {
    "fluctuation": fluctuation_features,
    "levels": level_features,
}
"""Kinds whose normal model is a Gaussian of per-window features, and those features."""
TRAINING_FEATURES = "training.holdout_features"
"""Array of a bundle: the feature vectors of (at most MAX_TRAINING_WINDOWS) held-out windows."""
FIT_CENTER = "training.fit_center"
FIT_PRECISION = "training.fit_precision"
"""Arrays of a bundle: the Gaussian fitted without the held-out audio (the one that scored it
for the training threshold), in the shipped model's standardised space."""
CALIBRATION_FEATURES = "calibration.holdout_features"
CALIBRATION_FOLD = "calibration.holdout_fold"
CALIBRATION_CENTERS = "calibration.fold_centers"
CALIBRATION_ARRAYS = (CALIBRATION_FEATURES, CALIBRATION_FOLD, CALIBRATION_CENTERS)
"""Arrays of a calibrated bundle: (at most MAX_TRAINING_WINDOWS of) the feature vectors of the
calibration audio as its threshold scored them (each file left out; one file: its second half),
the index of the centre each was scored against, and those centres (standardised: the centre
of the other files, or of the first half)."""
MAX_TRAINING_WINDOWS = 1000
"""Held-out training windows a bundle carries for refits (64 numbers each: 0.5 MB)."""
SITE_NUMBERS = 4_000_000
"""Most feature numbers (windows x features per window) a period keeps, whatever
`max_windows`: a refit holds about 20 bytes per number at its peak, so 80 MB, which keeps the
daemon (65 to 100 MB on its own) below the service's MemoryHigh of 200 MB. `max_windows` was
accepted up to a million: a refit of 50,000 windows of the levels kind's 192 features peaked at
369 MB, past the unit's MemoryMax of 300 MB (in a review), and one killed at the end of a period
is made again at the next start. 20,000 windows of 192 features fit."""
MARK_NUMBERS = 50_000
"""Most feature numbers one event marked normal adds (at most MAX_MARKS are carried): its
windows beyond, a uniform sample in runs, as a period's (an hour-long event is 7,200 windows)."""
MAX_HELD_WINDOWS = 4000
"""Held-out site windows a refit's threshold is computed on (33 min; `spread` beyond): the
budget rule's floors replay the event logic window by window in Python, and this bounds a
refit of a full site set (20000 windows) to about a second here (x86, one core) instead of
three, so the audio loop it runs on is not held up for long on a Pi."""
RUN = 20
MARGIN = 1e-5
"""Relative margin above the marked windows' floors: they are computed on the windows scored as
one stack, which the event logic, scoring one window at a time and summing the CUSUM's steps one
by one, may round to a hair above (a capped sound climbs the CUSUM in exact, equal steps)."""
CHUNK_SECONDS = 60.0
"""Site windows are held out a chunk at a time: neighbouring windows overlap and resemble each
other, so windows a minute apart count as unseen. A shorter period is cut into MAX_FOLDS chunks
of at least MIN_CHUNK_SECONDS instead, so that its own windows, not only the training model,
score it."""
MIN_CHUNK_SECONDS = 5.0
MAX_FOLDS = 10
SHRINKAGE = 0.01
"""Least shrinkage of the pooled covariance towards a scaled identity (as in training)."""
SITE_SOURCE = "site normal set (leave one chunk out) and training held-out windows"
CALIBRATED_SOURCE = (
    "site normal set (leave one chunk out) and calibration audio (leave one file out)"
)


class LearningError(SoundSentryError):
    """Learning or a refit cannot be done; the message says why (the running model stays)."""


def featurizer(bundle: Bundle) -> Featurize:
    """The per-window feature of a bundle's kind; LearningError for kinds that cannot learn."""
    kind = bundle.manifest.kind
    if kind not in FEATURIZERS:
        raise LearningError(
            f"learning on site needs a {' or '.join(FEATURIZERS)} bundle, not {kind} "
            "(use `soundsentry calibrate` for it)"
        )
    return FEATURIZERS[kind]


def training_summary(
    fit: FluctuationScorer, final: FluctuationScorer, held: np.ndarray
) -> dict[str, np.ndarray]:
    """What `train` records for refits on site: a sample of the held-out feature vectors and
    the Gaussian fitted without them (`fit`), moved into the standardised space of `final`."""
    mean_raw = fit.mean + fit.std * fit.center
    cov_raw = np.linalg.inv(fit.precision) * np.outer(fit.std, fit.std)
    center = (mean_raw - final.mean) / final.std
    cov = cov_raw / np.outer(final.std, final.std)
    return {
        TRAINING_FEATURES: training_sample(held),
        FIT_CENTER: center,
        FIT_PRECISION: np.linalg.inv(cov),
    }


def training_sample(features: np.ndarray, limit: int = MAX_TRAINING_WINDOWS) -> np.ndarray:
    """At most `limit` held-out feature vectors for the bundle (see `spread`)."""
    return features[spread(len(features), limit)]


def calibration_summary(bundle: Bundle, per_file: list[np.ndarray]) -> dict[str, np.ndarray]:
    """What `calibrate` records for refits on site (CALIBRATION_*): the windows of each file
    left out (`leave_one_out`, as the kind's calibration scored them) with the centre of the
    rest, at most MAX_TRAINING_WINDOWS in all, in runs of each file's own windows."""
    scorer = plugin_for(bundle.manifest).scorer(bundle)
    feats = [featurizer(bundle)(w) for w in per_file if len(w)]
    folds = leave_one_out(feats)
    # at most MAX_TRAINING_WINDOWS // RUN folds, evenly spaced over the files, each a run or
    # more: a run of every file kept 3,040 windows and 160 centres of 160 ten-second clips, and
    # a refit scores a centre at a time (a review)
    m = min(len(folds), MAX_TRAINING_WINDOWS // RUN)
    folds = [folds[i] for i in np.linspace(0, len(folds) - 1, m).round().astype(int)]
    total = sum(len(held) for held, _ in folds)
    rows, fold, centers = [], [], []
    for k, (held, rest) in enumerate(folds):
        share = (MAX_TRAINING_WINDOWS - m * RUN) * len(held) // total
        keep = spread(len(held), RUN + share)
        rows.append(held[keep])
        fold.append(np.full(len(keep), k, np.int32))
        centers.append(scorer.standardize(np.concatenate(rest)).mean(axis=0))
    return {
        CALIBRATION_FEATURES: np.concatenate(rows).astype(np.float32),
        CALIBRATION_FOLD: np.concatenate(fold),
        CALIBRATION_CENTERS: np.stack(centers),
    }


READ_BYTES = 4 << 20
"""A saved period's windows are read this much at a time when only some are kept."""


def spread(n: int, limit: int) -> np.ndarray:
    """Indices of at most `limit` of n windows in evenly spaced runs of RUN consecutive ones
    (the event logic that the threshold floors replay needs neighbours)."""
    if n <= limit:
        return np.arange(n)
    starts = np.linspace(0, n - RUN, max(limit // RUN, 1)).astype(int)
    return (starts[:, None] + np.arange(RUN)).ravel()


class FeatureStore:
    """Per-window feature vectors with a chunk id each; beyond `capacity` a uniform sample of
    all offered so far, taken in runs of RUN consecutive windows of one chunk (reservoir
    sampling of runs, seeded). Storage grows by doubling. Read back in the order they arrived.
    The threshold's budget allows for how neighbouring windows correlate, measured on this
    sequence: a sample of single windows, read in order, put windows hours apart side by side
    and measured r = 0.06 where the audio had 0.25 (false alarms several times the budget)."""

    def __init__(self, dim: int, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self._x = np.zeros((0, dim), np.float32)
        self._chunk = np.zeros(0, np.int64)
        self._arrival = np.zeros(0, np.int64)
        self.n = 0
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._run = max(1, min(RUN, capacity))
        self._runs = 0
        """Runs offered so far."""
        self._pos = self._run
        """Windows of the current run offered so far (a full run: the next window starts one)."""
        self._run_chunk: int | None = None
        self._slot: int | None = None
        """Where the current run's next window goes; None: this run is not kept."""

    @property
    def dim(self) -> int:
        """Numbers per window."""
        return int(self._x.shape[1])

    def __len__(self) -> int:
        return self.n

    @property
    def _order(self) -> np.ndarray:
        return np.argsort(self._arrival[: self.n], kind="stable")

    @property
    def x(self) -> np.ndarray:
        """The kept feature vectors (n, dim), in the order they arrived."""
        return self._x[: self.n][self._order]

    @property
    def chunk(self) -> np.ndarray:
        """The chunk id of each kept vector."""
        return self._chunk[: self.n][self._order]

    def add(self, rows: np.ndarray, chunk: int) -> None:
        """Offer feature vectors (k, dim) of one chunk."""
        for row in np.atleast_2d(rows):
            self.seen += 1
            if self._pos >= self._run or chunk != self._run_chunk:
                self._begin_run(chunk)
            self._pos += 1
            slot = self._slot
            if slot is None:
                continue
            if slot == self.n:  # filling up
                if self.n >= self.capacity:
                    self._slot = None
                    continue
                self._grow()
                self.n += 1
            self._x[slot], self._chunk[slot], self._arrival[slot] = row, chunk, self.seen
            self._slot = slot + 1

    def _begin_run(self, chunk: int) -> None:
        """A new run: appended while there is room, then kept with probability (runs the
        store holds) / (runs offered), in place of a run chosen at random."""
        self._runs += 1
        self._pos, self._run_chunk = 0, chunk
        if self.n < self.capacity:
            self._slot = self.n
            return
        held = self.capacity // self._run
        pick = int(self._rng.integers(0, self._runs))
        self._slot = pick * self._run if pick < held else None

    def _grow(self) -> None:
        if self.n < len(self._x):
            return
        size = min(self.capacity, max(64, 2 * len(self._x)))
        x = np.zeros((size, self._x.shape[1]), np.float32)
        chunk, arrival = np.zeros(size, np.int64), np.zeros(size, np.int64)
        x[: self.n], chunk[: self.n] = self._x[: self.n], self._chunk[: self.n]
        arrival[: self.n] = self._arrival[: self.n]
        self._x, self._chunk, self._arrival = x, chunk, arrival

    def save(self, path: Path) -> None:
        """Write atomically as .npz (no pickle), mode 0600."""
        atomic_write(path, self._savez)

    def _savez(self, tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file, not a name: numpy would add ".npz" to the name
            np.savez(fh, x=self.x, chunk=self.chunk, seen=np.array([self.seen]))

    @classmethod
    def load(cls, path: Path, max_windows: int) -> FeatureStore:
        """Read a store written by save(), with room for `site_capacity(dim, max_windows)`
        windows: a store saved with more (under a larger setting, or by a release before the
        cap) keeps evenly spaced runs of them (a period resumed after a restart had room for a
        million again, and its refit passed the service's memory limit, in a review).
        LearningError if it is missing or damaged."""
        try:
            with np.load(path, allow_pickle=False) as data:
                chunk, seen = data["chunk"], int(data["seen"][0])
                n, dim = _rows_saved(data.zip, "x.npy")
                capacity = site_capacity(dim, max_windows)
                keep = spread(n, capacity) if n > capacity else None
                x = data["x"] if keep is None else _rows_of(data.zip, "x.npy", keep)
            if x.ndim != 2 or chunk.shape != (n,):
                raise ValueError(f"arrays of shape {x.shape} and {chunk.shape}")
        except Exception as exc:  # a card's damage: empty, truncated, not a zip, any shape
            raise LearningError(
                f"site features {path.name} unreadable: {type(exc).__name__}: {exc}"
            ) from None
        if keep is not None:
            log.warning(
                "learning: %s holds %d windows; keeping %d of them, evenly spaced",
                path.name,
                n,
                capacity,
            )
            chunk = chunk[keep]
        store = cls(x.shape[1], capacity)
        store._x = x.astype(np.float32, copy=False)
        store._chunk = chunk.astype(np.int64, copy=False)
        store._arrival = np.arange(1, len(x) + 1, dtype=np.int64)  # saved in arrival order
        store.n, store.seen = len(x), seen
        store._runs = -(-seen // store._run)  # a resumed period's runs keep their odds
        return store


def _rows_saved(zf: zipfile.ZipFile, name: str) -> tuple[int, int]:
    """Rows and columns of the 2-D array saved as `name` in an .npz, from its header alone."""
    with zf.open(name) as fh:
        shape, _, _ = npy_header(fh)
    if len(shape) != 2:
        raise ValueError(f"{name} of shape {shape}")
    return shape[0], shape[1]


def _rows_of(zf: zipfile.ZipFile, name: str, keep: np.ndarray) -> np.ndarray:
    """The rows `keep` (ascending) of the 2-D array `name` in an .npz, read a block at a time:
    a period saved with a million windows (264 MB, under a larger setting or by a release before
    the cap) was read whole to keep 62,500 of them, and its start passed the service's memory
    limit (360 MB, in an upgrade review), at every start, so the device never ran."""
    with zf.open(name) as fh:
        (n, dim), fortran, dtype = npy_header(fh)
        if fortran or dtype.hasobject:
            raise ValueError(f"{name} is not a plain array of numbers")
        row = dim * dtype.itemsize
        block = max(1, READ_BYTES // max(row, 1))
        out = np.empty((len(keep), dim), np.float32)
        done = 0
        for first in range(0, n, block):
            rows = min(block, n - first)
            raw = fh.read(rows * row)
            if len(raw) != rows * row:
                raise ValueError(f"{name} is cut short")
            wanted = keep[(keep >= first) & (keep < first + rows)] - first
            out[done : done + len(wanted)] = np.frombuffer(raw, dtype).reshape(rows, dim)[wanted]
            done += len(wanted)
    return out


def site_capacity(dim: int, max_windows: int) -> int:
    """Windows a period of `dim` features per window keeps: `max_windows`, within SITE_NUMBERS."""
    return max(RUN, min(max_windows, SITE_NUMBERS // max(dim, 1)))


def mark_capacity(dim: int) -> int:
    """Windows one event marked normal keeps (MARK_NUMBERS)."""
    return max(RUN, MARK_NUMBERS // max(dim, 1))


def combine(stores: list[FeatureStore]) -> tuple[np.ndarray, np.ndarray]:
    """All windows of several stores, with chunk ids made distinct per store: float32 as the
    stores keep them, filled in place (a float64 copy of each store, then of them all, took a
    refit past the service's memory limit, in a review)."""
    stores = [s for s in stores if len(s)]
    if not stores:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    x = np.empty((sum(len(s) for s in stores), stores[0].dim), np.float32)
    chunks, at, offset = np.empty(len(x), np.int64), 0, 0
    for store in stores:
        x[at : at + len(store)] = store.x
        chunks[at : at + len(store)] = store.chunk + offset
        offset = int(chunks[at : at + len(store)].max()) + 1
        at += len(store)
    return x, chunks


def flags(stores: list[FeatureStore], marked: list[bool]) -> np.ndarray:
    """Per window of combine(stores): True for the windows of stores flagged in `marked`."""
    return np.concatenate([np.full(len(s), m) for s, m in zip(stores, marked, strict=True)] or [[]])


def pooled(
    trained: FluctuationScorer, n_train: float, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Centre and precision of the Gaussian of the training data (n_train windows, as the
    bundle keeps it) and the standardised site windows z, pooled as one sample."""
    if len(z) == 0:
        return trained.center, trained.precision
    return pooled_moments(trained, n_train, len(z), z.sum(axis=0), z.T @ z)


def pooled_moments(
    trained: FluctuationScorer, n_train: float, n: int, total: np.ndarray, squares: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`pooled` from the site's count, sum and sum of outer products (folds subtract theirs)."""
    if n == 0:
        return trained.center, trained.precision
    w = n_train / (n_train + n)
    site_mean = total / n
    site_cov = squares / n - np.outer(site_mean, site_mean)
    shift = trained.center - site_mean
    cov = (
        w * np.linalg.inv(trained.precision)
        + (1 - w) * site_cov
        + w * (1 - w) * np.outer(shift, shift)
    )
    target = np.trace(cov) / len(cov) * np.eye(len(cov))
    center = w * trained.center + (1 - w) * site_mean
    return center, np.linalg.inv((1 - SHRINKAGE) * cov + SHRINKAGE * target)


def chunk_seconds(period_s: float) -> float:
    """Length of the chunks a period of `period_s` is held out in."""
    return min(CHUNK_SECONDS, max(MIN_CHUNK_SECONDS, period_s / MAX_FOLDS))


def folds_of(chunks: np.ndarray) -> np.ndarray:
    """Fold index of each window: its chunk, contiguous chunks merged into MAX_FOLDS."""
    unique, rank = np.unique(chunks, return_inverse=True)
    return rank * min(len(unique), MAX_FOLDS) // max(len(unique), 1)


def site_refit(
    base: Bundle,
    site: np.ndarray,
    chunks: np.ndarray,
    false_alarms_per_day: float | None,
    marked: np.ndarray | None = None,
    event_logic: EventLogic | None = None,
) -> Refit:
    """The refit of a Gaussian bundle with the site's feature vectors (module docstring).
    `marked` flags the windows of events marked normal: they are in the model, but they do not
    set the normal level of the scores; the threshold is only raised as far as needed for the
    event logic to let them pass under the refitted model. `event_logic`: the K, N and M the
    daemon runs, when its settings differ from the bundle's."""
    featurizer(base)
    trained = plugin_for(base.manifest).scorer(base)
    marked = np.zeros(len(site), bool) if marked is None else marked
    with_training = has_training(base)
    _require_backing(base, with_training, int((~marked).sum()))
    z = trained.standardize(site) if len(site) else np.zeros((0, trained.dim))
    final = _model(trained, *pooled(trained, _windows(base), z))
    held = _training_scores(base, trained, z) if with_training else []
    held += _fold_scores(base, trained, z, chunks, marked)
    scores = np.concatenate([s for s, _ in held])
    source = CALIBRATED_SOURCE if calibrated(base) else SITE_SOURCE
    manifest = refit_manifest(base, scores, false_alarms_per_day, source, event_logic)
    if marked.any():
        held.append((final.distance(site[marked]), final.band_shares(site[marked])))
        _let_pass(manifest["threshold"], held[-1][0])
    band = np.concatenate([b for _, b in held])
    return Refit(
        manifest=manifest,
        arrays={
            "statistics.center": final.center,
            "statistics.precision": final.precision,
            "normal_band_error.mean": band.mean(axis=0),
            "normal_band_error.std": band.std(axis=0),
        },
    )


Held = list[tuple[np.ndarray, np.ndarray]]
"""Held-out scores and band shares, per group of windows."""


def has_training(base: Bundle) -> bool:
    """The bundle carries held-out windows to back a refit's threshold: its training summary
    (trained by a release that learns on site), or its calibration's (`calibrated`)."""
    trained = all(k in base.arrays for k in (TRAINING_FEATURES, FIT_CENTER, FIT_PRECISION))
    return trained or calibrated(base)


def calibrated(base: Bundle) -> bool:
    """The bundle carries its calibration's held-out windows (calibrated by a release that
    records them): they, not the training's, back its refits."""
    return all(k in base.arrays for k in CALIBRATION_ARRAYS)


def require_period(base: Bundle, seconds: float) -> None:
    """Refuse at its start a period too short for its refit to be taken (`_require_backing`):
    it ran to its end, and its refit failed with no word on MQTT (a review of the contract)."""
    if not has_training(base) and seconds < MIN_AUDIO_SECONDS:
        raise LearningError(
            f"{base.model_id} carries no training windows (trained before learning on site), "
            f"so {MIN_AUDIO_SECONDS:g} s of the site's normal running must back the threshold: "
            f"ask for a period of at least {MIN_AUDIO_SECONDS:g} s"
        )


def _require_backing(base: Bundle, with_training: bool, site_windows: int) -> None:
    """Without the training summary, the site's own audio must back the threshold."""
    seconds = site_windows * base.features.hop_seconds
    if not with_training and seconds < MIN_AUDIO_SECONDS:
        raise LearningError(
            f"{base.model_id} carries no training windows (trained before learning on site), "
            f"so {MIN_AUDIO_SECONDS:g} s of the site's normal running must back the threshold "
            f"and {seconds:.1f} s has been learnt: run the learn command "
            f'({{"command": "learn", "action": "start"}}) for a period of at least '
            f"{MIN_AUDIO_SECONDS:g} s of normal running (a period's audio replaces what the "
            "site learnt before), then try again"
        )


def _model(like: FluctuationScorer, center: np.ndarray, precision: np.ndarray) -> Any:
    """A scorer of the same kind and standardisation with another centre and precision."""
    return type(like)(like.mean, like.std, center, precision)


def _windows(base: Bundle, held_out: bool = False) -> float:
    """Training windows at the edge's hop (of the fit without the held-out audio)."""
    t = base.manifest.training
    seconds = t.seconds - (t.holdout_seconds if held_out else 0.0)
    return max(seconds / base.features.hop_seconds, 1.0)


def _training_scores(base: Bundle, trained: FluctuationScorer, z: np.ndarray) -> Held:
    """The training held-out windows against the training fit without them, pooled with the
    site: scores of unseen normal audio, as at training time (a calibrated bundle's: its
    calibration's, `_calibration_scores`)."""
    if calibrated(base):
        return _calibration_scores(base, trained, z)
    fit = _model(trained, base.arrays[FIT_CENTER], base.arrays[FIT_PRECISION])
    model = _model(trained, *pooled(fit, _windows(base, held_out=True), z))
    rows = base.arrays[TRAINING_FEATURES]
    return [(model.distance(rows), model.band_shares(rows))]


def _calibration_scores(base: Bundle, trained: FluctuationScorer, z: np.ndarray) -> Held:
    """The calibration's held-out windows, each against the centre it was scored against at
    calibration (the other files'), with the bundle's precision, pooled with the site."""
    rows, fold, centers = (base.arrays[k] for k in CALIBRATION_ARRAYS)
    if (
        rows.ndim != 2
        or rows.shape[1:] != trained.mean.shape
        or centers.ndim != 2
        or centers.shape[1:] != trained.mean.shape
        or fold.shape != rows.shape[:1]
        or not len(rows)
        or fold.min() < 0
        or fold.max() >= len(centers)
        or np.any(fold != np.round(fold))  # read back as float64: 0.5 matched no centre
    ):
        raise LearningError(
            f"{base.model_id}: its calibration's held-out windows do not fit its model "
            "(a damaged bundle): run soundsentry calibrate again"
        )
    at, scores, shares = [], [], []
    total, squares = z.sum(axis=0), z.T @ z  # once: each centre is pooled with the same site
    for k, center in enumerate(centers):
        at.append(np.flatnonzero(fold == k))
        fit = _model(trained, center, trained.precision)
        model = _model(trained, *pooled_moments(fit, _windows(base), len(z), total, squares))
        scores.append(model.distance(rows[at[-1]]))
        shares.append(model.band_shares(rows[at[-1]]))
    order = np.argsort(np.concatenate(at), kind="stable")  # in the order they were heard
    return [(np.concatenate(scores)[order], np.concatenate(shares)[order])]


def _fold_scores(
    base: Bundle, trained: FluctuationScorer, z: np.ndarray, chunks: np.ndarray, marked: np.ndarray
) -> Held:
    """The site's (unmarked) windows, a fold at a time, against the pooled model without it."""
    site = np.flatnonzero(~marked)
    if not len(site):
        return []
    folds = folds_of(chunks[site])
    total, squares = z.sum(axis=0), z.T @ z
    # the windows kept for the threshold (`spread` of the folds' windows one after another) are
    # the only ones scored: every window's band shares took as much memory as the set again
    kept = np.zeros(len(site), bool)
    kept[spread(len(site), MAX_HELD_WINDOWS)] = True
    scores, shares, at = [], [], 0
    for k in np.unique(folds):
        rows = site[folds == k]
        zf = z[rows]
        n = len(z) - len(rows)
        fit = pooled_moments(trained, _windows(base), n, total - zf.sum(0), squares - zf.T @ zf)
        model = _model(trained, *fit)
        raw = trained.mean + trained.std * zf[kept[at : at + len(rows)]]
        at += len(rows)
        scores.append(model.distance(raw))
        shares.append(model.band_shares(raw))
    return [(np.concatenate(scores), np.concatenate(shares))]


def _let_pass(threshold: dict[str, Any], scores: np.ndarray) -> None:
    """Raise the threshold (and the CUSUM's h) just enough that the event logic raises no
    event on the marked windows; recorded in the parameters."""
    p = threshold["params"]
    k, n, m, hop = p["k"], p["n"], p["m"], p["hop_s"]
    floor = window_floor(scores, 0, k, n, m, hop)
    p["marked_windows"] = len(scores)
    p["marked_floor"] = floor
    if count_events(scores, threshold["value"], k, n, m, hop) and floor > threshold["value"]:
        threshold["value"] = floor * (1 + MARGIN)
        p["decided_by"] = "marked"
    cusum = p.get("cusum")
    if cusum:
        z = (np.log(np.maximum(scores, 1e-12)) - cusum["center"]) / cusum["scale"]
        floor = cusum_floor(z, 0, cusum["drift"], cusum["cap"]) * (1 + MARGIN)
        cusum["h"] = max(cusum["h"], floor)


def refit_summary(old: float, manifest: dict[str, Any]) -> dict[str, Any]:
    """Old and new threshold and the predicted alarm rate of a refit, for replies and status."""
    th = manifest["threshold"]
    params = th["params"]
    return {
        "old_threshold": round(old, 6),
        "new_threshold": round(th["value"], 6),
        "predicted_false_alarms_per_day": params.get("predicted_false_alarms_per_day"),
        "predicted_interval_per_day": params.get("predicted_interval_per_day"),
        "holdout_seconds": params.get("holdout_seconds"),
    }
