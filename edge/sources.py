"""Audio sources for the pipeline: files (replay, demo), as fast as possible or in real time."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from edge.audio_io import read_audio


class FileSource:
    """Files played back to back as one stream of mono blocks at the model's rate."""

    def __init__(
        self,
        files: Sequence[str | Path],
        samplerate: int,
        channel: int = 0,
        block_seconds: float = 0.1,
        realtime: bool = False,
    ) -> None:
        self.samplerate = samplerate
        self.block = max(1, int(block_seconds * samplerate))
        self.realtime = realtime
        # Read everything first: a bad file fails before any event is raised.
        self.audio = [read_audio(f, samplerate, channel) for f in files]

    @property
    def seconds(self) -> float:
        """Total length of the stream."""
        return sum(len(a) for a in self.audio) / self.samplerate

    def __iter__(self) -> Iterator[np.ndarray]:
        t0 = time.monotonic()
        sent = 0
        for audio in self.audio:
            for start in range(0, len(audio), self.block):
                block = audio[start : start + self.block]
                if self.realtime:
                    due = t0 + (sent + len(block)) / self.samplerate
                    time.sleep(max(0.0, due - time.monotonic()))
                sent += len(block)
                yield block
