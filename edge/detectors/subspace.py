"""Kind `subspace`: how far short stretches of the log-mel spectrogram fall from the subspace of
normal running.

Every STACK consecutive frames of a window (the DCASE 2020 baseline's context) form one vector
of raw log-mel levels in dB; normal running spans a low-dimensional subspace of them (the first
principal axes of the training vectors). The score is the mean squared distance of the
window's vectors to that subspace, over the held-out normal median, so normal running scores
about 1. It is the linear form of the DCASE 2020 baseline autoencoder, in numpy: it keeps the
level and the spectral shape that the fluctuation statistic throws away, which is where pump
faults (a louder hum, a shifted resonance) show. On site, the subspace's origin moves to the
site's audio and the threshold is re-derived; the axes stay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge.detectors.base import DetectorKind, Refit, WindowScore, held_out_pieces, require
from edge.detectors.levels import held_out_explained, site_refit
from edge.errors import BundleError

if TYPE_CHECKING:
    from edge.bundle import Bundle

ARRAYS = ("mean", "components", "stack", "scale")
MAX_COMPONENTS = 64
"""Most axes a bundle may hold: a subspace wider than this models noise, not the machine."""


def stacked(windows: np.ndarray, stack: int) -> np.ndarray:
    """Log-mel windows (n, frames, mels) as their vectors of `stack` consecutive frames,
    shape (n, frames - stack + 1, stack * mels), frame-major like the DCASE baseline."""
    frames = windows.shape[1]
    count = frames - stack + 1
    if count < 1:
        raise ValueError(f"a window of {frames} frames is shorter than a stack of {stack}")
    parts = [windows[:, t : t + count, :] for t in range(stack)]
    return np.concatenate(parts, axis=2)


class SubspaceScorer:
    """Mean squared distance of a window's stacked frames to the normal subspace."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, stack: int, scale: float) -> None:
        self.mean = np.asarray(mean, np.float64)
        self.components = np.asarray(components, np.float64)
        self.stack = int(stack)
        self.scale = float(scale)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> SubspaceScorer:
        """The scorer of a `subspace` bundle."""
        mean, components, stack, scale = (bundle.array(f"subspace.{a}") for a in ARRAYS)
        return cls(mean, components, int(stack[0]), float(scale[0]))

    def with_mean(self, mean: np.ndarray) -> SubspaceScorer:
        """The same axes and scale around another origin."""
        return SubspaceScorer(mean, self.components, self.stack, self.scale)

    def origin(self, windows: np.ndarray) -> np.ndarray:
        """The mean stacked vector of windows (n, frames, mels): where normal running sits."""
        return stacked(windows, self.stack).reshape(-1, self.mean.size).mean(axis=0)

    def residuals(self, windows: np.ndarray) -> np.ndarray:
        """Squared residuals (n, stacks, stack * mels) of windows (n, frames, mels)."""
        x = stacked(np.asarray(windows, np.float64), self.stack) - self.mean
        return (x - (x @ self.components.T) @ self.components) ** 2

    def explain(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores (n,) and each mel band's share of the score (n, mels)."""
        r = self.residuals(windows)
        per_band = r.mean(axis=1).reshape(len(r), self.stack, -1).sum(axis=1)
        total = per_band.sum(axis=1, keepdims=True)
        scores = total[:, 0] / r.shape[2] / self.scale
        return scores, per_band / np.maximum(total, 1e-12) * scores[:, None]

    def score(self, features: np.ndarray, start: int = 0) -> WindowScore:
        """Score one window of (frames, mels) log-mel features."""
        scores, bands = self.explain(features[np.newaxis])
        return WindowScore(start=start, score=float(scores[0]), band_error=bands[0])

    def score_many(self, windows: np.ndarray) -> np.ndarray:
        """Scores of a stack of windows, shape (n,)."""
        if len(windows) == 0:
            return np.zeros(0)
        return self.explain(windows)[0]


class Subspace(DetectorKind):
    """Distance of stacked log-mel frames to the principal subspace of normal running."""

    kind = "subspace"
    score_name = "subspace-residual"

    def check(self, bundle: Bundle) -> None:
        """A stack that fits the window, an origin and orthonormal-sized axes over its vector."""
        super().check(bundle)
        require(bundle, "subspace.stack", (1,), positive=True)
        require(bundle, "subspace.scale", (1,), positive=True)
        stack = float(bundle.array("subspace.stack")[0])
        frames, mels = bundle.features.shape
        if stack != int(stack) or stack > frames:
            raise BundleError(
                f"{bundle.path}: subspace.stack is {stack:g}; it must be a whole number of "
                f"frames up to the window's {frames}"
            )
        dim = int(stack) * mels
        require(bundle, "subspace.mean", (dim,))
        components = bundle.array("subspace.components")
        if components.ndim != 2 or components.shape[1] != dim:
            raise BundleError(
                f"{bundle.path}: array subspace.components has shape {components.shape}; "
                f"the stacked frames need (axes <= {MAX_COMPONENTS}, {dim})"
            )
        if not 1 <= components.shape[0] <= MAX_COMPONENTS:
            raise BundleError(
                f"{bundle.path}: subspace.components holds {components.shape[0]} axes; "
                f"1 to {MAX_COMPONENTS} are allowed"
            )

    def scorer(self, bundle: Bundle) -> SubspaceScorer:
        """The subspace of the bundle."""
        return SubspaceScorer.from_bundle(bundle)

    def refit(
        self, bundle: Bundle, per_file: list[np.ndarray], false_alarms_per_day: float | None
    ) -> Refit:
        """Move the origin to the site's audio; the threshold comes from scores of each file
        against an origin fitted without it (one file: its first half against its second)."""
        trained = SubspaceScorer.from_bundle(bundle)
        windows = [np.asarray(w, np.float64) for w in per_file if len(w)]
        scores, bands = held_out_explained(
            windows, lambda rest: trained.with_mean(trained.origin(rest))
        )
        origin = trained.origin(np.concatenate(windows))
        pieces = held_out_pieces(windows)
        return site_refit(
            bundle, scores, bands, {"subspace.mean": origin}, false_alarms_per_day, pieces
        )
