"""Kind `fluctuation`: numpy statistics, no network. Per band, the log standard deviation of
frame-to-frame log-mel changes; the score is its Mahalanobis distance to normal running. On
site, the centre and threshold are refitted (the precision stays)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge.detectors.base import (
    DetectorKind,
    Refit,
    WindowScore,
    held_out_pieces,
    leave_one_out,
    require_gaussian,
)
from edge.detectors.thresholds import refit_manifest

if TYPE_CHECKING:
    from edge.bundle import Bundle

FLUCTUATION = "log-std-of-frame-differences"
FLOOR = 1e-3
"""Smallest standard deviation (dB) before the logarithm."""


def fluctuation_features(features: np.ndarray) -> np.ndarray:
    """Per band: log of the standard deviation of frame-to-frame log-mel changes.

    Differences of dB values do not move with gain or with slow spectral drift, so the
    recording-to-recording spread of normal audio cancels out; what remains is how much each
    band fluctuates, which is where faults such as imbalance, rubbing or clogging show.
    Works on one window (frames, mels) or a stack (n, frames, mels).
    """
    diff = np.diff(features, axis=-2)
    return np.log(np.maximum(diff.std(axis=-2), FLOOR))


class FluctuationScorer:
    """Mahalanobis distance of a window's fluctuation features to the normal ones (numpy only)."""

    def __init__(
        self, mean: np.ndarray, std: np.ndarray, center: np.ndarray, precision: np.ndarray
    ) -> None:
        self.mean = np.asarray(mean, np.float64)
        self.std = np.asarray(std, np.float64)
        self.center = np.asarray(center, np.float64)
        self.precision = np.asarray(precision, np.float64)
        self.dim = len(self.mean)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> FluctuationScorer:
        """The scorer of a `fluctuation` bundle."""
        return cls(*(bundle.array(f"statistics.{k}") for k in STATISTICS))

    def standardize(self, f: np.ndarray) -> np.ndarray:
        """Features standardised with the training statistics (float64; one array made: a
        refit standardises all the site's windows at once)."""
        z = np.subtract(f, self.mean, dtype=np.float64)
        z /= self.std
        return z

    def score(self, features: np.ndarray, start: int = 0) -> WindowScore:
        """Score one window; band_error holds each band's share of the distance."""
        d = self.standardize(fluctuation_features(features)) - self.center
        share = d * (self.precision @ d) / self.dim
        return WindowScore(start=start, score=float(share.sum()), band_error=share)

    def distance(self, f: np.ndarray) -> np.ndarray:
        """Scores of fluctuation feature vectors (n, dim)."""
        d = self.standardize(f) - self.center
        return np.einsum("ij,jk,ik->i", d, self.precision, d) / self.dim

    def band_shares(self, f: np.ndarray) -> np.ndarray:
        """Each band's share of the score, for feature vectors (n, dim)."""
        d = self.standardize(f) - self.center
        return d * (d @ self.precision.T) / self.dim

    def score_many(self, windows: np.ndarray) -> np.ndarray:
        """Scores of a stack of windows, shape (n,)."""
        if len(windows) == 0:
            return np.zeros(0)
        return self.distance(fluctuation_features(windows))


STATISTICS = ("feature_mean", "feature_std", "center", "precision")


class Fluctuation(DetectorKind):
    """Band-fluctuation statistics with a Mahalanobis distance."""

    kind = "fluctuation"
    score_name = "mahalanobis"

    def check(self, bundle: Bundle) -> None:
        """Statistics over the mel bands: positive std, square precision."""
        super().check(bundle)
        require_gaussian(bundle, bundle.features.n_mels)

    def scorer(self, bundle: Bundle) -> FluctuationScorer:
        """The statistics of the bundle."""
        return FluctuationScorer.from_bundle(bundle)

    def refit(
        self, bundle: Bundle, per_file: list[np.ndarray], false_alarms_per_day: float | None
    ) -> Refit:
        """Refit the centre; the threshold comes from scores of each file against a centre
        fitted without it (one file: its first half centres, its second half scores)."""
        scorer = FluctuationScorer.from_bundle(bundle)
        z = [scorer.standardize(fluctuation_features(w)) for w in per_file if len(w)]
        center = np.concatenate(z).mean(axis=0)
        held = [
            _maha(scorer.precision, zi - np.concatenate(rest).mean(axis=0))
            for zi, rest in leave_one_out(z)
        ]
        scores = np.concatenate(held)
        full = np.concatenate(z) - center
        shares = full * (full @ scorer.precision.T) / scorer.dim
        return Refit(
            manifest=refit_manifest(
                bundle, scores, false_alarms_per_day, pieces=held_out_pieces(z)
            ),
            arrays={
                "statistics.center": center,
                "normal_band_error.mean": shares.mean(axis=0),
                "normal_band_error.std": shares.std(axis=0),
            },
        )


def _maha(precision: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.einsum("ij,jk,ik->i", d, precision, d) / len(precision)
