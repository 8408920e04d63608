"""Input devices as PortAudio sees them: `soundsentry devices`, the list a device setting
that matches nothing is answered with, and the lazy sounddevice import capture uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge.errors import SoundSentryError

NAMES_IN_ERROR = 8
"""How many input devices an error message names before it says `...`."""


class CaptureError(SoundSentryError):
    """The input device cannot be opened or stopped delivering audio."""


class MissingDeviceError(CaptureError):
    """No input device matches the setting (yet): a USB microphone unplugged or not
    enumerated, which may come back, unlike a setting the device cannot meet."""


def sounddevice_module() -> Any:
    """Import sounddevice only when capturing (PortAudio may be absent elsewhere)."""
    try:
        import sounddevice
    except OSError as exc:  # PortAudio library missing
        raise CaptureError(f"cannot capture: {exc} (install libportaudio2)") from None
    return sounddevice


@dataclass(frozen=True)
class InputDevice:
    """One device that can capture."""

    index: int
    name: str
    channels: int
    samplerate: float
    hostapi: str
    default: bool

    def line(self) -> str:
        """`  3* USB Audio: mic (hw:1,0)  1 ch, 48000 Hz, ALSA` (`*` = the default input)."""
        mark = "*" if self.default else " "
        return (
            f"{self.index:3d}{mark} {self.name}  {self.channels} ch, "
            f"{self.samplerate:.0f} Hz, {self.hostapi}"
        )


def input_devices() -> list[InputDevice]:
    """Every device with at least one input channel, with its default rate."""
    sd = sounddevice_module()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
        default = sd.default.device[0]
    except sd.PortAudioError as exc:
        raise CaptureError(f"cannot list audio devices: {exc}") from None
    return [
        InputDevice(
            index=int(d["index"]),
            name=str(d["name"]),
            channels=int(d["max_input_channels"]),
            samplerate=float(d["default_samplerate"]),
            hostapi=str(hostapis[d["hostapi"]]["name"]),
            default=int(d["index"]) == default,
        )
        for d in devices
        if d["max_input_channels"] > 0
    ]


def known_inputs() -> str:
    """One line naming the input devices that exist, for an error message."""
    try:
        devices = input_devices()
    except CaptureError as exc:
        return str(exc)
    if not devices:
        return (
            "no input devices found (is the microphone plugged in, `arecord -l`? or in use by "
            "another program, such as the soundsentry service?)"
        )
    names = ", ".join(f"{d.index} {d.name!r}" for d in devices[:NAMES_IN_ERROR])
    more = ", ..." if len(devices) > NAMES_IN_ERROR else ""
    return f"input devices: {names}{more} (`soundsentry devices` lists them with their rates)"
