"""Wiring for `run` and `replay`: settings + bundle + source -> Detector, its sinks, the MQTT
publisher with its durable spool, signal handlers and the controller."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile as sf

from edge.bundle import Bundle
from edge.clips import CLIPS_DIR, clips_of
from edge.clock import believable
from edge.commands import ReplyTo
from edge.control import Controller
from edge.daemon import Detector
from edge.errors import SoundSentryError, StartError, os_error_line
from edge.eventlog import EventLogSink, LoggedEvent, last_logged_id, read_events
from edge.messages import EventMessage, iso
from edge.pipeline import Step
from edge.private import private_dir, user_name
from edge.settings import Settings
from edge.sink import JsonLinesSink, MqttSink, Sink
from edge.spool import Spool
from edge.topics import Topics

if TYPE_CHECKING:
    from edge.discovery import DiscoveryRefresh

log = logging.getLogger(__name__)

FIRST_CONNECT_WAIT_S = 5.0
"""How long to wait for the broker before processing audio (events are spooled after that)."""
CLOSE_FLUSH_S = 5.0
"""How long a stop waits for the spool's messages to reach the broker before it disconnects
(what is not sent stays in the spool for the next run)."""
HOST_TAG_DIGITS = 8
"""Hex digits of the host tag: 32 bits, so two machines on one broker share a tag about once
in 4 billion pairs, and a client id stays short enough to read in the broker's log."""
FOLDER_TAG_DIGITS = 4
"""Hex digits of the data folder's tag in the client id: it tells apart only the few daemons
of one machine (the service and a `run` as another user), so 16 bits are plenty."""
RANDOM_NODE_BIT = 1 << 40
"""The multicast bit of a 48-bit hardware address, which `uuid.getnode()` sets on an address
it made up (RFC 4122, 4.5): such an address changes per process and tells no machine apart."""
HOLDER_READ_BYTES = 32
"""Bytes read of the lock file to name its holder: it holds a pid and a newline, far shorter."""
COMMAND_SHOWN_CHARS = 160
"""The holder's command line is cut to this many characters: one line of a terminal or a log,
not a whole argument list."""


def run_detector(
    settings: Settings,
    bundle: Bundle,
    source: Iterable[np.ndarray | None],
    print_events: bool = True,
    on_stop: Callable[[], None] | None = None,
    reload_settings: Callable[[], Settings] | None = None,
    extra_sinks: Iterable[Sink] = (),
    on_step: Callable[[Step], None] | None = None,
    live: bool = False,
    lock: int | None = None,
    persist: bool = True,
    on_started: Callable[[], None] | None = None,
) -> Detector:
    """Run the detector over `source` until it ends or SIGTERM/SIGINT; publish if configured.
    `extra_sinks` and `on_step` are for the terminal (live line, replay summary). `live`: the
    device's own daemon (`run`), which ends the events an earlier run left open; a replay
    connects under a client id of its own, so it never knocks the device's daemon off the
    broker. `lock`: data_dir already held (`hold_data_dir`), closed at the end. `persist`:
    the threshold and mute set by command, learning and the model history are data_dir's
    (False: this run leaves them as they are). `on_started`: called once the start has
    succeeded (a note said before a start that fails would precede its one-line error)."""
    lock = hold_data_dir(settings.data_dir) if lock is None else lock
    try:
        forward = _Forward()
        dashboard, page, publisher, logged = _open_outputs(
            settings, forward.command, forward.retained, live
        )
        sinks = _sinks(settings, publisher, print_events, extra_sinks)
        refresh = _refresh_sink(settings, publisher, bundle, lambda: detector.bundle, page, sinks)
        if dashboard is not None:
            sinks.append(dashboard.live)
        if live:
            end_interrupted(logged, sinks, settings.data_dir / CLIPS_DIR)
        detector = _new_detector(
            settings, bundle, sinks, dashboard, publisher, on_step, persist=persist, live=live
        )
        controller = forward.controller = Controller(detector, reload_settings)
        _start_dashboard(detector, controller, dashboard, refresh, page)
        if on_started is not None:
            on_started()
        # before the wait: SIGTERM stops cleanly
        _install_signals(_stopper(detector, on_stop), controller.submit_reload)
        _connect(settings, publisher)
        _run_to_end(detector, source, dashboard, publisher)
        return detector
    finally:
        os.close(lock)


class _Forward:
    """Commands to the controller, once it exists."""

    def __init__(self) -> None:
        self.controller: Controller | None = None

    def command(self, payload: bytes, reply_to: ReplyTo | None) -> None:
        if self.controller is not None:  # commands before the loop exists wait for a resend
            self.controller.submit_payload(payload, reply_to)

    def retained(self, payload: bytes, reply_to: ReplyTo | None) -> None:
        if self.controller is not None:
            self.controller.submit_retained(payload, reply_to)


def _refresh_sink(
    settings: Settings,
    publisher: Any,
    bundle: Bundle,
    bundle_of: Callable[[], Bundle],
    page: str | None,
    sinks: list[Sink],
) -> DiscoveryRefresh | None:
    """The discovery refresh, appended to `sinks`, when the publisher sends discovery."""
    if publisher is None or not settings.mqtt.discovery:
        return None
    # a new model: new bounds, new id
    refresh = _discovery_refresh(publisher, bundle, bundle_of, page)
    refresh.threshold = settings.detector.threshold
    sinks.append(refresh)
    return refresh


def _start_dashboard(
    detector: Detector,
    controller: Controller,
    dashboard: Any,
    refresh: DiscoveryRefresh | None,
    page: str | None,
) -> None:
    """Let the refresh learn the mark button, then start the dashboard (if any)."""
    if refresh is not None:  # the mark button as the daemon can learn one, before connecting
        refresh.learns_from(detector.marks_learnt)
    if dashboard is not None:
        if refresh is not None and page is None:  # another holds its port now: linked
            dashboard.on_page = lambda url: _link_later(detector, refresh, url)  # once had
        dashboard.start(detector, controller.handle_payload)


def _stopper(detector: Detector, on_stop: Callable[[], None] | None) -> Callable[[], None]:
    """What SIGTERM/SIGINT call: stop the detector, then `on_stop`."""

    def stop() -> None:
        detector.stop()
        if on_stop:
            on_stop()

    return stop


def _open_outputs(
    settings: Settings,
    on_command: Callable[[bytes, ReplyTo | None], None],
    on_retained: Callable[[bytes, ReplyTo | None], None],
    live: bool,
) -> tuple[Any, str | None, Any, list[LoggedEvent]]:
    """The dashboard (bound), its page, the publisher (not connected) and the logged events;
    what fails here fails the start: the dashboard's port or token, the broker's TLS or
    password files."""
    dashboard = None
    try:
        dashboard = _dashboard(settings)  # bound first
        page = dashboard.page_url() if dashboard is not None else None
        client_id = mqtt_client_id(settings) + ("" if live else f"-replay-{os.getpid()}")
        logged = _logged_events(settings.data_dir, settings.device_id)
        publisher = (
            _publisher(settings, on_command, client_id, logged, on_retained, live)
            if settings.mqtt.host
            else None
        )
    except (SoundSentryError, OSError) as exc:
        if dashboard is not None:
            dashboard.stop()
        said = str(exc) if isinstance(exc, SoundSentryError) else os_error_line(exc)
        raise StartError(said) from exc
    return dashboard, page, publisher, logged


def _sinks(
    settings: Settings, publisher: Any, print_events: bool, extra_sinks: Iterable[Sink]
) -> list[Sink]:
    """The detector's sinks, in the order a start and an end must reach them."""
    # the device's own record (`events`, fsynced) takes a start before the spool and an
    # end after it: a start a power cut caught between the two went out with no record of
    # it, and no `end` ever followed (a power-loss review); an end logged first would be
    # lost for good the same way (a review of that mend). The worst left: an end for a
    # start that never went out, or a second end, marked interrupted
    record = EventLogSink(settings.data_dir)
    sinks: list[Sink] = [Starts(record)]
    if publisher is not None:
        sinks.append(MqttSink(publisher))  # spooled durably before it is printed
    if print_events:
        sinks.append(JsonLinesSink())
    sinks.append(AllButStarts(record))
    sinks.extend(extra_sinks)
    return sinks


def _new_detector(
    settings: Settings,
    bundle: Bundle,
    sinks: list[Sink],
    dashboard: Any,
    publisher: Any,
    on_step: Callable[[Step], None] | None,
    persist: bool,
    live: bool,
) -> Detector:
    """The Detector; settings the model refuses (K above its N) fail the start, retried each
    minute, with the dashboard stopped and the spool closed."""
    spool = publisher.spool if publisher is not None else None
    try:
        return Detector(
            settings,
            bundle,
            sinks,
            on_step=on_step,
            spool_stats=spool.stats if spool is not None else None,
            persist=persist,  # threshold, mute, learned models survive a restart (data_dir)
            live=live,  # the device's running hours count what its microphone heard
        )
    except SoundSentryError as exc:
        if dashboard is not None:
            dashboard.stop()
        if spool is not None:
            spool.close()
        raise StartError(str(exc)) from exc


def _connect(settings: Settings, publisher: Any) -> None:
    """Wait a moment for the broker before processing audio; say so if it has not answered."""
    if publisher is not None and not publisher.start(wait_s=FIRST_CONNECT_WAIT_S):
        log.warning(
            "MQTT: no connection to %s:%d after %g s (%s); events are spooled until it "
            "answers",
            settings.mqtt.host, settings.mqtt.port, FIRST_CONNECT_WAIT_S,
            publisher.problem or _no_answer(settings),
        )  # fmt: skip


def _run_to_end(
    detector: Detector, source: Iterable[np.ndarray | None], dashboard: Any, publisher: Any
) -> None:
    """Run the detector over `source`, then stop the dashboard and flush and close the spool."""
    try:
        detector.run(source)
    finally:
        if dashboard is not None:
            dashboard.stop()
        if publisher is not None:
            publisher.close(CLOSE_FLUSH_S)
            _say_undelivered(publisher.spool)
            publisher.spool.close()


LOCK = ".lock"


IMAGE_HOST_NAMES = frozenset({"raspberrypi", "localhost", "debian", "ubuntu"})
"""Host names every Pi cloned from one image shares: as the default device_id, two devices."""


def host_tag() -> str:
    """8 hex digits that tell this machine from others: of its machine-id (or host name) and
    its network hardware address, since Pis cloned from one card after its first boot share
    the machine-id as well as the host name."""
    seed = socket.gethostname()
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            seed = Path(path).read_text().strip() or seed
            break
        except OSError:
            continue
    node = uuid.getnode()
    if not node & RANDOM_NODE_BIT:  # a real address (a random one, made up per process, has it set)
        seed += f"/{node:012x}"
    return hashlib.sha256(seed.encode()).hexdigest()[:HOST_TAG_DIGITS]


def mqtt_client_id(settings: Settings) -> str:
    """The daemon's MQTT client id: its device and prefix, and the machine it runs on. Two
    devices that share a device_id (Pis cloned from one image keep the host name it defaults
    to) or two sites that share a broker under another prefix took over each other's session
    about once a second, each takeover publishing the other's `offline`; so did two daemons of
    one machine with their own data folders (the service and a `run` as another user), and the
    tag of the data folder tells them apart."""
    if settings.device_id in IMAGE_HOST_NAMES:
        log.warning(
            "device_id is %r, the host name every Pi of that image has: set device_id (or "
            "the host name) to name this machine, or devices will share topics",
            settings.device_id,
        )
    folder = hashlib.sha256(str(Path(settings.data_dir).resolve()).encode()).hexdigest()
    tags = f"{host_tag()}-{folder[:FOLDER_TAG_DIGITS]}"
    return f"soundsentry-{settings.mqtt.prefix}-{settings.device_id}-{tags}"


def _say_undelivered(spool: Spool) -> None:
    """At the end of a run: what the broker has not acknowledged waits for the next start."""
    try:
        left = spool.depth()
    except sqlite3.Error:
        return
    if not left:
        return
    if spool.path is None:  # the spool file could not be opened: in memory only
        log.error("MQTT: %d message(s) the broker did not take are lost", left)
        return
    log.warning(
        "MQTT: %d message(s) the broker did not take wait in the spool %s: the next start sends "
        "them",
        left,
        spool.path,
    )


def _owner(path: Path) -> int | None:
    try:
        return path.stat().st_uid
    except OSError:
        return None


def _denied(data_dir: Path, exc: OSError) -> str:
    """Why this user may not take data_dir, with what mends it: files root left in this
    user's folder (give them back), or another user's folder (run as that user)."""
    said = f"data_dir {data_dir}: {exc.strerror}"
    folder, lock = _owner(data_dir), _owner(data_dir / LOCK)
    if folder is not None and folder != os.geteuid():
        return f"{said}: it belongs to {user_name(folder)}; run this as that user (sudo -u ...)"
    if folder == os.geteuid() and lock is not None and lock != os.geteuid():
        return (
            f"{said}: {LOCK} in it belongs to {user_name(lock)} (a run as root?); give the files "
            f"back: sudo chown -R {user_name(os.geteuid())}: {data_dir}"
        )
    return said


def _refuse_root_in_others_folder(data_dir: Path) -> None:
    """`sudo soundsentry run --config /etc/soundsentry/config.toml` (the config is readable by
    root) left root's state, spool, lock and event log in the service's folder, 0600: the
    service could not open them again and never started. Refused in one line instead."""
    owner = _owner(data_dir)
    if os.geteuid() == 0 and owner not in (None, 0):
        name = user_name(owner)
        raise SoundSentryError(
            f"data_dir {data_dir} belongs to {name}: run this as that user (sudo -u {name} "
            f"soundsentry ...); as root its files there would lock {name}'s service out"
        )


def _holder(pid: str, procfs: Path = Path("/proc")) -> tuple[str, str]:
    """Who holds a data_dir, for its refusal: the systemd unit it runs in, or its command line,
    and how to stop it; the refusal said `systemctl stop soundsentry` whoever held it (a daemon
    run by hand, an instance: the two-machines review)."""
    if not pid.isdigit():
        return "", ""
    proc = procfs / pid
    try:
        cgroup = (proc / "cgroup").read_bytes().decode(errors="replace")
        words = (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:  # gone since, or another mount namespace's
        return "", ""
    unit = re.search(r"/([^/\s]+\.service)\s*$", cgroup, re.M)
    if unit and unit.group(1).startswith("soundsentry"):
        return f", the service {unit.group(1)}", f" (`systemctl stop {unit.group(1)}`)"
    command = " ".join(w.decode(errors="replace") for w in words if w)
    return (f", `{command[:COMMAND_SHOWN_CHARS]}`", "") if command else ("", "")


def data_dir_holder(data_dir: Path, locks: Path = Path("/proc/locks")) -> tuple[int, str] | None:
    """Who holds `data_dir` now: its pid, and its unit or command line with how to stop it;
    None when nobody does or this cannot tell. For doctor, which said a microphone that a
    daemon run by hand held could not be opened, and nothing of the daemon. Read from the
    kernel's list of locks, not by taking the lock: a daemon starting just then failed on
    doctor's brief hold (a review)."""
    try:
        inode = os.stat(data_dir / LOCK, follow_symlinks=False).st_ino
        listed = locks.read_text()
    except OSError:  # none yet, another user's folder, or no /proc
        return None
    for line in listed.splitlines():  # "1: FLOCK  ADVISORY  WRITE 6863 fe:00:2146749 0 EOF"
        words = line.split()  # a waiter's line has "->" where FLOCK stands
        held = len(words) > 5 and words[1] == "FLOCK" and words[4].isdigit()
        if held and words[5].rsplit(":", 1)[-1] == str(inode):
            who, stop = _holder(words[4])
            return int(words[4]), f"soundsentry pid {words[4]}{who}{stop}"
    return None


def hold_data_dir(data_dir: Path) -> int:
    """Take `data_dir` for this process (an exclusive flock on `data_dir/.lock`, released when
    the descriptor closes or the process ends, a kill -9 too); its descriptor. Two daemons, or a
    replay beside the service, on one data_dir overwrote each other's state, spool, model
    versions and learning: refused in one line naming the other's pid."""
    path = data_dir / LOCK
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    writable = True
    _refuse_root_in_others_folder(data_dir)
    try:
        private_dir(data_dir)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | nofollow, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise SoundSentryError(_denied(data_dir, exc)) from None
        if exc.errno != errno.EROFS or not data_dir.is_dir():
            raise SoundSentryError(f"data_dir {data_dir}: {exc.strerror or exc}") from None
        # a card the kernel remounted read-only after I/O errors: the daemon still detects
        # and publishes (spool in memory), it saves nothing; locked by whatever can be opened
        fd = os.open(path if path.exists() else data_dir, os.O_RDONLY | nofollow)
        writable = False
        log.error("data_dir %s is on a read-only file system: this run detects and "
                  "publishes but saves nothing (state, learning, events, spool, clips)",
                  data_dir)  # fmt: skip
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, HOLDER_READ_BYTES, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        who, stop = _holder(holder)
        raise SoundSentryError(
            f"data_dir {data_dir} is in use by another soundsentry (pid {holder}{who}): stop "
            f"it first{stop}, or give this one a data_dir of its own"
        ) from None
    except OSError as exc:  # a file system without locks (NFS without lockd): run unguarded
        log.warning("data_dir %s cannot be locked (%s): nothing stops a second soundsentry "
                    "from using it too", data_dir, exc.strerror or exc)  # fmt: skip
        return fd
    if writable:
        try:  # the pid only says who holds it; a full disk must not stop the start
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
    return fd


def _publisher(
    settings: Settings,
    on_command: Callable[[bytes, ReplyTo | None], None],
    client_id: str,
    logged: list[LoggedEvent],
    on_retained: Callable[[bytes, ReplyTo | None], None],
    live: bool,
) -> Any:
    """The MQTT publisher with its durable spool and the device's last `logged` event, not yet
    connected; its discovery configs are set by `DiscoveryRefresh` (cleared with discovery off).
    `live`: the device's own daemon, not a replay (a device_id may hold `-replay-`, its client
    id too)."""
    from edge.discovery import config_topics
    from edge.publish import REPLAY, MqttPublisher
    from edge.spool import open_spool

    topics = Topics(settings.mqtt.prefix, settings.device_id, settings.mqtt.discovery_prefix)
    path = settings.data_dir / f"spool-{settings.device_id}.sqlite"
    spool = open_spool(path, settings.mqtt.spool_max_messages)
    waiting = spool.stats()[0]
    if waiting:
        log.info("spool: %d message(s) from an earlier run will be delivered", waiting)
    for other in sorted(settings.data_dir.glob("spool-*.sqlite")):
        if other != path:  # device_id (the host name by default) was changed
            log.warning("%s is another device id's spool: its messages are not sent by this "
                        "one; delete it once it is not needed", other)  # fmt: skip
    instance = f"host {socket.gethostname()}, {settings.data_dir}, machine {host_tag()}"
    if not live:
        instance += f" {REPLAY}"
    publisher = MqttPublisher(
        settings.mqtt,
        topics,
        client_id,
        spool,
        on_command=on_command,
        instance=instance,
        on_retained_command=on_retained,
    )
    # with discovery on, the configs are set by DiscoveryRefresh once the daemon exists (the
    # mark button as it can learn one), before connecting
    if not settings.mqtt.discovery and live:  # a run with discovery on left configs: Home Assistant
        # would keep the entities. Never a replay's: with the device's id and discovery off, as
        # README suggests for a test, it deleted the device's entities (an integrator's review)
        publisher.set_discovery(dict.fromkeys(config_topics(topics)))
    if logged:  # a broker that lost its retained messages gets it back (this device id's)
        publisher.remember_last_event(json.dumps(logged[-1].data, separators=(",", ":")))
    return publisher


def _no_answer(settings: Settings) -> str:
    """Why the broker has not answered, asked of the network: a port that takes the TCP
    connection and never answers the MQTT CONNECT (another service, a TLS port with TLS off)
    was "no answer yet" for as long as a replay ran, in a review."""
    from edge.broker import probe_reason

    why, check = probe_reason(settings.mqtt)
    return f"{why}: {check}"


class Starts(Sink):
    """A sink's `start` messages only (the event log's place before the spool)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def event(self, message: EventMessage) -> None:
        if message.type == "start":
            self.sink.event(message)


class AllButStarts(Sink):
    """A sink's messages but its `start`s (the event log's place after the spool): the rest,
    its metrics ticks that retry what a full card held back included, as they come."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.state, self.health, self.metrics = sink.state, sink.health, sink.metrics  # type: ignore[method-assign]
        self.response, self.window = sink.response, sink.window  # type: ignore[method-assign]

    def event(self, message: EventMessage) -> None:
        if message.type != "start":
            self.sink.event(message)


def end_interrupted(
    events: list[LoggedEvent], sinks: Iterable[Sink], clips: Path | None = None
) -> int:
    """Send an `end` (`interrupted`, at this start) for every event of the device's log that
    an earlier run started and never ended: the daemon lost power, crashed or was killed
    during an anomaly, and an alarm raised on its `start` would otherwise never clear. An
    event whose clip is in `clips` had ended (its end line torn, or cut before the log had
    it): the clip goes with the end. Returns how many."""
    names = {f.name for f in fields(EventMessage)}
    now = time.time()
    ended = 0
    for event in events:
        if event.status != "open":
            continue
        data = {k: v for k, v in event.data.items() if k in names}
        started = event.started.timestamp()
        end = max(now, started)  # a Pi without an RTC may boot before the event's start
        # where in the stream it ended is not known: the start's offset stood there as if it
        # were the end's (a field test)
        data.update(type="end", ended_at=iso(end), duration_s=round(end - started, 3),
                    interrupted=True, ended_by="interrupted", stream_offset_s=None,
                    clip=None, clip_seconds=None, clip_url=None)  # fmt: skip
        # a start in 1970, or a clock not set now: its duration is not to be trusted (56 years
        # for a start before NTP set the clock, in a clock review)
        wrong = believable(min(now, started)) is not None  # the earlier of the two decides
        data["clock_unset"] = True if wrong else None
        data.update(_kept_clip(clips, str(data.get("event_id", ""))))
        seq = data.get("seq")  # the next after the last logged (None: the publisher numbers it)
        data["seq"] = seq + 1 if isinstance(seq, int) and not isinstance(seq, bool) else None
        try:
            message = EventMessage(**data)
        except (TypeError, ValueError) as exc:  # a line another version (or damage) wrote
            log.warning("event %s left open in the log cannot be ended: %s",
                        data.get("event_id"), exc)  # fmt: skip
            continue
        log.warning(
            "event %s (started %s) was left open when the daemon stopped: ended now, "
            "marked interrupted", message.event_id, message.started_at,
        )  # fmt: skip
        for sink in sinks:
            sink.event(message)
        ended += 1
    return ended


def _kept_clip(clips: Path | None, event_id: str) -> dict[str, Any]:
    """The clip (name, seconds) an event's id names in `clips`, if one was written."""
    if clips is None or not event_id:
        return {}
    try:
        found = clips_of(clips, event_id)
        if found:
            info = sf.info(str(found[-1]))
            return {"clip": found[-1].name, "clip_seconds": round(info.duration, 3)}
    except (OSError, RuntimeError, sf.LibsndfileError):  # unreadable: the end goes without it
        pass
    return {}


def _logged_events(data_dir: Path, device_id: str) -> list[LoggedEvent]:
    """What the start needs of the device's event log, oldest first: the events of this device
    id an earlier run left open and its last one. The whole log (up to 8 MB, 25 MB of objects)
    stayed in memory for the whole run otherwise. Another id's in the same folder (a replay
    under its own, a host renamed) are not this device's to re-publish or end: a replay's
    event went out as the device's retained `last_event`, its id and model in it (a field
    review). None when it cannot be read (said once: its last event is then not re-published,
    nor are events an earlier run left open ended)."""
    try:
        logged = read_events(data_dir)
        # by the log's order: a clock set back reorders
        last_id = last_logged_id(data_dir, device_id)
    except SoundSentryError as exc:
        log.warning("%s: the last event is not re-published, open ones are not ended", exc)
        return []
    events = [e for e in logged if e.data.get("device_id") == device_id]
    others = sorted(
        {str(e.data.get("device_id")) for e in logged if e.status == "open"} - {device_id}
    )
    if others:  # a renamed host's: Home Assistant's alarm on the old id's entities stays on
        log.warning(
            "the event log holds events left open by device id %s, not ended by %s: they are "
            "not this one's", ", ".join(others), device_id,
        )  # fmt: skip
    last = [e for e in events if e.data.get("event_id") == last_id][-1:] or events[-1:]
    return [e for e in events if e.status == "open" and e not in last] + last


def _dashboard(settings: Settings) -> Any:
    """The dashboard's server, bound but not yet serving, when `[web]` is enabled."""
    if not settings.web.enabled:
        return None
    from edge.web.server import Dashboard

    return Dashboard(settings)


def _discovery_refresh(
    publisher: Any, bundle: Bundle, bundle_of: Callable[[], Bundle], page: str | None
) -> DiscoveryRefresh:
    from edge.discovery import DiscoveryRefresh

    return DiscoveryRefresh(publisher, bundle.model_id, bundle_of, page)


def _link_later(detector: Detector, refresh: DiscoveryRefresh, page: str) -> None:
    """From the web thread: Home Assistant's link to the page, on the loop's thread (it was
    linked at the next start only)."""
    if not detector.submit(lambda: refresh.link(page)):
        log.warning("discovery: the link to the page %s/ comes at the next start", page)


def _install_signals(stop: Callable[[], None], reload: Callable[[], None]) -> None:
    """SIGTERM/SIGINT finish cleanly (end events, flush, `offline`); SIGHUP reloads."""

    def on_stop(signum: int, _frame: Any) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop()

    def on_hup(_signum: int, _frame: Any) -> None:
        log.info("received SIGHUP: reloading settings and model")
        reload()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
