"""Microphone capture with sounddevice, resilient to a device that stalls or disappears.

The PortAudio callback only copies blocks onto a bounded queue and counts overflows and
drops. The iterator yields mono blocks at the model's rate, or None while no audio arrives
(so the daemon keeps ticking); when the stream stalls or fails it is closed and reopened,
rescanning devices (a USB microphone unplugged and plugged back): a device that will not open
or start is retried with capped exponential backoff, and so is one that starts but stays silent;
a stream that delivered audio and then stalls is reopened at once. PortAudio is re-initialised
only when the sound devices change (each re-initialisation leaks a little memory; a device it
lists but cannot open, a sound server's source that is gone, is tried at every retry), and a retry
that fails the same way again is logged at DEBUG, with a reminder every ten minutes. With
`wait`, a device missing, or failing to open or start, at start is waited for the same way (the
daemon reports it as a stalled input meanwhile); a setting the device cannot meet is refused at
once.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import soxr

from edge.audio_io import channel_name, select_channel
from edge.devices import (
    PORT_PREFIX,
    CaptureError,
    ChannelError,
    MissingDeviceError,
    card_ports,
    input_devices,
    known_inputs,
    port_input,
    sounddevice_module,
)
from edge.settings import AudioSettings
from edge.sources import AudioGap

log = logging.getLogger(__name__)

TICK_S = 0.25
"""Longest wait for a block before yielding None."""
REOPEN_MIN_S = 1.0
SND_DIR = "/dev/snd"
"""Where the kernel lists sound devices: a change here is a device plugged in or pulled."""
RESCAN_EVERY_S = 600.0
"""PortAudio is re-initialised on a change in SND_DIR or of a sound server's socket, or this
long after the last time (no SND_DIR, or a device of another kind). It was re-initialised at
every retry: about 12 KB leaked each time, 36 MB a day with an unplugged microphone retried
every 30 s."""
ZEROS_REOPEN_S = 30.0
"""A stream that has delivered nothing but digital zeros this long is closed and reopened; again
after twice as long each time it still does, up to ZEROS_REOPEN_MAX_S, and afresh once sound
comes. A microphone that is there hears at least its own noise: exact zeros come from a device
wedged in silence, or from another source a sound server moved the stream to when the
configured one went away (PulseAudio moves it to its default source, and does not move it back
when the configured one returns: a soak review's daemon stayed on an empty sink's monitor,
deaf, with the microphone back). Reopening connects to the configured source again."""
ZEROS_REOPEN_MAX_S = 600.0
SAY_AGAIN_S = 600.0
"""A capture problem that repeats is logged again at WARNING after this long (DEBUG between):
a device that opens but stays silent logged two lines every few seconds, 53k a day."""


class MicSource:
    """Blocks of mono audio at the model's rate from an input device, reopened on failure."""

    paced = True
    """Blocks come at the pace of the clock: the daemon times events by its samples and
    follows the clock when they part (`Detector._follow_clock`)."""

    def __init__(
        self,
        audio: AudioSettings,
        model_rate: int,
        stall_s: float = 3.0,
        reopen_max_s: float = 30.0,
        wait: bool = False,
    ) -> None:
        self.settings = audio
        self.channel = audio.channel
        """The channel heard (-1: the average), as `FileSource.channel`: a site refit records it."""
        self.model_rate = model_rate
        self.stall_s = stall_s
        self.reopen_max_s = reopen_max_s
        self.overflows = 0
        self._gap = False
        """Audio was lost since the last block queued: a mark goes before the next."""
        self.dropped = 0
        self.reopens = 0
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=audio.queue_blocks)
        self._stop = threading.Event()
        self.wait = wait
        self.problem: str | None = None
        """Why no audio comes, while the device is missing or failing; None while it flows."""
        self._scanned = (_devices_signature(), time.monotonic())
        """The sound devices at PortAudio's last initialisation, and when that was."""
        self._retries = 0
        """Attempts to reopen since audio last flowed."""
        self._unresolved: str | None = None
        """Why the device could not be found at the last attempt; None once it was."""
        self._unopenable = False
        """The last attempt found the device listed but not to be opened at all."""
        self._said: tuple[str, float] | None = None
        """The problem last logged at WARNING in this outage, and when."""
        try:
            self.device, self.rate = self._resolve()
        except MissingDeviceError as exc:
            if not wait:
                raise
            self.device, self.rate = self.settings.device, model_rate
            self.problem = self._unresolved = f"audio device not available: {exc}"
            log.warning("capture: %s; waiting for the device", exc)

    @property
    def latency_s(self) -> float:
        """The most audio the capture queue holds: how far behind the clock a block may be."""
        return self.settings.queue_blocks * self.settings.block_seconds

    def stats(self) -> dict[str, int]:
        """Counters for the metrics message."""
        return {
            "dropped": self.dropped,
            "overflows": self.overflows,
            "queue_depth": self._queue.qsize(),
            "reopens": self.reopens,
        }

    def stop(self) -> None:
        """Ask the iterator to finish."""
        self._stop.set()

    def _resolve(self) -> tuple[int | str | None, int]:
        """The device to open and a rate it supports (the model's rate when possible)."""
        sd = sounddevice_module()
        self._unopenable = False
        device = self.settings.device
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        elif isinstance(device, str) and device.startswith(PORT_PREFIX):
            device = port_input(device, input_devices(), card_ports())
        try:
            info = sd.query_devices(device, "input")
        except (ValueError, sd.PortAudioError) as exc:
            which = "no default input device" if device is None else f"audio.device {device!r}"
            said = " ".join(str(exc).split())  # sounddevice lists candidates on lines of their own
            # a name that matches several devices is a setting to fix, not a device to wait for
            error = CaptureError if said.startswith("Multiple") else MissingDeviceError
            raise error(f"{which}: {said}; {known_inputs()}{_server_hint(device)}") from None
        self.channels = self._channels(sd, device, info)
        wanted = self.settings.samplerate or self.model_rate
        try:
            sd.check_input_settings(device, self.channels, "float32", samplerate=wanted)
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
        if rate < self.model_rate and self.settings.samplerate:  # the setting's, not the device's
            raise CaptureError(
                f"audio.samplerate {rate} is below the {self.model_rate} Hz needed (the model's "
                "rate, or record's --samplerate): set it to that or more, or leave it out"
            )
        if rate < self.model_rate:  # upsampled audio leaves the model's upper bands empty
            raise CaptureError(
                f"{info['name']!r} captures at {rate} Hz, below the {self.model_rate} Hz needed "
                "(the model's rate, or record's --samplerate): use another input, or set "
                f"audio.samplerate to a rate of {self.model_rate} Hz or more that it supports"
            )
        log.info(
            "capture: device %r at %d Hz, %d channel(s), hearing %s",
            info["name"], rate, self.channels, channel_name(self.settings.channel),
        )  # fmt: skip
        return device, rate

    def _channels(self, sd: Any, device: int | str | None, info: Any) -> int:
        """The channels to open: the configured count, or, on a device that refuses it (USB
        microphones that capture stereo only), all it offers; `channel` picks from them."""
        wanted = self.settings.channels
        offered = int(info["max_input_channels"])
        refusals: list[str] = []
        for channels in dict.fromkeys((wanted, offered)):
            if 0 < offered < channels:  # refused for sure, and PortAudio's C assertion says so on
                continue  # stderr first (in a new user's walk-through)
            try:
                sd.check_input_settings(device, channels, "float32")
            except (ValueError, sd.PortAudioError) as exc:
                refusals.append(" ".join(str(exc).split()))
                continue
            if self.settings.channel >= channels:  # before a warning that says it takes it
                heard = self.settings.channel
                # a device that offers more than [audio] channels opens: the setting is what
                # is short (two machines on the two channels of one microphone; a review)
                more = offered > heard and channels == wanted
                raise ChannelError(
                    f"channel {heard} ([audio] channel, or --channel) is not among the "
                    f"{channels} channel(s) "
                    + (
                        f"opened on {info['name']!r} ([audio] channels = {wanted}, of the "
                        f"{offered} it offers): set [audio] channels = {heard + 1}"
                        if more
                        else f"of {info['name']!r} (0-based; -1 averages them)"
                    )
                )
            if channels != wanted:
                log.warning(
                    "capture: %r does not capture %d channel(s); opening its %d and taking "
                    "%s (set [audio] channels = %d to say so)",
                    info["name"], wanted, channels, channel_name(self.settings.channel),
                    channels,
                )  # fmt: skip
            return channels
        if refusals and not any("channel" in said.lower() for said in refusals):
            # not a channel count it refuses: it cannot be opened now at all (a sound server's
            # source that is gone, PULSE_SOURCE naming an unplugged microphone), which may come
            # back: the service waits for it and says so, where it failed its start for good
            self._unopenable = True
            raise MissingDeviceError(f"{info['name']!r} cannot be opened ({refusals[-1]})")
        raise ChannelError(
            f"{info['name']!r} captures neither {wanted} channel(s) nor the {offered} it "
            "offers; set [audio] channels to what it supports (`soundsentry devices`)"
        )

    def _callback(self, indata: Any, _frames: int, _time: Any, status: Any) -> None:
        """PortAudio thread: copy the block and count trouble; where blocks were lost to a
        full queue, a mark (None) goes before the next block. A raw stream's buffer, made an
        array here: sounddevice's own array set its shape, which numpy 2.5 deprecates
        (Python 3.12 and later, Raspberry Pi OS Trixie: a review); where numpy drops it, every
        block would fail in the callback and the device would hear nothing."""
        if status.input_overflow:  # counted only: milliseconds lost, often, on a loaded Pi;
            self.overflows += 1  # restarting the windowing each time would leave it deaf
        try:
            if self._gap:
                self._queue.put_nowait(None)
                self._gap = False
            block = np.frombuffer(indata, dtype=np.float32).reshape(-1, self.channels)
            self._queue.put_nowait(block.copy())  # PortAudio reuses its buffer
        except queue.Full:
            self.dropped += 1
            self._gap = True

    def _open(self) -> Any:
        sd = sounddevice_module()
        blocksize = max(1, int(self.settings.block_seconds * self.rate))
        try:
            return sd.RawInputStream(
                device=self.device,
                channels=self.channels,
                samplerate=self.rate,
                dtype="float32",
                blocksize=blocksize,
                callback=self._callback,
            )
        except (ValueError, sd.PortAudioError) as exc:
            raise CaptureError(f"cannot open audio device {self._which}: {exc}") from None

    @property
    def _which(self) -> str:
        """The device as messages name it."""
        return "the default input" if self.device is None else repr(self.device)

    def _start(self, stream: Any) -> Any:
        """Start an opened stream, or close it and raise CaptureError: a device gone between open
        and start, or held by another program, is retried with backoff like one that will not
        open, instead of a raw PortAudioError ending the daemon."""
        sd = sounddevice_module()
        _drain(self._queue)
        try:
            stream.start()
        except sd.PortAudioError as exc:
            _close(stream)
            said = " ".join(str(exc).split())
            raise CaptureError(f"cannot start audio device {self._which}: {said}") from None
        except BaseException:
            _close(stream)
            raise
        return stream

    def _rescan(self) -> None:
        """Re-initialise PortAudio so devices plugged in since start are seen, and find the
        device again: at the 1st, 2nd, 4th, 8th ... retry of an outage (a sound server that
        restarts changes nothing in /dev/snd), when the sound devices changed since the last
        time (counting the retries from 1 again), and RESCAN_EVERY_S after it. Between those a
        device not found stays not found; one found but not to be opened is tried again."""
        self._retries += 1
        signature, at = self._scanned
        now = _devices_signature()
        doubling = self._retries & (self._retries - 1) == 0
        if not doubling and now == signature and time.monotonic() - at < RESCAN_EVERY_S:
            if self._unresolved and self._unopenable:
                # listed, but it would not open (a sound server's source that is gone): trying
                # it again needs no re-initialisation, and it came back 55 to 79 s late when it
                # waited for the next one (a field test)
                self._find()
            elif self._unresolved:
                raise CaptureError(self._unresolved)
            return
        if now != signature:  # a device or a server came or went: rescanned at the next retries
            self._retries = 1  # (udev may give it its permissions a moment later)
        self._scanned = (now, time.monotonic())
        sd = sounddevice_module()
        try:
            # not initialised when the last _initialize failed: terminating then fails, every
            # time, and the microphone stayed lost for good (in a review)
            with contextlib.suppress(sd.PortAudioError):
                sd._terminate()
            sd._initialize()
        except (sd.PortAudioError, OSError) as exc:
            self._unresolved, self._unopenable = f"audio device not available: {exc}", False
            raise CaptureError(self._unresolved) from None
        self._find()

    def _find(self) -> None:
        """Resolve the device again; CaptureError (and `_unresolved` says why) when it fails."""
        sd = sounddevice_module()
        try:
            self.device, self.rate = self._resolve()
        except (CaptureError, sd.PortAudioError, OSError) as exc:
            self._unresolved = f"audio device not available: {exc}"
            raise CaptureError(self._unresolved) from None
        self._unresolved = None

    def __iter__(self) -> Iterator[np.ndarray | AudioGap | None]:
        backoff = REOPEN_MIN_S
        zeros_after = ZEROS_REOPEN_S  # digital zeros this long reopen the stream
        first = self.problem is None  # a device missing at start is waited for, not refused
        if not first:
            yield from self._idle(backoff)
        while not self._stop.is_set():
            try:
                stream = self._reopen(first)
            except CaptureError as exc:
                if first and not self.wait:
                    raise
                first = False
                backoff = yield from self._retry_later(exc, backoff)
                continue
            reopened, first = not first, False
            backoff, zeros_after = yield from self._deliver(stream, reopened, backoff, zeros_after)

    def _reopen(self, first: bool) -> Any:
        """Open and start the stream; after the first attempt, find the device again first."""
        if not first:
            self._rescan()
            self.reopens += 1
        return self._start(self._open())

    def _retry_later(self, exc: CaptureError, backoff: float) -> Iterator[None]:
        """Say why the device did not open, wait `backoff`; return the next backoff."""
        self.problem = str(exc)
        self._say(self.problem, "capture: %s; retrying in %.0f s", exc, backoff)
        yield from self._idle(backoff)
        return min(backoff * 2, self.reopen_max_s)

    def _deliver(
        self, stream: Any, reopened: bool, backoff: float, zeros_after: float
    ) -> Iterator[np.ndarray | AudioGap | None]:
        """Yield a started stream's blocks until it stalls, or delivers nothing but digital
        zeros too long; return the next backoff and zeros_after."""
        initial = not reopened  # the first stream opened
        flowing: float | None = None  # since when this stream delivers
        settled = False  # delivered for stall_s: it works, the next outage starts afresh
        zeros: float | None = None  # since when it delivers digital zeros only
        blocks = self._stream(stream)
        try:
            for block in blocks:
                if isinstance(block, np.ndarray):
                    now = time.monotonic()
                    if flowing is None:
                        flowing = now
                        self.problem = None
                        if reopened:
                            reopened = False
                            yield AudioGap(reopened=True)
                    if not settled and now - flowing >= self.stall_s:
                        settled, backoff = True, self._settled()
                    if np.any(block):
                        zeros, zeros_after = None, ZEROS_REOPEN_S
                    elif zeros is None:
                        zeros = now
                    elif now - zeros >= zeros_after:
                        zeros_after = self._wedged(now - zeros, zeros_after)
                        blocks.close()  # closes the stream; the next one's audio
                        break  # comes after an AudioGap(reopened=True)
                yield block
        except CaptureError as exc:  # a stall: the daemon says "no audio" on its own
            backoff = yield from self._stalled(exc, initial, flowing, settled, backoff)
        return backoff, zeros_after

    def _settled(self) -> float:
        """The stream works: the next outage starts afresh; return the backoff to start from."""
        self._said = None
        self._retries = 0
        return REOPEN_MIN_S

    def _wedged(self, silent_s: float, zeros_after: float) -> float:
        """Say the stream delivers digital zeros only; return the next zeros_after."""
        self._say("zeros", "capture: nothing but digital zeros from %s for "
                  "%.0f s; reopening it (a device wedged, or a sound server "
                  "that moved the stream to another source)", self._which,
                  silent_s)  # fmt: skip
        return min(zeros_after * 2, ZEROS_REOPEN_MAX_S)

    def _stalled(
        self,
        exc: CaptureError,
        initial: bool,
        flowing: float | None,
        settled: bool,
        backoff: float,
    ) -> Iterator[None]:
        """A stream that stalled: refused, reopened at once, or waited for; return the backoff."""
        if initial and flowing is None and not self.wait:  # `record`, `run` at a prompt
            raise CaptureError(
                f"audio device {self._which} opened but delivered no audio in "
                f"{self.stall_s:g} s: is another program holding it, or is it wedged "
                "(unplug it and plug it in again)?"
            ) from None
        if settled:
            log.warning("capture: %s; reopening the device", exc)
            yield None
            return backoff
        # silent since it was opened, or a burst and silent again: waited for with
        # backoff, like a device that will not open
        self._say("silent", "capture: %s since the device was opened%s; reopening in "
                  "%.0f s", exc, "" if flowing is None else " (but a moment)",
                  backoff)  # fmt: skip
        yield from self._idle(backoff)
        return min(backoff * 2, self.reopen_max_s)

    def _say(self, problem: str, message: str, *args: Any) -> None:
        """Log a capture problem at WARNING when it is new in this outage or SAY_AGAIN_S after
        it was last said, at DEBUG otherwise."""
        now = time.monotonic()
        said, at = self._said or ("", 0.0)
        if said == problem and now - at < SAY_AGAIN_S:
            log.debug(message, *args)
            return
        self._said = (problem, now)
        log.warning(message, *args)

    def _stream(self, stream: Any) -> Iterator[np.ndarray | AudioGap | None]:
        """Yield blocks from a started stream until it stalls (CaptureError) or stop(); close it."""
        try:
            resampler = self._resampler()
            last = time.monotonic()
            while not self._stop.is_set():
                try:
                    block = self._queue.get(timeout=TICK_S)
                except queue.Empty:
                    if time.monotonic() - last > self.stall_s:
                        raise CaptureError(f"no audio for {self.stall_s:g} s") from None
                    yield None
                    continue
                if block is None:  # the callback's mark: audio was lost just here
                    resampler = self._resampler()  # its tail is from before the gap
                    yield AudioGap()
                    continue
                last = time.monotonic()
                mono = select_channel(block, self.settings.channel)
                yield resampler.resample_chunk(mono) if resampler else mono
        finally:
            _close(stream)

    def _resampler(self) -> Any:
        """A new resampler from the device's rate to the model's (None when they agree)."""
        if self.rate == self.model_rate:
            return None
        return soxr.ResampleStream(self.rate, self.model_rate, 1, dtype="float32")

    def _idle(self, seconds: float) -> Iterator[None]:
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            time.sleep(TICK_S)
            yield None


def _devices_signature() -> tuple[object, ...]:
    """What SND_DIR holds and when it last changed (None where there is no such folder), and
    the sound servers' sockets (PulseAudio, PipeWire): a server that restarts makes a new one."""
    try:
        snd: object = os.stat(SND_DIR).st_mtime_ns, tuple(sorted(os.listdir(SND_DIR)))
    except OSError:
        snd = None
    servers = []
    for path in _server_sockets():
        try:
            st = os.stat(path)
        except OSError:
            continue
        servers.append((path, st.st_ino, st.st_mtime_ns))
    return snd, tuple(servers)


SERVER_DEVICES = ("pulse", "pipewire", "jack")
"""ALSA's devices of the sound servers: they exist only while their server answers."""


def _server_hint(device: int | str | None) -> str:
    """For a sound server's device that is not there: the server is what to look at, not a
    microphone (a walk-through whose PulseAudio had stopped was told to plug one in)."""
    if not (isinstance(device, str) and device.lower() in SERVER_DEVICES):
        return ""
    return (
        f"; {device!r} is the sound server's device, there only while the server runs for this "
        "user: is it running (`pactl info` answers when it is)?"
    )


def _server_sockets() -> list[str]:
    """Where a PulseAudio or PipeWire server of this user listens."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    found = [os.environ.get("PULSE_SERVER", "").removeprefix("unix:")]
    if os.environ.get("PULSE_RUNTIME_PATH"):  # libpulse's own runtime folder, where set
        found.append(os.path.join(os.environ["PULSE_RUNTIME_PATH"], "native"))
    if runtime:
        found += [os.path.join(runtime, "pulse", "native"), os.path.join(runtime, "pipewire-0")]
    found += glob.glob(os.path.expanduser("~/.config/pulse/*-runtime/native"))
    return [p for p in found if p.startswith("/")]


def _drain(q: queue.Queue[np.ndarray | None]) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


CLOSE_TIMEOUT_S = 10.0
"""A stream that does not close within this is hung in the audio library: the process exits."""
EXIT_CAPTURE_HUNG = 1
"""The exit status then: a failure, which systemd's Restart=on-failure starts again."""


def _close(stream: Any, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """Abort and close a stream, tolerating one whose device already vanished. PortAudio can
    hang in it: a sound server that died while the stream was reopened left its ALSA thread
    writing the same assertion to stderr for ever (3.5 GB in 70 s) and the close waiting for
    that thread, so the daemon heard nothing, answered nothing and ignored SIGTERM (a field
    review; only SIGKILL ended it). The close runs in a thread of its own; one that has not
    returned in `timeout_s` ends the process with a line that says why, and the service starts
    again (its watchdog would have killed it after 30 s; a `run` in a terminal hung)."""
    done = threading.Event()

    def close() -> None:
        try:
            stream.abort()
            stream.close()
        except Exception as exc:  # PortAudio errors on a dead device must not kill the daemon
            log.debug("capture: closing the stream failed: %s", exc)
        finally:
            done.set()

    if sys.is_finalizing():  # no thread starts at the interpreter's exit: start() waits for ever
        close()
        return
    threading.Thread(target=close, name="capture-close", daemon=True).start()
    if not done.wait(timeout_s):
        log.critical(
            "capture: the audio library did not close the stream of the input within %g s (it "
            "hangs: a sound server that stopped while the stream was reopened?); exiting so that "
            "the service starts again",
            timeout_s,
        )
        logging.shutdown()
        os._exit(EXIT_CAPTURE_HUNG)
