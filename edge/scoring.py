"""Anomaly scoring: window features -> the model -> a reconstruction-error score."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.bundle import Bundle, normalization_arrays
from edge.runtime import TfliteModel


@dataclass(frozen=True, slots=True)
class WindowScore:
    """The score of one analysis window and the per-mel-band error behind it."""

    start: int
    """First sample of the window in the stream."""
    score: float
    band_error: np.ndarray


class Scorer:
    """Score log-mel windows with a bundle's autoencoder (mean squared reconstruction error)."""

    def __init__(self, model: TfliteModel, mean: np.ndarray, std: np.ndarray) -> None:
        self.model = model
        self._mean = np.asarray(mean, np.float32)
        self._std = np.asarray(std, np.float32)
        self._shape = model.input_shape

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Scorer:
        """Scorer with a bundle's model and normalisation."""
        return cls(bundle.model, *normalization_arrays(bundle.manifest))

    def normalize(self, features: np.ndarray) -> np.ndarray:
        """Standardise (frames, mels) features with the training statistics."""
        return (features - self._mean) / self._std

    def score(self, features: np.ndarray, start: int = 0) -> WindowScore:
        """Score one window of (frames, mels) log-mel features."""
        x = self.normalize(features)
        recon = self.model.predict(x.reshape(self._shape)).reshape(x.shape)
        err = (recon - x) ** 2
        return WindowScore(start=start, score=float(err.mean()), band_error=err.mean(axis=0))

    def score_many(self, windows: np.ndarray) -> np.ndarray:
        """Scores of a stack of windows, shape (n,)."""
        return np.array([self.score(w).score for w in windows], dtype=np.float64)
