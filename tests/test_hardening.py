"""A real daemon on a real mosquitto against poisoned, huge, retained and flooding commands,
and hostile reload paths: it rejects each with a reply (or ignores it, if retained), keeps
scoring and publishing, and a retained poison does not stop a restarted daemon."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import soundfile as sf
from conftest import DEMO_BUNDLE, Broker, free_port, wait_for
from jsonschema import Draft202012Validator
from mqtt_helpers import Requester, Subscriber
from paho.mqtt.enums import CallbackAPIVersion
from test_field_daemon import daemon, faulty_audio, write_config

from edge.spool import _SCHEMA as _SPOOL_SCHEMA
from edge.topics import Topics

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
    # a realtime replay long enough (61.5 s) to outlast the checks on a busy machine: the
    # daemon exits when its audio ends, and scoring must still go on after the flood
    audio = faulty_audio(tmp_path / "long.wav", faults=6)
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
        wait_for(lambda: any(m.payload == "online" for m in sub.on("/availability")), 60, "online")
        wait_for(lambda: "ignoring a retained command" in log.read_text(), 10, "retained ignored")
        clear = f"clear it with: mosquitto_pub -h 127.0.0.1 -p {broker.port} -r -n -t {topic})"
        assert clear in log.read_text()  # at this broker, not localhost:1883
        # the retained poison was not run: refused, once, as published retained
        (refusal,) = wait_for(lambda: [m.json() for m in sub.on("/response")], 15, "a refusal")
        assert not refusal["ok"] and "published retained" in refusal["detail"]
        send(NESTED)
        send(b"[" * 1000 + b"]" * 1000)
        send(b"\xff" * 10)
        send(json.dumps({"command": "reload_model", "path": "/dev/zero", "id": "zero"}).encode())
        send(json.dumps({"command": "reload_model", "path": "/etc", "id": "etc"}).encode())
        rejected = wait_for(
            lambda: (
                [m.json() for m in sub.on("/response")][1:]
                if len(sub.on("/response")) >= 6
                else None
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
        assert proc.returncode == 130, log.read_text()[-2000:]  # a replay stopped before its end
        assert "Traceback" not in log.read_text()

        # The retained poison is still on the broker: a restarted daemon runs all the same.
        online = len([m for m in sub.on("/availability") if m.payload == "online"])
        proc = start(tmp_path, broker, audio, tmp_path / "second.log")
        wait_for(
            lambda: len([m for m in sub.on("/availability") if m.payload == "online"]) > online,
            60,
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


def test_a_command_published_retained_while_the_daemon_runs_is_refused_not_run(
    broker: Broker, tmp_path: Path
) -> None:
    """The broker clears a message's retain flag on a live delivery, so a mute published with
    retain (Node-RED's "retain" ticked) was run, then ignored at every later start: README says
    retained commands are never run. Refused under its id; clearing it is no warning."""
    topic = "soundsentry/hard/set"
    audio = faulty_audio(tmp_path / "long.wav", faults=30)  # 290 s: more than the test needs
    sub = Subscriber(broker.port, "soundsentry/hard/#")
    log = tmp_path / "daemon.log"
    proc = start(tmp_path, broker, audio, log)
    try:
        wait_for(lambda: any(m.payload == "online" for m in sub.on("/availability")), 60, "online")
        publish_retained(broker.port, topic, b'{"command": "mute", "minutes": 5, "id": "r1"}')
        sub.client.publish(topic, b'{"command": "status", "id": "after"}', qos=1)

        def replies() -> dict[str, dict]:
            return {m.json().get("id"): m.json() for m in sub.on("/response")}

        wait_for(lambda: "after" in replies(), 15, "the reply to the status sent after it")
        got = replies()
        assert got["r1"]["command"] == "mute" and not got["r1"]["ok"]
        assert "published retained" in got["r1"]["detail"]
        assert got["after"]["ok"] and got["after"]["status"]["muted_until"] is None
        assert not any(m.json()["state"] == "muted" for m in sub.on("/state"))
        publish_retained(broker.port, topic, b"")  # cleared, as the refusal says
        wait_for(lambda: "retained command on" in log.read_text() and "was cleared" in
                 log.read_text(), 15, "the clearing logged")  # fmt: skip
        assert log.read_text().count("ignoring a retained command") == 1
        # each content is refused once, up to REFUSED_KEPT in a run (remembered by its digest:
        # the payloads themselves, up to 1 MiB each, were kept for good); more are said once
        from edge.publish import REFUSED_KEPT

        ids = [f"m{i}" for i in range(REFUSED_KEPT - 1)]  # r1 was the first
        for batch in range(0, len(ids), 9):  # a few at a time: a flood beyond the loop's
            sent = ids[batch : batch + 9]  # queue is shed (by design), and the loop is slow
            for cid in sent:  # on a busy machine (one client: a new one per message took 1 s)
                payload = json.dumps({"command": "status", "id": cid}).encode()
                sub.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
            wait_for(lambda sent=sent: set(sent) <= set(replies()), 30, f"the refusals of {sent}")
        publish_retained(broker.port, topic, b'{"command": "status", "id": "beyond"}')
        said = "retained commands refused since the start: more are ignored"
        wait_for(lambda: said in log.read_text(), 15, "the refusals' limit said")
        sub.client.publish(topic, b'{"command": "status", "id": "last"}', qos=1)
        wait_for(lambda: "last" in replies(), 15, "the reply to a status sent after them")
        assert "beyond" not in replies() and log.read_text().count(said) == 1
        publish_retained(broker.port, topic, b"")
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)
        sub.close()


def test_an_mqtt5_command_is_answered_at_its_response_topic_with_its_correlation_data(
    broker: Broker, tmp_path: Path
) -> None:
    """Node-RED's MQTT 5 request/response (and any MQTT 5 client's) sets a Response Topic and
    Correlation Data on the command and waits for a reply there: it got none, the reply went to
    `response` alone (the HA / Node-RED review). Now the reply goes there too, with the
    correlation data. Only `response` and the topics below it are taken: elsewhere (another
    device's state, a discovery config, another system's command topic) the device would write
    with its credentials where whoever may command it chose; refused, said once, and answered
    on `response` only."""
    audio = faulty_audio(tmp_path / "long.wav", faults=30)
    sub = Subscriber(broker.port, "soundsentry/hard/#")
    flow = Requester(broker.port, ["flows/#", "soundsentry/#", "homeassistant/#"])
    on = flow.on

    def ask(payload: dict, response_topic: str, correlation: bytes) -> None:
        flow.ask("soundsentry/hard/set", payload, response_topic, correlation)

    log = tmp_path / "daemon.log"
    proc = start(tmp_path, broker, audio, log)
    try:
        wait_for(lambda: any(m.payload == "online" for m in sub.on("/availability")), 60, "online")
        mine = "soundsentry/hard/response"
        ask({"command": "status", "id": "q1"}, f"{mine}/7", b"\x00corr-7")
        ask({"command": "mute", "minutes": "x", "id": "q2"}, f"{mine}/8", b"corr-8")
        wait_for(lambda: on(f"{mine}/8", "q2"), 15, "the rejection at its response topic")
        wait_for(lambda: on(f"{mine}/7", "q1"), 15, "the reply at its response topic")
        (_, reply, correlation), *more = on(f"{mine}/7", "q1")
        assert not more and correlation == b"\x00corr-7"
        assert reply["ok"] and reply["command"] == "status" and "status" in reply
        assert on("soundsentry/hard/response", "q1"), "response still has every reply"
        (_, rejected, correlation), *_ = on(f"{mine}/8", "q2")
        assert not rejected["ok"] and correlation == b"corr-8"
        # its own `response` asked for: one reply there, with the correlation data
        ask({"command": "status", "id": "q3"}, "soundsentry/hard/response", b"c3")
        wait_for(lambda: on("soundsentry/hard/response", "q3"), 15, "the reply on response")
        ask({"command": "status", "id": "q4"}, "soundsentry/hard/response/f", b"c4")  # below it:
        wait_for(lambda: on("soundsentry/hard/response/f", "q4"), 15, "the reply below response")
        assert [g[2] for g in on("soundsentry/hard/response", "q3")] == [b"c3"]  # (the ACL's)
        # where other devices and Home Assistant read: refused, answered on response only
        outside = ["soundsentry/pump/state", "homeassistant/sensor/x/config", "flows/plug/set"]
        for i, bad in enumerate(outside):
            ask({"command": "status", "id": f"b{i}"}, bad, b"x")
            ask({"command": "status", "id": f"b{i}"}, bad, b"x")  # said once
        wait_for(lambda: on("soundsentry/hard/response", "b2"), 15, "the refused ones answered")
        text = log.read_text()
        assert text.count("response topic 'soundsentry/pump/state' is refused") == 1, text
        assert text.count("response topic 'homeassistant/sensor/x/config' is refused") == 1
        assert text.count("response topic 'flows/plug/set' is refused") == 1
        assert not [g for g in flow.got if g[0] in outside]
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)
        flow.close()
        sub.close()


@dataclass
class AclDevice:
    """A daemon logged in as `pi-01` under an ACL, and a consumer's MQTT 5 requester."""

    flow: Requester
    log: Path
    proc: subprocess.Popen[str]

    def ask(self, cid: str, response_topic: str, correlation: bytes = b"c") -> None:
        payload = {"command": "status", "id": cid}
        self.flow.ask("soundsentry/pi-01/set", payload, response_topic, correlation)

    def got(self) -> list[tuple[str, str | None, bytes | None]]:
        return [(topic, reply.get("id"), c) for topic, reply, c in list(self.flow.got)]


@contextmanager
def acl_device(here: Path, acl: Path) -> Iterator[AclDevice]:
    """`replay` as device pi-01 on a broker with `acl` (and its users), up and publishing."""
    from conftest import broker_with_example_acl

    users = {"pi-01": "pi-01-pw", "consumer": "consumer-pw"}
    broker = broker_with_example_acl(here, users, acl)
    secret = here / "pi-01.pw"
    secret.write_text("pi-01-pw\n")
    config = write_config(here, "pi-01", broker.port, extra="state_interval_seconds = 1",
                          mqtt=f'username = "pi-01"\npassword_file = "{secret}"\n')  # fmt: skip
    flow = Requester(broker.port, ["soundsentry/#"], login=("consumer", "consumer-pw"))
    log = here / "daemon.log"
    audio = faulty_audio(here / "long.wav", faults=30)
    proc = daemon("replay", str(DEMO_BUNDLE), str(audio), "--realtime", "--config", str(config),
                  stdout=log.with_suffix(".events"), stderr=log)  # fmt: skip
    device = AclDevice(flow, log, proc)
    try:
        wait_for(lambda: any(g[0].endswith("/state") for g in device.got()), 60, "the device up")
        yield device
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)
        flow.close()
        broker.stop()


FLEET_ACL = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "acl"


def test_replies_a_broker_refuses_are_one_log_line_and_big_addresses_are_not_taken(
    tmp_path: Path,
) -> None:
    """A broker that refuses the replies (an ACL that gives the device its own topics, none
    below them): each new response topic was an ERROR line (advising to change the device's
    ACL) and a key kept for good; a topic or correlation data of 60 KB was kept by every shed
    command (170 MB, in a review). Now refused replies are one line for all topics, saying
    where to ask; topics or correlation data over 1 KB are not taken."""
    example = FLEET_ACL.read_text()
    assert "pattern write soundsentry/%u/#\n" in example
    flat = tmp_path / "flat.acl"  # the device's own topics, nothing below them
    flat.write_text(example.replace("pattern write soundsentry/%u/#\n",
                                    "pattern write soundsentry/%u/+\n"))  # fmt: skip
    with acl_device(tmp_path, flat) as device:
        for i in range(20):
            device.ask(f"f{i}", f"soundsentry/pi-01/response/f{i}")  # refused by the broker
        device.ask("long", "soundsentry/pi-01/response/" + "x" * 2000)  # over 1 KB: not taken
        device.ask("big", "soundsentry/pi-01/response/big", b"x" * 2000)
        wanted = {f"f{i}" for i in range(20)} | {"long", "big"}

        def answered() -> set[str | None]:
            return {c for t, c, _ in device.got() if t == "soundsentry/pi-01/response"}

        wait_for(lambda: wanted <= answered(), 20, "every reply on response")
        said = "on a command's response topic"
        wait_for(lambda: said in device.log.read_text(), 20, "the broker's refusal logged")
        text = device.log.read_text()
        refusals = [line for line in text.splitlines() if "the broker refused" in line]
        assert len(refusals) == 1 and said in refusals[0], refusals
        assert "still go to soundsentry/pi-01/response" in refusals[0]
        assert text.count("is over 1024 bytes") == 2, text
        assert "x" * 200 not in text  # a long topic is shortened in the log
        assert not [g for g in device.got() if g[1] == "big" and g[0].endswith("/big")]


def test_the_fleet_acl_takes_replies_below_response_with_their_correlation_data(
    tmp_path: Path,
) -> None:
    """deploy/mosquitto/acl lets a device write below its own topics: a Node-RED flow that
    asks for its replies below `response` gets them, with its correlation data."""
    with acl_device(tmp_path, FLEET_ACL) as device:
        device.ask("below", "soundsentry/pi-01/response/node-red", b"\x01below")
        below = ("soundsentry/pi-01/response/node-red", "below", b"\x01below")
        wait_for(lambda: below in device.got(), 20, "the reply below response, with its data")
        assert "the broker refused" not in device.log.read_text()


# --- the spool under a full disk and after months of message ids -----------------------------


TOPICS = Topics("soundsentry", "disk")


def _publisher(broker: Broker, spool_path: Path) -> tuple[object, object]:
    from edge.publish import MqttPublisher
    from edge.settings import MqttSettings
    from edge.spool import Spool

    spool = Spool(spool_path)
    settings = MqttSettings(host="127.0.0.1", port=broker.port, reconnect_max_seconds=2)
    publisher = MqttPublisher(settings, TOPICS, "disk", spool)
    publisher.start()
    wait_for(lambda: publisher.connected, 10, "the publisher to connect")
    return publisher, spool


def _event(n: int) -> object:
    from edge.messages import EventMessage

    return EventMessage(type="start", event_id=f"e{n}", device_id="disk", model="m",
                        started_at="2026-01-01T00:00:00.000Z", peak_score=2.0, mean_score=2.0,
                        threshold=1.0)  # fmt: skip


def test_a_spool_that_cannot_be_written_still_delivers_events_and_health(
    broker: Broker, tmp_path: Path
) -> None:
    """SQLite's 'database or disk is full' from the spool used to kill the daemon at its next
    event, and again at every start (its first health message) while the disk stayed full.
    SQLite's query_only makes every write fail the same way (an OperationalError)."""
    from edge.messages import HealthMessage

    sub = Subscriber(broker.port, "soundsentry/disk/#")
    publisher, spool = _publisher(broker, tmp_path / "spool.sqlite")
    try:
        db = spool._db  # type: ignore[attr-defined]
        db.execute("PRAGMA query_only = 1")  # from here every write fails, as on a full disk
        with pytest.raises(sqlite3.OperationalError):
            spool.append("t", "x")  # type: ignore[attr-defined]
        publisher.publish_event(_event(1))  # type: ignore[attr-defined]
        health = HealthMessage(status="ok", device_id="disk", updated_at="t", faults=[])
        publisher.publish_health(health)  # type: ignore[attr-defined]
        assert sub.wait_for(lambda _: bool(sub.on("/events") and sub.on("/health")), 10)
        assert sub.on("/events")[0].json()["event_id"] == "e1"
        db.execute("PRAGMA query_only = 0")  # writable again: spooled as before
        publisher.publish_event(_event(2))  # type: ignore[attr-defined]
        assert sub.wait_for(lambda _: len(sub.on("/events")) == 2, 10)
    finally:
        publisher.close()  # type: ignore[attr-defined]
        sub.close()


@pytest.mark.parametrize("damage", ["not a database", "a damaged page", "cannot be opened"])
def test_a_spool_file_that_cannot_be_used_does_not_stop_the_daemon_from_starting(
    broker: Broker, tmp_path: Path, damage: str
) -> None:
    """A spool damaged by the card (garbage where the database was, or one bad page of a good
    database, which opens and fails at the first read), or one that cannot be opened at all
    (here a folder in its place; on a Pi, a full or read-only card), raised an uncaught
    sqlite3 error at start: the service restarted every 5 s and detected nothing. Now the
    daemon starts, says why in one error line, and its events reach the broker; of the
    damaged spools moved aside, the last is kept."""
    config = write_config(tmp_path, "spooled", broker.port)
    spool = tmp_path / "data" / "spool-spooled.sqlite"
    spool.parent.mkdir(parents=True)
    if damage == "not a database":
        spool.write_bytes(b"this is not an SQLite database, a card's block went bad\n" * 100)
    elif damage == "a damaged page":
        (spool.parent / "spool-spooled.sqlite.broken-20260101T000000").write_bytes(b"older")
        db = sqlite3.connect(spool)
        db.executescript(_SPOOL_SCHEMA)
        db.executemany("INSERT INTO outbox (topic, payload, qos, retain, created) "
                       "VALUES ('t', ?, 1, 0, 0)", [("x" * 200,)] * 300)  # fmt: skip
        db.commit()
        db.close()
        with spool.open("r+b") as fh:  # page 2 onwards: the header (page 1) still reads
            fh.seek(4096)
            fh.write(b"\xa5" * 4096)
    else:
        spool.mkdir()
    sub = Subscriber(broker.port, "soundsentry/spooled/#")
    try:
        proc = daemon("replay", str(DEMO_BUNDLE), str(faulty_audio(tmp_path / "f.wav", 1)),
                      "--config", str(config))  # fmt: skip
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        errors = [line for line in err.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "spool" in errors[0], err
        assert "Traceback" not in err
        assert sub.wait_for(
            lambda _: any(m.json()["type"] == "start" for m in sub.on("/events")), 10
        )
    finally:
        sub.close()
    if damage != "cannot be opened":  # kept for a look, out of the way; a new spool in its place
        assert len(list(spool.parent.glob("spool-spooled.sqlite.broken-*"))) == 1
        assert sqlite3.connect(spool).execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)


def test_the_messages_a_damaged_spool_still_holds_are_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One bad page of a spool that held a broker outage's 400 events sent the whole file
    aside, and every waiting message with it, though 393 could still be read (in a review). The
    readable ones move into the new spool, in order; those of the damaged page are counted."""
    from edge.spool import Spool, open_spool

    path = tmp_path / "spool.sqlite"
    spool = Spool(path)
    for n in range(400):
        spool.append("t/events", json.dumps({"type": "start", "n": n, "pad": "x" * 500}))
    spool.append("t/health", "ok", retain=True)
    spool._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[attr-defined]
    spool.close()
    with path.open("r+b") as fh:  # one bad sector in the middle of the table
        fh.seek(4096 * 20)
        fh.write(b"\0" * 4096)
    caplog.set_level(logging.ERROR, logger="edge.spool")
    again = open_spool(path, 10_000)
    rows = again.after(0, 1000)
    numbers = [json.loads(r.payload)["n"] for r in rows[:-1]]
    assert 350 <= len(numbers) < 400, len(numbers)
    assert numbers == sorted(numbers) and numbers[0] == 0 and numbers[-1] == 399
    assert (rows[-1].topic, rows[-1].payload, rows[-1].retain) == ("t/health", "ok", True)
    [line] = [r.getMessage() for r in caplog.records]
    assert f"with the {len(rows)} message(s) still readable" in line, line
    assert len(list(tmp_path.glob("spool.sqlite.broken-*"))) == 1
    again.close()


@pytest.mark.parametrize("damage", ["cut short", "zeroed tail"])
def test_a_spool_cut_short_or_with_zeroed_cells_keeps_what_it_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """A power cut before the card wrote the spool's end: a file cut short was malformed on
    every page for SQLite (0 of 355 readable messages kept, and no count of the lost), and a
    zeroed tail made cells of NULLs that failed the one insert of them all (0 of 21 kept; a
    power-loss review). The readable messages are kept, the made-up ones counted lost, the
    error is one line."""
    from edge.spool import Spool, open_spool

    path = tmp_path / "spool.sqlite"
    spool = Spool(path)
    for n in range(400):
        spool.append("t/events", json.dumps({"type": "start", "n": n, "pad": "x" * 300}))
    spool.close()  # checkpointed: the messages are in the main file
    size = path.stat().st_size
    with path.open("r+b") as fh:
        if damage == "cut short":
            fh.truncate(size // 2 + 1000)  # not even a whole page
        else:
            fh.seek(size - 3000)  # part of the last page: its cells
            fh.write(b"\0" * 3000)
    caplog.set_level(logging.ERROR, logger="edge.spool")
    (tmp_path / ".spool.sqlite.broken-20260101T000000.padded").write_bytes(b"x")  # a salvage
    again = open_spool(path, 10_000)  # a power cut stopped: gone at the next open
    numbers = [json.loads(r.payload)["n"] for r in again.after(0, 1000)]
    assert len(numbers) >= (150 if damage == "cut short" else 380), len(numbers)
    assert numbers == sorted(set(numbers)) and numbers[0] == 0
    [line] = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and f"with the {len(numbers)} message(s) still readable" in line
    assert f"({400 - len(numbers)} lost to damaged pages" in line, line
    assert not list(tmp_path.glob(".*padded")), "the padded copy is removed"
    again.close()


def test_a_damaged_spool_that_never_held_a_message_or_takes_too_long_still_opens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The salvage of a damaged spool must never stop a start: a spool damaged before its first
    message has no sequence row (a TypeError escaped open_spool), and one that takes longer
    than SALVAGE_SECONDS to read stops there, the rest counted as lost (the copy loop ignored
    the limit: 3000 rows took 3.45 s against 0.1 s, in a review)."""
    import edge.spool
    from edge.spool import Spool, open_spool

    fresh = tmp_path / "fresh.sqlite"
    Spool(fresh).close()
    with fresh.open("r+b") as fh:  # the outbox's root page
        fh.seek(4096)
        fh.write(b"\xa5" * 4096)
    caplog.set_level(logging.ERROR, logger="edge.spool")
    opened = open_spool(fresh, 100)
    assert opened.depth() == 0 and "with the 0 message(s)" in caplog.records[-1].getMessage()
    opened.close()
    full = tmp_path / "full.sqlite"
    spool = Spool(full)
    spool.append_many([("t", f"m{n}", 1, False) for n in range(400)])
    spool._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[attr-defined]
    spool.close()
    with full.open("r+b") as fh:
        fh.seek(4096 * 3)
        fh.write(b"\0" * 4096)
    monkeypatch.setattr(edge.spool, "SALVAGE_SECONDS", 0.0)
    opened = open_spool(full, 1000)
    line = caplog.records[-1].getMessage()
    assert opened.depth() == 0 and "with the 0 message(s)" in line
    assert "400 lost to damaged pages or the time limit" in line, line
    opened.close()


def test_an_event_a_power_cut_left_open_is_ended_when_the_daemon_starts_again(
    broker: Broker, tmp_path: Path
) -> None:
    """The daemon lost power during an anomaly: its `start` had gone out, its `end` never
    would, and an alarm raised on the start (Node-RED, a SCADA bridge) stayed on for good. The
    next `run` ends it, marked `interrupted`, once; an event that had ended is left alone, and
    a `replay` (not the device's daemon) ends nothing. A start line missing fields (another
    version's, or damage) raised TypeError out of every start; it is skipped, said."""
    from edge.bundle import load_bundle
    from edge.eventlog import EventLog, read_events
    from edge.messages import EventMessage
    from edge.service import run_detector
    from edge.settings import Settings
    from edge.sources import FileSource

    def logged(kind: str, event_id: str) -> EventMessage:
        return EventMessage(type=kind, event_id=event_id, device_id="cut", model="m",  # type: ignore[arg-type]
                            started_at="2026-11-30T08:00:00.000Z", peak_score=3.0, threshold=1.0,
                            ended_at="2026-11-30T08:00:09.000Z" if kind == "end" else None,
                            duration_s=9.0 if kind == "end" else None)  # fmt: skip

    log = EventLog(tmp_path)
    for kind, event_id in (("start", "done"), ("end", "done"), ("start", "cut")):
        log.append(logged(kind, event_id))
    with open(tmp_path / "events.jsonl", "a") as fh:  # another version's start, fields missing:
        fh.write('{"type":"start","event_id":"odd","started_at":"2026-11-30T07:00:00Z"}\n')
        fh.write('{"type":"end","started_at":"2026-11-30T07:00:00Z"}\n')  # no id: the page's
    from edge.web.live import LiveView  # list, keyed on it, stopped every start with [web] on

    LiveView().seed([e.data for e in read_events(tmp_path)])
    assert all(e.data.get("event_id") for e in read_events(tmp_path))
    settings = Settings(device_id="cut", data_dir=tmp_path,
                        mqtt={"host": "127.0.0.1", "port": broker.port})  # fmt: skip
    bundle = load_bundle(DEMO_BUNDLE)
    quiet = tmp_path / "quiet.wav"
    import soundfile as sf

    sf.write(quiet, np.zeros(16000, np.float32), 16000)

    def one_run(live: bool) -> None:
        source = FileSource([quiet], bundle.features.samplerate)
        run_detector(settings, bundle, source, print_events=False, live=live)

    sub = Subscriber(broker.port, "soundsentry/cut/events")
    try:
        one_run(live=False)  # a replay with the device's config
        assert all(e.status == "open" for e in read_events(tmp_path) if e.data["event_id"] == "cut")
        one_run(live=True)
        assert sub.wait_for(lambda _: bool(sub.on("/events")), 10)
        one_run(live=True)  # a second start finds nothing open
    finally:
        sub.close()
    ends = [m.json() for m in sub.on("/events")]
    assert [(e["event_id"], e["type"], e.get("interrupted"), e.get("ended_by")) for e in ends] == [
        ("cut", "end", True, "interrupted")
    ]
    assert ends[0]["started_at"] == "2026-11-30T08:00:00.000Z" and ends[0]["duration_s"] > 0
    schema = json.loads(
        (Path(__file__).parent.parent / "edge/schemas/event.schema.json").read_text()
    )
    Draft202012Validator(schema).validate(ends[0])  # what consumers were promised
    assert {e.data["event_id"]: e.status for e in read_events(tmp_path)} == {
        "odd": "open",  # said in the journal, skipped: it once failed every start
        "done": "ended",
        "cut": "ended",
    }


@pytest.mark.parametrize("cut_at", ["start", "end"])
def test_a_start_is_logged_before_the_broker_can_have_it_and_an_end_after(
    broker: Broker, tmp_path: Path, cut_at: str
) -> None:
    """The start went to the spool (and out) before the event log: a power cut between the two
    left an alarm on at the broker with no record of it on the card, so the next start sent no
    `end` for it (a power-loss review). An end logged before the spool would be lost for good
    the same way (a review of that mend): the log must not say ended what the broker was never
    told. The process dies as the message reaches the spool."""
    from conftest import ANOMALOUS_FILE, ROOT

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'device_id = "cut"\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n')
    script = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from edge.publish import MqttPublisher
publish = MqttPublisher.publish_event
def power_cut(self, message):
    if message.type == {cut_at!r}:
        os._exit(9)  # the spool is the next thing written
    return publish(self, message)
MqttPublisher.publish_event = power_cut
from soundsentry.cli import main
main(["replay", {str(DEMO_BUNDLE)!r}, {str(ANOMALOUS_FILE)!r}, "--config", {str(cfg)!r}])
"""
    env = {**os.environ, "SOUNDSENTRY_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 9, proc.stderr
    lines = (tmp_path / "data" / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["start"]  # so a start ends it


@pytest.mark.parametrize(
    "other", ["a replay of it", "another site's daemon", "a daemon of another data folder"]
)
def test_a_replay_with_the_devices_config_leaves_the_devices_daemon_connected(
    broker: Broker, tmp_path: Path, other: str
) -> None:
    """`replay --config` of a running device connected with the daemon's client id, and the
    broker dropped the daemon for it (each reconnect then dropped the other: availability
    flapped every second). So did the daemon of another site sharing the broker under another
    prefix with the same device_id: the client id held the device_id alone. So did a second
    daemon on the same machine with its own data folder (`soundsentry run` as another user
    beside the service): the duplicate check never heard it, each took the other's session."""
    from edge.bundle import load_bundle
    from edge.service import mqtt_client_id, run_detector
    from edge.settings import Settings
    from edge.sources import FileSource

    mqtt_settings = {"host": "127.0.0.1", "port": broker.port, "prefix": "siteA"}
    settings = Settings(device_id="twin", data_dir=tmp_path, mqtt=mqtt_settings)
    dropped: list[object] = []
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=mqtt_client_id(settings))
    device.on_disconnect = lambda *args: dropped.append(args)
    device.connect("127.0.0.1", broker.port)
    device.loop_start()
    try:
        wait_for(device.is_connected, 10, "the device's daemon to connect")
        live = other != "a replay of it"
        if live:
            prefix = "siteB" if other == "another site's daemon" else "siteA"
            settings = Settings(device_id="twin", data_dir=tmp_path / "b",
                                mqtt={**mqtt_settings, "prefix": prefix})  # fmt: skip
        bundle = load_bundle(DEMO_BUNDLE)
        source = FileSource([faulty_audio(tmp_path / "f.wav", 1)], bundle.features.samplerate)
        run_detector(settings, bundle, source, print_events=False, live=live)
        assert device.is_connected() and not dropped
    finally:
        device.loop_stop()
        device.disconnect()


def test_a_spooled_event_waits_for_its_own_ack_after_the_message_ids_wrap(
    broker: Broker, tmp_path: Path
) -> None:
    """Acks of state messages (never spooled) used to be kept; once paho's message ids wrapped
    at 65535, after about a week, a new event took such an id and left the spool at once,
    unacknowledged: a power cut then lost it."""
    from edge.messages import StateMessage

    publisher, spool = _publisher(broker, tmp_path / "spool.sqlite")
    client = publisher.client  # type: ignore[attr-defined]
    try:
        state = StateMessage(
            state="normal", device_id="disk", model="m", threshold=1.0, updated_at="t"
        )
        publisher.publish_state(state)  # type: ignore[attr-defined]
        used = client._last_mid  # paho's message id of the state, acked by the broker...
        acks = publisher._acked  # type: ignore[attr-defined]
        wait_for(  # ...and that ack read by the sender thread
            lambda: used not in client._out_messages and acks.empty(), 10, "the state's ack"
        )
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)  # the broker stops answering
        client._last_mid = used - 1  # months later: the ids have come round to that one
        payload = _event(1).to_payload()  # type: ignore[attr-defined]
        spool.append(TOPICS.events, payload, qos=1)  # type: ignore[attr-defined]
        publisher._wake.set()  # type: ignore[attr-defined]  # as publish_event, minus last_event
        wait_for(lambda: publisher._handed > 0, 10, "the sender to hand the event to paho")  # type: ignore[attr-defined]
        assert client._last_mid == used
        assert spool.depth() == 1, "the event left the spool without an ack"
        broker.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: spool.depth() == 0, 10, "the event's own ack")
    finally:
        if broker.proc is not None:
            broker.proc.send_signal(signal.SIGCONT)
        publisher.close()  # type: ignore[attr-defined]


def test_a_broker_that_cannot_be_reached_is_named_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The journal said only "broker not reachable yet", with no host, port or reason, and the
    retries after it said nothing. Each new reason is one warning naming host and port; a
    repeated one is not logged again; `replay` (the service's start) names it too."""
    from conftest import DEMO_CLIP, SOUNDSENTRY, free_port

    from edge.publish import MqttPublisher
    from edge.settings import MqttSettings
    from edge.spool import Spool

    port = free_port()  # nothing listens there
    settings = MqttSettings(host="127.0.0.1", port=port, reconnect_max_seconds=1)
    publisher = MqttPublisher(settings, TOPICS, "down", Spool(tmp_path / "spool.sqlite"))
    failures = []
    on_fail = publisher.client.on_connect_fail
    publisher.client.on_connect_fail = lambda c, u: (failures.append(1), on_fail(c, u))
    publisher.start()
    try:
        wait_for(lambda: len(failures) >= 3, 30, "three failed attempts")
    finally:
        publisher.close(0.5)
    warnings = [r.getMessage() for r in caplog.records if r.name == "edge.publish"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"MQTT: cannot reach 127.0.0.1:{port} (")
    assert "refused" in warnings[0].lower() and "check [mqtt] host and port" in warnings[0]
    assert publisher.problem.startswith(f"cannot reach 127.0.0.1:{port}")
    proc = subprocess.run(
        [*SOUNDSENTRY, "replay", str(DEMO_BUNDLE), str(DEMO_CLIP), "--mqtt-host", "127.0.0.1",
         "--mqtt-port", str(port)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "SOUNDSENTRY_DATA_DIR":
        str(tmp_path / "data")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"MQTT: no connection to 127.0.0.1:{port} after" in proc.stderr, proc.stderr
    assert f"(cannot reach 127.0.0.1:{port} (" in proc.stderr, proc.stderr
    # no device_id chosen: not the host's own detector, whose Home Assistant entities and
    # automations a test replay's events reached (in a review)
    said = f"note: replay publishes to the broker as device {socket.gethostname()}-replay"
    assert said in proc.stderr, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert events and {e["device_id"] for e in events} == {f"{socket.gethostname()}-replay"}
    # with the device's config it acts as the device (its spool goes by its device_id)
    config = tmp_path / "device.toml"
    config.write_text(f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n')
    proc = subprocess.run(
        [*SOUNDSENTRY, "replay", str(DEMO_BUNDLE), str(DEMO_CLIP), "--config", str(config)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "SOUNDSENTRY_DATA_DIR":
        str(tmp_path / "data")},
    )  # fmt: skip
    assert proc.returncode == 0 and "note: replay publishes" not in proc.stderr, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert events and {e["device_id"] for e in events} == {socket.gethostname()}


def test_a_port_that_hangs_up_before_the_handshake_is_named_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A TLS port with `[mqtt.tls]` off (or another service on the port) takes the TCP
    connection and closes it: the daemon logged one line at its start and nothing while its
    events piled up in the spool (in a review), since only a failed TCP connect was reported."""
    import socket
    import threading

    from edge.publish import MqttPublisher
    from edge.settings import MqttSettings
    from edge.spool import Spool

    server = socket.create_server(("127.0.0.1", 0))
    port, hung_up = server.getsockname()[1], []

    def hang_up() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            conn.recv(1024)  # the CONNECT, which a TLS listener cannot read
            conn.close()
            hung_up.append(1)

    threading.Thread(target=hang_up, daemon=True).start()
    settings = MqttSettings(host="127.0.0.1", port=port, reconnect_max_seconds=1)
    publisher = MqttPublisher(settings, TOPICS, "hangup", Spool(tmp_path / "spool.sqlite"))
    publisher.start()
    try:
        wait_for(lambda: len(hung_up) >= 3, 30, "three attempts hung up on")
    finally:
        publisher.close(0.5)
        server.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "edge.publish"]
    said = [w for w in warnings if "closed the connection before the MQTT handshake" in w]
    assert len(said) == 1 and f"127.0.0.1:{port}" in said[0] and "[mqtt.tls]" in said[0], warnings
    assert publisher.problem.startswith(f"127.0.0.1:{port} closed the connection before")


def test_a_stopped_broker_is_not_blamed_for_closing_the_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker stopped (SIGSTOP, or overloaded) takes the TCP connection in its kernel backlog
    and never answers: paho hangs up after the keepalive, and the log said the port "closed the
    connection" and pointed at TLS or another service (a review). It says what happened."""
    import signal as signals

    from edge.publish import MqttPublisher
    from edge.settings import MqttSettings
    from edge.spool import Spool

    frozen = Broker(tmp_path, free_port())
    frozen.start()
    assert frozen.proc is not None
    frozen.proc.send_signal(signals.SIGSTOP)
    settings = MqttSettings(
        host="127.0.0.1", port=frozen.port, keepalive=5, reconnect_max_seconds=1
    )
    publisher = MqttPublisher(settings, TOPICS, "frozen", Spool(tmp_path / "spool.sqlite"))
    publisher.start()
    try:
        said = "did not answer the MQTT CONNECT within the keepalive (5 s): a broker stopped"
        wait_for(lambda: said in (publisher.problem or ""), 30, "the keepalive named")
    finally:
        publisher.close(0.5)
        frozen.proc.send_signal(signals.SIGCONT)
        frozen.stop()
    warnings = [r.getMessage() for r in caplog.records if r.name == "edge.publish"]
    assert not [w for w in warnings if "closed the connection" in w], warnings


def test_a_password_file_gone_after_a_refusal_is_one_error_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a refused login the password file is read again (a new password is used without a
    restart); a file that has gone meanwhile is logged, and the old password stays."""
    from edge.publish import MqttPublisher
    from edge.settings import MqttSettings
    from edge.spool import Spool

    secret = tmp_path / "password"
    secret.write_text("first\n")
    settings = MqttSettings(host="127.0.0.1", username="pump", password_file=secret)
    publisher = MqttPublisher(settings, TOPICS, "pw", Spool(tmp_path / "spool.sqlite"))
    secret.write_text("second\n")
    publisher._reread_password()
    assert publisher._password == "second"
    secret.unlink()
    publisher._reread_password()
    assert publisher._password == "second"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"MQTT: mqtt.password_file {secret}: not found"]


def test_replay_into_a_pipe_that_closes_ends_quietly() -> None:
    """`soundsentry replay ... | head`: a closed stdout ends the command, without a traceback
    (a failing output otherwise only gets logged, so the monitor carries on)."""
    from conftest import DEMO_CLIP, SOUNDSENTRY

    clips = [str(DEMO_CLIP)] * 6
    proc = subprocess.Popen([*SOUNDSENTRY, "replay", str(DEMO_BUNDLE), *clips],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    assert first.startswith(b'{"type": "start"')
    proc.stdout.close()  # what `head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 0
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert "replay: " not in err  # it ended at the closed pipe, not after six files


SIGHUP_STORM = r"""
import os, signal, sys, threading, time
from pathlib import Path
from edge.bundle import load_bundle
from edge.control import Controller
from edge.daemon import Detector
from edge.service import _install_signals
from edge.settings import Settings

model, data = sys.argv[1], Path(sys.argv[2])
detector = Detector(Settings(device_id="t", model=model, data_dir=data), load_bundle(model), [])
reloads = []
controller = Controller(detector)
controller.reload = lambda: reloads.append(1)  # the handler's path, without the reload's work
_install_signals(detector.stop, controller.submit_reload)
until = time.monotonic() + 4

def storm():
    while time.monotonic() < until:
        os.kill(os.getpid(), signal.SIGHUP)

thread = threading.Thread(target=storm)
thread.start()
while thread.is_alive() or getattr(detector, "_signalled", ()):
    detector.run_pending()  # what the loop does between blocks
print(len(reloads))
"""


def test_a_storm_of_sighups_never_deadlocks_the_loop(tmp_path: Path) -> None:
    """The SIGHUP handler ran on the loop's thread and took the command queue's lock, which the
    loop may hold at that moment (a handler runs between two bytecodes): the daemon hung until
    the watchdog killed it. Thousands of reloads asked for while the queue is in use must all
    be taken (or coalesce), and the loop must go on."""
    import sys

    done = subprocess.run(
        [sys.executable, "-c", SIGHUP_STORM, str(DEMO_BUNDLE), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) > 0  # reloads ran


@pytest.mark.parametrize("missing", ["model", "TLS CA file"])
def test_a_service_that_cannot_start_says_why_and_waits_before_systemd_restarts_it(
    tmp_path: Path, missing: str
) -> None:
    """A typo in the config, or a model not copied yet, made the service exit at once and
    systemd start it again every 5 s, forever: 17 000 starts a day and their log lines on an SD
    card. Under systemd it now says why in `systemctl status` and waits a minute first; SIGTERM
    (systemctl stop) still ends it at once. A TLS file missing (found later in the start, by
    the MQTT client) skipped the wait and named no file."""
    import socket
    import time

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    config = tmp_path / "c.toml"
    if missing == "model":
        config.write_text(f'model = "{tmp_path / "missing.bundle"}"\n')
        named = "missing.bundle"
    else:
        config.write_text(f'model = "{DEMO_BUNDLE}"\ndata_dir = "{tmp_path / "data"}"\n'
                          '[mqtt]\nhost = "127.0.0.1"\n[mqtt.tls]\nenabled = true\n'
                          f'ca_file = "{tmp_path / "ca.crt"}"\n')  # fmt: skip
        named = f"mqtt.tls.ca_file {tmp_path / 'ca.crt'}: not found"
    proc = daemon("run", "--config", str(config), env={"NOTIFY_SOCKET": str(sock_path)})
    try:
        status = sock.recv(1024).decode()
        assert status.startswith("STATUS=cannot start:") and named in status, status
        assert "starting again in 60 s" in status
        time.sleep(1)  # the wait itself: still there a second after saying why
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == -signal.SIGTERM
    finally:
        proc.kill()
        sock.close()


def test_a_slow_block_is_not_taken_for_a_stalled_microphone(tmp_path: Path) -> None:
    """The stall clock started when a block arrived: a block whose processing took longer
    than stall_seconds (the refit at a learning period's end, on a Pi) raised a false
    `fault:stalled`, split the open anomaly with `audio_gap` and reset the windowing."""
    import time

    from conftest import DEMO_CLIP
    from detector_helpers import Recorder

    from edge.audio_io import read_audio
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings

    rate = 16000
    audio = read_audio(DEMO_CLIP, rate)
    slept: list[float] = []

    def slow_once(step: object) -> None:  # slow work inside feed()
        if not slept:
            slept.append(time.monotonic())
            time.sleep(0.8)

    settings = Settings(
        device_id="u",
        model=DEMO_BUNDLE,
        data_dir=tmp_path,
        clips={"enabled": False},
        health={"stall_seconds": 0.5},
    )
    reports = Recorder()
    d = Detector(settings, load_bundle(DEMO_BUNDLE), [reports], on_step=slow_once)

    class Microphone:  # its blocks were queued meanwhile, as the capture queue holds them
        paced, latency_s = True, 10.0

        def __iter__(self):  # type: ignore[no-untyped-def]
            for i in range(0, len(audio), rate // 10):
                yield audio[i : i + rate // 10]

    d.run(Microphone())
    assert slept, "a window was scored"
    assert [h.change for h in reports.healths if h.change] == [], "no stall"
    assert "audio_gap" not in [e.ended_by for e in reports.events]


def test_a_mute_begun_before_the_clock_was_set_survives_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Pi without a real-time clock boots at fake-hwclock's stale time; a mute set then was
    saved with that start, and after NTP moved the clock days forward a restart took the mute
    for long over. An expired one was "restored until 1970"."""
    import logging

    from detector_helpers import Recorder

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings

    settings = Settings(
        device_id="u", model=DEMO_BUNDLE, data_dir=tmp_path, clips={"enabled": False}
    )
    now = {"t": 1_700_000_000.0}  # the stale boot time

    def detector() -> Detector:
        return Detector(
            settings, load_bundle(DEMO_BUNDLE), [Recorder()], clock=lambda: now["t"], persist=True
        )

    d = detector()
    d.mute(60)
    now["t"] += 3 * 86400  # NTP sets the clock three days forward
    d.finish()  # systemctl restart
    assert detector().muted, "the mute had barely begun"

    d = detector()
    d.mute(1)
    d.finish()
    now["t"] += 3600  # the daemon was down for an hour: the 1-min mute is over
    caplog.set_level(logging.INFO, logger="edge.daemon")
    assert not detector().muted
    assert not [r for r in caplog.records if "mute restored" in r.getMessage()]


def test_an_interrupted_event_never_ends_before_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At boot a Pi without a real-time clock runs at fake-hwclock's last save, which may lie
    before an event the power cut left open: its `end` said it ended before it started."""
    from detector_helpers import Recorder

    import edge.service
    from edge.eventlog import EventLogSink, read_events
    from edge.messages import EventMessage, iso

    start = 1_767_268_800.0
    EventLogSink(tmp_path).event(
        EventMessage(type="start", event_id="e" * 32, device_id="u", model="m",
                     started_at=iso(start), peak_score=3.0, threshold=1.0, stream_offset_s=6.5)
    )  # fmt: skip
    monkeypatch.setattr(edge.service.time, "time", lambda: start - 900.0)
    reports = Recorder()
    assert edge.service.end_interrupted(read_events(tmp_path), [reports]) == 1
    (end,) = reports.events
    assert end.type == "end" and end.ended_at >= end.started_at and end.duration_s == 0.0
    assert end.stream_offset_s is None  # where it ended was not heard: not the start's 6.5


def test_the_start_keeps_of_the_event_log_only_what_it_needs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The daemon read the whole event log (up to 8 MB: 25 MB of objects) to re-publish the
    last event and end the ones left open, and held it for the whole run (in a review). It
    keeps those alone, oldest first."""
    import edge.service
    from edge.eventlog import EventLogSink
    from edge.messages import EventMessage, iso

    sink, start = EventLogSink(tmp_path), 1_767_268_800.0

    def message(i: int, kind: str) -> EventMessage:
        ended = {"ended_at": iso(start + 60 * i + 5), "duration_s": 5.0} if kind == "end" else {}
        return EventMessage(type=kind, event_id=f"{i:032x}", device_id="u", model="m",
                            started_at=iso(start + 60 * i), peak_score=3.0, threshold=1.0,
                            **ended)  # fmt: skip

    for i in range(300):
        sink.event(message(i, "start"))
        if i not in (7, 299):  # 7 was left open by a power cut, 299 is open now
            sink.event(message(i, "end"))
    kept = edge.service._logged_events(tmp_path, "u")
    assert [e.data["event_id"] for e in kept] == [f"{7:032x}", f"{299:032x}"]
    sink.event(message(299, "end"))
    kept = edge.service._logged_events(tmp_path, "u")
    assert [e.data["event_id"] for e in kept] == [f"{7:032x}", f"{299:032x}"]
    assert kept[-1].status != "open"  # the last, ended: re-published, not ended again
    # logged after a reboot whose clock was behind: the last by the log's order, not by its
    # stamp (the retained last_event went back to an older event at every start, in a review)
    early = EventMessage(type="end", event_id=f"{300:032x}", device_id="u", model="m",
                         started_at=iso(start - 86400), peak_score=3.0, threshold=1.0,
                         ended_at=iso(start - 86395), duration_s=5.0)  # fmt: skip
    sink.event(early)
    kept = edge.service._logged_events(tmp_path, "u")
    assert kept[-1].data["event_id"] == f"{300:032x}"
    # another id's event, logged last and left open (a replay under its own id, killed): the
    # device neither re-publishes it as its own last event nor ends it (a field review)
    other = EventMessage(type="start", event_id=f"{301:032x}", device_id="v", model="m2",
                         started_at=iso(start + 9e4), peak_score=3.0, threshold=1.0)  # fmt: skip
    sink.event(other)
    caplog.clear()
    kept = edge.service._logged_events(tmp_path, "u")
    assert [e.data["event_id"] for e in kept] == [f"{7:032x}", f"{300:032x}"]
    assert "events left open by device id v, not ended by u" in caplog.text  # said, not done
    assert [e.data["event_id"] for e in edge.service._logged_events(tmp_path, "v")] == [
        f"{301:032x}"
    ]


@pytest.mark.parametrize("step_s", [3600.0, -3600.0])
def test_every_message_of_an_event_keeps_its_started_at_when_the_clock_is_set(
    tmp_path: Path, step_s: float
) -> None:
    """`started_at` was recomputed for every message from the stream's anchor to the clock,
    which moves when NTP sets the clock (or dropped audio is caught up): the updates and the
    end of an event named another start than its `start` did."""
    from conftest import DEMO_CLIP
    from detector_helpers import Recorder

    from edge.audio_io import read_audio
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings

    rate = 16000
    clip = read_audio(DEMO_CLIP, rate)
    audio = np.concatenate([clip[int(5.5 * rate) : int(10.5 * rate)]] * 4)  # 20 s of fault
    now = {"t": 1_000_000.0}

    class Microphone:
        paced, latency_s = True, 10.0

        def __iter__(self):  # type: ignore[no-untyped-def]
            for i in range(0, len(audio), 1600):
                heard = (i + 1600) / rate
                now["t"] = 1_000_000.0 + heard + (step_s if heard > 8 else 0.0)  # NTP at 8 s
                yield audio[i : i + 1600]

    settings = Settings(device_id="u", model=DEMO_BUNDLE, data_dir=tmp_path,
                        clips={"enabled": False}, detector={"update_seconds": 3})  # fmt: skip
    reports = Recorder()
    Detector(settings, load_bundle(DEMO_BUNDLE), [reports], clock=lambda: now["t"]).run(
        Microphone()
    )
    assert len({e.event_id for e in reports.events}) == 1, "one event"
    kinds = [e.type for e in reports.events]
    assert kinds[0] == "start" and "update" in kinds and kinds[-1] == "end", kinds
    assert len({e.started_at for e in reports.events}) == 1, [e.started_at for e in reports.events]
    end = reports.events[-1]
    assert end.ended_at >= end.started_at, "never ends before it started"


def test_a_second_soundsentry_on_the_same_data_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    """Two daemons (or a replay beside the service) on one data_dir overwrote each other's
    state, spool, model versions and learning period; nothing said so."""
    from conftest import DEMO_CLIP, cli

    from edge.service import hold_data_dir

    env = {"SOUNDSENTRY_DATA_DIR": str(tmp_path / "data")}
    held = hold_data_dir(tmp_path / "data")  # the service, as it runs
    try:
        proc = cli("replay", str(DEMO_BUNDLE), str(DEMO_CLIP), env=env, check=False)
    finally:
        os.close(held)
    assert proc.returncode != 0 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert f"is in use by another soundsentry (pid {os.getpid()}, `" in line, proc.stderr
    assert "pytest" in line  # who holds it, by its command line (the two-machines review)
    again = cli("replay", str(DEMO_BUNDLE), str(DEMO_CLIP), env=env)
    assert '"type": "start"' in again.stdout or '"type":"start"' in again.stdout


def test_a_data_dir_held_by_a_unit_names_the_unit_to_stop(tmp_path: Path) -> None:
    """The refusal said `systemctl stop soundsentry` whoever held the data_dir: an instance,
    or a daemon run by hand (the two-machines review). The unit is read from its cgroup."""
    from edge.service import _holder

    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text("0::/system.slice/soundsentry@pump-3.service\n")
    (tmp_path / "42" / "cmdline").write_bytes(b"/opt/soundsentry/venv/bin/soundsentry\0run\0")
    assert _holder("42", tmp_path) == (
        ", the service soundsentry@pump-3.service",
        " (`systemctl stop soundsentry@pump-3.service`)",
    )
    (tmp_path / "42" / "cgroup").write_text("0::/user.slice/user-1000.slice/session-3.scope\n")
    assert _holder("42", tmp_path) == (", `/opt/soundsentry/venv/bin/soundsentry run`", "")
    assert _holder("43", tmp_path) == ("", "") and _holder("?", tmp_path) == ("", "")


def test_no_window_joins_the_two_sides_of_lost_audio_and_a_reopen_ends_the_event(
    tmp_path: Path,
) -> None:
    """The capture's reopen and its dropped blocks were never passed on: windows joined audio
    from both sides of the gap, and an event stayed open across a reopened device."""
    from conftest import DEMO_CLIP
    from detector_helpers import Recorder

    from edge.audio_io import read_audio
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings
    from edge.sources import AudioGap

    rate = 16000
    fault = read_audio(DEMO_CLIP, rate)[int(5.5 * rate) : int(10.5 * rate)]
    settings = Settings(device_id="u", model=DEMO_BUNDLE, data_dir=tmp_path,
                        clips={"enabled": False}, detector={"cooldown_seconds": 0})  # fmt: skip
    steps, reports = [], Recorder()
    d = Detector(settings, load_bundle(DEMO_BUNDLE), [reports], on_step=steps.append)

    def blocks(audio: np.ndarray):  # type: ignore[no-untyped-def]
        for i in range(0, len(audio), rate // 10):
            yield audio[i : i + rate // 10]

    def source():  # type: ignore[no-untyped-def]
        yield from blocks(fault[: int(0.75 * rate)])
        yield AudioGap()  # blocks dropped at 0.75 s
        yield from blocks(fault)
        yield AudioGap(reopened=True)  # the device reopened at 5.75 s, in the event
        yield from blocks(np.concatenate([fault, fault]))

    d.run(source())
    for gap_s in (0.75, 5.75):
        across = [(s.start_s, s.end_s) for s in steps if s.start_s < gap_s < s.end_s]
        assert across == [], f"windows across the gap at {gap_s} s: {across}"
    ends = [e.ended_by for e in reports.events if e.type == "end"]
    assert ends[0] == "audio_gap", ends
    starts = [e.stream_offset_s for e in reports.events if e.type == "start"]
    assert len(starts) == 2 and starts[1] >= 5.75 + 5.0, "the settle time after the reopen"


def test_a_spool_that_cannot_be_read_gives_its_last_figures_and_does_not_stop_the_monitor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The metrics and the status read the spool's depth every minute, outside any handler:
    an I/O error of a failing card there ended the running daemon. Now they get the last
    figures read, and the error is logged once."""
    from edge.spool import Spool

    spool = Spool(tmp_path / "spool.sqlite")
    spool.append("t", "x")
    spool.append("t", "y")
    assert spool.stats() == (2, 0)
    spool._db.close()  # every statement now raises sqlite3.ProgrammingError, an sqlite3.Error
    with caplog.at_level("ERROR", logger="edge.spool"):
        assert spool.stats() == (2, 0)
        assert spool.stats() == (2, 0)
    assert len([r for r in caplog.records if "cannot be read" in r.getMessage()]) == 1


@pytest.fixture
def read_only_card(tmp_path: Path) -> Iterator[Path]:
    """A data folder on a real file system that is then remounted read-only, as the kernel
    does to an SD card after I/O errors (a tmpfs: needs root, which CI has)."""
    mnt = tmp_path / "card"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_data_dir_on_a_read_only_card_detects_and_says_it_saves_nothing(
    read_only_card: Path,
) -> None:
    """An SD card the kernel remounted read-only: taking data_dir's lock failed (`.lock` opened
    for writing), the service exited and restarted every 5 s, deaf, though nothing else at the
    start needs a write (the spool falls back to memory). Now it runs, says so once, and its
    events still come out."""
    from conftest import DEMO_CLIP, cli

    env = {"SOUNDSENTRY_DATA_DIR": str(read_only_card / "data")}
    cli("replay", str(DEMO_BUNDLE), str(DEMO_CLIP), env=env)  # a card that once worked
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_card)], check=True)
    proc = cli("replay", str(DEMO_BUNDLE), str(DEMO_CLIP), env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "read-only file system: this run detects and publishes but saves nothing" in proc.stderr
    assert '"type": "start"' in proc.stdout or '"type":"start"' in proc.stdout
    # its clip is refused for what it is, not "the disk is nearly full" (a power-loss review)
    assert "could not save evidence clip" in proc.stderr, proc.stderr
    assert ": the card is read-only (the kernel makes it so after I/O errors" in proc.stderr
    assert "nearly full" not in proc.stderr


def test_an_unusable_version_on_a_read_only_card_starts_the_configured_model(
    read_only_card: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The active version would not load (its folder gone), and recording the switch back to
    the configured model raised the read-only card's OSError out of the start: a restart
    loop. Now this run uses the configured model and says it could not record that."""
    from conftest import ANOMALOUS_FILE
    from detector_helpers import Recorder

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings
    from edge.sources import FileSource

    data = read_only_card / "data"
    (data / "models").mkdir(parents=True)
    entry = {"version": 1, "path": str(data / "models" / "gone.bundle"), "reason": "learning",
             "base": str(DEMO_BUNDLE)}  # fmt: skip
    (data / "models" / "history.json").write_text(json.dumps({"entries": [entry], "active": 1}))
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_card)], check=True)
    settings = Settings(device_id="ro", model=DEMO_BUNDLE, data_dir=data,
                        clips={"enabled": False})  # fmt: skip
    reports = Recorder()
    with caplog.at_level(logging.ERROR):
        detector = Detector(settings, load_bundle(DEMO_BUNDLE), [reports], persist=True)
    assert "version 1 unusable, using the configured model" in caplog.text, caplog.text
    assert "could not record the switch to the configured model" in caplog.text, caplog.text
    assert detector.bundle.model_id == "fan-demo-12483c73"
    detector.run(FileSource([ANOMALOUS_FILE], 16000))
    assert [e.type for e in reports.events][:1] == ["start"]


def test_the_event_log_is_on_the_card_before_the_daemon_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start and end lines sat in the page cache: a power cut seconds after a start (a
    fault that trips the supply the Pi shares) lost the line, so no `interrupted` end was ever
    sent for an alarm the broker already had. Each line is fsynced (two per event)."""
    from edge.eventlog import EventLog
    from edge.messages import EventMessage

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    log = EventLog(tmp_path)
    for kind in ("start", "update", "end"):
        log.append(EventMessage(type=kind, event_id="e", device_id="d", model="m",  # type: ignore[arg-type]
                                started_at="2026-11-30T08:00:00.000Z", peak_score=3.0,
                                threshold=1.0))  # fmt: skip
    assert len(synced) == 2, "the start and the end; updates are not logged"


def test_root_is_refused_in_the_services_data_folder(tmp_path: Path) -> None:
    """`sudo soundsentry run --config /etc/soundsentry/config.toml` (only root and the service
    read that config) left root's lock, state, spool and event log in the service's folder,
    0600 root: the service could not open them and retried every minute, for good."""
    from conftest import DEMO_CLIP, cli

    if os.geteuid() != 0:
        pytest.skip("needs root, as CI runs")
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 65534, 65534)  # the service's user (nobody here)
    proc = cli("replay", str(DEMO_BUNDLE), str(DEMO_CLIP),
               env={"SOUNDSENTRY_DATA_DIR": str(data)}, check=False)  # fmt: skip
    assert proc.returncode != 0 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert "run this as that user (sudo -u" in line, line
    assert list(data.iterdir()) == [], "nothing of root's left there"


def test_a_closed_stdout_ends_a_replay_but_not_the_devices_daemon(tmp_path: Path) -> None:
    """Under systemd `run` prints its events to the journal's stream; an EPIPE there ended it
    with exit 0, which `Restart=on-failure` does not restart: the detector stayed off."""
    import io

    from conftest import ANOMALOUS_FILE
    from detector_helpers import Recorder

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings
    from edge.sink import JsonLinesSink
    from edge.sources import FileSource

    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    settings = Settings(device_id="p", model=DEMO_BUNDLE, data_dir=tmp_path,
                        clips={"enabled": False})  # fmt: skip
    for live in (True, False):
        reports = Recorder()
        d = Detector(settings, load_bundle(DEMO_BUNDLE), [JsonLinesSink(Closed()), reports],
                     live=live)  # fmt: skip
        if live:
            d.run(FileSource([ANOMALOUS_FILE], 16000))
            assert [e.type for e in reports.events][:1] == ["start"], "it went on detecting"
        else:
            with pytest.raises(BrokenPipeError):
                d.run(FileSource([ANOMALOUS_FILE], 16000))


def test_a_tls_file_that_is_a_folder_is_named(tmp_path: Path) -> None:
    """`ca_file` naming a folder passed the readable check and stopped the start with a bare
    "Is a directory", naming neither key nor path (in a review)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge.broker import configure_auth
    from edge.errors import SettingsError
    from edge.settings import MqttSettings

    settings = MqttSettings(host="127.0.0.1", tls={"enabled": True, "ca_file": tmp_path})
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5)
    with pytest.raises(SettingsError, match=f"^mqtt.tls.ca_file {tmp_path}: a folder, not a file$"):
        configure_auth(client, settings)


def test_a_replay_as_the_device_says_what_it_took_on_from_the_device_s_state(
    tmp_path: Path,
) -> None:
    """`replay` with a device's config takes on the threshold set by command and a running
    mute (it acts as that device), but said so at INFO, which replay does not show: it raised
    no event while its summary showed windows above the threshold (in a review)."""
    import json
    import time

    from conftest import DEMO_CLIP, cli

    from edge.bundle import load_bundle

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    model_id = load_bundle(DEMO_BUNDLE).model_id
    state = {"model": model_id, "threshold": 2.5, "running_seconds": 0,
             "mute": {"started": time.time(), "seconds": 1800, "ran": 0}}  # fmt: skip
    (data / "state.json").write_text(json.dumps(state))
    config = tmp_path / "c.toml"
    config.write_text('device_id = "pump-3"\n[clips]\nenabled = false\n')
    env = {"SOUNDSENTRY_DATA_DIR": str(data)}  # the device's data folder
    proc = cli("replay", "--config", str(config), str(DEMO_BUNDLE), str(DEMO_CLIP), env=env)
    assert "threshold 2.5 restored (set by command)" in proc.stderr, proc.stderr
    assert "mute restored, until" in proc.stderr and "no events until then" in proc.stderr
    assert proc.stdout.strip() == ""  # muted: no event
    # its last line said the fault's windows above the threshold came "in passing" (a review)
    assert "(above while events were held off: a learning period, or a mute)" in proc.stderr, (
        proc.stderr
    )


def test_a_fifo_where_the_state_is_kept_is_set_aside_not_waited_on(tmp_path: Path) -> None:
    """state.json and models/history.json were opened as they came: a FIFO there (left by
    the service's account, or a tool) hung the start in open() for good (the security
    review). Anything but a regular file is set aside as a damaged one is, and the run goes
    on afresh."""
    from conftest import DEMO_CLIP, cli

    data = tmp_path / "data"
    (data / "models").mkdir(parents=True, mode=0o700)
    os.mkfifo(data / "state.json", 0o600)
    os.mkfifo(data / "models" / "history.json", 0o600)
    env = {"SOUNDSENTRY_DATA_DIR": str(data)}
    proc = cli("replay", str(DEMO_BUNDLE), str(DEMO_CLIP), env=env, timeout=120)
    for name in ("state.json", "history.json"):
        assert f"{name} unreadable, starting afresh (kept as {name}.damaged-" in proc.stderr, (
            proc.stderr
        )
    assert '"type": "start"' in proc.stdout or '"type":"start"' in proc.stdout


def test_an_interrupted_end_of_a_start_stamped_1970_says_its_times_are_not_to_be_trusted(
    tmp_path: Path,
) -> None:
    """A start sent before NTP set the clock (1970) and left open by a power cut was ended at
    the next start with a duration of 56 years, as if it were true (a clock review)."""
    import time

    from detector_helpers import Recorder

    import edge.service
    from edge.eventlog import EventLogSink, read_events
    from edge.messages import EventMessage, iso

    for eid, at in (("a" * 32, 3600.0), ("b" * 32, time.time() - 60)):
        EventLogSink(tmp_path).event(
            EventMessage(type="start", event_id=eid, device_id="u", model="m",
                         started_at=iso(at), peak_score=3.0, threshold=1.0)
        )  # fmt: skip
    reports = Recorder()
    assert edge.service.end_interrupted(read_events(tmp_path), [reports]) == 2
    early, recent = reports.events
    assert early.started_at.startswith("1970-") and early.clock_unset is True
    assert recent.clock_unset is None and 55 < recent.duration_s < 600


def test_an_event_whose_end_line_was_torn_keeps_its_clip(tmp_path: Path) -> None:
    """The end goes to MQTT's spool, then to the event log: a power cut between the two (or a
    torn last line) left the event open in the log, and the start sent a second end, with no
    clip, though the clip was on the card (in a review). The clip is found by its name."""
    from detector_helpers import Recorder

    import edge.service
    from edge.eventlog import EventLogSink, read_events
    from edge.messages import EventMessage, iso

    start = 1_767_268_800.0
    eid = "ab12" * 8
    EventLogSink(tmp_path).event(
        EventMessage(type="start", event_id=eid, device_id="u", model="m",
                     started_at=iso(start), peak_score=3.0, threshold=1.0)
    )  # fmt: skip
    clips = tmp_path / "clips"
    clips.mkdir()
    clip = clips / f"20260101T120000Z-{eid[:12]}.wav"
    sf.write(clip, np.zeros(16000 * 3, np.float32), 16000, subtype="PCM_16")
    reports = Recorder()
    assert edge.service.end_interrupted(read_events(tmp_path), [reports], clips) == 1
    (end,) = reports.events
    assert end.clip == clip.name and end.clip_seconds == 3.0 and end.interrupted


def test_a_password_without_a_user_name_is_said_not_dropped_in_silence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """MQTT sends a password only with a user name: one set alone (or the unit's credential)
    was dropped without a word, and the broker's "Not authorized" was all a user saw (in a
    review). Said, not refused: a config with MQTT off or an anonymous broker keeps running."""
    from paho.mqtt.enums import CallbackAPIVersion

    from edge.broker import configure_auth
    from edge.settings import MqttSettings

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text("from-systemd\n")
    cases = [
        ({"password": "pw"}, None, True),
        ({}, creds, True),  # the shipped unit's LoadCredential
        ({"username": "pump", "password": "pw"}, None, False),
        ({}, None, False),
    ]
    for given, cred_dir, said in cases:
        if cred_dir is None:
            monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
        else:
            monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(cred_dir))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edge.broker"):
            client = mqtt.Client(CallbackAPIVersion.VERSION2)
            configure_auth(client, MqttSettings(host="h", **given))
        warned = [r.getMessage() for r in caplog.records if "no [mqtt] username" in r.getMessage()]
        assert bool(warned) == said, (given, cred_dir, warned)


def test_a_port_that_never_answers_the_connect_is_named_at_the_start(tmp_path: Path) -> None:
    """A port that takes the TCP connection and never answers the MQTT CONNECT (an HTTP server,
    a TLS port with [mqtt.tls] off) was "no answer yet" for as long as a replay ran (a
    review): the start asks the network and says what it found."""
    from conftest import DEMO_CLIP, SOUNDSENTRY

    silent = socket.socket()  # listening, never accepting: the kernel completes the handshake
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        proc = subprocess.run(
            [*SOUNDSENTRY, "replay", str(DEMO_BUNDLE), str(DEMO_CLIP), "--mqtt-host", "127.0.0.1",
             "--mqtt-port", str(port)],
            capture_output=True, text=True, timeout=120, env={**os.environ,
            "SOUNDSENTRY_DATA_DIR": str(tmp_path / "data")},
        )  # fmt: skip
    finally:
        silent.close()
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "MQTT: no connection to" in line]
    assert said and "no answer yet" not in said[0], proc.stderr
    assert "it takes TCP connections: the MQTT handshake failed: a TLS port?" in said[0], said
