"""Pieces the anomaly kinds share: their event tracker and the on-site budget threshold."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edge.errors import BundleError
from edge.events import DEFAULT_K, DEFAULT_M, DEFAULT_N, Cusum, EventDetector
from edge.threshold import (
    DEFAULT_FALSE_ALARMS_PER_DAY,
    RULE,
    Pieces,
    score_stats,
    threshold_for_budget,
)

if TYPE_CHECKING:
    from edge.bundle import Bundle
    from edge.settings import DetectorSettings


def event_tracker(
    settings: DetectorSettings, threshold: float, bundle: Bundle | None = None
) -> EventDetector:
    """K-of-N start, M-below end, periodic updates and a cooldown, from the settings; with the
    bundle, K and N as its threshold was calibrated for (unless the settings say), and the CUSUM
    it was calibrated with (threshold.params['cusum'], if any, and unless settings.integrate is
    off). Bundles without one behave as K-of-N alone."""
    k, n = settings.k_of_n(bundle.manifest.threshold.params if bundle is not None else None)
    return EventDetector(
        threshold,
        k,
        n,
        settings.release_windows,
        update_s=settings.update_seconds,
        cooldown_s=settings.cooldown_seconds,
        cusum=bundle_cusum(bundle) if bundle is not None and settings.integrate else None,
        calibrated=bundle.manifest.threshold.value if bundle is not None else None,
    )


def bundle_cusum(bundle: Bundle) -> Cusum | None:
    """The bundle's CUSUM parameters; a BundleError naming the bundle if they are malformed."""
    try:
        return Cusum.from_params(bundle.manifest.threshold.params)
    except ValueError as exc:
        raise BundleError(f"{bundle.path}: {exc}") from None


EventLogic = tuple[int, int, int]
"""K, N and M of the event logic a threshold is set for."""


def budget_threshold(
    bundle: Bundle,
    scores: np.ndarray,
    false_alarms_per_day: float | None,
    event_logic: EventLogic | None = None,
    pieces: Pieces = None,
) -> tuple[float, dict[str, Any]]:
    """The budget rule with the bundle's event logic, or `event_logic` (what a daemon whose
    settings change K, N or M runs), and the bundle's budget unless one is given; the returned
    parameters carry the rule's name under 'rule'. `pieces`: the scores of each file, in
    order (each a stream of its own)."""
    old = bundle.manifest.threshold.params
    budget = false_alarms_per_day or float(
        old.get("false_alarms_per_day", DEFAULT_FALSE_ALARMS_PER_DAY)
    )
    k, n, m = event_logic or (
        int(old.get("k", DEFAULT_K)),
        int(old.get("n", DEFAULT_N)),
        int(old.get("m", DEFAULT_M)),
    )
    hop = bundle.features.hop_seconds
    value, params = threshold_for_budget(scores, budget, k, n, m, hop, pieces=pieces)
    return value, {"rule": RULE, **params}


LEAVE_ONE_OUT_SOURCE = "on-site calibration audio (leave one file out)"


def refit_manifest(
    bundle: Bundle,
    scores: np.ndarray,
    false_alarms_per_day: float | None,
    source: str = LEAVE_ONE_OUT_SOURCE,
    event_logic: EventLogic | None = None,
    pieces: Pieces = None,
) -> dict[str, Any]:
    """The threshold and normal-score fields of an on-site refit, from the site's scores (for
    `event_logic` and `pieces` when given, see budget_threshold)."""
    value, params = budget_threshold(bundle, scores, false_alarms_per_day, event_logic, pieces)
    rule = params.pop("rule")
    return {
        "threshold": {"value": value, "rule": rule, "params": params},
        "normal_scores": score_stats(scores, source),
    }
