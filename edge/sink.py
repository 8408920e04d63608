"""What the daemon reports to: the interface of every output (MQTT, the event log, the
dashboard's live view, a terminal, JSON lines)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from edge.commands import ReplyTo
    from edge.messages import (
        EventMessage,
        HealthMessage,
        MetricsMessage,
        ResponseMessage,
        StateMessage,
    )
    from edge.pipeline import Step


class Sink:
    """Receives what the daemon reports; every method is optional."""

    def event(self, message: EventMessage) -> None:
        """An anomaly start, update or end."""

    def state(self, message: StateMessage) -> None:
        """The current state (retained)."""

    def health(self, message: HealthMessage) -> None:
        """A health change (retained)."""

    def metrics(self, message: MetricsMessage) -> None:
        """Periodic metrics."""

    def response(self, message: ResponseMessage, reply_to: ReplyTo | None = None) -> None:
        """A reply to a command (`reply_to`: where its MQTT 5 Response Topic asked for it)."""

    def window(self, step: Step, threshold: float) -> None:
        """One scored window and the threshold in force (live views; called often, keep it
        cheap)."""


class JsonLinesSink(Sink):
    """Every event as one JSON line (stdout by default)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def event(self, message: EventMessage) -> None:
        """Write the event and flush, so a pipe sees it at once."""
        self.stream.write(json.dumps(message.to_dict()) + "\n")
        self.stream.flush()


class MqttSink(Sink):
    """Forwards everything to an MqttPublisher."""

    def __init__(self, publisher: Any) -> None:
        self.publisher = publisher

    def event(self, message: EventMessage) -> None:
        self.publisher.publish_event(message)

    def state(self, message: StateMessage) -> None:
        self.publisher.publish_state(message)

    def health(self, message: HealthMessage) -> None:
        self.publisher.publish_health(message)

    def metrics(self, message: MetricsMessage) -> None:
        self.publisher.publish_metrics(message)

    def response(self, message: ResponseMessage, reply_to: ReplyTo | None = None) -> None:
        self.publisher.publish_response(message, reply_to)
