"""Kind `knn`: a memory bank of normal windows and the distance to the nearest ones.

Each window becomes the level-aware vector of `levels` (mean level, log spread and fluctuation
per mel band), standardised and projected on the principal axes of the training windows; the
bank holds such rows of normal audio (at most MAX_BANK). The score is the mean Euclidean
distance to the k nearest bank rows, divided by the typical distance of held-out normal audio
(so normal running scores about 1). No distribution is assumed: a machine with several normal
states (a valve open and shut, a slider moving and resting) is as close to normal in each.
On site, the site's windows join the bank (bounded) and the threshold is re-derived.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge.detectors.base import (
    MIN_FEATURE_STD,
    DetectorKind,
    Refit,
    WindowScore,
    held_out_pieces,
    require,
    require_frame_changes,
)
from edge.detectors.levels import (
    GROUPS,
    held_out_explained,
    level_features,
    per_band,
    site_refit,
)
from edge.errors import BundleError

if TYPE_CHECKING:
    from edge.bundle import Bundle

MAX_BANK = 4096
"""Most bank rows a bundle may hold: 4096 x 64 keeps a window's search well under 1 ms."""
MAX_NEIGHBOURS = 64
"""Largest k a bundle may ask for: more neighbours than this describe a density, not a match."""
SITE_SHARE = 0.5
"""On a refit that overflows the bank, the site's windows keep at least this share of it."""
BLOCK = 256
"""Windows per distance matrix: bounds memory to BLOCK x MAX_BANK floats."""
ARRAYS = ("feature_mean", "feature_std", "components", "bank", "neighbours", "scale")
MIN_SCALE = 0.1
"""The least typical distance (standardised units; 14 on the fan of shared/data) of a model
that can work: a steady signal's held-out windows lie at float rounding from the bank, and
dividing by that made the recording it was trained on score four times the threshold, in a
review. Below it training is refused, as the Gaussians refuse features that do not vary; a
bundle saying less is refused at load (1e-300 scored 1e301)."""


def evenly(rows: np.ndarray, count: int) -> np.ndarray:
    """At most `count` rows, evenly spaced through `rows` (deterministic, keeps the order and
    the density of the rows, which a mean over k neighbours depends on)."""
    if count >= len(rows):
        return rows
    return rows[np.linspace(0, len(rows) - 1, max(count, 0)).round().astype(int)]


def merged_bank(bank: np.ndarray, site: np.ndarray, cap: int = MAX_BANK) -> np.ndarray:
    """The bank with the site's rows added; over `cap`, both are thinned evenly, the site's
    rows keeping at least SITE_SHARE of the bank."""
    keep_site = min(len(site), max(cap - len(bank), int(cap * SITE_SHARE)))
    return np.concatenate([evenly(site, keep_site), evenly(bank, cap - keep_site)])


class KnnScorer:
    """Mean distance to the k nearest normal windows, in units of the held-out typical one."""

    def __init__(
        self,
        mean: np.ndarray,
        std: np.ndarray,
        components: np.ndarray,
        bank: np.ndarray,
        neighbours: int,
        scale: float,
    ) -> None:
        self.mean = np.asarray(mean, np.float64)
        self.std = np.asarray(std, np.float64)
        self.components = np.asarray(components, np.float64)
        self.bank = np.ascontiguousarray(bank, np.float64)
        self.k = int(neighbours)
        self.scale = float(scale)
        self._bank_sq = np.einsum("ij,ij->i", self.bank, self.bank)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> KnnScorer:
        """The scorer of a `knn` bundle."""
        mean, std, components, bank, k, scale = (bundle.array(f"knn.{a}") for a in ARRAYS)
        return cls(mean, std, components, bank, int(k[0]), float(scale[0]))

    def with_bank(self, bank: np.ndarray) -> KnnScorer:
        """The same embedding and scale with another bank."""
        return KnnScorer(self.mean, self.std, self.components, bank, self.k, self.scale)

    def embed(self, f: np.ndarray) -> np.ndarray:
        """Level-aware feature vectors (n, 3 * n_mels) as bank rows (n, dims)."""
        return ((f - self.mean) / self.std) @ self.components.T

    def nearest(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean distance to the k nearest bank rows (n,) and the nearest row's index (n,), for
        embedded rows x (n, dims), BLOCK rows at a time."""
        parts = [self._nearest(x[i : i + BLOCK]) for i in range(0, len(x), BLOCK)]
        if not parts:
            return np.zeros(0), np.zeros(0, int)
        return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])

    def _nearest(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d2 = self._bank_sq - 2.0 * (x @ self.bank.T) + np.einsum("ij,ij->i", x, x)[:, None]
        near = np.argpartition(d2, self.k - 1, axis=1)[:, : self.k]
        dist = np.sqrt(np.maximum(np.take_along_axis(d2, near, axis=1), 0.0))
        first = near[np.arange(len(x)), np.argmin(dist, axis=1)]
        return dist.mean(axis=1), first

    def explain(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores (n,) and band errors (n, n_mels) of embedded rows: per mel band, the squared
        difference to the nearest bank row, mapped back to the standardised features."""
        dist, first = self.nearest(x)
        diff = (x - self.bank[first]) @ self.components
        return dist / self.scale, per_band(diff**2)

    def score(self, features: np.ndarray, start: int = 0) -> WindowScore:
        """Score one window of (frames, mels) log-mel features."""
        scores, bands = self.explain(self.embed(level_features(features)[np.newaxis]))
        return WindowScore(start=start, score=float(scores[0]), band_error=bands[0])

    def distances(self, f: np.ndarray) -> np.ndarray:
        """Scores of level-aware feature vectors (n, 3 * n_mels)."""
        return self.nearest(self.embed(f))[0] / self.scale

    def score_many(self, windows: np.ndarray) -> np.ndarray:
        """Scores of a stack of windows, shape (n,)."""
        if len(windows) == 0:
            return np.zeros(0)
        return self.distances(level_features(windows))


class Knn(DetectorKind):
    """A memory bank of normal windows, scored by the distance to the nearest ones."""

    kind = "knn"
    score_name = "knn-distance"

    def check(self, bundle: Bundle) -> None:
        """Embedding over the level-aware features, a bounded bank in its space, k <= rows."""
        super().check(bundle)
        require_frame_changes(bundle)
        dim = GROUPS * bundle.features.n_mels
        require(bundle, "knn.feature_mean", (dim,))
        require(bundle, "knn.feature_std", (dim,), at_least=MIN_FEATURE_STD)
        require(bundle, "knn.neighbours", (1,), positive=True)
        require(bundle, "knn.scale", (1,), at_least=MIN_SCALE)
        components, bank = bundle.array("knn.components"), bundle.array("knn.bank")
        if components.ndim != 2 or components.shape[1] != dim or not 1 <= len(components) <= dim:
            raise BundleError(
                f"{bundle.path}: array knn.components has shape {components.shape}; "
                f"the features need (1 <= dims <= {dim}, {dim})"
            )
        if bank.ndim != 2 or bank.shape[1] != components.shape[0] or len(bank) > MAX_BANK:
            raise BundleError(
                f"{bundle.path}: array knn.bank has shape {bank.shape}; the embedding needs "
                f"(rows <= {MAX_BANK}, {components.shape[0]})"
            )
        k = float(bundle.array("knn.neighbours")[0])
        if k != int(k) or not 1 <= k <= min(len(bank), MAX_NEIGHBOURS):
            raise BundleError(
                f"{bundle.path}: knn.neighbours is {k:g}; it must be a whole number from 1 to "
                f"min(bank rows, {MAX_NEIGHBOURS})"
            )

    def scorer(self, bundle: Bundle) -> KnnScorer:
        """The bank of the bundle."""
        return KnnScorer.from_bundle(bundle)

    def refit(
        self, bundle: Bundle, per_file: list[np.ndarray], false_alarms_per_day: float | None
    ) -> Refit:
        """Add the site's windows to the bank (bounded); the threshold comes from scores of
        each file against the bank with the other files added (one file: its second half
        against its first). The embedding and the scale stay."""
        trained = KnnScorer.from_bundle(bundle)
        rows = [trained.embed(level_features(w)) for w in per_file if len(w)]
        scores, bands = held_out_explained(
            rows, lambda rest: trained.with_bank(merged_bank(trained.bank, rest))
        )
        bank = merged_bank(trained.bank, np.concatenate(rows))
        pieces = held_out_pieces(rows)
        return site_refit(bundle, scores, bands, {"knn.bank": bank}, false_alarms_per_day, pieces)
