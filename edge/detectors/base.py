"""What every detector kind provides: window scores, a tracker, checks and an on-site refit."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from edge.detectors.thresholds import bundle_cusum, event_tracker
from edge.errors import BundleError
from edge.events import Transition

if TYPE_CHECKING:
    from edge.bundle import Bundle
    from edge.settings import DetectorSettings


@dataclass(frozen=True, slots=True)
class WindowScore:
    """The score of one analysis window and the per-band evidence behind it."""

    start: int
    """First sample of the window in the stream."""
    score: float
    """Anomaly kinds: higher is more anomalous. Classifier: probability of the top class."""
    band_error: np.ndarray
    label: str | None = None
    """Classifier: the most probable class."""


class WindowScorer(Protocol):
    """Scores (frames, mels) log-mel windows."""

    def score(self, features: np.ndarray, start: int = 0) -> WindowScore:
        """Score one window."""
        ...

    def score_many(self, windows: np.ndarray) -> np.ndarray:
        """Scores of a stack of windows, shape (n,)."""
        ...


class Tracker(Protocol):
    """Turns window scores into events; the same interface for every kind."""

    threshold: float

    @property
    def active(self) -> bool:
        """True while an event is open."""
        ...

    @property
    def event_id(self) -> str | None:
        """Id of the open event."""
        ...

    @property
    def label(self) -> str | None:
        """The label of the open event (classifier), else None."""
        ...

    @property
    def state(self) -> str:
        """What the tracker says about the machine: 'normal' or 'anomaly'."""
        ...

    def update(self, window: WindowScore, start_s: float, end_s: float) -> list[Transition]:
        """Feed one window; return the transitions it causes."""
        ...

    def close(self, reason: str) -> Transition | None:
        """End the open event now, for `reason` (one of edge.events.ENDED_BY)."""
        ...


@dataclass
class Refit:
    """The outcome of an on-site refit: manifest fields and arrays to replace."""

    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class DetectorKind:
    """Base of the detector plugins; subclasses set the class attributes and methods."""

    kind: ClassVar[str]
    score_name: ClassVar[str]
    needs_model: ClassVar[bool] = False
    explains: ClassVar[bool] = True
    """False when band evidence means nothing for this kind (classifier)."""

    def wants_model(self, manifest: Any) -> bool:
        """Whether a bundle of this kind with this manifest carries a network to load."""
        return self.needs_model

    def check(self, bundle: Bundle) -> None:
        """Refuse a bundle whose arrays this kind cannot use (one BundleError line)."""
        if bundle.manifest.score != self.score_name:
            raise BundleError(
                f"{bundle.path}: score {bundle.manifest.score!r} is not {self.score_name!r}"
            )
        bundle_cusum(bundle)  # malformed evidence-over-time parameters: refused at load
        states = bundle.manifest.machine.states if bundle.manifest.machine else None
        if "machine.state_levels" in bundle.arrays:
            require(bundle, "machine.state_levels", (len(states or ()), bundle.features.n_mels))
        if "normal_band_error.mean" in bundle.arrays:
            n = bundle.features.n_mels
            require(bundle, "normal_band_error.mean", (n,))
            require(bundle, "normal_band_error.std", (n,))

    def scorer(self, bundle: Bundle) -> WindowScorer:
        """The window scorer of a bundle of this kind."""
        raise NotImplementedError

    def tracker(self, bundle: Bundle, settings: DetectorSettings, threshold: float) -> Tracker:
        """The event tracker: for anomaly kinds K-of-N events, and the CUSUM when the
        bundle's threshold carries one."""
        return event_tracker(settings, threshold, bundle)

    def refit(
        self, bundle: Bundle, per_file: list[np.ndarray], false_alarms_per_day: float | None
    ) -> Refit:
        """Refit the numpy part from normal windows recorded on site, one array per file."""
        raise BundleError(f"a {self.kind} detector cannot be refitted on site")

    def held_out_scores(
        self, bundle: Bundle, per_file: list[np.ndarray], false_alarms_per_day: float | None
    ) -> np.ndarray:
        """Each file scored by this kind refitted on the others (one file: its second half by
        a refit on its first): where the site's normal audio sits on this kind's scale."""
        scores = []
        for held, rest in leave_one_out(per_file):
            arrays = self.refit(bundle, rest, false_alarms_per_day).arrays
            fitted = replace(bundle, arrays={**bundle.arrays, **arrays})
            scores.append(self.scorer(fitted).score_many(held))
        return np.concatenate(scores)


def leave_one_out(parts: list[np.ndarray]) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Each part against the others (one part: its second half against its first)."""
    if len(parts) == 1:
        half = len(parts[0]) // 2
        return [(parts[0][half:], [parts[0][:half]])]
    return [(p, parts[:i] + parts[i + 1 :]) for i, p in enumerate(parts)]


def held_out_pieces(parts: list[np.ndarray]) -> list[int]:
    """How many of the scores of a leave-one-out refit each held-out part gives, in order:
    each file is a stream of its own for the threshold (edge.threshold.Pieces)."""
    return [len(held) for held, _ in leave_one_out(parts)]


MIN_FEATURE_STD = 0.01
"""The least spread a feature (dB, or the log of a spread) is given. A microphone's noise keeps
every feature of real recordings far above it (0.10 or more over the fans, pumps and valves
of shared/data), but a steady electrical signal (a pure tone on a line input) gave spreads of
float rounding, and a change of 0.003 dB scored 10^16 times the threshold, in a review."""


def require(
    bundle: Bundle,
    name: str,
    shape: tuple[int, ...],
    positive: bool = False,
    at_least: float | None = None,
) -> None:
    """Check that the bundle holds array `name` of `shape` (and > 0 if `positive`, and not
    below `at_least`: what training never writes)."""
    a = bundle.array(name)
    if a.shape != shape:
        raise BundleError(
            f"{bundle.path}: array {name} has shape {a.shape}; the features need {shape} "
            "(statistics arrays have inconsistent sizes)"
        )
    if positive and not np.all(a > 0):
        raise BundleError(f"{bundle.path}: array {name} must be > 0 everywhere")
    if at_least is not None and not np.all(a >= at_least):
        raise BundleError(
            f"{bundle.path}: array {name} must be {at_least:g} or more everywhere (training "
            f"never writes less), got {float(np.min(a)):.3g}"
        )


def require_gaussian(bundle: Bundle, dim: int) -> None:
    """The four statistics arrays of a Gaussian over `dim` features, its precision symmetric
    and positive definite (else distances can be negative: a fault scores below normal), over
    windows of at least FRAME_CHANGES frames."""
    require_frame_changes(bundle)
    for key, shape in (("feature_mean", (dim,)), ("center", (dim,)), ("precision", (dim, dim))):
        require(bundle, f"statistics.{key}", shape)
    require(bundle, "statistics.feature_std", (dim,), positive=True)
    precision = bundle.array("statistics.precision")
    if not np.allclose(precision, precision.T, rtol=1e-6, atol=1e-9) or not (
        np.linalg.eigvalsh((precision + precision.T) / 2).min() > 0
    ):
        raise BundleError(
            f"{bundle.path}: array statistics.precision is not symmetric positive definite"
        )


FRAME_CHANGES = 3
"""Frames a window needs for the statistics kinds: a spread of frame changes needs two changes
(a window of one frame scored NaN on every window, so it never alarmed)."""


def require_frame_changes(bundle: Bundle) -> None:
    """Windows long enough for a spread of frame changes."""
    frames = bundle.features.n_frames
    if frames < FRAME_CHANGES:
        raise BundleError(
            f"{bundle.path}: a window of {frames} frame(s) ({bundle.features.window_seconds} s); "
            f"this detector needs at least {FRAME_CHANGES}"
        )


def require_normalization(bundle: Bundle) -> None:
    """The per-mel-band standardisation a network's input needs: a mean and a positive std."""
    n = bundle.features.n_mels
    require(bundle, "normalization.mean", (n,))
    require(bundle, "normalization.std", (n,), positive=True)
