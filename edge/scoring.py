"""Scoring and explaining windows, whatever the detector kind.

The kinds live in `edge/detectors/`; this module is the door the pipeline, `calibrate`,
`evaluate` and the benchmarks use: `Scorer.from_bundle` gives a bundle's window scorer, and
`Explainer` names the frequency bands behind a score.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edge.detectors.base import WindowScore, WindowScorer
from edge.detectors.fluctuation import FLUCTUATION, FluctuationScorer, fluctuation_features
from edge.detectors.network import NetworkScorer
from edge.detectors.registry import plugin_for
from edge.features import mel_band_edges

if TYPE_CHECKING:
    from edge.bundle import Bundle

__all__ = [
    "FLUCTUATION",
    "Explainer",
    "FluctuationScorer",
    "Scorer",
    "WindowScore",
    "fluctuation_features",
]


class Scorer(NetworkScorer):
    """A network scorer; `Scorer.from_bundle` gives any bundle's scorer."""

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> WindowScorer:  # type: ignore[override]
        """The scorer the bundle's detector kind uses."""
        return plugin_for(bundle.manifest).scorer(bundle)


TOP_BANDS = 3
STD_FLOOR = 1e-9


class Explainer:
    """Names the frequency ranges whose evidence deviates most from normal."""

    def __init__(self, bundle: Bundle) -> None:
        self.edges = mel_band_edges(bundle.features)
        self.enabled = plugin_for(bundle.manifest).explains
        ref = "normal_band_error.mean" in bundle.arrays
        self.mean = bundle.arrays["normal_band_error.mean"] if ref else None
        self.std = (
            np.maximum(bundle.arrays["normal_band_error.std"], STD_FLOOR)
            if ref
            else np.ones(bundle.features.n_mels)
        )

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


class ScorerTap:
    """Wraps a pipeline's scorer and keeps the log-mel windows of the current block by start
    sample, so learning takes its features from the very windows that were scored."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.windows: dict[int, np.ndarray] = {}

    def score(self, features: np.ndarray, start: int = 0) -> Any:
        """Keep the window, then score it."""
        self.windows[start] = features
        return self.scorer.score(features, start)

    def score_many(self, windows: np.ndarray) -> np.ndarray:
        """Scores of a stack of windows (not kept)."""
        return self.scorer.score_many(windows)
