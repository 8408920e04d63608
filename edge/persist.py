"""What survives a restart: the threshold set by command, a maintenance mute and the machine's
running hours, kept in `{data_dir}/state.json` (atomic writes, mode 0600). A threshold belongs
to the model it was set on: after another model is loaded it is dropped. The running hours
belong to the machine, whatever model listens to it."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from edge.history import read_json, write_json
from edge.private import private_dir

log = logging.getLogger(__name__)

STATE = "state.json"


class DeviceState:
    """The persisted threshold, mute and running seconds of one device."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / STATE
        data = read_json(self.path) or {}
        self.model: str | None = data.get("model")
        self.threshold: float | None = _number(data.get("threshold"))
        self.muted_until: float = _number(data.get("muted_until")) or 0.0
        self.running_seconds: float = _number(data.get("running_seconds")) or 0.0

    def threshold_for(self, model_id: str) -> float | None:
        """The threshold set by command for this model, if any."""
        return self.threshold if self.model == model_id else None

    def mute_left(self, now: float | None = None) -> float:
        """When a persisted mute ends (epoch seconds), 0 if none is running."""
        return self.muted_until if self.muted_until > (now or time.time()) else 0.0

    def save(
        self, model_id: str, threshold: float | None, muted_until: float, running_seconds: float
    ) -> None:
        """Record the current threshold override, mute and running seconds; a write error is
        logged, not raised (the running detector is right either way)."""
        self.model, self.threshold, self.muted_until = model_id, threshold, muted_until
        self.running_seconds = running_seconds
        data: dict[str, Any] = {
            "model": model_id,
            "threshold": threshold,
            "muted_until": muted_until,
            "running_seconds": round(running_seconds, 1),
        }
        try:
            private_dir(self.path.parent)
            write_json(self.path, data)
        except OSError as exc:
            log.error("could not save %s: %s", self.path, exc)


def _number(value: Any) -> float | None:
    """A finite positive number from JSON, else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf"):
        return float(value)
    return None
