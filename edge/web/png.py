"""Spectrogram images of evidence clips, encoded as PNG with numpy and zlib alone (no plotting
library on the Pi)."""

from __future__ import annotations

import itertools
import struct
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from edge.features import FeatureParams, LogMel

MAX_COLUMNS = 480
"""Wider spectrograms are averaged down to this many columns (a phone screen's width)."""
ROW_SCALE = 2
"""Pixel rows per mel band."""
DYNAMIC_RANGE_DB = 70.0
"""Levels this far below the clip's loudest band are black, and the brightest is never below
this far above the features' floor: a silent clip (a dropout) is black, not drawn as loud
broadband noise at full brightness."""
SEGMENT_FRAMES = 2048
"""STFT frames computed at once (65 s at the default hop): a clip is read and analysed in
pieces, so a long one (max_seconds is up to an hour) does not take the daemon past its
MemoryMax; whole, a 10-minute clip took 490 MB."""
READ_SECONDS = 10
"""Seconds of the file read at once."""
# A perceptually ordered dark-to-bright colour map (five stops of viridis), interpolated.
_STOPS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
_LUT = np.stack(
    [
        np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_STOPS)), _STOPS[:, c])
        for c in range(3)
    ],
    axis=1,
).astype(np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    """An (height, width, 3) uint8 image as PNG bytes (8-bit RGB, no filtering)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    height, width, _ = rgb.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)),
            _chunk(b"IEND", b""),
        ]
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def spectrogram_image(logmel: np.ndarray, floor_db: float = -100.0) -> np.ndarray:
    """(frames, mels) dB values as an RGB image: time to the right, low bands at the bottom;
    `floor_db`: the features' floor (10 log10 amin)."""
    frames = logmel.shape[0]
    if frames > MAX_COLUMNS:  # average groups of frames down to MAX_COLUMNS columns
        edges = np.linspace(0, frames, MAX_COLUMNS + 1).astype(int)
        logmel = np.add.reduceat(logmel, edges[:-1], axis=0) / np.diff(edges)[:, None]
    top = max(float(logmel.max()) if logmel.size else 0.0, floor_db + DYNAMIC_RANGE_DB)
    scaled = np.clip((logmel - (top - DYNAMIC_RANGE_DB)) / DYNAMIC_RANGE_DB, 0.0, 1.0)
    index = (scaled * 255).astype(np.uint8).T[::-1]
    return np.repeat(_LUT[index], ROW_SCALE, axis=0)


def clip_spectrogram_png(path: Path, params: FeatureParams) -> bytes:
    """The log-mel spectrogram of a WAV clip, as the model sees it, as PNG bytes."""
    floor = 10.0 * float(np.log10(params.amin))
    return encode_png(spectrogram_image(clip_logmel(path, params), floor))


def clip_logmel(path: Path, params: FeatureParams) -> np.ndarray:
    """The log-mel frames of a WAV clip (mono, the model's rate), read and analysed
    SEGMENT_FRAMES at a time: the same frames as of the whole clip at once."""
    logmel = LogMel(params)
    step = SEGMENT_FRAMES * params.hop_length
    span = step + params.n_fft - params.hop_length  # SEGMENT_FRAMES frames exactly
    parts: list[np.ndarray] = []
    pending = np.zeros(0, np.float32)
    with sf.SoundFile(str(path)) as fh:
        rate = fh.samplerate
        resampler = (
            soxr.ResampleStream(rate, params.samplerate, 1, dtype="float32")
            if rate != params.samplerate
            else None
        )
        blocks = fh.blocks(READ_SECONDS * rate, dtype="float32", always_2d=True)
        for block in itertools.chain(blocks, [None]):
            if block is None:  # the resampler's last samples
                if resampler is None:
                    break
                mono = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            else:
                mono = block.mean(axis=1)
                mono = resampler.resample_chunk(mono) if resampler is not None else mono
            pending = np.concatenate([pending, mono.astype(np.float32, copy=False)])
            while len(pending) >= span:
                parts.append(logmel(pending[:span]))
                pending = pending[step:]
    if len(pending) >= params.n_fft or not parts:
        if len(pending) < params.n_fft:
            pending = np.pad(pending, (0, params.n_fft - len(pending)))
        parts.append(logmel(pending))
    return np.concatenate(parts)
