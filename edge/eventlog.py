"""The local event log: every anomaly's `start` and `end` as one JSON line in
`data_dir/events.jsonl`, append-only and bounded (rotated to `events.jsonl.1`), kept after
MQTT delivery so `soundsentry events` can list them for a spreadsheet.

The MQTT spool forgets an event once the broker has it; this log is the device's own record.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from edge.clips import CLIP_ID_CHARS, event_of, same_event
from edge.commands import LAST
from edge.errors import SoundSentryError
from edge.messages import EventMessage, MetricsMessage, StateMessage
from edge.private import private_dir, private_file, sync_folder
from edge.sink import Sink

if TYPE_CHECKING:
    from edge.settings import Settings

log = logging.getLogger(__name__)

LOG_NAME = "events.jsonl"
MAX_BYTES = 4 * 1024 * 1024
"""Size at which the log is rotated; with one rotated generation, at most twice this on disk:
about 7 000 events (a start and an end take 1 to 1.2 KB); older ones are dropped, and
`soundsentry events` says how far back the log reaches when it has rotated."""
ROTATED_NAME = LOG_NAME + ".1"
LOGGED = ("start", "end")
"""Updates are left out: an event's `end` carries its peak and mean."""
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
CSV_COLUMNS = (
    "started_at",
    "ended_at",
    "duration_s",
    "peak_score",
    "mean_score",
    "threshold",
    "bands",
    "clip",
    "clip_seconds",
    "clip_url",
    "label",
    "model",
    "device_id",
    "event_id",
    "status",
    "trigger",
    "ended_by",
    "interrupted",
    "machine",
    "fault",
)
"""The CSV's columns; new ones are added at the end, so a spreadsheet's formulas keep theirs."""
_NUMBERS = ("peak_score", "threshold", "duration_s", "mean_score", "clip_seconds")
_TEXTS = ("clip", "clip_url", "ended_at", "label", "model", "device_id", "trigger", "machine")
"""Fields read as text (a clip's name is made a path and a link): any other type is left out."""
_BAND_KEYS = ("low_hz", "high_hz", "deviation")


class EventLog:
    """Append-only JSON lines, rotated once the file passes `max_bytes`."""

    def __init__(self, folder: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = folder / LOG_NAME
        self.max_bytes = max_bytes

    def append(self, message: EventMessage) -> None:
        """Write a start or an end (updates are skipped); rotate when the file is full."""
        if message.type not in LOGGED:
            return
        private_dir(self.path.parent)
        if self.path.exists() and self.path.stat().st_size >= self.max_bytes:
            self.path.replace(self.path.with_name(ROTATED_NAME))
            sync_folder(self.path.parent)
        private_file(self.path)
        with open(self.path, "a+b") as fh:
            torn = False  # a last line cut off by a power cut must not swallow this one
            if fh.seek(0, os.SEEK_END):
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"
            fh.write((b"\n" if torn else b"") + message.to_payload().encode() + b"\n")
            fh.flush()  # on the card before it goes on: a power cut (the fault may trip the
            os.fsync(fh.fileno())  # supply) must not lose the start an `end` is owed for


class EventLogSink(Sink):
    """The daemon's sink for the local event log; a full or read-only disk is logged, never
    raised, so it cannot stop the monitor. What could not be written is kept (up to
    MAX_PENDING messages) and written, in order, before the next event: an `end` lost to a full
    card would otherwise leave its event open, and the next start would close it a second time
    as interrupted."""

    MAX_PENDING = 1000

    def __init__(self, folder: Path) -> None:
        self.log = EventLog(folder)
        self._pending: list[EventMessage] = []
        self._lost = 0
        """Messages dropped from the pending ones since the log last took them (the oldest)."""

    def event(self, message: EventMessage) -> None:
        """Append the event to the log, after any that an earlier failure left unwritten."""
        if message.type not in LOGGED:
            return
        self._pending.append(message)
        if len(self._pending) > self.MAX_PENDING:  # dropped silently, and "all written" after
            if not self._lost:  # (in a review): said once, and counted at the recovery
                log.error(
                    "event log %s: %d start and end messages held back; the oldest are dropped "
                    "from the log now (they went to MQTT)",
                    self.log.path,
                    self.MAX_PENDING,
                )
            self._lost += len(self._pending) - self.MAX_PENDING
            del self._pending[: -self.MAX_PENDING]
        self._write_pending(failed=len(self._pending) > 1)

    def metrics(self, message: MetricsMessage) -> None:
        """At each metrics interval, what a full disk held back is tried again (an `end` may
        otherwise wait for the next anomaly, days later)."""
        if self._pending:
            self._write_pending(failed=True)

    def state(self, message: StateMessage) -> None:
        """At the daemon's stop (`stopped`, after the last events and metrics), what is still
        held back is tried once more and what stays is said lost: it went without a word, an
        event's `end` with it, and the log listed that event as open (a full-disk review)."""
        if message.state != "stopped" or not self._pending:
            return
        self._write_pending(failed=True)
        if self._pending:
            log.error(
                "event log %s: %d start and end message(s) held back are lost at the stop (no "
                "room to write them; they went to MQTT)",
                self.log.path,
                len(self._pending) + self._lost,
            )
            self._pending.clear()
            self._lost = 0

    def _write_pending(self, failed: bool) -> None:
        try:
            while self._pending:
                self.log.append(self._pending[0])
                self._pending.pop(0)
        except OSError as exc:
            if not failed:
                log.error("event log %s: %s (events still go to MQTT)", self.log.path, exc)
            return
        if failed:
            lost = (
                f"; {self._lost} older start and end messages are not (they went to MQTT)"
                if self._lost
                else ""
            )
            log.warning(
                "event log %s: writable again, the events held back are in it%s",
                self.log.path,
                lost,
            )
            self._lost = 0


@dataclass(frozen=True)
class LoggedEvent:
    """One anomaly as the log knows it: its `end`, or its `start` if it never ended."""

    data: dict[str, Any]

    @property
    def status(self) -> str:
        """`ended`, or `open` (still running, or the daemon stopped before its end)."""
        return "ended" if self.data.get("type") == "end" else "open"

    @property
    def interrupted(self) -> bool:
        """The daemon stopped before the anomaly ended: its duration is an upper bound."""
        return self.data.get("interrupted") is True

    @property
    def started(self) -> datetime:
        """When it started, UTC."""
        return parse_time(str(self.data["started_at"]))

    def row(self) -> dict[str, Any]:
        """The CSV row: plain values, bands as `low-high Hz (deviation)` joined by `; `."""
        row = {k: self.data.get(k, "") for k in CSV_COLUMNS}
        row["bands"] = "; ".join(
            f"{b['low_hz']:.0f}-{b['high_hz']:.0f} Hz ({b['deviation']:.2f})"
            for b in self.data.get("bands") or []
        )
        row["status"] = self.status
        row["interrupted"] = "yes" if self.interrupted else ""
        fault = self.data.get("fault")  # a classifier's: its class a fault, or a change of class
        row["fault"] = {True: "yes", False: "no"}.get(fault, "") if isinstance(fault, bool) else ""
        return {k: "" if v is None else v for k, v in row.items()}


def read_events(folder: Path, since: datetime | None = None) -> list[LoggedEvent]:
    """Events in the log (rotated part first), one per event_id, oldest first; lines that
    are not complete JSON (a write cut short) are skipped."""
    latest: dict[str, dict[str, Any]] = {}
    for path in (folder / ROTATED_NAME, folder / LOG_NAME):
        damaged = 0
        for data in _lines(path):
            if data is None or not _valid(data):  # a damaged end must not replace its start
                damaged += 1
                continue
            event_id = data["event_id"]
            if data.get("type") == "end" or event_id not in latest:
                latest[event_id] = _cleaned(data)
        _say_damaged(path, damaged)
    events = [LoggedEvent(d) for d in latest.values()]
    if since is not None:
        events = [e for e in events if e.started >= since]
    return sorted(events, key=lambda e: e.started)


def last_logged_id(folder: Path, device_id: str | None = None) -> str | None:
    """The id of the event logged last (of `device_id`'s, given one): the most recent by the
    log's order, which the clock cannot reorder (a Pi without RTC, set back after a power cut,
    stamps a later clip earlier). None without a log."""
    last = None
    for path in (folder / ROTATED_NAME, folder / LOG_NAME):
        for data in _lines(path):
            mine = data is not None and device_id in (None, data.get("device_id"))
            if mine and _valid(data):
                last = data["event_id"]
    return last


_damaged_said: dict[Path, int] = {}
"""How many damaged lines each log was last said to hold: the dashboard reads the log at every
refresh, and one line cut short by a power cut is said once, not once a minute for months."""


def _say_damaged(path: Path, damaged: int) -> None:
    """Name the lines of a log that were skipped, when their number changes."""
    if damaged and _damaged_said.get(path) != damaged:
        log.warning(
            "%s: %d line(s) skipped, not an event record (a write cut short by a power cut "
            "or a full card, or an edit); the other events are listed",
            path, damaged,
        )  # fmt: skip
    _damaged_said[path] = damaged


def _lines(path: Path) -> Iterable[dict[str, Any] | None]:
    """Each line's record; None for a line that is not one (it is counted, then skipped)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except ValueError:
                    data = None
                yield data if isinstance(data, dict) else None
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SoundSentryError(f"cannot read the event log {path}: {exc.strerror}") from None


def has_rotated(folder: Path) -> bool:
    """The log has been rotated at least once, so its oldest events may have been dropped."""
    return (folder / ROTATED_NAME).exists()


def _cleaned(data: dict[str, Any]) -> dict[str, Any]:
    """The event with fields of the wrong type (a hand-edited or foreign line) left out, so
    one odd line neither stops a listing nor loses the rest of its event."""
    out = dict(data)
    for key in _NUMBERS:
        value = out.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            out[key] = None
    for key in _TEXTS:
        if out.get(key) is not None and not isinstance(out[key], str):
            out[key] = None
    bands = out.get("bands")
    if bands is not None and not (
        isinstance(bands, list)
        and all(
            isinstance(b, dict)
            and all(
                isinstance(b.get(k), (int, float)) and not isinstance(b.get(k), bool)
                for k in _BAND_KEYS
            )
            for b in bands
        )
    ):
        out["bands"] = None
    return out


def _valid(data: dict[str, Any]) -> bool:
    """An event every reader can use: its id (the dashboard keys its list on it) and start."""
    if not isinstance(data.get("event_id"), str) or not data["event_id"]:
        return False
    try:
        parse_time(str(data["started_at"]))
    except (KeyError, SoundSentryError):
        return False
    return True


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or time (UTC when it says so or ends in Z, else local time)."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise SoundSentryError(f"not a date or time: {text!r}") from None
    try:
        return value.astimezone(UTC) if value.tzinfo else value.astimezone().astimezone(UTC)
    except (ValueError, OverflowError):  # at the calendar's ends (0001-01-01): as UTC
        return value.replace(tzinfo=UTC)


def is_age(text: str) -> bool:
    """Whether a `--since` / `--until` is an age (`90m`, `24h`), counted back from now."""
    return _RELATIVE.match(text) is not None


def parse_since(text: str, now: datetime | None = None, flag: str = "--since") -> datetime:
    """`--since` (or `--until`): an ISO date or time, or an age such as `90m`, `24h`, `7d`."""
    match = _RELATIVE.match(text)
    if match:
        seconds = float(match.group(1)) * UNITS[match.group(2)]
        try:
            return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
        except OverflowError:  # before the year 1: every event is younger
            return datetime.min.replace(tzinfo=UTC)
    try:
        return parse_time(text)
    except SoundSentryError:
        raise SoundSentryError(
            f"{flag} {text!r}: give an ISO date or time (2026-11-30, 2026-11-30T08:00) "
            "or an age (90m, 24h, 7d, 2w)"
        ) from None


def write_csv(events: list[LoggedEvent], out: TextIO) -> None:
    """The events as CSV with a header row."""
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for event in events:
        writer.writerow(event.row())


def format_event(event: LoggedEvent, marked: Collection[str] = ()) -> str:
    """One readable line: start, duration, peak vs threshold, loudest band, clip (or, without
    one, the id `mark_normal` takes), and whether the model in use learnt it as normal: among
    `marked`, the active version's marks. An operator in a field review could not tell which
    event to mark, nor which were marked already."""
    d = event.data
    duration = f"{d['duration_s']:.1f} s" if d.get("duration_s") is not None else "open"
    if event.interrupted:  # the daemon stopped first: it lasted at most this
        duration = f"<={duration}"
    band = (d.get("bands") or [None])[0]
    where = f"{band['low_hz']:.0f}-{band['high_hz']:.0f} Hz" if band else "-"
    if d.get("label"):  # a classifier's: which fault it heard (a review found it in the CSV only)
        where = f"{d['label']}  {where}"
    # raised by the CUSUM, its peak may lie below the threshold: said as the README says it
    how = ", raised by evidence over time" if d.get("trigger") == "cusum" else ""
    notes = "  interrupted" if event.interrupted else ""
    eid = str(d.get("event_id") or "")
    if any(same_event(m, eid) for m in marked):
        notes += "  marked normal"
    clip = d.get("clip") or (f"id {eid[:CLIP_ID_CHARS]}" if eid else "")
    return (
        f"{local_time(d['started_at'])}  {duration:>9}  peak {_number(d.get('peak_score'))} "
        f"(threshold {_number(d.get('threshold'))}{how})  {where}  {clip}{notes}"
    ).rstrip()


def local_time(stamp: datetime | str) -> str:
    """A logged UTC time (or a datetime) in the local time the listing is asked in (`--since` is
    local unless it ends in Z; the listing said UTC, and `--since 2026-12-05` in Berlin listed
    an event at "2026-12-04T23:00:25Z"), with its offset; as given when it does not parse or
    lies beyond the calendar's ends."""
    try:
        when = (
            stamp
            if isinstance(stamp, datetime)
            else datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
        )
        if when.tzinfo is None:
            return str(stamp)
        return when.astimezone().isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        return stamp.isoformat(timespec="seconds") if isinstance(stamp, datetime) else str(stamp)


def _number(value: Any) -> str:
    """Four significant digits, trailing zeros kept: a column of peaks read 2.59 beside 2.357
    (a soak walk-through), as if measured to another precision."""
    return "-" if value is None else f"{value:#.4g}"


KEPT_EVENTS = 16
"""Recent events whose window features are kept for mark_normal."""


class RecentEvents:
    """The events this device raised, as `mark_normal` names them: the last KEPT_EVENTS kept in
    memory by id (their windows, clip, model and state, filled in by the daemon), else the
    device's event log, else the newest evidence clip by name."""

    def __init__(
        self, settings: Callable[[], Settings], clip_folder: Callable[[], Path | None]
    ) -> None:
        self.settings = settings  # the daemon's, read at each look: a reload may change them
        self.clip_folder = clip_folder
        self.kept: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def trim(self) -> None:
        """Forget the oldest kept events beyond KEPT_EVENTS."""
        while len(self.kept) > KEPT_EVENTS:
            self.kept.popitem(last=False)

    def named(self, event_id: str) -> str | None:
        """The id of a recent event (`last`: the most recent), kept here, else the last in the
        device's event log, else the newest clip by name; None when there is none."""
        if event_id != LAST:
            return self.full_id(event_of(event_id))
        if self.kept:
            return next(reversed(self.kept))
        logged = last_logged_id(self.settings().data_dir, self.settings().device_id)
        if logged is not None:
            return logged
        folder = self.clip_folder()
        clips = sorted(folder.glob("*.wav")) if folder else []
        return event_of(clips[-1].name) if clips else None

    def full_id(self, event_id: str) -> str:
        """An event named by the 12 characters of its clip's name, as `events` lists it, by its
        whole id when one kept here or in the event log has it (the newest): the windows of an
        event without a clip are kept under the whole id, and the short one found none of them
        (a diff review)."""
        if len(event_id) != CLIP_ID_CHARS:
            return event_id
        kept = next((e for e in reversed(self.kept) if same_event(e, event_id)), None)
        if kept is not None:
            return kept
        logged = self._logged_ids() or []  # an event log that cannot be read: its clip may be
        return next((e for e in reversed(logged) if same_event(e, event_id)), event_id)

    def model_of(self, eid: str) -> str | None:
        """The model that raised an event, kept here or in the event log (the newest of that
        id); None when neither says."""
        if eid in self.kept:
            return self.kept[eid].get("model")
        logged = self._logged() or []
        found = next((e for e in reversed(logged) if same_event(e["event_id"], eid)), {})
        model = found.get("model")
        return model if isinstance(model, str) and model else None

    def known(self, eid: str) -> bool:
        """Whether the event is one this device raised: kept here or in its event log (one that
        cannot be read: not said unknown)."""
        if eid in self.kept:
            return True
        logged = self._logged_ids()
        return logged is None or any(same_event(e, eid) for e in logged)

    def _logged_ids(self) -> list[str] | None:
        """The ids of the events in the device's event log, oldest first; None when it cannot
        be read."""
        logged = self._logged()
        return None if logged is None else [e["event_id"] for e in logged]

    def _logged(self) -> list[dict[str, Any]] | None:
        """The events in the device's event log, oldest first; None when it cannot be read."""
        try:
            return [e.data for e in read_events(self.settings().data_dir)]
        except SoundSentryError:
            return None
