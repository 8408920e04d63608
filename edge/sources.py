"""Audio sources for the pipeline: files (replay, demo), streamed from disk in blocks, as fast
as possible or paced in real time."""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from edge.audio_io import check_files, file_blocks, mono_channel, select_channel, sf_path

READ_SECONDS = 1.0
"""Audio read from disk at a time (memory stays flat however long the files are)."""
LOCATE_SLACK_S = 0.0005
"""Half a millisecond: `stream_offset_s` is rounded to the millisecond."""


class NewStream:
    """Yielded between files replayed as separate streams: what follows is unrelated audio."""


NEW_STREAM = NewStream()


class AudioGap:
    """Yielded by the microphone where audio was lost (blocks dropped by a full queue, the
    device reopened): the next block does not continue the last, so no window may
    join them."""

    def __init__(self, reopened: bool = False) -> None:
        self.reopened = reopened
        """The device was reopened (seconds lost); else a few blocks were dropped."""


class FileSource:
    """Files as mono blocks at the model's rate. Each file is its own stream (a `NewStream`
    marker between files), unless `continuous`: then they play back to back as one stream,
    with a jump at every boundary that no microphone would hear."""

    def __init__(
        self,
        files: Sequence[str | Path],
        samplerate: int,
        channel: int = 0,
        block_seconds: float = 0.1,
        realtime: bool = False,
        continuous: bool = False,
    ) -> None:
        self.samplerate = samplerate
        self.channel = channel
        self.block = max(1, int(block_seconds * samplerate))
        self.realtime = realtime
        self.continuous = continuous
        # Check every file first: a bad one fails before any event is raised.
        self.files = [Path(f) for f in files]
        # a mono file is read as its only channel, whatever the model's (as calibrate reads it)
        self._frames = check_files(
            self.files, max(channel, 0), samplerate, mono_any=True, float_samples=True
        )
        self._begun: list[int] = []
        """Where each file begun so far starts in the stream, in samples at the model's rate."""

    @property
    def paced(self) -> bool:
        """With `realtime` the files come at the pace of the clock, like a microphone."""
        return self.realtime

    @property
    def seconds(self) -> float:
        """Total length of the stream."""
        return sum(frames / rate for frames, rate in self._frames)

    def locate(self, stream_s: float) -> tuple[Path, float]:
        """The file a position in the replayed stream lies in (the files one after another, as
        the daemon counts `stream_offset_s`) and the position within it, among the files begun
        so far. A file begins where the samples the ones before it gave at the model's rate end
        (a resampled file's count is not its header's length); a position within half a
        millisecond of a start, as `stream_offset_s`'s rounding leaves one, is that file's."""
        at = bisect_right(self._begun, (stream_s + LOCATE_SLACK_S) * self.samplerate) - 1
        if at < 0:
            raise ValueError("no file begun")  # events come from audio, so after one began
        start_s = self._begun[at] / self.samplerate
        return self.files[at], max(0.0, stream_s - start_s)

    def _file_blocks(self, path: Path) -> Iterator[np.ndarray]:
        """Mono blocks of one file at the model's rate, read and resampled incrementally."""
        with sf.SoundFile(sf_path(path)) as fh:
            rate = fh.samplerate
            channel = mono_channel(self.channel, fh.channels)  # a mono file's one, whatever
            resampler = (
                None
                if rate == self.samplerate
                else soxr.ResampleStream(rate, self.samplerate, 1, dtype="float32", quality="HQ")
            )
            pending = np.zeros(0, np.float32)
            for chunk in file_blocks(fh, READ_SECONDS):  # each chunk is used before the next
                mono = select_channel(chunk, channel)
                mono = resampler.resample_chunk(mono) if resampler else mono
                pending = np.concatenate([pending, mono])
                while len(pending) >= self.block:
                    yield pending[: self.block]
                    pending = pending[self.block :]
            if resampler is not None:
                pending = np.concatenate(
                    [pending, resampler.resample_chunk(np.zeros(0, np.float32), last=True)]
                )
            if len(pending):
                yield pending

    def __iter__(self) -> Iterator[np.ndarray | NewStream]:
        t0 = time.monotonic()
        sent = 0
        self._begun = []
        for i, path in enumerate(self.files):
            if i and not self.continuous:
                yield NEW_STREAM
            self._begun.append(sent)
            for block in self._file_blocks(path):
                if self.realtime:
                    due = t0 + (sent + len(block)) / self.samplerate
                    time.sleep(max(0.0, due - time.monotonic()))
                sent += len(block)
                yield block
