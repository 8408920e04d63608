"""A real daemon on a real mosquitto against poisoned, huge, retained and flooding commands,
and hostile reload paths: it rejects each with a reply (or ignores it, if retained), keeps
scoring and publishing, and a retained poison does not stop a restarted daemon."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import DEMO_BUNDLE, Broker, wait_for
from mqtt_helpers import Subscriber
from paho.mqtt.enums import CallbackAPIVersion
from test_field_daemon import daemon, faulty_audio, write_config

pytestmark = pytest.mark.slow
NESTED = b"[" * 200_000 + b"]" * 200_000


def publish_retained(port: int, topic: str, payload: bytes) -> None:
    """Leave a retained message on the broker, as `mosquitto_pub -r` would."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="poisoner")
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


def start(tmp_path: Path, broker: Broker, audio: Path, log: Path) -> subprocess.Popen[str]:
    config = write_config(tmp_path, "hard", broker.port, extra="state_interval_seconds = 1")
    return daemon(
        "replay",
        str(DEMO_BUNDLE),
        str(audio),
        "--realtime",
        "--config",
        str(config),
        stdout=log.with_suffix(".events"),
        stderr=log,
    )


def test_poison_flood_and_retained_commands_do_not_stop_the_daemon(
    broker: Broker, tmp_path: Path
) -> None:
    topic = "soundsentry/hard/set"
    publish_retained(broker.port, topic, NESTED)  # before the daemon ever starts
    audio = faulty_audio(tmp_path / "long.wav", faults=2)
    sub = Subscriber(broker.port, "soundsentry/hard/#")
    log = tmp_path / "daemon.log"
    proc = start(tmp_path, broker, audio, log)

    def send(payload: bytes, qos: int = 1) -> None:
        sub.client.publish(topic, payload, qos=qos)

    def reply_to(cid: str) -> dict:
        found = wait_for(
            lambda: [m.json() for m in sub.on("/response") if m.json().get("id") == cid],
            15,
            f"the reply to {cid}",
        )
        return found[-1]

    def windows() -> int:
        metrics = sub.on("/metrics")
        return metrics[-1].json()["windows_scored"] if metrics else 0

    try:
        wait_for(lambda: any(m.payload == "online" for m in sub.on("/availability")), 20, "online")
        wait_for(lambda: "ignoring a retained command" in log.read_text(), 10, "retained ignored")
        assert sub.on("/response") == []  # the retained poison was not executed
        send(NESTED)
        send(b"[" * 1000 + b"]" * 1000)
        send(b"\xff" * 10)
        send(json.dumps({"command": "reload_model", "path": "/dev/zero", "id": "zero"}).encode())
        send(json.dumps({"command": "reload_model", "path": "/etc", "id": "etc"}).encode())
        rejected = wait_for(
            lambda: (
                [m.json() for m in sub.on("/response")] if len(sub.on("/response")) >= 5 else None
            ),
            15,
            "five rejected replies",
        )
        details = " | ".join(r["detail"] for r in rejected)
        assert not any(r["ok"] for r in rejected)
        assert "byte limit" in details and "nested deeper" in details and "UTF-8" in details
        assert "bundles load only from" in reply_to("zero")["detail"]

        for i in range(3000):  # a flood, as fast as the client sends
            send(json.dumps({"command": "status", "id": f"f{i}"}).encode(), qos=0)
        shed = wait_for(
            lambda: [
                m.json()["commands_shed"] for m in sub.on("/metrics") if m.json()["commands_shed"]
            ],
            20,
            "shed commands counted in metrics",
        )
        assert shed[-1] > 0
        before = windows()
        wait_for(lambda: windows() >= before + 6, 15, "scoring to go on after the flood")
        send(b'{"command": "status", "id": "after"}')
        assert reply_to("after")["ok"]
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        assert proc.returncode == 0, log.read_text()[-2000:]
        assert "Traceback" not in log.read_text()

        # The retained poison is still on the broker: a restarted daemon runs all the same.
        online = len([m for m in sub.on("/availability") if m.payload == "online"])
        proc = start(tmp_path, broker, audio, tmp_path / "second.log")
        wait_for(
            lambda: len([m for m in sub.on("/availability") if m.payload == "online"]) > online,
            20,
            "the restarted daemon online",
        )
        before = windows()
        wait_for(lambda: windows() >= before + 4, 15, "the restarted daemon scoring")
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)
        sub.close()
    data = tmp_path / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for f in data.rglob("*"):
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f
