"""Field daemon building blocks: spool, liveness, clips, commands, discovery, schemas."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import full_disk
from jsonschema import Draft202012Validator

from edge.clips import CaptureRing, ClipRecorder
from edge.commands import CommandError, parse_command
from edge.health import RECOVER_SECONDS, AudioHealth, level_dbfs
from edge.messages import (
    EventMessage,
    HealthMessage,
    MetricsMessage,
    ResponseMessage,
    StateMessage,
)
from edge.sdnotify import SystemdNotifier
from edge.spool import Spool

SCHEMAS = Path(__file__).resolve().parent.parent / "edge" / "schemas"
RATE = 16000


def schema(name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((SCHEMAS / f"{name}.schema.json").read_text()))


# --- spool ----------------------------------------------------------------------------------


def test_spool_is_durable_ordered_and_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.sqlite"
    spool = Spool(path, max_messages=3)
    ids = [spool.append("t", f"m{i}") for i in range(5)]
    assert spool.depth() == 3 and spool.dropped == 2
    full = [r.getMessage() for r in caplog.records if "spool full" in r.getMessage()]
    assert full == [
        "spool full (3 messages): dropped 1 since the last report (replaced retained messages "
        "and anomaly updates first, then the oldest)"
    ]
    spool.close()
    again = Spool(path, max_messages=3)  # a restart (or kill -9) keeps what was stored
    rows = again.after(0)
    assert [r.payload for r in rows] == ["m2", "m3", "m4"] and [r.id for r in rows] == ids[2:]
    again.remove(rows[0].id)
    assert [r.payload for r in again.after(0)] == ["m3", "m4"]
    assert [r.payload for r in again.after(rows[1].id)] == ["m4"]
    assert again.dropped == 2


def test_the_last_drops_of_a_burst_are_logged_without_a_later_drop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drops after a report waited for a later drop 15 minutes on to be logged: those at the end
    of an outage never were (in a review). The periodic figures report them once due."""
    import edge.spool

    spool = Spool(tmp_path / "spool.sqlite", max_messages=3)
    for i in range(6):
        spool.append("t", f"m{i}")
    assert spool.dropped == 3

    def reported() -> list[str]:
        return [r.getMessage() for r in caplog.records if "spool full" in r.getMessage()]

    assert len(reported()) == 1 and "dropped 1 since" in reported()[0]
    monkeypatch.setattr(edge.spool, "FULL_LOG_EVERY_S", 0.0)  # 15 minutes on
    assert spool.stats() == (3, 3)
    assert len(reported()) == 2 and "dropped 2 since" in reported()[1]
    spool.stats()
    assert len(reported()) == 2, "each drop is reported once"
    monkeypatch.setattr(edge.spool, "FULL_LOG_EVERY_S", 3600.0)
    spool.append("t", "m6")  # dropped within the hour of the last report: said at the close
    assert len(reported()) == 2
    spool.close()
    assert len(reported()) == 3 and "dropped 1 since" in reported()[2]


def test_acknowledged_messages_leave_the_spool_in_one_unsynced_transaction(
    tmp_path: Path,
) -> None:
    """Each acknowledged row was deleted in a synced commit of its own: with the insert's,
    two syncs and ~30 KB written to the card per message, 7.5 GB a month through a long fault
    (an SD-card review, under strace). The sender deletes what the broker took in one
    transaction, left unsynced (the next append's sync takes it; a power cut only sends
    them again)."""
    from edge.spool import Spool

    wal: dict[str, int] = {}
    for how in ("one by one", "together"):
        path = tmp_path / f"{how}.sqlite"
        spool = Spool(path)
        ids = [spool.append("t", "x" * 500) for _ in range(100)]
        before = Path(f"{path}-wal").stat().st_size
        if how == "together":
            said: list[str] = []
            spool._db.set_trace_callback(said.append)
            spool.remove_many(ids)
            spool._db.set_trace_callback(None)
            said = [
                s.split()[0] if s.startswith(("BEGIN", "COMMIT", "DELETE")) else s for s in said
            ]
            # the transaction is committed unsynced: no fsync of its own (strace shows none)
            assert said[:2] == ["PRAGMA synchronous=NORMAL", "BEGIN"], said[:3]
            assert said[-2:] == ["COMMIT", "PRAGMA synchronous=FULL"], said[-3:]
        else:
            for i in ids:
                spool.remove(i)
        wal[how] = Path(f"{path}-wal").stat().st_size - before
        assert spool.depth() == 0 == len(spool.after(0))
        assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
        spool.close()
    assert wal["together"] * 10 < wal["one by one"], wal


def test_the_spool_counts_its_messages_without_a_count_per_message(tmp_path: Path) -> None:
    """Every append ran COUNT(*), a scan of the whole outbox: 8 ms at 10,000 rows and 98 ms at
    100,000, on the audio loop, for every message of a long broker outage. The count is kept
    instead, and stays true across drops, removals and a restart."""
    path = tmp_path / "spool.sqlite"
    spool = Spool(path, max_messages=5)
    statements: list[str] = []
    spool._db.set_trace_callback(statements.append)
    ids = [spool.append("t", f"m{i}", retain=i % 3 == 0) for i in range(8)]
    spool.remove(ids[-1])
    spool.remove(ids[-1])  # acknowledged twice (QoS 1): counted once
    assert spool.stats() == (4, 3) and spool.depth() == 4 == len(spool.after(0))
    assert not [s for s in statements if "COUNT(" in s.upper()], "a COUNT(*) per message"
    spool.close()
    again = Spool(path, max_messages=5)  # counted once at the start
    assert again.depth() == 4
    again.close()


def test_a_run_that_ends_with_messages_undelivered_says_where_they_wait(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A replay against a broker that was down ended on its summary line alone: nothing said
    that its events waited in the spool for the next start (or, in memory, were lost)."""
    from edge.service import _say_undelivered

    spool = Spool(tmp_path / "spool.sqlite")
    _say_undelivered(spool)
    assert "did not take" not in caplog.text, "nothing to say when all went"
    for n in range(3):
        spool.append("d/events", f"m{n}")
    _say_undelivered(spool)
    assert f"3 message(s) the broker did not take wait in the spool {spool.path}" in caplog.text
    memory = Spool(None)
    memory.append("d/events", "m")
    _say_undelivered(memory)
    assert "1 message(s) the broker did not take are lost" in caplog.text
    spool.close()


def test_a_full_spool_drops_what_a_consumer_can_best_do_without_first(tmp_path: Path) -> None:
    """An anomaly through a day's broker outage: its updates (one every few seconds) used to
    push its own `start`, and every event before it, out of a full spool."""
    spool = Spool(tmp_path / "spool.sqlite", max_messages=6)

    def event(kind: str, n: int) -> str:
        return json.dumps({"type": kind, "event_id": f"e{n}"})

    spool.append("d/events", event("start", 1))
    spool.append("d/events", event("end", 1))
    spool.append("d/health", '{"faults": ["silence"]}', retain=True)
    spool.append("d/events", event("start", 2))
    spool.append("d/health", '{"faults": []}', retain=True)  # replaces the first health
    spool.append("d/availability", "online", retain=True)  # not JSON: never an update
    for n in range(20):
        spool.append("d/events", event("update", n))
    kept = [(r.topic, r.payload) for r in spool.after(0)]
    assert kept == [
        ("d/events", event("start", 1)),
        ("d/events", event("end", 1)),
        ("d/events", event("start", 2)),
        ("d/health", '{"faults": []}'),
        ("d/availability", "online"),
        ("d/events", event("update", 19)),  # the latest update stays
    ]
    assert spool.dropped == 20
    spool.append("d/events", event("end", 2))  # the last update goes
    spool.append("d/events", event("start", 3))  # nothing expendable left: the oldest goes,
    assert [(r.topic, r.payload) for r in spool.after(0)] == [  # a start never sent, so its
        ("d/events", event("start", 2)),  # end goes with it: nobody saw that event
        ("d/health", '{"faults": []}'),
        ("d/availability", "online"),
        ("d/events", event("end", 2)),
        ("d/events", event("start", 3)),
    ]
    assert spool.dropped == 23


def test_a_full_spool_keeps_the_end_of_an_alarm_that_may_have_been_raised(tmp_path: Path) -> None:
    """A long outage with frequent events fills the spool with starts and ends: dropping the
    oldest dropped the `end` of an alarm whose `start` had gone out before the outage, and a
    consumer that pairs them kept that alarm open for good (a network review). Such an end
    stays; an event whose start never left goes whole, its end too, even one still to come."""
    spool = Spool(tmp_path / "spool.sqlite", max_messages=4)

    def event(kind: str, n: int) -> str:
        return json.dumps({"type": kind, "event_id": f"e{n}"})

    spool.claim(spool.append("d/events", event("start", 1)))  # sent; then the link died
    spool.append("d/events", event("end", 1))
    for n in range(2, 6):  # the outage's events, never sent
        spool.append("d/events", event("start", n))
        spool.append("d/events", event("end", n))
    assert [r.payload for r in spool.after(0)] == [event("end", 1), event("start", 5),
                                                   event("end", 5)]  # fmt: skip
    for n in range(6, 10):  # four starts: the oldest unsent events go whole, e6 still open
        spool.append("d/events", event("start", n))
    spool.append("d/events", event("end", 6))  # its start is gone: nobody may see this end
    assert [r.payload for r in spool.after(0)] == [event("end", 1)] + [
        event("start", n) for n in range(7, 10)
    ]
    spool.close()
    again = Spool(tmp_path / "spool.sqlite", max_messages=4)  # a restart: the last run may
    again.append("d/events", event("start", 10))  # have handed any of its rows
    again.append("d/events", event("end", 7))
    assert event("end", 7) in [r.payload for r in again.after(0)], "its start may be out"
    assert again.dropped == 13, again.dropped  # 11 in the first run, then s7 and s8
    again.append("d/events", event("end", 6))  # a restart's interrupted end of e6: no start
    assert event("end", 6) not in [r.payload for r in again.after(0)]  # went out, last run
    assert again.dropped == 14, again.dropped
    again.close()


def _start(event: str) -> str:
    return json.dumps({"type": "start", "event_id": event})


def _spool_of_the_earlier_release(path: Path, payloads: list[str]) -> None:
    """A spool file as the release before event columns wrote it, holding `payloads` (events
    topic, QoS 1, not retained) in order."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(
            "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
            "payload TEXT NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, "
            "created REAL NOT NULL); CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER "
            "NOT NULL);"
        )
        db.executemany("INSERT INTO outbox (topic, payload, qos, retain, created) VALUES "
                       "('d/events', ?, 1, 0, 0)", [(p,) for p in payloads])  # fmt: skip


def test_a_spool_of_the_earlier_release_keeps_the_ends_of_alarms_raised(tmp_path: Path) -> None:
    """A spool written before events were indexed, opened after an upgrade during an outage:
    its rows had no event id or type, so the end of an alarm raised before the outage was
    dropped first (a review). They are read from the rows' JSON at open."""
    path = tmp_path / "spool.sqlite"
    rows = [json.dumps({"type": "end", "event_id": "A"}), "not json", '{"type": "end"}']
    _spool_of_the_earlier_release(path, rows + [_start(e) for e in "BC"])
    spool = Spool(path, max_messages=5)
    spool.append("d/events", _start("D"))
    spool.append("d/events", _start("E"))
    kept = [r.payload for r in spool.after(0)]
    assert json.dumps({"type": "end", "event_id": "A"}) in kept, kept
    assert "not json" not in kept, kept  # the oldest of the rest goes first, as before
    spool.close()


def test_a_spool_upgrade_cut_short_by_a_full_card_is_done_whole_at_the_next_start(
    tmp_path: Path,
) -> None:
    """The earlier release's spool gains its event columns at open. Added and filled one
    statement at a time, a card that filled during the fill left the columns there and empty,
    so the next start took the file as done, and the end of an alarm raised before the outage
    was dropped first (a review). It is one transaction: undone whole, done whole later."""
    path = tmp_path / "spool.sqlite"
    rows = [json.dumps({"type": "end", "event_id": "A", "pad": "x" * 200})]
    rows += [json.dumps({"type": "start", "event_id": f"B{n}", "pad": "x" * 200})
             for n in range(3000)]  # fmt: skip
    _spool_of_the_earlier_release(path, rows)
    with full_disk(path.stat().st_size + 64 * 1024), pytest.raises(sqlite3.Error):
        Spool(path, max_messages=3001)  # the card fills during the upgrade
    spool = Spool(path, max_messages=3001)  # the next start, with room
    spool.append("d/events", json.dumps({"type": "start", "event_id": "C"}))
    assert '"A"' in spool.after(0, 1)[0].payload, "the end of A is kept"
    spool.close()


def test_messages_that_may_have_gone_out_are_not_dropped_whole_into_a_full_spool(
    tmp_path: Path,
) -> None:
    """Messages taken back from paho (a full card kept them in memory) and those salvaged from
    a damaged spool may have reached the broker: marked so after they were stored, a full
    spool had already dropped such a start whole, and the end that came later with it (a
    review). They are marked before any is dropped."""
    spool = Spool(tmp_path / "spool.sqlite", max_messages=2)
    starts = [("d/events", json.dumps({"type": "start", "event_id": e}), 1, False) for e in "ABC"]
    spool.append_many(starts, handed=True)
    spool.append("d/events", json.dumps({"type": "end", "event_id": "A"}))
    assert json.dumps({"type": "end", "event_id": "A"}) in [r.payload for r in spool.after(0)]
    spool.close()


def test_messages_marked_as_gone_out_by_a_write_that_failed_are_not(tmp_path: Path) -> None:
    """Messages that may have gone out are marked so when stored; a write that failed (a full
    card) took them back but kept the mark, and the ids came again for messages never sent: a
    full spool then dropped such a start alone and kept its end (a review)."""
    spool = Spool(tmp_path / "spool.sqlite", max_messages=2)
    with full_disk(), pytest.raises(sqlite3.Error):  # the card is full
        spool.append_many([("d/events", "{}", 1, False)] * 3, handed=True)
    for kind, name in (("start", "A"), ("end", "A"), ("start", "B")):  # never sent
        spool.append("d/events", json.dumps({"type": kind, "event_id": name}))
    kept = [json.loads(r.payload)["event_id"] for r in spool.after(0)]
    assert kept == ["B"], kept  # A went whole, its end with it
    spool.close()


def test_a_drop_undone_by_a_failed_write_forgets_the_event_it_dropped(tmp_path: Path) -> None:
    """An append that dropped an event whole (its start never sent) and then could not be
    written (a full card) is rolled back, the start with it; the event stayed known as
    dropped, so its end was dropped on arrival while its start went out (a review)."""
    spool = Spool(tmp_path / "spool.sqlite", max_messages=3)
    for kind, name in (("start", "X"), ("start", "Y"), ("end", "Y")):
        spool.append("d/events", json.dumps({"type": kind, "event_id": name}))
    with full_disk(), pytest.raises(sqlite3.Error):  # the card is full
        spool.append("d/health", "{}", retain=True)
    spool.claim(1)  # then the start of X goes out
    spool.append("d/events", json.dumps({"type": "end", "event_id": "X"}))
    kept = [json.loads(r.payload)["event_id"] + json.loads(r.payload)["type"]
            for r in spool.after(0)]  # fmt: skip
    assert "Xend" in kept, kept
    spool.close()


# --- liveness -------------------------------------------------------------------------------


def blocks(kind: str, seconds: float, block: float = 0.1) -> list[np.ndarray]:
    n = int(block * RATE)
    rng = np.random.default_rng(0)
    make = {
        "noise": lambda: (0.05 * rng.standard_normal(n)).astype(np.float32),
        "silence": lambda: np.zeros(n, np.float32),
        "flat": lambda: np.full(n, 0.2, np.float32),
        "clipped": lambda: np.clip(3 * rng.standard_normal(n), -1, 1).astype(np.float32),
    }[kind]
    return [make() for _ in range(round(seconds / block))]


@pytest.mark.parametrize(
    ("kind", "fault"), [("silence", "silence"), ("flat", "flatline"), ("clipped", "clipping")]
)
def test_liveness_faults_and_recoveries(kind: str, fault: str) -> None:
    health = AudioHealth(RATE, fault_seconds=2.0)
    changes = [c for b in blocks("noise", 1) + blocks(kind, 1.5) for c in health.push(b)]
    assert changes == [] and health.ok  # not yet: shorter than fault_seconds
    changes = [c for b in blocks(kind, 1.0) for c in health.push(b)]
    assert [(c.kind, c.fault) for c in changes] == [("fault", fault)] and not health.ok
    changes = [c for b in blocks("noise", RECOVER_SECONDS - 0.1) for c in health.push(b)]
    assert changes == [] and not health.ok  # not yet: clean for less than RECOVER_SECONDS
    changes = [c for b in blocks("noise", 0.1) for c in health.push(b)]
    assert [(c.kind, c.fault) for c in changes] == [("recovered", fault)] and health.ok


def test_a_borderline_input_is_one_fault_not_a_flapping_one(tmp_path: Path) -> None:
    """A fault needed fault_seconds but cleared on the first clean 0.1-s block: an input that
    clips with a clean block every few seconds flapped ~520 times an hour, and every new fault
    closed the open anomaly event. The real Detector, fed real fan audio at too much gain."""
    from conftest import DEMO_BUNDLE, NORMAL_FILES
    from detector_helpers import Recorder

    from edge.audio_io import read_audio
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings

    audio = read_audio(NORMAL_FILES[0], RATE)
    step = RATE // 10
    clean = [audio[i : i + step] for i in range(0, len(audio) - step + 1, step)]
    loud = [np.clip(1000 * b, -1, 1) for b in clean]  # far too much gain: clipping
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    rec = Recorder()
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [rec])
    for k in range(12 * 60):  # a minute: 6 s clipping, then one clean block, over and over
        detector.feed(clean[k % len(clean)] if k % 61 == 60 else loud[k % len(loud)])
    for k in range(round(RECOVER_SECONDS * 10) + 1):  # then clean for good
        detector.feed(clean[k % len(clean)])
    changes = [h.change for h in rec.healths if h.change]
    assert changes == ["fault:clipping", "recovered:clipping"]


def test_a_fault_that_keeps_coming_back_is_one_fault_while_it_does(tmp_path: Path) -> None:
    """A loose cable: 6 s of silence every 20 s was 138 faults an hour, each a WARNING and a
    recovery in the journal and two health messages written to the card (an SD-card review).
    Each onset within the hour doubles the clean audio that ends the fault: four, then one
    that lasts as long as the cable is loose, and is over once the input stays clean. The real
    Detector, fed real fan audio."""
    from conftest import DEMO_BUNDLE, NORMAL_FILES
    from detector_helpers import Recorder

    from edge.audio_io import read_audio
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.health import MAX_RECOVER_SECONDS
    from edge.settings import Settings

    audio = read_audio(NORMAL_FILES[0], RATE)
    step = RATE // 10
    clean = [audio[i : i + step] for i in range(0, len(audio) - step + 1, step)]
    silent = np.zeros(step, np.float32)
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    rec = Recorder()
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [rec])
    for k in range(10 * 60 * 10):  # ten minutes: 6 s of silence in every 20
        detector.feed(silent if k % 200 < 60 else clean[k % len(clean)])
    changes = [h.change for h in rec.healths if h.change]
    assert changes == ["fault:silence", "recovered:silence"] * 3 + ["fault:silence"], changes
    faults = [h.detail for h in rec.healths if h.change == "fault:silence"]
    assert "the 4th time within the hour: over after 24 s of clean audio" in faults[-1]
    for k in range(9 * 10):  # the cable fixed: clean since the last 14 s, not yet 24
        detector.feed(clean[k % len(clean)])
    assert [h.change for h in rec.healths if h.change][-1] == "fault:silence"
    for k in range(20):
        detector.feed(clean[k % len(clean)])
    assert [h.change for h in rec.healths if h.change][-1] == "recovered:silence"
    assert detector.health.recover_seconds("silence") <= MAX_RECOVER_SECONDS


@pytest.mark.parametrize("block", [0.1, 0.05, 1.0])
def test_clipping_is_judged_over_a_second_whatever_the_capture_block(block: float) -> None:
    """Clipping was judged per capture block: 2 % of samples clipped in 20-ms bursts, once a
    second, was a fault with 1-s blocks and none with the default 0.1-s blocks (a clean block
    between bursts restarted the count). It is judged over the last second of audio."""
    rng = np.random.default_rng(5)
    second = (0.05 * rng.standard_normal(RATE)).astype(np.float32)
    second[: RATE // 50] = 1.0  # a 20-ms burst at full scale: 2 % of the second
    health = AudioHealth(RATE, fault_seconds=3.0)
    step = round(block * RATE)
    changes = []
    for _ in range(6):
        changes += [c for i in range(0, RATE, step) for c in health.push(second[i : i + step])]
    assert [(c.kind, c.fault) for c in changes] == [("fault", "clipping")]
    quiet = second.copy()
    quiet[: RATE // 50] = 0.05  # no more clipping
    changes = []
    for _ in range(round(RECOVER_SECONDS) + 2):
        changes += [c for i in range(0, RATE, step) for c in health.push(quiet[i : i + step])]
    assert [(c.kind, c.fault) for c in changes] == [("recovered", "clipping")] and health.ok


def test_stall_is_a_fault_until_audio_flows() -> None:
    health = AudioHealth(RATE)
    assert [c.kind for c in health.stalled("no audio")] == ["fault"]
    assert health.stalled("again") == []
    assert [(c.kind, c.fault) for c in health.push(blocks("noise", 0.1)[0])] == [
        ("recovered", "stalled")
    ]


def test_level_dbfs() -> None:
    square = np.tile([0.5, -0.5], 50).astype(np.float32)
    assert level_dbfs(square) == pytest.approx(-6.02, abs=0.01)
    assert level_dbfs(square + 0.2) == pytest.approx(-6.02, abs=0.01)  # an offset is no sound
    assert level_dbfs(np.full(100, 0.5, np.float32)) == -120.0
    assert level_dbfs(np.zeros(100, np.float32)) == -120.0


# --- clips ----------------------------------------------------------------------------------


def test_capture_ring_keeps_the_latest_samples() -> None:
    ring = CaptureRing(1.0, 10)  # 10 samples
    for start in range(0, 25, 7):
        ring.push(np.arange(start, start + 7, dtype=np.float32))
    assert ring.end == 28
    np.testing.assert_array_equal(ring.since(20), np.arange(20, 28))
    np.testing.assert_array_equal(ring.since(0), np.arange(18, 28))  # clamped to what is held


def test_clip_has_preroll_and_is_capped(tmp_path: Path) -> None:
    rec = ClipRecorder(tmp_path, RATE, preroll_s=1.0, max_seconds=3.0)
    audio = np.linspace(-0.5, 0.5, 10 * RATE, dtype=np.float32)
    step = RATE // 10
    for i in range(0, 2 * RATE, step):
        rec.push(audio[i : i + step])
    rec.start("ev1", first_sample=RATE + RATE // 2, wall_time=time.time())
    for i in range(2 * RATE, 10 * RATE, step):
        rec.push(audio[i : i + step])
    name, seconds = rec.finish("ev1")
    data, rate = sf.read(tmp_path / name, dtype="float32")
    assert rate == RATE and seconds == 3.0 and len(data) == 3 * RATE
    np.testing.assert_allclose(data[:10], audio[RATE // 2 : RATE // 2 + 10], atol=1e-4)
    assert rec.finish("ev1") is None


def test_new_clip_settings_keep_the_audio_the_ring_holds(tmp_path: Path) -> None:
    """A reload (SIGHUP) with a longer pre-roll keeps what was captured, at its stream index."""
    rec = ClipRecorder(tmp_path, RATE, preroll_s=1.0)
    audio = np.linspace(-0.5, 0.5, 20 * RATE, dtype=np.float32)
    for i in range(0, len(audio), 4096):
        rec.push(audio[i : i + 4096])
    held = rec.ring.since(0)
    rec.configure(5.0, 30.0, 10.0, 7.0)
    assert rec.ring.size == 20 * RATE and rec.max_samples == 30 * RATE
    np.testing.assert_array_equal(rec.ring.since(20 * RATE - len(held)), held)
    np.testing.assert_array_equal(rec.ring.since(19 * RATE), audio[19 * RATE :])
    np.testing.assert_array_equal(rec.ring.since(0), held)  # no silence from before it heard


def test_a_shorter_preroll_keeps_the_stream_index(tmp_path: Path) -> None:
    """A reload lowering the pre-roll (10 -> 3 s) pushed the held audio into the shorter ring,
    which kept its newest part but counted only that: the ring fell 7 s behind the stream, and
    every later clip began late, without its pre-roll, until a restart (in a review)."""
    rec = ClipRecorder(tmp_path, RATE, preroll_s=10.0)
    audio = np.linspace(-0.5, 0.5, 40 * RATE, dtype=np.float32)
    for i in range(0, len(audio), 4096):
        rec.push(audio[i : i + 4096])
    rec.configure(3.0, 60.0, 500.0, 1.0)
    assert rec.ring.end == len(audio) and rec.ring.size == 18 * RATE
    np.testing.assert_array_equal(rec.ring.since(30 * RATE), audio[30 * RATE :])
    rec.start("ev1", first_sample=38 * RATE, wall_time=time.time())  # pre-roll from 35 s
    name, seconds = rec.finish("ev1")
    assert seconds == 5.0, seconds
    data, _ = sf.read(tmp_path / name, dtype="float32")
    np.testing.assert_allclose(data[:10], audio[35 * RATE : 35 * RATE + 10], atol=1e-4)


def test_a_long_clip_is_held_and_written_in_two_bytes_a_sample(tmp_path: Path) -> None:
    """A clip is held in memory until its anomaly ends: as float32, and joined and clipped
    into two more copies to be written, `max_seconds = 3600` took +667 MB, and the kernel
    killed the service at its 300 MB limit while it wrote the clip (in a review). Now 16-bit
    PCM, as the clip is stored, written part by part."""
    import tracemalloc

    seconds, block = 300, 4000
    rec = ClipRecorder(tmp_path, RATE, preroll_s=0.0, max_seconds=3600.0)
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(block)).astype(np.float32)
    tracemalloc.start()
    rec.start("long", first_sample=0, wall_time=time.time())
    for _ in range(seconds * RATE // block):
        rec.push(noise)
    name, length = rec.finish("long")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert length == seconds
    assert peak < 3 * seconds * RATE, f"{peak / 1e6:.0f} MB for {seconds * RATE} samples"
    data, _ = sf.read(tmp_path / name, dtype="float32", frames=block)
    np.testing.assert_allclose(data, noise, atol=1 / 32767)


def test_clips_turned_on_by_a_reload_mid_stream_have_their_preroll(tmp_path: Path) -> None:
    """A recorder a reload makes mid-stream counted its samples from 0 while events give their
    first sample on the stream's scale: every clip began where the event was raised, without
    the pre-roll or the windows that raised it."""
    from conftest import DEMO_BUNDLE, DEMO_CLIP
    from detector_helpers import Recorder

    from edge.audio_io import read_audio
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings

    bundle = load_bundle(DEMO_BUNDLE)
    rate = bundle.features.samplerate
    audio = read_audio(DEMO_CLIP, rate)
    off = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path, clips={"enabled": False})
    on = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path, clips={"enabled": True})
    rec = Recorder()
    detector = Detector(off, bundle, [rec], live=False)

    def blocks():
        for i in range(0, 4 * rate, 1600):  # normal running, heard before the reload
            yield audio[i : i + 1600]
        detector.apply_settings(on)
        for i in range(0, len(audio), 1600):
            yield audio[i : i + 1600]

    detector.run(blocks())
    end = next(e for e in rec.events if e.type == "end")
    assert end.clip is not None and (tmp_path / "clips" / end.clip).exists()
    preroll = on.clips.preroll_seconds
    assert end.clip_seconds >= end.duration_s + preroll - 0.5, (end.clip_seconds, end.duration_s)


def test_clip_retention_by_size_and_age(tmp_path: Path) -> None:
    rec = ClipRecorder(tmp_path, RATE, max_total_mb=0.1, max_age_days=1)
    old = tmp_path / "old.wav"
    sf.write(old, np.zeros(100, np.float32), RATE)
    os.utime(old, (time.time() - 3 * 86400,) * 2)
    for i in range(4):  # 4 x 32 kB > 100 kB
        sf.write(tmp_path / f"c{i}.wav", np.zeros(RATE, np.float32), RATE, "PCM_16")
        os.utime(tmp_path / f"c{i}.wav", (time.time() - 100 + i,) * 2)
    removed = {p.name for p in rec.enforce_retention()}
    assert removed == {"old.wav", "c0.wav"}
    assert sorted(p.name for p in tmp_path.glob("*.wav")) == ["c1.wav", "c2.wav", "c3.wav"]


# --- commands -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        # in the words of the validator ("rejected: : Input tag 'explode' found using ...")
        (b'{"command": "explode"}', r"^unknown command 'explode'; known: learn, mark_normal, "),
        (b'{"id": "x"}', r"^no 'command' key; known: "),
        (b'{"command": "mute"}', "minutes"),
        (b'{"command": "mute", "minutes": -5}', "greater than 0"),
        (b'{"command": "mute", "minutes": 5, "extra": 1}', "extra"),
        (b'{"command": "set_threshold", "value": "high"}', "value"),
    ],
)
def test_malformed_commands_are_rejected_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(CommandError, match=reason):
        parse_command(payload)


def test_valid_commands_match_the_published_schema() -> None:
    validator = schema("command")
    for payload in (
        '{"command": "mute", "minutes": 30, "id": "a"}',
        '{"command": "status"}',
        '{"command": "set_threshold", "value": 0.5}',
        '{"command": "unmute"}',
        '{"command": "reload_model", "path": "/x.bundle"}',
    ):
        parsed = parse_command(payload).model_dump(mode="json", exclude_none=True)
        assert parsed == json.loads(payload), "every field read as sent"
        validator.validate(json.loads(payload))


# --- payload schemas (discovery: tests/test_discovery.py) ----------------------------------


def test_payloads_validate_against_the_published_schemas() -> None:
    event = EventMessage(
        type="end",
        event_id="e1",
        device_id="d",
        model="m",
        started_at="2026-01-01T00:00:00.000Z",
        peak_score=1.0,
        threshold=0.5,
        ended_at="2026-01-01T00:00:05.000Z",
        duration_s=5.0,
        bands=[{"low_hz": 100.0, "high_hz": 200.0, "deviation": 3.0}],
        clip="x.wav",
        clip_seconds=8.0,
    )
    schema("event").validate(event.to_dict())
    bad = event.to_dict() | {"type": "begin"}
    assert not schema("event").is_valid(bad)
    state = StateMessage(
        state="normal",
        device_id="d",
        model="m",
        threshold=0.5,
        updated_at="2026-01-01T00:00:00.000Z",
        score=0.1,
        level_dbfs=-30.0,
    )
    schema("state").validate(state.to_dict())
    health = HealthMessage(
        status="fault",
        device_id="d",
        updated_at="2026-01-01T00:00:00.000Z",
        faults=["silence"],
        change="fault:silence",
        detail="x",
    )
    schema("health").validate(health.to_dict())
    metrics = MetricsMessage(
        device_id="d",
        model="m",
        updated_at="2026-01-01T00:00:00.000Z",
        uptime_s=12.5,
        windows_scored=40,
        realtime_factor=0.02,
        inference_ms_p50=1.5,
        inference_ms_p95=3.0,
        dropped_blocks=0,
        overflows=0,
        queue_depth=1,
        level_dbfs=-31.0,
        spool_depth=2,
        spool_dropped=0,
    )
    schema("metrics").validate(metrics.to_dict())
    early = MetricsMessage(  # the first metrics of a run, before any window is scored
        device_id="d",
        model="m",
        updated_at="2026-01-01T00:00:00.000Z",
        uptime_s=0.1,
        windows_scored=0,
        realtime_factor=None,
        inference_ms_p50=None,
        inference_ms_p95=None,
        dropped_blocks=0,
        overflows=0,
        queue_depth=0,
        level_dbfs=None,
        spool_depth=0,
        spool_dropped=0,
    )
    schema("metrics").validate(early.to_dict())
    response = ResponseMessage(
        command="status",
        ok=True,
        device_id="d",
        updated_at="2026-01-01T00:00:00.000Z",
        id="r1",
        status={"threshold": 0.5},
    )
    schema("response").validate(response.to_dict())

    # What goes on the wire comes back as the same message (the schema is the contract for
    # consumers, from_payload is ours) ...
    for message in (event, state, health, metrics, early, response):
        assert type(message).from_payload(message.to_payload()) == message
        assert type(message).from_payload(message.to_payload().encode()) == message
    # ... and a payload from a newer publisher with a field we do not know still parses.
    newer = json.loads(event.to_payload()) | {"added_in_a_later_version": 1}
    assert EventMessage.from_payload(json.dumps(newer)) == event


# --- systemd --------------------------------------------------------------------------------


def test_sd_notify_sends_datagrams_and_is_a_noop_outside_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not SystemdNotifier().ready()
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)  # a message never sent fails the test instead of hanging it
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "20000000")
        n = SystemdNotifier()
        assert n.watchdog_s == 20.0
        assert n.ready("hi") and n.watchdog()
        assert sock.recv(100) == b"READY=1\nSTATUS=hi"
        assert sock.recv(100) == b"WATCHDOG=1"


def test_a_long_refit_keeps_the_watchdog_fed_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refit runs on the audio loop, which alone pinged the watchdog: a refit longer than
    WatchdogSec (seconds on a Pi, with a big site set) had systemd kill the service halfway.
    `busy` pings meanwhile, but only up to its limit: a refit that hangs still ends it."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping due every 0.1 s
        n = SystemdNotifier()
        with n.busy():  # the work: waits for three pings that only `busy` can send
            assert [sock.recv(64) for _ in range(3)] == [b"WATCHDOG=1"] * 3
        sock.setblocking(False)
        with n.busy(limit_s=0.3):
            time.sleep(1.0)  # hangs past the limit: the pings stop
        pings = 0
        with contextlib.suppress(BlockingIOError):
            while sock.recv(64) == b"WATCHDOG=1":
                pings += 1
        assert pings <= 4, pings  # 0.3 s of them at most: not the whole second
        assert n.watchdog(), "the loop's next tick pings at once"


def test_sd_notify_never_blocks_when_nobody_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        n = SystemdNotifier()
        t0 = time.monotonic()
        results = [n.notify("WATCHDOG=1") for _ in range(5000)]  # far beyond the queue
        # a blocking send would hang here; 5000 sends take milliseconds even on a busy machine
        assert time.monotonic() - t0 < 30 and results[0] and not results[-1]
        sock.setblocking(False)
        while True:  # drain
            try:
                sock.recv(64)
            except BlockingIOError:
                break
        assert n.watchdog() and not n.watchdog()  # rate-limited pings


# --- a microphone dropout -------------------------------------------------------------------


def test_a_dropout_publishes_no_score_while_the_audio_is_silent(tmp_path: Path) -> None:
    """Digital silence scores in the hundreds (the fluctuation of nothing); such windows are
    not scored for events, and the state and the page must not publish that number either:
    Home Assistant would keep it in its history as a score of the running machine."""
    from conftest import DEMO_BUNDLE, NORMAL_FILES
    from detector_helpers import Recorder

    from edge.audio_io import read_audio
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings
    from edge.sources import FileSource
    from edge.web.live import TRACE_POINTS, LiveView

    normal = read_audio(NORMAL_FILES[0], RATE)
    path = tmp_path / "dropout.wav"
    sf.write(path, np.concatenate([normal, np.zeros(6 * RATE, np.float32), normal]), RATE)
    rec, live, seen = Recorder(), LiveView(), []

    def step(s: object) -> None:
        detector.emit_state()
        live.window(s, detector.threshold)  # type: ignore[arg-type]
        raw = s.window.score  # type: ignore[attr-defined]
        seen.append((s.dead, raw, rec.states[-1].score, live.last_window["score"]))  # type: ignore[attr-defined]

    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [rec], on_step=step)
    detector.run(FileSource([path], RATE))
    silent = [(raw, state, page) for dead, raw, state, page in seen if dead]
    heard = [(state, page) for dead, _, state, page in seen if not dead]
    assert len(silent) >= 8 and all(x[1:] == (None, None) for x in silent)
    # all silence, or its edges (frames of next to nothing beside the machine's)
    assert min(raw for raw, _, _ in silent) > 5 * detector.threshold, "what was left out"
    assert max(raw for raw, _, _ in silent) > 50 * detector.threshold
    assert heard and all(state is not None and page is not None for state, page in heard)
    # A page opened now draws the same trace, with the same gap.
    assert live.snapshot()["trace"] == [page for *_, page in seen][-TRACE_POINTS:]


@pytest.mark.parametrize("zeros_s", [0.1, 0.5, 4.0])
def test_a_dropout_raises_no_event_at_either_edge(tmp_path: Path, zeros_s: float) -> None:
    """A window holding part of a dropout (a USB glitch, a mute button) scored 20 to 40 times
    the threshold, so its edges raised an anomaly event on a running machine."""
    from conftest import DEMO_BUNDLE, NORMAL_FILES
    from detector_helpers import Recorder

    from edge.audio_io import read_audio
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings
    from edge.sources import FileSource

    normal = read_audio(NORMAL_FILES[0], RATE)
    at = int(4.3 * RATE)
    path = tmp_path / "dropout.wav"
    gap = np.zeros(int(zeros_s * RATE), np.float32)
    sf.write(path, np.concatenate([normal[:at], gap, normal[at:]]), RATE, subtype="FLOAT")
    rec, steps = Recorder(), []
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [rec], on_step=steps.append)
    detector.run(FileSource([path], RATE))
    touched = [s for s in steps if s.start_s < at / RATE + zeros_s and s.end_s > at / RATE]
    assert len(touched) >= 2 and all(s.dead for s in touched)
    assert max(s.window.score for s in touched) > 5 * detector.threshold, "what was left out"
    assert not any(s.dead for s in steps if s not in touched)
    assert [e.type for e in rec.events] == []


def test_sound_returning_after_a_dropout_waits_the_settle_time_and_a_fault_still_shows(
    tmp_path: Path,
) -> None:
    """The demo bundle records no running level, so its machine never reads as off. A 2-s
    dropout inside normal running leaves one half-silent window on each side (21.6 and 16.5
    against a threshold of 1.87): with the silent windows between them not scored, they made
    2 of the last 3 and raised an event. After silent windows events wait the settle time, as
    after a start; a real fault later in the same stream is still reported."""
    from conftest import DEMO_BUNDLE, DEMO_CLIP, NORMAL_FILES
    from detector_helpers import Recorder

    from edge.audio_io import read_audio
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.machine_state import SETTLE_SECONDS
    from edge.settings import Settings
    from edge.sources import FileSource

    silence = np.zeros(int(3.5 * RATE), np.float32)
    dropout = tmp_path / "dropout.wav"
    fan = [read_audio(f, RATE) for f in NORMAL_FILES[:2]]
    sf.write(dropout, np.concatenate([fan[0], np.zeros(2 * RATE, np.float32), fan[1]]), RATE)
    quiet_then_fault = tmp_path / "back-to-a-fault.wav"
    sf.write(quiet_then_fault, np.concatenate([silence, read_audio(DEMO_CLIP, RATE)]), RATE)
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    bundle = load_bundle(DEMO_BUNDLE)
    assert bundle.manifest.machine is None  # no running level: only the silence can say it
    for path, starts, back_s in ((dropout, 0, 7.0), (quiet_then_fault, 1, 3.5)):
        rec = Recorder()
        Detector(settings, bundle, [rec]).run(FileSource([path], RATE))
        began = [e.stream_offset_s for e in rec.events if e.type == "start"]
        assert len(began) == starts, (path.name, began)
        assert all(t is not None and t >= back_s + SETTLE_SECONDS - 1.0 for t in began)


def test_the_state_is_starting_until_a_window_is_heard_and_stopped_has_no_mute_end(
    tmp_path: Path,
) -> None:
    """Before any window is scored the device claims nothing (no `normal`, no -120 dBFS level);
    a mute's end is no part of `stopped`, where the page read it as a time of restart."""
    from conftest import DEMO_BUNDLE, NORMAL_FILES
    from detector_helpers import Recorder

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings
    from edge.sources import FileSource

    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    for muted in (False, True):
        rec = Recorder()
        detector = Detector(settings, load_bundle(DEMO_BUNDLE), [rec])
        detector.muted_until = detector.clock() + 3600.0 if muted else 0.0
        detector.run(FileSource([NORMAL_FILES[0]], RATE))
        first = rec.states[0]
        before = "muted" if muted else "starting"  # a mute says so from the start
        assert (first.state, first.level_dbfs, first.score) == (before, None, None)
        heard = [s for s in rec.states if s.level_dbfs is not None]
        assert heard[0].state == ("muted" if muted else "normal") and heard[0].level_dbfs < 0
        assert bool(heard[0].muted_until) == muted
        assert rec.states[-1].state == "stopped" and rec.states[-1].muted_until is None
        # retained until the next start: a stopped daemon does not know the machine runs, nor
        # what it would score or hear now (a SCADA tag read the last score as live)
        stopped = rec.states[-1]
        assert heard[-1].machine == "running" and stopped.machine is None
        assert (stopped.score, stopped.level_dbfs, stopped.progress) == (None, None, None)
        # nor does its last metrics message, retained as long (an integrator's review: the
        # level and trend of the moment it stopped, read by a flow as live)
        final = rec.metrics_sent[-1]
        detector._emit_metrics()  # what it says while it runs, with what it heard last
        live = rec.metrics_sent[-1]
        assert live.level_dbfs is not None and live.anomaly_index, live
        assert (final.level_dbfs, final.anomaly_index) == (None, None), final
        assert final.windows_scored == live.windows_scored > 0


def test_a_dead_microphone_at_start_claims_no_state_and_no_machine(tmp_path: Path) -> None:
    """A start on a dead input (silence) published `normal` and machine `running` at its first
    window, and Home Assistant showed them until the silence became a fault (a field test): a
    dead window says nothing of the machine. The device stays `starting` until it hears one."""
    from conftest import DEMO_BUNDLE, NORMAL_FILES
    from detector_helpers import Recorder

    from edge.audio_io import read_audio
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings
    from edge.sources import FileSource

    late = tmp_path / "dead_then_sound.wav"
    sound = read_audio(NORMAL_FILES[0], RATE)
    sf.write(late, np.concatenate([np.zeros(2 * RATE), sound]), RATE, subtype="PCM_16")
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    rec = Recorder()
    Detector(settings, load_bundle(DEMO_BUNDLE), [rec]).run(FileSource([late], RATE))
    claims = [(s.state, s.machine, s.level_dbfs) for s in rec.states]
    said = [s for s in rec.states if s.machine or s.state not in ("starting", "stopped")]
    assert said and said[0].state == "normal" and said[0].machine == "running", claims
    assert all(s.level_dbfs is not None and s.level_dbfs > -60 for s in said), claims  # heard


def test_running_hours_are_the_machines_total_across_restarts(tmp_path: Path) -> None:
    """Home Assistant's *Running hours* is a maintenance figure: a restart of the daemon must
    not set it back to 0."""
    from conftest import DEMO_BUNDLE, NORMAL_FILES
    from detector_helpers import Recorder

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.persist import DeviceState
    from edge.settings import Settings
    from edge.sources import FileSource

    class Metrics(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.metrics_seen: list[MetricsMessage] = []

        def metrics(self, message: MetricsMessage) -> None:
            self.metrics_seen.append(message)

    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    totals, first_metrics = [], []
    for _ in range(2):
        rec = Metrics()
        detector = Detector(settings, load_bundle(DEMO_BUNDLE), [rec], persist=True)
        detector.run(FileSource([NORMAL_FILES[0]], RATE))
        totals.append(DeviceState(settings.data_dir).running_seconds)
        first_metrics.append(rec.metrics_seen[0].running_hours)
    assert totals[0] > 3.0  # the fan ran for the whole 5-s file
    assert totals[1] == pytest.approx(2 * totals[0], abs=0.6)
    assert first_metrics == [0.0, pytest.approx(totals[0] / 3600, abs=1e-4)]  # at the restart


def test_running_hours_count_a_start_from_its_sound(tmp_path: Path) -> None:
    """An off machine is running again after a vote of 8 windows of its sound (so a stopped
    machine in a noisy room does not flap); the published hours lost those 3.5 s at every
    start (in a review: 6.5 s counted of 10 s running)."""
    import soundfile as sf
    from conftest import DEMO_BUNDLE, NORMAL_FILES

    from edge.audio_io import read_audio
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.persist import DeviceState
    from edge.settings import Settings
    from edge.sources import FileSource

    room = np.random.default_rng(2).standard_normal(10 * RATE) * 10 ** (-70 / 20)
    fan = np.concatenate([read_audio(f, RATE) for f in NORMAL_FILES[:2]])
    sf.write(tmp_path / "start.wav", np.concatenate([room, fan]), RATE, subtype="FLOAT")
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data",
                        detector={"off_below_dbfs": -60.0})  # fmt: skip
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [], persist=True)
    detector.run(FileSource([tmp_path / "start.wav"], RATE))
    ran = len(fan) / RATE
    assert DeviceState(settings.data_dir).running_seconds == pytest.approx(ran, abs=1.0)


def test_an_output_that_fails_stops_neither_the_monitor_nor_the_outputs_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sink that raised (the spool on a full disk did) used to end the daemon, and the
    outputs after it in the list never got the message."""
    from conftest import DEMO_BUNDLE, DEMO_CLIP
    from detector_helpers import Recorder

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings
    from edge.sink import Sink
    from edge.sources import FileSource

    class Broken(Sink):
        def event(self, message: object) -> None:
            raise OSError(28, "No space left on device")

        def state(self, message: object) -> None:
            raise OSError(28, "No space left on device")

    rec = Recorder()
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [Broken(), rec])
    detector.run(FileSource([DEMO_CLIP], RATE))
    assert rec.kinds()[:1] == ["start"] and rec.kinds()[-1] == "end"  # the fault, reported
    assert len(rec.states) > 2
    failures = [r for r in caplog.records if "Broken." in r.getMessage()]
    assert {r.getMessage() for r in failures} == {
        "Broken.state failed; carrying on",
        "Broken.event failed; carrying on",
    }
    assert len(failures) == 2 and all(r.exc_info for r in failures)  # once each, with the cause


def test_event_log_lines_a_full_card_held_back_are_said_lost_at_the_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The event log keeps what a full card refused and writes it once there is room; at a stop
    with the card still full it was dropped without a word, an event's `end` with it, and
    `soundsentry events` listed the event as open (a full-disk review). Said, once."""
    import logging

    from conftest import DEMO_BUNDLE, DEMO_CLIP

    import edge.eventlog
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.eventlog import EventLogSink
    from edge.settings import Settings
    from edge.sources import FileSource

    def full(self: object, message: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(edge.eventlog.EventLog, "append", full)
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [EventLogSink(tmp_path / "data")])
    with caplog.at_level(logging.INFO, logger="edge.eventlog"):
        detector.run(FileSource([DEMO_CLIP], RATE))
    said = [r.getMessage() for r in caplog.records if r.name == "edge.eventlog"]
    assert len(said) == 2, said  # the first failure, and the loss at the stop
    assert said[-1].endswith(
        "2 start and end message(s) held back are lost at the stop (no room to write them; "
        "they went to MQTT)"
    ), said


def test_a_threshold_set_while_the_card_is_full_is_saved_once_there_is_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`set_threshold` while the card was full answered ok and failed to save state.json; it
    was saved again only at the next 10-minute save or a clean stop, so a crash or power cut
    after space came back restored the old threshold (a full-disk review). A failed save is
    tried again every STATE_RETRY_S, said once."""
    import json
    import logging

    from conftest import DEMO_BUNDLE

    import edge.daemon
    import edge.persist
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings

    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [], persist=True)
    real, card = edge.persist.write_json, {"full": True}

    def write(path: Path, data: object) -> None:
        if card["full"]:
            raise OSError(28, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(edge.persist, "write_json", write)
    monkeypatch.setattr(edge.daemon, "STATE_RETRY_S", 0.0)
    with caplog.at_level(logging.DEBUG, logger="edge.persist"):
        detector.set_threshold(4.0)
        for _ in range(3):
            detector.tick()  # still full: tried again, not said again
        card["full"] = False
        detector.tick()
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "edge.persist"]
    said = [s for s in said if s[0] >= logging.INFO]
    assert [level for level, _ in said] == [logging.ERROR, logging.INFO], said
    saved = json.loads((tmp_path / "data" / "state.json").read_text())
    assert saved["threshold"] == 4.0


# --- a Pi without a real-time clock ---------------------------------------------------------


class _PacedClip:
    """The demo clip in 0.1-s blocks, as a microphone delivers it (`paced`), with a clock that
    runs with the audio and jumps a day forward after 2 s, as NTP sets a Pi's clock after boot."""

    paced = True
    latency_s = 0.5

    def __init__(self, jump_after_s: float = 2.0) -> None:
        from conftest import DEMO_CLIP

        from edge.audio_io import read_audio

        self.audio = read_audio(DEMO_CLIP, RATE)
        self.fed = 0
        self.t0 = 1.6e9  # 2020-09-13: where the clock stood at boot
        self.jump_after = jump_after_s * RATE

    def clock(self) -> float:
        return self.t0 + self.fed / RATE + (86400.0 if self.fed > self.jump_after else 0.0)

    def __iter__(self) -> object:
        for i in range(0, len(self.audio), RATE // 10):
            block = self.audio[i : i + RATE // 10]
            self.fed += len(block)
            yield block


def test_event_times_follow_the_clock_when_it_jumps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Event times were fixed to the clock at start: after NTP set the clock, every event
    stayed in the boot-time past and `soundsentry events --since 1h` found none of them."""
    from conftest import DEMO_BUNDLE
    from detector_helpers import Recorder

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.eventlog import parse_time
    from edge.settings import Settings

    source, rec = _PacedClip(), Recorder()
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [rec], clock=source.clock)
    detector.run(source)
    start = next(e for e in rec.events if e.type == "start")
    at = parse_time(start.started_at).timestamp()
    offset = start.stream_offset_s
    assert abs(at - (source.t0 + 86400 + offset)) < 1.0, (at - source.t0, offset)
    assert any("the clock is +86400" in r.getMessage() for r in caplog.records)


def test_replayed_events_lie_in_the_past(tmp_path: Path) -> None:
    """A replay took the audio as starting when the replay did, so an hour-long recording put
    its events up to an hour into the future (and past `events --since`, the page's list and
    Home Assistant's last event). The audio is now taken as just recorded, ending at the start."""
    from conftest import DEMO_BUNDLE, DEMO_CLIP
    from detector_helpers import Recorder

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.eventlog import parse_time
    from edge.settings import Settings
    from edge.sources import FileSource

    now, rec = 1.8e9, Recorder()
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [rec], clock=lambda: now)
    source = FileSource([DEMO_CLIP], RATE)
    detector.run(source)
    start, end = rec.events[0], rec.events[-1]
    assert start.type == "start" and end.type == "end"
    at = parse_time(start.started_at).timestamp()
    assert at == pytest.approx(now - source.seconds + start.stream_offset_s, abs=0.01)
    assert parse_time(end.ended_at).timestamp() <= now
    # two files, each its own stream, replayed again by the same detector: the second file's
    # fault ends before now too, one clip length after the first file's
    rec.events.clear()
    twice = FileSource([DEMO_CLIP, DEMO_CLIP], RATE)
    detector.run(twice)
    starts = [parse_time(e.started_at).timestamp() for e in rec.events if e.type == "start"]
    gap = starts[1] - starts[0]  # within a 0.1-s block: windows start afresh in every stream
    assert len(starts) == 2 and gap == pytest.approx(twice.seconds / 2, abs=0.15)
    assert max(parse_time(e.ended_at).timestamp() for e in rec.events if e.ended_at) <= now


def test_clips_saved_before_the_clock_jumped_move_with_it(tmp_path: Path) -> None:
    """Clips saved before NTP set the clock kept file times of the boot-time clock, by which
    retention deleted them at its next run when the Pi had been off longer than their age
    limit. The demo's fault (5-11 s) is saved before the clock jumps a day at 14 s."""
    from conftest import DEMO_BUNDLE
    from detector_helpers import Recorder

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings

    source, rec = _PacedClip(jump_after_s=14.0), Recorder()
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [rec], clock=source.clock)
    written = time.time()
    detector.run(source)
    end = next(e for e in rec.events if e.type == "end")
    clip = tmp_path / "data" / "clips" / end.clip
    assert clip.stat().st_mtime == pytest.approx(written + 86400, abs=60)


class _StallingClip(_PacedClip):
    """The paced demo clip whose microphone stalls for `stall_s` (real time) after 14 s of
    audio, the fault (5-11 s) saved by then; NTP sets the clock a day forward during the stall."""

    def __init__(self, stall_s: float) -> None:
        super().__init__(jump_after_s=1e9)
        self.stall_s, self.stalled = stall_s, False

    def clock(self) -> float:
        return self.t0 + self.fed / RATE + (86400.0 if self.stalled else 0.0)

    def __iter__(self) -> object:
        for i in range(0, len(self.audio), RATE // 10):
            if i == 14 * RATE:
                self.stalled, until = True, time.monotonic() + self.stall_s
                while True:  # no blocks: the daemon's ticks see a stall
                    now = time.monotonic()
                    yield None  # ticked at `now` or later: the last one after the whole stall
                    if now >= until:  # (not just before it, when a sleep ran long)
                        break
                    time.sleep(0.02)
            block = self.audio[i : i + RATE // 10]
            self.fed += len(block)
            yield block


def test_clips_move_with_a_clock_set_while_the_audio_stalled(tmp_path: Path) -> None:
    """A jump of the clock was taken for one only when the audio's own time parted from the
    clock; after a stall the audio's time restarts from the clock, so a jump that came during
    the stall left the clips saved before it with boot-time file times."""
    from conftest import DEMO_BUNDLE
    from detector_helpers import Recorder

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings

    source, rec = _StallingClip(stall_s=1.0), Recorder()
    settings = Settings(
        device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data",
        health={"stall_seconds": 0.5},
    )  # fmt: skip
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [rec], clock=source.clock)
    written = time.time()
    detector.run(source)
    assert any(h.change == "fault:stalled" for h in rec.healths), rec.healths  # seen as a stall
    end = next(e for e in rec.events if e.type == "end")
    clip = tmp_path / "data" / "clips" / end.clip
    assert clip.stat().st_mtime == pytest.approx(written + 86400, abs=60)


def test_a_clip_keeps_its_age_when_the_clock_is_set(tmp_path: Path, synced_clock: Path) -> None:
    """A clip saved by a clock 40 days behind is not 40 days old once the clock is set; one that
    this run did not write keeps its file time; the open clip's name takes the new time."""
    rec = ClipRecorder(tmp_path, RATE, max_age_days=30)
    rec.push(np.zeros(2 * RATE, np.float32))
    behind = 40 * 86400
    rec.start("ev1", first_sample=RATE, wall_time=time.time() - behind)
    name, _ = rec.finish("ev1")
    os.utime(tmp_path / name, (time.time() - behind,) * 2)  # as the boot-time clock wrote it
    foreign = tmp_path / "other.wav"
    sf.write(foreign, np.zeros(100, np.float32), RATE)
    os.utime(foreign, (time.time() - behind,) * 2)
    rec.start("ev2", first_sample=RATE, wall_time=time.time() - behind)
    rec.clock_moved(behind)
    second, _ = rec.finish("ev2")  # retention runs after every clip
    assert second[:8] == time.strftime("%Y%m%d", time.gmtime())  # not 40 days back
    assert {p.name for p in tmp_path.glob("*.wav")} == {name, second}  # other.wav: deleted


def test_events_sent_while_the_clock_is_not_set_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events went out stamped 1970 (or by a clock years ahead) with nothing to say the times
    were not to be trusted (a clock review): they carry `clock_unset` until NTP has set it."""
    from conftest import ANOMALOUS_FILE, DEMO_BUNDLE
    from detector_helpers import Recorder

    import edge.clock
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings
    from edge.sources import FileSource

    schemas = Path(edge.clock.__file__).parent / "schemas"
    schema = json.loads((schemas / "event.schema.json").read_text())
    timesync = tmp_path / "timesync"
    timesync.mkdir()  # timesyncd runs and has not set the clock
    monkeypatch.setattr(edge.clock, "TIMESYNCD", timesync)
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data",
                        clips={"enabled": False})  # fmt: skip
    for synchronised in (False, True):
        if synchronised:
            (timesync / "synchronized").touch()
        reports = Recorder()
        Detector(settings, load_bundle(DEMO_BUNDLE), [reports]).run(
            FileSource([ANOMALOUS_FILE], 16000)
        )
        assert [e.type for e in reports.events][:1] == ["start"]
        for event in reports.events:
            payload = json.loads(event.to_payload())
            Draft202012Validator(schema).validate(payload)
            assert payload.get("clock_unset") is (None if synchronised else True), payload


def test_a_mute_keeps_its_length_when_the_clock_jumps(tmp_path: Path) -> None:
    """The mute ran on the wall clock: NTP's jump forward after boot ended a 60-min mute at
    once, and a jump back stretched a 1-min mute by the jump."""
    from conftest import DEMO_BUNDLE

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings

    now = [1.6e9]
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [], clock=lambda: now[0])
    end = detector.mute(60)
    assert end == pytest.approx(now[0] + 3600, abs=1)
    now[0] += 86400.0  # NTP
    assert detector.muted and detector.muted_until == pytest.approx(now[0] + 3600, abs=1)
    detector.unmute()
    detector.mute(1)
    now[0] -= 86400.0  # and back
    assert detector.muted and detector.muted_until == pytest.approx(now[0] + 60, abs=1)


def test_a_mute_restored_against_a_stale_boot_clock_is_never_longer_than_it_was(
    tmp_path: Path,
) -> None:
    """state.json kept the mute's end on the wall clock and a restart restored `end - clock()`:
    a Pi booting with fake-hwclock's time muted on for what the old clock said, one booting
    near 1970 for years, and the next save wrote that back as an end in 2083 (muted forever)."""
    from conftest import DEMO_BUNDLE

    from edge.bundle import load_bundle
    from edge.commands import MAX_MUTE_MINUTES
    from edge.daemon import Detector
    from edge.settings import Settings

    now = [1.6e9]
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    bundle = load_bundle(DEMO_BUNDLE)

    def restart() -> Detector:
        return Detector(settings, bundle, [], clock=lambda: now[0], persist=True)

    restart().mute(60)
    now[0] = 1.6e9 + 1800.0  # fake-hwclock: the clock of the last save, half an hour in
    d = restart()
    assert d.muted and d.muted_until - now[0] == pytest.approx(1800, abs=5)
    now[0] = 1.6e9 - 600.0  # a clock behind the mute's start says nothing of what has run
    d = restart()
    assert d.muted and d.muted_until - now[0] <= 3600 + 5
    now[0] = 86400.0  # a boot near 1970: the whole hour at most, not 50 years
    d = restart()
    assert d.muted and d.muted_until - now[0] <= 3600 + 5
    now[0] = 1.6e9 + 3 * 86400  # NTP sets the clock; the next save, then a restart
    d._save_state()
    assert not restart().muted, "the hour is long over"
    state = tmp_path / "data" / "state.json"  # the old format: only an end, decades away
    state.write_text(json.dumps({"model": "x", "muted_until": now[0] + 1e9}))
    d = restart()
    assert d.muted and d.muted_until - now[0] <= MAX_MUTE_MINUTES * 60 + 5


def test_a_mute_through_a_stop_saves_what_has_run_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What has run of a mute was saved with the running hours, every 10 min of the machine
    *running*: through a stop (what a mute is for) nothing was saved, and a restart on a
    clock behind the mute's start (which has only that count to go by) muted for its whole
    length again, 8 h where 2 were left (a power-loss review). It is saved every 10 min of
    the mute as well."""
    import types

    from conftest import DEMO_BUNDLE

    import edge.daemon as daemon_module
    import edge.daemon_learning
    from edge.bundle import load_bundle
    from edge.daemon import RUNNING_SAVE_S, Detector
    from edge.settings import Settings

    mono = [1000.0]
    fake = types.SimpleNamespace(
        monotonic=lambda: mono[0], perf_counter=time.perf_counter, time=time.time
    )
    monkeypatch.setattr(daemon_module, "time", fake)
    monkeypatch.setattr(edge.daemon_learning, "time", fake)  # its learning: the same clock
    now = [1.6e9]
    settings = Settings(  # the metrics an hour apart: the save was on their tick (a review)
        device_id="t",
        model=DEMO_BUNDLE,
        data_dir=tmp_path / "data",
        mqtt={"metrics_interval_seconds": 3600},
    )
    bundle = load_bundle(DEMO_BUNDLE)

    def start() -> Detector:
        return Detector(settings, bundle, [], clock=lambda: now[0], persist=True)

    d = start()
    d.mute(8 * 60)
    for _ in range(int(6 * 3600 / 60)):  # six hours of a stopped machine, a tick a minute
        mono[0] += 60.0
        now[0] += 60.0
        d.tick()
    assert d.running.seconds == 0 and d.muted
    now[0] = 1.6e9 - 86400.0  # a power cut; the Pi boots a day behind
    left = start().muted_until - now[0]
    assert 2 * 3600 - 5 <= left <= 2 * 3600 + RUNNING_SAVE_S + 65, left / 3600


def test_old_clips_go_at_start_and_every_hour_on_a_quiet_machine(
    tmp_path: Path, synced_clock: Path
) -> None:
    """Retention ran only when a new clip was written: on a machine with no anomalies, clips
    past max_age_days (they may hold speech) stayed for good. The real Detector on normal fan
    audio (no event, so no clip is written) deletes them at start, and then every hour."""
    from conftest import DEMO_BUNDLE, NORMAL_FILES

    from edge.bundle import load_bundle
    from edge.clips import RETENTION_EVERY_S
    from edge.daemon import Detector
    from edge.settings import Settings
    from edge.sources import FileSource

    folder = tmp_path / "data" / "clips"
    folder.mkdir(parents=True)

    def clip(name: str, days: float) -> Path:
        path = folder / name
        sf.write(path, np.zeros(RATE, np.float32), RATE, "PCM_16")
        os.utime(path, (time.time() - days * 86400,) * 2)
        return path

    old, fresh = clip("20250101T000000Z-old.wav", 40), clip("20260101T000000Z-new.wav", 1)
    settings = Settings(
        device_id="t",
        model=DEMO_BUNDLE,
        data_dir=tmp_path / "data",
        clips={"enabled": True, "max_age_days": 30},
    )
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [])
    detector.run(FileSource([NORMAL_FILES[0]], RATE))
    assert not old.exists() and fresh.exists()
    later = clip("20250102T000000Z-later.wav", 31)  # grew old while the daemon ran
    now = time.monotonic()
    assert detector.clips.housekeep(now) == [], "not again within the hour"
    assert detector.clips.housekeep(now + RETENTION_EVERY_S) == [later]
    assert fresh.exists()


def test_a_clip_cut_short_by_a_power_cut_is_never_under_a_clips_name(tmp_path: Path) -> None:
    """Clips were written in place: a power cut during the write left a truncated WAV under its
    final name. A file-size limit with its default action (SIGXFSZ kills the process part-way,
    no handler runs) stands in for the power cut; the next start removes what it left."""
    script = f"""
import resource, signal, sys, time
import numpy as np
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from pathlib import Path
from edge.clips import ClipRecorder
rec = ClipRecorder(Path({str(tmp_path)!r}), 16000)
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; the kernel's action kills
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
rec.push(np.full(3 * 16000, 0.1, np.float32))
rec.start("ev1", first_sample=16000, wall_time=time.time())
rec.finish("ev1")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode != 0, "killed part-way through the write"
    assert list(tmp_path.glob("*.wav")) == [], "no torn clip under a clip's name"
    ClipRecorder(tmp_path, RATE)  # the next start
    assert list(tmp_path.iterdir()) == [], "nor the temporary file it left"


def test_a_clip_that_cannot_be_written_leaves_no_stub_and_retention_still_runs(
    tmp_path: Path,
    synced_clock: Path,
) -> None:
    """A full disk cut the clip short: a 0-byte (or torn) WAV stayed behind, and retention, which
    ran only after a good write, never freed room. A file-size limit (RLIMIT_FSIZE, in a child
    process) makes the write fail part-way, as a full disk does."""
    script = f"""
import os, resource, signal, sys, time
import numpy as np, soundfile as sf
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
import edge.clock
from edge.clips import ClipRecorder
edge.clock.TIMESYNCD = __import__("pathlib").Path({str(synced_clock)!r})  # NTP has set it
folder = {str(tmp_path)!r}
old = os.path.join(folder, "old.wav")
sf.write(old, np.zeros(100, np.float32), 16000)
os.utime(old, (time.time() - 3 * 86400,) * 2)
rec = ClipRecorder(__import__("pathlib").Path(folder), 16000, max_total_mb=1, max_age_days=1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
rec.push(np.full(3 * 16000, 0.1, np.float32))
rec.start("ev1", first_sample=16000, wall_time=time.time())
print(rec.finish("ev1"))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None" and "could not save evidence clip" in proc.stderr
    assert list(tmp_path.glob("*.wav")) == []  # neither the torn clip nor the 3-day-old one


def test_vcgencmd_is_not_forked_again_once_it_has_not_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the firmware's sysfs file (a Pi 5) and with /dev/vcio closed to the service,
    `vcgencmd` failed at every metrics interval, a fork each time for a null. A real script on
    PATH stands in for it: it answers once with an error, and is not run again."""
    import os

    import edge.metrics

    calls = tmp_path / "calls"
    fake = tmp_path / "vcgencmd"
    fake.write_text(f'#!/bin/sh\necho run >> "{calls}"\necho "VCHI initialization failed" >&2\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(edge.metrics, "THROTTLED_SYSFS", tmp_path / "no-such-file")
    monkeypatch.setitem(edge.metrics._vcgencmd, "works", True)
    assert [edge.metrics.throttled() for _ in range(3)] == [None] * 3
    assert calls.read_text().splitlines() == ["run"]


def test_vcgencmd_that_once_takes_too_long_is_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Pi too busy to answer within the timeout once lost its throttling flags until the
    daemon restarted. A real script on PATH: slow the first time, then answering."""
    import os

    import edge.metrics

    first = tmp_path / "first"
    fake = tmp_path / "vcgencmd"
    fake.write_text(
        f'#!/bin/sh\nif [ ! -e "{first}" ]; then touch "{first}"; exec sleep 5; fi\n'
        "echo throttled=0x50000\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(edge.metrics, "THROTTLED_SYSFS", tmp_path / "no-such-file")
    monkeypatch.setitem(edge.metrics._vcgencmd, "works", True)
    monkeypatch.setitem(edge.metrics._vcgencmd, "timeouts", 0)
    assert edge.metrics.throttled() is None  # timed out
    assert edge.metrics.throttled() == "0x50000"


def test_settings_that_override_the_bundle_s_calibration_are_said_at_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`[detector] threshold` took precedence over a calibrated bundle's without a word: the
    user re-calibrated and nothing changed."""
    import logging

    from conftest import DEMO_BUNDLE

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings

    bundle = load_bundle(DEMO_BUNDLE)
    with caplog.at_level(logging.INFO, logger="edge.daemon"):
        plain = Settings(device_id="o", model=DEMO_BUNDLE, data_dir=tmp_path / "a")
        Detector(plain, bundle, [])
        assert "is used, not" not in caplog.text
        fixed = Settings(device_id="o", model=DEMO_BUNDLE, data_dir=tmp_path / "b",
                         detector={"threshold": 9.5})  # fmt: skip
        Detector(fixed, bundle, [])
    assert f"[detector] threshold 9.5 is used, not {bundle.model_id}'s calibrated" in caplog.text


def test_invalid_samples_now_and_then_are_one_fault_not_a_flapping_one() -> None:
    """The invalid-samples fault cleared on the first finite block: a driver sending one bad
    block a second flapped it 3,600 times an hour, and each fault closed the open event."""
    health = AudioHealth(RATE)
    bad = blocks("noise", 0.1)[0].copy()
    bad[::50] = np.nan
    changes = []
    for k in range(601):  # a minute: one bad 0.1-s block a second, the last one bad
        changes += health.push(bad if k % 10 == 0 else blocks("noise", 0.1)[0])
    assert [(c.kind, c.fault) for c in changes] == [("fault", "invalid samples")]
    changes = [c for b in blocks("noise", RECOVER_SECONDS - 0.1) for c in health.push(b)]
    assert changes == [] and not health.ok  # not yet: finite for less than RECOVER_SECONDS
    changes = [c for b in blocks("noise", 0.1) for c in health.push(b)]
    assert [(c.kind, c.fault) for c in changes] == [("recovered", "invalid samples")]
    assert health.ok


def test_metrics_before_any_audio_have_no_level_and_a_nan_score_is_no_nan_index(
    tmp_path: Path,
) -> None:
    """A microphone missing at boot: metrics and status said -120 dBFS (the meter's floor)
    where the state message said null; and a score that is not a number made the anomaly
    index NaN, which went out as `NaN`, refused by JSON parsers (JavaScript's, Go's)."""
    from conftest import DEMO_BUNDLE
    from detector_helpers import Recorder

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings

    seen: list[MetricsMessage] = []

    class Metrics(Recorder):
        def metrics(self, message: MetricsMessage) -> None:
            seen.append(message)

    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [Metrics()])
    detector._emit_metrics()
    assert seen[-1].level_dbfs is None and detector.status()["level_dbfs"] is None
    detector.index._scores.append(float("nan"))  # as one NaN score did before add() refused it
    detector._emit_metrics()
    json.loads(seen[-1].to_payload(), parse_constant=pytest.fail)
    assert seen[-1].anomaly_index is None


def test_a_score_that_is_not_a_number_leaves_the_state_message_json(tmp_path: Path) -> None:
    """A float WAV holding 1e30 made the window score NaN; the state message rounded it as it
    came and sent `"score":NaN`, which JSON parsers refuse: the dashboard's snapshot (the page
    went blank while it said live) and the MQTT state. Real audio through the real Detector."""
    from conftest import DEMO_BUNDLE, NORMAL_FILES
    from detector_helpers import Recorder

    from edge.audio_io import read_audio
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings

    audio = read_audio(NORMAL_FILES[0], RATE)[: 3 * RATE]
    loud = np.where(np.arange(3 * RATE) % 2, 1e30, -1e30).astype(np.float32)
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    rec = Recorder()
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [rec])
    step = RATE // 10
    for block in (audio, loud):
        for i in range(0, len(block), step):
            detector.feed(block[i : i + step])
    detector.emit_state()
    assert detector._last_score is not None and not math.isfinite(detector._last_score)
    for message in rec.states:
        json.loads(message.to_payload(), parse_constant=pytest.fail)
    assert rec.states[-1].score is None


def test_a_message_never_carries_a_number_json_has_not() -> None:
    """A score that overflowed (a knn bank's tiny scale) went out as `"peak_score":Infinity`:
    replay's output and the MQTT payload were no JSON any parser takes. An infinite number is
    the largest there is (the schema's `number`), NaN null."""
    import sys

    from jsonschema import Draft202012Validator

    from edge.messages import EventMessage

    band = {"low_hz": 0.0, "high_hz": 50.0, "deviation": float("inf")}
    message = EventMessage("start", "e1", "d", "m", "2026-12-03T00:00:00Z", float("inf"), 2.0,
                           mean_score=float("nan"), bands=[band])  # fmt: skip
    data = json.loads(message.to_payload(), parse_constant=pytest.fail)
    assert data["peak_score"] == sys.float_info.max and "mean_score" not in data
    assert data["bands"][0]["deviation"] == sys.float_info.max and data["threshold"] == 2.0
    schema = json.loads((SCHEMAS / "event.schema.json").read_text())
    Draft202012Validator(schema).validate(data)


def test_a_replayed_file_s_clip_holds_no_audio_of_the_file_before(tmp_path: Path) -> None:
    """`replay` streams each file on its own, but an event early in the second file had a clip
    whose pre-roll was the first file's end: 13 s for a 10-s file (in a review)."""
    from conftest import ANOMALOUS_FILE, DEMO_BUNDLE, NORMAL_FILES, cli

    from edge.audio_io import read_audio

    fault = read_audio(ANOMALOUS_FILE, RATE)
    config = tmp_path / "c.toml"
    config.write_text('device_id = "pump-3"\n[clips]\npreroll_seconds = 3.0\n')
    env = {"SOUNDSENTRY_DATA_DIR": str(tmp_path / "data")}
    proc = cli("replay", "--config", str(config), str(DEMO_BUNDLE), str(NORMAL_FILES[0]),
               str(ANOMALOUS_FILE), env=env)  # fmt: skip
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    ends = [e for e in events if e["type"] == "end" and e.get("clip")]
    assert ends, proc.stdout + proc.stderr
    (end,) = ends  # the normal file raises none
    assert end["clip_seconds"] <= len(fault) / RATE, end
    clip, rate = sf.read(tmp_path / "data" / "clips" / end["clip"], dtype="float32")
    assert rate == RATE
    np.testing.assert_allclose(clip[:RATE], fault[:RATE], atol=1e-4)  # the fault's own start


def test_the_windows_of_a_stop_below_the_off_level_send_no_score(tmp_path: Path) -> None:
    """A machine stopping: its first windows below the off level are still `running` (the vote
    to name `off` takes a few), and the state sent then carried their score, 7.8 and 48 against
    a threshold of 2.7, a spike in Home Assistant's graph at every stop that the machine off
    itself no longer makes (a field review). Real audio through the real Detector."""
    from conftest import DEMO_BUNDLE, NORMAL_FILES
    from detector_helpers import Recorder

    from edge.audio_io import read_audio
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.health import level_dbfs
    from edge.machine_state import HYSTERESIS_DB
    from edge.settings import Settings

    audio = read_audio(NORMAL_FILES[0], RATE)[: 4 * RATE]
    off_below = level_dbfs(audio) - 20  # as training sets it: below the machine running
    settings = Settings(
        device_id="t",
        model=DEMO_BUNDLE,
        data_dir=tmp_path / "data",
        detector={"off_below_dbfs": off_below},
    )
    rec, steps = Recorder(), []
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [rec], on_step=steps.append)
    step, stopping = RATE // 10, 0
    for block in (audio, audio * 10 ** (-30 / 20)):  # 30 dB down: heard, not silence
        for i in range(0, len(block), step):
            seen = len(steps)
            detector.feed(block[i : i + step])
            for s in steps[seen:]:
                detector.emit_state()
                quiet = s.level_dbfs < off_below + HYSTERESIS_DB  # near it: coasting down
                stopping += quiet and s.machine == "running"
                assert (rec.states[-1].score is None) == quiet, (s.level_dbfs, s.machine)
    assert stopping >= 1  # windows of the stop not yet named `off`


def test_the_service_writes_no_event_lines_into_its_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run` printed every event as a JSON line whenever stdout was no terminal: as a service,
    into the journal, where the log has each start and end already, and an update every 10 s
    of a day-long fault made 8,640 lines a day (an SD-card review). systemd names the
    journal's stream in JOURNAL_STREAM; a pipe (`run | jq`) still gets the lines."""
    import sys

    from soundsentry.commands.detection import _stdout_is_journal

    with (tmp_path / "journal").open("w") as out:
        st = os.fstat(out.fileno())
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert _stdout_is_journal()
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # a redirection
        assert not _stdout_is_journal()
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not _stdout_is_journal()
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not _stdout_is_journal()
