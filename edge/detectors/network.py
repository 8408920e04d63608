"""The scorer shared by kinds with a TFLite network: standardise log-mel, run the model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge.detectors.base import WindowScore
from edge.runtime import TfliteModel

if TYPE_CHECKING:
    from edge.bundle import Bundle


class NetworkScorer:
    """Autoencoder: mean squared reconstruction error. Classifier (with `labels`): the top
    class and its probability."""

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
    def of(cls, bundle: Bundle, labels: list[str] | None = None) -> NetworkScorer:
        """The network of a bundle with its normalisation."""
        if bundle.model is None:
            raise ValueError(f"bundle {bundle.model_id} has no model to score with")
        mean, std = bundle.array("normalization.mean"), bundle.array("normalization.std")
        return cls(bundle.model, mean, std, labels)

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
