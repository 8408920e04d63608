"""Analysis framing: a streaming buffer that cuts audio into overlapping windows.

Any block size gives exactly the windows the whole signal gives: leftover samples are kept
between pushes in a preallocated buffer (no growing concatenation).
"""

from __future__ import annotations

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
