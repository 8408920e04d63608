"""A durable, bounded outbox for MQTT messages that must not be lost (events, health changes).

Messages are written to SQLite before they are published and deleted only when the broker
acknowledges them (PUBACK), so they survive a broker outage, a daemon restart or `kill -9`
and are delivered in order afterwards. When full, messages are dropped and counted, those a
consumer can best do without first (EXPENDABLE): a retained message a newer one on its topic
replaces, then an anomaly's `update` (its `start` and `end` say when and how bad; an anomaly
through a day's broker outage makes thousands), then the oldest, but never the `end` of an
event whose `start` may have reached the broker (one handed to it, in this run or an earlier
one): a consumer that pairs starts with ends would keep that alarm open for good. An event
whose `start` never left goes whole, its `update`s and `end` with it, those still to come too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from edge.private import private_dir, private_file

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload TEXT NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dropped_events (event TEXT PRIMARY KEY);
"""
_EVENT_COLUMNS = ("event", "kind")
"""An event message's event_id and type (start, update, end), NULL for any other message: a
full spool's choice reads them by index (parsing each row's JSON made flushing 2,000 messages
into a full spool take 3.3 s instead of 0.05 s, in a review). Spools of earlier releases gain
them at open, filled from the rows' JSON (an upgrade during an outage left the ends of its
alarms unprotected, in a review)."""
_EVENT_INDEX = "CREATE INDEX IF NOT EXISTS outbox_event ON outbox(event) WHERE event IS NOT NULL"
DROPPED_EVENTS_KEPT = 1024
"""Events dropped whole before their `start` left, remembered (in the file, with the drop: a
write that failed after it, or a restart, and the interrupted `end` a restart sends went out
alone, in a review) so that their later messages are dropped on arrival; older ones are
forgotten."""


@dataclass(frozen=True)
class Spooled:
    """One message waiting for the broker's acknowledgement."""

    id: int
    topic: str
    payload: str
    qos: int
    retain: bool


EXPENDABLE = (
    # retained messages (health, state) that a newer one on the same topic replaces
    "SELECT id FROM outbox WHERE retain = 1 AND id NOT IN "
    "(SELECT MAX(id) FROM outbox WHERE retain = 1 GROUP BY topic) ORDER BY id LIMIT ?",
    # an anomaly's updates between its start and its end
    "SELECT id FROM outbox WHERE kind = 'update' ORDER BY id LIMIT ?",
)
"""What a full spool drops first, in this order, before the oldest of the rest."""
OLDEST = "SELECT id, event, kind FROM outbox WHERE kind IS NOT 'end' ORDER BY id LIMIT ?"
"""The oldest of the rest but ends. The end of a start still unhanded needs no choosing: that
start is older, and goes first with its end; every other end's start was acknowledged, or
handed and may have arrived (or was dropped after it was handed)."""


def event_of(payload: str, retain: bool) -> tuple[str | None, str | None]:
    """(event_id, type) of an event message (start, update, end); (None, None) for others."""
    if retain or '"event_id"' not in payload:
        return None, None
    try:
        data = json.loads(payload)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    event, kind = data.get("event_id"), data.get("type")
    if isinstance(event, str) and kind in ("start", "update", "end"):
        return event, kind
    return None, None


FULL_LOG_EVERY_S = 900.0
"""A full spool drops a message for every new one; it says so at most this often (with the
count), not once per message for the whole of a long broker outage (once a minute was 1,440
lines a day in the journal of a days-long outage: an SD-card review; `spool_dropped` in the
metrics and `status` counts them as they come)."""


def open_spool(path: Path, max_messages: int) -> Spool:
    """The spool at `path`; one that cannot be opened never stops the daemon. A file that is
    not a database (damaged) is moved aside to `NAME.broken-TIME` and a new one started; one
    that cannot be opened for now (a full or read-only disk) is left as it is, with its
    messages for a later start, and this run spools in memory. Both are logged as errors."""
    for stale in path.parent.glob(f".{path.name}.broken-*.padded"):  # a salvage cut short
        with suppress(OSError):
            stale.unlink()
    try:
        return Spool(path, max_messages)
    except (sqlite3.OperationalError, OSError) as exc:  # disk full, I/O error, read-only
        problem = exc
    except sqlite3.DatabaseError as exc:  # not a database, or a damaged page
        aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            for old in path.parent.glob(f"{path.name}.broken-*"):  # a failing card repeats this:
                old.unlink()  # the last damaged spool is kept for a look, not every one
            for suffix in ("", "-wal", "-shm"):
                part = path.with_name(path.name + suffix)
                if part.exists():
                    part.replace(aside.with_name(aside.name + suffix))
            spool = Spool(path, max_messages)
        except (sqlite3.Error, OSError) as again:
            log.error("spool %s is damaged (%s): moved to %s", path, exc, aside)
            problem = again
        else:
            saved, lost = salvage(aside, spool)
            said = " ".join(str(exc).split())  # quick_check's report runs to many lines
            log.error(
                "spool %s is damaged (%s): moved to %s, a new one started with the %d "
                "message(s) still readable in it%s",
                path, said if len(said) <= 160 else said[:157] + "...", aside, saved,
                " (an unknown number lost: its table cannot be read)" if lost is None
                else f" ({lost} lost to damaged pages or the time limit)" if lost else "",
            )  # fmt: skip
            return spool
    log.error(
        "spool %s cannot be opened (%s): messages wait in memory until the broker has them, "
        "and are lost if the daemon stops first; any left in the file go out once it opens",
        path, problem,
    )  # fmt: skip
    return Spool(None, max_messages)


SALVAGE_SECONDS = 10.0
"""How long the messages of a damaged spool are looked for at most (a start is held up by it)."""


def salvage(damaged: Path, into: Spool) -> tuple[int, int | None]:
    """Copy the messages still readable in the damaged spool file `damaged` into `into`, in
    order and in one transaction; returns (copied, lost), lost None when not even the table's
    extent could be read. One bad page of a spool holding an outage's events made the whole
    file go aside with every waiting message, 393 of 400 still readable (in a review). Rows
    are read in id order; a range that fails is stepped over one id at a time; rows a damaged
    page makes up (NULL topic or payload: a zeroed cell) are left out, and counted lost; after
    SALVAGE_SECONDS the rows not yet read count as lost. A file cut short (a power cut before
    the card wrote its end) is read from a copy padded to the length its header gives: SQLite
    called every page of it malformed, and 355 readable messages were lost (a power-loss
    review). Nothing here may stop a start."""
    padded = _padded_copy(damaged)
    try:
        found, lost = _read_rows(padded or damaged)
    finally:
        if padded is not None:
            padded.unlink(missing_ok=True)
    try:
        into.append_many(found, handed=True)  # an earlier run's: it may have handed them
    except sqlite3.Error:  # the new spool cannot take them (a full card): they are lost
        return 0, None if lost is None else lost + len(found)
    return len(found), lost


def _padded_copy(damaged: Path) -> Path | None:
    """A copy of `damaged` extended with zeros to the size its header gives, when the file is
    shorter than that (cut short); None when it is not, or no copy can be made."""
    try:
        with open(damaged, "rb") as fh:
            header = fh.read(100)
        size = damaged.stat().st_size
    except OSError:
        return None
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        return None
    page = int.from_bytes(header[16:18], "big")
    page = 65536 if page == 1 else page
    expected = page * int.from_bytes(header[28:32], "big")
    if not size < expected <= max(size * 16, 1 << 26):  # cut short, by a believable length
        return None
    copy = damaged.with_name(f".{damaged.name}.padded")
    try:
        shutil.copyfile(damaged, copy)
        os.truncate(copy, expected)  # zeros, sparse where the file system allows
    except OSError:
        copy.unlink(missing_ok=True)
        return None
    return copy


class _Salvaged:
    """The messages read so far from a damaged spool, by id, and how many were lost."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[str, str, int, bool]] = {}
        self.lost = 0

    def keep(self, row: tuple[object, ...]) -> None:
        """Keep a row read, or count it lost when a damaged page made it up."""
        rid, topic, payload, qos, retain = row
        if not isinstance(rid, int) or rid in self.rows:
            return
        whole = isinstance(topic, str) and bool(topic) and isinstance(payload, str)
        if not whole or "\0" in topic + payload or qos not in (0, 1, 2):
            self.lost += 1  # a cell a damaged page made up, or zeroed part of (no message has NUL)
            return
        self.rows[rid] = (topic, payload, int(qos), bool(retain))


def _read_rows(damaged: Path) -> tuple[list[tuple[str, str, int, bool]], int | None]:
    """The messages readable in `damaged`, in id order, and how many were lost (None: unknown)."""
    found = _Salvaged()
    made = [damaged.with_name(damaged.name + x) for x in ("-wal", "-shm")]
    made = [part for part in made if not part.exists()]  # reading makes them: removed after
    try:
        db = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
    except sqlite3.Error:
        return [], None
    known = False
    try:
        lo, hi = _id_range(db)
        known = True
        _read_ids(db, lo, hi, found)
    except (sqlite3.Error, TypeError, ValueError):
        pass  # nothing more can be read: what was read is kept
    finally:
        db.close()
        for part in made:
            part.unlink(missing_ok=True)
    return [found.rows[rid] for rid in sorted(found.rows)], found.lost if known else None


def _id_range(db: sqlite3.Connection) -> tuple[int | None, int | None]:
    """The first and last ids of the outbox, as far as a damaged file tells them."""
    try:
        lo, hi = db.execute("SELECT MIN(id), MAX(id) FROM outbox").fetchone()
    except sqlite3.Error:  # an end of the table is damaged: from the first id possible
        last = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        lo, hi = 1, (last[0] if last else None)
    return lo, hi


def _read_ids(db: sqlite3.Connection, lo: int | None, hi: int | None, found: _Salvaged) -> None:
    """Read the rows from `lo` to `hi` into `found`, a damaged page's one id at a time, until
    SALVAGE_SECONDS have passed."""
    cursor, deadline = (lo or 1) - 1, time.monotonic() + SALVAGE_SECONDS
    select = "SELECT id, topic, payload, qos, retain FROM outbox WHERE id {} ORDER BY id"
    while hi is not None and cursor < hi:
        if time.monotonic() >= deadline:
            found.lost += int(hi - cursor)  # at most: ids left unread, some of them gaps
            break
        try:
            for row in db.execute(select.format("> ?"), (cursor,)):
                found.keep(row)
                cursor = max(cursor, row[0]) if isinstance(row[0], int) else cursor
                if time.monotonic() >= deadline:
                    break
            else:
                break
        except sqlite3.DatabaseError:  # a damaged page: its ids one by one
            cursor += 1
            try:
                row = db.execute(select.format("= ?"), (cursor,)).fetchone()
            except sqlite3.DatabaseError:
                found.lost += 1
                continue
            if row is not None:
                found.keep(row)


class Spool:
    """SQLite-backed FIFO of outgoing messages, safe to use from several threads; with no path,
    in memory (not durable: the fallback when the file cannot be opened)."""

    def __init__(self, path: Path | None, max_messages: int = 10000) -> None:
        self.path = path
        self.max_messages = max_messages
        if path is not None:
            private_dir(path.parent)
            private_file(path)  # SQLite gives its -wal and -shm files the database's mode
        self._lock = threading.Lock()
        self._full_logged_at = float("-inf")
        self._dropped_unlogged = 0
        name = str(path) if path is not None else ":memory:"
        self._db = sqlite3.connect(name, check_same_thread=False, isolation_level=None)
        try:
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._index_events()
            self._db.execute(_EVENT_INDEX)
            if path is not None:  # a damaged page (an SD card that ignored a flush) opens
                # fine and fails at the first read: found here, the file is moved aside
                found = self._db.execute("PRAGMA quick_check").fetchone()
                if found is None or found[0] != "ok":
                    raise sqlite3.DatabaseError(f"quick_check: {found[0] if found else '?'}")
        except sqlite3.Error:
            self._db.close()
            raise
        self.sent_through = int(self._db.execute("SELECT MAX(id) FROM outbox").fetchone()[0] or 0)
        """Rows up to this id may have reached the broker: handed to it in this run (`claim`,
        `append_many(handed=True)`), or left by an earlier run, which may have handed them."""
        self._rows = self._count()
        """Messages waiting, kept here: a COUNT(*) on every append took 8 ms at 10,000 rows
        and 98 ms at 100,000, on the audio loop."""
        self._stats = (0, 0)
        self._stats_failed = False

    def _index_events(self) -> None:
        """Give a spool of an earlier release its event columns, filled from its rows, in one
        transaction: added one by one, a power cut or a full card between them left a file
        every append failed on, or columns never filled (a review)."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(outbox)")}
        missing = [c for c in _EVENT_COLUMNS if c not in columns]
        if not missing:
            return
        self._db.execute("BEGIN")
        try:
            for column in missing:
                self._db.execute(f"ALTER TABLE outbox ADD COLUMN {column} TEXT")
            rows = self._db.execute("SELECT id, payload, retain FROM outbox").fetchall()
            marks = ((*event_of(p, bool(r)), i) for i, p, r in rows)  # as `append` marks them
            self._db.executemany(
                "UPDATE outbox SET event = ?, kind = ? WHERE id = ?",
                [m for m in marks if m[0] is not None],
            )
            self._db.execute("COMMIT")
        except sqlite3.Error:
            with suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    def append(self, topic: str, payload: str, qos: int = 1, retain: bool = False) -> int:
        """Store a message durably; drop the oldest if the spool is full. Returns its id. One
        transaction: a message whose insert stood while the drop after it failed (a full card)
        was reported unwritten, kept in memory too, and sent twice."""
        event, kind = event_of(payload, retain)
        with self._lock, self._transaction():
            if event is not None and self._was_dropped(event):  # its start never left
                self._count_dropped(1)
                return 0
            cur = self._db.execute(
                "INSERT INTO outbox (topic, payload, qos, retain, created, event, kind) "
                "VALUES (?,?,?,?,?,?,?)",
                (topic, payload, qos, int(retain), time.time(), event, kind),
            )
            self._rows += 1
            self._trim()
            return int(cur.lastrowid or 0)

    def append_many(self, rows: list[tuple[str, str, int, bool]], handed: bool = False) -> int:
        """Store (topic, payload, qos, retain) messages in order, in one transaction, then drop
        as `append` does if the spool is full. Returns the last one's id (0: none stored).
        `handed`: they (and every row before them) may have reached the broker already, as
        `claim` says, before any is dropped (set after, a start of them was dropped whole
        first, its end with it, in a review)."""
        if not rows:
            return 0
        now = time.time()
        values = [(t, p, q, int(r), now, *event_of(p, r)) for t, p, q, r in rows]
        with self._lock, self._transaction():
            kept = [v for v in values if v[5] is None or not self._was_dropped(v[5])]
            self._count_dropped(len(values) - len(kept))
            self._db.executemany(
                "INSERT INTO outbox (topic, payload, qos, retain, created, event, kind) "
                "VALUES (?,?,?,?,?,?,?)",
                kept,
            )
            self._rows += len(kept)
            last = self._db.execute("SELECT MAX(id) FROM outbox").fetchone()[0] if kept else 0
            if handed:
                self.sent_through = max(self.sent_through, int(last or 0))
            self._trim()
            return int(last or 0)

    def claim(self, row_id: int) -> bool:
        """The sender is about to hand row `row_id` (and has handed those before it): False if a
        full spool dropped it meanwhile, else from now on it may reach the broker, so the `end`
        of a `start` up to it is kept when the spool is full. A start handed after `_trim` had
        dropped its event whole went out with no end (its batch was read before the drop, in a
        review)."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM outbox WHERE id = ?", (row_id,)).fetchone() is None:
                return False
            self.sent_through = max(self.sent_through, row_id)
            return True

    def _was_dropped(self, event: str) -> bool:
        """Whether `event` went whole before its start left (under `_lock`)."""
        found = self._db.execute("SELECT 1 FROM dropped_events WHERE event = ?", (event,))
        return found.fetchone() is not None

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN ... COMMIT, or ROLLBACK and the counts and `sent_through` as they were (under
        `_lock`)."""
        counts = (self._rows, self._dropped_unlogged, self.sent_through)
        self._db.execute("BEGIN")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            with suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            self._rows, self._dropped_unlogged, self.sent_through = counts  # the ids come again
            raise

    def _trim(self) -> None:
        """Drop what the spool holds beyond max_messages, expendable messages first, and count
        it (under `_lock`)."""
        left = self._rows - self.max_messages
        if left <= 0:
            return
        dropped = 0
        for expendable in EXPENDABLE:
            if left > 0:
                gone = self._run(f"DELETE FROM outbox WHERE id IN ({expendable})", left)
                left, dropped = left - gone, dropped + gone
        for i, event, kind in self._db.execute(OLDEST, (max(left, 0),)).fetchall():
            if left <= 0:  # an event that goes whole may free more than one row
                break
            if kind == "start" and i > self.sent_through:  # nobody saw it start: its updates
                gone = self._run("DELETE FROM outbox WHERE event = ?", event)  # and end go
                self._db.execute(  # with it, those still to come too
                    "INSERT OR IGNORE INTO dropped_events VALUES (?)", (event,))  # fmt: skip
                self._db.execute(
                    "DELETE FROM dropped_events WHERE rowid <= "
                    "(SELECT MAX(rowid) FROM dropped_events) - ?",
                    (DROPPED_EVENTS_KEPT,),
                )
            else:
                gone = self._run("DELETE FROM outbox WHERE id = ?", i)
            left, dropped = left - gone, dropped + gone
        if left > 0:  # only ends of events that may have started at the broker: the oldest
            ids = self._db.execute("SELECT id FROM outbox ORDER BY id LIMIT ?", (left,))
            dropped += self._delete([r[0] for r in ids])
        self._rows -= dropped
        self._count_dropped(dropped)

    def _run(self, sql: str, *args: object) -> int:
        """Rows a DELETE took (under `_lock`)."""
        return max(self._db.execute(sql, args).rowcount, 0)

    def _delete(self, ids: list[int]) -> int:
        """Delete rows by id; how many went (under `_lock`)."""
        gone = self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
        return max(gone.rowcount, 0)

    def _count_dropped(self, n: int) -> None:
        """Count `n` messages dropped for want of room, and say so in time (under `_lock`)."""
        if n <= 0:
            return
        self._db.execute(
            "INSERT INTO meta VALUES ('dropped', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            (n,),
        )
        self._dropped_unlogged += n
        self._report_drops()

    def _report_drops(self, now: bool = False) -> None:
        """Log the drops not yet reported, at most every FULL_LOG_EVERY_S (under `_lock`);
        `now`: whatever the time (at close: the last minute's went unsaid, in a review)."""
        due = now or time.monotonic() - self._full_logged_at >= FULL_LOG_EVERY_S
        if self._dropped_unlogged and due:
            log.warning(
                "spool full (%d messages): dropped %d since the last report (replaced "
                "retained messages and anomaly updates first, then the oldest)",
                self.max_messages,
                self._dropped_unlogged,
            )
            self._full_logged_at, self._dropped_unlogged = time.monotonic(), 0

    def after(self, last_id: int, limit: int = 100) -> list[Spooled]:
        """Messages with id > last_id, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain FROM outbox WHERE id > ? ORDER BY id "
                "LIMIT ?",
                (last_id, limit),
            ).fetchall()
        return [Spooled(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def holds(self, topic: str) -> bool:
        """Whether a message of `topic` waits here."""
        with self._lock:
            found = self._db.execute("SELECT 1 FROM outbox WHERE topic = ? LIMIT 1", (topic,))
            return found.fetchone() is not None

    def remove(self, message_id: int) -> None:
        """Forget a message the broker acknowledged."""
        self.remove_many([message_id])

    def remove_many(self, message_ids: list[int]) -> None:
        """Forget messages the broker acknowledged, in one transaction that is not synced to
        the card on its own: each row deleted in a synced commit of its own was one of a
        message's two syncs (an SD-card review measured ~30 KB of writes a message, 7.5 GB a
        month through a long fault; replaying 10 min of a fault, 144 syncs became 82). The
        next synced append (or SQLite's checkpoint) takes the deletes with it; a power cut
        before then sends them again, as QoS 1 may (a duplicate, never a loss)."""
        if not message_ids:
            return
        with self._lock:
            durable = self.path is not None
            if durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN")
                try:
                    gone = self._db.executemany(
                        "DELETE FROM outbox WHERE id = ?", [(i,) for i in message_ids]
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # a failed COMMIT may have rolled back itself
                        self._db.execute("ROLLBACK")
                    raise
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous=FULL")
            self._rows -= max(gone.rowcount, 0)

    def depth(self) -> int:
        """Messages waiting."""
        with self._lock:
            return self._rows

    @property
    def dropped(self) -> int:
        """Messages dropped because the spool was full, over its lifetime."""
        with self._lock:
            return self._dropped()

    def stats(self) -> tuple[int, int]:
        """(messages waiting, dropped) for the metrics and the status; when the file cannot
        be read (a failing card, said by the publisher), the last figures read, logged once:
        a report must never stop the monitor."""
        try:
            with self._lock:
                self._stats = (self._rows, self._dropped())
                # the drops of a burst that ended within a minute of the last report: they
                # waited for a later drop to be logged, which the outage's end never brought
                self._report_drops()
            self._stats_failed = False
        except sqlite3.Error as exc:
            if not self._stats_failed:
                log.error("spool %s cannot be read (%s): its figures are the last read",
                          self.path, exc)  # fmt: skip
            self._stats_failed = True
        return self._stats

    def close(self) -> None:
        """Close the database, saying the drops not yet reported."""
        with self._lock:
            self._report_drops(now=True)
            self._db.close()

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def _dropped(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()
        return int(row[0]) if row else 0
