"""Audio liveness: digital silence, a flat-lined or clipped signal, a stalled stream.

A dead microphone must be reported as a fault, not scored as an anomaly (silence is far
from normal for any model) and not ignored (the service would look alive while deaf).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

SILENT_PEAK = 1e-6
"""A block whose absolute peak is below this is digital silence."""
FLAT_RANGE = 1e-4
"""A block whose max - min is below this (but not silent) is a flat line (stuck DC)."""
QUIET_DBFS = -55.0
"""Below this RMS level a machine is lost in the input's noise floor (`record`, `doctor`)."""
CLIP_LEVEL = 0.999
"""Samples at or above this magnitude count as clipped."""
CLIP_JUDGE_SECONDS = 1.0
"""Clipping is judged on the share of clipped samples in the last second of audio, whatever
the capture block: judged per 0.1-s block, 2 % clipped in bursts once a second was no fault
(the clean blocks between bursts restarted the count) while 1-s blocks made it one."""
LEVEL_FLOOR_DBFS = -120.0
RECOVER_SECONDS = 3.0
"""Clean audio this long ends a fault (invalid samples too). The first clean 0.1-s block
ended it, so a borderline input (clipping with a clean block every few seconds) flapped
hundreds of times an hour: log lines, spool writes, retained messages, and every new fault
closed the open anomaly event."""


RECURRING_WITHIN_S = 3600.0
"""A fault that comes back within this much audio of its last onset needs twice the clean
time of the last to be over..."""
MAX_RECOVER_SECONDS = 600.0
"""...up to this. A loose cable (6 s of silence every 20 s) was 138 faults an hour, each a
WARNING and a recovery in the journal and two health messages on the card (an SD-card review):
it is now four, then one fault that lasts while the cable is loose."""


INVALID = "invalid samples"
"""The fault name for NaN or infinite samples (a broken driver, file or resampler)."""


def level_dbfs(block: np.ndarray) -> float:
    """RMS level of a block's sound in dB relative to full scale: its mean (a DC offset, which
    some USB interfaces add and no microphone hears) taken out, non-finite samples ignored."""
    if len(block) and not np.all(np.isfinite(block)):
        block = block[np.isfinite(block)]
    if len(block):
        block = block - np.mean(block, dtype=np.float64)
    rms = float(np.sqrt(np.mean(np.square(block, dtype=np.float64)))) if len(block) else 0.0
    return max(LEVEL_FLOOR_DBFS, 20 * math.log10(rms)) if rms > 0 else LEVEL_FLOOR_DBFS


def is_flat(samples: np.ndarray) -> bool:
    """True for a flat line: samples that stay within FLAT_RANGE (a stuck DC level)."""
    return len(samples) > 0 and float(np.ptp(samples)) < FLAT_RANGE


def has_dropout(samples: np.ndarray, run: int) -> bool:
    """True when `run` or more consecutive samples are digital silence: a dropout inside the
    block (a USB glitch, a mute button pressed), whose frames of nothing score like a fault
    (30 times the threshold for 100 ms of zeros). Real recordings hold a few such samples in
    a row at most (3, over every clip of shared/data)."""
    return len(_dropouts(samples, run)) > 0


def heard_pieces(samples: np.ndarray, dropout_run: int) -> list[np.ndarray]:
    """The stretches of a signal between its dropouts (runs of `dropout_run` or more samples of
    digital silence), in order: what continuous frames may be computed on without a frame of
    nothing among them. A signal without a dropout is one piece; a piece may be too short for
    a frame (the caller's frames of it are then none)."""
    pieces, start = [], 0
    for first, end in _dropouts(samples, dropout_run).tolist():
        if first > start:
            pieces.append(samples[start:first])
        start = end
    if start < len(samples):
        pieces.append(samples[start:])
    return pieces


def _dropouts(samples: np.ndarray, run: int) -> np.ndarray:
    """The runs of `run` or more samples of digital silence, as rows [first, end), in order."""
    if run <= 0 or len(samples) < run:
        return np.zeros((0, 2), np.int64)
    quiet = np.abs(samples) < SILENT_PEAK
    if not quiet.any():
        return np.zeros((0, 2), np.int64)
    runs = np.flatnonzero(np.diff(quiet.astype(np.int8), prepend=0, append=0)).reshape(-1, 2)
    return runs[runs[:, 1] - runs[:, 0] >= run]


def is_dead(samples: np.ndarray, dropout_run: int) -> bool:
    """A window the device judges nothing by: digital silence, a flat line, or a dropout of
    `dropout_run` samples or more (the features' STFT hop)."""
    return is_silent(samples) or is_flat(samples) or has_dropout(samples, dropout_run)


def is_silent(samples: np.ndarray) -> bool:
    """True for digital silence (a dead or muted input)."""
    return len(samples) == 0 or float(np.max(np.abs(samples))) < SILENT_PEAK


@dataclass(frozen=True)
class HealthChange:
    """A fault appearing (`fault`) or going away (`recovered`)."""

    kind: str
    fault: str
    detail: str


class AudioHealth:
    """Tracks how long the input has been silent, flat or clipping and raises faults."""

    FAULTS = ("silence", "flatline", "clipping", "stalled", INVALID)

    def __init__(
        self, samplerate: int, fault_seconds: float = 5.0, clip_fraction: float = 0.01
    ) -> None:
        self.samplerate = samplerate
        self.fault_seconds = fault_seconds
        self.clip_fraction = clip_fraction
        self.active: set[str] = set()
        self._run = {"silence": 0.0, "flatline": 0.0, "clipping": 0.0}
        self._clean = dict.fromkeys(self._run, 0.0)
        """Seconds of clean audio since each active fault was last present."""
        self._finite = 0.0
        """Seconds of finite samples since the last NaN or infinite one."""
        self._clips: deque[tuple[int, int]] = deque()
        """(clipped samples, samples) of the latest blocks, covering CLIP_JUDGE_SECONDS."""
        self.level = LEVEL_FLOOR_DBFS
        self._heard_s = 0.0
        """Seconds of audio pushed: the clock of the onsets below."""
        self._onsets: dict[str, deque[float]] = {}
        """Each fault's onsets within RECURRING_WITHIN_S, oldest first."""

    def recover_seconds(self, fault: str) -> float:
        """Clean audio that ends `fault` now: RECOVER_SECONDS, doubled for each earlier onset
        within RECURRING_WITHIN_S, at most MAX_RECOVER_SECONDS."""
        onsets = self._onsets.get(fault)
        recurring = len(onsets) - 1 if onsets else 0
        return min(RECOVER_SECONDS * 2.0 ** min(recurring, 16), MAX_RECOVER_SECONDS)

    def _onset(self, fault: str) -> str:
        """Count an onset of `fault`; what its detail adds when it recurs."""
        onsets = self._onsets.setdefault(fault, deque())
        while onsets and self._heard_s - onsets[0] > RECURRING_WITHIN_S:
            onsets.popleft()
        onsets.append(self._heard_s)
        if len(onsets) == 1:
            return ""
        return (
            f" (the {_ordinal(len(onsets))} time within the hour: over after "
            f"{self.recover_seconds(fault):g} s of clean audio)"
        )

    def push(self, block: np.ndarray) -> list[HealthChange]:
        """Inspect one block of audio; return faults raised or cleared by it."""
        seconds = len(block) / self.samplerate
        self._heard_s += seconds
        changes = self._check_finite(block)
        if INVALID in self.active:  # judge the finite samples only: NaN is not also silence
            block = block[np.isfinite(block)]
        self.level = level_dbfs(block)
        silent = is_silent(block) if len(block) else False
        flat = not silent and is_flat(block)
        clipped, in_block = self._clipping(block)
        for fault, present in (("silence", silent), ("flatline", flat), ("clipping", clipped)):
            self._run[fault] = self._run[fault] + seconds if present else 0.0
            heard = in_block if fault == "clipping" else present  # the clean time: this block's
            self._clean[fault] = 0.0 if heard else self._clean[fault] + seconds
            if self._run[fault] >= self.fault_seconds and fault not in self.active:
                self.active.add(fault)
                detail = self._detail(fault) + self._onset(fault)
                changes.append(HealthChange("fault", fault, detail))
            elif fault in self.active and self._clean[fault] >= self.recover_seconds(fault):
                self.active.discard(fault)
                changes.append(HealthChange("recovered", fault, f"{fault} is over"))
        if "stalled" in self.active:
            self.active.discard("stalled")
            changes.append(HealthChange("recovered", "stalled", "audio is flowing again"))
        return changes

    def run_seconds(self, fault: str) -> float:
        """How long `fault` has been present without a break (0 for a fault of no duration)."""
        return self._run.get(fault, 0.0)

    def _clipping(self, block: np.ndarray) -> tuple[bool, bool]:
        """Whether the last CLIP_JUDGE_SECONDS clip (the fault's running time) and whether this
        block does (its clean time: recovery still takes RECOVER_SECONDS after the last clip)."""
        count = int(np.count_nonzero(np.abs(block) >= CLIP_LEVEL)) if len(block) else 0
        self._clips.append((count, len(block)))
        keep = CLIP_JUDGE_SECONDS * self.samplerate
        while len(self._clips) > 1 and sum(n for _, n in self._clips) - self._clips[0][1] >= keep:
            self._clips.popleft()
        total = sum(n for _, n in self._clips)
        recent = total > 0 and sum(c for c, _ in self._clips) / total > self.clip_fraction
        return recent, bool(len(block)) and count / len(block) > self.clip_fraction

    def _check_finite(self, block: np.ndarray) -> list[HealthChange]:
        """NaN or infinite samples are a fault at once; RECOVER_SECONDS of finite samples clear
        it. The first finite block cleared it, so a driver that sends a bad block every second
        flapped the fault thousands of times an hour, each closing the open event."""
        bad = int(np.count_nonzero(~np.isfinite(block))) if len(block) else 0
        self._finite = 0.0 if bad else self._finite + len(block) / self.samplerate
        if bad and INVALID not in self.active:
            self.active.add(INVALID)
            detail = f"{bad} of {len(block)} samples are NaN or infinite: broken input"
            return [HealthChange("fault", INVALID, detail + self._onset(INVALID))]
        if INVALID in self.active and self._finite >= self.recover_seconds(INVALID):
            self.active.discard(INVALID)
            return [HealthChange("recovered", INVALID, "samples are finite again")]
        return []

    def stalled(self, detail: str) -> list[HealthChange]:
        """The stream stopped delivering blocks (or the device vanished)."""
        if "stalled" in self.active:
            return []
        self.active.add("stalled")
        return [HealthChange("fault", "stalled", detail)]

    @property
    def ok(self) -> bool:
        """True when no fault is active."""
        return not self.active

    def _detail(self, fault: str) -> str:
        secs = f"{self.fault_seconds:g} s"
        return {
            "silence": f"digital silence for {secs}: microphone dead, muted or unplugged?",
            "flatline": f"flat signal for {secs}: input stuck at a constant value",
            "clipping": f"clipping for {secs}: input gain too high",
        }[fault]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
