"""Typed MQTT payloads: each converts to and from the wire in one place, with a schema version."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal

SCHEMA = 1
"""Version of the payload schemas below; bumped on any incompatible change."""


def iso(ts: float) -> str:
    """Epoch seconds as an ISO 8601 UTC timestamp with milliseconds."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Payload:
    """JSON conversion shared by every message dataclass."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, with None fields left out."""
        return {k: v for k, v in asdict(self).items() if v is not None}  # type: ignore[call-overload]

    def to_payload(self) -> str:
        """Compact JSON for the wire."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_payload(cls, payload: str | bytes) -> Any:
        """Parse a payload produced by to_payload (unknown keys are ignored)."""
        data = json.loads(payload)
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class EventMessage(_Payload):
    """An anomaly event transition: `start` when it begins, `end` when it is over."""

    type: Literal["start", "end"]
    event_id: str
    device_id: str
    model: str
    started_at: str
    peak_score: float
    threshold: float
    ended_at: str | None = None
    duration_s: float | None = None
    mean_score: float | None = None
    stream_offset_s: float | None = None
    schema: int = field(default=SCHEMA)


@dataclass(frozen=True)
class StateMessage(_Payload):
    """The device's current state (retained): normal or in an anomaly, with the latest score."""

    state: Literal["normal", "anomaly", "starting", "stopped"]
    device_id: str
    model: str
    threshold: float
    updated_at: str
    score: float | None = None
    event_id: str | None = None
    schema: int = field(default=SCHEMA)
