"""The detection pipeline: audio blocks -> windows -> log-mel -> model score -> events.

The daemon (`run`), `replay` and `demo` all feed this same class, so what is tested on
files is what runs on the microphone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.bundle import Bundle
from edge.events import EventDetector, Transition
from edge.features import FrontEnd
from edge.scoring import Scorer, WindowScore
from edge.settings import DetectorSettings


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of one analysis window."""

    window: WindowScore
    start_s: float
    end_s: float
    transition: Transition | None


class Pipeline:
    """Streaming detector for one model: push blocks of any size, get one Step per window."""

    def __init__(self, bundle: Bundle, detector: DetectorSettings | None = None) -> None:
        detector = detector or DetectorSettings()
        self.bundle = bundle
        self.front = FrontEnd(bundle.features)
        self.scorer = Scorer.from_bundle(bundle)
        threshold = detector.threshold if detector.threshold is not None else bundle.threshold
        self.events = EventDetector(
            threshold, detector.trigger_windows, detector.trigger_of, detector.release_windows
        )
        self._rate = bundle.features.samplerate
        self._length_s = bundle.features.window_samples / self._rate

    @property
    def threshold(self) -> float:
        """Threshold in force."""
        return self.events.threshold

    def push(self, block: np.ndarray) -> list[Step]:
        """Process a mono block at the model's rate."""
        steps = []
        for start, features in self.front.push(block):
            scored = self.scorer.score(features, start)
            start_s = start / self._rate
            end_s = start_s + self._length_s
            steps.append(
                Step(scored, start_s, end_s, self.events.update(scored.score, start_s, end_s))
            )
        return steps

    def close(self) -> Transition | None:
        """End an open anomaly (end of stream or shutdown)."""
        return self.events.close()

    @property
    def stream_seconds(self) -> float:
        """Audio seen so far, seconds."""
        return self.front.buffer.samples_seen / self._rate
