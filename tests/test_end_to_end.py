"""End to end with real parts: a trained model, a real mosquitto, a real PulseAudio capture."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import DEMO_BUNDLE, DEMO_CLIP, ROOT, SOUNDSENTRY, Broker, cli
from mqtt_helpers import Received, Subscriber

pytestmark = pytest.mark.slow


def config(tmp_path: Path, broker: Broker, device_id: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'device_id = "{device_id}"\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
    )
    return path


def kinds(messages: list[Received]) -> list[str]:
    """The sequence of availability values and event types, in arrival order."""
    out = []
    for m in messages:
        if m.topic.endswith("/availability"):
            out.append(m.payload)
        elif m.topic.endswith("/events"):
            out.append(m.json()["type"])
    return out


def test_replay_realtime_publishes_online_start_end_offline(
    tiny_bundle: Path, broker: Broker, tmp_path: Path
) -> None:
    sub = Subscriber(broker.port, "soundsentry/e2e/#")
    try:
        proc = cli(
            "replay",
            str(tiny_bundle),
            str(DEMO_CLIP),
            "--realtime",
            "--config",
            str(config(tmp_path, broker, "e2e")),
            timeout=120,
        )
        assert sub.wait_for(lambda ms: "offline" in kinds(ms), timeout=10)
        seq = kinds(sub.messages)
        assert seq[0] == "online" and seq[-1] == "offline"
        events = [m.json() for m in sub.on("/events")]
        assert [e["type"] for e in events][:2] == ["start", "end"]
        start, end = events[0], events[1]
        assert start["event_id"] == end["event_id"] and start["schema"] == 1
        assert {"device_id", "model", "started_at", "peak_score", "threshold"} <= set(start)
        assert "fault" not in start and "label" not in start  # a classifier's fields only
        assert end["ended_at"] >= end["started_at"] and end["peak_score"] > end["threshold"]
        printed = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [e["event_id"] for e in printed] == [e["event_id"] for e in events]
        state = sub.on("/state")[-1].json()
        assert state["state"] in ("normal", "stopped") and state["device_id"] == "e2e"
        # `offline` once: the will came as well, 20 ms after it (a review of the contract);
        # a marker sent once the daemon has exited arrives after anything it caused
        sub.client.publish("soundsentry/e2e/marker", "after", qos=1)
        assert sub.wait_for(lambda ms: any(m.topic.endswith("/marker") for m in ms), timeout=10)
        assert kinds(sub.messages).count("offline") == 1, kinds(sub.messages)
    finally:
        sub.close()


def test_kill_9_makes_the_broker_publish_the_last_will(broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.port, "soundsentry/victim/availability")
    proc = subprocess.Popen(
        [
            *SOUNDSENTRY,
            "replay",
            str(DEMO_BUNDLE),
            str(DEMO_CLIP),
            "--realtime",
            "--config",
            str(config(tmp_path, broker, "victim")),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert sub.wait_for(lambda ms: any(m.payload == "online" for m in ms), timeout=60)
        proc.kill()
        proc.wait(10)
        assert sub.wait_for(lambda ms: ms[-1].payload == "offline", timeout=10)
    finally:
        proc.kill()
        sub.close()
    late = Subscriber(broker.port, "soundsentry/victim/availability", client_id="late")
    try:  # retained: a subscriber arriving later learns the device is offline
        assert late.wait_for(lambda ms: bool(ms) and ms[-1].payload == "offline", timeout=10)
        assert late.messages[-1].retain
    finally:
        late.close()


def test_microphone_path_through_pulseaudio(pulse: str, broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.port, "soundsentry/mic/#")
    env = {**os.environ, "PULSE_SOURCE": pulse, "SOUNDSENTRY_DATA_DIR": str(tmp_path / "data")}
    player = subprocess.Popen(["paplay", "-d", pulse.removesuffix(".monitor"), str(DEMO_CLIP)])
    daemon = subprocess.Popen(
        [
            *SOUNDSENTRY,
            "run",
            "--model",
            str(DEMO_BUNDLE),
            "--device",
            "pulse",
            "--config",
            str(config(tmp_path, broker, "mic")),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sub.wait_for(lambda ms: "start" in kinds(ms), timeout=30), daemon.stderr
        start = sub.on("/events")[0].json()
        # The fault begins 5 s into the clip: the event must come from it, not from silence.
        assert start["type"] == "start" and start["stream_offset_s"] >= 1.0
        # The fault is over at 11 s and normal running follows: the anomaly ends on its own.
        assert sub.wait_for(lambda ms: "end" in kinds(ms), timeout=30), kinds(sub.messages)
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=20)
        assert daemon.returncode == 0, err
        assert sub.wait_for(lambda ms: "offline" in kinds(ms), timeout=10)
        printed = [json.loads(line) for line in out.splitlines()]
        assert [(e["type"], e["event_id"]) for e in printed if e["type"] != "update"][:2] == [
            ("start", start["event_id"]),
            ("end", start["event_id"]),
        ]
    finally:
        player.kill()
        daemon.kill()
        sub.close()


def test_demo_runs_without_broker_or_microphone() -> None:
    proc = cli("demo", "--fast", env={"PULSE_SERVER": "/nonexistent"})
    assert "ANOMALY START" in proc.stdout and "ANOMALY END" in proc.stdout
    assert proc.stdout.index("ANOMALY START") < proc.stdout.index("ANOMALY END")
