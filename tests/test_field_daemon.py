"""The field daemon with real parts: broker outages, kill -9, a vanishing microphone, TLS and
passwords, remote commands, systemd notifications, Home Assistant discovery."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import (
    AE_BUNDLE,
    DEMO_BUNDLE,
    DEMO_CLIP,
    NORMAL_FILES,
    ROOT,
    SOUNDSENTRY,
    Broker,
    describe_pulse,
    free_port,
    pulse_servers,
    stop_pulse,
    wait_for,
)
from jsonschema import Draft202012Validator
from mqtt_helpers import Received, Subscriber

from edge.audio_io import read_audio
from edge.bundle import load_bundle
from edge.discovery import discovery_configs
from edge.topics import Topics

pytestmark = pytest.mark.slow
RATE = 16000
SCHEMAS = ROOT / "edge" / "schemas"


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((SCHEMAS / f"{name}.schema.json").read_text()))


def faulty_audio(path: Path, faults: int) -> Path:
    """Normal fan, then `faults` times (fault, normal): cut from the demo clip."""
    clip = read_audio(DEMO_CLIP, RATE)
    normal, fault = clip[: int(4.5 * RATE)], clip[int(5.5 * RATE) : int(10.5 * RATE)]
    parts = [normal]
    for _ in range(faults):
        parts += [fault, normal]
    sf.write(path, np.concatenate(parts), RATE, subtype="PCM_16")
    return path


def write_config(tmp_path: Path, device: str, port: int, extra: str = "", mqtt: str = "") -> Path:
    path = tmp_path / f"{device}.toml"
    path.write_text(
        f'device_id = "{device}"\ndata_dir = "{tmp_path / "data"}"\n{extra}\n'
        f"[detector]\ncooldown_seconds = 0\nupdate_seconds = 2\n"
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nreconnect_max_seconds = 2\n'
        f"metrics_interval_seconds = 1\n{mqtt}"
    )
    return path


STOPPED_REPLAY = 130
"""The exit of a replay stopped by SIGTERM before its audio ended: a clean stop, as `record`'s."""


def daemon(
    *args: str,
    env: dict[str, str] | None = None,
    stdout: Path | None = None,
    stderr: Path | None = None,
) -> subprocess.Popen[str]:
    """The real command; data_dir comes from the test's config file, not the environment.
    Its events (stdout) and log (stderr) go to pipes, or to files a test watches as it runs."""
    base = {k: v for k, v in os.environ.items() if k != "SOUNDSENTRY_DATA_DIR"}
    files = [path.open("w") if path else None for path in (stdout, stderr)]
    try:
        return subprocess.Popen(
            [*SOUNDSENTRY, "--log-level", "INFO", *args],
            cwd=ROOT,
            stdout=files[0] or subprocess.PIPE,
            stderr=files[1] or subprocess.PIPE,
            text=True,
            env={**base, **(env or {})},
        )
    finally:
        for f in files:
            if f:
                f.close()  # the daemon holds its own copy


def spooled(tmp_path: Path, device: str, kind: str = "events") -> list[dict]:
    """Messages (`events`, `health`) waiting in a daemon's on-disk spool for a broker's ack."""
    path = tmp_path / "data" / f"spool-{device}.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute(
            "SELECT payload FROM outbox WHERE topic LIKE ? ORDER BY id", (f"%/{kind}",)
        ).fetchall()
    except sqlite3.OperationalError:  # the daemon has not created its table yet
        return []
    finally:
        db.close()
    return [json.loads(r[0]) for r in rows]


def transitions(sub: Subscriber) -> set[tuple[str, str]]:
    return {
        (m.json()["event_id"], m.json()["type"])
        for m in sub.on("/events")
        if m.json()["type"] in ("start", "end")
    }


def printed(stdout: str) -> set[tuple[str, str]]:
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {(e["event_id"], e["type"]) for e in events if e["type"] in ("start", "end")}


def test_broker_outage_loses_no_event(broker: Broker, tmp_path: Path) -> None:
    audio = faulty_audio(tmp_path / "faults.wav", faults=3)
    sub = Subscriber(broker.port, "soundsentry/outage/events", client_id="alerts", clean=False)
    proc = daemon(
        "replay",
        str(DEMO_BUNDLE),
        str(audio),
        "--realtime",
        "--config",
        str(write_config(tmp_path, "outage", broker.port)),
    )
    try:
        assert sub.wait_for(lambda ms: len(ms) >= 1, timeout=60), "no event before the outage"
        broker.stop()
        before = {m.json()["event_id"] for m in sub.on("/events")}

        def raised_while_away() -> set[str]:
            """Anomalies that began and ended during the outage, held in the spool."""
            kinds: dict[str, set[str]] = {}
            for e in spooled(tmp_path, "outage"):
                kinds.setdefault(e["event_id"], set()).add(e["type"])
            return {i for i, k in kinds.items() if i not in before and {"start", "end"} <= k}

        during = wait_for(
            raised_while_away,
            60,
            "a whole anomaly (start and end) spooled while the broker is away",
            lambda: (spooled(tmp_path, "outage"), proc.poll()),
        )
        broker.start()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        expected = printed(out)
        assert len(expected) >= 6, out  # before, during and after the outage
        assert {(i, k) for i in during for k in ("start", "end")} <= expected
        assert sub.wait_for(lambda ms: transitions(sub) >= expected, timeout=30), (
            expected - transitions(sub),
            err,
        )
        assert transitions(sub) == expected
    finally:
        proc.kill()
        sub.close()


def test_kill_9_with_events_in_the_spool_delivers_them_after_restart(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, "crashy", port)
    audio = faulty_audio(tmp_path / "one.wav", faults=1)
    proc = daemon("replay", str(DEMO_BUNDLE), str(audio), "--realtime", "--config", str(cfg))
    lines = []
    try:  # no broker: events go to the spool
        while not any('"end"' in line for line in lines):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    spooled = printed("".join(lines))
    assert len(spooled) == 2
    broker = Broker(tmp_path, port)
    broker.start()
    sub = Subscriber(port, "soundsentry/crashy/events")
    try:
        again = daemon("replay", str(DEMO_BUNDLE), str(NORMAL_FILES[0]), "--config", str(cfg))
        _, err = again.communicate(timeout=60)
        assert again.returncode == 0, err
        assert sub.wait_for(lambda ms: transitions(sub) >= spooled, timeout=20), err
        kinds = [m.json()["type"] for m in sub.on("/events")]
        assert (
            kinds[0] == "start" and kinds[-1] == "end" and set(kinds) <= {"start", "update", "end"}
        )
    finally:
        sub.close()
        broker.stop()


def test_commands_threshold_reload_mute_status_and_sigterm(broker: Broker, tmp_path: Path) -> None:
    audio = faulty_audio(tmp_path / "long.wav", faults=4)
    broken = tmp_path / "data" / "models" / "broken.bundle"  # where reload_model may load from
    shutil.copytree(AE_BUNDLE, broken)
    (broken / "model_int8.tflite").write_bytes(b"\0" * 64)
    sub = Subscriber(broker.port, "soundsentry/ctl/#")
    proc = daemon(
        "replay",
        str(DEMO_BUNDLE),
        str(audio),
        "--realtime",
        "--config",
        str(write_config(tmp_path, "ctl", broker.port, extra="state_interval_seconds = 1")),
    )
    responses = validator("response")

    def send(payload: str) -> dict:
        before = len(sub.on("/response"))
        sub.client.publish("soundsentry/ctl/set", payload, qos=1)
        assert sub.wait_for(lambda _: len(sub.on("/response")) > before, timeout=10), payload
        reply = sub.on("/response")[-1].json()
        responses.validate(reply)
        return reply

    def muted_states() -> list[dict]:
        return [s for s in (m.json() for m in sub.on("/state")[muted_at:]) if s["state"] == "muted"]

    def fault_passed_while_muted() -> bool:
        """Fault windows scored above the threshold while muted, then normal ones again."""
        above = [s["score"] > s["threshold"] for s in muted_states() if s.get("score") is not None]
        return above.count(True) >= 2 and above[-2:] == [False, False]

    try:
        assert sub.wait_for(lambda ms: any(m.payload == "online" for m in ms), timeout=60)
        assert send('{"command": "status"}')["ok"]  # commands sent after `online` are heard
        assert "not JSON" in send("{oops")["detail"]
        assert send('{"command": "launch"}')["ok"] is False
        calibrated = json.loads((DEMO_BUNDLE / "manifest.json").read_text())["threshold"]["value"]
        reply = send(json.dumps({"command": "set_threshold", "value": calibrated * 100}))
        assert reply["ok"] is False and "within" in reply["detail"]
        reply = send(json.dumps({"command": "reload_model", "path": str(broken), "id": "r1"}))
        assert reply["ok"] is False and "keeping" in reply["detail"] and reply["id"] == "r1"
        status = send('{"command": "status"}')
        assert status["ok"] and status["status"]["threshold"] == pytest.approx(calibrated)
        assert send(json.dumps({"command": "set_threshold", "value": calibrated * 0.9}))["ok"]
        assert send('{"command": "status"}')["status"]["threshold"] == pytest.approx(
            calibrated * 0.9
        )
        muted_at, events_at = len(sub.on("/state")), len(sub.on("/events"))
        assert send('{"command": "mute", "minutes": 5}')["ok"]
        wait_for(
            fault_passed_while_muted,
            30,
            "a fault scored above the threshold and over again, while muted",
            lambda: [(s["score"], s["threshold"]) for s in muted_states()],
        )
        # Muting closes an anomaly that was open, saying so; while muted nothing starts.
        assert [
            (m.json()["type"], m.json().get("ended_by")) for m in sub.on("/events")[events_at:]
        ] in ([], [("end", "muted")])
        assert send('{"command": "unmute"}')["ok"]
        n = len(sub.on("/events"))
        assert sub.wait_for(
            lambda _: any(m.json()["type"] == "start" for m in sub.on("/events")[n:]), timeout=30
        )
        proc.send_signal(signal.SIGTERM)  # during an anomaly
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == STOPPED_REPLAY, err
        assert sub.wait_for(lambda ms: ms[-1].payload == "offline", timeout=10)
        last = [m.json() for m in sub.on("/events")][-1]
        assert last["type"] == "end" and last.get("clip", "").endswith(".wav")
        assert last["ended_by"] == "stopped"
        assert (tmp_path / "data" / "clips" / last["clip"]).exists()
        metrics = [m.json() for m in sub.on("/metrics")]
        assert metrics and validator("metrics").validate(metrics[-1]) is None
        for m in sub.on("/events"):
            validator("event").validate(m.json())
    finally:
        proc.kill()
        sub.close()


def test_systemd_notify_and_home_assistant_birth(broker: Broker, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)  # the daemon's start, on a busy machine
    sub = Subscriber(broker.port, "homeassistant/#")
    proc = daemon(
        "replay",
        str(DEMO_BUNDLE),
        str(DEMO_CLIP),
        "--realtime",
        "--config",
        str(write_config(tmp_path, "ha", broker.port)),
        env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "10000000"},
    )
    try:
        got = [sock.recv(256).decode() for _ in range(2)]
        assert got[0].startswith("READY=1") and got[1] == "WATCHDOG=1"
        # every entity's config, then every one again once Home Assistant says it is back (the
        # demo's bundle learns a mark only after a learning period: no button)
        topics = Topics("soundsentry", "ha")
        want = set(discovery_configs(topics, "m", threshold=1.0, learns=False))

        def configs_since(ms: list[Received], start: int) -> set[str]:
            return {m.topic for m in ms[start:] if m.topic.endswith("/config") and m.payload}

        assert sub.wait_for(lambda ms: configs_since(ms, 0) >= want)
        start = len(sub.messages)
        sub.client.publish("homeassistant/status", "online", qos=1)
        assert sub.wait_for(lambda ms: configs_since(ms, start) >= want, timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == STOPPED_REPLAY
    finally:
        proc.kill()
        sock.close()
        sub.close()


def test_a_client_that_starts_later_sees_the_last_event_and_metrics_at_once(
    broker: Broker, tmp_path: Path
) -> None:
    """Home Assistant restarted for an update subscribes anew: the last event and the trend
    must not read unknown until the next event, which may be months away."""
    config = str(write_config(tmp_path, "late", broker.port))
    proc = daemon("replay", str(DEMO_BUNDLE), str(DEMO_CLIP), "--config", config)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    late = Subscriber(broker.port, "soundsentry/late/#", client_id="late")
    try:
        assert late.wait_for(lambda _: bool(late.on("/last_event") and late.on("/metrics")), 10)
        last, metrics = late.on("/last_event")[-1], late.on("/metrics")[-1]
        assert last.retain and metrics.retain
        assert last.json()["type"] == "end" and validator("event").validate(last.json()) is None
        assert validator("metrics").validate(metrics.json()) is None
        # a replay adds nothing to the device's running hours: they count what its microphone hears
        saved = json.loads((tmp_path / "data" / "state.json").read_text())["running_seconds"]
        assert saved == 0 and metrics.json()["running_hours"] == 0
        event_id = last.json()["event_id"]
        # A broker that lost its retained messages: the next start sends the logged event again.
        late.client.publish(
            "soundsentry/late/last_event", b"", qos=1, retain=True
        ).wait_for_publish(5)
        proc = daemon("replay", str(DEMO_BUNDLE), str(NORMAL_FILES[0]), "--config", config)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        late.close()
    again = Subscriber(broker.port, "soundsentry/late/last_event", client_id="again")
    try:
        assert again.wait_for(lambda ms: bool(ms), 10), "no retained last event after a restart"
        assert again.messages[-1].json()["event_id"] == event_id
        # the very message sent before, `seq` and all: without it the copy from the event log
        # was a new message to Home Assistant's triggers and to Node-RED (in a review)
        assert again.messages[-1].json() == last.json() and last.json()["seq"] >= 1
    finally:
        again.close()


def test_another_device_id_in_the_same_data_folder_gets_none_of_its_event_or_threshold(
    broker: Broker, tmp_path: Path
) -> None:
    """Two device ids in one data folder (a replay under its own id beside the device, or a
    host renamed): the second published the first's last event, its model and device id in
    the payload, as its own retained `last_event`, and restored the threshold the first was
    set to by command (a field review). Each id gets its own; the first's are kept for it."""
    from edge.persist import DeviceState

    one = str(write_config(tmp_path, "one", broker.port))
    two = str(write_config(tmp_path, "two", broker.port))
    proc = daemon("replay", str(DEMO_BUNDLE), str(DEMO_CLIP), "--config", one)
    assert proc.communicate(timeout=60) and proc.returncode == 0
    data = tmp_path / "data"
    model = load_bundle(DEMO_BUNDLE).model_id
    DeviceState(data, "one").save(model, 2.5, None, 0.0)  # as `set_threshold` saves it
    proc = daemon("replay", str(DEMO_BUNDLE), str(NORMAL_FILES[0]), "--config", two)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "threshold 2.5 restored" not in err, err
    assert DeviceState(data, "one").threshold_for(model) == 2.5  # kept for it, not written over
    assert DeviceState(data, "two").threshold_for(model) is None
    sub = Subscriber(broker.port, "soundsentry/#", client_id="after")
    try:
        assert sub.wait_for(lambda _: bool(sub.on("/one/last_event") and sub.on("/two/metrics")))
        assert sub.on("/one/last_event")[-1].json()["device_id"] == "one"
        assert not sub.on("/two/last_event"), sub.on("/two/last_event")[-1].json()
    finally:
        sub.close()


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=SoundSentry test CA",
    )
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        (folder / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return {
        n: folder / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")
    }


def test_a_certificate_refused_by_its_dates_points_at_the_clock(tmp_path: Path) -> None:
    """A Pi's clock before NTP sets it (1970, or fake-hwclock's weeks-old time) refuses the
    broker's certificate as not yet valid, and the hint blamed ca_file and host (a clock
    review). A real TLS server whose certificate's dates the clock refuses (expired here:
    `openssl x509` makes none from the future; not yet valid, code 9, takes the same branch) gets
    the clock's hint."""
    import socketserver
    import ssl
    import threading

    from edge.broker import probe_reason
    from edge.settings import MqttSettings

    certs = make_certificates(tmp_path)
    subprocess.run(
        ["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.crt", "-days", "0", "-extfile", "server.ext"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["server.crt"], certs["server.key"])

    class Handshake(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with contextlib.suppress(ssl.SSLError, OSError):
                context.wrap_socket(self.request, server_side=True).close()

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handshake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        settings = MqttSettings(host="127.0.0.1", port=port,
                                tls={"enabled": True, "ca_file": certs["ca.crt"]})  # fmt: skip

        def refused_for_its_dates() -> tuple[str, str] | None:
            said = probe_reason(settings)
            return said if "expired" in said[0] else None

        said = wait_for(refused_for_its_dates, 10, "the certificate's end (made as it ends)")
    finally:
        server.shutdown()
        server.server_close()
    why, check = said
    assert why.startswith("TLS: the broker's certificate is refused: certificate has expired, "
                          "by this machine's clock ("), why  # fmt: skip
    assert "is the clock right?" in check and "ca_file" not in check, check


def test_tls_and_password_and_wrong_credentials(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    pwfile = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(pwfile), "pump", "s3cret-pw"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    broker = Broker(tmp_path, port, extra_conf="")
    broker.conf.write_text(
        f"listener {port} 127.0.0.1\nuser root\nallow_anonymous false\n"
        f"password_file {pwfile}\ncafile {certs['ca.crt']}\ncertfile {certs['server.crt']}\n"
        f"keyfile {certs['server.key']}\nrequire_certificate true\n"
        f"log_dest file {tmp_path / 'broker.log'}\nlog_type all\n"
    )
    broker.start()
    good, bad = tmp_path / "good-pw", tmp_path / "bad-pw"
    good.write_text("s3cret-pw\n")
    bad.write_text("wrong-pw\n")
    tls = (
        f'username = "pump"\npassword_file = "{{pw}}"\n[mqtt.tls]\nenabled = true\n'
        f'ca_file = "{certs["ca.crt"]}"\ncert_file = "{certs["client.crt"]}"\n'
        f'key_file = "{certs["client.key"]}"\n'
    )
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    seen: list[str] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="watcher")
    watcher.username_pw_set("pump", "s3cret-pw")
    watcher.tls_set(
        ca_certs=str(certs["ca.crt"]),
        certfile=str(certs["client.crt"]),
        keyfile=str(certs["client.key"]),
    )
    watcher.on_connect = lambda c, *_: c.subscribe("soundsentry/#", qos=1)
    watcher.on_message = lambda _c, _u, m: seen.append(f"{m.topic} {m.payload.decode()}")
    watcher.connect("127.0.0.1", port)
    watcher.loop_start()
    try:
        cfg = write_config(tmp_path, "secure", port, mqtt=tls.replace("{pw}", str(good)))
        proc = daemon("replay", str(DEMO_BUNDLE), str(DEMO_CLIP), "--config", str(cfg))
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        wait_for(lambda: any('"type":"end"' in s for s in seen), 10, "the end event", lambda: seen)
        assert "soundsentry/secure/availability online" in seen
        assert any('"type":"start"' in s for s in seen) and any('"type":"end"' in s for s in seen)
        assert "s3cret-pw" not in err

        # why a connection fails, asked of the network: a certificate the system's CAs refuse
        # was "the TLS or MQTT handshake failed; check [mqtt] tls", then "check host and port"
        from edge.broker import probe_reason
        from edge.settings import MqttSettings

        def reason(**tls: object) -> tuple[str, str]:
            files = {k: certs[f] for k, f in (("ca_file", "ca.crt"), ("cert_file", "client.crt"),
                                              ("key_file", "client.key"))}  # fmt: skip
            return probe_reason(MqttSettings(host="127.0.0.1", port=port, tls=files | tls))

        why, check = reason(enabled=True, ca_file=None)  # the system's CAs
        assert why.startswith("TLS: the broker's certificate is refused: "), why
        assert "self-signed certificate" in why and "ca_file" in check, (why, check)
        assert reason(enabled=True)[0] == "TCP and TLS connect: the MQTT handshake failed"
        why, check = reason(enabled=False)
        assert "the MQTT handshake failed" in why and "[mqtt.tls] enabled" in check, check

        cfg = write_config(tmp_path, "intruder", port, mqtt=tls.replace("{pw}", str(bad)))
        proc = daemon(
            "replay", str(DEMO_BUNDLE), str(DEMO_CLIP), "--realtime", "--config", str(cfg)
        )

        def refusals_by_broker() -> int:
            log = (tmp_path / "broker.log").read_text(errors="replace")
            return log.count("not authorised")

        wait_for(
            lambda: (
                proc.poll() is not None
                or (refusals_by_broker() >= 3 and spooled(tmp_path, "intruder", "health"))
            ),
            30,
            "three refusals by the broker (the daemon keeps retrying) and the daemon running "
            "(its first health report waiting in the spool)",
            lambda: (refusals_by_broker(), spooled(tmp_path, "intruder", "health")),
        )
        assert proc.poll() is None, "a refused connection must not crash the daemon"
        assert not any(s.startswith("soundsentry/intruder") for s in seen)
        # The operator puts the right password in the file: used without a restart.
        bad.write_text("s3cret-pw\n")
        wait_for(  # within the realtime replay of the 20-s clip; backoff is at most 2 s
            lambda: "soundsentry/intruder/availability online" in seen,
            15,
            "the daemon online with the password now in its file",
            lambda: (proc.poll(), seen[-3:]),
        )
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == STOPPED_REPLAY, err
        refusals = [line for line in err.splitlines() if "MQTT: broker refused" in line]
        assert len(refusals) == 1 and "Not authorized" in refusals[0], err
        assert "check [mqtt] username and password_file" in refusals[0], err  # not all it says
        start = [line for line in err.splitlines() if "MQTT: no connection to" in line]
        assert start and "(the broker refused the connection: Not authorized)" in start[0], err
        assert "cannot reach" not in err  # it was reachable: it said no
        assert "the password changed" in err
        assert "wrong-pw" not in err and "s3cret-pw" not in err  # neither password is logged

        # doctor run by hand, where the service's systemd credential is not visible
        nopw = tls.replace('password_file = "{pw}"\n', "")
        cfg = write_config(tmp_path, "by-hand", port, mqtt=nopw)
        env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
        doctor = subprocess.run(
            [*SOUNDSENTRY, "doctor", "--config", str(cfg)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        login = [x for x in doctor.stdout.splitlines() if "broker login" in x]
        assert login and login[0].startswith("FAIL broker login: refused"), doctor.stdout
        assert "no password reached doctor" in doctor.stdout and "systemd-run" in doctor.stdout
    finally:
        watcher.loop_stop()
        broker.stop()


PA_START = [
    "pulseaudio",
    "--daemonize=yes",
    "--exit-idle-time=-1",
    "-n",
    "--load=module-native-protocol-unix",
    "--load=module-null-sink sink_name=machine rate=16000 channels=1",
    "--load=module-null-sink sink_name=mic2 rate=16000 channels=1",
]


def start_pulse_serving(tmp_path: Path) -> None:
    """PA_START, then wait until the server serves a stream of `mic2.monitor`: in CI a server
    just started once cut the first player's connection ("Connection terminated") and gave
    the daemon's reopened streams no audio for the 30 s the test waited, though `pactl`
    answered; what is tested is the daemon's return to a server that works."""
    subprocess.run(PA_START, check=True, capture_output=True)
    probe = tmp_path / "probe.raw"

    def serving() -> bool:
        probe.unlink(missing_ok=True)
        subprocess.run(
            ["timeout", "1", "parecord", "-d", "mic2.monitor", "--raw", "--rate=16000",
             "--channels=1", "--format=s16le", str(probe)],
            capture_output=True,
        )  # fmt: skip
        return probe.exists() and probe.stat().st_size > 0

    wait_for(serving, 60, "the restarted PulseAudio to serve a stream", describe_pulse)


def restart_pulse(tmp_path: Path) -> None:
    """After a test that took the sound server away: one server, started afresh with the
    sinks the later tests play into and serving, whatever the test left running (a failure
    halfway, or a server that answered with none of the test's sinks, had every later capture
    test fail)."""
    stop_pulse()
    start_pulse_serving(tmp_path)


def test_the_suite_takes_away_only_the_sound_servers_it_started(pulse: str) -> None:
    """The tests that unplug the microphone stop the suite's PulseAudio servers, never another
    one of the user: a desktop's own, or another run's (a new user's walk-through lost theirs
    twice while the suite ran)."""
    runtime = Path(tempfile.mkdtemp(prefix="ss-other-", dir="/tmp"))
    env = {**os.environ, "PULSE_RUNTIME_PATH": str(runtime)}
    subprocess.run(PA_START[:5], check=True, capture_output=True, env=env)
    try:
        wait_for(lambda: (runtime / "pid").exists(), 10, "the other PulseAudio server to start")
        other = int((runtime / "pid").read_text())
        assert other in pulse_servers(runtime=None), "a server of this user, as any"
        assert other not in pulse_servers(), "not one this run's tests may stop"
        assert pulse_servers(), "the suite's own server is this run's"
    finally:
        subprocess.run(["pulseaudio", "--kill"], env=env, capture_output=True)
        wait_for(lambda: not pulse_servers(runtime), 10, "the other PulseAudio server to exit")
        shutil.rmtree(runtime, ignore_errors=True)


def test_microphone_vanishes_and_comes_back(pulse: str, broker: Broker, tmp_path: Path) -> None:
    subprocess.run(
        ["pactl", "load-module", "module-null-sink", "sink_name=mic2", "rate=16000", "channels=1"],
        check=True,
        capture_output=True,
    )
    normal = tmp_path / "normal.wav"
    sf.write(
        normal,
        np.tile(np.concatenate([read_audio(f, RATE) for f in NORMAL_FILES]), 3),
        RATE,
        subtype="PCM_16",
    )
    cfg = write_config(
        tmp_path, "mic2", broker.port, extra="[health]\nstall_seconds = 2\nreopen_max_seconds = 2\n"
    )
    sub = Subscriber(broker.port, "soundsentry/mic2/#")
    players = [subprocess.Popen(["paplay", "-d", "mic2", str(normal)])]
    proc = daemon(
        "run",
        "--model",
        str(DEMO_BUNDLE),
        "--device",
        "pulse",
        "--config",
        str(cfg),
        env={"PULSE_SOURCE": "mic2.monitor"},
        stderr=tmp_path / "daemon.log",
    )

    def health_changes() -> list[str]:
        return [m.json().get("change", "") for m in sub.on("/health")]

    def scored() -> list[tuple[int, float]]:
        return [
            (m["windows_scored"], m["level_dbfs"]) for m in map(Received.json, sub.on("/metrics"))
        ]

    def failed_reopens() -> list[str]:
        lines = (tmp_path / "daemon.log").read_text().splitlines()
        return [line for line in lines if "capture:" in line and "retrying in" in line]

    def seen() -> str:
        return f"{(tmp_path / 'daemon.log').read_text()[-2000:]}\n{describe_pulse()}"

    try:
        assert sub.wait_for(lambda ms: any(m.payload == "online" for m in ms), timeout=60)
        wait_for(
            lambda: any(n >= 2 and level > -60 for n, level in scored()),
            20,
            "windows of the playing machine scored (metrics)",
            scored,
        )
        stop_pulse()  # the microphone disappears
        assert sub.wait_for(lambda _: "fault:stalled" in health_changes(), timeout=20), (
            f"{health_changes()}\n{seen()}"
        )
        wait_for(failed_reopens, 20, "a failed attempt to reopen the vanished device", seen)
        assert proc.poll() is None, "the daemon must survive a vanished device"
        start_pulse_serving(tmp_path)  # ... and comes back
        players.append(subprocess.Popen(["paplay", "-d", "mic2", str(normal)]))
        assert sub.wait_for(lambda _: "recovered:stalled" in health_changes(), timeout=30), (
            f"{health_changes()}\n{seen()}"
        )
        assert sub.on("/health")[-1].json()["status"] == "ok"
        flowing = max(n for n, _ in scored())  # audio flows on, longer than stall_seconds:
        wait_for(lambda: max(n for n, _ in scored()) >= flowing + 8, 20,  # the outage is over
                 "4 s more of windows scored", scored)  # fmt: skip
        first_outage = len(failed_reopens())
        stop_pulse()  # gone again, after audio came
        wait_for(lambda: len(failed_reopens()) > first_outage, 20, "the second outage's retry",
                 seen)  # fmt: skip
        # backoff starts afresh: a working stream resets it (it grew on and on across outages)
        assert failed_reopens()[first_outage].endswith("retrying in 1 s"), failed_reopens()
        start_pulse_serving(tmp_path)
        players.append(subprocess.Popen(["paplay", "-d", "mic2", str(normal)]))
        assert sub.wait_for(
            lambda _: health_changes().count("recovered:stalled") >= 2, timeout=30
        ), f"{health_changes()}\n{seen()}"
        players[-1].kill()  # the machine itself now: normal running, then a fault
        players.append(subprocess.Popen(["paplay", "-d", "mic2", str(DEMO_CLIP)]))
        assert sub.wait_for(
            lambda _: any(m.json()["type"] == "start" for m in sub.on("/events")), timeout=30
        ), f"events must flow again after the recovery\n{seen()}"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        assert proc.returncode == 0, (tmp_path / "daemon.log").read_text()
    finally:
        proc.kill()
        for p in players:
            p.kill()
        sub.close()
        restart_pulse(tmp_path)


def _stalled(sub: Subscriber) -> list[dict]:
    """The `fault:stalled` health messages a daemon published."""
    return [m.json() for m in sub.on("/health") if m.json().get("change") == "fault:stalled"]


def _scored(sub: Subscriber) -> list[int]:
    """`windows_scored` of each metrics message a daemon published."""
    return [m.json()["windows_scored"] for m in sub.on("/metrics")]


def test_microphone_missing_at_start_is_waited_for_and_reported(
    pulse: str, broker: Broker, tmp_path: Path
) -> None:
    """A USB microphone not yet there when the service starts (unplugged, enumerated late):
    the daemon stays up and says why over MQTT, instead of exiting for systemd to restart it
    every few seconds while Home Assistant shows only `offline`; audio then flows by itself.
    systemd hears READY and watchdog pings all along, with the reason in STATUS: a restart for
    a missing microphone only flapped `offline` every two minutes (TimeoutStartSec) or every
    30 s (WatchdogSec). (On a terminal, without systemd, a device that matches nothing is one
    line at once: tests/test_terminal.py.)"""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    stop_pulse()  # no `pulse` device (it may already be gone: a test before failed halfway)
    normal = tmp_path / "normal.wav"
    sf.write(normal, np.tile(read_audio(NORMAL_FILES[0], RATE), 6), RATE, subtype="PCM_16")
    cfg = write_config(
        tmp_path, "late", broker.port, extra="[health]\nstall_seconds = 2\nreopen_max_seconds = 2\n"
    )
    sub = Subscriber(broker.port, "soundsentry/late/#")
    player = None
    log = tmp_path / "daemon.log"
    proc = daemon(
        "run", "--model", str(DEMO_BUNDLE), "--device", "pulse", "--config", str(cfg),
        env={"PULSE_SOURCE": "mic2.monitor", "NOTIFY_SOCKET": str(sock_path)}, stderr=log,
    )  # fmt: skip

    heard: list[str] = []

    def notified() -> list[str]:
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                heard.append(sock.recv(256).decode())
        return heard

    try:
        assert sub.wait_for(lambda _: bool(_stalled(sub)), timeout=30), log.read_text()[-2000:]
        assert proc.poll() is None, log.read_text()[-2000:]
        detail = json.dumps(_stalled(sub)[0])
        assert "'pulse'" in detail, detail  # the cause, not only "no audio"
        assert "waiting for the device" in log.read_text()
        scored = _scored(sub)
        assert scored and all(n == 0 for n in scored), "metrics came, none scored a window"
        wait_for(  # alive while it waits, and systemctl status says why
            lambda: any("STATUS=no audio" in m and "'pulse'" in m for m in notified()),
            10,
            "STATUS naming the missing device",
            notified,
        )
        assert any(m.startswith("READY=1") for m in notified())
        pings = notified().count("WATCHDOG=1")
        wait_for(lambda: notified().count("WATCHDOG=1") > pings, 10, "a watchdog ping", notified)
        start_pulse_serving(tmp_path)  # the microphone arrives
        player = subprocess.Popen(["paplay", "-d", "mic2", str(normal)])
        flowing = sub.wait_for(lambda _: any(n >= 2 for n in _scored(sub)), timeout=40)
        assert flowing, log.read_text()[-2000:]
        health = [m.json().get("change") for m in sub.on("/health")]
        assert "recovered:stalled" in health, health

        def status() -> str:
            return [m for m in notified() if "STATUS=" in m][-1].split("STATUS=")[1]

        wait_for(lambda: status().startswith("listening with"), 10, "STATUS listening", status)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        assert proc.returncode == 0, log.read_text()[-2000:]
    finally:
        proc.kill()
        if player is not None:
            player.kill()
        sub.close()
        sock.close()
        restart_pulse(tmp_path)


def test_a_sound_server_source_missing_at_start_is_waited_for(
    pulse: str, broker: Broker, tmp_path: Path
) -> None:
    """The sound server runs, but the source the daemon is told to read is not there (a USB
    microphone's PulseAudio source while it is unplugged): opening the `pulse` device fails
    whatever the channels, and the service stopped at once with "'pulse' captures neither 1
    channel(s) nor the 32 it offers; set [audio] channels", for systemd to restart it every few
    seconds (fresh-clone CI met it, PulseAudio up where the test above had taken it down). It
    is now waited for like a device that is missing, said on `health`, and audio flows when
    the source comes."""
    normal = tmp_path / "normal.wav"
    sf.write(normal, np.tile(read_audio(NORMAL_FILES[0], RATE), 6), RATE, subtype="PCM_16")
    cfg = write_config(
        tmp_path, "src", broker.port, extra="[health]\nstall_seconds = 2\nreopen_max_seconds = 2\n"
    )
    sub = Subscriber(broker.port, "soundsentry/src/#")
    log = tmp_path / "daemon.log"
    sink = f"mic{os.getpid()}"  # not there until loaded below
    proc = daemon(
        "run", "--model", str(DEMO_BUNDLE), "--device", "pulse", "--config", str(cfg),
        env={"PULSE_SOURCE": f"{sink}.monitor", "NOTIFY_SOCKET": str(tmp_path / "none.sock")},
        stderr=log,
    )  # fmt: skip
    module, player = None, None

    try:
        assert sub.wait_for(lambda _: bool(_stalled(sub)), timeout=30), log.read_text()[-2000:]
        assert proc.poll() is None, log.read_text()[-2000:]
        assert "'pulse' cannot be opened" in json.dumps(_stalled(sub)[0]), _stalled(sub)
        assert "waiting for the device" in log.read_text()
        loaded = subprocess.run(
            ["pactl", "load-module", "module-null-sink", f"sink_name={sink}", "rate=16000",
             "channels=1"], check=True, capture_output=True, text=True,
        )  # fmt: skip
        module = loaded.stdout.strip()
        player = subprocess.Popen(["paplay", "-d", sink, str(normal)])
        flowing = sub.wait_for(lambda _: any(n >= 2 for n in _scored(sub)), timeout=60)
        assert flowing, log.read_text()[-2000:]
        assert "recovered:stalled" in [m.json().get("change") for m in sub.on("/health")]
    finally:
        proc.kill()
        if player is not None:
            player.kill()
        if module:
            subprocess.run(["pactl", "unload-module", module], capture_output=True)
        sub.close()


def test_the_example_broker_config_starts_under_debians_own(tmp_path: Path) -> None:
    """deploy/mosquitto/soundsentry.conf dropped into conf.d of the Debian / Raspberry Pi OS
    package's main config, as its header says: the broker starts, a device logs in over TLS
    and what it publishes reaches a consumer on loopback through the example ACL."""
    main_conf = Path("/etc/mosquitto/mosquitto.conf")  # the Debian package's own
    assert main_conf.is_file(), "mosquitto (Debian package) is not installed"
    etc = tmp_path / "etc" / "mosquitto"
    (etc / "conf.d").mkdir(parents=True)
    (etc / "certs").mkdir()
    (tmp_path / "lib").mkdir()
    certs = make_certificates(etc / "certs")
    tls_port, plain_port = free_port(), free_port()
    ours = (ROOT / "deploy" / "mosquitto" / "soundsentry.conf").read_text()
    assert "listener 8883\n" in ours and "listener 1883 127.0.0.1\n" in ours
    ours = ours.replace("/etc/mosquitto/", f"{etc}/").replace(
        "listener 8883\n", f"listener {tls_port}\n").replace(
        "listener 1883 127.0.0.1\n", f"listener {plain_port} 127.0.0.1\n")  # fmt: skip
    (etc / "conf.d" / "soundsentry.conf").write_text(ours)
    shutil.copy(ROOT / "deploy" / "mosquitto" / "acl", etc / "soundsentry.acl")
    for n, user in enumerate(("pi-01", "consumer")):
        subprocess.run(
            ["mosquitto_passwd", "-b", *(["-c"] if n == 0 else []), str(etc / "passwd"), user,
             f"{user}-pw"],
            check=True, capture_output=True,
        )  # fmt: skip
    debian = main_conf.read_text()
    for path, here in (
        ("/run/mosquitto/mosquitto.pid", str(tmp_path / "mosquitto.pid")),
        ("/var/lib/mosquitto/", f"{tmp_path / 'lib'}/"),
        ("log_dest file /var/log/mosquitto/mosquitto.log", "log_dest stderr"),
        ("/etc/mosquitto/conf.d", str(etc / "conf.d")),
    ):
        assert path in debian, path
        debian = debian.replace(path, here)
    (etc / "mosquitto.conf").write_text("user root\n" + debian)
    log = tmp_path / "mosquitto.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(etc / "mosquitto.conf")],
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip

    def listening() -> bool:
        assert proc.poll() is None, f"mosquitto stopped: {log.read_text()[-1500:]}"
        try:
            for port in (tls_port, plain_port):
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    consumer = None
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pi-01")
    try:
        wait_for(listening, 15, "the broker listening on both ports")
        consumer = Subscriber(plain_port, "soundsentry/#", login=("consumer", "consumer-pw"))
        device.username_pw_set("pi-01", "pi-01-pw")
        device.tls_set(ca_certs=str(certs["ca.crt"]))
        device.connect("127.0.0.1", tls_port)
        device.loop_start()
        device.publish("soundsentry/pi-01/events", '{"type": "start"}', qos=1).wait_for_publish(10)
        assert consumer.wait_for(lambda ms: bool(ms), timeout=10), log.read_text()[-1500:]
        assert consumer.messages[0].topic == "soundsentry/pi-01/events"
    finally:
        device.loop_stop()
        if consumer is not None:
            consumer.close()
        proc.terminate()
        proc.wait(10)


def test_a_sound_server_source_that_comes_back_is_taken_at_the_next_retry(
    pulse: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PulseAudio source gone for a while and back (no new device in /dev/snd, no new server
    socket): PortAudio lists `pulse` throughout, only opening it fails. Between the rescans at
    the 1st, 2nd, 4th, 8th ... retry the capture kept the failure without trying, so a source
    back after the 4th retry was taken at the 8th: 55 to 79 s late in a field test, up to ten
    minutes after a long outage. Now it is tried again at every retry."""
    import edge.capture
    from edge.capture import MicSource
    from edge.settings import AudioSettings

    monkeypatch.setattr(edge.capture, "REOPEN_MIN_S", 0.1)
    # PortAudio as a daemon started beside a running sound server sees it: this process may
    # have initialised it while an earlier test had the server down (no `pulse` then)
    sd = edge.capture.sounddevice_module()
    sd._terminate()
    sd._initialize()
    sink = f"back{os.getpid()}"
    monkeypatch.setenv("PULSE_SOURCE", f"{sink}.monitor")  # not there until loaded below
    source = MicSource(AudioSettings(device="pulse"), RATE, stall_s=2, reopen_max_s=0.2, wait=True)
    assert source.problem and "cannot be opened" in source.problem, source.problem
    blocks, module = iter(source), None
    deadline = time.monotonic() + 60
    try:
        for block in blocks:
            assert block is None, "audio from a source that is not there"
            assert time.monotonic() < deadline, f"{source._retries} retries in 60 s"
            if source._retries >= 4:  # past the 4th rescan: the next is at the 8th
                break
        loaded = subprocess.run(
            ["pactl", "load-module", "module-null-sink", f"sink_name={sink}", "rate=16000",
             "channels=1"], check=True, capture_output=True, text=True,
        )  # fmt: skip
        module, back_at = loaded.stdout.strip(), source._retries
        for block in blocks:  # a null sink's monitor delivers silence: blocks all the same
            if isinstance(block, np.ndarray):
                break
            assert time.monotonic() < deadline, f"not taken by retry {source._retries}"
        assert source._retries <= back_at + 2, (back_at, source._retries)  # one may be under way
    finally:
        source.stop()
        blocks.close()
        if module:
            subprocess.run(["pactl", "unload-module", module], capture_output=True)
