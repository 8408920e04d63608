"""Threshold v1: a gamma distribution fitted to held-out normal window scores, and a quantile.

This is the DCASE 2023 baseline's rule. With the default event logic (2 of 3 windows above)
a per-window false-positive rate of 0.5 % on normal audio makes a false event rare.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

GAMMA_QUANTILE = 0.995
"""Quantile of the fitted normal-score distribution used as the threshold."""
RULE = "gamma-quantile"


def fit_threshold(scores: np.ndarray, quantile: float = GAMMA_QUANTILE) -> tuple[float, dict]:
    """Threshold from held-out normal scores; returns (value, parameters of the rule)."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) < 3 or np.ptp(scores) == 0:
        value = float(scores.max() * 1.5) if len(scores) else 1.0
        return value, {"fallback": "too few distinct held-out scores: 1.5 x max", "n": len(scores)}
    shape, loc, scale = stats.gamma.fit(scores, floc=0.0)
    value = float(stats.gamma.ppf(quantile, shape, loc=loc, scale=scale))
    empirical = float(np.mean(scores > value))
    return value, {
        "quantile": quantile,
        "gamma_shape": float(shape),
        "gamma_scale": float(scale),
        "n": len(scores),
        "holdout_window_fpr": empirical,
    }


def score_stats(scores: np.ndarray, source: str) -> dict:
    """Summary of a score distribution for the manifest."""
    s = np.asarray(scores, dtype=np.float64)
    return {
        "source": source,
        "n_windows": len(s),
        "mean": float(s.mean()),
        "std": float(s.std()),
        "p50": float(np.percentile(s, 50)),
        "p90": float(np.percentile(s, 90)),
        "p99": float(np.percentile(s, 99)),
        "max": float(s.max()),
    }
