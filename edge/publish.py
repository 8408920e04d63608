"""MQTT publishing with paho-mqtt 2: availability with a last will, QoS 1 events, retained state."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.messages import EventMessage, StateMessage
from edge.settings import MqttSettings, mqtt_password
from edge.topics import Topics

log = logging.getLogger(__name__)

ONLINE = "online"
OFFLINE = "offline"
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 60
CLOSE_TIMEOUT_S = 5.0


class MqttPublisher:
    """Publishes a device's availability, events and state; reconnects forever in the background.

    `online` is sent only after the broker accepted the connection (CONNACK success), and the
    retained state is re-sent after every reconnect. QoS 1 messages published while the broker
    is away are queued by paho and sent once it is back.
    """

    def __init__(self, settings: MqttSettings, topics: Topics, client_id: str) -> None:
        if not settings.host:
            raise ValueError("MqttPublisher needs mqtt.host")
        self.settings = settings
        self.topics = topics
        self._connected = threading.Event()
        self._last_state: StateMessage | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.will_set(topics.availability, OFFLINE, qos=1, retain=True)
        self.client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self._configure_auth()

    def _configure_auth(self) -> None:
        """Credentials and TLS from the settings (the password is never logged)."""
        s = self.settings
        if s.username:
            self.client.username_pw_set(s.username, mqtt_password(s))
        if s.tls.enabled:
            self.client.tls_set(
                ca_certs=str(s.tls.ca_file) if s.tls.ca_file else None,
                certfile=str(s.tls.cert_file) if s.tls.cert_file else None,
                keyfile=str(s.tls.key_file) if s.tls.key_file else None,
                cert_reqs=ssl.CERT_NONE if s.tls.insecure else ssl.CERT_REQUIRED,
            )
            self.client.tls_insecure_set(s.tls.insecure)

    @property
    def connected(self) -> bool:
        """True while the broker has accepted the connection."""
        return self._connected.is_set()

    def start(self, wait_s: float = 0.0) -> bool:
        """Connect in the background; optionally wait up to `wait_s` for the first CONNACK."""
        log.info("MQTT: connecting to %s:%d", self.settings.host, self.settings.port)
        self.client.connect_async(self.settings.host, self.settings.port, self.settings.keepalive)
        self.client.loop_start()
        return self._connected.wait(wait_s) if wait_s > 0 else self.connected

    def _on_connect(self, client: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("MQTT: broker refused the connection: %s; retrying", reason)
            return
        log.info("MQTT: connected to %s:%d", self.settings.host, self.settings.port)
        client.publish(self.topics.availability, ONLINE, qos=1, retain=True)
        if self._last_state is not None:
            client.publish(self.topics.state, self._last_state.to_payload(), qos=1, retain=True)
        self._connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _p: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            log.warning("MQTT: disconnected (%s); reconnecting in the background", reason)

    def publish_event(self, event: EventMessage) -> None:
        """Send an event with QoS 1 (queued while disconnected)."""
        self.client.publish(self.topics.events, event.to_payload(), qos=1)

    def publish_state(self, state: StateMessage) -> None:
        """Send the retained current state; it is re-sent after every reconnect."""
        self._last_state = state
        self.client.publish(self.topics.state, state.to_payload(), qos=1, retain=True)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Publish `offline`, give queued messages up to `timeout_s` to go out, disconnect."""
        deadline = time.monotonic() + timeout_s
        if self.connected:
            info = self.client.publish(self.topics.availability, OFFLINE, qos=1, retain=True)
            while not info.is_published() and time.monotonic() < deadline and self.connected:
                time.sleep(0.02)
        self.client.disconnect()
        self.client.loop_stop()
