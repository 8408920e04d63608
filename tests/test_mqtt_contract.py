"""The MQTT contract against a real mosquitto: what the broker refuses is kept and said, what a
consumer reads after a reconnect is the newest, and every event message has its own key."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Broker, broker_with_example_acl, free_port, wait_for
from jsonschema import Draft202012Validator
from mqtt_helpers import Subscriber, read_only

from edge.messages import EventMessage
from edge.publish import MqttPublisher
from edge.settings import MqttSettings
from edge.spool import Spool
from edge.topics import Topics

ACL = ROOT / "deploy" / "mosquitto" / "acl"


def _event(kind: str, event_id: str = "e1", device_id: str = "pump-3") -> EventMessage:
    return EventMessage(
        type=kind,  # type: ignore[arg-type]
        event_id=event_id,
        device_id=device_id,
        model="m",
        started_at="2026-01-01T00:00:00.000Z",
        peak_score=2.0,
        threshold=1.0,
        ended_at="2026-01-01T00:00:05.000Z" if kind == "end" else None,
        duration_s=5.0 if kind == "end" else None,
    )


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Broker]:
    """A mosquitto with passwords (users pump-3 and consumer) and the example ACL."""
    broker = broker_with_example_acl(tmp_path, {"pump-3": "pw", "consumer": "pw"})
    yield broker
    broker.stop()


def _publisher(port: int, topics: Topics, spool: Spool, user: str | None = None) -> Any:
    settings = MqttSettings(
        host="127.0.0.1", port=port, reconnect_max_seconds=2, username=user, password="pw"
    )
    publisher = MqttPublisher(settings, topics, f"test-{topics.device_id}", spool)
    publisher.start()
    wait_for(lambda: publisher.connected, 10, "the publisher to connect")
    return publisher


def _all_acked(publisher: Any) -> bool:
    """Every spooled row handed to paho and its PUBACK read by the sender thread."""
    return not publisher._pending() and publisher._acked.empty() and not publisher._inflight


def test_publishes_the_acl_refuses_stay_in_the_spool_and_are_logged_once_per_topic(
    acl_broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Over MQTT 3.1.1 mosquitto PUBACKs a publish its ACL denies, so the spool deleted the
    event: lost without a trace. Over MQTT 5 the PUBACK says `Not authorized`."""
    caplog.set_level(logging.ERROR, logger="edge.publish")
    wrong = Topics("soundsentry", "pump-4")  # user pump-3 may write only soundsentry/pump-3/#
    spool = Spool(tmp_path / "wrong.sqlite")
    publisher = _publisher(acl_broker.port, wrong, spool, user="pump-3")
    try:
        for n in range(3):
            publisher.publish_event(_event("start", f"e{n}", "pump-4"))
        wait_for(lambda: publisher._handed == 3 and _all_acked(publisher), 10, "3 PUBACKs")
        assert spool.depth() == 3, "a refused event left the spool"
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        refused = [e for e in errors if "refused 1 message(s) on soundsentry/pump-4/events" in e]
        assert len(refused) == 1 and "Not authorized" in refused[0], errors
        assert "kept in the spool" in refused[0]
    finally:
        publisher.close(timeout_s=1)
        spool.close()

    right = Topics("soundsentry", "pump-3")  # the same user on its own topics: delivered
    consumer = Subscriber(acl_broker.port, "soundsentry/#", login=("consumer", "pw"))
    spool = Spool(tmp_path / "right.sqlite")
    publisher = _publisher(acl_broker.port, right, spool, user="pump-3")
    try:
        publisher.publish_event(_event("start"))
        assert consumer.wait_for(lambda _: bool(consumer.on("pump-3/events")), 10)
        wait_for(lambda: spool.depth() == 0, 10, "the accepted event to leave the spool")
    finally:
        publisher.close(timeout_s=1)
        spool.close()
        consumer.close()


BIG = json.dumps({"big": "x" * 1500})
"""A message over the size limits below."""


@contextmanager
def _size_limited(tmp_path: Path, conf: str) -> Iterator[tuple[Any, Spool, Subscriber, Broker]]:
    """A broker with `conf` (a size limit below BIG's), a publisher of pump-3 (offering refused
    messages again every second), its spool, a consumer of its events, and the broker."""
    broker = Broker(tmp_path, free_port(), extra_conf=conf)
    broker.start()
    consumer = Subscriber(broker.port, "soundsentry/pump-3/events")
    spool = Spool(tmp_path / "spool.sqlite")
    publisher = None
    try:
        publisher = _publisher(broker.port, Topics("soundsentry", "pump-3"), spool)
        publisher.refused_retry_s = 1.0
        yield publisher, spool, consumer, broker
    finally:
        if publisher is not None:
            publisher.close(timeout_s=1)
        spool.close()
        consumer.close()
        broker.stop()


@contextmanager
def _big_message_spooled(tmp_path: Path, conf: str, wait_s: float) -> Iterator[Any]:
    """`_size_limited`, its spool holding BIG and then an event: yields the publisher once the
    event reached the consumer (within `wait_s`) and BIG stays spooled; then an end event
    must get through too."""
    with _size_limited(tmp_path, conf) as (publisher, spool, consumer, _):
        publisher._spool(publisher.topics.events, BIG, retain=False)
        publisher.publish_event(_event("start"))
        assert consumer.wait_for(lambda _: bool(consumer.on("pump-3/events")), wait_s)
        wait_for(lambda: spool.depth() == 1, 10, "the event to leave the spool, the big to stay")
        assert all(json.loads(m.payload)["type"] == "start" for m in consumer.on("pump-3/events"))
        yield publisher
        publisher.publish_event(_event("end"))  # and what comes later gets through too
        kinds = lambda: [m.json().get("type") for m in consumer.on("pump-3/events")]  # noqa: E731
        assert consumer.wait_for(lambda _: "end" in kinds(), 10), kinds()  # a start may come
        assert set(kinds()) == {"start", "end"}  # twice (QoS 1 allows it), the big one never
        wait_for(lambda: spool.depth() == 1, 10, "the end to leave the spool, the big to stay")


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "edge.publish"]


def test_a_message_over_the_broker_s_packet_limit_stays_spooled_and_the_rest_get_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker with `max_packet_size` below a message dropped the connection for it, and paho
    sent it again at every reconnect, once a second: nothing spooled behind it was delivered
    (in a review), and the log said only "disconnected (Unspecified error)"."""
    caplog.set_level(logging.INFO, logger="edge.publish")
    with _big_message_spooled(tmp_path, "max_packet_size 1000\n", 10):
        over = [m for m in _said(caplog) if "over the broker's maximum packet size (1000)" in m]
        assert len(over) == 1 and "soundsentry/pump-3/events" in over[0], _said(caplog)
    assert not [m for m in _said(caplog) if "disconnected" in m], _said(caplog)


def test_a_message_over_the_broker_s_message_size_limit_stays_spooled_and_the_rest_get_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Mosquitto's `message_size_limit` (which it does not announce) answers a larger publish with
    a PUBACK reason MQTT 5 does not allow there; paho dropped the connection on it ("Protocol
    error") and sent the message again at every reconnect: nothing spooled behind it was
    delivered (a reconnect loop, in a review). Now the size is learned after two such drops in a
    row: the big message stays in the spool, and what came after it is delivered."""
    caplog.set_level(logging.INFO, logger="edge.publish")
    with _big_message_spooled(tmp_path, "message_size_limit 1000\n", 30) as publisher:
        learned = [m for m in _said(caplog) if "taken as over its size limit" in m]
        assert len(learned) == 1 and "soundsentry/pump-3/events" in learned[0], _said(caplog)
        drops = sum("disconnected" in m for m in _said(caplog))
        # offered again a second later, it is held back by the learned size, not sent
        wait_for(
            lambda: any("size limit as learned" in m for m in _said(caplog)), 10, "the next offer"
        )
    assert sum("disconnected" in m for m in _said(caplog)) == drops, _said(caplog)
    assert publisher.connected or publisher._closing.is_set()


def test_a_size_limit_learned_from_the_broker_is_tried_again_once_its_hold_is_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A size learned from the broker's drops held its messages until the daemon restarted:
    a user who raised mosquitto's `message_size_limit` as the log said, and did not restart the
    daemon, had the spooled event held for good (a leftover of the last notes). The learned
    size now holds for `size_relearn_s` (an hour); then the message is tried again, and a
    broker that takes it now gets it, without a restart."""
    caplog.set_level(logging.INFO, logger="edge.publish")
    limited = _size_limited(tmp_path, "message_size_limit 1000\n")
    with limited as (publisher, spool, consumer, broker):
        publisher.size_relearn_s = 3.0
        publisher._spool(publisher.topics.events, BIG, retain=False)
        wait_for(
            lambda: any("taken as over its size limit" in m for m in _said(caplog)), 30, "learning"
        )
        broker.stop()
        broker.conf.write_text(broker.conf.read_text().replace("message_size_limit 1000\n", ""))
        broker.start()  # the limit raised: the same port and folder
        got = lambda: [m.payload for m in consumer.on("pump-3/events")]  # noqa: E731
        assert consumer.wait_for(lambda _: BIG in got(), 30), _said(caplog)
        wait_for(lambda: spool.depth() == 0, 10, "the big message to leave the spool")
    again = [m for m in _said(caplog) if "are tried again: the broker's limit may have" in m]
    assert again and "(1510 bytes)" in again[0], _said(caplog)


@dataclass
class _Refusing:
    """A broker with the example ACL, and a publisher of user pump-3 on pump-4's topics, which
    that ACL refuses until `mend`; a consumer of every topic."""

    broker: Broker
    acl: Path
    consumer: Subscriber
    spool: Spool
    publisher: Any

    def mend(self) -> None:
        """pump-3 may write pump-4's topics too, once mosquitto has read its ACL again."""
        with self.acl.open("a") as f:
            f.write("\npattern write soundsentry/pump-4/#\n")
        assert self.broker.proc is not None
        self.broker.proc.send_signal(signal.SIGHUP)  # mosquitto reloads its ACL file


@contextmanager
def _refused_by_acl(tmp_path: Path, retry_s: float) -> Iterator[_Refusing]:
    """A `_Refusing` set-up whose refused messages are offered again every `retry_s`."""
    acl = tmp_path / "acl"
    shutil.copy(ACL, acl)
    broker = broker_with_example_acl(tmp_path, {"pump-3": "pw", "consumer": "pw"}, acl=acl)
    consumer = Subscriber(broker.port, "soundsentry/#", login=("consumer", "pw"))
    spool = Spool(tmp_path / "spool.sqlite")
    publisher = _publisher(broker.port, Topics("soundsentry", "pump-4"), spool, user="pump-3")
    publisher.refused_retry_s = retry_s
    try:
        yield _Refusing(broker, acl, consumer, spool, publisher)
    finally:
        publisher.close(timeout_s=1)
        spool.close()
        consumer.close()
        broker.stop()


def test_refused_publishes_reach_the_broker_once_its_acl_is_mended_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused events used to wait in the spool for the daemon's next start: a user who mended
    the broker's ACL after reading the error still had to restart the daemon to get them."""
    caplog.set_level(logging.INFO, logger="edge.publish")
    with _refused_by_acl(tmp_path, 1.0) as setup:
        publisher, spool, consumer = setup.publisher, setup.spool, setup.consumer
        for n in range(3):
            publisher.publish_event(_event("start", f"e{n}", "pump-4"))
        wait_for(lambda: publisher._handed == 3 and _all_acked(publisher), 10, "3 PUBACKs")
        assert spool.depth() == 3 and not consumer.on("pump-4/events")

        # offered again while the ACL still refuses: still kept, logged no more than once
        offers = []
        offer = publisher._offer_refused
        publisher._offer_refused = lambda: (offers.append(1), offer())
        wait_for(lambda: len(offers) >= 2, 10, "a second offer, after a second refusal")
        assert spool.depth() == 3 and not consumer.on("pump-4/events")
        refusals = [
            r.getMessage()
            for r in caplog.records
            if "on soundsentry/pump-4/events" in r.getMessage()
        ]
        assert len(refusals) == 1 and "offered again every 1 s" in refusals[0], refusals

        # an offer that the card fails half-way (reading the spool): the rows are offered again
        broken: list[int] = []

        def offer_on_a_failing_card() -> None:
            if broken:
                return offer()
            broken.append(1)
            after = spool.after
            spool.after = lambda *_a: (_ for _ in ()).throw(sqlite3.OperationalError("disk I/O"))
            try:
                offer()
            finally:
                spool.after = after

        publisher._offer_refused = offer_on_a_failing_card
        wait_for(lambda: broken, 10, "an offer on a failing card")

        setup.mend()
        wait_for(lambda: spool.depth() == 0, 15, "the refused events to be accepted")
        got = consumer.wait_for(lambda _: len(consumer.on("pump-4/events")) == 3, 10)
        assert got, consumer.on("pump-4/events")
        ids = [m.json()["event_id"] for m in consumer.on("pump-4/events")]
        assert ids == ["e0", "e1", "e2"]  # in their order
        assert any("accepted 3 message(s) it had refused" in r.getMessage() for r in caplog.records)


def test_the_size_learned_from_the_broker_s_drops_is_the_payload_s(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`message_size_limit` counts payload bytes. Learned by packet, a message the broker took
    (990 bytes on a long topic, in flight behind the one it refused, 1,001 bytes on a short
    one) had the larger packet, was blamed, and stayed in the spool until a restart (a review)."""
    caplog.set_level(logging.INFO, logger="edge.publish")
    with _size_limited(tmp_path, "message_size_limit 1000\n") as (publisher, spool, _, _):
        refused = json.dumps({"big": "y" * 990})  # 1,001 bytes
        long_topic = "soundsentry/pump-3/" + "t" * 80
        publisher._spool(publisher.topics.events, refused, retain=False)
        publisher._spool(long_topic, "x" * 990, retain=False)  # its packet is the larger
        wait_for(lambda: spool.depth() == 1, 30, "the long topic's message to be taken")
        assert spool.after(0, 1)[0].payload == refused
        learned = [m for m in _said(caplog) if "taken as over its size limit" in m]
        assert len(learned) == 1 and "1001 payload bytes on soundsentry/pump-3/events" in learned[0]


def test_what_is_taken_back_from_paho_goes_before_anything_newer(tmp_path: Path) -> None:
    """The sender read what `_set_aside_largest` took back before the reconnect was `connected`
    and handed newer rows first once it was: events 9 to 12 reached consumers before 5 to 8 (a
    review, with the sender paused between the two, as a busy Pi may pause it)."""
    with _size_limited(tmp_path, "message_size_limit 1000\n") as (publisher, _, consumer, _):
        resolve = publisher._resolve_acks

        def paused() -> None:  # as if pre-empted right after reading, until the reconnect
            resolve()
            if not publisher.connected and publisher._quick_drops >= 2:
                publisher._connected.wait(5)

        publisher._resolve_acks = paused
        events = publisher.topics.events
        publisher._spool(events, json.dumps({"n": 0}), retain=False)
        publisher._spool(events, BIG, retain=False)
        for n in range(1, 20):
            publisher._spool(events, json.dumps({"n": n}), retain=False)
            time.sleep(0.1 if n > 5 else 0)  # more come while the connection drops and returns

        def seen() -> list[Any]:
            return [m.json().get("n") for m in consumer.messages]

        assert consumer.wait_for(lambda _: 19 in seen(), 30), seen()
        first = list(dict.fromkeys(seen()))  # QoS 1 may deliver one twice
        assert first == list(range(20)), first  # in order, and BIG never


def test_a_message_waiting_in_memory_over_the_broker_s_limit_is_spooled_when_the_card_is_free(
    tmp_path: Path,
) -> None:
    """On a full card messages wait in memory; one over the broker's packet size was dropped
    when its turn came, while the log said such a message stays in the spool (a review)."""
    with _size_limited(tmp_path, "max_packet_size 1000\n") as (publisher, spool, consumer, _):
        read_only(spool, True)
        publisher._spool(publisher.topics.events, BIG, retain=False)
        publisher.publish_event(_event("start", "e1"))
        assert consumer.wait_for(lambda ms: len(ms) == 1, 10)  # sent from memory
        wait_for(lambda: not publisher._pending(), 10, "the memory's messages to be handed")
        read_only(spool, False)
        publisher.publish_event(_event("start", "e2"))  # the card has room again
        assert consumer.wait_for(lambda ms: len(ms) == 2, 10)
        wait_for(lambda: spool.depth() == 1, 10, "the event to leave the spool, the big to stay")
        assert "big" in json.loads(spool.after(0, 1)[0].payload)
        assert [m.json().get("event_id") for m in consumer.messages] == ["e1", "e2"]


def test_a_message_waiting_in_memory_that_the_broker_refuses_is_spooled_when_the_card_is_free(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On a full card messages wait in memory; one the broker refused (its ACL) was lost, there
    being no spool row to offer again. Now it goes into the spool once the card has room, and is
    offered from there until the ACL is mended; the refusal says where it waits."""
    caplog.set_level(logging.INFO, logger="edge.publish")
    with _refused_by_acl(tmp_path, 1.0) as setup:
        publisher, spool, consumer = setup.publisher, setup.spool, setup.consumer
        read_only(spool, True)
        publisher.publish_event(_event("start", "e1", "pump-4"))
        wait_for(lambda: not publisher._pending(), 10, "the refusal of the event in memory")
        refused = [m for m in _said(caplog) if "message(s) on soundsentry/pump-4/events" in m]
        assert len(refused) == 1 and "kept in memory" in refused[0], _said(caplog)
        read_only(spool, False)
        setup.mend()
        publisher.publish_event(_event("start", "e2", "pump-4"))  # the card has room again
        got = consumer.wait_for(lambda _: len(consumer.on("pump-4/events")) == 2, 15)
        assert got, consumer.on("pump-4/events")
        ids = sorted(m.json()["event_id"] for m in consumer.on("pump-4/events"))
        assert ids == ["e1", "e2"]
        wait_for(lambda: spool.depth() == 0, 10, "both to leave the spool")


def test_refused_publishes_are_offered_again_a_bounded_share_at_a_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every refused row of the spool was handed to paho at once at each offer, past the bound
    (MAX_HANDED) the sender keeps: after days of a refusing ACL, 10,000 messages every 5 min,
    and past 65,535 paho's message ids wrapped and accepted rows stayed in the spool (in a
    review). An offer hands them as the sender does, a share at a time."""
    from edge.publish import MAX_HANDED

    caplog.set_level(logging.INFO, logger="edge.publish")
    backlog = 2 * MAX_HANDED + 50
    with _refused_by_acl(tmp_path, 3600.0) as setup:  # the offer made due below
        publisher, spool, consumer = setup.publisher, setup.spool, setup.consumer
        for n in range(backlog):
            publisher.publish_event(_event("start", f"e{n}", "pump-4"))
        wait_for(lambda: publisher._handed and _all_acked(publisher), 20, "every PUBACK")
        wait_for(lambda: len(publisher._refused_rows) == backlog, 10, "every refusal read")
        handing: list[int] = []  # how many awaited their PUBACK as each was handed
        publish = publisher._publish

        def counted(*args: Any, **kw: Any) -> Any:
            handing.append(len(publisher._inflight))
            return publish(*args, **kw)

        publisher._publish = counted
        setup.mend()

        def ids() -> list[str]:
            return [m.json()["event_id"] for m in consumer.on("pump-4/events")]

        def mended() -> bool:  # a new event gets through: the broker reads the new ACL
            publisher.publish_event(_event("start", "probe", "pump-4"))
            return consumer.wait_for(lambda _: "probe" in ids(), 1)

        wait_for(mended, 15, "the broker to read its mended ACL")
        publisher.refused_retry_s = 1.0  # probes refused before it are offered too
        publisher._offer_refused_at = time.monotonic()  # the offer is due
        publisher._wake.set()
        wait_for(lambda: spool.depth() == 0, 30, "the refused events to be accepted")
        consumer.wait_for(lambda _: len([i for i in ids() if i != "probe"]) >= backlog, 10)
        assert [i for i in ids() if i != "probe"] == [f"e{n}" for n in range(backlog)]
        assert len(handing) >= backlog and max(handing) < MAX_HANDED, max(handing)
        said = [r.getMessage() for r in caplog.records if "it had refused" in r.getMessage()]
        assert len(said) == 1, said  # one line for the offer, not one for each share


DYNSEC = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


def test_a_refused_command_subscription_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The SUBACK used to go unread: a device whose broker refused its command topic looked
    fine while no command (nor Home Assistant's buttons) could reach it. mosquitto's acl_file
    grants every subscription (it filters at delivery); its dynamic-security plugin refuses."""
    if not Path(DYNSEC).exists():
        pytest.fail(f"{DYNSEC} is missing (apt-get install mosquitto)")
    caplog.set_level(logging.ERROR, logger="edge.publish")
    roles = [{"acltype": "subscribePattern", "topic": "homeassistant/status", "allow": True}]
    dynsec = tmp_path / "dynsec.json"
    dynsec.write_text(
        json.dumps(
            {
                "defaultACLAccess": {
                    "publishClientSend": True,
                    "publishClientReceive": True,
                    "subscribe": False,
                    "unsubscribe": True,
                },
                "clients": [],
                "groups": [{"groupname": "anon", "roles": [{"rolename": "r"}]}],
                "roles": [{"rolename": "r", "acls": roles}],
                "anonymousGroup": "anon",
            }
        )
    )
    broker = Broker(tmp_path, free_port(), f"plugin {DYNSEC}\nplugin_opt_config_file {dynsec}\n")
    broker.start()
    spool = Spool(tmp_path / "spool.sqlite")
    publisher = _publisher(broker.port, Topics("soundsentry", "pump-3"), spool)
    try:
        what = "the refused subscription to be logged"
        wait_for(lambda: _errors(caplog, "subscription to soundsentry/pump-3/set"), 10, what)
        assert "commands" in _errors(caplog, "subscription")[0]
        assert len(_errors(caplog, "subscription")) == 1, "homeassistant/status was granted"
    finally:
        publisher.close(timeout_s=1)
        spool.close()
        broker.stop()


def _errors(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and text in r.getMessage()
    ]


def test_every_message_of_an_event_has_its_own_dedupe_key(broker: Broker, tmp_path: Path) -> None:
    """All `update`s of one event share event_id, type and started_at: a consumer deduplicating
    on them, as the README said, dropped every update after the first."""
    schema = json.loads((ROOT / "edge" / "schemas" / "event.schema.json").read_text())
    validator = Draft202012Validator(schema)
    sub = Subscriber(broker.port, "soundsentry/pump-3/events")
    spool = Spool(tmp_path / "spool.sqlite")
    publisher = _publisher(broker.port, Topics("soundsentry", "pump-3"), spool)
    try:
        for event_id, kinds in [("e1", "start update update end"), ("e2", "start update end")]:
            for kind in kinds.split():
                publisher.publish_event(_event(kind, event_id))
        assert sub.wait_for(lambda ms: len(ms) == 7, 10)
    finally:
        publisher.close(timeout_s=1)
        spool.close()
        sub.close()
    got = [m.json() for m in sub.messages]
    for message in got:
        assert not list(validator.iter_errors(message)), message
    assert [(m["event_id"], m["type"], m["seq"]) for m in got] == [
        ("e1", "start", 0),
        ("e1", "update", 1),
        ("e1", "update", 2),
        ("e1", "end", 3),
        ("e2", "start", 0),
        ("e2", "update", 1),
        ("e2", "end", 2),
    ]
    old = EventMessage.from_payload(json.dumps({k: v for k, v in got[1].items() if k != "seq"}))
    assert old.seq is None, "a payload of an older version still parses"


def _reannounces_at_birth(
    port: int,
    topics: Topics,
    birth: str,
    spool: Spool,
    caplog: pytest.LogCaptureFixture,
    user: str | None = None,
) -> None:
    """Home Assistant's birth message, sent to `birth` by a consumer (logged in as `consumer`
    when the device logs in as `user`), makes the device re-announce its discovery."""
    caplog.set_level(logging.INFO, logger="edge.publish")
    publisher = _publisher(port, topics, spool, user)
    ha = Subscriber(port, "soundsentry/#", login=("consumer", "pw") if user else None)
    try:
        wait_for(lambda: not publisher._subscribed, 10, "its SUBACK")  # before the birth
        ha.client.publish(birth, "online", qos=1).wait_for_publish(5)
        announced = "Home Assistant is online: re-announcing discovery"
        wait_for(lambda: any(announced in r.getMessage() for r in caplog.records), 10, announced)
    finally:
        ha.close()
        publisher.close(timeout_s=1)
        spool.close()


def test_the_example_acl_lets_home_assistants_birth_message_reach_the_devices(
    acl_broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The consumer could not write homeassistant/status: Home Assistant's birth message was
    refused, so devices never re-announced discovery after Home Assistant restarted."""
    topics = Topics("soundsentry", "pump-3")
    spool = Spool(tmp_path / "spool.sqlite")
    _reannounces_at_birth(acl_broker.port, topics, "homeassistant/status", spool, caplog, "pump-3")


@pytest.mark.parametrize("birth", ["homeassistant/status", "ha/status"])
def test_a_changed_discovery_prefix_still_hears_home_assistant_restart(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture, birth: str
) -> None:
    """With [mqtt] discovery_prefix changed the daemon listened for the birth message under
    that prefix only; Home Assistant sends it to homeassistant/status unless its birth topic
    is changed too, so a restart of Home Assistant never brought discovery back."""
    topics = Topics("soundsentry", "pump-3", "ha")
    _reannounces_at_birth(broker.port, topics, birth, Spool(tmp_path / "spool.sqlite"), caplog)


def test_an_old_refused_health_offered_again_does_not_stay_the_retained_one(
    tmp_path: Path,
) -> None:
    """A refused health message offered after a newer accepted one became the broker's
    retained health: Home Assistant showed a fault long recovered."""
    from edge.messages import HealthMessage

    def health(change: str) -> HealthMessage:
        status = "fault" if change.startswith("fault") else "ok"
        faults = ["silence"] if status == "fault" else []
        return HealthMessage(status, "pump-4", "2026-01-01T00:00:00.000Z", faults, change)

    # the offer made due below, once the newer one is accepted
    with _refused_by_acl(tmp_path, 3600.0) as setup:
        publisher, spool, broker = setup.publisher, setup.spool, setup.broker
        publisher.publish_health(health("fault:silence"))  # refused
        wait_for(lambda: publisher._handed == 1 and _all_acked(publisher), 10, "the refusal")
        setup.mend()
        wait_for(lambda: _accepted(broker.port, "soundsentry/pump-4/probe"), 10, "the reload")
        publisher.publish_health(health("recovered:silence"))  # accepted, before the offer
        wait_for(lambda: spool.depth() == 1 and _all_acked(publisher), 10, "the newer one in")
        publisher._offer_refused_at = time.monotonic()  # the offer is due
        wait_for(lambda: spool.depth() == 0, 15, "the old one accepted too")
        wait_for(lambda: _all_acked(publisher), 10, "every PUBACK")
        later = Subscriber(broker.port, "soundsentry/pump-4/health", login=("consumer", "pw"))
        try:
            assert later.wait_for(lambda ms: bool(ms), 10)
            assert later.messages[-1].json()["change"] == "recovered:silence"
        finally:
            later.close()


def _accepted(port: int, topic: str) -> bool:
    """Whether the broker accepts a publish of user pump-3 on `topic` (MQTT 5's PUBACK)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set("pump-3", "pw")
    acked: list[bool] = []
    client.on_publish = lambda _c, _u, _mid, reason, _p: acked.append(not reason.is_failure)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, b"probe", qos=1)
        deadline = time.monotonic() + 5
        while not acked and time.monotonic() < deadline:
            time.sleep(0.02)
        return bool(acked and acked[0])
    finally:
        client.loop_stop()
        client.disconnect()


def test_the_readmes_command_clears_a_retired_device_from_the_broker(tmp_path: Path) -> None:
    """The README's one-liner to clear a retired device's retained discovery configs named no
    broker or login, and under the example ACL nobody could both read and write those topics
    (the consumer's empty publishes were dropped silently): the device stayed in Home
    Assistant. Its own retained topics stayed too. The ACL's `maintenance` user can."""
    import subprocess

    users = {"pump-3": "pw", "consumer": "pw", "maintenance": "mpw"}
    broker = broker_with_example_acl(tmp_path, users)
    device = Subscriber(broker.port, "soundsentry/pump-3/set", login=("pump-3", "pw"))
    retained = [
        f"homeassistant/{k}/soundsentry_pump-3/{e}/config"
        for k, e in (("sensor", "score"), ("binary_sensor", "anomaly"), ("button", "mark_normal"))
    ]
    retained += ["soundsentry/pump-3/availability", "soundsentry/pump-3/state"]  # fmt: skip
    port = str(broker.port)

    def retained_now() -> set[str]:
        """The retained topics a consumer reads (mosquitto_sub ends with its -W timeout)."""
        got = subprocess.run(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-u", "consumer", "-P", "pw",
             "-t", "homeassistant/#", "-t", "soundsentry/#", "--retained-only", "-v", "-W", "2"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert "rror" not in got.stderr and "authori" not in got.stderr, got.stderr
        return {line.split(" ", 1)[0] for line in got.stdout.splitlines()}

    try:
        for topic in retained:
            device.client.publish(topic, "{}", qos=1, retain=True).wait_for_publish(5)
        assert retained_now() == set(retained), "the device's retained topics are there to clear"
        command = (  # the README's, with this broker's address
            f"mosquitto_sub -h 127.0.0.1 -p {port} -u maintenance -P mpw "
            "-t 'homeassistant/+/soundsentry_pump-3/+/config' -t 'soundsentry/pump-3/#' "
            "--retained-only --remove-retained -W 2"
        )
        cleared = subprocess.run(
            ["bash", "-c", command], check=False, timeout=30, capture_output=True, text=True
        )
        assert "rror" not in cleared.stderr and "authori" not in cleared.stderr, cleared.stderr
        assert retained_now() == set()
    finally:
        device.close()
        broker.stop()


def _instance(port: int, spool: Spool, instance: str, user: str = "pump-3") -> Any:
    settings = MqttSettings(
        host="127.0.0.1", port=port, reconnect_max_seconds=2, username=user, password="pw"
    )
    client_id = f"test-{user}-{spool.path.stem}"  # each Pi has its own client id
    publisher = MqttPublisher(
        settings, Topics("soundsentry", user), client_id, spool, None, instance
    )
    publisher.start()
    wait_for(lambda: publisher.connected, 10, "the publisher to connect")
    return publisher


def _availability(publisher: Any, payload: str, sender: str | None) -> Any:
    """An availability message as paho hands it over, from `sender` (None: no property)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edge.publish import INSTANCE_KEY

    msg = mqtt.MQTTMessage(topic=publisher.topics.availability.encode())
    msg.payload = payload.encode()
    msg.properties = Properties(PacketTypes.PUBLISH)
    if sender is not None:
        msg.properties.UserProperty = [(INSTANCE_KEY, sender)]
    return msg


def test_two_devices_under_one_device_id_each_log_the_other(
    acl_broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pis cloned from one card keep the host name the device_id defaults to: two daemons then
    published to one set of topics, events and states of two machines mixed, and nothing said
    so. Through the example ACL, each now hears the other's `online` and logs it; its own
    messages (a restart's), a replay's, an `offline` and another program's say nothing."""
    caplog.set_level(logging.INFO, logger="edge.publish")
    spools = [Spool(tmp_path / f"{n}.sqlite") for n in range(2)]
    first = _instance(acl_broker.port, spools[0], "host pi-a, /var/lib/soundsentry, machine 1")
    second = None
    try:
        wait_for(lambda: not first._subscribed, 10, "its SUBACK")
        assert first.duplicates == {}  # its own `online` is not echoed back (no local)
        second = _instance(acl_broker.port, spools[1], "host pi-a, /var/lib/soundsentry, machine 2")
        wait_for(lambda: first.duplicates and second.duplicates, 10, "both to hear the other")
        assert list(first.duplicates) == [second.instance]  # live, as it came online
        assert list(second.duplicates) == [first.instance]  # retained, as it connected
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2 and all("machine 2" in e or "machine 1" in e for e in errors)
        assert "own device_id" in errors[0] and "soundsentry/pump-3/" in errors[0]
        # and for as long as it runs: in `status` and the line `systemctl status` shows
        from conftest import DEMO_BUNDLE

        from edge.bundle import load_bundle
        from edge.daemon import Detector
        from edge.settings import Settings
        from edge.sink import MqttSink

        settings = Settings(device_id="pump-3", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
        daemon = Detector(settings, load_bundle(DEMO_BUNDLE), [MqttSink(first)])
        assert daemon.status()["same_device_id"] == [second.instance]
        line = daemon._status_line()
        assert line.startswith("listening with ") and f"({second.instance})" in line, line
    finally:
        for publisher in (first, second):
            if publisher is not None:
                publisher.close(timeout_s=1)
        for s in spools:
            s.close()

    for payload, sender in (
        ("online", first.instance),  # its own, retained from before a restart
        ("online", "host pi-a, /tmp/x, machine 1 (replay)"),  # `run --input` as the device
        ("offline", "host pi-b, /var/lib/soundsentry, machine 3"),  # a clone gone (its will)
        ("online", None),  # another program, or an older SoundSentry
    ):
        first._check_instance(_availability(first, payload, sender))
    assert list(first.duplicates) == [second.instance]
    third = "host pi-c, /var/lib/soundsentry, machine 4"
    first._check_instance(_availability(first, "online", third))
    assert list(first.duplicates) == [second.instance, third]


def test_a_replay_as_the_device_leaves_the_running_daemon_online(
    acl_broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`replay` with the device's config announces itself on the device's availability and
    says `offline` when it ends: the broker kept that while the device's daemon ran on, and
    every Home Assistant entity of the device was unavailable until the daemon next
    reconnected (a review's reproduction). The daemon now says `online` again. The replay's
    discovery configs (its model, its threshold's bounds, a button cleared) stayed too, the
    device's entities showing the replay's model until Home Assistant restarted (an
    integrator's review): the daemon announces its own again."""
    spools = [Spool(tmp_path / f"{n}.sqlite") for n in range(2)]
    name = "host pi-a, /var/lib/soundsentry, machine 1"
    _instance(acl_broker.port, spools[0], name).close(timeout_s=2)  # leaves its `offline`
    caplog.set_level(logging.INFO, logger="edge.publish")
    daemon = _instance(acl_broker.port, spools[0], name)  # restarted: its own, not another's
    number = "homeassistant/number/soundsentry_pump-3/threshold/config"
    button = "homeassistant/button/soundsentry_pump-3/mark_normal/config"
    daemon.set_discovery({number: {"max": 2.8, "model": "fan-demo"}, button: {"name": "Mark"}})
    replay = None
    try:
        wait_for(lambda: not daemon._subscribed, 10, "its SUBACK")
        assert "another instance left" not in caplog.text
        replay = _instance(acl_broker.port, spools[1], "host pi-a, /tmp/x, machine 1 (replay)")
        replay.set_discovery({number: {"max": 0.2, "model": "fan-autoencoder"}, button: None})
        configs = Subscriber(acl_broker.port, number, "test-ha-configs", login=("consumer", "pw"))
        try:
            assert configs.wait_for(lambda m: m and "fan-autoencoder" in m[-1].payload, 10)
        finally:
            configs.close()
        replay.close(timeout_s=2)
        watcher = Subscriber(
            acl_broker.port, daemon.topics.availability, "test-ha", login=("consumer", "pw")
        )
        try:
            assert watcher.wait_for(lambda m: bool(m), 10), "the retained availability"
            assert watcher.wait_for(lambda m: m[-1].payload == "online", 10), watcher.messages
        finally:
            watcher.close()
        for topic, config in ((number, "fan-demo"), (button, "Mark")):
            kept = Subscriber(acl_broker.port, topic, "test-ha-kept", login=("consumer", "pw"))
            try:  # what the broker keeps now: Home Assistant reads it at its next start
                assert kept.wait_for(lambda m, c=config: m and c in m[-1].payload, 10), (
                    kept.messages
                )
            finally:
                kept.close()
        assert daemon.duplicates == {}  # a replay is no second device
        assert "another instance left" in caplog.text
    finally:
        daemon.close(timeout_s=1)
        for s in spools:
            s.close()


def test_doctor_fails_a_login_whose_publishes_the_acl_refuses(acl_broker: Broker) -> None:
    """The broker accepted the login of user pump-3 for device_id raspberrypi (a cloned
    card's host name) and doctor said PASS, while the ACL refused every publish: MQTT 3.1.1
    does not say so. Doctor now logs in over MQTT 5 as the daemon does and publishes once."""
    from edge.doctor import check_broker
    from edge.settings import Settings

    def doctor(device_id: str) -> Any:
        mqtt = {"host": "127.0.0.1", "port": acl_broker.port, "username": "pump-3",
                "password": "pw"}  # fmt: skip
        return check_broker(Settings(device_id=device_id, mqtt=mqtt))

    refused = doctor("raspberrypi")
    assert refused.ok is False, refused
    assert "refuses publishing to soundsentry/raspberrypi/doctor" in refused.detail
    assert "device_id must equal the MQTT user name" in refused.fix
    ok = doctor("pump-3")
    assert ok.ok is True and "a publish to soundsentry/pump-3/doctor" in ok.detail, ok


def test_a_command_message_beyond_the_inbound_limit_never_reaches_the_device(
    broker: Broker, tmp_path: Path
) -> None:
    """A 120-MB message on the command topic (retained: again at every start) was read whole
    into the daemon's memory before its 64-KB check, 437 MB against the unit's MemoryMax of
    300 MB (in a review). The CONNECT now tells the broker the largest packet it takes, and
    the broker drops larger ones; one between 64 KB and that still gets its rejection."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge.publish import MAX_INBOUND_PACKET_BYTES

    topics = Topics("soundsentry", "pump-3")
    sizes: list[int] = []
    settings = MqttSettings(host="127.0.0.1", port=broker.port, reconnect_max_seconds=2)
    spool = Spool(tmp_path / "spool.sqlite")
    publisher = MqttPublisher(
        settings, topics, "test-big", spool, lambda p, _to: sizes.append(len(p))
    )
    publisher.start()
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sender")
    sender.connect("127.0.0.1", broker.port)
    sender.loop_start()
    try:
        wait_for(lambda: publisher.connected, 10, "the publisher to connect")

        def heard(size: int) -> bool:
            sender.publish(topics.command, b"x" * size, qos=1)
            return size in sizes

        wait_for(lambda: heard(1), 10, "a first command heard")  # subscribed by then
        big = MAX_INBOUND_PACKET_BYTES + 1
        sender.publish(topics.command, b"x" * big, qos=1).wait_for_publish(10)
        sender.publish(topics.command, b"x" * 100_000, qos=1).wait_for_publish(10)
        sender.publish(topics.command, b"x" * 2, qos=1).wait_for_publish(10)
        wait_for(lambda: 2 in sizes, 10, "the command sent after the big one")
        assert 100_000 in sizes and big not in sizes, sizes
    finally:
        sender.loop_stop()
        sender.disconnect()
        publisher.close()


@pytest.mark.parametrize(
    ("topic", "refused"),
    [
        ("nodered/replies/7", True),  # another system's: the device would write there for
        ("zigbee2mqtt/plug/set", True),  # whoever may command it (the diff review)
        ("soundsentry/pump-3/response", False),
        ("soundsentry/pump-3/response/flow", False),
        ("soundsentry/pump-3/responsex", True),  # not below response
        ("soundsentry/pump-3/state", True),  # the device's own retained state
        ("soundsentry/pump-4/response", True),  # another device's
        ("soundsentry", True),
        ("ha/sensor/x/config", True),  # the discovery prefix, moved
        ("homeassistant/status", True),  # HA's birth topic, which every device reads
        ("$SYS/broker", True),
        ("flows/+/x", True),
        ("x" * 1025, True),
    ],
)
def test_a_response_topic_where_devices_or_home_assistant_read_is_refused(
    topic: str, refused: bool
) -> None:
    """Only `response` and below: elsewhere a reply would stand in for another device's state,
    an HA entity or another system's command; with the discovery prefix moved,
    `homeassistant/status` (which every device reads) was taken."""
    from edge.publish import _reply_topic_refusal

    topics = Topics("soundsentry", "pump-3", "ha")
    assert (_reply_topic_refusal(topic, b"c", topics) is not None) == refused
    big = b"c" * 1025  # its correlation data
    assert _reply_topic_refusal("soundsentry/pump-3/response/x", big, topics) is not None


def test_refused_response_topics_are_logged_once_each_up_to_64_then_said_no_more(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refused response topic was a line of its own, without end (and 65 where README
    says 64: the diff review); the 64th says that no more are logged."""
    from types import SimpleNamespace

    from edge.publish import REPLY_TOPICS_WARNED

    spool = Spool(tmp_path / "spool.sqlite")
    topics = Topics("soundsentry", "pump-3")
    publisher = MqttPublisher(MqttSettings(host="127.0.0.1"), topics, "t", spool)
    try:
        for i in range(REPLY_TOPICS_WARNED + 10):
            for _ in range(2):  # the same topic twice: said once
                props = SimpleNamespace(ResponseTopic=f"elsewhere/{i}", CorrelationData=b"c")
                assert publisher._reply_to(SimpleNamespace(properties=props)) is None
    finally:
        spool.close()
    said = [r.getMessage() for r in caplog.records if "response topic" in r.getMessage()]
    assert len(said) == REPLY_TOPICS_WARNED
    assert [("not logged until a restart" in line) for line in said] == [False] * 63 + [True]
