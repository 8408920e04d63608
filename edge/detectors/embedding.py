"""Kind `embedding`: an int8 CNN maps each log-mel window to an embedding learnt by
self-supervised tasks on normal audio (train/embedding.py); the score is its Mahalanobis
distance to the normal embeddings, in numpy. Events still name
bands: the band evidence is how far each band's level in the window is from its normal level.
On site, the centre, the band levels and the threshold are refitted (the network and the
precision stay)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge.detectors.base import (
    DetectorKind,
    Refit,
    WindowScore,
    held_out_pieces,
    require,
    require_gaussian,
    require_normalization,
)
from edge.detectors.fluctuation import STATISTICS, FluctuationScorer
from edge.detectors.levels import leave_one_file_out
from edge.detectors.thresholds import refit_manifest
from edge.errors import BundleError

if TYPE_CHECKING:
    from edge.bundle import Bundle
    from edge.runtime import TfliteModel

BAND_STD_FLOOR_DB = 0.1
"""Smallest per-band spread of window levels, dB (a band that never moves still divides)."""


def band_levels(windows: np.ndarray) -> np.ndarray:
    """Each band's mean log-mel level over a window's frames: (..., frames, mels) -> (..., mels)."""
    return windows.mean(axis=-2)


def network_input(windows: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """What the network sees of (..., frames, mels) log-mel: standardised per band."""
    return ((windows - mean) / std).astype(np.float32)


class EmbeddingScorer:
    """Standardise the log-mel window, run the int8 network, score its embedding."""

    def __init__(
        self,
        model: TfliteModel,
        mean: np.ndarray,
        std: np.ndarray,
        head: FluctuationScorer | None,
        band_mean: np.ndarray,
        band_std: np.ndarray,
    ) -> None:
        self.model = model
        self.head = head
        self._mean = np.asarray(mean, np.float32)
        self._std = np.asarray(std, np.float32)
        self._band_mean = np.asarray(band_mean, np.float64)
        self._band_std = np.asarray(band_std, np.float64)
        self._shape = model.input_shape

    @classmethod
    def of(cls, bundle: Bundle) -> EmbeddingScorer:
        """The scorer of an `embedding` bundle."""
        if bundle.model is None:
            raise BundleError(f"bundle {bundle.model_id} has no model to embed with")
        head = FluctuationScorer(*(bundle.array(f"statistics.{k}") for k in STATISTICS))
        return cls(
            bundle.model,
            bundle.array("normalization.mean"),
            bundle.array("normalization.std"),
            head,
            bundle.array("band_level.mean"),
            bundle.array("band_level.std"),
        )

    def embed(self, features: np.ndarray) -> np.ndarray:
        """The embedding of one (frames, mels) window, float64."""
        x = network_input(features, self._mean, self._std)
        return self.model.predict(x.reshape(self._shape)).reshape(-1).astype(np.float64)

    def embed_many(self, windows: np.ndarray) -> np.ndarray:
        """Embeddings of a stack of windows, (n, dim)."""
        dim = self.model.output_size
        return np.stack([self.embed(w) for w in windows]) if len(windows) else np.zeros((0, dim))

    def band_deviation(self, features: np.ndarray) -> np.ndarray:
        """Per band: |window level - normal level| in units of the normal spread, (mels,)."""
        return np.abs(band_levels(features) - self._band_mean) / self._band_std

    def score(self, features: np.ndarray, start: int = 0) -> WindowScore:
        """Score one window: Mahalanobis distance of its embedding, with band deviations."""
        if self.head is None:
            raise ValueError("this scorer has no head fitted yet")
        h = self.head
        d = h.standardize(self.embed(features)) - h.center
        score = float(d @ (h.precision @ d)) / h.dim
        return WindowScore(start=start, score=score, band_error=self.band_deviation(features))

    def score_many(self, windows: np.ndarray) -> np.ndarray:
        """Scores of a stack of windows, shape (n,)."""
        if self.head is None:
            raise ValueError("this scorer has no head fitted yet")
        return self.head.distance(self.embed_many(windows)) if len(windows) else np.zeros(0)


class Embedding(DetectorKind):
    """Mahalanobis distance of a self-supervised int8 CNN embedding."""

    kind = "embedding"
    score_name = "embedding-mahalanobis"
    needs_model = True

    def check(self, bundle: Bundle) -> None:
        """Per-band normalisation and levels; a head as wide as the network's output."""
        super().check(bundle)
        require_normalization(bundle)
        n = bundle.features.n_mels
        require(bundle, "band_level.mean", (n,))
        require(bundle, "band_level.std", (n,), positive=True)
        mean = bundle.array("statistics.feature_mean")
        dim = bundle.model.output_size if bundle.model is not None else mean.size
        require_gaussian(bundle, dim)

    def scorer(self, bundle: Bundle) -> EmbeddingScorer:
        """The network with its head."""
        return EmbeddingScorer.of(bundle)

    def refit(
        self, bundle: Bundle, per_file: list[np.ndarray], false_alarms_per_day: float | None
    ) -> Refit:
        """Re-centre the head on the site's embeddings and refit the band levels; the
        threshold comes from each file scored against a centre fitted without it (one file:
        its first half centres, its second half scores)."""
        per_file = [w for w in per_file if len(w)]
        z, scores = _site_embeddings(bundle, per_file)
        windows = np.concatenate(per_file)
        levels = band_levels(windows)
        band_mean = levels.mean(axis=0)
        band_std = np.maximum(levels.std(axis=0), BAND_STD_FLOOR_DB)
        band_error = np.abs(levels - band_mean) / band_std
        return Refit(
            manifest=refit_manifest(
                bundle, scores, false_alarms_per_day, pieces=held_out_pieces(per_file)
            ),
            arrays={
                "statistics.center": np.concatenate(z).mean(axis=0),
                "band_level.mean": band_mean,
                "band_level.std": band_std,
                "normal_band_error.mean": band_error.mean(axis=0),
                "normal_band_error.std": band_error.std(axis=0),
            },
        )

    def held_out_scores(
        self, bundle: Bundle, per_file: list[np.ndarray], false_alarms_per_day: float | None
    ) -> np.ndarray:
        """What a refit without each file gives (the base class's way), with the network run
        once per window instead of once per refit: a refit only re-centres the head."""
        return _site_embeddings(bundle, [w for w in per_file if len(w)])[1]


def _site_embeddings(
    bundle: Bundle, per_file: list[np.ndarray]
) -> tuple[list[np.ndarray], np.ndarray]:
    """The standardised embeddings of each file, and each file scored against a centre fitted
    without it (one file: its second half against its first)."""
    scorer = EmbeddingScorer.of(bundle)
    head = scorer.head
    assert head is not None
    z = [head.standardize(scorer.embed_many(w)) for w in per_file]
    scores = [_distance(head, held, rest.mean(axis=0)) for held, rest in leave_one_file_out(z)]
    return z, np.concatenate(scores)


def _distance(head: FluctuationScorer, z: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Mahalanobis distances of standardised embeddings to `center` with the head's precision."""
    d = z - center
    return np.einsum("ij,jk,ik->i", d, head.precision, d) / head.dim
