"""Daemon metrics: throughput, inference latency, drops, level, spool, board temperature."""

from __future__ import annotations

import math
import subprocess
import time
from collections import deque
from pathlib import Path

import numpy as np

LATENCY_SAMPLES = 1000
REALTIME_SECONDS = 60.0
"""The real-time factor is taken over this much of the latest audio."""
THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")
THROTTLED_SYSFS = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")


class Metrics:
    """Counters and latency samples collected by the daemon loop."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.windows = 0
        self.audio_seconds = 0.0
        self.busy_seconds = 0.0
        self._latency: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._recent: deque[tuple[float, float]] = deque()
        """(audio, busy) seconds of the blocks of the last REALTIME_SECONDS of audio."""
        self._recent_audio = self._recent_busy = 0.0

    def window_scored(self, seconds: float) -> None:
        """Record the processing time of one window."""
        self.windows += 1
        self._latency.append(seconds)

    def block_processed(self, audio_s: float, busy_s: float) -> None:
        """Record a block's audio length and the time spent on it."""
        self.audio_seconds += audio_s
        self.busy_seconds += busy_s
        self._recent.append((audio_s, busy_s))
        self._recent_audio += audio_s
        self._recent_busy += busy_s
        while len(self._recent) > 1 and self._recent_audio - self._recent[0][0] >= REALTIME_SECONDS:
            old_audio, old_busy = self._recent.popleft()
            self._recent_audio -= old_audio
            self._recent_busy -= old_busy

    @property
    def uptime_s(self) -> float:
        """Seconds since start."""
        return time.monotonic() - self.started

    @property
    def realtime_factor(self) -> float | None:
        """Processing time per second of audio over the last REALTIME_SECONDS of audio (0.01 =
        1 % of real time): a Pi that throttles when the sun reaches its box shows at once, where
        an average since the start hardly moved after a few days."""
        return self._recent_busy / self._recent_audio if self._recent_audio > 0 else None

    def latency_ms(self, q: float) -> float | None:
        """Percentile `q` of per-window processing time, milliseconds."""
        return float(np.percentile(self._latency, q) * 1000) if self._latency else None


def cpu_temperature_c() -> float | None:
    """SoC temperature where the board exposes it (Raspberry Pi: thermal_zone0)."""
    try:
        return int(THERMAL_ZONE.read_text().strip()) / 1000
    except (OSError, ValueError):
        return None


_vcgencmd = {"works": True, "timeouts": 0}
"""Whether `vcgencmd get_throttled` answered: once it has not (not installed, or its device
closed to the service by DevicePolicy=closed), it is not forked again every metrics interval."""


VCGENCMD_TIMEOUTS = 3
"""Timeouts in a row after which vcgencmd is not asked again until a restart."""


def throttled() -> str | None:
    """Raspberry Pi throttling flags (hex, 0x0 = never throttled), where available: the
    firmware's sysfs file (Pi 0 to 4), else `vcgencmd` while it answers."""
    try:
        return hex(int(THROTTLED_SYSFS.read_text().strip(), 16))
    except (OSError, ValueError):
        pass
    if not _vcgencmd["works"]:
        return None
    try:
        out = subprocess.run(
            ["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=2
        ).stdout
    except subprocess.TimeoutExpired:  # a Pi too busy to answer in time: asked again next time,
        _vcgencmd["timeouts"] += 1  # but not for ever (each costs the loop the timeout)
        _vcgencmd["works"] = _vcgencmd["timeouts"] < VCGENCMD_TIMEOUTS
        return None
    except (OSError, subprocess.SubprocessError):
        out = ""
    _vcgencmd["timeouts"] = 0
    if "=" not in out:
        _vcgencmd["works"] = False
        return None
    return out.strip().split("=", 1)[1]


INDEX_SECONDS = 60.0
"""The anomaly index is taken over the last minute of running windows."""


class AnomalyIndex:
    """The per-minute anomaly index: the median window score of the last minute over the
    median score of held-out normal audio (the bundle's `normal_scores.p50`). About 1 while the
    machine sounds as it did in training; a slow drift over weeks shows as a slow rise, long
    before single windows cross the threshold."""

    def __init__(self, normal_median: float, hop_seconds: float) -> None:
        self.normal_median = normal_median
        self.hop_seconds = hop_seconds
        self._scores: deque[float] = deque(maxlen=max(1, round(INDEX_SECONDS / hop_seconds)))
        self._idle_s = 0.0
        self._gap_s = 0.0
        """Seconds without any audio so far (a stalled or unplugged microphone: no window at
        all, so no `skip` either)."""

    def add(self, score: float) -> None:
        """One scored window of the running machine (a score that is not a number is none)."""
        if math.isfinite(score):
            self._scores.append(score)
            self._idle_s = self._gap_s = 0.0

    def skip(self) -> None:
        """A window not taken (the machine off, an audio fault): after INDEX_SECONDS of them
        the last minute of running is no longer now, and the index says nothing."""
        self._idle_s += self._gap_s + self.hop_seconds
        self._gap_s = 0.0

    def no_audio(self, seconds: float) -> None:
        """No audio has come for `seconds` (the capture stalled): that time counts as windows
        not taken. A microphone unplugged for minutes kept the last minute's index on MQTT, the
        page and /metrics as if current (a soak review)."""
        self._gap_s = max(self._gap_s, seconds)

    @property
    def value(self) -> float | None:
        """The index, or None before the first window, after a minute without one (the machine
        off, a dead microphone: the last value would read as fresh for hours), or without a
        normal median."""
        idle = self._idle_s + self._gap_s
        if not self._scores or self.normal_median <= 0 or idle >= INDEX_SECONDS:
            return None
        return float(np.median(self._scores)) / self.normal_median
