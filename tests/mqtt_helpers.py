"""A real paho subscriber for tests: records every message and waits for conditions; and a
spool made read-only, as on a full card."""

from __future__ import annotations

import contextlib
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


class Requester:
    """An MQTT 5 client as Node-RED's request/response uses one: sends commands with a
    Response Topic and Correlation Data, and keeps every JSON message it hears on `topics` as
    (topic, payload, correlation data)."""

    def __init__(self, port: int, topics: list[str], login: tuple[str, str] | None = None) -> None:
        self.got: list[tuple[str, dict, bytes | None]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="requester", protocol=mqtt.MQTTv5
        )
        if login:
            self.client.username_pw_set(*login)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(topic, 1) for topic in topics])

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.payload.startswith(b"{"):  # not availability's `online`
            correlation = getattr(msg.properties, "CorrelationData", None)
            with self._lock:
                self.got.append((msg.topic, json.loads(msg.payload), correlation))

    def ask(self, topic: str, payload: dict, response_topic: str, correlation: bytes) -> None:
        """Publish a command (QoS 1) asking for its reply at `response_topic`."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = response_topic
        props.CorrelationData = correlation
        self.client.publish(topic, json.dumps(payload), qos=1, properties=props)

    def on(self, topic: str, cid: str) -> list[tuple[str, dict, bytes | None]]:
        """What came on `topic` with this command id."""
        with self._lock:
            return [g for g in self.got if g[0] == topic and g[1].get("id") == cid]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class StallProxy:
    """A TCP relay in front of a broker that can stall (hold every byte, both ways, and close
    nothing: a half-open link on plant Wi-Fi) and drop its connections; new ones relay."""

    def __init__(self, upstream_port: int) -> None:
        import socket

        self.upstream = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stalled = threading.Event()
        self._sockets: list[Any] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: Any, sink: Any) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            while self.stalled.is_set():  # held, never delivered: the link is gone
                time.sleep(0.01)
                if source.fileno() < 0:
                    return
            try:
                sink.sendall(data)
            except OSError:
                return

    def drop(self) -> None:
        """Close every relayed connection (the stall's bytes are lost with them)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(2)
            sock.close()

    def close(self) -> None:
        self.stalled.clear()
        self.drop()
        self.server.close()
