"""MQTT with paho-mqtt 2: availability and last will, a durable spool for events, retained
state and health, Home Assistant discovery, and the command topic.

- `online` is published only after a successful CONNACK; retained state, health, metrics,
  the last event and discovery are re-published after every reconnect and when Home
  Assistant restarts.
- Events and health changes go through the on-disk Spool: stored first, published in order
  while connected, deleted on a PUBACK that accepts them. Nothing is lost while the broker is
  away, across a restart or a `kill -9`; duplicates happen only as QoS 1 allows (consumers
  dedupe on `event_id` + `type` + `seq`, the number the publisher gives each message of an
  event).
- MQTT 5, so that a broker that refuses a publish (its ACL) says so in the PUBACK: the
  message stays in the spool and the refusal is logged, once per topic and then at most every
  REFUSED_LOG_INTERVAL_S; the refused messages are offered again every REFUSED_RETRY_S, so
  an ACL mended on the broker delivers them without a restart of the daemon; a refused
  command subscription is logged too.
- Reconnection uses paho's capped exponential backoff and never gives up.
- Every availability message carries who sent it (the INSTANCE_KEY user property: host name,
  data folder, machine tag), and the publisher listens to its own availability topic: an
  `online` from another instance means two daemons share this device_id (Pis cloned from one
  card keep the host name it defaults to) and mix their events and states on one set of
  topics. That is logged as an error once per other instance and kept in `duplicates`.
- The thread that sends the spool survives its failures (a full disk, an SD card's I/O error):
  it logs each new kind once (then at most every SENDER_LOG_INTERVAL_S), retries with backoff,
  and says when it works again; what it could not send or delete stays in the spool.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import random
import shlex
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge.broker import (
    HOST_CHECK,
    LOGIN_HINT,
    LOGIN_REFUSALS,
    configure_auth,
    keepalive_timeout,
    probe_reason,
)
from edge.commands import ReplyTo
from edge.errors import SettingsError
from edge.messages import (
    EventMessage,
    HealthMessage,
    MetricsMessage,
    ResponseMessage,
    StateMessage,
)
from edge.settings import MqttSettings, mqtt_password
from edge.spool import Spool, event_of
from edge.spool_sender import (
    MAX_HANDED,
    REFUSED_LOG_INTERVAL_S,
    REPLY_LABEL,
    SENDER_LOG_INTERVAL_S,
    SpoolSender,
    _duration,
)
from edge.topics import Topics

log = logging.getLogger(__name__)

ONLINE = "online"
INSTANCE_KEY = "soundsentry-instance"
"""MQTT 5 user property of availability messages: the instance that sent them."""
REPLAY = "(replay)"
"""How the instance of a replay (`run --input`, not the device's daemon) ends."""
OFFLINE = "offline"
WITH_WILL = "Disconnect with will message"
"""MQTT 5's DISCONNECT reason 0x04: the broker publishes the will (`offline`)."""
RECONNECT_MIN_S = 1
"""The first wait before a reconnect attempt; each failed attempt in a row doubles it, up to
`reconnect_max_seconds`, and the wait is drawn at random between half of that and all of it
("equal jitter"). paho's own backoff waits exactly 1, 2, 4... s: devices that lost a broker
together (its restart, the plant's Wi-Fi) came back in step at every attempt, and a link that
flapped at a period the doubling met stayed down (2 minutes offline under a 6-s flap, in a
network review)."""
STABLE_S = 10.0
"""A connection that lasted this long resets the backoff to its first wait; one the broker
ends sooner (a session taken over by another device with the same client id, a refused
login) keeps doubling it, where paho reset it at every CONNACK and retried every second."""
MAX_INBOUND_PACKET_BYTES = 1 << 20
"""Largest packet the broker may send us (MQTT 5 Maximum Packet Size, in the CONNECT): paho
reads a message whole before the command's 64-KB check, and a retained 120-MB one came again at
every start, past the unit's MemoryMax. The broker drops larger ones; what we take is commands
(and Home Assistant's status), so 1 MiB still lets one over 64 KB be answered with its refusal."""
REPLY_TOPICS_WARNED = 64
"""Refused MQTT 5 response topics warned of in one run, each once; beyond, said once that they
are no longer said."""
MAX_REPLY_BYTES = 1024
"""Longest Response Topic and Correlation Data taken (MQTT allows 64 KB each): a shed command
keeps them until its `busy`, and a thousand of 128 KB took 170 MB in a review."""
REFUSED_KEPT = 64
"""Retained commands refused, by content, in one run: each once (a stored one comes at every
connection); beyond this many they are ignored without a reply, said once."""
MAX_UNSPOOLED = 2000
"""Messages kept in memory while the spool cannot be written (a full card), about 1 KB each:
a few hours of an anomaly's updates beside the health and events of a day."""
EVENTS_NUMBERED = 16
"""Open events whose next `seq` is kept (one event ends long before that many others start)."""
REFUSED_RETRY_S = 300.0
"""Spooled messages the broker refused are published again this long after their refusal (in
their order), until it accepts them or a full spool drops them."""
STOP_JOIN_S = 1.0
"""How long close() waits for paho's network thread beyond its flush time."""
QUICK_DROP_S = 10.0
TOO_LARGE_DROPS = 2
"""Connections in a row that the broker's answer ended within QUICK_DROP_S of their start, with a
protocol error, before the largest payload paho still holds is taken to be over the broker's
size limit. Mosquitto's `message_size_limit` answers such a publish with a PUBACK reason (0x95)
that MQTT 5 does not allow there; paho drops the connection on it and sends the message again at
every reconnect, so nothing spooled behind it was delivered (a reconnect loop, in a review)."""
SIZE_RELEARN_S = 3600.0
"""A size learned from the broker's drops holds this long; then the messages it held are tried
again (a raised limit takes them; one not raised costs TOO_LARGE_DROPS quick reconnects, and
the size is learned again). It held until the daemon restarted: a user who raised the broker's
limit as the log said, and did not restart the daemon, had the spooled event held for good."""
BACKOFF_FAILURES_COUNTED = 32
"""Failed attempts in a row counted for the reconnect backoff: 2**32 s is far beyond any
reconnect_max_seconds, and a count without a bound would overflow the float it doubles."""
TOPIC_SHOWN_CHARS = 120
"""A refused response topic is logged cut to this many characters (with its length): a topic
may be up to 64 KB, and the log line stays one line."""
CLOSE_POLL_S = 0.05
"""How often close() looks whether the spool has been flushed."""
OFFLINE_POLL_S = 0.02
"""How often close() looks whether the broker has acknowledged `offline`: it comes within
a round trip, and the disconnect waits for it."""
PROTOCOL_ERROR = 0x82
"""MQTT 5 reason "Protocol error": what paho gives `on_disconnect` when it drops a connection."""


def _reply_topic_refusal(topic: str, correlation: bytes | None, topics: Topics) -> str | None:
    """Why a command's MQTT 5 response topic is not written to (None: it may be). Only the
    device's own `response` and the topics below it: anywhere else the device would write, with
    its credentials, where whoever may command it chose (another device's state, Home
    Assistant's discovery, another system's command topic: the diff review), and those are the
    only ones the fleet ACL (deploy/mosquitto/acl) gives it for replies anyway."""
    if len(topic.encode()) > MAX_REPLY_BYTES or len(correlation or b"") > MAX_REPLY_BYTES:
        return f"it or its correlation data is over {MAX_REPLY_BYTES} bytes"
    if "+" in topic or "#" in topic or "\x00" in topic:
        return "a wildcard or NUL topic"
    if topic == topics.response or topic.startswith(f"{topics.response}/"):
        return None
    return f"replies go to {topics.response} or a topic below it"


class _Throttle:
    """A thing said at once, then at most every `interval_s` per key, with how many times it
    happened in between (a refusal per topic, a failure per kind)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._keys: dict[str, tuple[float, int]] = {}  # key -> (last said, times since)

    def due(self, key: str) -> int | None:
        """Count one more `key`; how many since it was last said (this one included) when it is
        due to be said now, else None."""
        now = time.monotonic()
        said, since = self._keys.get(key, (-self.interval_s, 0))
        if now - said < self.interval_s:
            self._keys[key] = (said, since + 1)
            return None
        self._keys[key] = (now, 0)
        return since + 1

    def __bool__(self) -> bool:
        return bool(self._keys)

    def clear(self) -> None:
        self._keys.clear()


def _packet_size(topic: str, payload: str, qos: int, properties: Properties | None) -> int:
    """Bytes of an MQTT 5 PUBLISH packet: fixed header, topic, packet id, properties, payload."""
    props = properties.pack() if properties is not None else b"\x00"
    body = 2 + len(topic.encode()) + (2 if qos else 0) + len(props) + len(payload.encode())
    return 1 + max(1, (body.bit_length() + 6) // 7) + body


def _sender(msg: mqtt.MQTTMessage) -> str | None:
    """The instance an availability message names (INSTANCE_KEY); None without one."""
    return dict(getattr(msg.properties, "UserProperty", None) or []).get(INSTANCE_KEY)


def _take_all(client: mqtt.Client) -> list[mqtt.MQTTMessage]:
    """Every message paho holds to send or to see acknowledged (paho 2.2), taken back; its
    count of messages in flight set to none, which `drop_out_messages` leaves as it was (a
    reply written before the broker's CONNACK held one of its 20 slots for good: a review).
    Called on paho's thread, in `on_connect`, before anything new is published."""
    with client._out_message_mutex:  # an RLock, which drop_out_messages takes too: nothing
        taken = client.drop_out_messages()  # published between the two goes uncounted
        client._inflight_messages = 0
    return taken


def _least_needed(waiting: deque[tuple[str, str, bool]], events: str) -> int:
    """Which message kept in memory goes when they are too many: the oldest `update` of an
    event (its start and end say when and how bad), else the oldest. Preferring the oldest
    start to an end, as the spool does, left ends whose starts had gone (a review): the spool
    knows what was handed and drops an unsent event whole; this queue does not."""
    for i, (topic, payload, retain) in enumerate(waiting):  # the text first: a JSON parse of
        if topic == events and '"update"' in payload and event_of(payload, retain)[1] == "update":
            return i  # each of 2,000 took 20 ms a message (a review)
    return 0


class MqttPublisher(SpoolSender):
    """One broker connection for one device."""

    def __init__(
        self,
        settings: MqttSettings,
        topics: Topics,
        client_id: str,
        spool: Spool,
        on_command: Callable[[bytes, ReplyTo | None], None] | None = None,
        instance: str = "",
        on_retained_command: Callable[[bytes, ReplyTo | None], None] | None = None,
    ) -> None:
        if not settings.host:
            raise ValueError("MqttPublisher needs mqtt.host")
        self.instance = instance or client_id
        self.duplicates: dict[str, float] = {}
        """Other instances heard announcing themselves online as this device -> when (time)."""
        self.settings = settings
        self.topics = topics
        self.spool = spool
        self.on_command = on_command
        """A command as it came, with where its MQTT 5 Response Topic asks for the reply."""
        self.on_retained_command = on_retained_command
        """A retained command, refused: once per content in a process (a stored one comes at
        every connection)."""
        self._init_commands()
        self._init_connection()
        self._init_delivery()
        self.client = self._new_client(client_id)
        configure_auth(self.client, settings)
        self._password = mqtt_password(settings) if settings.username else None
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-spool", daemon=True)

    def _init_commands(self) -> None:
        """What the inbound side remembers: refused commands and reply topics, subscriptions."""
        self._reply_topics_warned: set[bytes] = set()  # SHA-256 digests of refused ones
        self._refused_commands: set[bytes] = set()
        """The SHA-256 digests of the retained commands refused so far, at most REFUSED_KEPT (a
        payload may be up to MAX_INBOUND_PACKET_BYTES: the payloads themselves took up to 64 MB
        for good)."""
        self._refused_full = False
        self._warned_retained = False
        self._subscribed: dict[int, list[str]] = {}  # SUBSCRIBE message id -> its topics

    def _init_connection(self) -> None:
        """The connection's state: its events and locks, the retained messages, the backoff."""
        self.discovery: dict[str, dict[str, Any] | None] = {}
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._retained: dict[str, str] = {}
        self._retain_lock = threading.RLock()
        """Held while the retained messages change or are sent, and while a connection becomes
        `connected`: a state set during a reconnect's re-send was neither sent (not connected
        yet) nor in that re-send (taken before it), and the broker kept the old one."""
        self._mid_lock = threading.Lock()
        """Held while a message id's topic is stored and while a PUBACK takes it."""
        self._connection = 0
        """Connections made so far; a retained message's id -> the connection it was sent on."""
        self._sent_on: dict[int, int] = {}
        self._quick_drops = 0  # connections in a row ended by a protocol error at once
        self._connected_at = 0.0  # monotonic time of the last CONNACK
        self._failures = 0  # attempts in a row that failed or did not last STABLE_S
        self._rng = random.Random()  # the backoff's jitter: each device draws its own
        self._loss_said = False  # the loss of the connection was logged, until the next attempt
        self._network_wait_s = 0.0  # before paho's network thread is started again, if it ends
        self._network_restart_at = 0.0  # monotonic time it may be started again
        self.network_restarts = 0
        self._last_refusal = ""
        self._last_unreachable = ""

    def _init_delivery(self) -> None:
        """The delivery's bookkeeping: spool rows handed and acknowledged, messages kept in
        memory, refused rows offered again, the broker's size limit as learned."""
        self._inflight: dict[int, int] = {}
        self._acked: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._spool_failed = False
        self._handed = 0
        self._acked_rows: list[int] = []  # spool rows the broker accepted, not yet deleted
        self._remove_failed = False  # those could not be deleted last time (logged)
        self._unspooled: deque[tuple[str, str, bool]] = deque()
        """Messages the spool could not take (a full disk), oldest first: sent after its rows,
        and moved into it as soon as it takes a message again (under `_unspooled_lock`)."""
        self._unspooled_lock = threading.Lock()
        self._held: deque[tuple[str, str, bool]] = deque()
        """Of those, the ones the broker refused or that were over its size limit: into the spool
        with the rest once it takes messages again, and offered from there as refused rows
        (under `_unspooled_lock`). They were lost, while the log said they stayed spooled."""
        self._memory_handed = False  # some of `_unspooled` were handed once (taken back)
        self._unspooled_mids: dict[int, tuple[str, str, bool]] = {}  # handed, PUBACK awaited
        self._unspooled_dropped = 0
        self._refused_rows: list[int] = []  # spool rows the broker refused, to offer again
        self._max_packet: int | None = None  # the broker's MaximumPacketSize (CONNACK)
        self._learned: tuple[int, float] | None = None
        """The largest payload the broker takes, as learned, and when (monotonic): one value,
        set, and cleared when expired, under `_learned_lock` by paho's thread and the sender's
        (in two values the sender could read the new size with the old time, take it as
        expired and clear it under paho's feet)."""
        self._learned_lock = threading.Lock()
        self.size_relearn_s = SIZE_RELEARN_S
        self._dropped_mids: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        """Message ids taken back from paho (over the learned limit): their spool rows are
        handed again by the sender thread, those over the limit kept as if refused."""
        self._hand_again: deque[int] = deque()  # spool rows to hand before the next new one
        self._too_large = _Throttle(REFUSED_LOG_INTERVAL_S)  # logged per topic
        self._offer_refused_at = 0.0  # monotonic time of the next offer, 0: none due
        self._offered: set[int] = set()  # refused rows offered again, their PUBACK awaited
        self._offer_rest: deque[int] = deque()  # rows of the offer under way not yet handed
        self._offer_retained = False  # that offer re-sent a retained message
        self._accepted_offered = 0  # of those, accepted this offer
        self.refused_retry_s = REFUSED_RETRY_S
        self._send_failures = _Throttle(SENDER_LOG_INTERVAL_S)  # by kind of failure
        self._topic_of: dict[int, str] = {}  # message id -> topic, until its PUBACK
        self._refused = _Throttle(REFUSED_LOG_INTERVAL_S)  # by topic
        self._next_seq: OrderedDict[str, int] = OrderedDict()  # open event_id -> next seq

    def _new_client(self, client_id: str) -> mqtt.Client:
        """The paho client with its last will, backoff and callbacks (not yet authenticated)."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        client.will_set(
            self.topics.availability,
            OFFLINE,
            qos=1,
            retain=True,
            properties=self._sender_props(True),
        )
        client.reconnect_delay_set(RECONNECT_MIN_S, int(self.settings.reconnect_max_seconds))
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_pre_connect = self._on_pre_connect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    @property
    def connected(self) -> bool:
        """True while the broker has accepted the connection."""
        return self._connected.is_set()

    @property
    def problem(self) -> str:
        """Why there is no connection, as last seen: the broker's refusal, or why it could not
        be reached; empty when none was seen (yet)."""
        if self._last_refusal:
            return f"the broker refused the connection: {self._last_refusal}"
        return self._last_unreachable

    def start(self, wait_s: float = 0.0) -> bool:
        """Connect in the background; optionally wait up to `wait_s` for the first CONNACK."""
        log.info("MQTT: connecting to %s:%d", self.settings.host, self.settings.port)
        # A clean start at every connection, as MQTT 3.1.1's clean session did: the broker keeps
        # no session for us; what was not acknowledged is sent again from the spool and paho.
        connect = Properties(PacketTypes.CONNECT)
        connect.MaximumPacketSize = MAX_INBOUND_PACKET_BYTES
        self.client.connect_async(
            self.settings.host,
            self.settings.port,
            self.settings.keepalive,
            clean_start=True,
            properties=connect,
        )
        self.client.loop_start()
        self._sender.start()
        return self._connected.wait(wait_s) if wait_s > 0 else self.connected

    # --- paho callbacks (paho's network thread) -------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            text = str(reason)
            if text != self._last_refusal:
                log.error(
                    "MQTT: broker refused the connection: %s%s; retrying with backoff",
                    text,
                    LOGIN_HINT if text in LOGIN_REFUSALS else "",
                )
            self._last_refusal = text
            self._reread_password()
            return
        self._last_refusal = self._last_unreachable = ""
        self._max_packet = getattr(_p, "MaximumPacketSize", None)  # the broker's, if it says
        log.info("MQTT: connected to %s:%d", self.settings.host, self.settings.port)
        if self._quick_drops >= TOO_LARGE_DROPS:
            self._set_aside_largest(client)
        else:  # paho would send what was in flight after the latest retained of each topic:
            # after a half-open stall, `state` went anomaly, normal, anomaly... again to live
            # subscribers, old states over the new (a network review)
            self._hand_back(_take_all(client))
        self._connected_at = time.monotonic()
        wanted = [self.topics.command, *self.topics.ha_statuses, self.topics.availability]
        # this device's availability without its own publishes (no local): only others' reach
        # us; commands with their retain flag as published, or the broker clears it on a live
        # delivery and a command published retained (Node-RED's "retain" ticked) ran once
        options = [
            SubscribeOptions(
                qos=1,
                noLocal=topic == self.topics.availability,
                retainAsPublished=topic == self.topics.command,
            )
            for topic in wanted
        ]
        _rc, mid = client.subscribe(list(zip(wanted, options, strict=True)))
        self._subscribed[mid] = wanted  # its SUBACK comes later on this same thread
        self._publish(self.topics.availability, ONLINE, qos=1, retain=True, props=True)
        with self._retain_lock:
            self._connection += 1
            # health changes spooled while away go out in order, ending at the latest: sent
            # first too, the latest came before the older ones, and Home Assistant's "problem"
            # flipped back to a state of minutes ago (a field test)
            self._publish_retained(skip=self._health_waiting())
            self._publish_discovery()
            self._connected.set()
        self._wake.set()

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        """No TCP (or TLS) connection: paho says nothing of why, so ask the network once; each
        new reason is logged, a repeated one is not (the retries go on with backoff). Not while
        closing: the probe's DNS lookup and connect would only delay the stop."""
        if self._closing.is_set():
            return
        self._plan_retry(False)
        where = f"{self.settings.host}:{self.settings.port}"
        why, check = probe_reason(self.settings)
        lead = "cannot reach" if check == HOST_CHECK else "no connection to"  # TCP did connect
        self._unreachable(f"{lead} {where} ({why})", check)

    def _unreachable(self, reason: str, check: str = HOST_CHECK) -> None:
        """Why there is no connection: each new reason logged once, a repeated one not."""
        if reason != self._last_unreachable:
            log.warning(
                "MQTT: %s; retrying with backoff, events are spooled meanwhile (%s)",
                reason,
                check,
            )
        self._last_unreachable = reason

    def _reread_password(self) -> None:
        """After a refusal, read the password again: a password file changed for a new broker
        password is used from the next attempt, without a restart (systemd credentials are
        copied at start: those need `systemctl restart`)."""
        if not self.settings.username:
            return
        try:
            password = mqtt_password(self.settings)
        except SettingsError as exc:
            log.error("MQTT: %s", exc)
            return
        if password != self._password:
            self._password = password
            self.client.username_pw_set(self.settings.username, password)
            log.warning("MQTT: the password changed; the next attempt uses the new one")

    def _plan_retry(self, was_connected: bool) -> None:
        """The wait before paho's next attempt, set now (paho waits after every failure, and
        this runs on its thread just before): doubling with each failure in a row, at random
        between half and all of it (RECONNECT_MIN_S)."""
        if was_connected and time.monotonic() - self._connected_at >= STABLE_S:
            self._failures = 0
        cap = min(float(self.settings.reconnect_max_seconds), RECONNECT_MIN_S * 2.0**self._failures)
        self._failures = min(self._failures + 1, BACKOFF_FAILURES_COUNTED)
        wait = self._rng.uniform(cap / 2, cap)
        self.client.reconnect_delay_set(wait, wait)  # type: ignore[arg-type]  # floats do

    def _on_pre_connect(self, _c: mqtt.Client, _u: Any) -> None:
        self._loss_said = False  # a new attempt: what ends it is news

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if self._closing.is_set():
            return
        if was or not self._loss_said:  # paho reports a keepalive's loss twice: one wait
            self._plan_retry(was)
        if was:
            quick = time.monotonic() - self._connected_at < QUICK_DROP_S
            protocol = getattr(reason, "value", None) == PROTOCOL_ERROR
            self._quick_drops = self._quick_drops + 1 if quick and protocol else 0
            log.warning("MQTT: disconnected (%s); reconnecting with backoff", reason)
            self._loss_said = True
        elif self._loss_said:  # paho reports a keepalive's loss twice: the second took the
            return  # path of a CONNECT never answered, and blamed a TLS port (a network review)
        elif not self._last_refusal and keepalive_timeout(reason):  # we hung up: no answer
            self._unreachable(
                f"{self.settings.host}:{self.settings.port} took the connection and did not "
                f"answer the MQTT CONNECT within the keepalive ({self.settings.keepalive} s): a "
                "broker stopped or overloaded, a TLS port with [mqtt.tls] off, or another "
                "service on that port?"
            )
        elif not self._last_refusal:  # a refusal said why; this is a port that hung up on us
            self._unreachable(
                f"{self.settings.host}:{self.settings.port} closed the connection before the "
                f"MQTT handshake ended ({reason}): a TLS port with [mqtt.tls] off, another "
                "service on that port, or a broker at its connection limit?"
            )

    def _set_aside_largest(self, client: mqtt.Client) -> None:
        """The connection ended at once, TOO_LARGE_DROPS times in a row, on a protocol error: take
        back what paho would send again (before it does), and take the largest payload of it as
        over the broker's size limit, which mosquitto does not tell (its `message_size_limit`
        counts payload bytes: by packet, a message with a long topic that the broker took was
        blamed, in a review). Payloads that large or larger are not handed to paho again for
        `size_relearn_s` (spooled ones stay in the spool, as over a maximum packet size); the
        rest go again: spooled rows by the sender thread, in order,
        before any new one; retained ones as the latest, by `_on_connect`; a command's response
        now."""
        self._quick_drops = 0
        taken = _take_all(client)  # not sent again by paho at the reconnect
        if not taken:
            return
        sizes = [len(m.payload) for m in taken]  # message_size_limit counts payload bytes
        largest = max(sizes)
        with self._learned_lock:
            before = self._learned
            limit = min(largest - 1, before[0] if before else largest)
            self._learned = (limit, time.monotonic())
        topic = taken[sizes.index(largest)].topic
        log.error(
            "MQTT: the broker dropped the connection %d times in a row at once, on a message of "
            "%d payload bytes on %s, taken as over its size limit (mosquitto's "
            "message_size_limit): payloads of %d bytes or more are not sent for %s, then tried "
            "again (a spooled one stays in the spool); raise the broker's limit",
            TOO_LARGE_DROPS, largest, topic, largest, _duration(self.size_relearn_s),
        )  # fmt: skip
        self._hand_back(taken, limit)

    def _hand_back(self, taken: list[mqtt.MQTTMessage], limit: float = math.inf) -> None:
        """What was taken back from paho goes again, not as paho would send it: spooled rows by
        the sender thread, in order, before any new one; messages in memory from memory;
        retained ones not at all (`_on_connect` sends each topic's latest); a command's
        response now; none of `limit` payload bytes or more."""
        with self._mid_lock:
            for m in taken:
                self._topic_of.pop(m.mid, None)
                self._sent_on.pop(m.mid, None)
        # by topic, not by the sender's records: a row it had just handed and not yet recorded
        # (its own thread, between paho's publish and the record) was sent again from here as
        # a reply, and its record then held a slot for good; the sender sorts them (its thread)
        response = self.topics.response
        replies = [m for m in taken if m.topic == response or m.topic.startswith(f"{response}/")]
        answered = {m.mid for m in replies}
        self._dropped_mids.put([m.mid for m in taken if m.mid not in answered])
        for m in replies:
            if not m.retain and m.qos and len(m.payload) <= limit:
                properties = getattr(m, "properties", None)  # a reply's Correlation Data
                reply = m.topic.startswith(f"{self.topics.response}/")
                self._publish(
                    m.topic,
                    m.payload.decode(),
                    qos=m.qos,
                    properties=properties,
                    label=REPLY_LABEL if reply else None,
                )
        self._wake.set()

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        self._acked.put((mid, reason))  # resolved by the sender thread: never block paho here
        self._wake.set()

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[Any], _p: Any
    ) -> None:
        for topic, reason in zip(self._subscribed.pop(mid, []), reasons, strict=False):
            if not reason.is_failure:
                continue
            if topic == self.topics.availability:  # an ACL written before devices read it
                log.info(
                    "MQTT: the broker refused the subscription to %s (%s): a second device "
                    "with this device_id would go unnoticed (deploy/mosquitto/acl lets devices "
                    "read it)",
                    topic,
                    reason,
                )
                continue
            what = (
                "commands (and Home Assistant's controls) will not reach this device"
                if topic == self.topics.command
                else "Home Assistant restarts will not make it re-announce discovery"
            )
            log.error(
                "MQTT: the broker refused the subscription to %s (%s): %s; allow this user to "
                "read it in the broker's ACL",
                topic,
                reason,
                what,
            )

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.topics.availability:
            self._check_instance(msg)
            self._stay_online(msg)
        elif msg.topic in self.topics.ha_statuses:
            if msg.payload.decode(errors="replace").strip() == ONLINE:
                log.info("MQTT: Home Assistant is online: re-announcing discovery")
                self._publish_discovery()
                self._publish_retained()
        elif msg.topic == self.topics.command and self.on_command:
            if msg.retain and not msg.payload:  # a retained command cleared (`-r -n`)
                log.info("MQTT: the retained command on %s was cleared", msg.topic)
                return
            if msg.retain:  # a stored command would run again at every start: never obey one
                if not self._warned_retained:
                    log.warning(
                        "MQTT: ignoring a retained command on %s (commands are never retained; "
                        "clear it with: %s)",
                        msg.topic,
                        self._clear_command(msg.topic),
                    )
                self._warned_retained = True
                digest = hashlib.sha256(msg.payload).digest()
                if self.on_retained_command is None or digest in self._refused_commands:
                    return
                if len(self._refused_commands) < REFUSED_KEPT:
                    self._refused_commands.add(digest)
                    self.on_retained_command(msg.payload, self._reply_to(msg))
                elif not self._refused_full:
                    self._refused_full = True
                    log.warning(
                        "MQTT: %d retained commands refused since the start: more are ignored "
                        "without a reply until a restart",
                        REFUSED_KEPT,
                    )
                return
            self.on_command(msg.payload, self._reply_to(msg))

    def _reply_to(self, msg: mqtt.MQTTMessage) -> ReplyTo | None:
        """Where an MQTT 5 command asks for its reply (Response Topic, Correlation Data), if it
        does and the topic is this device's `response` or below it (`_reply_topic_refusal`). A
        refused one is logged once (REPLY_TOPICS_WARNED of them), and the reply goes to
        `response` alone."""
        props = getattr(msg, "properties", None)
        topic = getattr(props, "ResponseTopic", None)
        if not topic:
            return None
        topic = str(topic)
        correlation = getattr(props, "CorrelationData", None)
        correlation = None if correlation is None else bytes(correlation)
        refusal = _reply_topic_refusal(topic, correlation, self.topics)
        if refusal is None:
            return ReplyTo(topic, correlation)
        warned, key = self._reply_topics_warned, hashlib.sha256(topic.encode()).digest()
        if key in warned or len(warned) >= REPLY_TOPICS_WARNED:
            return None
        warned.add(key)
        shown = (
            topic
            if len(topic) <= TOPIC_SHOWN_CHARS
            else f"{topic[:TOPIC_SHOWN_CHARS]}... ({len(topic)} characters)"
        )
        log.warning(
            "MQTT: a command's response topic %r is refused (%s): its reply goes to %s only%s",
            shown,
            refusal,
            self.topics.response,
            "; more refused response topics are not logged until a restart"
            if len(warned) == REPLY_TOPICS_WARNED
            else "",
        )
        return None

    def _sender_props(self, will: bool = False) -> Properties:
        props = Properties(PacketTypes.WILLMESSAGE if will else PacketTypes.PUBLISH)
        props.UserProperty = [(INSTANCE_KEY, self.instance)]
        return props

    def _check_instance(self, msg: mqtt.MQTTMessage) -> None:
        """An `online` on this device's availability from another instance (retained: it is
        online now, or was when the broker last heard of it): two daemons share the device_id.
        Messages without the property (another program, an older SoundSentry) say nothing, and
        a replay (`run --input` with the device's config) neither warns nor is warned of."""
        if self.instance.endswith(REPLAY):  # replaying a file as the device is deliberate
            return
        sender = _sender(msg)
        if not sender or sender == self.instance or sender.endswith(REPLAY):
            return
        if msg.payload.decode(errors="replace").strip() != ONLINE or sender in self.duplicates:
            return
        self.duplicates[sender] = time.time()
        log.error(
            "MQTT: another SoundSentry (%s) is online as device %r: both publish to %s/, so "
            "events, state and Home Assistant mix two machines; give each device its own "
            "device_id (in the config, or SOUNDSENTRY_DEVICE_ID) and restart it",
            sender,
            self.topics.device_id,
            self.topics.base,
        )

    def _stay_online(self, msg: mqtt.MQTTMessage) -> None:
        """An `offline` on this device's availability while this daemon is connected: another
        instance wrote it (a `replay` with the device's config ending, or its will; a clone that
        stopped), and the broker would keep it, every Home Assistant entity of the device
        unavailable until this daemon next reconnected (days, in a review). Say `online`
        again, and announce this daemon's discovery and retained messages again: a replay
        with the device's config announced its own model, threshold bounds and buttons, which
        Home Assistant kept after it ended (an integrator's review). A replay never does: the
        device's daemon owns the topics."""
        if self.instance.endswith(REPLAY) or self._closing.is_set() or not self.connected:
            return
        if msg.payload.decode(errors="replace").strip() != OFFLINE:
            return
        if _sender(msg) == self.instance:  # its own, retained from its last stop: `online` sent
            return
        log.info(
            "MQTT: another instance left %s `offline`: this one is online; re-announcing discovery",
            msg.topic,
        )
        self._publish(self.topics.availability, ONLINE, qos=1, retain=True, props=True)
        self._publish_discovery()
        self._publish_retained()

    # --- what the daemon publishes ----------------------------------------------------------

    def publish_event(self, event: EventMessage) -> None:
        """Spool an event (QoS 1) and wake the sender; the latest start or end also goes out
        retained on `last_event` (now if connected, else after the reconnect: not spooled
        twice). Not an update: Home Assistant's Last event sensor took each one's score and
        bands as attributes, a recorder row every update_seconds for as long as an anomaly
        lasted, and the message re-sent at a start (the event log's) was not the one the broker
        held (an integrator's review)."""
        payload = self._numbered(event).to_payload()
        self._spool(self.topics.events, payload, retain=False)
        if event.type != "update":
            self.remember_last_event(payload)

    def _numbered(self, event: EventMessage) -> EventMessage:
        """The event with its `seq`: 0 for the start, then 1, 2, ... for its updates and end,
        so a consumer tells a QoS 1 duplicate from the next update."""
        if event.seq is not None:
            return event
        seq = 0 if event.type == "start" else self._next_seq.get(event.event_id, 1)
        if event.type == "end":
            self._next_seq.pop(event.event_id, None)
        else:
            self._next_seq[event.event_id] = seq + 1
            while len(self._next_seq) > EVENTS_NUMBERED:
                self._next_seq.popitem(last=False)
        return replace(event, seq=seq)

    def _spool(self, topic: str, payload: str, retain: bool) -> None:
        """Store a QoS 1 message in the spool for the sender. When the spool cannot be written
        (a full disk) it waits in memory (at most MAX_UNSPOOLED, the oldest dropped first and
        counted), sent by the sender after the spool's rows and moved into the spool, in
        order, once it takes messages again. Published directly, paho queued it while the
        broker was away and sent it first at the reconnect: an event's `end` reached consumers
        before its `start` (in a review). Logged once until the spool works again."""
        with self._unspooled_lock:
            try:
                self._memory_to_spool()  # older than this one: in the spool first
                self.spool.append(topic, payload, qos=1, retain=retain)
            except sqlite3.Error as exc:
                self._keep_unspooled(topic, payload, retain, exc)
                self._wake.set()
                return
        if self._spool_failed:
            log.info("spool %s is written again", self.spool.path)
        self._spool_failed = False
        self._wake.set()

    def _memory_to_spool(self, handed: Sequence[tuple[str, str, bool]] = ()) -> None:
        """Move the messages waiting in memory into the spool, in one go and in order: the ones
        the broker refused, then `handed` (to paho, unanswered), then the rest.
        Raises sqlite3.Error, keeping them, when the spool cannot take them (under
        `_unspooled_lock`). Some were handed once and may have arrived: a full spool keeps
        their ends."""
        waiting = [*self._held, *handed, *self._unspooled]
        if not waiting:
            return
        rows = [(t, p, 1, r) for t, p, r in waiting]
        was_handed = bool(self._held) or bool(handed) or self._memory_handed
        self.spool.append_many(rows, handed=was_handed)
        self._held.clear()
        self._unspooled.clear()
        self._memory_handed = False

    def _keep_unspooled(self, topic: str, payload: str, retain: bool, exc: Exception) -> None:
        """Keep in memory a message the spool refused (under `_unspooled_lock`)."""
        if not self._spool_failed:
            log.error(
                "spool %s cannot be written (%s): messages wait in memory (up to %d, lost if "
                "the daemon stops before the broker takes them) until it can",
                self.spool.path,
                exc,
                MAX_UNSPOOLED,
            )
        self._spool_failed = True
        self._unspooled.append((topic, payload, retain))
        while len(self._held) + len(self._unspooled) > MAX_UNSPOOLED:
            if self._held:  # the older, and refused by the broker once
                self._held.popleft()
            else:  # the oldest update, as a full spool's first; else the oldest
                del self._unspooled[_least_needed(self._unspooled, self.topics.events)]
            self._unspooled_dropped += 1
            if self._unspooled_dropped in (1, 10, 100) or self._unspooled_dropped % 1000 == 0:
                log.error(
                    "spool %s cannot be written and %d message(s) waiting in memory were "
                    "dropped, the oldest first: free space on the card",
                    self.spool.path,
                    self._unspooled_dropped,
                )

    def _spool_has_more(self) -> bool:
        """Rows after the last one handed; a spool that cannot be read has none it could send
        (as `_pending` takes it), so the messages in memory are not held back by it."""
        try:
            return bool(self.spool.after(self._handed, 1))
        except sqlite3.Error:
            return False

    def _send_unspooled(self) -> None:
        """Hand paho the messages the spool could not take, oldest first, once every spool row
        has been handed (they are newer)."""
        with self._unspooled_lock:
            if self._unspooled and self._spool_has_more():
                # the daemon moved some of them into the spool since the sender looked: those
                # rows go first, as the older messages they are
                self._wake.set()
                return
            while self._unspooled and self.connected and len(self._inflight) < MAX_HANDED:
                topic, payload, retain = self._unspooled[0]
                info = self._publish(topic, payload, qos=1, retain=retain)
                if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:  # paho kept nothing: handed again later
                    return
                message = self._unspooled.popleft()
                if info.rc == mqtt.MQTT_ERR_PAYLOAD_SIZE:  # the broker's limit: as if refused
                    self._held.append(message)
                else:
                    self._unspooled_mids[info.mid] = message

    def remember_last_event(self, payload: str) -> None:
        """The retained `last_event`: sent now if connected, and again after every reconnect
        and Home Assistant restart."""
        self._retain(self.topics.last_event, payload, qos=1)

    def publish_health(self, health: HealthMessage) -> None:
        """Spool a health change (retained, QoS 1); the latest is re-sent on reconnect."""
        payload = health.to_payload()
        with self._retain_lock:
            self._retained[self.topics.health] = payload
        self._spool(self.topics.health, payload, retain=True)

    def publish_state(self, state: StateMessage) -> None:
        """Send the retained current state now if connected; it is re-sent after reconnects."""
        self._retain(self.topics.state, state.to_payload(), qos=1)

    def publish_metrics(self, metrics: MetricsMessage) -> None:
        """Send metrics (QoS 0, retained) if connected; the latest is re-sent after a reconnect
        and a Home Assistant restart. Metrics are not worth spooling. At each, what waits in
        memory since the spool could not be written goes into it if it can now (`_respool`)."""
        self._retain(self.topics.metrics, metrics.to_payload(), qos=0)
        self._respool()

    def _respool(self) -> None:
        """Move what waits in memory into the spool once it takes messages again. It waited for
        the next message to be spooled, which may come days later: a `kill -9` or a power cut
        meanwhile lost an event the broker never had, with no line (a full-disk review)."""
        with self._unspooled_lock:
            if not self._spool_failed or not (self._held or self._unspooled):
                return
            try:
                self._memory_to_spool()
            except sqlite3.Error:
                return  # still full: said once already
            self._spool_failed = False
        log.info("spool %s is written again", self.spool.path)
        self._wake.set()

    def publish_response(self, response: ResponseMessage, to: ReplyTo | None = None) -> None:
        """Reply to a command (QoS 1, not retained, never spooled: a reply is for whoever waits
        for it now) on `response`, and where an MQTT 5 command asked for it (`to`), with its
        Correlation Data (once, when that is `response` itself)."""
        payload = response.to_payload()
        if to is None or to.topic != self.topics.response:
            self._publish(self.topics.response, payload, qos=1)
        if to is not None:
            props = Properties(PacketTypes.PUBLISH)
            if to.correlation is not None:
                props.CorrelationData = to.correlation
            label = None if to.topic == self.topics.response else REPLY_LABEL
            self._publish(to.topic, payload, qos=1, properties=props, label=label)

    def set_discovery(self, configs: dict[str, dict[str, Any] | None]) -> None:
        """Set (and announce, if connected) the Home Assistant discovery configs; a config of
        None clears its topic (an empty retained message: Home Assistant removes the entity)."""
        with self._retain_lock:
            self.discovery = configs
            if self.connected:
                self._publish_discovery()

    def _publish(
        self,
        topic: str,
        payload: str,
        qos: int,
        retain: bool = False,
        props: bool = False,
        properties: Properties | None = None,
        label: str | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """Publish, remembering the topic of a QoS 1 message until its PUBACK says whether
        the broker took it; `props`: with this instance's name (availability); `properties`:
        these (a reply's Correlation Data); `label`: logged for the topic (REPLY_LABEL)."""
        properties = self._sender_props() if props else properties
        named = label or topic
        if self._max_packet:  # sizes measured only against a limit known
            size = _packet_size(topic, payload, qos, properties)
            if size > self._max_packet:
                return self._over_limit(named, size, self._max_packet, learned=False)
        with self._learned_lock:
            learned, expired = self._learned, None
            if learned and time.monotonic() - learned[1] >= self.size_relearn_s:
                self._learned, expired, learned = None, learned, None  # learned again, if the
                # broker still drops it
        if expired:
            log.info(
                "MQTT: payloads over the size learned %s ago (%d bytes) are tried again: the "
                "broker's limit may have been raised",
                _duration(self.size_relearn_s), expired[0],
            )  # fmt: skip
        if learned:
            body = len(payload.encode())
            if body > learned[0]:
                return self._over_limit(named, body, learned[0], learned=True)
        with self._mid_lock:  # its PUBACK may be resolved before publish() returns
            info = self.client.publish(
                topic, payload, qos=qos, retain=retain, properties=properties
            )
            if qos:
                self._topic_of[info.mid] = named
                if retain:
                    self._sent_on[info.mid] = self._connection
        return info

    def _over_limit(self, topic: str, size: int, limit: int, learned: bool) -> mqtt.MQTTMessageInfo:
        """A message over the broker's maximum packet size (`size` and `limit`: a packet's
        bytes), or over the payload size learned by `_set_aside_largest` (`learned`: a
        payload's), is not handed to paho: the broker would drop the connection for it, and
        paho send it again at every reconnect, the spool stuck behind it. Logged (per topic, at
        most every REFUSED_LOG_INTERVAL_S); a spooled one stays in the spool, offered again with
        the refused."""
        since = self._too_large.due(topic)
        if since is not None:
            log.error(
                "MQTT: %d message(s) on %s not sent: %d bytes, over the broker's %s (%d); raise "
                "%s in the broker's configuration%s (a spooled one stays in the spool, offered "
                "again every %s)",
                since, topic, size,
                "size limit as learned" if learned else "maximum packet size", limit,
                "message_size_limit" if learned else "max_packet_size",
                f" (tried again {_duration(self.size_relearn_s)} after the size was learned)"
                if learned else "", _duration(self.refused_retry_s),
            )  # fmt: skip
        info = mqtt.MQTTMessageInfo(0)
        info.rc = mqtt.MQTT_ERR_PAYLOAD_SIZE
        return info

    def _retain(self, topic: str, payload: str, qos: int) -> None:
        """Keep a retained message's latest payload; send it if connected."""
        with self._retain_lock:
            self._retained[topic] = payload
            if self.connected:
                self._publish(topic, payload, qos=qos, retain=True)

    def _latest_again(self, topic: str) -> None:
        """A retained message sent before the last reconnect was acknowledged after it: paho
        sends what was in flight again after `_on_connect`'s re-send of the latest, so the
        broker kept the older one (`anomaly` through a normal night). The latest once more."""
        with self._retain_lock:
            if self.connected:
                self._publish_retained(only=topic)

    def _publish_retained(self, only: str | None = None, skip: tuple[str, ...] = ()) -> None:
        """The latest retained messages again (after a reconnect, or Home Assistant's start),
        each at its topic's QoS: metrics at 0, as every metrics message; `only`: that topic's;
        not those of `skip`."""
        with self._retain_lock:
            for topic, payload in self._retained.items():
                if (only is None or topic == only) and topic not in skip:
                    qos = 0 if topic == self.topics.metrics else 1
                    self._publish(topic, payload, qos=qos, retain=True)

    def _clear_command(self, topic: str) -> str:
        """The mosquitto_pub line that clears a retained message of `topic` at this broker
        (without -h and -p it went to localhost:1883, in a field test), with this login."""
        s = self.settings
        words = ["mosquitto_pub", "-h", s.host or "localhost", "-p", str(s.port)]
        if s.username:
            words += ["-u", s.username, "-P", "PASSWORD"]
        if s.tls.enabled:
            words += (
                ["--cafile", str(s.tls.ca_file)]
                if s.tls.ca_file
                else ["--capath", "/etc/ssl/certs"]
            )
            if s.tls.cert_file and s.tls.key_file:
                words += ["--cert", str(s.tls.cert_file), "--key", str(s.tls.key_file)]
        return shlex.join([*words, "-r", "-n", "-t", topic])

    def _health_waiting(self) -> tuple[str, ...]:
        """The health topic when a health change still waits to be sent (in the spool, or in
        memory while it cannot be written), which ends at the latest; else nothing."""
        topic = self.topics.health
        with self._unspooled_lock:
            if any(t == topic for t, _, _ in (*self._held, *self._unspooled)):
                return (topic,)
        try:
            return (topic,) if self.spool.holds(topic) else ()
        except sqlite3.Error:  # a spool that cannot be read: the latest goes now
            return ()

    def _publish_discovery(self) -> None:
        with self._retain_lock:
            for topic, config in self.discovery.items():
                payload = "" if config is None else json.dumps(config)
                self._publish(topic, payload, qos=1, retain=True)

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush the spool as far as the broker allows within `timeout_s`, publish `offline`,
        disconnect. Unsent messages stay in the spool for the next start."""
        deadline = time.monotonic() + timeout_s
        self._closing.set()
        self._wake.set()
        while self.connected and self._pending() and time.monotonic() < deadline:
            time.sleep(CLOSE_POLL_S)
            self._wake.set()
        said = False
        if self.connected:
            info = self._publish(self.topics.availability, OFFLINE, 1, retain=True, props=True)
            while (  # an `offline` over the broker's packet limit was never handed to paho
                info.rc == mqtt.MQTT_ERR_SUCCESS
                and not info.is_published()
                and self.connected
                and time.monotonic() < deadline
            ):
                time.sleep(OFFLINE_POLL_S)
            said = info.rc == mqtt.MQTT_ERR_SUCCESS and info.is_published()
        # Unless the broker acknowledged `offline`, "disconnect with will message": a backlog
        # still draining holds `offline` behind it in paho's queue, and a plain DISCONNECT made
        # the broker drop the will, so it kept `online` (and the last state) for a device that
        # had stopped. Once acknowledged, a plain one: the will would say it twice.
        self.client.disconnect(
            reasoncode=ReasonCode(
                PacketTypes.DISCONNECT, "Normal disconnection" if said else WITH_WILL
            )
        )
        # paho joins its network thread without a limit, and that thread may be in a connect
        # attempt to an unanswering broker or DNS server: bounded here, so the daemon stops
        # well within systemd's TimeoutStopSec (the spool keeps what was not sent)
        stopper = threading.Thread(target=self.client.loop_stop, name="mqtt-stop", daemon=True)
        stopper.start()
        stopper.join(timeout=max(deadline - time.monotonic(), 0.0) + STOP_JOIN_S)
        self._sender.join(timeout=2)
        self._save_memory()

    def _save_memory(self) -> None:
        """At close: the messages waiting in memory (the spool could not be written), those
        handed to paho from memory without an answer among them, go into the spool if it takes
        them now, for the next start; else they are lost, and said so. A full card's events
        vanished at the end of a run that said only what the spool held (a review: 11 messages,
        four whole events, gone unsaid). The handed ones, in the order they were handed (those
        paho gave back among them), only once the sender thread has ended: it may still hand
        or answer them."""
        ended = not self._sender.is_alive()
        if ended:
            self._resolve_acks()  # the answers that came: accepted ones are not written again
        with self._unspooled_lock:
            handed = list(self._unspooled_mids.values()) if ended else []
            try:
                self._memory_to_spool(handed)
            except sqlite3.Error as exc:
                lost = len(self._held) + len(handed) + len(self._unspooled)
                log.error(
                    "MQTT: %d message(s) waiting in memory are lost: the spool %s cannot be "
                    "written (%s); free space on the card",
                    lost, self.spool.path, exc,
                )  # fmt: skip
                return
            if ended:
                self._unspooled_mids.clear()
            elif self._unspooled_mids:
                log.error(
                    "MQTT: %d message(s) handed to the broker from memory had no answer and are "
                    "lost if it did not take them: the sender did not stop in time",
                    len(self._unspooled_mids),
                )
