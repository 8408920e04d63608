"""Site tools on a real capture path (PulseAudio null sink): `record` and `doctor`."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import DEMO_BUNDLE, DEMO_CLIP, ROOT, SOUNDSENTRY, Broker, cli, wait_for
from mqtt_helpers import Subscriber

from edge.sources import AudioGap

pytestmark = pytest.mark.slow


def streams_into(sink: str) -> int:
    """How many streams play into a PulseAudio sink now."""

    def short(kind: str) -> list[list[str]]:
        out = subprocess.run(["pactl", "list", "short", kind], capture_output=True, text=True)
        return [line.split("\t") for line in out.stdout.splitlines()]

    ids = {f[0] for f in short("sinks") if f[1] == sink}
    return sum(1 for f in short("sink-inputs") if f[1] in ids)


def play(sink: str, path: Path) -> subprocess.Popen[bytes]:
    """Play a file into a sink; return once its stream is connected and playing."""
    before = streams_into(sink)
    player = subprocess.Popen(["paplay", "-d", sink, str(path)])
    wait_for(
        lambda: streams_into(sink) > before or player.poll() is not None,
        10,
        f"{path.name} to play into the sink {sink}",
        lambda: streams_into(sink),
    )
    assert player.poll() is None, f"paplay exited with {player.returncode}"
    return player


def record_with(script: str, pulse: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`soundsentry record ARGS --device pulse` run by `script` (which changes one thing about
    the process first, then calls the CLI), while the demo clip plays into the sink."""
    import sys

    player = play(pulse.removesuffix(".monitor"), DEMO_CLIP)
    try:
        return subprocess.run(
            [sys.executable, "-c", script, "record", *args, "--device", "pulse"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
            env={**os.environ, "PULSE_SOURCE": pulse},
        )  # fmt: skip
    finally:
        player.kill()


def test_record_writes_chunked_wavs_of_the_machine(pulse: str, tmp_path: Path) -> None:
    player = play(pulse.removesuffix(".monitor"), DEMO_CLIP)
    try:
        proc = cli(
            "record",
            "--seconds",
            "3",
            "--chunk-seconds",
            "2",
            "--out",
            str(tmp_path / "rec"),
            "--device",
            "pulse",
            env={"PULSE_SOURCE": pulse},
        )
    finally:
        player.kill()
    files = sorted((tmp_path / "rec").glob("*.wav"))
    assert [round(sf.info(str(f)).duration, 1) for f in files] == [2.0, 1.0]
    # private, as the daemon's clips: a site's audio may hold speech (the security review)
    assert [f.stat().st_mode & 0o777 for f in files] == [0o600, 0o600]
    assert (tmp_path / "rec").stat().st_mode & 0o777 == 0o700
    assert all(sf.info(str(f)).samplerate == 16000 for f in files)
    assert "recorded 2 file(s)" in proc.stdout and "dBFS" in proc.stderr


@pytest.mark.parametrize(
    ("stop", "said"),
    [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM"), (signal.SIGHUP, "SIGHUP")],
)
def test_ctrl_c_keeps_what_was_recorded(
    pulse: str, tmp_path: Path, stop: signal.Signals, said: str
) -> None:
    """Ctrl-C ends a recording early: the chunk in progress is kept, not deleted, and the level
    verdict still comes (the old code deleted it and said nothing). `kill` and an SSH session
    that closes (SIGHUP) end it the same way: they left a chunk whose header never got its
    lengths, which strict readers (Python's `wave`) refuse, and no summary."""
    import wave

    out = tmp_path / "rec"
    player = play(pulse.removesuffix(".monitor"), DEMO_CLIP)
    recorder = subprocess.Popen(
        [*SOUNDSENTRY, "record", "--seconds", "600", "--out", str(out), "--device", "pulse"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PULSE_SOURCE": pulse},
    )  # fmt: skip
    try:
        two_seconds = 44 + 2 * 16000 * 2  # a WAV header and 2 s of 16-bit mono
        wait_for(
            lambda: any(f.stat().st_size > two_seconds for f in out.glob("*.wav")),
            30,
            "2 s of audio on disk",
            lambda: [(f.name, f.stat().st_size) for f in out.glob("*.wav")],
        )
        recorder.send_signal(stop)
        _, stderr = recorder.communicate(timeout=30)
    finally:
        recorder.kill()
        player.kill()
    assert recorder.returncode == 130, stderr  # interrupted: a script does not go on to train
    (wav,) = out.glob("*.wav")
    assert 2.0 <= sf.info(str(wav)).duration < 600, sf.info(str(wav))
    with wave.open(str(wav)) as strict:  # the header's lengths were written
        assert strict.getnframes() >= 2 * 16000
    assert f"({said}); kept 1 file(s) in {out}" in stderr and "level good" in stderr, stderr


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))  # 1.5 s of audio
from soundsentry.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_ends_the_recording_in_one_line(pulse: str, tmp_path: Path) -> None:
    """The SD card fills during a chunk (no file may grow past 1.5 s of audio here): one line
    naming the file, what was kept and the free space, not a LibsndfileError traceback. The
    chunk cut short keeps the audio written before the failure, as Ctrl-C keeps it (it was
    deleted, with up to a minute of good audio)."""
    out = tmp_path / "rec"
    proc = record_with(
        FULL_DISK, pulse, "--seconds", "6", "--chunk-seconds", "2", "--out", str(out)
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("soundsentry: error: cannot write"), last
    assert "kept 1 file(s)" in last and "MB free there" in last, last
    (wav,) = out.glob("*.wav")
    assert 1.0 <= sf.info(str(wav)).duration <= 1.6, sf.info(str(wav))


STEREO_ONLY = """
import sys
import sounddevice as sd
real = sd.check_input_settings
def stereo_only(device=None, channels=None, *args, **kwargs):
    if channels == 1:  # as a USB microphone that captures in stereo only answers
        raise sd.PortAudioError("Invalid number of channels [PaErrorCode -9998]")
    return real(device, channels, *args, **kwargs)
sd.check_input_settings = stereo_only
from soundsentry.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_microphone_that_captures_stereo_only_is_opened_in_stereo(
    pulse: str, tmp_path: Path
) -> None:
    """Such a device failed with a raw PortAudio error (logged as a rate problem), and `record`
    could not be told otherwise. It is opened with the channels it offers, and `channel` (0
    unless set) picked from them. The real PulseAudio device is used; only its answer to a
    one-channel request is that of the stereo-only microphone."""
    proc = record_with(STEREO_ONLY, pulse, "--seconds", "2", "--out", str(tmp_path / "rec"))
    assert proc.returncode == 0, proc.stderr
    assert "does not capture 1 channel(s); opening its" in proc.stderr, proc.stderr
    (wav,) = (tmp_path / "rec").glob("*.wav")
    info = sf.info(str(wav))
    assert (info.channels, info.samplerate, round(info.duration, 1)) == (1, 16000, 2.0)


def test_a_channel_the_microphone_has_not_is_one_line(pulse: str, tmp_path: Path) -> None:
    """`record --channel 40` on a device of 32 channels printed PortAudio's C assertion twice,
    then a warning that it was "opening its 32 and taking channel 40", then the error naming
    `audio.channel` where the user typed --channel (a new user's walk-through)."""
    proc = cli(
        "record", "--seconds", "2", "--out", str(tmp_path / "rec"), "--device", "pulse",
        "--channel", "40", env={"PULSE_SOURCE": pulse}, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "channel 40 ([audio] channel, or --channel) is not among the" in lines[0], lines


def test_a_sound_server_that_is_not_there_is_named_not_the_microphone(tmp_path: Path) -> None:
    """With the sound server stopped, `pulse` is no device at all, and the one line said to
    plug in the microphone (a new user's walk-through, whose PulseAudio had stopped)."""
    proc = cli(
        "record", "--seconds", "2", "--out", str(tmp_path / "rec"), "--device", "pulse",
        env={"PULSE_SERVER": f"unix:{tmp_path / 'gone'}"}, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "'pulse' is the sound server's device" in lines[0], lines
    assert "`pactl info`" in lines[0], lines


def test_a_channel_beyond_audio_channels_names_the_setting_not_the_device(
    pulse: str, tmp_path: Path
) -> None:
    """Two machines on the two channels of one microphone: `channel = 1` without `channels`
    said that channel 1 "is not among the 1 channel(s) of 'pulse'", a device of 32, and doctor
    advised another device name (the two-machines review). The setting that is short is named."""
    config = tmp_path / "fan.toml"
    config.write_text('[audio]\ndevice = "pulse"\nchannel = 1\n')
    proc = cli("record", "--seconds", "2", "--out", str(tmp_path / "rec"), "--config",
               str(config), env={"PULSE_SOURCE": pulse}, check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    said = (r"channel 1 \(\[audio\] channel, or --channel\) is not among the 1 channel\(s\) "
            r"opened on 'pulse' \(\[audio\] channels = 1, of the \d+ it offers\): set \[audio\] "
            r"channels = 2$")  # fmt: skip
    assert re.search(said, line), line
    doctor = cli("doctor", "--config", str(config), env={"PULSE_SOURCE": pulse}, check=False)
    assert "fix: set [audio] channels and channel as the error says" in doctor.stdout
    config.write_text('[audio]\ndevice = "pulse"\nchannel = 1\nchannels = 2\n')
    player = play(pulse.removesuffix(".monitor"), DEMO_CLIP)
    try:
        cli("record", "--seconds", "2", "--out", str(tmp_path / "rec"), "--config",
            str(config), env={"PULSE_SOURCE": pulse})  # fmt: skip
        doctor = cli("doctor", "--config", str(config), env={"PULSE_SOURCE": pulse}, check=False)
    finally:
        player.kill()
    assert re.search(r"PASS audio device: .*, hearing channel 1 of 2$", doctor.stdout, re.M), (
        doctor.stdout
    )


def test_record_refuses_silence_with_a_reason(pulse: str, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[health]\nfault_seconds = 1\n")
    proc = cli(
        "record",
        "--seconds",
        "5",
        "--out",
        str(tmp_path / "rec"),
        "--device",
        "pulse",
        "--config",
        str(cfg),
        env={"PULSE_SOURCE": pulse},
        check=False,
    )
    assert proc.returncode == 1
    assert "input silence" in proc.stderr and "kept 0 complete chunk(s)" in proc.stderr
    assert not list((tmp_path / "rec").glob("*.wav"))


def test_doctor_passes_and_names_the_fix_when_the_broker_is_down(
    pulse: str, broker: Broker, tmp_path: Path
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'model = "{DEMO_BUNDLE}"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[audio]\ndevice = "pulse"\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
    )
    env = {"PULSE_SOURCE": pulse}
    player = play(pulse.removesuffix(".monitor"), DEMO_CLIP)
    try:
        ok = cli("doctor", "--config", str(cfg), env=env)
    finally:
        player.kill()
    for name in ("model", "audio device", "input level", "broker login", "clock", "data folder"):
        assert f"PASS {name}:" in ok.stdout, ok.stdout
    broker.stop()
    down = cli("doctor", "--config", str(cfg), env=env, check=False)
    assert down.returncode == 1
    assert f"FAIL broker: cannot reach 127.0.0.1:{broker.port}" in down.stdout
    assert "fix: check [mqtt] host and port" in down.stdout
    assert "FAIL input level: digital silence" in down.stdout  # nothing plays any more
    missing = cli("doctor", "--model", str(tmp_path / "none.bundle"), env=env, check=False)
    assert "FAIL model:" in missing.stdout and missing.returncode == 1


def test_capture_resamples_a_device_rate_the_model_does_not_use(
    pulse: str, broker: Broker, tmp_path: Path
) -> None:
    """A 44.1 kHz source: captured at 44.1 kHz, resampled to the model's 16 kHz, detected."""
    subprocess.run(
        ["pactl", "load-module", "module-null-sink", "sink_name=hifi", "rate=44100", "channels=2"],
        check=True,
        capture_output=True,
    )
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'device_id = "hifi"\ndata_dir = "{tmp_path / "data"}"\n'
        '[audio]\ndevice = "pulse"\nsamplerate = 44100\nchannels = 2\nchannel = -1\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
    )
    sub = Subscriber(broker.port, "soundsentry/hifi/events")
    player = play("hifi", DEMO_CLIP)
    daemon = subprocess.Popen(
        [
            *SOUNDSENTRY,
            "--log-level",
            "INFO",
            "run",
            "--model",
            str(DEMO_BUNDLE),
            "--config",
            str(cfg),
        ],
        cwd=ROOT,
        env={**os.environ, "PULSE_SOURCE": "hifi.monitor", "SOUNDSENTRY_DATA_DIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sub.wait_for(
            lambda _: any(m.json()["type"] == "start" for m in sub.on("/events")), timeout=30
        ), "no anomaly"
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=20)
        assert daemon.returncode == 0, err
        assert "at 44100 Hz, 2 channel(s)" in err
        starts = [json.loads(x) for x in out.splitlines() if '"start"' in x]
        assert starts and starts[0]["stream_offset_s"] >= 1.0, out
    finally:
        player.kill()
        daemon.kill()
        sub.close()


def test_doctor_counts_an_instance_per_microphone_as_the_service() -> None:
    """Read from `systemctl list-units --all --no-legend --plain soundsentry@*.service` as
    systemd prints it: an active instance passes; the fix names the template, not the single
    unit (which would fight the instance for the microphone)."""
    from edge.doctor import service_check

    lines = (
        "soundsentry@pump-3.service loaded active running SoundSentry detector (pump-3)\n"
        "soundsentry@fan-1.service loaded failed failed SoundSentry detector (fan-1)\n"
    )
    ok = service_check("inactive", lines)
    assert ok.ok is True and ok.detail == "soundsentry@pump-3.service active"
    failed = service_check("inactive", lines.splitlines()[1])
    assert failed.ok is False and "soundsentry@fan-1.service not active" in failed.detail
    assert "soundsentry@NAME" in failed.fix and "enable --now soundsentry`" not in failed.fix
    none = service_check("inactive", "")
    assert none.ok is False and none.detail == "soundsentry.service is inactive"


def test_doctor_does_not_blame_the_microphone_that_the_running_service_holds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """README step 6 runs doctor after step 5 started the service, which holds the USB mic;
    ALSA then leaves the busy device out of PortAudio's list. Doctor failed "No input device
    matching 'USB'" with the fix to list the inputs (which did not list it either). With a
    soundsentry unit running, a device it cannot open is skipped and the service named; with
    none, the failure stays. systemctl's answers are the only thing faked here: the device
    really cannot be opened."""
    from edge import doctor
    from edge.settings import Settings

    settings = Settings(device_id="t", data_dir=tmp_path, audio={"device": "no-such-mic-xyz"})
    answers = {"is-active": "active", "list-units": "", "show": "4242"}
    monkeypatch.setattr(doctor, "_run", lambda cmd: answers[cmd[1]])
    owners: set[int] | None = {4242}  # ALSA's proc files: the service's pid holds a capture
    monkeypatch.setattr(doctor, "_capture_owners", lambda: owners)
    for check in (doctor.check_audio_device, doctor.check_input_level):
        held = check(settings)
        assert held.ok is None, held
        assert "soundsentry.service is running and holds the microphone" in held.detail
        assert "`sudo systemctl stop soundsentry.service`" in held.detail
    owners = set()  # the service runs, deaf (its device unplugged): not "as it should"
    deaf = doctor.check_audio_device(settings)
    assert deaf.ok is False and "holds no microphone either" in deaf.detail, deaf
    assert "journalctl -u soundsentry.service" in deaf.fix
    owners = None  # no ALSA proc files to tell: the running service is given the benefit
    assert doctor.check_audio_device(settings).ok is None
    answers["is-active"] = "inactive"
    answers["list-units"] = "soundsentry@mic2.service loaded active running SoundSentry (mic2)"
    assert "soundsentry@mic2.service is running" in doctor.check_audio_device(settings).detail
    answers["list-units"] = ""
    failed = doctor.check_audio_device(settings)
    assert failed.ok is False and "no-such-mic-xyz" in failed.detail, failed
    assert "soundsentry devices" in failed.fix
    # a daemon run by hand on this data_dir (`soundsentry run` in another terminal) holds the
    # microphone as the service would: doctor said nothing of it, and advised another device
    from edge.service import hold_data_dir

    held_dir = hold_data_dir(tmp_path)
    try:
        owners = {os.getpid()}  # ALSA's proc files: it holds a capture stream
        for check in (doctor.check_audio_device, doctor.check_input_level):
            by_hand = check(settings)
            assert by_hand.ok is None, by_hand
            assert f"soundsentry pid {os.getpid()}, `" in by_hand.detail, by_hand
            assert "runs on this config's data_dir and holds the microphone" in by_hand.detail
        disk = doctor.check_disk(settings)
        assert disk.ok and f"in use by soundsentry pid {os.getpid()}" in disk.detail, disk
        owners = set()  # a replay, or a daemon running deaf: the device's failure stands
        assert doctor.check_audio_device(settings).ok is False
    finally:
        os.close(held_dir)
    assert doctor.check_audio_device(settings).ok is False  # let go: the failure is back
    assert "in use" not in doctor.check_disk(settings).detail


def test_doctor_fails_a_clock_timesyncd_has_not_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """doctor passed a clock 12 years ahead when `timedatectl` did not answer (the service's
    sandbox, a clock review): timesyncd's own file says whether it has set the clock."""
    import edge.clock
    from edge import doctor
    from edge.settings import Settings

    monkeypatch.setattr(doctor, "_run", lambda cmd: None)  # no timedated to ask
    timesync = tmp_path / "timesync"
    timesync.mkdir()
    monkeypatch.setattr(edge.clock, "TIMESYNCD", timesync)
    settings = Settings(device_id="t", data_dir=tmp_path)
    unset = doctor.check_clock(settings)
    assert unset.ok is False and "not synchronised with NTP" in unset.detail, unset
    assert "clips are kept by size only until it is" in unset.detail
    (timesync / "synchronized").touch()
    assert doctor.check_clock(settings).detail.endswith("NTP synchronised")
    timesync.joinpath("synchronized").unlink()
    timesync.rmdir()  # no timesyncd here: the clock is taken as it comes
    assert doctor.check_clock(settings).ok is True


def test_doctor_names_a_data_dir_that_is_a_file(tmp_path: Path) -> None:
    from edge.doctor import check_disk
    from edge.settings import Settings

    file = tmp_path / "notes.txt"
    file.write_text("x")
    for data_dir, detail in (
        (file, f"{file} is a file, not a folder"),
        (file / "soundsentry", f"{file / 'soundsentry'} cannot be created: {file} is a file"),
    ):
        check = check_disk(Settings(device_id="t", data_dir=data_dir))
        assert check.ok is False and check.detail == detail and "data_dir" in check.fix


def test_doctor_judges_the_instance_of_the_config_it_checks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`doctor --config /etc/soundsentry/pump-3.toml` passed the service check while pump-3's
    unit had failed (pump-4 ran), and skipped pump-3's unopenable microphone as "held" by
    pump-4, telling the user to stop the healthy instance. Only systemctl's answers are faked;
    the device really cannot be opened."""
    from edge import doctor
    from edge.settings import Settings

    settings = Settings(device_id="pump-3", data_dir=tmp_path,
                        audio={"device": "no-such-mic-xyz"})  # fmt: skip
    active = {"soundsentry@pump-4.service"}
    listed = "soundsentry@pump-4.service loaded active running SoundSentry (pump-4)\n"

    def systemctl(cmd: list[str]) -> str:
        if cmd[1] == "is-active":
            return "active" if cmd[2] in active else "failed"
        return listed

    monkeypatch.setattr(doctor, "_run", systemctl)
    token = doctor.UNIT.set(doctor.unit_for("/etc/soundsentry/pump-3.toml"))
    try:
        service = doctor.check_service(settings)
        assert service.ok is False and service.detail == "soundsentry@pump-3.service is failed"
        assert "enable --now soundsentry@pump-3.service" in service.fix
        mic = doctor.check_audio_device(settings)
        assert mic.ok is False and "no-such-mic-xyz" in mic.detail, mic
        active.add("soundsentry@pump-3.service")
        assert doctor.check_service(settings).ok is True
        held = doctor.check_audio_device(settings)
        assert held.ok is None and "soundsentry@pump-3.service is running" in held.detail
    finally:
        doctor.UNIT.reset(token)
    assert doctor.unit_for("/etc/soundsentry/config.toml") == "soundsentry.service"
    for own in (None, "/home/pi/site.toml", "deploy/config.example.toml"):  # any unit may run
        assert doctor.unit_for(own) is None, own


def test_a_second_recording_in_the_same_second_never_overwrites_the_first(tmp_path: Path) -> None:
    """Chunk names carry the second the recording began: two recordings in one second, or one
    after a Pi without a real-time clock booted with an earlier time, overwrote the first."""
    from edge.record import _new_chunk

    first = _new_chunk(tmp_path, "20261202T100000", 0)
    first.write_bytes(b"RIFF the first recording")
    second = _new_chunk(tmp_path, "20261202T100000", 0)
    assert second != first and second.name == "20261202T100000-0001.wav"
    assert first.read_bytes() == b"RIFF the first recording"


def test_the_level_verdict_leaves_a_dc_offset_out() -> None:
    """A microphone with a 2 % DC offset over a quiet machine was judged `level good` at -34
    dBFS while the live level (which removes the mean) showed -66."""
    import numpy as np

    from edge.record import LevelMeter

    rng = np.random.default_rng(0)
    meter = LevelMeter()
    for _ in range(10):
        meter.push((0.02 + 10 ** (-66 / 20) * rng.standard_normal(16000)).astype(np.float32))
    verdict = meter.verdict()
    assert verdict.startswith("level too quiet: -66."), verdict


NO_SECOND_FILE = """
import errno
import sys
import edge.record as rec
real, made = rec._new_chunk, []
def refuse_the_second(out, stamp, index):  # as a card with no inode or directory entry left
    if made:
        raise OSError(errno.ENOSPC, "No space left on device")
    made.append(real(out, stamp, index))
    return made[-1]
rec._new_chunk = refuse_the_second
from soundsentry.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_card_that_refuses_the_next_chunk_keeps_the_finished_one(
    pulse: str, tmp_path: Path
) -> None:
    """The error handler deleted the chunk named last, which after a chunk had been finished
    was that finished chunk: a card that could not take the next file lost the one before."""
    out = tmp_path / "rec"
    proc = record_with(
        NO_SECOND_FILE, pulse, "--seconds", "4", "--chunk-seconds", "2", "--out", str(out)
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "No space left on device; kept 1 file(s)" in last, last
    (wav,) = out.glob("*.wav")
    assert sf.info(str(wav)).duration == 2.0


def test_a_recording_under_nohup_survives_the_hangup() -> None:
    """The SIGHUP handler replaced the SIG_IGN that `nohup` sets: `nohup soundsentry record &`
    ended at logout."""
    from edge.record import _stopped_by_signals

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _stopped_by_signals():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


SERVICE_CONFIG_DIR = """
import os
import sys
import edge.doctor
from pathlib import Path
edge.doctor.CONFIG_DIR = Path(os.environ["TEST_CONFIG_DIR"])  # the service's /etc/soundsentry
from soundsentry.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_record_names_the_service_config_it_does_not_use(
    pulse: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --config, `record` took channel 0 and the default device whatever the service's
    config said: a model trained on another channel than the service listens with."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "config.toml").write_text("[audio]\nchannel = 1\nchannels = 2\n")
    monkeypatch.setenv("TEST_CONFIG_DIR", str(etc))
    out = tmp_path / "rec"
    proc = record_with(SERVICE_CONFIG_DIR, pulse, "--seconds", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    config = etc / "config.toml"
    assert f"not those of {config}; add --config {config}" in proc.stderr, proc.stderr
    proc = record_with(
        SERVICE_CONFIG_DIR, pulse, "--seconds", "1", "--out", str(out), "--config", str(config)
    )
    assert proc.returncode == 0, proc.stderr
    assert "note: recording with the default" not in proc.stderr, proc.stderr


def test_doctor_fails_model_settings_the_daemon_would_refuse(tmp_path: Path) -> None:
    """`[detector] trigger_windows = 6` with a bundle calibrated for 3 of 4: the daemon's start
    refused it and the service retried for ever, while doctor passed the model."""
    from edge.bundle import load_bundle
    from edge.doctor import check_model
    from edge.settings import Settings

    good = check_model(Settings(device_id="t", data_dir=tmp_path, model=DEMO_BUNDLE))
    assert good.ok is True, good
    demo = load_bundle(DEMO_BUNDLE)
    threshold, k, n = (
        demo.threshold,
        demo.manifest.threshold.params["k"],
        demo.manifest.threshold.params["n"],
    )
    assert f"threshold {threshold:.4g}, {k} of {n} windows)" in good.detail, good.detail
    # what the daemon runs, not the bundle's figure (shown beside it)
    override = check_model(Settings(device_id="t", data_dir=tmp_path, model=DEMO_BUNDLE,
                                    detector={"threshold": 1.5, "trigger_windows": 2}))  # fmt: skip
    assert override.ok is True, override
    assert (
        f"threshold 1.5, 2 of {n} windows, set in [detector]; the bundle's: {threshold:.4g}, "
        f"{k} of {n}" in override.detail
    ), override.detail
    bad = check_model(Settings(device_id="t", data_dir=tmp_path, model=DEMO_BUNDLE,
                               detector={"trigger_windows": 6}))  # fmt: skip
    assert bad.ok is False and "must not exceed" in bad.detail and "[detector]" in bad.fix


def test_doctor_says_where_a_relative_model_path_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`model = "fan.bundle"` passed doctor run in the bundle's folder and failed the service,
    which runs in its state folder, with "fan.bundle: no such model bundle" naming no folder (a
    new user's walk-through). Doctor now names the folder it read, and the service's for a
    config of /etc/soundsentry."""
    from edge.doctor import UNIT, check_model
    from edge.settings import Settings

    shutil.copytree(DEMO_BUNDLE, tmp_path / "fan.bundle")
    monkeypatch.chdir(tmp_path)
    s = Settings(device_id="t", data_dir=tmp_path / "data", model=Path("fan.bundle"))
    here = check_model(s)
    assert here.ok is True and f"read from the folder a command runs in (here {tmp_path};" in (
        here.detail
    ), here.detail
    token = UNIT.set("soundsentry.service")  # the config in /etc/soundsentry: the unit's folder
    try:
        service = check_model(s)
    finally:
        UNIT.reset(token)
    assert service.ok is False, service
    assert "soundsentry.service reads /var/lib/soundsentry/fan.bundle" in service.detail, service
    assert service.fix.startswith("write the bundle's absolute path in `model`"), service.fix
    # found where it is read, and damaged: the fix is the damage's, not the path's (a field test)
    broken = tmp_path / "fan.bundle" / "arrays.npz"
    broken.write_bytes(broken.read_bytes()[:-10])
    damaged = check_model(s)
    assert damaged.ok is False and "checksum" in damaged.detail, damaged
    assert "absolute path" not in (damaged.fix or ""), damaged.fix


def test_doctor_judges_the_input_level_as_the_daemon_would() -> None:
    """A stuck DC level, NaN samples and a level below the noise floor all passed."""
    from edge.doctor import level_check

    rng = np.random.default_rng(0)
    noise = rng.standard_normal(32000).astype(np.float32)
    verdicts = {
        "good": level_check(0.05 * noise, 0.01),
        "dc": level_check(np.full(32000, 0.01, np.float32), 0.01),
        "nan": level_check(np.full(32000, np.nan, np.float32), 0.01),
        "quiet": level_check(5e-4 * noise, 0.01),  # -66 dBFS
        "clipped": level_check(np.clip(4 * noise, -1, 1), 0.01),
    }
    assert verdicts["good"].ok is True, verdicts["good"]
    assert verdicts["dc"].ok is False and "flat line" in verdicts["dc"].detail
    assert verdicts["nan"].ok is False and "invalid samples" in verdicts["nan"].detail
    assert verdicts["quiet"].ok is False and "too quiet" in verdicts["quiet"].detail
    assert verdicts["clipped"].ok is False and "clip" in verdicts["clipped"].detail
    # against the model's off level: a machine trained this quietly passes, one below it not
    assert level_check(5e-4 * noise, 0.01, off_below_dbfs=-75.0).ok is True
    off = level_check(5e-4 * noise, 0.01, off_below_dbfs=-60.0)
    assert off.ok is False and "counts the machine as off" in off.detail, off


def test_doctor_checks_the_dashboard_as_the_daemon_starts_it(tmp_path: Path) -> None:
    """[web] was never checked: a missing token file or a taken port stopped the start (or
    left the page away) while doctor said nothing."""
    import socket

    from edge.doctor import check_web
    from edge.settings import Settings

    def web(**kw: Any) -> Any:
        return check_web(Settings(device_id="t", data_dir=tmp_path, web={"enabled": True, **kw}))

    assert check_web(Settings(device_id="t", data_dir=tmp_path)).ok is None
    missing = web(host="0.0.0.0", token_file=str(tmp_path / "token"))
    assert missing.ok is False and "not found" in missing.detail, missing
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = web(port=port)
        assert busy.ok is False and f"cannot listen on 127.0.0.1:{port}" in busy.detail, busy
    free = web(port=port)
    assert free.ok is True and "is free" in free.detail, free


def test_doctor_tells_this_device_s_dashboard_from_another_s_on_its_port(tmp_path: Path) -> None:
    """Every dashboard says `Server: SoundSentry`: a second config copied from the first kept
    its [web] port, and doctor passed the first device's page as the second's (in a review).
    It now asks the page whose it is, with the config's token."""
    import socket

    from conftest import DEMO_BUNDLE

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.doctor import check_web
    from edge.settings import Settings
    from edge.web.server import Dashboard

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tokens = {}
    for name in ("a", "b"):
        tokens[name] = tmp_path / f"token-{name}"
        tokens[name].write_text(name * 32 + "\n")

    def settings(device_id: str, token: str) -> Settings:
        web = {"enabled": True, "port": port, "token_file": str(tokens[token])}
        return Settings(device_id=device_id, data_dir=tmp_path / device_id, web=web)

    running = settings("pump-3", "a")
    dashboard = Dashboard(running)
    dashboard.start(Detector(running, load_bundle(DEMO_BUNDLE), []), lambda payload: None)
    try:
        own = check_web(running)
        assert own.ok is True and "served by this soundsentry" in own.detail, own
        copied = check_web(settings("pump-4", "a"))
        assert copied.ok is False and "another soundsentry (pump-3)" in copied.detail, copied
        assert "its own [web] port" in copied.fix
        other = check_web(settings("pump-4", "b"))
        assert other.ok is False and "refuses this config's token" in other.detail, other
    finally:
        dashboard.stop()


def test_doctor_on_a_manifest_without_a_sample_rate_names_it(tmp_path: Path) -> None:
    """A bundle whose manifest (checksum valid) left `samplerate` out stopped doctor with
    `KeyError: 'samplerate'` before any check was printed (in a review)."""
    import json
    import shutil

    from conftest import DEMO_BUNDLE

    from edge.bundle import MANIFEST, manifest_checksum
    from edge.doctor import _model_rate, check_model
    from edge.settings import Settings

    bundle = shutil.copytree(DEMO_BUNDLE, tmp_path / "fan.bundle")
    data = json.loads((bundle / MANIFEST).read_text())
    del data["features"]["samplerate"]
    data["checksum"] = manifest_checksum(data)
    (bundle / MANIFEST).write_text(json.dumps(data))
    settings = Settings(device_id="t", model=bundle, data_dir=tmp_path / "data")
    assert _model_rate(settings) == 16000
    check = check_model(settings)
    assert check.ok is False and "missing feature parameters ['samplerate']" in check.detail


def test_doctor_asked_on_every_address_does_not_pass_another_device_s_loopback_page(
    tmp_path: Path,
) -> None:
    """A config listening on every address (0.0.0.0) asked the port's page with `Host:
    0.0.0.0`; another device's loopback page refused that host name (403) without a device_id,
    which doctor read as an older release of this one, and passed (in a review)."""
    import socket
    import threading

    from conftest import DEMO_BUNDLE

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.doctor import check_web
    from edge.settings import Settings
    from edge.web import server
    from edge.web.server import Dashboard

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = tmp_path / "token"
    token.write_text("m" * 32 + "\n")
    running = Settings(device_id="dev1", data_dir=tmp_path / "dev1", web={"enabled": True,
                       "port": port})  # fmt: skip
    dashboard = Dashboard(running)
    dashboard.start(Detector(running, load_bundle(DEMO_BUNDLE), []), lambda payload: None)
    try:
        web = {"enabled": True, "port": port, "host": "0.0.0.0", "token_file": str(token)}
        mine = check_web(Settings(device_id="mine", data_dir=tmp_path / "mine", web=web))
        assert mine.ok is False and "another soundsentry (dev1)" in mine.detail, mine
        # that request's thread gives its slot back after the reply: into the semaphore below,
        # if it had not yet (a fresh-clone run's flake), and the "busy" page then answered
        wait_for(lambda: not dashboard._server.per_address, 10, "the first request to end")
        # its every connection taken (phones left open): busy, not another device's page
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(server, "MAX_CONNECTIONS", 0)
            patch.setattr(dashboard._server, "slots", threading.BoundedSemaphore(1))
            dashboard._server.slots.acquire()
            busy = check_web(Settings(device_id="mine", data_dir=tmp_path / "mine", web=web))
        assert busy.ok is False and "too busy to say whose" in busy.detail, busy
    finally:
        dashboard.stop()


def test_doctor_checks_a_unit_s_config_inside_the_unit_s_walls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run by hand as the README says, doctor read the data folder under the user's home
    (the unit's STATE_DIRECTORY unset), passed a data_dir the unit may not write and a model
    under /home that ProtectHome=yes hides from the service (in a review)."""
    import edge.doctor as doctor
    from edge.settings import Settings, load_settings

    monkeypatch.setattr(doctor, "CONFIG_DIR", tmp_path)
    for name in ("STATE_DIRECTORY", "SOUNDSENTRY_DATA_DIR"):
        monkeypatch.setenv(name, "")  # recorded, so what the test sets is undone after it
        monkeypatch.delenv(name)
    config = tmp_path / "pump-3.toml"
    config.write_text('device_id = "pump-3"\n')
    doctor.service_environment(config)
    assert load_settings(config).data_dir == Path("/var/lib/soundsentry/pump-3")
    token = doctor.UNIT.set(doctor.unit_for(config))
    try:
        elsewhere = doctor.check_disk(Settings(device_id="pump-3", data_dir=tmp_path / "usb"))
        assert elsewhere.ok is False, elsewhere
        assert "cannot be written by soundsentry@pump-3.service" in elsewhere.detail
        assert 'data_dir = "/var/lib/soundsentry/pump-3"' in elsewhere.fix
        home = doctor.check_model(Settings(device_id="pump-3", model="/home/pi/fan.bundle"))
        assert home.ok is False and "ProtectHome=yes" in home.detail, home
    finally:
        doctor.UNIT.reset(token)
    by_hand = doctor.check_disk(Settings(device_id="pump-3", data_dir=tmp_path / "usb"))
    assert by_hand.ok is True, by_hand  # a config of one's own: no unit's walls


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a folder away: root only")
def test_doctor_finds_a_model_behind_a_folder_the_service_cannot_enter(tmp_path: Path) -> None:
    """Run as root, doctor checked the bundle's own files for the service's user but not the
    folders above it: a bundle inside root's 0700 folder passed (in a review)."""
    import tempfile

    from edge.doctor import check_model
    from edge.settings import Settings

    base = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own tmp folders are 0700: not there
    base.chmod(0o755)
    data = base / "data"
    data.mkdir()
    locked = base / "locked"
    locked.mkdir(mode=0o700)
    shutil.copytree(DEMO_BUNDLE, locked / "fan.bundle")
    for path in [locked / "fan.bundle", *(locked / "fan.bundle").iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # the bundle itself readable by all
    os.chown(data, 65534, 65534)  # the service's user owns the data folder
    try:
        check = check_model(Settings(device_id="t", data_dir=data, model=locked / "fan.bundle"))
    finally:
        os.chown(data, 0, 0)
        shutil.rmtree(base)
    assert check.ok is False and f"{locked} cannot be entered by nobody" in check.detail, check


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a folder away: root only")
def test_doctor_finds_root_s_files_in_the_service_s_folder_and_a_card_too_small(
    tmp_path: Path,
) -> None:
    """`sudo soundsentry run` leaves root's .lock in the service's folder: the service cannot
    open it, and doctor passed the folder. Clips allowed more than the card holds passed too."""
    from edge.doctor import check_disk
    from edge.settings import Settings

    folder = tmp_path / "data"
    folder.mkdir()
    assert check_disk(Settings(device_id="t", data_dir=folder)).ok is True
    lock = folder / ".lock"
    lock.write_text("1\n")
    os.chown(folder, 65534, 65534)  # the folder is another user's; its .lock stays root's
    try:
        stale = check_disk(Settings(device_id="t", data_dir=folder))
    finally:
        os.chown(folder, 0, 0)
    assert stale.ok is False and ".lock belongs to root" in stale.detail, stale
    assert f"sudo chown -R nobody: {folder}" in stale.fix
    huge = check_disk(Settings(device_id="t", data_dir=folder, clips={"max_total_mb": 1e9}))
    assert huge.ok is False and "the card fills before the clips' limit" in huge.detail, huge
    # a folder the daemon will create: the same room to check (it passed, in a review)
    future = folder / "new" / "data"
    huge = check_disk(Settings(device_id="t", data_dir=future, clips={"max_total_mb": 1e9}))
    assert huge.ok is False and "the card fills before the clips' limit" in huge.detail, huge
    assert check_disk(Settings(device_id="t", data_dir=future)).ok is True


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a folder away: root only")
def test_doctor_finds_a_model_the_service_s_user_cannot_read(tmp_path: Path) -> None:
    """`sudo cp -r` under a hardened umask (027) gives root a 0640 bundle the service cannot
    read; doctor run as root passed it, and run as the service's user it said to copy the
    bundle where it already was."""
    import tempfile

    from edge.doctor import check_model
    from edge.settings import Settings

    base = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own tmp folders are 0700: not there
    base.chmod(0o755)
    data, model = base / "data", base / "models" / "fan.bundle"
    data.mkdir()
    shutil.copytree(DEMO_BUNDLE, model)
    os.chmod(model.parent, 0o755)
    os.chmod(model, 0o750)
    for f in model.iterdir():
        os.chmod(f, 0o640)
    os.chown(data, 65534, 65534)  # the service's user (nobody here) owns its data folder
    settings = Settings(device_id="t", data_dir=data, model=model)
    locked = check_model(settings)
    assert locked.ok is False and "is not readable by nobody" in locked.detail, locked
    assert locked.fix == f"give it to the daemon's user: sudo chown -R nobody: {model}"
    for f in [model, *model.iterdir()]:
        os.chown(f, 65534, 65534)
    try:
        assert check_model(settings).ok is True
    finally:
        shutil.rmtree(base)


def test_doctor_reads_who_holds_a_capture_stream(tmp_path: Path) -> None:
    """ALSA's proc files: an open capture substream names its owner; a closed one does not."""
    from edge.doctor import _capture_owners

    for card, pcm, status in (
        ("card1", "pcm0c", "state: RUNNING\nowner_pid   : 4242\ntrigger_time: 1.0\n"),
        ("card2", "pcm0c", "closed\n"),
        ("card1", "pcm0p", "state: RUNNING\nowner_pid   : 999\n"),  # playback: not a mic
    ):
        sub = tmp_path / card / pcm / "sub0"
        sub.mkdir(parents=True)
        (sub / "status").write_text(status)
    assert _capture_owners(tmp_path) == {4242}
    assert _capture_owners(tmp_path / "absent") is None


def test_doctor_fails_a_service_started_but_not_enabled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`systemctl start` without `enable`: active now, gone after the next power cut."""
    from edge import doctor
    from edge.settings import Settings

    answers = {"is-active": "active", "is-enabled": "disabled"}
    monkeypatch.setattr(doctor, "_run", lambda cmd: answers[cmd[1]])
    settings = Settings(device_id="t", data_dir=tmp_path)
    started = doctor.check_service(settings)
    assert started.ok is False and "not enabled" in started.detail, started
    assert started.fix == "`sudo systemctl enable soundsentry.service`"
    answers["is-enabled"] = "enabled"
    assert doctor.check_service(settings).ok is True


class _ScriptedMic:
    """A microphone that plays a script: blocks of noise, and AudioGap marks where the real
    one lost audio (dropped blocks, a reopened device), counted as it counts them."""

    def __init__(self, script: list[object]) -> None:
        self.script = script
        self.counts = {"dropped": 0, "overflows": 0, "queue_depth": 0, "reopens": 0}

    def __iter__(self) -> Iterator[object]:
        rng = np.random.default_rng(0)
        for item in self.script:
            if isinstance(item, AudioGap):
                self.counts["reopens" if item.reopened else "dropped"] += 1
                yield item
            elif item == "ctrl-c":  # the user ends the recording here
                raise KeyboardInterrupt
            elif isinstance(item, tuple) and item[0] == "flicker":  # a dead converter:
                # blocks of digital silence and of one constant level, by turns
                for i in range(round(float(item[1]) * 10)):
                    yield np.full(1600, (i % 2) / 32768, np.float32)
            elif isinstance(item, tuple) and item[0] == "full":  # saturated: at full scale
                for _ in range(round(float(item[1]) * 10)):
                    yield np.where(np.arange(1600) % 2, 1.0, -1.0).astype(np.float32)
            elif isinstance(item, tuple):  # ("silence", seconds): a dead input
                for _ in range(round(float(item[1]) * 10)):
                    yield np.zeros(1600, np.float32)
            else:  # seconds of noise in 0.1-s blocks
                for _ in range(round(float(item) * 10)):
                    yield (0.05 * rng.standard_normal(1600)).astype(np.float32)

    def stop(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return self.counts


def test_a_gap_in_the_audio_ends_a_file_so_none_splices_across_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gap marks were skipped: one continuous-looking 15-s file held a splice where blocks
    were dropped and another where the device was reopened, and the advice named the load
    even for a device that had been lost."""
    from edge import record as recording
    from edge.settings import load_settings

    script = [5.0, AudioGap(), 5.0, AudioGap(reopened=True), 5.0]
    monkeypatch.setattr(recording, "MicSource", lambda *a, **k: _ScriptedMic(script))
    err = io.StringIO()
    files = recording.record(load_settings(None), 15.0, tmp_path / "rec", 60.0, 16000, err)
    assert [round(sf.info(str(f)).duration, 1) for f in files] == [5.0, 5.0, 5.0]
    said = err.getvalue()
    assert "2 file(s) end where audio was lost" in said, said
    assert "check its cable and power" in said and "less load" in said, said


def test_record_keeps_no_chunk_that_holds_only_the_input_it_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks shorter than [health] fault_seconds: complete chunks of digital silence were
    kept before the fault was said, and `train` then refused the whole folder (a review)."""
    from edge import record as recording
    from edge.record import RecordingRefusedError
    from edge.settings import load_settings

    script = [4.0, ("silence", 12.0)]
    monkeypatch.setattr(recording, "MicSource", lambda *a, **k: _ScriptedMic(script))
    with pytest.raises(
        RecordingRefusedError, match=r"kept 2 complete chunk\(s\) \(deleted 2 holding only digital"
    ):
        recording.record(load_settings(None), 16.0, tmp_path / "rec", 2.0, 16000, io.StringIO())
    kept = sorted((tmp_path / "rec").glob("*.wav"))
    assert len(kept) == 2
    assert all(np.abs(sf.read(str(f))[0]).max() > 0 for f in kept), "the machine's, not silence"
    # a silence whose blocks drop now and then (each short silent chunk is deleted at the gap):
    # the machine's chunks before it stay (they were deleted too, in a second review)
    script = [4.0] + [("silence", 0.5), AudioGap()] * 9 + [("silence", 1.0)]
    monkeypatch.setattr(recording, "MicSource", lambda *a, **k: _ScriptedMic(script))
    with pytest.raises(RecordingRefusedError, match=r"kept 2 complete chunk\(s\)$"):
        recording.record(load_settings(None), 60.0, tmp_path / "gaps", 2.0, 16000, io.StringIO())
    assert len(list((tmp_path / "gaps").glob("*.wav"))) == 2


def test_a_recording_stopped_within_a_silence_keeps_no_silent_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped before the health check's 5 s had judged the silence (the microphone not picked
    with --device, and Ctrl-C at 2.6 s), `record` kept a chunk of digital silence, and `train`
    then refused the whole folder, the user's earlier good recordings with it (a new-user
    review). A silent chunk completed inside a short silence is not kept either, and the
    audio goes on being recorded."""
    from conftest import NORMAL_FILES

    from edge import record as recording
    from edge.record import RecordingRefusedError
    from edge.settings import load_settings

    out = tmp_path / "rec"
    out.mkdir()
    earlier = [shutil.copy(f, out / f"earlier-{i}.flac") for i, f in enumerate(NORMAL_FILES)]
    monkeypatch.setattr(
        recording, "MicSource", lambda *a, **k: _ScriptedMic([("silence", 2.6), "ctrl-c"])
    )
    err = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        recording.record(load_settings(None), 20.0, out, 60.0, 16000, err)
    assert sorted(out.iterdir()) == sorted(map(Path, earlier)), sorted(out.iterdir())
    assert "kept 0 file(s)" in err.getvalue(), err.getvalue()
    assert "deleted 1 holding only digital silence" in err.getvalue(), err.getvalue()
    cli("train", "--normal", str(out), "--out", str(tmp_path / "m.bundle"))  # the folder trains

    # 2-s chunks, a 3-s dropout of the input between sound: the chunk wholly inside it goes
    script = [3.0, ("silence", 3.0), 6.0]
    monkeypatch.setattr(recording, "MicSource", lambda *a, **k: _ScriptedMic(script))
    err = io.StringIO()
    files = recording.record(load_settings(None), 10.0, tmp_path / "short", 2.0, 16000, err)
    assert len(files) == 5 and sorted(files) == sorted((tmp_path / "short").iterdir()), files
    assert all(np.ptp(sf.read(str(f))[0]) > 0.01 for f in files), "no silent chunk"
    assert sum(sf.info(str(f)).duration for f in files) == pytest.approx(10.0), files
    assert "deleted 1 holding only digital silence" in err.getvalue(), err.getvalue()
    # input that the health check takes for no fault, but that every chunk of is unusable:
    # refused once it spans fault_seconds (it was recorded again and again, without end)
    script = [2.0, ("flicker", 60.0)]
    monkeypatch.setattr(recording, "MicSource", lambda *a, **k: _ScriptedMic(script))
    with pytest.raises(RecordingRefusedError, match=r"input unusable: \d+ s of it held only"):
        recording.record(load_settings(None), 10.0, tmp_path / "dead", 2.0, 16000, io.StringIO())
    assert len(list((tmp_path / "dead").glob("*.wav"))) == 1  # the 2 s of sound before it
    # saturated, stopped before the health check's 5 s: `train` refuses it as well
    monkeypatch.setattr(
        recording, "MicSource", lambda *a, **k: _ScriptedMic([("full", 3.0), "ctrl-c"])
    )
    err = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        recording.record(load_settings(None), 20.0, tmp_path / "full", 60.0, 16000, err)
    assert not list((tmp_path / "full").glob("*.wav")), "a saturated chunk was kept"
    assert "deleted 1 holding only digital silence, a flat line or saturated" in err.getvalue()
    # judged on the samples as the file holds them (16-bit), as `train` reads them: a range
    # of 1.001e-4 is written as 3 steps (9.2e-5), below train's 1e-4
    from edge.audio_io import SoundSummary
    from edge.record import as_written

    for peak, refused in ((1.001e-4, True), (1.3e-4, False)):
        judged = SoundSummary()
        judged.add(as_written(np.array([0.0, peak], np.float32)))
        assert (judged.refusal() is not None) is refused, peak
    path = tmp_path / "edge.wav"  # and as written and read back (what `train` reads)
    sf.write(str(path), np.array([0.0, 1.001e-4] * 8000, np.float32), 16000, subtype="PCM_16")
    back = sf.read(str(path), dtype="float32")[0]
    assert np.array_equal(back, as_written(np.array([0.0, 1.001e-4] * 8000, np.float32)))
    # a silence between two losses of audio (a file ends at each): that file goes too
    script = [3.0, AudioGap(), ("silence", 2.0), AudioGap(), 5.0]
    monkeypatch.setattr(recording, "MicSource", lambda *a, **k: _ScriptedMic(script))
    err = io.StringIO()
    files = recording.record(load_settings(None), 10.0, tmp_path / "gaps", 60.0, 16000, err)
    assert [round(sf.info(str(f)).duration) for f in files] == [3, 5], files
    assert "deleted 1 holding only digital silence" in err.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--seconds", "0.00001"], "--seconds: must be at least 1"),
        (["--seconds", "10", "--chunk-seconds", "0.00001"], "--chunk-seconds: must be from 2"),
        (["--seconds", "10", "--chunk-seconds", "200000"], "to 3600"),
        (["--seconds", "10", "--channel", "-1"], "--channel: must be a channel number from 0"),
        (
            ["--seconds", "10", "--channel", "64"],
            "--channel: must be a channel number from 0 to 63",
        ),
    ],
)
def test_record_refuses_lengths_that_make_no_usable_file(
    tmp_path: Path, args: list[str], said: str
) -> None:
    """--seconds 0.00001 ended in a ZeroDivisionError traceback and a header-only WAV that
    training refuses; chunks of a block each were all shorter than a window; a chunk of days
    passes the 4 GB a plain WAV's sizes can say."""
    proc = cli("record", "--out", str(tmp_path / "rec"), *args, check=False)
    assert proc.returncode == 1 and said in proc.stderr, proc.stderr
    assert not (tmp_path / "rec").exists() or not list((tmp_path / "rec").iterdir())


def test_record_with_a_device_that_matches_nothing_leaves_no_folder(tmp_path: Path) -> None:
    """A typo in --device was one clear line, but left an empty folder behind."""
    out = tmp_path / "pump-normal"
    proc = cli("record", "--seconds", "10", "--out", str(out), "--device", "no-such-mic-7",
               check=False)  # fmt: skip
    assert proc.returncode == 1 and "no-such-mic-7" in proc.stderr, proc.stderr
    assert not out.exists()
