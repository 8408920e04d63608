"""The daemon loop: a source of audio blocks -> the pipeline -> event sinks (stdout, MQTT)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol, TextIO

import numpy as np

from edge.bundle import Bundle
from edge.events import Transition
from edge.messages import EventMessage, StateMessage, iso
from edge.pipeline import Pipeline, Step
from edge.settings import Settings

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Something that receives events and state changes."""

    def event(self, message: EventMessage) -> None: ...

    def state(self, message: StateMessage) -> None: ...


class JsonLinesSink:
    """Every event as one JSON line (stdout by default)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def event(self, message: EventMessage) -> None:
        """Write the event and flush, so a pipe sees it at once."""
        self.stream.write(json.dumps(message.to_dict()) + "\n")
        self.stream.flush()

    def state(self, message: StateMessage) -> None:
        """States are not printed."""


class MqttSink:
    """Adapter from the daemon to an MqttPublisher."""

    def __init__(self, publisher: object) -> None:
        self.publisher = publisher

    def event(self, message: EventMessage) -> None:
        self.publisher.publish_event(message)  # type: ignore[attr-defined]

    def state(self, message: StateMessage) -> None:
        self.publisher.publish_state(message)  # type: ignore[attr-defined]


class Detector:
    """Runs the pipeline over a source and turns transitions into messages for the sinks."""

    def __init__(
        self,
        settings: Settings,
        bundle: Bundle,
        sinks: Iterable[Sink],
        on_step: Callable[[Step], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.bundle = bundle
        self.sinks = list(sinks)
        self.on_step = on_step
        self.clock = clock
        self.pipeline = Pipeline(bundle, settings.detector)
        self._stop = threading.Event()
        self._origin = clock()
        self.windows = 0

    def stop(self) -> None:
        """Finish after the current block (signal handlers call this)."""
        self._stop.set()

    def run(self, source: Iterable[np.ndarray]) -> None:
        """Process blocks until the source ends or stop() is called; then close open events."""
        self._origin = self.clock()
        self._publish_state("normal", None)
        try:
            for block in source:
                self.feed(block)
                if self._stop.is_set():
                    break
        finally:
            self.finish()

    def feed(self, block: np.ndarray) -> list[Step]:
        """Process one block and dispatch what it produced."""
        steps = self.pipeline.push(block)
        for step in steps:
            self.windows += 1
            if self.on_step:
                self.on_step(step)
            if step.transition is not None:
                self._dispatch(step.transition, step.window.score)
        return steps

    def finish(self) -> None:
        """End an open anomaly and mark the state stopped."""
        transition = self.pipeline.close()
        if transition is not None:
            self._dispatch(transition, None)
        self._publish_state("stopped", None)

    def _dispatch(self, transition: Transition, score: float | None) -> None:
        message = self._message(transition)
        log.info("anomaly %s: %s (peak %.4g)", message.type, message.event_id, message.peak_score)
        for sink in self.sinks:
            sink.event(message)
        active = transition.kind == "start"
        self._publish_state(
            "anomaly" if active else "normal", score, transition.event_id if active else None
        )

    def _message(self, t: Transition) -> EventMessage:
        ended = t.ended_s is not None
        return EventMessage(
            type="end" if ended else "start",
            event_id=t.event_id,
            device_id=self.settings.device_id,
            model=self.bundle.model_id,
            started_at=iso(self._origin + t.started_s),
            ended_at=iso(self._origin + t.ended_s) if ended else None,  # type: ignore[operator]
            duration_s=round(t.ended_s - t.started_s, 3) if ended else None,  # type: ignore[operator]
            peak_score=round(t.peak_score, 6),
            mean_score=round(t.mean_score, 6),
            threshold=round(self.pipeline.threshold, 6),
            stream_offset_s=round(t.ended_s if ended else t.started_s, 3),  # type: ignore[arg-type]
        )

    def _publish_state(self, state: str, score: float | None, event_id: str | None = None) -> None:
        message = StateMessage(
            state=state,  # type: ignore[arg-type]
            device_id=self.settings.device_id,
            model=self.bundle.model_id,
            threshold=round(self.pipeline.threshold, 6),
            updated_at=iso(self.clock()),
            score=None if score is None else round(score, 6),
            event_id=event_id,
        )
        for sink in self.sinks:
            sink.state(message)
