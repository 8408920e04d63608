"""Every MQTT topic string SoundSentry uses, built in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    """Topics of one device: `{prefix}/{device_id}/...`."""

    prefix: str
    device_id: str

    @property
    def base(self) -> str:
        """Common root of this device's topics."""
        return f"{self.prefix}/{self.device_id}"

    @property
    def availability(self) -> str:
        """`online` / `offline`, retained; `offline` is also the last will."""
        return f"{self.base}/availability"

    @property
    def events(self) -> str:
        """Anomaly event transitions, QoS 1 JSON."""
        return f"{self.base}/events"

    @property
    def state(self) -> str:
        """Current state, retained JSON."""
        return f"{self.base}/state"
