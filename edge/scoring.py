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
    def from_bundle(cls, bundle: Bundle) -> Scorer | FluctuationScorer:
        """The scorer a bundle needs: its network with its normalisation, or its statistics."""
        if bundle.manifest.kind == "fluctuation":
            return FluctuationScorer.from_bundle(bundle)
        if bundle.model is None:
            raise ValueError(f"bundle {bundle.model_id} has no model to score with")
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
        st = bundle.manifest.statistics
        assert st is not None  # load_bundle checked it
        return cls(st.feature_mean, st.feature_std, st.center, st.precision)

    def standardize(self, f: np.ndarray) -> np.ndarray:
        """Features standardised with the training statistics."""
        return (f - self.mean) / self.std

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
