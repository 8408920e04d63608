"""Analysis framing: a streaming buffer that cuts audio into overlapping windows.

Any block size gives exactly the windows the whole signal gives: leftover samples are kept
between pushes in a preallocated buffer (no growing concatenation).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Window:
    """One analysis window: its first sample's index in the stream and its samples."""

    start: int
    samples: np.ndarray


class WindowBuffer:
    """Cut a stream into windows of `size` samples every `hop` samples."""

    def __init__(self, size: int, hop: int) -> None:
        if size <= 0 or not 0 < hop <= size:
            raise ValueError(f"need 0 < hop <= size, got size={size} hop={hop}")
        self.size = size
        self.hop = hop
        self._buf = np.zeros(size, dtype=np.float32)
        self._fill = 0
        self._start = 0
        self.samples_seen = 0

    def reset(self) -> None:
        """Forget buffered samples; the next window starts at the next pushed sample."""
        self._fill = 0
        self._start = self.samples_seen

    def push(self, block: np.ndarray) -> list[Window]:
        """Add a mono block; return the windows it completes, oldest first."""
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        windows: list[Window] = []
        pos = 0
        while pos < len(block):
            take = min(self.size - self._fill, len(block) - pos)
            self._buf[self._fill : self._fill + take] = block[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self.size:
                windows.append(Window(self._start, self._buf.copy()))
                keep = self.size - self.hop
                self._buf[:keep] = self._buf[self.hop :]
                self._fill = keep
                self._start += self.hop
        self.samples_seen += len(block)
        return windows


BLOCK = 1 << 18
"""Samples a whole signal is pushed in at a time (16 s at 16 kHz): the copies of one block's
windows are all a `WindowBuffer` then holds, a few MB."""


def blocks(audio: np.ndarray) -> Iterator[np.ndarray]:
    """A whole signal as BLOCK-sample views, for a `WindowBuffer`: pushed whole, an hour's
    recording held a copy of every window at once (0.9 GB at the fluctuation's training hop;
    `train` peaked at 1.3 GB on one 1-h file)."""
    for i in range(0, len(audio), BLOCK):
        yield audio[i : i + BLOCK]


def cut(audio: np.ndarray, size: int, hop: int) -> Iterator[Window]:
    """The windows of a whole signal, as `WindowBuffer.push(audio)` gives them, made a block at a
    time (`blocks`)."""
    buffer = WindowBuffer(size, hop)
    for block in blocks(audio):
        yield from buffer.push(block)
