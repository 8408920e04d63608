"""`soundsentry record`: capture normal audio on site into chunked WAV files for training,
with progress and the input level; it refuses (loudly) to record silence or clipping, and
ends saying whether the level was good, too quiet or too loud and whether audio was lost
(dropped blocks, input overflows, a stalled device)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TextIO

import numpy as np
import soundfile as sf

from edge.audio_io import SoundSummary, sf_path
from edge.capture import MicSource
from edge.errors import SoundSentryError
from edge.health import QUIET_DBFS, AudioHealth, HealthChange
from edge.settings import Settings
from edge.sources import AudioGap

log = logging.getLogger(__name__)

BAR = 30
LOUD_PEAK_DBFS = -1.0
"""Peaks at or above this leave no headroom: a louder moment (a fault) would clip."""
GAP_TOLERANCE_S = 0.5
"""Audio may arrive this much behind the clock (scheduling jitter) before it counts as lost."""
MIN_KEPT_SECONDS = 1.0
"""A chunk cut short by Ctrl-C is kept if it holds at least one window's worth of audio."""
CLOCK_DRIFT = 1e-3
"""A sound card's clock may run this much slow against the system's (cheap USB: ~100 ppm)."""


class RecordingRefusedError(SoundSentryError):
    """The input is unusable for training (silent, flat or clipping)."""


class _Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP (`kill`, a closed SSH session) ended the recording: handled as Ctrl-C,
    so the chunk in progress gets its header and is kept, instead of a file cut short."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise _Signalled while the body runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise _Signalled(signal.Signals(signum).name)

    saved = {  # a signal ignored (`nohup` ignores SIGHUP) stays ignored
        sig: signal.signal(sig, stop)
        for sig in (signal.SIGTERM, signal.SIGHUP)
        if signal.getsignal(sig) != signal.SIG_IGN
    }
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _new_chunk(out: Path, stamp: str, index: int) -> Path:
    """A chunk's file, created here and nowhere before: a recording in the same second, or
    after the clock of a Pi without a real-time clock went back, never overwrites another."""
    while True:
        path = out / f"{stamp}-{index:04d}.wav"
        try:
            # 0600, as the daemon's clips: a site's audio may hold speech (the security review)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return path
        except FileExistsError:
            index += 1


def record(
    settings: Settings,
    seconds: float,
    out: Path,
    chunk_seconds: float = 60.0,
    samplerate: int = 16000,
    stream: TextIO | None = None,
) -> list[Path]:
    """Record `seconds` of audio into `out` as WAV chunks; return the files written."""
    from edge.console import logs_clear  # log lines erase the progress line first

    err = stream or sys.stderr
    with _stopped_by_signals(), logs_clear(err):
        return _record(settings, seconds, out, chunk_seconds, samplerate, err)


def _record(
    settings: Settings,
    seconds: float,
    out: Path,
    chunk_seconds: float,
    samplerate: int,
    err: TextIO,
) -> list[Path]:
    source = MicSource(
        settings.audio,
        samplerate,
        settings.health.stall_seconds,
        settings.health.reopen_max_seconds,
    )
    # after the device is found: a typo leaves no folder; a new one private (0700), as data_dir
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    health = AudioHealth(samplerate, settings.health.fault_seconds, settings.health.clip_fraction)
    total = int(seconds * samplerate)
    chunks = _Chunks(
        settings, out, time.strftime("%Y%m%dT%H%M%S"), samplerate, int(chunk_seconds * samplerate)
    )
    heard = 0
    meter = LevelMeter()
    timeline = Timeline(samplerate)
    stopped = ""
    try:
        for block in source:
            if not isinstance(block, np.ndarray):  # no audio yet, or a gap's mark
                if isinstance(block, AudioGap):
                    chunks.end_at_gap()
                continue
            meter.push(block)
            timeline.push(len(block), time.monotonic())
            block_at = heard  # where this block begins among the samples the health check heard
            heard += len(block)
            for change in health.push(block):
                if change.kind == "fault":
                    # (counted in samples heard: `got` forgets a chunk a gap cut short)
                    span = heard - round(health.run_seconds(change.fault) * samplerate)
                    chunks.refuse(change, span)
            chunks.write(block[: total - chunks.got], block_at, total)
            _progress(err, chunks.got / samplerate, total / samplerate, health.level)
            if chunks.got >= total:
                break
    except KeyboardInterrupt as exc:  # the user ends the recording early: what is recorded is kept
        stopped = exc.name if isinstance(exc, _Signalled) else "Ctrl-C"
    finally:
        # the chunk in progress when Ctrl-C, a signal or a device's failure came: finished
        # first, before anything is said (a terminal gone with its SSH session fails writes)
        chunks.finish_cut_short()
        source.stop()
        _say(err, "\n")
    _summarise(err, chunks, stopped, total, meter)
    gaps = gap_note(source.stats(), timeline.missing_s(), chunks.split)
    if gaps:
        _say(err, gaps + "\n")
    if stopped:  # the files are kept, but the recording is not what was asked: exit 130
        raise KeyboardInterrupt
    return chunks.written


@dataclass
class _Chunks:
    """The chunks of one recording: the one being written, and those kept so far."""

    settings: Settings
    out: Path
    stamp: str
    samplerate: int
    per_chunk: int
    written: list[Path] = field(default_factory=list)
    begun: dict[Path, int] = field(default_factory=dict)
    """Where each chunk starts, in samples heard."""
    writer: sf.SoundFile | None = None
    path: Path | None = None
    part: int = 0
    got: int = 0
    split: int = 0
    sound: SoundSummary = field(default_factory=SoundSummary)
    """The chunk in progress: one `train` would refuse is not kept."""
    mute: int = 0
    """Chunks deleted for that."""
    unusable: int = 0
    """Samples of such chunks deleted one after another, recorded again."""

    def end_at_gap(self) -> None:
        """A file is continuous audio: a gap ends it, the next block begins another."""
        if self.writer is None:
            return
        if _kept(self.writer, self.part, self.samplerate, self.sound) and self.path is not None:
            self.written.append(self.path)
            self.split += 1
            self.unusable = 0
        else:  # too short or unusable to keep (deleted): recorded again
            if _refused(self.sound) and self.part >= self.samplerate * MIN_KEPT_SECONDS:
                self.mute += 1
                self._count_unusable(self.part)
            self.got -= self.part
        self.writer, self.path = None, None

    def refuse(self, change: HealthChange, span: int) -> NoReturn:
        """Delete what holds the refused input and refuse the recording."""
        _discard(self.writer)  # it holds the refused input
        self.writer = None
        # and so do the complete chunks within the fault's span (chunks shorter
        # than fault_seconds: 5 s of digital silence was kept, and training then
        # refused the whole folder, in a review)
        refused = [p for p in self.written if self.begun[p] >= span]
        for p in refused:
            _unlink(p)
            self.written.remove(p)
        dropped = f" (deleted {len(refused)} holding only it)" if refused else ""
        raise RecordingRefusedError(
            f"input {change.fault}: {change.detail}; "
            f"kept {len(self.written)} complete chunk(s){dropped}{_muted(self.mute)}"
        )

    def write(self, block: np.ndarray, block_at: int, total: int) -> None:
        """Write a block, opening a chunk first and completing it when full."""
        where = self.path  # the chunk in progress (None between chunks), for the error line
        try:
            if self.writer is None:
                self.part = 0
                where = self.path = _new_chunk(self.out, self.stamp, len(self.written))
                self.begun[self.path] = block_at
                self.writer = sf.SoundFile(sf_path(self.path), "w", self.samplerate, 1, "PCM_16")
                self.sound = SoundSummary()
            block = np.clip(block, -1, 1)
            self.writer.write(block)
            self.sound.add(as_written(block))
            self.part += len(block)
            self.got += len(block)
            if self.part >= self.per_chunk or self.got >= total:
                self._complete()
        except (sf.LibsndfileError, OSError) as exc:  # a full or failing SD card
            self._failed(exc, where)

    def _complete(self) -> None:
        """Complete the chunk: kept even if its close fails, for all its audio is written and
        readers mend a header whose lengths were not."""
        (done, self.writer), (complete, self.path) = (self.writer, None), (self.path, None)
        if _refused(self.sound):  # shorter than the health check's span: `train` refuses it
            _discard(done)
            self.mute += 1
            self.got -= self.part  # recorded again, as a chunk a gap cut too short
            self._count_unusable(self.part)
        else:
            self.written.append(complete)
            self.unusable = 0
            done.close()

    def _failed(self, exc: Exception, where: Path | None) -> NoReturn:
        """Keep the audio before a failed write if it is worth keeping, and say why it ended."""
        failed, self.writer = self.writer, None
        if (
            failed is not None
            and self.path is not None
            and _kept(failed, self.part, self.samplerate, self.sound)
        ):
            self.written.append(self.path)  # the audio before the failed write
        elif self.path is not None:
            _unlink(self.path)  # a chunk just opened, or too short to keep
        raise SoundSentryError(
            f"cannot write {where or self.out}: {_reason(exc)}; kept {len(self.written)} file(s) "
            f"in {self.out} ({_free(self.out)})"
        ) from None

    def _count_unusable(self, part: int) -> None:
        """Count `part` samples deleted as unusable; refused once they are too many (`_again`)."""
        self.unusable = _again(
            self.unusable + part, self.samplerate, self.settings, self.written, self.mute
        )

    def finish_cut_short(self) -> None:
        """Finish the chunk in progress when the recording ended early: kept or deleted."""
        if self.writer is not None and self.path is not None:
            if _kept(self.writer, self.part, self.samplerate, self.sound):
                self.written.append(self.path)
            elif _refused(self.sound) and self.part >= self.samplerate * MIN_KEPT_SECONDS:
                self.mute += 1


def _summarise(err: TextIO, chunks: _Chunks, stopped: str, total: int, meter: LevelMeter) -> None:
    """Say how the recording ended and how its level was."""
    rate = chunks.samplerate
    if stopped:
        _say(
            err,
            f"stopped after {chunks.got / rate:.1f} of {total / rate:g} s ({stopped}); "
            f"kept {len(chunks.written)} file(s) in {chunks.out}{_muted(chunks.mute)}\n",
        )
    elif chunks.mute:
        _say(err, f"{_muted(chunks.mute).strip()}\n")
    if meter.samples:
        _say(err, meter.verdict() + "\n")


def _kept(writer: sf.SoundFile | None, part: int, samplerate: int, sound: SoundSummary) -> bool:
    """Close a chunk cut short and keep it if it holds a window's worth of audio that is not
    digital silence, a flat line or saturated all through (which `train` refuses, and with it
    the whole folder: a recording stopped within the health check's 5 s of a silent input
    kept such a chunk, in a review) and its header could be written; else delete it."""
    if writer is None:
        return False
    if part >= samplerate * MIN_KEPT_SECONDS and not _refused(sound) and _closed(writer):
        return True
    _discard(writer)
    return False


def _refused(sound: SoundSummary) -> bool:
    """A chunk `train` refuses (digital silence, a flat line or saturated all through)."""
    return sound.refusal() is not None


def as_written(block: np.ndarray) -> np.ndarray:
    """Samples (within -1..1) as a 16-bit file holds them and `train` reads them back:
    libsndfile writes round(x * 32767) and reads n / 32768."""
    return np.rint(block * 32767.0) / 32768.0


def _again(
    samples: int, samplerate: int, settings: Settings, written: list[Path], mute: int
) -> int:
    """`samples` deleted as unusable one chunk after another; refused once they span the health
    check's fault_seconds. Input that alternates between digital silence and a constant level
    is neither fault for the health check (each resets the other's count), and was recorded
    again and again without end (a review)."""
    if samples >= settings.health.fault_seconds * samplerate:
        raise RecordingRefusedError(
            f"input unusable: {samples / samplerate:.0f} s of it held only digital silence, a "
            f"flat line or saturated audio; kept {len(written)} complete chunk(s){_muted(mute)}"
        )
    return samples


def _muted(n: int) -> str:
    """What the summary says of chunks deleted for holding only unusable input."""
    if not n:
        return ""
    return (
        f" (deleted {n} holding only digital silence, a flat line or saturated audio, which "
        "training refuses)"
    )


def _discard(writer: sf.SoundFile | None) -> None:
    """Close an unfinished chunk and delete it (refused input, or a write that failed)."""
    if writer is not None:
        _closed(writer)
        _unlink(Path(os.fsdecode(writer.name)))  # bytes: opened by sf_path


def _unlink(path: Path) -> None:
    """Delete a chunk if the card lets us (a read-only one does not: it stays, cut short)."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _say(err: TextIO, text: str) -> None:
    """Write to the terminal if it is still there (an SSH session that closed is not)."""
    with contextlib.suppress(OSError, ValueError):
        err.write(text)
        err.flush()


def _closed(writer: sf.SoundFile) -> bool:
    """Close a chunk; False if its last write (the header's lengths) failed."""
    try:
        writer.close()
    except (sf.LibsndfileError, OSError):
        return False
    return True


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().rstrip(".")
    if text == "System error":  # all libsndfile says when write() fails
        return "the system refused the write (a full or failing disk?)"
    return text


def _free(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free there"
    except OSError:
        return "its free space unknown"


@dataclass
class LevelMeter:
    """The RMS level (of the sound: a DC offset is not sound, and the live level leaves it out
    too) and the peak of everything recorded."""

    total: float = 0.0
    squares: float = 0.0
    samples: int = 0
    peak: float = 0.0

    def push(self, block: np.ndarray) -> None:
        """Add a block."""
        self.total += float(np.sum(block, dtype=np.float64))
        self.squares += float(np.sum(np.square(block, dtype=np.float64)))
        self.samples += len(block)
        self.peak = max(self.peak, float(np.max(np.abs(block), initial=0.0)))

    def verdict(self) -> str:
        """`level good: ...`, `level too quiet: ...` or `level too loud: ...`, with the fix."""
        mean = self.total / self.samples if self.samples else 0.0
        power = self.squares / self.samples - mean * mean if self.samples else 0.0
        rms = math.sqrt(max(power, 0.0))
        return level_verdict(_db(rms), _db(self.peak))


def _db(value: float) -> float:
    return 20 * math.log10(value) if value > 0 else float("-inf")


def level_verdict(rms_dbfs: float, peak_dbfs: float) -> str:
    """Judge a recording's level by its RMS and its peak (dBFS)."""
    measured = f"{rms_dbfs:.1f} dBFS RMS, peaks {peak_dbfs:.1f} dBFS"
    if peak_dbfs >= LOUD_PEAK_DBFS:
        return (
            f"level too loud: {measured} (no headroom: a louder fault would clip); "
            "lower the input gain (alsamixer) or move the microphone back"
        )
    if rms_dbfs < QUIET_DBFS:
        return (
            f"level too quiet: {measured} (below {QUIET_DBFS:g} dBFS the machine is lost in "
            "the microphone's noise); raise the input gain (alsamixer) or move it closer, unless "
            "this is the machine switched off, which should be quiet: then keep the gain its "
            "running was recorded at, for the service too (states and `off` are told apart by "
            "their level)"
        )  # "raise the gain; keep this gain" read as a contradiction (a new user's walk-through)
    return f"level good: {measured}" + SAME_GAIN


SAME_GAIN = (
    "; keep this gain for every state and for the service: states and `off` are told apart by "
    "their level"
)


@dataclass
class Timeline:
    """Audio delivered against the clock: a device delivers in real time, so audio that falls
    behind the clock was lost somewhere (a freeze, an overrun the driver did not report)."""

    rate: int
    start: float | None = None
    last: float = 0.0
    samples: int = 0
    """Samples after the first block (which arrives when it is complete)."""

    def push(self, samples: int, now: float) -> None:
        """A block of `samples` arrived at `now` (monotonic seconds)."""
        if self.start is None:
            self.start = now
        else:
            self.samples += samples
        self.last = now

    def missing_s(self) -> float:
        """Seconds of audio the clock says should have arrived and did not (beyond drift)."""
        if self.start is None:
            return 0.0
        seconds = self.samples / self.rate
        return max(0.0, (self.last - self.start) - seconds * (1 + CLOCK_DRIFT))


def gap_note(stats: dict[str, int], missing_s: float = 0.0, split: int = 0) -> str | None:
    """A warning naming the audio lost while recording, or None when nothing was lost; `split`:
    files ended at a gap the capture marked (each file holds continuous audio)."""
    lost = [f"{missing_s:.1f} s of audio missing"] if missing_s > GAP_TOLERANCE_S else []
    parts = lost + [
        f"{stats[key]} {name}"
        for key, name in (
            ("dropped", "dropped block(s)"),
            ("overflows", "input overflow(s)"),
            ("reopens", "device reopen(s)"),
        )
        if stats.get(key)
    ]
    if not parts:
        return None
    where = (
        f"{split} file(s) end where audio was lost and the next begins after it, so no file "
        "splices across a gap"
        if split
        else "the files have holes"
    )
    fixes = []
    if stats.get("reopens"):
        fixes.append("the device was lost and opened again: check its cable and power")
    if missing_s > GAP_TOLERANCE_S or stats.get("dropped") or stats.get("overflows"):
        fixes.append("put less load on the machine, or raise [audio] queue_blocks")
    return f"gaps: {', '.join(parts)}: audio was lost; {where}; {'; '.join(fixes)}"


def _progress(err: TextIO, got: float, total: float, level: float) -> None:
    """A live line on a terminal; a line every 10 s of audio in a log."""
    tty = getattr(err, "isatty", lambda: False)()
    if not tty and int(got * 10) % 100 != 0 and got < total:
        return
    done = int(BAR * got / total)
    _say(  # the recording goes on if the terminal is gone (`nohup` ignores the hangup)
        err,
        f"\rrecording {got:6.1f} / {total:.0f} s  level {level:6.1f} dBFS"
        f"  [{'#' * done}{'.' * (BAR - done)}]",
    )
