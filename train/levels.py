"""`soundsentry train --detector levels`: a Gaussian model of each mel band's mean level, level
spread and fluctuation in normal audio, scored by Mahalanobis distance (numpy, no TensorFlow).

The fluctuation model ignores level on purpose (gain and slow drift cancel), but the faults of
pumps, valves and sliders show in level: this model keeps both. Level depends on the
microphone's gain and place, so a bundle moved to another site wants `soundsentry calibrate`.
"""

from __future__ import annotations

from pathlib import Path

from edge.detectors.levels import LEVELS, LevelsScorer, level_features
from train.statistics import Design, Run, Trainer, train_gaussian

ARCHITECTURE = "levels-mahalanobis-v1"
DESIGN = Design("levels", "mahalanobis", LEVELS, ARCHITECTURE)


def fit_levels(run: Run, false_alarms_per_day: float) -> Path:
    """The Gaussian of the level-aware features; writes the bundle."""
    return train_gaussian(run, DESIGN, LevelsScorer, false_alarms_per_day)


train_levels = Trainer(level_features, fit_levels)
"""Fit on normal audio and write a bundle; returns its path (see `Trainer`)."""
