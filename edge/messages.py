"""Typed MQTT payloads: each converts to and from the wire in one place, with a schema version."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal

SCHEMA = 1
"""Version of the payload schemas below; bumped on any incompatible change."""


def iso(ts: float) -> str:
    """Epoch seconds as an ISO 8601 UTC timestamp with milliseconds."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _finite(value: Any) -> Any:
    """`value` with every float a JSON number: JSON has no NaN or Infinity, and a payload
    holding one (a score that overflowed) no parser takes. An infinite score is the largest
    number there is (an event's peak_score stays a number, as its schema says); NaN is null."""
    if isinstance(value, float):
        if math.isinf(value):
            return math.copysign(sys.float_info.max, value)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class _Payload:
    """JSON conversion shared by every message dataclass."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; optional fields (those with a default) are left out when None, required
        ones are kept as null, so every payload carries what its schema requires."""
        optional = {f.name for f in fields(self) if f.default is not MISSING}  # type: ignore[arg-type]
        data = _finite(asdict(self))  # type: ignore[call-overload]
        return {k: v for k, v in data.items() if v is not None or k not in optional}

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
    """An anomaly: `start` when it begins, `update` periodically while it lasts, `end` after."""

    type: Literal["start", "update", "end"]
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
    bands: list[dict[str, float]] | None = None
    clip: str | None = None
    clip_seconds: float | None = None
    label: str | None = None
    fault: bool | None = None
    """A classifier's event: True when its class is a fault (the model has a class `normal`),
    False when it is a change of class (states such as speeds); None for an anomaly model's."""
    machine: str | None = None
    """The machine's state when the event was raised: `running`, or the name of the state
    folder it was trained with."""
    trigger: Literal["k_of_n", "cusum"] | None = None
    """What raised the anomaly: `k_of_n`, windows above the threshold, or `cusum`, evidence
    integrated over time, whose windows may all lie below the threshold."""
    clip_url: str | None = None
    """Where the dashboard serves the clip (set when `[web]` is enabled)."""
    ended_by: str | None = None
    """On an `end` only: why it ended, one of edge.events.ENDED_BY: `normal` (the sound came
    back), `machine_off`, `audio_fault`, `muted`, `stopped`, ... (absent from older versions)."""
    seq: int | None = None
    """The message's place in its event on MQTT: 0 for the `start`, 1, 2, ... for each
    `update` and the `end`. Updates share event_id, type and started_at, so a consumer
    deduplicates on (event_id, type, seq): what QoS 1 delivers twice has the same seq."""
    interrupted: bool | None = None
    """On an `end` only: the daemon stopped before the anomaly ended (power cut, crash, kill);
    sent when it starts again, whose time `ended_at` is, so the event lasted at most
    `duration_s`."""
    clock_unset: bool | None = None
    """True when the device's wall clock could not be believed as this was sent (edge.clock:
    before 2026, or not yet set by NTP: a Pi has no real-time clock), so its times may be
    wrong: a consumer may stamp it on receipt instead. Absent otherwise."""
    schema: int = field(default=SCHEMA)


@dataclass(frozen=True)
class StateMessage(_Payload):
    """The device's current state (retained): normal, anomaly, muted, fault or stopped."""

    state: Literal["normal", "anomaly", "muted", "fault", "learning", "starting", "stopped"]
    device_id: str
    model: str
    threshold: float
    updated_at: str
    score: float | None = None
    level_dbfs: float | None = None
    event_id: str | None = None
    muted_until: str | None = None
    label: str | None = None
    """Supervised mode: the current class."""
    machine: str | None = None
    """The machine's state: `running`, `off`, or the name of a state folder it was trained
    with."""
    progress: float | None = None
    """While `learning`: the share of the commissioning period done, 0 to 1."""
    schema: int = field(default=SCHEMA)


@dataclass(frozen=True)
class HealthMessage(_Payload):
    """Audio and service health (retained), re-sent on every fault and recovery."""

    status: Literal["ok", "fault"]
    device_id: str
    updated_at: str
    faults: list[str]
    change: str | None = None
    """What just happened, e.g. `fault:silence` or `recovered:silence`."""
    detail: str | None = None
    schema: int = field(default=SCHEMA)


@dataclass(frozen=True)
class MetricsMessage(_Payload):
    """Periodic health metrics of the daemon."""

    device_id: str
    model: str
    updated_at: str
    uptime_s: float
    windows_scored: int
    realtime_factor: float | None
    inference_ms_p50: float | None
    inference_ms_p95: float | None
    dropped_blocks: int
    overflows: int
    queue_depth: int
    level_dbfs: float | None
    spool_depth: int
    spool_dropped: int
    commands_shed: int = 0
    running_hours: float = 0.0
    """Hours of audio in which the machine was running, in total on this device (kept in
    data_dir/state.json across restarts)."""
    cpu_temp_c: float | None = None
    throttled: str | None = None
    anomaly_index: float | None = None
    """Median window score of the last minute over the normal median (edge.metrics)."""
    schema: int = field(default=SCHEMA)


@dataclass(frozen=True)
class ResponseMessage(_Payload):
    """The reply to a command on the `set` topic."""

    command: str
    ok: bool
    device_id: str
    updated_at: str
    id: str | None = None
    detail: str | None = None
    status: dict[str, Any] | None = None
    schema: int = field(default=SCHEMA)
