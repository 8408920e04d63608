"""A stream that opens but will not start (a USB microphone gone between open and start, a
device another program holds) is closed and retried by the capture's own backoff.

No device here can be made to fail `start()` on demand, so PortAudio's answers are scripted:
the device query and `RawInputStream` are replaced on the real sounddevice module; the rest of
MicSource (queue, stall detection, reopen loop, backoff) runs as it does on a Pi. The real
reopen path is tested with PulseAudio in test_field_daemon.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from edge.capture import MicSource
from edge.devices import CaptureError
from edge.settings import AudioSettings

RATE = 16000
DEVICE = "USB mic"
DEADLINE_S = 15.0
START_FAILED = ("Error starting stream: Device unavailable", -9985)


class ScriptedStream:
    """An input stream whose start() fails or which feeds blocks of `level` from a thread;
    with `blocks`, only that many before it goes silent (the microphone unplugged)."""

    def __init__(self, sd: Any, level: float, fail: bool, blocks: int | None, **kw: Any) -> None:
        self.sd, self.level, self.fail, self.blocks = sd, level, fail, blocks
        self.callback = kw["callback"]
        self.shape = (kw["blocksize"], kw["channels"])
        self.closed = False
        self._halt = threading.Event()

    def start(self) -> None:
        if self.fail:
            raise self.sd.PortAudioError(*START_FAILED)
        threading.Thread(target=self._feed, daemon=True).start()

    def _feed(self) -> None:
        fed = 0
        while not self._halt.wait(0.01) and (self.blocks is None or fed < self.blocks):
            block = np.full(self.shape, self.level, np.float32)
            self.callback(memoryview(block), self.shape[0], None, self.sd.CallbackFlags())
            fed += 1

    def abort(self) -> None:
        self._halt.set()

    def close(self) -> None:
        self._halt.set()
        self.closed = True


@pytest.fixture
def streams(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Script the streams the capture opens, in order; each opened one is recorded as
    `opened` in the test's list."""
    sd = pytest.importorskip("sounddevice")
    script: list[dict[str, Any]] = []
    info = {"name": DEVICE, "max_input_channels": 1, "default_samplerate": float(RATE)}
    monkeypatch.setattr(sd, "query_devices", lambda *a, **k: info)
    monkeypatch.setattr(sd, "check_input_settings", lambda *a, **k: None)
    monkeypatch.setattr(sd, "_terminate", lambda: None)
    monkeypatch.setattr(sd, "_initialize", lambda: None)

    def open_stream(**kw: Any) -> ScriptedStream:
        step = script[len([s for s in script if "opened" in s])]
        step["opened"] = ScriptedStream(sd, step["level"], step["fail"], step.get("blocks"), **kw)
        return step["opened"]

    monkeypatch.setattr(sd, "RawInputStream", open_stream)
    yield script


def first_block_of(blocks: Iterator[Any], level: float, seen: list[Any] | None = None) -> Any:
    """Iterate until a block of `level` arrives, within the deadline (what came before it
    into `seen`)."""
    deadline = time.monotonic() + DEADLINE_S
    for block in blocks:
        if isinstance(block, np.ndarray) and block[0] == level:
            return block
        if seen is not None:
            seen.append(block)
        assert time.monotonic() < deadline, f"no audio at {level} within {DEADLINE_S} s"
    raise AssertionError("the capture ended")


def capture_until(source: MicSource, *levels: float) -> None:
    """Run the capture until a block of each level has come, in turn; then stop it."""
    blocks = iter(source)
    try:
        for level in levels:
            first_block_of(blocks, level)
    finally:
        source.stop()
        blocks.close()


def test_a_stream_that_will_not_start_after_a_stall_is_closed_and_retried(
    streams: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """The microphone stalls, its reopened stream opens but fails to start: the capture used to
    raise that PortAudioError into the daemon (which exited, the stream left open). Now the
    stream is closed, the reason logged, and the device retried until audio flows again."""
    streams += [
        {"level": 0.25, "fail": False, "blocks": 3},  # works, then goes silent
        {"level": 0.0, "fail": True},  # reopened after the stall; start() fails
        {"level": 0.75, "fail": False},  # retried after the backoff
    ]
    source = MicSource(AudioSettings(device=DEVICE), RATE, stall_s=0.5)
    blocks = iter(source)
    between: list[Any] = []
    try:
        first_block_of(blocks, 0.25)
        first_block_of(blocks, 0.75, between)
    finally:
        source.stop()
        blocks.close()
    gaps = [b for b in between if type(b).__name__ == "AudioGap"]
    assert len(gaps) == 1 and gaps[0].reopened, "the reopened device's audio is marked apart"
    assert streams[1]["opened"].closed, "the stream that failed to start was left open"
    assert source.reopens == 2
    said = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert said and f"cannot start audio device {DEVICE!r}" in said[0], said
    assert "Device unavailable" in said[0] and "\n" not in said[0]


def test_a_stream_of_nothing_but_digital_zeros_is_reopened(
    streams: list[dict[str, Any]], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PulseAudio moves a stream whose source went away to its default source (an idle sink's
    monitor: exact zeros) and does not move it back when the source returns: a soak review's
    daemon stayed deaf on it, in `fault: silence`, with the microphone back. A stream of nothing
    but digital zeros (which no microphone that is there delivers) is closed and reopened, which
    connects to the configured source again; one that hears a whisper of noise is left alone."""
    import edge.capture

    monkeypatch.setattr(edge.capture, "ZEROS_REOPEN_S", 0.5, raising=False)
    streams += [
        {"level": 1e-6, "fail": False, "blocks": 150},  # a quiet room: 1.5 s, then a stall
        {"level": 0.0, "fail": False},  # reopened: the other source's zeros
        {"level": 0.5, "fail": False},  # reopened again: the microphone
    ]
    source = MicSource(AudioSettings(device=DEVICE), RATE, stall_s=0.5)
    blocks = iter(source)
    between: list[Any] = []
    try:
        first_block_of(blocks, 1e-6)
        first_block_of(blocks, 0.0, between)
        assert source.reopens == 1, "the quiet room's stream was reopened before it stalled"
        first_block_of(blocks, 0.5, between)
    finally:
        source.stop()
        blocks.close()
    assert source.reopens == 2 and streams[1]["opened"].closed
    said = [r.getMessage() for r in caplog.records if "digital zeros" in r.getMessage()]
    assert len(said) == 1 and f"from {DEVICE!r} for" in said[0], said


def test_a_device_that_will_not_start_at_first_is_waited_for_as_a_service(
    streams: list[dict[str, Any]],
) -> None:
    """With `wait` (the service), a first stream that fails to start is retried like a device
    that fails to open; its problem is what the health message reports meanwhile."""
    streams += [{"level": 0.0, "fail": True}, {"level": 0.5, "fail": False}]
    source = MicSource(AudioSettings(device=DEVICE), RATE, wait=True)
    blocks = iter(source)
    try:
        deadline = time.monotonic() + 20
        while source.problem is None:
            assert next(blocks) is None and time.monotonic() < deadline, "no problem reported"
        assert "cannot start audio device" in source.problem
        first_block_of(blocks, 0.5)
        assert source.problem is None
    finally:
        source.stop()
        blocks.close()
    assert streams[0]["opened"].closed


def test_a_device_that_will_not_start_at_first_is_refused_in_one_line(
    streams: list[dict[str, Any]],
) -> None:
    """Without `wait` (`run` on a terminal, `record`), it is refused at once as a capture error
    naming the device, as one that fails to open is, and its stream is closed."""
    streams += [{"level": 0.0, "fail": True}]
    source = MicSource(AudioSettings(device=DEVICE), RATE)
    with pytest.raises(CaptureError, match=f"cannot start audio device {DEVICE!r}: Error start"):
        next(iter(source))
    assert streams[0]["opened"].closed


def test_audio_lost_to_a_full_queue_is_marked_where_it_was_lost(
    streams: list[dict[str, Any]],
) -> None:
    """Blocks dropped by a full queue (a slow Pi, a refit) left the next block to continue the
    last one as if nothing was missing: windows joined audio from both sides of the gap."""
    from edge.sources import AudioGap

    streams += [{"level": 0.25, "fail": False}]
    source = MicSource(AudioSettings(device=DEVICE, queue_blocks=4), RATE, stall_s=5.0)
    blocks = iter(source)
    try:
        first_block_of(blocks, 0.25)  # then nobody reads for a while: the queue fills
        deadline = time.monotonic() + DEADLINE_S
        while source.dropped == 0:
            assert time.monotonic() < deadline, "no block was dropped"
            time.sleep(0.01)
        seen = []
        for item in blocks:
            seen.append(item)
            if isinstance(item, AudioGap):
                break
            assert time.monotonic() < deadline, "no mark of the lost audio"
    finally:
        source.stop()
        blocks.close()
    queued = [b for b in seen if isinstance(b, np.ndarray)]
    assert 1 <= len(queued) <= 4, "the mark comes after what was queued before the loss"
    assert isinstance(seen[-1], AudioGap) and not seen[-1].reopened


def test_a_microphone_is_found_by_the_usb_port_it_sits_in(tmp_path: Any) -> None:
    """Two microphones of the same make have the same name, and their card numbers follow the
    order the kernel found them in at boot: after a reboot pump-3's instance could listen to
    the fan's microphone. udev's /dev/snd/by-path names the port; `port:` picks by it."""
    from edge.devices import InputDevice, MissingDeviceError, card_ports, port_input

    for name, target in (
        ("platform-xhci-hcd.0-usb-0:1:1.0", "../controlC2"),
        ("platform-xhci-hcd.0-usb-0:2:1.0", "../controlC1"),
        ("platform-soc-audio", "../pcmC0D0p"),  # not a control device: not a card's port
    ):
        (tmp_path / name).symlink_to(target)
    ports = card_ports(tmp_path)
    assert ports == {2: "platform-xhci-hcd.0-usb-0:1:1.0", 1: "platform-xhci-hcd.0-usb-0:2:1.0"}
    same = "USB PnP Sound Device: Audio (hw:{},0)"
    devices = [
        InputDevice(
            index=i,
            name=same.format(c),
            channels=1,
            samplerate=48000.0,
            hostapi="ALSA",
            default=False,
            port=ports.get(c),
        )
        for i, c in ((3, 1), (4, 2))
    ]
    devices.append(InputDevice(5, "pulse", 32, 44100.0, "ALSA", True))
    assert port_input("port:usb-0:1:", devices, ports) == 4
    assert port_input("port:usb-0:2:1.0", devices, ports) == 3
    assert "port:platform-xhci-hcd.0-usb-0:1:1.0" in devices[1].line()
    assert devices[1].line().endswith("1:1.0")  # no rate asked: none said
    takes, not_16k = (replace(devices[0], captures_at=(16000, ok)) for ok in (True, False))
    assert takes.line().endswith("usb-0:2:1.0  (captures at 16000 Hz)")
    assert not_16k.line().endswith("2:1.0  (48000 Hz resampled to 16000 Hz)")
    with pytest.raises(CaptureError, match="matches the ports of 2 cards") as several:
        port_input("port:usb-0", devices, ports)
    assert not isinstance(several.value, MissingDeviceError)  # a setting to mend, not to wait
    with pytest.raises(MissingDeviceError, match="no sound card on such a port"):
        port_input("port:usb-0:3:", devices, ports)  # unplugged: waited for
    with pytest.raises(MissingDeviceError, match="offers no input"):
        port_input("port:usb-0:1:", devices[:1], ports)
    with pytest.raises(CaptureError, match="name the port") as empty:
        port_input("port:", devices, ports)
    assert not isinstance(empty.value, MissingDeviceError)  # not waited for for ever
    assert card_ports(tmp_path / "absent") == {}


def test_portaudio_is_reinitialised_only_when_the_sound_devices_change(
    streams: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every retry re-initialised PortAudio, which leaks about 12 KB each time: an unplugged
    microphone retried every 30 s cost 36 MB a day, and the service's MemoryMax ended it within
    a week. Now a retry re-initialises it at the 1st, 2nd, 4th, 8th ... retry of an outage and
    when /dev/snd changed (a device plugged in or pulled), counting from 1 again after that;
    and a retry failing the same way again is not another warning."""
    import edge.capture

    sd = pytest.importorskip("sounddevice")
    snd = tmp_path / "snd"
    snd.mkdir()
    monkeypatch.setattr(edge.capture, "SND_DIR", str(snd))
    monkeypatch.setattr(edge.capture, "REOPEN_MIN_S", 0.05)
    at_retry: list[int] = []
    monkeypatch.setattr(sd, "_terminate", lambda: at_retry.append(source.reopens + 1))
    scripted = sd.RawInputStream

    def plug_in_at_the_fourth_retry(**kw: Any) -> Any:
        if len([s for s in streams if "opened" in s]) == 4:
            (snd / "pcmC1D0c").touch()  # the kernel lists a new device
        return scripted(**kw)

    monkeypatch.setattr(sd, "RawInputStream", plug_in_at_the_fourth_retry)
    streams += [
        {"level": 0.25, "fail": False, "blocks": 60},  # works, then the microphone is pulled
        *({"level": 0.0, "fail": True} for _ in range(6)),  # retried, failing the same way
        {"level": 0.75, "fail": False},
    ]
    source = MicSource(AudioSettings(device=DEVICE), RATE, stall_s=0.3, reopen_max_s=0.05)
    capture_until(source, 0.25, 0.75)
    assert source.reopens == 7
    assert at_retry == [1, 2, 4, 5, 6], "at retries 1, 2, 4, and 1, 2 again after the change"
    warned = [
        r.getMessage()
        for r in caplog.records
        if "retrying in" in r.getMessage() and r.levelname == "WARNING"
    ]
    assert len(warned) == 1, warned  # one for the outage, not one for each retry


def test_a_device_that_opens_but_stays_silent_is_retried_with_backoff(
    streams: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A device that opens and starts but never delivers was reopened after every stall, with
    no backoff: 26k reopens and 53k log lines a day. Now it waits as one that will not open
    does, doubling to reopen_max_s, and says so once; a burst of audio before it falls silent
    again does not start the backoff afresh (only audio for stall_s does)."""
    import edge.capture

    monkeypatch.setattr(edge.capture, "REOPEN_MIN_S", 0.05)
    waits: list[float] = []
    idle = MicSource._idle

    def spy(self: MicSource, seconds: float) -> Iterator[None]:
        waits.append(seconds)
        return idle(self, seconds)

    monkeypatch.setattr(MicSource, "_idle", spy)
    caplog.set_level("DEBUG", logger="edge.capture")
    streams += [
        {"level": 0.25, "fail": False, "blocks": 60},  # works for 0.6 s, then stalls
        {"level": 0.0, "fail": False, "blocks": 0},  # reopened: starts, stays silent
        {"level": 0.0, "fail": False, "blocks": 0},
        {"level": 0.0, "fail": False, "blocks": 2},  # a burst, and silent again: no reset
        {"level": 0.0, "fail": False, "blocks": 0},
        {"level": 0.75, "fail": False},
    ]
    source = MicSource(AudioSettings(device=DEVICE), RATE, stall_s=0.3, reopen_max_s=0.2)
    capture_until(source, 0.25, 0.75)
    assert waits == [0.05, 0.1, 0.2, 0.2], "the stall of a working stream reopens at once"
    said = [r for r in caplog.records if "since the device was opened" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING", "DEBUG", "DEBUG", "DEBUG"]


@pytest.mark.parametrize("named_by", ["PULSE_SERVER", "PULSE_RUNTIME_PATH"])
def test_a_sound_server_that_restarts_changes_the_devices_signature(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, named_by: str
) -> None:
    """A PulseAudio or PipeWire server that restarts changes nothing in /dev/snd: its new
    socket is what tells the capture to rescan (else it waited for the next doubling retry,
    minutes into an outage). Where libpulse finds it by PULSE_RUNTIME_PATH, so does this."""
    from edge.capture import _devices_signature

    socket_path = tmp_path / "native"
    socket_path.write_text("")
    monkeypatch.delenv("PULSE_SERVER", raising=False)
    monkeypatch.delenv("PULSE_RUNTIME_PATH", raising=False)
    if named_by == "PULSE_SERVER":
        monkeypatch.setenv("PULSE_SERVER", f"unix:{socket_path}")
    else:
        monkeypatch.setenv("PULSE_RUNTIME_PATH", str(tmp_path))
    before = _devices_signature()
    assert _devices_signature() == before
    socket_path.unlink()  # the server stops ...
    gone = _devices_signature()
    assert gone != before
    socket_path.write_text("")  # ... and starts again: a new socket
    assert _devices_signature() not in (before, gone)


class _Closed:
    """A stream stand-in for `_stream`, which only closes it."""

    def abort(self) -> None: ...

    def close(self) -> None: ...


def test_the_resampler_starts_afresh_after_lost_audio(streams: list[dict[str, Any]]) -> None:
    """A 48 kHz device, a 16 kHz model: after blocks were lost, the resampler's tail from
    before the gap (33 ms) was spliced in front of the audio after it."""
    import soxr

    from edge.sources import AudioGap

    source = MicSource(AudioSettings(device=DEVICE), RATE, stall_s=5.0)
    source.rate = 3 * RATE
    rng = np.random.default_rng(0)
    before = [rng.standard_normal((4800, 1)).astype(np.float32) for _ in range(5)]
    after = [rng.standard_normal((4800, 1)).astype(np.float32) for _ in range(5)]
    for block in [*before, None, *after]:
        source._queue.put(block)
    heard: list[Any] = []
    for item in source._stream(_Closed()):
        heard.append(item)
        if len(heard) == len(before) + 1 + len(after):
            source.stop()
    (gap,) = [i for i, x in enumerate(heard) if isinstance(x, AudioGap)]
    fresh = soxr.ResampleStream(3 * RATE, RATE, 1, dtype="float32")
    expected = np.concatenate([fresh.resample_chunk(b[:, 0]) for b in after])
    np.testing.assert_allclose(np.concatenate(heard[gap + 1 :]), expected, atol=1e-6)


def test_a_failed_reinitialisation_of_portaudio_is_not_for_good(
    streams: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One failed re-initialisation left PortAudio uninitialised; every later retry began by
    terminating it, which then failed, so it was never initialised again, and the service
    heard nothing until a restart though the microphone was back (in a review)."""
    import edge.capture

    sd = pytest.importorskip("sounddevice")
    monkeypatch.setattr(edge.capture, "REOPEN_MIN_S", 0.05)
    state = {"up": True, "fail_next_init": True}

    def terminate() -> None:
        if not state["up"]:
            raise sd.PortAudioError("Error terminating PortAudio: PortAudio not initialized")
        state["up"] = False

    def initialize() -> None:
        if state["fail_next_init"]:
            state["fail_next_init"] = False
            raise sd.PortAudioError("Error initializing PortAudio", -9999)
        state["up"] = True

    monkeypatch.setattr(sd, "_terminate", terminate)
    monkeypatch.setattr(sd, "_initialize", initialize)
    streams += [
        {"level": 0.25, "fail": False, "blocks": 3},  # works, then the microphone goes
        {"level": 0.75, "fail": False},  # back, once PortAudio is up again
    ]
    source = MicSource(AudioSettings(device=DEVICE), RATE, stall_s=0.3, reopen_max_s=0.05)
    capture_until(source, 0.25, 0.75)
    assert state["up"]


def test_a_device_that_opens_but_never_delivers_is_refused_in_one_line(
    streams: list[dict[str, Any]],
) -> None:
    """Without `wait` (`record`, `run` at a prompt) a first stream that starts but delivers
    nothing was retried for ever: a 5-s `record` on a wedged microphone never ended and wrote
    nothing (in a review). It is refused like one that will not start."""
    streams += [{"level": 0.0, "fail": False, "blocks": 0}]
    source = MicSource(AudioSettings(device=DEVICE), RATE, stall_s=0.3)
    t0 = time.monotonic()
    refused = f"audio device {DEVICE!r} opened but delivered no audio in 0.3 s"
    with pytest.raises(CaptureError, match=refused):
        for _ in source:
            assert time.monotonic() - t0 < DEADLINE_S, "still waiting for a silent device"
    assert streams[0]["opened"].closed


def test_the_default_input_that_will_not_start_is_named_as_such(
    streams: list[dict[str, Any]],
) -> None:
    streams += [{"level": 0.0, "fail": True}]
    with pytest.raises(CaptureError, match="cannot start audio device the default input: "):
        next(iter(MicSource(AudioSettings(), RATE)))


def test_a_stream_the_audio_library_cannot_close_ends_the_process_with_a_reason() -> None:
    """PortAudio hung closing a stream whose sound server died while it reopened: the daemon
    heard nothing, answered nothing and ignored SIGTERM until SIGKILL (a field review). A close
    that does not return ends the process in one line, and the service starts again."""
    import subprocess
    import sys
    from pathlib import Path

    from edge.capture import EXIT_CAPTURE_HUNG

    script = (
        "import logging, threading\n"
        "logging.basicConfig(format='%(levelname)s %(message)s')\n"
        "from edge.capture import _close\n"
        "class Hung:\n"
        "    def abort(self): threading.Event().wait()\n"
        "    def close(self): pass\n"
        "class Fine:\n"
        "    def abort(self): pass\n"
        "    def close(self): print('closed', flush=True)\n"
        "_close(Fine(), timeout_s=5)\n"
        "_close(Hung(), timeout_s=0.5)\n"
        "print('not reached')\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=root, timeout=60)  # fmt: skip
    assert proc.returncode == EXIT_CAPTURE_HUNG != 0, proc
    assert proc.stdout == "closed\n", proc.stdout
    assert "CRITICAL capture: the audio library did not close the stream" in proc.stderr
    assert "exiting so that the service starts again" in proc.stderr
    # a capture still open at the interpreter's exit (kept by a global, or a traceback) is
    # closed there, where no thread can start: the close in a thread hung for ever (a review)
    at_exit = (
        "from edge.capture import _close\n"
        "class Fine:\n"
        "    def abort(self): pass\n"
        "    def close(self): print('closed', flush=True)\n"
        "def capture():\n"
        "    try:\n"
        "        yield 1\n"
        "    finally:\n"
        "        _close(Fine())\n"
        "KEPT = capture()\n"
        "next(KEPT)\n"
    )
    proc = subprocess.run([sys.executable, "-c", at_exit], capture_output=True, text=True,
                          cwd=root, timeout=60)  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, "closed\n"), proc
