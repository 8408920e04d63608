"""What a bundle records about how the machine sounds when it runs: the level of its training
windows, from which the edge tells `off` (far quieter) from running."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from edge.features import FeatureParams
from edge.framing import WindowBuffer
from edge.health import level_dbfs
from edge.machine_state import off_level

PERCENTILES = {"p01": 1, "p50": 50, "p99": 99}


def machine_profile(
    audio: Iterable[np.ndarray], params: FeatureParams, states: list[str] | None = None
) -> dict:
    """The manifest's `machine` section from the normal training audio (mono, model rate)."""
    levels = np.array(
        [
            level_dbfs(w.samples)
            for a in audio
            for w in WindowBuffer(params.window_samples, params.hop_samples).push(a)
        ]
    )
    if len(levels) == 0:
        return {"running_level_dbfs": {}, "off_below_dbfs": None, "states": states}
    running = {k: round(float(np.percentile(levels, q)), 2) for k, q in PERCENTILES.items()}
    return {
        "running_level_dbfs": running,
        "off_below_dbfs": round(off_level(running["p01"]), 2),
        "states": states,
    }
