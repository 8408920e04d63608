"""What the daemon reports to: the interface of every output (MQTT, the event log, the
dashboard's live view, a terminal, JSON lines)."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
