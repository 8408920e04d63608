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
    """Autoencoder: reconstruction error. Classifier: probability of the top class."""
    band_error: np.ndarray
    label: str | None = None
    """Classifier: the most probable class."""


class Scorer:
    """Score log-mel windows with a bundle's autoencoder (mean squared reconstruction error)."""

    def __init__(
        self,
        model: TfliteModel,
        mean: np.ndarray,
        std: np.ndarray,
        labels: list[str] | None = None,
    ) -> None:
        self.model = model
        self.labels = labels
        self._mean = np.asarray(mean, np.float32)
        self._std = np.asarray(std, np.float32)
        self._shape = model.input_shape

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Scorer:
        """Scorer with a bundle's model and normalisation."""
        labels = bundle.manifest.labels if bundle.manifest.kind == "classifier" else None
        return cls(bundle.model, *normalization_arrays(bundle.manifest), labels=labels)

    def normalize(self, features: np.ndarray) -> np.ndarray:
        """Standardise (frames, mels) features with the training statistics."""
        return (features - self._mean) / self._std

    def score(self, features: np.ndarray, start: int = 0) -> WindowScore:
        """Score one window of (frames, mels) log-mel features."""
        x = self.normalize(features)
        if self.labels is not None:
            probs = self.model.predict(x.reshape(self._shape)).reshape(-1)
            top = int(np.argmax(probs))
            return WindowScore(start, float(probs[top]), np.zeros(x.shape[1]), self.labels[top])
        recon = self.model.predict(x.reshape(self._shape)).reshape(x.shape)
        err = (recon - x) ** 2
        return WindowScore(start=start, score=float(err.mean()), band_error=err.mean(axis=0))

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Classifier: class probabilities of one window."""
        x = self.normalize(features)
        return self.model.predict(x.reshape(self._shape)).reshape(-1)

    def score_many(self, windows: np.ndarray) -> np.ndarray:
        """Scores of a stack of windows, shape (n,)."""
        return np.array([self.score(w).score for w in windows], dtype=np.float64)


TOP_BANDS = 3


class Explainer:
    """Names the frequency ranges whose error deviates most from normal."""

    def __init__(self, bundle: Bundle) -> None:
        from edge.features import mel_band_edges

        self.edges = mel_band_edges(bundle.features)
        ref = bundle.manifest.normal_band_error
        n = bundle.features.n_mels
        self.mean = np.asarray(ref.mean, np.float64) if ref else None
        self.std = np.maximum(np.asarray(ref.std, np.float64), 1e-9) if ref else np.ones(n)

    def bands(self, band_error: np.ndarray, top: int = TOP_BANDS) -> list[dict[str, float]]:
        """The `top` most deviating bands as {low_hz, high_hz, deviation}, largest first."""
        err = np.asarray(band_error, np.float64)
        if self.mean is not None:
            z = (err - self.mean) / self.std
        else:  # older bundle without reference: relative to this window's own average
            z = err / max(float(err.mean()), 1e-12) - 1.0
        order = np.argsort(-z)[:top]
        return [
            {
                "low_hz": round(float(self.edges[i]), 1),
                "high_hz": round(float(self.edges[i + 2]), 1),
                "deviation": round(float(z[i]), 2),
            }
            for i in order
        ]
