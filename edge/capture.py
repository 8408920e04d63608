"""Microphone capture with sounddevice: the callback only copies blocks onto a bounded queue."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import soxr

from edge.audio_io import select_channel
from edge.errors import SoundSentryError
from edge.settings import AudioSettings

log = logging.getLogger(__name__)

STALL_SECONDS = 5.0
"""No block for this long means the stream has stalled."""


class CaptureError(SoundSentryError):
    """The input device cannot be opened or stopped delivering audio."""


def _sounddevice() -> Any:
    """Import sounddevice only when capturing (PortAudio may be absent elsewhere)."""
    try:
        import sounddevice
    except OSError as exc:  # PortAudio library missing
        raise CaptureError(f"cannot capture: {exc} (install libportaudio2)") from None
    return sounddevice


class MicSource:
    """Blocks of mono audio at the model's rate from an input device."""

    def __init__(self, audio: AudioSettings, model_rate: int) -> None:
        self.settings = audio
        self.model_rate = model_rate
        self.overflows = 0
        self.dropped = 0
        self._queue: queue.Queue[np.ndarray] = queue.Queue(maxsize=audio.queue_blocks)
        self._stop = threading.Event()
        self.device, self.rate = self._resolve()

    def _resolve(self) -> tuple[int | str | None, int]:
        """The device to open and a rate it supports (the model's rate when possible)."""
        sd = _sounddevice()
        device = self.settings.device
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        try:
            info = sd.query_devices(device, "input")
        except (ValueError, sd.PortAudioError) as exc:
            raise CaptureError(f"audio.device {device!r}: {exc}") from None
        wanted = self.settings.samplerate or self.model_rate
        try:
            sd.check_input_settings(device, self.settings.channels, "float32", samplerate=wanted)
            rate = wanted
        except (ValueError, sd.PortAudioError):
            if self.settings.samplerate:
                raise CaptureError(
                    f"audio.samplerate {wanted} is not supported by {info['name']!r}"
                ) from None
            rate = int(info["default_samplerate"])
            log.info(
                "capture: %s cannot do %d Hz; capturing at %d Hz and resampling",
                info["name"],
                wanted,
                rate,
            )
        log.info(
            "capture: device %r at %d Hz, %d channel(s)", info["name"], rate, self.settings.channels
        )
        return device, rate

    def _callback(self, indata: np.ndarray, _frames: int, _time: Any, status: Any) -> None:
        """PortAudio thread: copy the block and count trouble; nothing else."""
        if status.input_overflow:
            self.overflows += 1
        try:
            self._queue.put_nowait(indata.copy())
        except queue.Full:
            self.dropped += 1

    def stop(self) -> None:
        """Ask the iterator to finish."""
        self._stop.set()

    def __iter__(self) -> Iterator[np.ndarray]:
        sd = _sounddevice()
        resampler = None
        if self.rate != self.model_rate:
            resampler = soxr.ResampleStream(self.rate, self.model_rate, 1, dtype="float32")
        blocksize = max(1, int(self.settings.block_seconds * self.rate))
        try:
            stream = sd.InputStream(
                device=self.device,
                channels=self.settings.channels,
                samplerate=self.rate,
                dtype="float32",
                blocksize=blocksize,
                callback=self._callback,
            )
        except (ValueError, sd.PortAudioError) as exc:
            raise CaptureError(f"cannot open audio device {self.device!r}: {exc}") from None
        with stream:
            while not self._stop.is_set():
                try:
                    block = self._queue.get(timeout=STALL_SECONDS)
                except queue.Empty:
                    raise CaptureError(
                        f"no audio from the device for {STALL_SECONDS:.0f} s"
                    ) from None
                mono = select_channel(block, self.settings.channel)
                yield resampler.resample_chunk(mono) if resampler else mono
