"""Input devices as PortAudio sees them: `soundsentry devices`, the list a device setting
that matches nothing is answered with, and the lazy sounddevice import capture uses."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.errors import SoundSentryError

NAMES_IN_ERROR = 8
"""How many input devices an error message names before it says `...`."""
BY_PATH = Path("/dev/snd/by-path")
"""udev's links to each sound card's control device, named by the USB port or PCI slot the
card sits in: the same across reboots, where card numbers (hw:1, hw:2) are given in the order
the cards were found and two identical USB microphones have the same name."""
PORT_PREFIX = "port:"
"""`[audio] device = "port:usb-0:1.2:1.0"`: the card on that port (a part of its by-path name)."""
INVALID_SAMPLE_RATE = -9997
"""PortAudio's paInvalidSampleRate: the device does not take the rate asked."""
_CARD = re.compile(r"\(hw:(\d+),")


class CaptureError(SoundSentryError):
    """The input device cannot be opened or stopped delivering audio."""


class ChannelError(CaptureError):
    """The device opens, but not with the channels the settings ask for ([audio] channels
    and channel): the setting is what to change, not the device."""


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
    port: str | None = None
    """The by-path name of the card's port (BY_PATH), for ALSA hardware devices."""
    captures_at: tuple[int, bool] | None = None
    """A model's rate asked of it (`input_devices(probe_rate)`) and whether the device takes
    it; None where not asked or it could not be told (a device in use)."""

    def line(self) -> str:
        """`  3* USB Audio: mic (hw:1,0)  1 ch, 48000 Hz, ALSA` (`*` = the default input),
        then `port:...` where the card's port is known, and how a model's rate is captured."""
        mark = "*" if self.default else " "
        port = f"  {PORT_PREFIX}{self.port}" if self.port else ""
        return (
            f"{self.index:3d}{mark} {self.name}  {self.channels} ch, "
            f"{self.samplerate:.0f} Hz, {self.hostapi}{port}{self._capture()}"
        )

    def _capture(self) -> str:
        """How the rate asked is captured: the default rate is only PortAudio's first offer
        (a sound server's 44100 Hz opens at 16000 Hz all the same, a new user's walk-through
        read it as the rate it records at)."""
        if self.captures_at is None:
            return ""
        rate, direct = self.captures_at
        if direct:
            return f"  (captures at {rate} Hz)"
        return f"  ({self.samplerate:.0f} Hz resampled to {rate} Hz)"


def card_of(name: str) -> int | None:
    """The ALSA card number in a PortAudio device name (`... (hw:1,0)`), if it has one."""
    match = _CARD.search(name)
    return int(match.group(1)) if match else None


def _port(name: str, ports: dict[int, str]) -> str | None:
    card = card_of(name)
    return None if card is None else ports.get(card)


def card_ports(root: Path = BY_PATH) -> dict[int, str]:
    """ALSA card number -> the by-path name of the port it sits in ({} where udev made none)."""
    ports: dict[int, str] = {}
    try:
        links = sorted(root.iterdir())
    except OSError:
        return ports
    for link in links:
        try:
            match = re.search(r"controlC(\d+)$", os.readlink(link))
        except OSError:
            continue
        if match:
            ports[int(match.group(1))] = link.name
    return ports


def port_input(setting: str, devices: list[InputDevice], ports: dict[int, str]) -> int:
    """The index of the input device of the card on the port `setting` names (PORT_PREFIX and
    a part of the port's by-path name). MissingDeviceError while no card sits there (unplugged:
    it may come back), CaptureError when the part names several ports."""
    part = setting[len(PORT_PREFIX) :]
    if not part:
        raise CaptureError(
            f"audio.device {setting!r}: name the port after `port:` (`soundsentry devices` "
            "shows each card's)"
        )
    cards = sorted(card for card, name in ports.items() if part in name)
    listed = ", ".join(f"{PORT_PREFIX}{ports[c]} (hw:{c})" for c in sorted(ports)) or "none"
    if len(cards) > 1:
        raise CaptureError(
            f"audio.device {setting!r} matches the ports of {len(cards)} cards: give more of "
            f"it; the ports: {listed}"
        )
    if not cards:
        raise MissingDeviceError(
            f"audio.device {setting!r}: no sound card on such a port (unplugged?); the ports: "
            f"{listed}"
        )
    matches = [d.index for d in devices if card_of(d.name) == cards[0]]
    if not matches:
        raise MissingDeviceError(
            f"audio.device {setting!r}: card hw:{cards[0]} is on that port but offers no input "
            "(in use by another program?)"
        )
    return matches[0]


def input_devices(probe_rate: int | None = None) -> list[InputDevice]:
    """Every device with at least one input channel, with its default rate, and with
    `probe_rate` whether it captures at that rate itself (capture resamples where not)."""
    sd = sounddevice_module()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
        default = sd.default.device[0]
    except sd.PortAudioError as exc:
        raise CaptureError(f"cannot list audio devices: {exc}") from None
    ports = card_ports()
    return [
        InputDevice(
            index=int(d["index"]),
            name=str(d["name"]),
            channels=int(d["max_input_channels"]),
            samplerate=float(d["default_samplerate"]),
            hostapi=str(hostapis[d["hostapi"]]["name"]),
            default=int(d["index"]) == default,
            port=_port(str(d["name"]), ports),
            captures_at=_takes(sd, int(d["index"]), probe_rate),
        )
        for d in devices
        if d["max_input_channels"] > 0
    ]


def _takes(sd: Any, index: int, rate: int | None) -> tuple[int, bool] | None:
    """(rate, whether device `index` opens one channel at it); None where not asked, or where
    the device cannot be asked (PortAudio's other errors: a device in use, gone)."""
    if rate is None:
        return None
    try:
        sd.check_input_settings(index, 1, "float32", samplerate=rate)
    except sd.PortAudioError as exc:
        return (rate, False) if exc.args[1:2] == (INVALID_SAMPLE_RATE,) else None
    except ValueError:
        return None
    return rate, True


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
