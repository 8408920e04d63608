"""`soundsentry record`: capture normal audio on site into chunked WAV files for training,
with progress and the input level; it refuses (loudly) to record silence or clipping, and
ends saying whether the level was good, too quiet or too loud and whether audio was lost
(dropped blocks, input overflows, a stalled device)."""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import soundfile as sf

from edge.capture import MicSource
from edge.errors import SoundSentryError
from edge.health import AudioHealth
from edge.settings import Settings

log = logging.getLogger(__name__)

BAR = 30
QUIET_DBFS = -55.0
"""Below this RMS level the machine is barely above the microphone's own noise."""
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


def record(
    settings: Settings,
    seconds: float,
    out: Path,
    chunk_seconds: float = 60.0,
    samplerate: int = 16000,
    stream: TextIO | None = None,
) -> list[Path]:
    """Record `seconds` of audio into `out` as WAV chunks; return the files written."""
    err = stream or sys.stderr
    out.mkdir(parents=True, exist_ok=True)
    source = MicSource(
        settings.audio,
        samplerate,
        settings.health.stall_seconds,
        settings.health.reopen_max_seconds,
    )
    health = AudioHealth(samplerate, settings.health.fault_seconds, settings.health.clip_fraction)
    total = int(seconds * samplerate)
    per_chunk = int(chunk_seconds * samplerate)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    written: list[Path] = []
    got = 0
    writer: sf.SoundFile | None = None
    meter = LevelMeter()
    timeline = Timeline(samplerate)
    stopped = False
    try:
        for block in source:
            if not isinstance(block, np.ndarray):  # no audio yet, or a gap's mark
                continue
            meter.push(block)
            timeline.push(len(block), time.monotonic())
            for change in health.push(block):
                if change.kind == "fault":
                    writer = _discard(writer)  # it holds the refused input
                    raise RecordingRefusedError(
                        f"input {change.fault}: {change.detail}; "
                        f"kept {len(written)} complete chunk(s)"
                    )
            block = block[: total - got]
            try:
                if writer is None:
                    path = out / f"{stamp}-{len(written):04d}.wav"
                    writer = sf.SoundFile(str(path), "w", samplerate, 1, "PCM_16")
                    part = 0
                writer.write(np.clip(block, -1, 1))
                part += len(block)
                got += len(block)
                if part >= per_chunk or got >= total:
                    writer, done = None, writer
                    done.close()
                    written.append(Path(done.name))
            except (sf.LibsndfileError, OSError) as exc:  # a full or failing SD card
                writer = _discard(writer)
                Path(path).unlink(missing_ok=True)  # whatever chunk was being opened or closed
                raise SoundSentryError(
                    f"cannot write {path}: {_reason(exc)}; kept {len(written)} complete "
                    f"chunk(s) in {out} ({_free(out)})"
                ) from None
            _progress(err, got / samplerate, total / samplerate, health.level)
            if got >= total:
                break
    except KeyboardInterrupt:  # the user ends the recording early: what is recorded is kept
        stopped = True
    finally:
        source.stop()
        err.write("\n")
        if writer is not None:  # the chunk in progress when Ctrl-C (or a device's failure) came
            if part >= samplerate * MIN_KEPT_SECONDS and _closed(writer):
                written.append(Path(writer.name))
            else:
                _discard(writer)
    if stopped:
        err.write(
            f"stopped after {got / samplerate:.1f} of {total / samplerate:g} s (Ctrl-C); "
            f"kept {len(written)} file(s) in {out}\n"
        )
    if meter.samples:
        err.write(meter.verdict() + "\n")
    gaps = gap_note(source.stats(), timeline.missing_s())
    if gaps:
        err.write(gaps + "\n")
    if stopped:  # the files are kept, but the recording is not what was asked: exit 130
        raise KeyboardInterrupt
    return written


def _discard(writer: sf.SoundFile | None) -> None:
    """Close an unfinished chunk and delete it (refused input, or a write that failed)."""
    if writer is not None:
        _closed(writer)
        Path(writer.name).unlink(missing_ok=True)


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
    """The RMS level and the peak of everything recorded."""

    squares: float = 0.0
    samples: int = 0
    peak: float = 0.0

    def push(self, block: np.ndarray) -> None:
        """Add a block."""
        self.squares += float(np.sum(np.square(block, dtype=np.float64)))
        self.samples += len(block)
        self.peak = max(self.peak, float(np.max(np.abs(block), initial=0.0)))

    def verdict(self) -> str:
        """`level good: ...`, `level too quiet: ...` or `level too loud: ...`, with the fix."""
        rms = math.sqrt(self.squares / self.samples) if self.samples else 0.0
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
            "the microphone's noise); raise the input gain (alsamixer) or move it closer"
        )
    return f"level good: {measured}"


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


def gap_note(stats: dict[str, int], missing_s: float = 0.0) -> str | None:
    """A warning naming the audio lost while recording, or None when nothing was lost."""
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
    return (
        f"gaps: {', '.join(parts)}: audio was lost, the files have holes; record again with "
        "less load on the machine, or raise [audio] queue_blocks"
    )


def _progress(err: TextIO, got: float, total: float, level: float) -> None:
    """A live line on a terminal; a line every 10 s of audio in a log."""
    tty = getattr(err, "isatty", lambda: False)()
    if not tty and int(got * 10) % 100 != 0 and got < total:
        return
    done = int(BAR * got / total)
    err.write(
        f"\rrecording {got:6.1f} / {total:.0f} s  level {level:6.1f} dBFS"
        f"  [{'#' * done}{'.' * (BAR - done)}]"
    )
    err.flush()
