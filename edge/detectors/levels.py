"""Kind `levels`: the fluctuation statistic with the level information it throws away put back.
Per band: the mean log-mel level, the spread of the level over the window's frames and the
band fluctuation; the score is the Mahalanobis distance of the three to normal running. Faults
of pumps, valves and sliders show as level changes (a louder hum, a missing click) more than
as fluctuation. On site, the centre and threshold are refitted (the precision stays).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edge.detectors.base import (
    DetectorKind,
    Refit,
    WindowScore,
    held_out_pieces,
    leave_one_out,
    require_gaussian,
)
from edge.detectors.fluctuation import FLOOR, FluctuationScorer, fluctuation_features
from edge.detectors.thresholds import budget_threshold
from edge.threshold import Pieces, score_stats

if TYPE_CHECKING:
    from collections.abc import Callable

    from edge.bundle import Bundle


class Explains(Protocol):
    """A model that gives scores and band errors of rows: (n,), (n, n_mels)."""

    def explain(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


LEVELS = "log-mel-mean-log-spread-and-fluctuation"
GROUPS = 3
"""Feature groups per band, in vector order: mean level, log spread, fluctuation."""
SITE_SOURCE = "on-site calibration audio (leave one file out)"


def level_features(features: np.ndarray) -> np.ndarray:
    """Per band: mean log-mel level (dB), log of its standard deviation over the frames, and
    the fluctuation feature, as one vector [means | spreads | fluctuations] of 3 * n_mels.

    The spread is taken as a logarithm (floored like the fluctuation feature) because a
    standard deviation is a scale: its log is closer to Gaussian, which the Mahalanobis
    distance assumes. Works on one window (frames, mels) or a stack (n, frames, mels).
    """
    level = features.mean(axis=-2)
    spread = np.log(np.maximum(features.std(axis=-2), FLOOR))
    return np.concatenate([level, spread, fluctuation_features(features)], axis=-1)


def per_band(values: np.ndarray) -> np.ndarray:
    """Values over the level-aware vector (..., 3 * n_mels) summed per mel band (..., n_mels)."""
    return values.reshape(*values.shape[:-1], GROUPS, -1).sum(axis=-2)


class LevelsScorer(FluctuationScorer):
    """Mahalanobis distance of a window's level-aware features to the normal ones (numpy only);
    the distance and standardisation of the fluctuation scorer, on 3 * n_mels dimensions."""

    def score(self, features: np.ndarray, start: int = 0) -> WindowScore:
        """Score one window; band_error holds each mel band's share of the distance."""
        f = level_features(features)[np.newaxis]
        score = float(self.distance(f)[0])
        return WindowScore(start=start, score=score, band_error=self.band_shares(f)[0])

    def band_shares(self, f: np.ndarray) -> np.ndarray:
        """Each mel band's share of the score (its three features together), for (n, dim)."""
        return per_band(super().band_shares(f))

    def score_many(self, windows: np.ndarray) -> np.ndarray:
        """Scores of a stack of windows, shape (n,)."""
        if len(windows) == 0:
            return np.zeros(0)
        return self.distance(level_features(windows))

    def recentred(self, f: np.ndarray) -> LevelsScorer:
        """The same model centred on feature vectors `f` (n, dim) instead."""
        center = self.standardize(f).mean(axis=0)
        return LevelsScorer(self.mean, self.std, center, self.precision)


def leave_one_file_out(parts: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(held-out rows, the rest) per file; with one file, its second half against its first.
    One fold at a time: all the rests at once took about 9 GB for an hour of recordings."""
    for held, rest in leave_one_out(parts):
        yield held, np.concatenate(rest)


def held_out_explained(
    parts: list[np.ndarray], model_without: Callable[[np.ndarray], Explains]
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and band errors of each file by the model fitted on the rest (one file: its
    second half by the model of its first), for an on-site threshold."""
    folds = [model_without(rest).explain(held) for held, rest in leave_one_file_out(parts)]
    return np.concatenate([s for s, _ in folds]), np.concatenate([b for _, b in folds])


def site_refit(
    bundle: Bundle,
    held_scores: np.ndarray,
    held_bands: np.ndarray,
    arrays: dict[str, np.ndarray],
    false_alarms_per_day: float | None,
    pieces: Pieces = None,
) -> Refit:
    """The refit of a numpy kind: the budget threshold and score statistics of leave-one-
    file-out scores (`pieces`: each file's, in order), the band reference of their band
    errors, and the kind's new arrays."""
    value, params = budget_threshold(bundle, held_scores, false_alarms_per_day, pieces=pieces)
    rule = params.pop("rule")
    reference = {
        "normal_band_error.mean": held_bands.mean(axis=0),
        "normal_band_error.std": held_bands.std(axis=0),
    }
    manifest: dict[str, Any] = {"normal_scores": score_stats(held_scores, SITE_SOURCE)}
    manifest["threshold"] = {"value": value, "rule": rule, "params": params}
    return Refit(manifest=manifest, arrays={**arrays, **reference})


class Levels(DetectorKind):
    """Level-aware band statistics with a Mahalanobis distance."""

    kind = "levels"
    score_name = "mahalanobis"

    def check(self, bundle: Bundle) -> None:
        """Statistics over three features per mel band: positive std, square precision."""
        super().check(bundle)
        require_gaussian(bundle, GROUPS * bundle.features.n_mels)

    def scorer(self, bundle: Bundle) -> LevelsScorer:
        """The statistics of the bundle."""
        return LevelsScorer.from_bundle(bundle)

    def refit(
        self, bundle: Bundle, per_file: list[np.ndarray], false_alarms_per_day: float | None
    ) -> Refit:
        """Re-centre on the site's audio; the threshold comes from scores of each file against
        a centre fitted without it (one file: its first half centres, its second half scores)."""
        trained = LevelsScorer.from_bundle(bundle)
        feats = [level_features(w) for w in per_file if len(w)]
        folds = [(trained.recentred(rest), held) for held, rest in leave_one_file_out(feats)]
        scores = np.concatenate([model.distance(held) for model, held in folds])
        bands = np.concatenate([model.band_shares(held) for model, held in folds])
        site = trained.recentred(np.concatenate(feats))
        center = {"statistics.center": site.center}
        pieces = held_out_pieces(feats)
        return site_refit(bundle, scores, bands, center, false_alarms_per_day, pieces)
