"""Every MQTT topic string SoundSentry uses, built in one place."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

HA_PREFIX = "homeassistant"
"""Home Assistant's default discovery prefix."""
HA_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
"""Characters Home Assistant does not accept in a discovery topic's node_id and object_id: it
ignores such a config topic without a word."""


def ha_id(text: str) -> str:
    """`text` as a discovery node_id or object_id: every other character becomes `_`
    (`pump.3` -> `pump_3`)."""
    return HA_ID_UNSAFE.sub("_", text)


@dataclass(frozen=True)
class Topics:
    """Topics of one device: `{prefix}/{device_id}/...`."""

    prefix: str
    device_id: str
    ha_prefix: str = HA_PREFIX

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
        """Anomaly events (start, update, end), QoS 1 JSON."""
        return f"{self.base}/events"

    @property
    def last_event(self) -> str:
        """The latest event message again, retained, so a client that (re)starts (Home
        Assistant after an update) shows the last event at once instead of unknown."""
        return f"{self.base}/last_event"

    @property
    def state(self) -> str:
        """Current state, retained JSON."""
        return f"{self.base}/state"

    @property
    def health(self) -> str:
        """Audio and service health, retained JSON; every change is also spooled."""
        return f"{self.base}/health"

    @property
    def metrics(self) -> str:
        """Periodic metrics JSON, retained (the latest) so a client that (re)starts shows the
        trend and running hours at once."""
        return f"{self.base}/metrics"

    @property
    def command(self) -> str:
        """Commands to this device (JSON)."""
        return f"{self.base}/set"

    @property
    def response(self) -> str:
        """Replies to commands."""
        return f"{self.base}/response"

    @property
    def ha_statuses(self) -> list[str]:
        """Where Home Assistant's birth message may come: under the discovery prefix, and at
        `homeassistant/status`, its birth topic unless set apart from a changed discovery
        prefix (HA sets the two separately)."""
        return list(dict.fromkeys([self.ha_status, f"{HA_PREFIX}/status"]))

    @property
    def ha_status(self) -> str:
        """Home Assistant's birth/will topic (`online` when it (re)starts)."""
        return f"{self.ha_prefix}/status"

    def ha_config(self, component: str, object_id: str) -> str:
        """Discovery config topic of one entity of this device (under `ha_node`)."""
        return f"{self.ha_prefix}/{component}/{self.ha_node}/{ha_id(object_id)}/config"

    @property
    def ha_node(self) -> str:
        """The discovery node_id: `{prefix}_{device_id}` with the characters Home Assistant
        refuses replaced (the default device_id, the host name, may be `raspberrypi.lan`); a
        device_id with letters beyond ASCII adds 8 hex digits of its hash, since replacing
        leaves little of it (`насос-1` and `мотор-1` both became `_____-1`, and two devices
        took over each other's entities, in a review)."""
        node = ha_id(f"{self.prefix}_{self.device_id}")
        if self.device_id.isascii():
            return node
        return f"{node}_{hashlib.sha256(self.device_id.encode()).hexdigest()[:8]}"

    @property
    def ha_node_before(self) -> str | None:
        """The node_id releases before the hash announced this device under, where it differs
        (its configs there are cleared, so Home Assistant keeps one entity each); else None."""
        node = ha_id(f"{self.prefix}_{self.device_id}")
        return None if node == self.ha_node else node
