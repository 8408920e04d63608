"""What the dashboard shows, kept up to date by the daemon loop and fanned out to browsers.

`LiveView` is a daemon `Sink`: its methods run on the loop thread and only copy small dicts
under a lock and hand them to each connected stream's bounded queue; HTTP threads read the
snapshot and their own queue. A browser that stops reading is dropped, never waited for.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from edge.commands import ReplyTo
from edge.messages import (
    EventMessage,
    HealthMessage,
    MetricsMessage,
    ResponseMessage,
    StateMessage,
    iso,
)
from edge.pipeline import Step
from edge.sink import Sink

log = logging.getLogger(__name__)

RECENT_EVENTS = 50
"""Anomalies kept for the page and /api/events (newest first)."""
STREAM_QUEUE = 256
"""Messages waiting for one browser; a browser this far behind is dropped."""
MAX_STREAMS = 8
"""Browsers connected at once; more are refused (a Pi serves a few people, not a crowd)."""
TRACE_POINTS = 240
"""Recent window scores the page draws when it opens (2 min at the default hop): the same
length as the page's own trace."""
STATUS_EVERY_S = 1.0
"""The daemon's status report is refreshed at most this often."""


class Stream:
    """One connected browser: a bounded queue of (event name, JSON text)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[str, str]] = queue.Queue(STREAM_QUEUE)
        self.dropped = False

    def offer(self, name: str, text: str) -> None:
        """Queue a message; a full queue marks the stream dropped."""
        try:
            self.queue.put_nowait((name, text))
        except queue.Full:
            self.dropped = True


class LiveView(Sink):
    """The latest state, health, window, metrics and recent events, and their live streams."""

    def __init__(self, decorate: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        self._lock = threading.Lock()
        self._streams: list[Stream] = []
        self._decorate = decorate or (lambda event: event)
        self._events: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._trace: deque[float | None] = deque(maxlen=TRACE_POINTS)
        self.last_state: dict[str, Any] | None = None
        self.last_health: dict[str, Any] | None = None
        self.last_metrics: dict[str, Any] | None = None
        self.last_window: dict[str, Any] | None = None
        self.last_status: dict[str, Any] = {}
        self.device_id: str | None = None
        """Whose page this is (doctor tells this device's dashboard from another's by it)."""
        self.events_started = 0
        self.last_window_time: float | None = None
        """When the latest window was scored (Unix time): a score that stopped coming is seen."""
        self._status_source: Callable[[], dict[str, Any]] | None = None
        self._status_at = float("-inf")

    def seed(self, events: list[dict[str, Any]]) -> None:
        """Earlier events (the device's event log, oldest first), so that the page still lists
        the evidence after a restart; not counted as events of this run."""
        with self._lock:
            for data in events[-RECENT_EVENTS:]:
                self._events[str(data["event_id"])] = self._decorate(dict(data))

    def attach(self, status: Callable[[], dict[str, Any]]) -> None:
        """Read the daemon's status report (on the loop thread) through `status`."""
        self._status_source = status

    # --- the daemon loop's side ------------------------------------------------------------

    def event(self, message: EventMessage) -> None:
        """Merge an anomaly's start, updates and end into one record."""
        data = self._decorate(message.to_dict())
        with self._lock:
            record = self._events.pop(message.event_id, {})
            record.update(data)
            self._events[message.event_id] = record
            while len(self._events) > RECENT_EVENTS:
                self._events.popitem(last=False)
            if message.type == "start":
                self.events_started += 1
        self._publish("event", record)

    def state(self, message: StateMessage) -> None:
        """The state (normal, anomaly, muted, fault, learning...), with the status report. A
        microphone's fault begins a gap in the trace, as on the page: no window comes."""
        before = (self.last_state or {}).get("state")
        self.last_state = message.to_dict()
        if message.state == "fault" and before != "fault":
            with self._lock:
                self._trace.append(None)
                # nor is its last window news: a page opened after the microphone came back,
                # before a window, showed it as if heard now (a diff review)
                self.last_window = None
        self._refresh_status(force=True)
        self._publish("state", self.last_state)

    def health(self, message: HealthMessage) -> None:
        """A health change."""
        self.last_health = message.to_dict()
        self._publish("health", self.last_health)

    def metrics(self, message: MetricsMessage) -> None:
        """Periodic metrics (for /metrics)."""
        self.last_metrics = message.to_dict()

    def response(self, message: ResponseMessage, reply_to: ReplyTo | None = None) -> None:
        """Replies to every command, whoever sent it."""
        self._publish("response", message.to_dict())

    def window(self, step: Step, threshold: float) -> None:
        """One scored window: score, threshold, level and machine state."""
        self.last_window_time = time.time()
        self.last_window = {
            "at": iso(self.last_window_time),
            # a score that is not a number cannot travel as JSON (the page's parser refuses it)
            "score": round(float(step.score), 6) if _finite(step.score) else None,
            "threshold": round(float(threshold), 6),
            "level_dbfs": round(float(step.level_dbfs), 1),
            "machine": step.state_name or step.machine,  # a trained state's name, as on MQTT
            "dead": step.dead,
            # counted by the event logic: the page colours only such a score against the
            # threshold (the machine off in a quiet room scored far above it, shown red)
            "evidence": step.evidence,
            "label": step.window.label,  # a classifier's class: its score is a probability
        }
        with self._lock:
            self._trace.append(self.last_window["score"])
        self._refresh_status()
        self._publish("window", self.last_window)

    def _refresh_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._status_source is None or (not force and now - self._status_at < STATUS_EVERY_S):
            return
        self._status_at = now
        self.last_status = self._status_source()
        self._publish("status", self.last_status)

    # --- the HTTP side ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows at once; `trace`: the recent window scores, oldest first
        (None where a window was not scored), so the page opens on the last minutes."""
        with self._lock:
            trace = list(self._trace)
        return {
            "device_id": self.device_id,
            "state": self.last_state,
            "health": self.last_health,
            "window": self.last_window,
            "status": self.last_status,
            "trace": trace,
        }

    def events(self) -> list[dict[str, Any]]:
        """Recent anomalies, newest first."""
        with self._lock:
            return [dict(e) for e in reversed(self._events.values())]

    def open_stream(self) -> Stream | None:
        """A new stream, or None when MAX_STREAMS are connected."""
        with self._lock:
            if len(self._streams) >= MAX_STREAMS:
                return None
            stream = Stream()
            self._streams.append(stream)
            return stream

    def close_stream(self, stream: Stream) -> None:
        """Forget a stream (its browser left or fell behind)."""
        with self._lock:
            if stream in self._streams:
                self._streams.remove(stream)

    def close_streams(self) -> None:
        """Ask every stream to end (the daemon is stopping)."""
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.offer("close", "")

    @property
    def stream_count(self) -> int:
        """Browsers connected now."""
        return len(self._streams)

    def _publish(self, name: str, data: dict[str, Any]) -> None:
        if not self._streams:
            return
        text = json.dumps(data, separators=(",", ":"))
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.offer(name, text)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
