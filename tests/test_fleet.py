"""Fleet: 50 daemons against one broker; each shared-subscription consumer group gets every
event exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import (
    DEMO_BUNDLE,
    DEMO_CLIP,
    ROOT,
    SOUNDSENTRY,
    Broker,
    broker_with_example_acl,
    wait_for,
)
from paho.mqtt.enums import CallbackAPIVersion

pytestmark = pytest.mark.slow
DEVICES = 50
BATCH = 10


class Member:
    """One consumer of a shared subscription group."""

    def __init__(self, port: int, group: str, name: str) -> None:
        self.events: list[tuple[str, str]] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{group}-{name}")
        self.client.on_connect = lambda c, *_: c.subscribe(
            f"$share/{group}/soundsentry/+/events", qos=1
        )
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.ready.wait(10)

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        e = json.loads(msg.payload)
        self.events.append((e["event_id"], e["type"]))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_fifty_daemons_and_shared_subscription_groups(broker: Broker, tmp_path: Path) -> None:
    groups = {
        "alerts": [Member(broker.port, "alerts", str(i)) for i in range(3)],
        "audit": [Member(broker.port, "audit", str(i)) for i in range(2)],
    }
    printed: set[tuple[str, str]] = set()
    env = {k: v for k, v in os.environ.items() if k != "SOUNDSENTRY_DATA_DIR"}
    try:
        for start in range(0, DEVICES, BATCH):
            procs = []
            for i in range(start, start + BATCH):
                cfg = tmp_path / f"pi-{i:02d}.toml"
                cfg.write_text(
                    f'device_id = "pi-{i:02d}"\ndata_dir = "{tmp_path / str(i)}"\n'
                    f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
                    "discovery = false\n"
                )
                procs.append(
                    subprocess.Popen(
                        [
                            *SOUNDSENTRY,
                            "replay",
                            str(DEMO_BUNDLE),
                            str(DEMO_CLIP),
                            "--config",
                            str(cfg),
                        ],
                        cwd=ROOT,
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        text=True,
                    )
                )
            for p in procs:
                out, _ = p.communicate(timeout=120)
                assert p.returncode == 0
                printed |= {
                    (e["event_id"], e["type"])
                    for e in map(json.loads, out.splitlines())
                    if e["type"] != "update"
                }
        assert len(printed) >= 2 * DEVICES  # a start and an end from every device

        def received(group: str) -> list[tuple[str, str]]:
            return [e for m in groups[group] for e in m.events if e[1] != "update"]

        wait_for(
            lambda: all(len(received(g)) >= len(printed) for g in groups),
            30,
            f"every group to receive all {len(printed)} events",
            lambda: {g: len(received(g)) for g in groups},
        )
        for group, members in groups.items():
            got = received(group)
            assert sorted(got) == sorted(printed), group  # every event, exactly once per group
            assert sum(1 for m in members if m.events) >= 2, "the group shares the load"
    finally:
        for members in groups.values():
            for m in members:
                m.close()


def test_example_acl_lets_each_device_write_only_its_own_topics(tmp_path: Path) -> None:
    users = ("pi-01", "pi-02", "consumer")
    broker = broker_with_example_acl(tmp_path, {user: f"{user}-pw" for user in users})
    seen: list[str] = []
    ready = threading.Event()
    consumer = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="consumer")
    consumer.username_pw_set("consumer", "consumer-pw")
    consumer.on_connect = lambda c, *_: c.subscribe("soundsentry/#", qos=1)
    consumer.on_subscribe = lambda *_: ready.set()
    consumer.on_message = lambda _c, _u, m: seen.append(m.topic)
    consumer.connect("127.0.0.1", broker.port)
    consumer.loop_start()
    try:
        assert ready.wait(10)
        device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pi-01")
        device.username_pw_set("pi-01", "pi-01-pw")
        device.connect("127.0.0.1", broker.port)
        device.loop_start()
        for topic in ("soundsentry/pi-02/events", "soundsentry/pi-01/events"):
            device.publish(topic, "{}", qos=1).wait_for_publish(5)
        # The broker forwards one client's messages in order: once the second is here, the
        # first would have been too.
        wait_for(lambda: seen, 10, "pi-01's write to its own topic to reach the consumer")
        device.loop_stop()
        assert seen == ["soundsentry/pi-01/events"]  # the write to pi-02's topic was dropped
    finally:
        consumer.loop_stop()
        broker.stop()
