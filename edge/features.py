"""The one front end: log-mel features in numpy, shared by training and inference.

It reproduces librosa's `melspectrogram(center=False, window="hann", power=2.0, htk=False,
norm="slaney")` followed by `power_to_db(ref=1.0, amin=1e-10, top_db=None)`; the test suite
checks parity within 0.01 dB on real audio. Two recipes: `logmel-v1` is exactly that;
`logmel-v2`, which new bundles are trained with, first takes from each STFT frame its
Hann-weighted mean, so a DC offset of the input (an interface's, never a machine's) leaves
the features as they were: in v1 it filled the lowest band, and one held-out recording with an
offset lifted a threshold 6.8-fold in a review. A bundle names its recipe and is scored with it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from edge.framing import cut
from edge.health import is_dead

FRONTEND = "logmel-v2"
"""Name of the feature recipe new bundles are trained with."""
FRONTENDS = ("logmel-v1", FRONTEND)
"""The recipes this version computes; a bundle naming another is refused."""


MAX_SAMPLERATE = 384_000
MAX_FFT = 1 << 16
MAX_MELS = 512
MAX_WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class FeatureParams:
    """Everything that defines the features a model was trained on (stored in the bundle)."""

    samplerate: int = 16000
    """Sample rate the model expects, Hz."""
    n_fft: int = 1024
    """FFT size and Hann window length, samples."""
    hop_length: int = 512
    """Hop between STFT frames, samples."""
    n_mels: int = 64
    """Number of mel bands."""
    fmin: float = 0.0
    """Lowest mel band edge, Hz."""
    fmax: float | None = None
    """Highest mel band edge, Hz (None: Nyquist)."""
    window_seconds: float = 1.0
    """Length of one analysis window (one model input), seconds."""
    hop_seconds: float = 0.5
    """Hop between analysis windows, seconds."""
    amin: float = 1e-10
    """Power floor before the logarithm."""
    frontend: str = field(default=FRONTEND)
    """Recipe name, one of FRONTENDS (v2 takes each frame's DC out first)."""

    def __post_init__(self) -> None:
        if self.frontend not in FRONTENDS:
            raise ValueError(
                f"feature recipe {self.frontend!r} is unknown (this version: "
                f"{', '.join(FRONTENDS)})"
            )
        sizes = (self.samplerate, self.n_fft, self.hop_length, self.n_mels)
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in sizes):
            raise ValueError("samplerate, n_fft, hop_length and n_mels must be whole numbers")
        reals = (self.fmin, self.window_seconds, self.hop_seconds, self.amin)
        reals += () if self.fmax is None else (self.fmax,)
        if not all(_finite(v) for v in reals):
            raise ValueError("fmin, fmax, window_seconds, hop_seconds and amin must be numbers")
        if not self.amin > 0:  # the floor of log(power): 0 makes a dropout's frames -inf
            raise ValueError("amin must be above 0")
        if self.samplerate <= 0 or self.n_fft <= 0 or self.hop_length <= 0 or self.n_mels <= 0:
            raise ValueError("samplerate, n_fft, hop_length and n_mels must be positive")
        if not (
            self.samplerate <= MAX_SAMPLERATE
            and self.n_fft <= MAX_FFT
            and self.n_mels <= MAX_MELS
            and 0 < self.window_seconds <= MAX_WINDOW_SECONDS
        ):
            raise ValueError(
                f"feature sizes out of range (samplerate <= {MAX_SAMPLERATE}, n_fft <= {MAX_FFT},"
                f" n_mels <= {MAX_MELS}, window_seconds <= {MAX_WINDOW_SECONDS})"
            )
        if self.window_samples < self.n_fft:
            raise ValueError("an analysis window must hold at least one FFT frame")
        if not 0 < self.hop_samples <= self.window_samples:
            raise ValueError("the window hop must be positive and at most the window length")
        if not 0 <= self.fmin < self.top_hz <= self.samplerate / 2:
            raise ValueError("need 0 <= fmin < fmax <= samplerate / 2")

    @property
    def top_hz(self) -> float:
        """Upper mel edge in Hz."""
        return self.samplerate / 2 if self.fmax is None else float(self.fmax)

    @property
    def window_samples(self) -> int:
        """Analysis window length in samples."""
        return round(self.window_seconds * self.samplerate)

    @property
    def hop_samples(self) -> int:
        """Analysis hop in samples."""
        return round(self.hop_seconds * self.samplerate)

    @property
    def n_frames(self) -> int:
        """STFT frames in one analysis window."""
        return 1 + (self.window_samples - self.n_fft) // self.hop_length

    def windows_in(self, samples: int) -> int:
        """Analysis windows in `samples` of audio, one every hop (below one window's length: 0
        or less, as it counts)."""
        return (samples - self.window_samples) // self.hop_samples + 1

    @property
    def shape(self) -> tuple[int, int]:
        """Feature shape of one window: (frames, mel bands)."""
        return (self.n_frames, self.n_mels)

    @property
    def carries_dc(self) -> bool:
        """Whether an input's DC offset shows in these features (recipe `logmel-v1`: in the
        lowest band), so recordings with different offsets look different to a model."""
        return self.frontend == "logmel-v1"

    def same_settings(self, other: FeatureParams) -> bool:
        """Whether `other` has the same settings (rate, FFT, bands, windows) whatever its recipe:
        a running daemon switches to such a model at a reload (from a `logmel-v1` demo to a
        model trained now), where other settings wait for a restart."""
        return replace(self, frontend=FRONTEND) == replace(other, frontend=FRONTEND)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the manifest."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureParams:
        """Rebuild from a manifest dict; unknown or missing keys are refused (ValueError): a
        key left out is not this version's default, which another version may not share."""
        known = set(cls.__dataclass_fields__)
        extra, missing = set(data) - known, known - set(data)
        if extra:
            raise ValueError(f"unknown feature parameters {sorted(extra)}")
        if missing:
            raise ValueError(f"missing feature parameters {sorted(missing)}")
        return cls(**data)


def _finite(value: Any) -> bool:
    """A real number (not a bool, a string or NaN)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale (librosa's default, htk=False)."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    safe = np.maximum(hz, min_log_hz)
    return np.where(hz >= min_log_hz, min_log_mel + np.log(safe / min_log_hz) / logstep, hz / f_sp)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of hz_to_mel."""
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(
        mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel
    )


def mel_band_edges(params: FeatureParams) -> np.ndarray:
    """The n_mels + 2 mel band edges in Hz (band i spans edges[i]..edges[i + 2])."""
    lo, hi = hz_to_mel(params.fmin), hz_to_mel(params.top_hz)
    return mel_to_hz(np.linspace(lo, hi, params.n_mels + 2))


def mel_filterbank(params: FeatureParams) -> np.ndarray:
    """Slaney-normalised triangular filters, shape (n_mels, n_fft // 2 + 1), float32."""
    fft_hz = np.linspace(0, params.samplerate / 2, params.n_fft // 2 + 1)
    edges = mel_band_edges(params)
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


class LogMel:
    """Log-mel spectrogram of one analysis window: (n_frames, n_mels) float32 in dB."""

    def __init__(self, params: FeatureParams) -> None:
        self.params = params
        n = np.arange(params.n_fft)
        self._window = (0.5 - 0.5 * np.cos(2 * np.pi * n / params.n_fft)).astype(np.float32)
        self._filters_t = np.ascontiguousarray(mel_filterbank(params).T)
        self._dc_weights = None if params.carries_dc else self._window / self._window.sum()
        self._dc_spectrum = np.fft.rfft(self._window)[:2]
        """A constant's windowed spectrum per unit: the periodic Hann window's DFT, which is
        zero beyond bin 1."""

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """Features of a 1-D signal; frames start every hop_length samples (no centring)."""
        p = self.params
        frames = np.lib.stride_tricks.sliding_window_view(samples, p.n_fft)[:: p.hop_length]
        spectrum = np.fft.rfft(frames * self._window, axis=1)
        if self._dc_weights is not None:  # less the weighted mean: the DC bin becomes 0
            mean = frames @ self._dc_weights
            spectrum[:, :2] -= mean[:, None] * self._dc_spectrum.astype(spectrum.dtype)
        power = spectrum.real**2 + spectrum.imag**2
        mel = power.astype(np.float32) @ self._filters_t
        return (10.0 * np.log10(np.maximum(mel, p.amin))).astype(np.float32)


def windows_of(audio: np.ndarray, params: FeatureParams, heard: bool = False) -> np.ndarray:
    """All window features of a whole signal at once: (n_windows, n_frames, n_mels); with
    `heard`, only the windows the device scores (not silence, a flat line or a dropout: one
    second of zeros in a held-out recording lifted a threshold twentyfold, in a review)."""
    logmel = LogMel(params)
    size, hop = params.window_samples, params.hop_samples
    out = np.zeros((max(0, 1 + (len(audio) - size) // hop), *params.shape), dtype=np.float32)
    n = 0
    for w in cut(audio, size, hop):  # one block's windows at a time, each written in place
        if not (heard and is_dead(w.samples, params.hop_length)):
            out[n] = logmel(w.samples)
            n += 1
    return out[:n]
