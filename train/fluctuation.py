"""`soundsentry train --detector fluctuation` (the default): a Gaussian model of how much each
mel band fluctuates from frame to frame in normal audio, scored by Mahalanobis distance.

No network and no TensorFlow: it trains in seconds, runs in numpy on the Pi, and on the MIMII
fan protocol it detects far better than the autoencoders we tried (see bench/). Every channel
of a multichannel recording can serve as an extra training view (`--all-channels`).
"""

from __future__ import annotations

from pathlib import Path

from edge.scoring import FLUCTUATION, FluctuationScorer, fluctuation_features
from train.statistics import (
    MIN_SHRINKAGE,
    Design,
    Run,
    Trainer,
    fit_statistics,
    train_gaussian,
)

__all__ = ["MIN_SHRINKAGE", "fit_statistics", "train_fluctuation"]

ARCHITECTURE = "fluctuation-mahalanobis-v1"
DESIGN = Design("fluctuation", "mahalanobis", FLUCTUATION, ARCHITECTURE)


def fit_fluctuation(run: Run, false_alarms_per_day: float) -> Path:
    """The Gaussian of the fluctuation features; writes the bundle."""
    n = run.params.n_mels
    identity = {"normalization": {"mean": [0.0] * n, "std": [1.0] * n}}
    return train_gaussian(run, DESIGN, FluctuationScorer, false_alarms_per_day, identity)


train_fluctuation = Trainer(fluctuation_features, fit_fluctuation)
"""Fit on normal audio and write a bundle; returns its path (see `Trainer`)."""
