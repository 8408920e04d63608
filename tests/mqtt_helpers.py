"""A real paho subscriber for tests: records every message and waits for conditions; and a
spool made read-only, as on a full card."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.spool import Spool


@dataclass
class Received:
    topic: str
    payload: str
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """Subscribes to `topic` on a loopback broker and keeps what arrives, in order."""

    def __init__(
        self,
        port: int,
        topic: str = "#",
        client_id: str = "test-sub",
        clean: bool = True,
        login: tuple[str, str] | None = None,
    ) -> None:
        self.messages: list[Received] = []
        self._lock = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean
        )
        if login:
            self.client.username_pw_set(*login)
        self._subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError(f"could not subscribe to {topic} on port {port}")

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(
                Received(msg.topic, msg.payload.decode(errors="replace"), bool(msg.retain))
            )
            self._lock.notify_all()

    def wait_for(self, pred: Callable[[list[Received]], bool], timeout: float = 30) -> bool:
        """Block until pred(messages) is true or the timeout passes."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not pred(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def on(self, suffix: str) -> list[Received]:
        """Messages whose topic ends with `suffix`."""
        with self._lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def read_only(spool: Spool, on: bool) -> None:
    """Every write to the spool fails from here (as on a full card) while it still reads, or
    no longer."""
    spool._db.execute(f"PRAGMA query_only = {int(on)}")  # type: ignore[attr-defined]
