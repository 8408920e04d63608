"""`soundsentry doctor`: check everything the daemon needs, each with a fix when it fails."""

from __future__ import annotations

import contextvars
import errno
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge.errors import SoundSentryError, install_extra, os_error_line
from edge.private import user_name
from edge.settings import Settings, mqtt_password

if TYPE_CHECKING:
    from paho.mqtt.client import Client as MqttClient

    from edge.bundle import Bundle

MIN_FREE_MB = 200
LEVEL_SECONDS = 2.0
BROKER_TIMEOUT_S = 5.0
DOCTOR_TOPIC = "doctor"
"""Under the device's topics: doctor's test publish (not retained; consumers of events,
state and health never subscribe to it)."""


@dataclass(frozen=True)
class Check:
    """One check's outcome."""

    name: str
    ok: bool | None
    """True pass, False fail, None not applicable here."""
    detail: str
    fix: str = ""

    def line(self) -> str:
        """`PASS name: detail`, or `FAIL name: detail -> fix: ...`."""
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]
        fix = f"\n       fix: {self.fix}" if self.ok is False and self.fix else ""
        return f"{status} {self.name}: {self.detail}{fix}"


CONFIG_DIR = Path("/etc/soundsentry")
"""Where the units read their configs (deploy/soundsentry.service, soundsentry@.service)."""
UNIT: contextvars.ContextVar[str | None] = contextvars.ContextVar("unit", default=None)
"""The systemd unit that runs the config doctor checks (None: not known, any of them)."""


def unit_for(config: str | Path | None) -> str | None:
    """The unit that runs `config`: /etc/soundsentry/config.toml the single unit, NAME.toml
    there the instance soundsentry@NAME (deploy/README.md); None for any other config."""
    if config is None or Path(config).resolve().parent != CONFIG_DIR:
        return None  # a config of one's own: any unit may be the one running
    stem = Path(config).stem
    return "soundsentry.service" if stem == "config" else f"soundsentry@{stem}.service"


STATE_ROOT = Path("/var/lib/soundsentry")
"""The units' StateDirectory=soundsentry (an instance's: soundsentry/NAME)."""
HIDDEN_BY_UNIT = (Path("/home"), Path("/root"), Path("/run/user"))
"""What the units' ProtectHome=yes hides from the service."""


def unit_state_dir(unit: str) -> Path:
    """The state folder systemd gives `unit` (its data_dir unless the config sets one)."""
    name = unit.removesuffix(".service")
    return STATE_ROOT / name.split("@", 1)[1] if "@" in name else STATE_ROOT


def service_environment(config: str | Path | None) -> None:
    """Read `config` as its unit does: with the unit's STATE_DIRECTORY, which a command run by
    hand lacks (`sudo -u soundsentry soundsentry doctor --config /etc/soundsentry/config.toml`
    checked the data folder under the user's home, not the one the service writes, in a
    review)."""
    unit = unit_for(config)
    if unit is not None and not os.environ.get("STATE_DIRECTORY"):
        os.environ["STATE_DIRECTORY"] = str(unit_state_dir(unit))


def run_checks(settings: Settings, config: str | Path | None = None) -> list[Check]:
    """All checks, in the order a person would fix them; `config`: the file the settings
    came from, whose unit the service checks are about (another instance's state is not)."""
    token = UNIT.set(unit_for(config))
    try:
        return _run_checks(settings)
    finally:
        UNIT.reset(token)


def _run_checks(settings: Settings) -> list[Check]:
    checks: list[Callable[[Settings], Check]] = [
        check_model,
        check_audio_device,
        check_input_level,
        check_broker,
        check_web,
        check_clock,
        check_disk,
        check_service,
    ]
    results = []
    for check in checks:
        name = check.__name__.removeprefix("check_").replace("_", " ")
        try:
            results.append(check(settings))
        except SoundSentryError as exc:
            results.append(Check(name, False, str(exc)))
        except OSError as exc:  # a file this user may not read: this check fails, not doctor
            results.append(Check(name, False, os_error_line(exc)))
    return results


def check_model(s: Settings) -> Check:
    from edge.bundle import load_bundle
    from edge.detectors.registry import kind_of

    if s.model is None:
        return Check(
            "model",
            False,
            "no model configured",
            "set `model` in the config to a bundle from `soundsentry train`",
        )
    refused = _model_path_refused(s, s.model)
    if refused is not None:
        return refused
    try:
        b = load_bundle(s.model)
    except SoundSentryError as exc:
        return Check(
            "model",
            False,
            str(exc),
            "copy a bundle folder from `soundsentry train` and point `model` at it",
        )
    except PermissionError as exc:  # a model under /home/pi (0700; the unit's ProtectHome)
        return Check(
            "model",
            False,
            f"not readable by this user: {exc.filename or s.model}",
            "copy the bundle to /var/lib/soundsentry/models/ and point `model` at it",
        )
    refused = _pipeline_refused(s, b)
    if refused is not None:
        return refused
    return Check(
        "model",
        True,
        f"{b.model_id} ({kind_of(b.manifest)}, {b.features.samplerate} Hz, "
        f"{_in_force(s, b)}){_version_in_use(s, b.model_id)}",
    )


def _model_path_refused(s: Settings, model: Path) -> Check | None:
    """check_model's verdict on `model` (s.model) from its path alone: relative, hidden from
    the unit, or not readable by the service's user; None when it is to be loaded."""
    unit = UNIT.get()
    if not model.is_absolute():  # read from the folder a command runs in: the unit's is its
        # state folder, so doctor by hand elsewhere checked another bundle than the service
        # loads, and passed (a new user's walk-through)
        return _relative_model(s, model, unit)
    where = model.resolve()  # a link from the models folder into /home is hidden all the same
    hidden = next((h for h in HIDDEN_BY_UNIT if where.is_relative_to(h)), None)
    if unit is not None and hidden is not None and _protects_home(unit):
        return Check(
            "model",
            False,
            f"{model} is under {hidden}, which {unit} does not see (ProtectHome=yes)",
            "copy the bundle to /var/lib/soundsentry/models/ and point `model` at it",
        )
    return _unreadable_by_service(s)


def _relative_model(s: Settings, model: Path, unit: str | None) -> Check:
    """check_model of a relative `model` (s.model), read where the unit or this command runs."""
    base = unit_state_dir(unit) if unit is not None else Path.cwd()
    check = check_model(s.model_copy(update={"model": base / model}))
    said = (  # the config's `model`, or --model: the same path either way
        f"the model path {str(model)!r} is relative: {unit} reads {base / model}"
        if unit is not None
        else f"the model path {str(model)!r} is relative, read from the folder a command "
        f"runs in (here {base}; the service runs in {STATE_ROOT})"
    )
    if check.ok:
        return Check("model", True, f"{check.detail}; {said}")
    if (base / model).exists():  # found, and failing for what it holds: that is the fix
        return Check("model", False, f"{check.detail}; {said}", check.fix)
    fix = "write the bundle's absolute path in `model`"
    return Check("model", False, f"{check.detail}; {said}", f"{fix}; {check.fix}")


def _pipeline_refused(s: Settings, b: Bundle) -> Check | None:
    """check_model's verdict when the daemon's pipeline refuses `b` under s.detector."""
    try:  # the daemon's own pipeline: [detector] settings this bundle cannot run stop its start
        from edge.pipeline import Pipeline

        Pipeline(b, s.detector)
    except SoundSentryError as exc:
        return Check("model", False, str(exc), "mend [detector] in the config for this model")
    return None


def _in_force(s: Settings, b: Bundle) -> str:
    """The threshold and K of N the daemon runs `b` with under `s`, and the bundle's where
    [detector] overrides them: doctor showed the bundle's threshold while the daemon ran the
    config's (2.506 shown, 1.5 run, in a review)."""
    from edge.events import DEFAULT_K, DEFAULT_N

    k, n, _ = s.detector.event_logic(b.manifest.threshold.params)
    value = s.detector.threshold_in_force(b.threshold)
    said = f"threshold {value:.4g}, {k} of {n} windows"
    params = b.manifest.threshold.params
    bundle_k, bundle_n = int(params.get("k", DEFAULT_K)), int(params.get("n", DEFAULT_N))
    if value != b.threshold or (k, n) != (bundle_k, bundle_n):
        said += f", set in [detector]; the bundle's: {b.threshold:.4g}, {bundle_k} of {bundle_n}"
    return said


def _unreadable_by_service(s: Settings) -> Check | None:
    """A failed check when the daemon's user (the data folder's owner) cannot read the bundle
    or a file in it: a copy made with sudo under a hardened umask (027) is root's and 0640, and
    doctor run as root read it, or told the service's user to copy it where it already was."""
    model = Path(s.model or "")
    try:
        uid = s.data_dir.stat().st_uid if s.data_dir.is_dir() else os.geteuid()
        if uid == 0:
            return None
        above = list(reversed(model.resolve().parents))  # each must let the user in
        parts = [model, *sorted(model.iterdir())] if model.is_dir() else [model]
        walled = next((p for p in above if not _enterable(p, uid)), None)
        blocked = None if walled else next((p for p in parts if not _readable(p, uid)), None)
    except OSError:  # not there, or not even listable by us: load_bundle says which
        return None
    user = user_name(uid)
    if walled is not None:  # root's 0700 folder above a bundle copied into it (in a review)
        return Check(
            "model",
            False,
            f"{walled} cannot be entered by {user}, who runs the daemon: {model} is behind it",
            "copy the bundle to /var/lib/soundsentry/models/ and point `model` at it",
        )
    if blocked is None:
        return None
    return Check(
        "model",
        False,
        f"{blocked} is not readable by {user}, who runs the daemon (copied as root?)",
        f"give it to the daemon's user: sudo chown -R {user}: {model}",
    )


def _protects_home(unit: str) -> bool:
    """Whether `unit` hides /home, /root and /run/user (ProtectHome=yes or tmpfs, as shipped);
    a drop-in's `read-only` lets the service read them. Not known to systemd (none running, the
    unit not installed yet): as shipped."""
    shown = _run(["systemctl", "show", "-p", "LoadState", "-p", "ProtectHome", unit]) or ""
    said = dict(line.partition("=")[::2] for line in shown.splitlines())
    if said.get("LoadState") != "loaded":
        return True
    return said.get("ProtectHome", "yes") in ("yes", "tmpfs")


def _enterable(folder: Path, uid: int) -> bool:
    """Whether user `uid` may pass through `folder` (its x bit), by its mode bits."""
    return _mode_allows(folder, uid, 0o1)


def _readable(path: Path, uid: int) -> bool:
    """Whether user `uid` may read `path` (and enter it, a folder), by its mode bits."""
    return _mode_allows(path, uid, 0o5 if path.is_dir() else 0o4)


def _mode_allows(path: Path, uid: int, need: int) -> bool:
    """Whether the mode bits of `path` give user `uid` the rwx bits `need` (0o1 to 0o7)."""
    import pwd

    try:
        entry = pwd.getpwuid(uid)
        groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except KeyError:  # a uid without a name: only the owner's and everyone's bits apply
        groups = set()
    st = path.stat()
    if st.st_uid == uid:
        bits = st.st_mode >> 6
    elif st.st_gid in groups:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & need == need


def _version_in_use(s: Settings, configured: str) -> str:
    """What the daemon runs instead of the configured model: the version the site made (a
    commissioning period, mark_normal, calibrate, a reload) that its history names active, read
    without writing anything; whether it still loads. Empty when it runs the configured one."""
    from edge.bundle import load_bundle
    from edge.history import active_entry, written_over
    from edge.pipeline import Pipeline

    entry = active_entry(s.data_dir / "models", configured)
    if entry is None:
        return ""  # none, unreadable by this user, or damaged (the daemon says which at start)
    active, path, reason = entry["version"], entry["path"], entry["reason"]
    now = written_over(entry, Path(path))
    if now is not None:  # as edge.adapt refuses it, whether it loads or not
        return (
            f"; its site version {active}'s folder holds {now} since, not its "
            f"{entry.get('model_id')}: the daemon runs this one"
        )
    try:
        version = load_bundle(path)
        Pipeline(version, s.detector)
    except (SoundSentryError, OSError) as exc:
        why = os_error_line(exc) if isinstance(exc, OSError) else str(exc)
        return f"; its site version {active} does not load ({why}): the daemon runs this one"
    return (
        f"; in use: site version {active} ({version.model_id}, {reason}, "
        f"{_in_force(s, version)}; `rollback` steps back)"
    )


def _model_rate(s: Settings) -> int:
    """The model's sample rate, for the microphone check; 16 kHz when it cannot be read (the
    model's own check says why)."""
    from edge.bundle import read_manifest
    from edge.features import FeatureParams

    try:
        return (
            FeatureParams.from_dict(read_manifest(s.model).features).samplerate
            if s.model
            else 16000
        )
    except (SoundSentryError, TypeError, ValueError):
        return 16000


def check_audio_device(s: Settings) -> Check:
    from edge.audio_io import channel_name
    from edge.capture import CaptureError, MicSource
    from edge.devices import ChannelError

    if s.audio.device is None:
        return Check(
            "audio device",
            False,
            "not set (the daemon would take whatever the system's default input is)",
            "`soundsentry devices` lists the inputs; set [audio] device to an index or part "
            "of a name",
        )
    try:
        src = MicSource(s.audio, _model_rate(s))
    except CaptureError as exc:
        return _held(s, "audio device") or Check(
            "audio device",
            False,
            str(exc),
            "set [audio] channels and channel as the error says"
            if isinstance(exc, ChannelError)  # the device was found: its channels are short
            else "`soundsentry devices` lists the inputs; set [audio] device to part of the name",
        )
    rate = "resampled from" if src.rate != src.model_rate else "native"
    heard = channel_name(s.audio.channel)
    return Check(
        "audio device",
        True,
        f"{src.device!r} at {src.rate} Hz ({rate} {src.model_rate} Hz model rate), hearing "
        f"{heard} of {src.channels}",
    )


def check_input_level(s: Settings) -> Check:
    from edge.capture import CaptureError, MicSource

    if s.audio.device is None:
        return Check("input level", None, "no audio device set")
    rate = _model_rate(s)
    try:
        src = MicSource(s.audio, rate)
    except CaptureError as exc:
        return _held(s, "input level") or Check(
            "input level", False, str(exc), "fix the audio device first"
        )
    blocks, deadline = [], time.monotonic() + LEVEL_SECONDS + 3
    try:
        for block in src:
            if isinstance(block, np.ndarray):  # not None (no audio yet) nor a gap's mark
                blocks.append(block)
            if sum(len(b) for b in blocks) >= LEVEL_SECONDS * rate or time.monotonic() > deadline:
                break
    except CaptureError as exc:  # opened, but it would not start (busy, unplugged meanwhile)
        return _held(s, "input level") or Check(
            "input level",
            False,
            str(exc),
            "is another program using it? `fuser -v /dev/snd/*` names it",
        )
    finally:
        src.stop()
    if not blocks:
        return _held(s, "input level") or Check(
            "input level", False, "no audio arrived in 5 s", "is the device in use?"
        )
    return level_check(np.concatenate(blocks), s.health.clip_fraction, _off_level(s))


def _off_level(s: Settings) -> float | None:
    """The level below which the daemon counts the machine as off: the setting's, else the
    bundle's; None when neither says."""
    if s.detector.off_below_dbfs is not None:
        return s.detector.off_below_dbfs
    from edge.bundle import read_manifest

    try:
        machine = read_manifest(s.model).machine if s.model else None
    except (SoundSentryError, OSError):
        return None
    return machine.off_below_dbfs if machine is not None else None


def level_check(
    audio: np.ndarray, clip_fraction: float, off_below_dbfs: float | None = None
) -> Check:
    """The verdict on LEVEL_SECONDS of captured audio, as the daemon's input health and
    `record` would judge it, and against the level below which the daemon counts the machine
    as off (`off_below_dbfs`, where known): a machine trained this quietly is not too quiet."""
    from edge.health import CLIP_LEVEL, QUIET_DBFS, is_flat, is_silent, level_dbfs

    if not np.all(np.isfinite(audio)):
        return Check(
            "input level",
            False,
            "the device delivers invalid samples (NaN or infinite)",
            "a broken driver or device: try another USB port or microphone",
        )
    level = level_dbfs(audio)
    if is_silent(audio) or is_flat(audio):
        return Check(
            "input level",
            False,
            "digital silence" if is_silent(audio) else "a flat line (a stuck DC level)",
            "unmute the input (alsamixer), check the cable and the channel setting",
        )
    clipped = float(np.mean(np.abs(audio) >= CLIP_LEVEL))
    if clipped > clip_fraction:
        return Check(
            "input level",
            False,
            f"{100 * clipped:.1f} % of samples clip",
            "lower the input gain (alsamixer) or move the microphone back",
        )
    if off_below_dbfs is not None and level < off_below_dbfs:
        return Check(
            "input level",
            False,
            f"{level:.1f} dBFS, below the {off_below_dbfs:.1f} dBFS at which the daemon counts "
            "the machine as off",
            "run doctor while the machine runs; if it does, the microphone moved or its gain "
            "changed: put it back, or `soundsentry calibrate` the model here",
        )
    if level < QUIET_DBFS and off_below_dbfs is None:
        return Check(
            "input level",
            False,
            f"{level:.1f} dBFS: too quiet, a machine is lost in the noise floor (or it is off)",
            "raise the input gain (alsamixer, F4 for capture) or move the microphone closer",
        )
    return Check("input level", True, f"{level:.1f} dBFS over {LEVEL_SECONDS:g} s")


def check_broker(s: Settings) -> Check:
    if not s.mqtt.host:
        return Check("broker", None, "no [mqtt] host configured: events go to the journal only")
    try:
        socket.create_connection((s.mqtt.host, s.mqtt.port), timeout=BROKER_TIMEOUT_S).close()
    except OSError as exc:
        return Check(
            "broker",
            False,
            f"cannot reach {s.mqtt.host}:{s.mqtt.port} ({exc})",
            "check [mqtt] host and port, the network, and that the broker runs",
        )
    return _mqtt_login(s)


def _mqtt_login(s: Settings) -> Check:
    """A real MQTT 5 connection with the configured TLS and credentials, as the daemon makes
    it, and one QoS 1 publish under the device's topics (DOCTOR_TOPIC): a broker's ACL that
    refuses them lets the login pass and every event be dropped (MQTT 5 says so in the
    PUBACK; 3.1.1 does not)."""
    topic = f"{s.mqtt.prefix}/{s.device_id}/{DOCTOR_TOPIC}"
    result, failed = _login_and_publish(s, topic)
    if failed is not None:
        return failed
    return _login_verdict(s, topic, result)


def _doctor_client(
    result: dict[str, object], done: threading.Event, acked: threading.Event
) -> MqttClient:
    """An MQTT 5 client whose callbacks put the CONNACK and PUBACK reasons in `result`."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"soundsentry-doctor-{os.getpid()}",
        protocol=mqtt.MQTTv5,
    )

    def on_connect(_c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        result["reason"] = reason
        done.set()

    def on_publish(_c: object, _u: object, _mid: object, reason: object, _p: object) -> None:
        result["puback"] = reason
        acked.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    return client


def _login_and_publish(s: Settings, topic: str) -> tuple[dict[str, object], Check | None]:
    """Log in and, once accepted, publish once to `topic`: the reasons heard, or a failed
    Check when the connection itself fails."""
    import ssl

    from edge.broker import configure_auth

    result: dict[str, object] = {}
    done, acked = threading.Event(), threading.Event()
    client = _doctor_client(result, done, acked)
    try:
        configure_auth(client, s.mqtt)
        client.connect(s.mqtt.host, s.mqtt.port, s.mqtt.keepalive)  # type: ignore[arg-type]
        client.loop_start()
        done.wait(BROKER_TIMEOUT_S)
        reason = result.get("reason")
        if reason is not None and not reason.is_failure:  # type: ignore[attr-defined]
            payload = f'{{"doctor": "publish test", "at": {time.time():.0f}}}'
            client.publish(topic, payload, qos=1)
            acked.wait(BROKER_TIMEOUT_S)
    except (OSError, ssl.SSLError, ValueError) as exc:  # TLS problems surface here
        return result, Check(
            "broker login",
            False,
            f"{type(exc).__name__}: {exc}",
            "check [mqtt.tls] ca_file, cert_file, key_file and the broker certificate",
        )
    finally:
        client.loop_stop()
        client.disconnect()
    return result, None


def _login_verdict(s: Settings, topic: str, result: dict[str, object]) -> Check:
    """The check's outcome from the CONNACK and PUBACK reasons in `result`."""
    reason = result.get("reason")
    if reason is None:
        return Check("broker login", False, "no answer to CONNECT", _no_answer_hint(s))
    if reason.is_failure:  # type: ignore[attr-defined]
        return Check("broker login", False, f"refused: {reason}", _refused_fix(s))
    return _publish_verdict(s, topic, result.get("puback"))


def _no_answer_hint(s: Settings) -> str:
    """What to check when the broker's port never answered the CONNECT."""
    return (
        "is that port an MQTT port? A broker that expects TLS there (often 8883) does not "
        "answer a plain CONNECT: set [mqtt.tls] enabled = true"
        if not s.mqtt.tls.enabled
        else "is that port an MQTT port, with TLS? (a plain listener, often 1883, does not "
        "answer a TLS handshake: set [mqtt.tls] enabled = false or the TLS port)"
    )


def _refused_fix(s: Settings) -> str:
    """What to fix when the broker refused the login."""
    fix = "check [mqtt] username and the password file / credential"
    if s.mqtt.username and mqtt_password(s.mqtt) is None:  # no password reached doctor
        unit = UNIT.get() or "soundsentry.service"
        name = unit.removeprefix("soundsentry@").removesuffix(".service")
        secret, config = (
            ("mqtt_password", "config.toml")
            if unit == "soundsentry.service"
            else (f"{name}.mqtt_password", f"{name}.toml")
        )
        fix = (
            f"no password reached doctor: the service gets /etc/soundsentry/{secret} as a "
            "systemd credential, which a command run by hand does not see; run it as the "
            "service would: sudo systemd-run --pipe --wait -p "
            f"LoadCredential=mqtt_password:/etc/soundsentry/{secret} -p User=soundsentry "
            f"/opt/soundsentry/venv/bin/soundsentry doctor --config /etc/soundsentry/{config}"
        )
    return fix


def _publish_verdict(s: Settings, topic: str, puback: object) -> Check:
    """The check's outcome once logged in: whether the broker took the test publish."""
    tls = "TLS" if s.mqtt.tls.enabled else "plain"
    user = s.mqtt.username or "anonymous"
    if puback is None:
        return Check(
            "broker login",
            False,
            f"logged in, but a QoS 1 publish to {topic} was not acknowledged in "
            f"{BROKER_TIMEOUT_S:g} s",
            "the broker or the network drops messages; its log says why",
        )
    if puback.is_failure:  # type: ignore[attr-defined]
        return Check(
            "broker login",
            False,
            f"logged in as {user}, but the broker refuses publishing to {topic} ({puback}): "
            "every event would be dropped",
            f"the broker's ACL must let {user} write {s.mqtt.prefix}/{s.device_id}/#; with "
            "deploy/mosquitto/acl (`pattern write soundsentry/%u/#`) device_id must equal the "
            "MQTT user name",
        )
    return Check(
        "broker login",
        True,
        f"{s.mqtt.host}:{s.mqtt.port} accepted us ({tls}, user {user}) and a publish to {topic}",
    )


def check_web(s: Settings) -> Check:
    """`[web]` as the daemon's start takes it: the extra installed, the token readable, the
    port free or served by this config's running soundsentry (not another device's)."""
    if not s.web.enabled:
        return Check("dashboard", None, "[web] is not enabled")
    try:
        import edge.web.prometheus  # noqa: F401
    except ImportError:
        return Check("dashboard", False, "the [web] extra is not installed", install_extra("web"))
    from edge.web.auth import read_token

    try:
        token = read_token(s.web)
    except SoundSentryError as exc:
        return Check(
            "dashboard",
            False,
            str(exc),
            "write a long random token to that file: `openssl rand -hex 24 | sudo tee FILE`, "
            "readable by the service's user",
        )
    return _web_port(s, token)


def _web_port(s: Settings, token: str | None) -> Check:
    """check_web's verdict on [web] host and port: free, or whose page is served there."""
    where = f"{s.web.host}:{s.web.port}"
    family = socket.AF_INET6 if ":" in s.web.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((s.web.host, s.web.port))
        except OSError as exc:
            asked = _loopback_for(s.web.host)
            server = _http_server(asked, s.web.port)
            if server == "SoundSentry":
                return _served_by_soundsentry(s, where, asked, token)
            by = f" (by {server})" if server else ""
            return Check(
                "dashboard",
                False,
                f"cannot listen on {where}: {exc.strerror or exc}{by}",
                "set [web] port to a free one (`ss -ltnp` lists the taken ones), or [web] host "
                "to an address of this machine",
            )
    return Check("dashboard", True, f"{where} is free for the page")


def _served_by_soundsentry(s: Settings, where: str, asked: str, token: str | None) -> Check:
    """check_web's verdict on a port a SoundSentry page answers on: this config's, or whose."""
    other = _dashboard_device(asked, s.web.port, token)
    if other in (s.device_id, None):
        return Check("dashboard", True, f"{where} is served by this soundsentry")
    if other == "HTTP 503":  # every slot taken: whose it is, it could not say
        return Check(
            "dashboard",
            False,
            f"{where} is served by a soundsentry too busy to say whose it is "
            "(HTTP 503: every connection taken)",
            "run doctor again in a minute; if it says so again, close pages left "
            "open on phones, or give each config its own [web] port",
        )
    if other == "":
        return Check(
            "dashboard",
            False,
            f"{where} is served by a soundsentry that refuses this config's token",
            "another device's page: give each config its own [web] port; this "
            "device's, from before the token changed: restart it",
        )
    return Check(
        "dashboard",
        False,
        f"{where} is served by another soundsentry ({other}): this device's page "
        "cannot listen there",
        "give each config its own [web] port (`ss -ltnp` lists the taken ones)",
    )


def _dashboard_device(host: str, port: int, token: str | None) -> str | None:
    """The device_id of the SoundSentry dashboard on host:port, asked with this config's
    token: "" when it refuses the token, None when it does not say (an
    older release), "HTTP <status>" when it answers with neither. Every dashboard sends
    `Server: SoundSentry`: a second config copied from the first kept its port, and doctor
    passed the other device's page (in a review)."""
    import http.client
    import json

    try:
        connection = http.client.HTTPConnection(host, port, timeout=BROKER_TIMEOUT_S)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        connection.request("GET", "/api/state", headers=headers)
        response = connection.getresponse()
        if response.status == 401:
            return ""
        if response.status != 200:  # a refusal says nothing of whose page it is
            return f"HTTP {response.status}"
        device = json.loads(response.read()).get("device_id")
        return str(device) if device is not None else None
    except (OSError, http.client.HTTPException, ValueError, AttributeError):
        return None


def _loopback_for(host: str) -> str:
    """The address to ask a page listening on `host` at: a wildcard's page is asked on
    loopback (asked as `0.0.0.0`, another device's loopback page refused the host name)."""
    from edge.web.server import WILDCARD_HOSTS

    if host in WILDCARD_HOSTS:
        return "::1" if host == "::" else "127.0.0.1"
    return host


def _http_server(host: str, port: int) -> str | None:
    """The Server header of whatever answers HTTP on host:port; None when nothing does."""
    import http.client

    try:
        connection = http.client.HTTPConnection(host, port, timeout=BROKER_TIMEOUT_S)
        connection.request("HEAD", "/")
        return connection.getresponse().getheader("Server")
    except (OSError, http.client.HTTPException):
        return None


def check_clock(_s: Settings) -> Check:
    from edge import clock

    if time.time() < clock.EARLIEST:
        return Check(
            "clock",
            False,
            f"the system clock says {_now()}",
            "enable NTP: `sudo timedatectl set-ntp true` (events carry timestamps)",
        )
    synced = clock.synchronised()
    if synced is None:  # no timesyncd here to tell: ask timedated (chrony, ntpd)
        said = _run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"])
        synced = {"yes": True, "no": False}.get(said or "")
    if synced is False:
        return Check(
            "clock",
            False,
            f"{_now()}, not synchronised with NTP: events carry its times, and clips are kept "
            "by size only until it is (a Pi has no real-time clock)",
            "`sudo timedatectl set-ntp true`, and a time server the Pi reaches",
        )
    return Check("clock", True, _now() + ("" if synced is None else ", NTP synchronised"))


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


FOLDER_HINT = "set data_dir to a writable folder (the service uses its StateDirectory)"


def check_disk(s: Settings) -> Check:
    path = s.data_dir
    walled = _outside_the_unit(path)
    if walled is not None:
        return walled
    if not path.exists():  # doctor creates nothing: the daemon makes it, private, at start
        return _future_data_dir(s, path)
    if not path.is_dir():
        return Check("data folder", False, f"{path} is a file, not a folder", FOLDER_HINT)
    strangers = _foreign_files(path)
    if strangers:
        owner, name = user_name(path.stat().st_uid), strangers[0]
        return Check(
            "data folder",
            False,
            f"{path / name[0]} belongs to {name[1]}, the folder to {owner} (a run as root?): "
            f"the daemon run as {owner} cannot open it",
            f"give the files back: sudo chown -R {owner}: {path}",
        )
    try:
        probe = path / ".doctor-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        fix = {
            errno.ENOSPC: "the card is full: free space, or lower [clips] max_total_mb",
            errno.EROFS: "the file system is read-only; on a Pi the kernel does that after SD "
            "card errors (`dmesg | grep -i mmc`): back up the card and replace it",
        }.get(exc.errno or 0, FOLDER_HINT)
        return Check("data folder", False, f"{path} is not writable ({exc.strerror})", fix)
    free, short = _free_space(path)
    if short is not None:
        return short
    clips = _megabytes(path / "clips")
    from edge.service import data_dir_holder

    holder = data_dir_holder(path)
    held = f"; in use by {holder[1]}" if holder else ""
    return _clips_fit(s, path, free, clips) or Check(
        "data folder", True, f"{path}: {free:.0f} MB free for clips and the spool{held}"
    )


def _clips_fit(s: Settings, path: Path, free: float, clips: float) -> Check | None:
    """A failed check when the clips' limit does not fit in the free space (plus what the
    clips hold now), else None."""
    if s.clips.enabled and free + clips < s.clips.max_total_mb + MIN_FREE_MB:
        return Check(
            "data folder",
            False,
            f"{path}: {free:.0f} MB free, and clips may take {s.clips.max_total_mb:g} MB "
            f"({clips:.0f} MB now): the card fills before the clips' limit",
            f"lower [clips] max_total_mb to {max(free + clips - MIN_FREE_MB, 1):.0f} or less, "
            "or free disk space",
        )
    return None


STATE_FILES = ("clips", "models", "learning", "spool-*", "events.jsonl*", "*.json", ".lock")
"""What the daemon keeps in its data folder and must open again."""


def _foreign_files(folder: Path) -> list[tuple[str, str]]:
    """(name, owner) of the daemon's files in `folder` that belong to another user than the
    folder (root's, left by `sudo soundsentry run`): the service cannot open them again."""
    try:
        owner = folder.stat().st_uid
        found = []
        for pattern in STATE_FILES:
            for path in sorted(folder.glob(pattern)):
                uid = path.lstat().st_uid
                if uid != owner:
                    found.append((path.name, user_name(uid)))
    except OSError:
        return []
    return found


def _free_space(path: Path) -> tuple[float, Check | None]:
    """MB free on the file system of `path`, and the failed check when that is under
    MIN_FREE_MB (None when there is enough)."""
    free = shutil.disk_usage(path).free / 1e6
    if free < MIN_FREE_MB:
        return free, Check(
            "data folder",
            False,
            f"{path}: only {free:.0f} MB free",
            "free disk space or lower [clips] max_total_mb",
        )
    return free, None


def _megabytes(folder: Path) -> float:
    """The size of the files directly in `folder`, MB (0 when it is not there)."""
    try:
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6
    except OSError:
        return 0.0


def _outside_the_unit(path: Path) -> Check | None:
    """A failed check when the unit of the config checked may not write `path`: under
    ProtectSystem=strict it writes its state folder and the ReadWritePaths= of a drop-in only
    (an instance given a copy of the single unit's config, a USB stick), and the service then
    refuses to start while a write test run by hand passed."""
    unit = UNIT.get()
    if unit is None:
        return None
    own = unit_state_dir(unit)
    drop_ins = _run(["systemctl", "show", "-P", "ReadWritePaths", unit]) or ""
    allowed = [own, *(Path(p.lstrip("-+")) for p in drop_ins.split())]  # -: if it exists
    if any(path.absolute().is_relative_to(folder) for folder in allowed):
        return None
    return Check(
        "data folder",
        False,
        f"data_dir {path} cannot be written by {unit}, whose state folder is {own}",
        f'set data_dir = "{own}" (or leave it unset), or allow {path} with ReadWritePaths= in a '
        f"drop-in (systemctl edit {unit})",
    )


def _future_data_dir(s: Settings, path: Path) -> Check:
    """The data folder does not exist yet: can the daemon create it, with room for the clips?
    (The clips' room was checked only in a folder that existed, in a review.)"""
    parent = next(p for p in path.parents if p.exists())
    if not parent.is_dir():
        return Check(
            "data folder", False, f"{path} cannot be created: {parent} is a file", FOLDER_HINT
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        return Check(
            "data folder",
            False,
            f"{path} does not exist and {parent} is not writable",
            FOLDER_HINT,
        )
    free, short = _free_space(parent)
    if short is not None:
        return short
    return _clips_fit(s, path, free, 0.0) or Check(
        "data folder", True, f"{path} will be created at start in {parent} ({free:.0f} MB free)"
    )


def check_service(_s: Settings) -> Check:
    """The unit of the config checked; without a config, the single unit or any instance
    (soundsentry@NAME, one per microphone)."""
    unit = UNIT.get()
    state = _run(["systemctl", "is-active", unit or "soundsentry"])
    if state is None:
        return Check("service", None, "systemd not available here")
    if unit is not None:  # pump-4 running says nothing of pump-3
        if state == "active":
            return _enabled(unit)
        return Check(
            "service",
            False,
            f"{unit} is {state}",
            f"`sudo systemctl enable --now {unit}`; `journalctl -u {unit}` says why",
        )
    if state == "active":
        return _enabled("soundsentry.service")
    return service_check(state, _instances())


def _enabled(unit: str) -> Check:
    """An active unit's verdict: one started by hand but not enabled is gone after a reboot."""
    if _run(["systemctl", "is-enabled", unit]) == "disabled":
        return Check(
            "service",
            False,
            f"{unit} is active but not enabled: it will not start after a reboot",
            f"`sudo systemctl enable {unit}`",
        )
    return Check("service", True, f"{unit} is active")


def _instances() -> str:
    """`systemctl list-units` lines of the soundsentry@NAME instances."""
    command = ["systemctl", "list-units", "--all", "--no-legend", "--plain"]
    return _run([*command, "soundsentry@*.service"]) or ""


def _held_by_service(name: str) -> Check | None:
    """While the service runs it holds the microphone (ALSA then leaves a busy device out of
    PortAudio's list): a device doctor cannot open is no fault then, and the fix is not to
    look for another microphone. None when no soundsentry unit is running."""
    unit = UNIT.get()
    if unit is not None:  # another instance's microphone is not this config's
        units = [unit] if _run(["systemctl", "is-active", unit]) == "active" else []
    elif _run(["systemctl", "is-active", "soundsentry"]) == "active":
        units = ["soundsentry.service"]
    else:
        units = _active(_instances())
    if not units:
        return None
    owners = _capture_owners()
    pids = {_run(["systemctl", "show", "-p", "MainPID", "--value", u]) for u in units}
    pids = {int(pid) for pid in pids if pid and pid.isdigit() and pid != "0"}
    if owners is not None and pids and not owners & pids:  # it runs, deaf: waiting for a mic
        return Check(
            name,
            False,
            f"not opened, and {', '.join(units)} runs but holds no microphone either: its "
            "[audio] device is missing, unplugged or held by another program",
            f"`journalctl -u {units[0]}` says what it waits for; `soundsentry devices` lists "
            "the inputs; `fuser -v /dev/snd/*` names a program holding one",
        )
    return Check(
        name,
        None,
        f"not opened: {', '.join(units)} is running and holds the microphone (as it should); "
        f"its input's health is on its health topic and in `journalctl -u {units[0]}`; "
        f"`sudo systemctl stop {units[0]}` first to test the device here",
    )


def _held(s: Settings, name: str) -> Check | None:
    """The check `name` skipped when a running soundsentry holds the microphone: the service,
    or a daemon run by hand on this config's data_dir (`soundsentry run` in another terminal,
    which doctor said nothing of: the device could not be opened, try another name). None
    when neither runs, or when ALSA shows that the one holding the data_dir holds no capture
    device (a replay, a daemon running deaf: the failure is the device's)."""
    from edge.service import data_dir_holder

    by_service = _held_by_service(name)
    if by_service is not None:
        return by_service
    holder = data_dir_holder(s.data_dir)
    if holder is None:
        return None
    pid, who = holder
    owners = _capture_owners()
    if owners is not None and pid not in owners:
        return None
    return Check(
        name,
        None,
        f"not opened: {who} runs on this config's data_dir and holds the microphone",
        "stop it first to test the device here",
    )


ASOUND = Path("/proc/asound")


def _capture_owners(root: Path = ASOUND) -> set[int] | None:
    """The pids that hold an ALSA capture stream open (`owner_pid` of
    card*/pcm*c/sub*/status); None where ALSA's proc files are not there to tell."""
    if not root.is_dir():
        return None
    owners = set()
    for status in root.glob("card*/pcm*c/sub*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "owner_pid" and value.strip().isdigit():
                owners.add(int(value.strip()))
    return owners


def service_check(single: str, instances: str) -> Check:
    """The verdict from `systemctl is-active soundsentry` (not active) and the instances'
    `systemctl list-units --all --no-legend --plain` lines (UNIT LOAD ACTIVE SUB DESCRIPTION)."""
    units = [line.split()[:3] for line in instances.splitlines() if line.strip()]
    running = _active(instances)
    if running:
        return Check("service", True, f"{', '.join(running)} active")
    if units:
        names = ", ".join(u[0] for u in units)
        return Check(
            "service",
            False,
            f"{names} not active",
            "`sudo systemctl enable --now soundsentry@NAME`; `journalctl -u soundsentry@NAME` "
            "says why",
        )
    return Check(
        "service",
        False,
        f"soundsentry.service is {single}",
        "`sudo systemctl enable --now soundsentry` (or soundsentry@NAME, one per microphone); "
        "`journalctl -u soundsentry` says why",
    )


def _active(instances: str) -> list[str]:
    """The active units among `systemctl list-units --all --no-legend --plain` lines."""
    units = (line.split()[:3] for line in instances.splitlines())
    return [u[0] for u in units if len(u) == 3 and u[2] == "active"]


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return text or None
