"""Evidence clips: a capture ring buffer supplies pre-roll; each anomaly is saved as a WAV.

The clip runs from `preroll` seconds before the anomaly's first window to its end, capped at
`max_seconds`. Old clips are deleted by total size and age. A clip is written under a temporary
name in its folder, fsynced and renamed, so a power cut never leaves a torn WAV under a clip's
name (the temporary file left then is deleted at the next start).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from edge import clock
from edge.private import atomic_write, private_dir, remove_stale_temps

if TYPE_CHECKING:
    from edge.settings import Settings

log = logging.getLogger(__name__)
CLIP_ID_CHARS = 12
"""A clip's name carries this many characters of its event's id."""
CLIPS_DIR = "clips"
"""The clips' folder in data_dir."""

RESERVE_MB = 64.0
"""Free space a clip never takes: the spool, the event log, a learning period and the model
versions need room too. A full card was filled again by clips within a second of space being
freed, and the spool and event log failed until the end (in a review); the oldest clips go to
keep it, and when they are not enough the clip is not saved."""
SAY_AGAIN_S = 600.0
"""A clip that cannot be saved for the same reason is said again (ERROR) this long after; at
DEBUG between (a full card logged one ERROR per anomaly: 2,413 lines in 30 s)."""

READ_ONLY = (
    "the card is read-only (the kernel makes it so after I/O errors: `dmesg | grep -i mmc`; "
    "back it up and replace it)"
)
CLIP_SUBTYPE = "PCM_16"
WAV_HEADER_BYTES = 44
FUTURE_SLACK_S = 86400.0
"""A clip stamped this far ahead of a believed clock was written under a wrong one."""
RETENTION_EVERY_S = 3600.0
"""Retention also runs at start and this often (monotonic seconds), not only after a new clip:
on a quiet machine clips past max_age_days (they may hold speech) stayed for good."""


class CaptureRing:
    """The last `seconds` of the stream, addressable by absolute sample index."""

    def __init__(self, seconds: float, samplerate: int, start: int = 0) -> None:
        self.size = max(1, int(seconds * samplerate))
        self._buf = np.zeros(self.size, dtype=np.float32)
        self.end = start
        """Absolute index one past the newest sample."""
        self.begin = start
        """Absolute index of the first sample pushed: nothing before it was heard."""

    def push(self, block: np.ndarray) -> None:
        """Append samples, overwriting the oldest."""
        block = block[-self.size :]
        n = len(block)
        pos = self.end % self.size
        first = min(n, self.size - pos)
        self._buf[pos : pos + first] = block[:first]
        self._buf[: n - first] = block[first:]
        self.end += n

    def forget(self) -> None:
        """An unrelated stream follows (the next replayed file): nothing held was heard in it."""
        self.begin = self.end

    def since(self, start: int) -> np.ndarray:
        """Samples from absolute index `start` (clamped to what is still held) to the newest."""
        start = max(start, self.end - self.size, self.begin)
        n = self.end - start
        if n <= 0:
            return np.zeros(0, dtype=np.float32)
        idx = np.arange(start, self.end) % self.size
        return self._buf[idx]


@dataclass
class _Recording:
    event_id: str
    started_at: float
    parts: list[np.ndarray]
    samples: int


class ClipRecorder:
    """Collects the audio of open anomalies and writes them to `folder` as WAV files."""

    def __init__(
        self,
        folder: Path,
        samplerate: int,
        preroll_s: float = 3.0,
        max_seconds: float = 60.0,
        max_total_mb: float = 500.0,
        max_age_days: float = 30.0,
        start_sample: int = 0,
    ) -> None:
        """`start_sample`: the stream's index of the first block it will be pushed (a recorder
        made by a reload mid-stream), the scale `start` is given first samples on."""
        self.folder = folder
        self.samplerate = samplerate
        self._limits(preroll_s, max_seconds, max_total_mb, max_age_days)
        self.ring = CaptureRing(preroll_s + 15.0, samplerate, start_sample)
        self._rec: _Recording | None = None
        self._written: list[Path] = []
        self._written_at: dict[Path, float] = {}
        """When each clip of this run was written (monotonic): its age while the wall clock
        cannot be believed."""
        remove_stale_temps(folder)  # a clip a power cut interrupted
        self._next_retention: float | None = None
        self._skipped: set[str] = set()
        """Entries retention could not stat or delete, named in a warning once each."""
        self._said: tuple[str, float] | None = None
        """Why the last clip was not saved, and when that was said at ERROR."""
        self._clock_said = False

    def push(self, block: np.ndarray) -> None:
        """Feed every captured block (mono, model rate)."""
        self.ring.push(block)
        rec = self._rec
        if rec is not None and rec.samples < self.max_samples:
            part = _pcm16(block[: self.max_samples - rec.samples])
            rec.parts.append(part)
            rec.samples += len(part)

    def start(self, event_id: str, first_sample: int, wall_time: float) -> None:
        """Begin a clip at `first_sample` minus the pre-roll (taken from the ring)."""
        head = _pcm16(self.ring.since(first_sample - self.preroll)[: self.max_samples])
        self._rec = _Recording(event_id, wall_time, [head], len(head))

    def finish(self, event_id: str) -> tuple[str, float] | None:
        """Write the clip of `event_id`; return (file name, seconds) or None on failure."""
        rec, self._rec = self._rec, None
        if rec is None or rec.event_id != event_id:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(rec.started_at))
        name = f"{stamp}-{clip_id(event_id)}.wav"
        try:
            private_dir(self.folder)
            short = self._make_room(rec.samples * 2 + WAV_HEADER_BYTES)
            if short is None:
                self._write(self.folder / name, rec.parts)
        except (OSError, sf.LibsndfileError) as exc:
            short = self._why(exc)
        if short is not None:
            self._say(short, f"could not save evidence clip {name}: {short}")
            self._retain()  # the limits still apply: older clips make room
            return None
        self._said = None
        self._written.append(self.folder / name)
        self._written_at[self.folder / name] = time.monotonic()
        self._retain(keep=self.folder / name)  # older clips make room for it
        return name, round(rec.samples / self.samplerate, 3)

    def _free_mb(self) -> float:
        """Free space where the clips go (unknown: as if there were room)."""
        try:
            return shutil.disk_usage(self.folder).free / 1e6
        except OSError:
            return math.inf

    def _make_room(self, size: int) -> str | None:
        """Delete the oldest clips until `size` bytes leave RESERVE_MB free; why the clip cannot
        be saved when even that is not enough (None: it can)."""
        needed = size / 1e6 + RESERVE_MB
        if self._free_mb() >= needed:
            return None
        if self._read_only():  # nothing can be deleted either: the oldest clips stay
            return READ_ONLY
        clips = self._clips()
        freeable = sum(st.st_blocks * 512 for _, st in clips) / 1e6
        if self._free_mb() + freeable < needed:
            # another program filled the card: deleting every clip would not make room, and
            # the first anomaly deleted all the evidence for nothing (a full-disk review)
            kept = f"; the {len(clips)} older clip(s) are kept, which free only " if clips else ""
            return (
                f"the disk is nearly full ({self._free_mb():.0f} MB free; clips leave "
                f"{RESERVE_MB:g} MB to the spool and the event log"
                + (f"{kept}{freeable:.1f} MB)" if clips else ")")
            )
        order = {path: i for i, path in enumerate(self._written)}
        for path, _ in sorted(clips, key=lambda c: (order.get(c[0], -1), c[1].st_mtime)):
            if self._delete(path):
                self._written = [p for p in self._written if p != path]
                self._written_at.pop(path, None)
            if self._free_mb() >= needed:
                return None
        return (
            f"the disk is nearly full ({self._free_mb():.0f} MB free; clips leave "
            f"{RESERVE_MB:g} MB to the spool and the event log)"
        )

    def _read_only(self) -> bool:
        try:
            return bool(os.statvfs(self.folder).f_flag & os.ST_RDONLY)
        except OSError:
            return False

    def _why(self, exc: BaseException) -> str:
        """A write's failure in words: libsndfile says "System error" for a full disk, and
        a read-only card was "the disk is nearly full" (a power-loss review)."""
        if self._read_only():
            return READ_ONLY
        if self._free_mb() < RESERVE_MB:
            return f"the disk is full ({self._free_mb():.0f} MB free)"
        return str(exc)

    def _say(self, why: str, message: str) -> None:
        """ERROR when the reason is new or SAY_AGAIN_S after it was said, DEBUG otherwise."""
        now, reason = time.monotonic(), why.split(" (")[0]  # the figures in brackets vary
        if self._said is not None and self._said[0] == reason and now - self._said[1] < SAY_AGAIN_S:
            log.debug("%s", message)
            return
        self._said = (reason, now)
        log.error("%s", message)

    def _write(self, path: Path, parts: list[np.ndarray]) -> None:
        """Write a WAV atomically, mode 0600 (edge.private.atomic_write), part by part: joined
        first, an hour's clip took two more copies of itself in memory."""
        rate = self.samplerate

        def write(tmp: Path) -> None:
            with sf.SoundFile(tmp, "w", rate, 1, CLIP_SUBTYPE, format="WAV") as out:
                for part in parts:
                    out.write(part)

        atomic_write(path, write)

    def _limits(
        self, preroll_s: float, max_seconds: float, max_total_mb: float, max_age_days: float
    ) -> None:
        self.preroll = int(preroll_s * self.samplerate)
        self.max_samples = int(max_seconds * self.samplerate)
        self.max_total_bytes = int(max_total_mb * 1e6)
        self.max_age_s = max_age_days * 86400

    def configure(
        self, preroll_s: float, max_seconds: float, max_total_mb: float, max_age_days: float
    ) -> None:
        """New settings (SIGHUP): the audio the ring holds is kept, and the limits apply at the
        next housekeep."""
        self._limits(preroll_s, max_seconds, max_total_mb, max_age_days)
        ring = CaptureRing(preroll_s + 15.0, self.samplerate)
        held = self.ring.since(0)[-ring.size :]  # a shorter ring keeps the newest
        ring.begin = ring.end = self.ring.end - len(held)
        ring.push(held)  # samples keep their stream index
        self.ring, self._next_retention = ring, None

    def housekeep(self, now: float) -> list[Path]:
        """Enforce retention at the first call and then every RETENTION_EVERY_S of `now`
        (monotonic seconds); the clips deleted."""
        if self._next_retention is not None and now < self._next_retention:
            return []
        self._next_retention = now + RETENTION_EVERY_S
        return self._retain()

    def _retain(self, keep: Path | None = None) -> list[Path]:
        """enforce_retention, logging instead of raising: a failure there must not stop the
        daemon (finish() runs at the end of every anomaly, before its `end` is published)."""
        try:
            return self.enforce_retention(keep)
        except OSError as exc:  # a folder we cannot read: said, and tried again later
            log.error("retention of %s failed: %s", self.folder, exc)
            return []

    def clock_moved(self, seconds: float) -> None:
        """The wall clock was set `seconds` forward (or back): NTP on a Pi without a real-time
        clock. Clips written since start carry file times of the old clock, by which retention
        would delete them early (a clock at boot weeks behind) or keep them too long; their
        file times, and the open clip's start, move with the clock."""
        if self._rec is not None:
            self._rec.started_at += seconds
        for path in self._written:
            with contextlib.suppress(OSError):  # deleted by retention, or by hand
                st = path.stat()
                os.utime(path, (st.st_atime + seconds, st.st_mtime + seconds))

    def enforce_retention(self, keep: Path | None = None) -> list[Path]:
        """Delete clips older than the age limit, then the oldest until under the size limit;
        the clips deleted. An entry that cannot be deleted (a directory named like a clip, EIO)
        is skipped and left out of the size, so it neither holds the others past their limits
        nor costs newer clips. `keep`, the clip just written, is never deleted here: its event,
        about to be published, names it (by name: a clock set back at boot may make it look
        old); without it, the newest goes by age only. So a size limit below one clip keeps
        that clip rather than none."""
        now = time.time()
        clips = self._clips()
        removed = []
        wrong = clock.believable(now)
        if wrong is not None:  # no file's age is known: the size limit holds, and this run's
            self._say_clock(wrong)  # own clips go by the time since they were written (a
            max_age = math.inf  # site whose NTP server is never reached kept them for good)
            mono = time.monotonic()
            for path, _ in clips:
                written = self._written_at.get(path, mono)
                aged = path != keep and mono - written > self.max_age_s
                if aged and self._delete(path):
                    removed.append(path)
            clips = [c for c in clips if c[0] not in removed]
        else:
            clips = self._restamp(clips, now)
            max_age = self.max_age_s
        # the too old come first; this run's clips last, in the order written: a clock set
        # back at boot stamps them before the clips of the last run, and each new clip
        # deleted the one before it, which the event log names
        order = {path: i for i, path in enumerate(self._written)}
        clips.sort(key=lambda c: (order.get(c[0], -1), c[1].st_mtime))
        total = sum(st.st_size for _, st in clips if now - st.st_mtime <= max_age)
        newest = keep if keep is not None else (clips[-1][0] if clips else None)
        for path, st in clips:
            if path == keep:  # just written: neither its age (a clock set back) nor the size
                continue
            if now - st.st_mtime <= max_age:
                if total <= self.max_total_bytes:
                    break
                if path == newest:  # not for the size: its event may still be read
                    continue
                total -= st.st_size
            if self._delete(path):
                removed.append(path)
        self._written = [p for p in self._written if p not in removed]
        for path in removed:
            self._written_at.pop(path, None)
        return removed

    def written_before(self, other: ClipRecorder) -> None:
        """Take over the clips `other` wrote in this run (a reload made this one): while the
        wall clock cannot be believed, their ages are known from the time they were written
        alone, and clips turned off by a reload were kept for good (a review)."""
        self._written = [*other._written, *(p for p in self._written if p not in other._written)]
        self._written_at = {**other._written_at, **self._written_at}

    def _say_clock(self, why: str) -> None:
        """Once a run, while the wall clock is not believed: clips are kept by size only."""
        if not self._clock_said:
            self._clock_said = True
            log.warning("retention: %s: clips are kept by [clips] max_total_mb only until it "
                        "is, their ages unknown ([clips] max_age_days waits)", why)  # fmt: skip

    def _restamp(
        self, clips: list[tuple[Path, os.stat_result]], now: float
    ) -> list[tuple[Path, os.stat_result]]:
        """The clock believed: clips stamped by a clock that was wrong (before the earliest
        possible time, or more than a day ahead: written before NTP set it, by a run that
        did not see it jump) are stamped now and age from now. Deleted as 56 years old, or
        kept for good, in a clock review."""
        if self._clock_said:
            log.info("retention: the system clock is believed now: clips age by it again")
            self._clock_said = False
        kept = []
        for path, st in clips:
            kept.append((path, st))  # as it is unless stamped anew (counted, whatever happens)
            if clock.EARLIEST <= st.st_mtime <= now + FUTURE_SLACK_S or path.is_symlink():
                continue
            try:
                os.utime(path, (now, now), follow_symlinks=False)
                kept[-1] = (path, path.stat())
            except OSError as exc:
                self._skip(path, exc)
                continue
            log.info("retention: %s was stamped %s by a wrong clock: it ages from now",
                     path.name, time.strftime("%Y-%m-%d", time.gmtime(st.st_mtime)))  # fmt: skip
        return kept

    def _clips(self) -> list[tuple[Path, os.stat_result]]:
        """The clips in the folder with their stat; one deleted by hand since the listing is
        left out."""
        clips = []
        for path in self.folder.glob("*.wav"):
            try:
                clips.append((path, path.stat()))
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._skip(path, exc)
        return clips

    def _delete(self, path: Path) -> bool:
        """Delete one clip; False (and said once) when it cannot be."""
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            self._skip(path, exc)
            return False
        log.info("retention: deleted clip %s", path.name)
        return True

    def _skip(self, path: Path, exc: OSError) -> None:
        """Warn about an entry retention skips the first time only: it is met at every clip."""
        if path.name in self._skipped:
            log.debug("retention: skipping %s again: %s", path.name, exc)
            return
        self._skipped.add(path.name)
        log.warning("retention: skipping %s: %s", path.name, exc)


def _pcm16(audio: np.ndarray) -> np.ndarray:
    """Samples as the clip stores them (16-bit PCM, as libsndfile rounds float to it): a clip
    is held in memory until its anomaly ends, and an hour of float32 at 16 kHz with the copies
    made to write it (+667 MB) had the service killed at its memory limit (300 MB)."""
    return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)


def clip_id(event_id: str) -> str:
    """What of an event's id its clip's name carries (after the start's time stamp)."""
    return _safe(event_id)[:CLIP_ID_CHARS]


_CLIP_NAME = re.compile(rf"^\d{{8}}T\d{{6}}Z-([A-Za-z0-9_-]{{{CLIP_ID_CHARS}}})(\.wav)?$")


def event_of(name: str) -> str:
    """The event named by a clip's name (`20261206T062238Z-af09f3ba5db5.wav`, with or without
    `.wav`), as `events` lists it: its 12 characters of the event's id; any other name as it
    is. The whole name was refused by the command's pattern, and without `.wav` no event was
    found, though its clip was there (a walk-through)."""
    found = _CLIP_NAME.match(name)
    return found.group(1) if found else name.removesuffix(".wav")


def same_event(a: str, b: str) -> bool:
    """Two names of one event: equal, or one the other as its clip's name gives it (12
    characters: `mark_normal` of a clip's id, `events` listing an event without a clip)."""
    return a == b or any(
        len(short) == CLIP_ID_CHARS < len(full) and full.startswith(short)
        for full, short in ((a, b), (b, a))
    )


def clips_of(folder: Path, event_id: str) -> list[Path]:
    """The clips in `folder` whose names carry `event_id`, oldest name first."""
    return sorted(folder.glob(f"*-{glob.escape(clip_id(event_id))}.wav"))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def clip_keeper(settings: Settings, rate: int) -> ClipRecorder | None:
    """With clips off, a recorder that records nothing and only applies `[clips]` retention
    to the clips already written (turned off for privacy, they must not stay for good); None
    when clips are on (the recorder applies it) or there are none. The device's daemon's
    alone: a demo or a replay must not apply its limits to the device's clips."""
    c, folder = settings.clips, settings.data_dir / CLIPS_DIR
    if c.enabled or not folder.is_dir():
        return None
    return ClipRecorder(folder, rate, 0.0, 0.0, c.max_total_mb, c.max_age_days)


def clip_recorder(settings: Settings, rate: int, at: int = 0) -> ClipRecorder | None:
    """The evidence recorder `[clips]` asks for, or None when clips are off; `at`: the stream's
    sample index now (a reload turning clips on mid-stream)."""
    c = settings.clips
    if not c.enabled:
        return None
    private_dir(settings.data_dir)
    return ClipRecorder(
        settings.data_dir / CLIPS_DIR, rate, c.preroll_seconds, c.max_seconds, c.max_total_mb,
        c.max_age_days, at,
    )  # fmt: skip
