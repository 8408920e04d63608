"""`soundsentry record`: capture normal audio on site into chunked WAV files for training,
with progress and the input level; it refuses (loudly) to record silence or clipping."""

from __future__ import annotations

import logging
import sys
import time
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
    try:
        for block in source:
            if block is None:
                continue
            for change in health.push(block):
                if change.kind == "fault":
                    raise RecordingRefusedError(
                        f"input {change.fault}: {change.detail}; "
                        f"kept {len(written)} complete chunk(s)"
                    )
            block = block[: total - got]
            if writer is None:
                path = out / f"{stamp}-{len(written):04d}.wav"
                writer = sf.SoundFile(str(path), "w", samplerate, 1, "PCM_16")
                part = 0
            writer.write(np.clip(block, -1, 1))
            part += len(block)
            got += len(block)
            if part >= per_chunk or got >= total:
                writer.close()
                written.append(Path(writer.name))
                writer = None
            _progress(err, got / samplerate, total / samplerate, health.level)
            if got >= total:
                break
    finally:
        source.stop()
        if writer is not None:  # an unfinished chunk of a refused or interrupted recording
            writer.close()
            Path(writer.name).unlink(missing_ok=True)
        err.write("\n")
    return written


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
