"""The terminal, through the real `soundsentry` command: the live line of `run` on a TTY, the
summary that ends `replay`, `devices`, `doctor` without a device, `record`'s verdict on the
level, one-line errors for missing extras, and `events` from the local event log."""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
import pty
import select
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import (
    ANOMALOUS_FILE,
    DEMO_BUNDLE,
    DEMO_CLIP,
    NORMAL_FILES,
    ROOT,
    SOUNDSENTRY,
    cli,
    ensure_pulse,
    wait_for,
)
from test_site_tools import play

from edge.bundle import load_bundle
from edge.console import CLEAR
from edge.eventlog import (
    LOG_NAME,
    EventLog,
    EventLogSink,
    LoggedEvent,
    format_event,
    local_time,
    parse_since,
    read_events,
    write_csv,
)
from edge.messages import EventMessage
from edge.record import (
    CLOCK_DRIFT,
    GAP_TOLERANCE_S,
    LOUD_PEAK_DBFS,
    QUIET_DBFS,
    Timeline,
    gap_note,
    level_verdict,
)

DEMO_THRESHOLD = load_bundle(DEMO_BUNDLE).threshold
_SINKS = itertools.count()


@pytest.fixture
def sink(pulse: str) -> Iterator[str]:
    """A PulseAudio null sink of this test's own: audio that other tests play into the shared
    sink cannot leak into what this one hears. Its monitor is `{sink}.monitor`."""
    ensure_pulse()  # a test before may have taken it away
    name = f"terminal{os.getpid()}x{next(_SINKS)}"
    module = subprocess.run(
        ["pactl", "load-module", "module-null-sink", f"sink_name={name}", "rate=16000"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    yield name
    subprocess.run(["pactl", "unload-module", module], capture_output=True)


def _summary(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.startswith("replay: ")]
    assert len(lines) == 1, stderr
    return lines[0]


# --- replay ---------------------------------------------------------------------------------


def test_a_replay_stopped_by_ctrl_c_says_so_and_exits_130(tmp_path: Path) -> None:
    """It ended with its summary and exit 0, read as a finished run by a script, though it had
    heard 8 windows of the first of three files (a review). `record` exits 130 as well."""
    err = tmp_path / "stderr.txt"
    files = [str(DEMO_CLIP), str(ANOMALOUS_FILE)]
    args = [*SOUNDSENTRY, "--log-level", "INFO", "replay", str(DEMO_BUNDLE), *files, "--realtime"]
    with open(err, "w") as fh:
        proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=fh,
            env={**os.environ, "SOUNDSENTRY_DATA_DIR": str(tmp_path / "data")},
            cwd=ROOT,
        )
    try:
        wait_for(lambda: "machine running" in err.read_text(), 60, "the first window")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130, err.read_text()
    finally:
        proc.kill()
    line = _summary(err.read_text())
    assert line.startswith("replay: 2 file(s), "), line
    assert line.endswith("; stopped (Ctrl-C or SIGTERM) before the audio ended"), line


def test_only_a_stop_before_the_audio_ends_cuts_a_run_short(tmp_path: Path) -> None:
    """A stop that comes while a finished run closes its events (or flushes the broker) is no
    replay cut short: it exits 0 (a review). One mid-stream is."""
    from detector_helpers import Recorder

    from edge.daemon import Detector
    from edge.pipeline import Step
    from edge.settings import Settings
    from edge.sources import FileSource

    bundle = load_bundle(DEMO_BUNDLE)
    rate = bundle.features.samplerate

    class StopAtTheEnd(Recorder):
        def event(self, message: EventMessage) -> None:
            super().event(message)
            if message.ended_by == "end_of_stream":  # finish() closing the open event
                detector.stop()

    from edge.audio_io import read_audio

    clip = tmp_path / "ends-in-a-fault.wav"  # the event still open when the audio ends
    sf.write(clip, read_audio(DEMO_CLIP, rate)[: int(10.5 * rate)], rate, subtype="FLOAT")
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data")
    sink = StopAtTheEnd()
    detector = Detector(settings, bundle, [sink], live=False)  # as replay runs it
    detector.run(FileSource([clip], rate))
    assert [e.ended_by for e in sink.events][-1] == "end_of_stream"  # the stop came then
    assert not detector.cut_short
    early = Detector(settings, bundle, [Recorder()], on_step=lambda _: early.stop(), live=False)
    early.run(FileSource([DEMO_CLIP], rate))
    assert early.cut_short and early.windows < 5

    def at_the_last_window(step: Step) -> None:
        if step.end_s >= 10.5 - 1e-6:
            last.stop()

    last = Detector(settings, bundle, [Recorder()], on_step=at_the_last_window, live=False)
    last.run(FileSource([clip], rate))  # stopped with the last block: nothing was left
    assert last.windows == 20 and not last.cut_short


def test_replay_ends_with_a_summary_even_when_it_finds_nothing(tmp_path: Path) -> None:
    env = {"SOUNDSENTRY_DATA_DIR": str(tmp_path)}
    quiet = cli("replay", str(DEMO_BUNDLE), *map(str, NORMAL_FILES), env=env)
    assert quiet.stdout == ""  # no event
    line = _summary(quiet.stderr)
    assert f"replay: {len(NORMAL_FILES)} file(s), " in line and ", 0 events, " in line
    assert line.endswith(f"vs threshold {DEMO_THRESHOLD:.4g} (below)"), line
    loud = cli("replay", str(DEMO_BUNDLE), str(DEMO_CLIP), env=env)
    events = [json.loads(x) for x in loud.stdout.splitlines()]  # stdout: JSON lines only
    line = _summary(loud.stderr)
    assert ", 1 event, " in line and line.endswith("(above)"), line
    highest = float(line.split("highest score ")[1].split()[0])
    peak = next(e["peak_score"] for e in events if e["type"] == "end")
    assert highest == pytest.approx(peak, rel=1e-3)  # the event's peak is the highest window
    windows = int(line.split(" windows")[0].rsplit(" ", 1)[1])
    seconds = sf.info(str(DEMO_CLIP)).duration
    assert windows == int((seconds - 1.0) / 0.5) + 1  # 1-s windows every 0.5 s
    sf.write(tmp_path / "silent.wav", np.zeros(3 * 16000, np.float32), 16000)
    line = _summary(cli("replay", str(DEMO_BUNDLE), str(tmp_path / "silent.wav"), env=env).stderr)
    assert line.startswith("replay: 1 file(s), 5 windows, 0 events, none judged"), line  # not
    # "5 windows, ..., no window scored"


# --- run on a terminal ----------------------------------------------------------------------


@pytest.mark.slow
def test_run_on_a_terminal_shows_a_live_line_and_prints_events_above_it(
    sink: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[audio]\ndevice = "pulse"\n')
    player = play(sink, DEMO_CLIP)
    master, slave = pty.openpty()
    daemon = subprocess.Popen(
        [*SOUNDSENTRY, "run", "--model", str(DEMO_BUNDLE), "--config", str(cfg)],
        cwd=ROOT,
        env={
            **os.environ,
            "PULSE_SOURCE": f"{sink}.monitor",
            "SOUNDSENTRY_DATA_DIR": str(tmp_path),
        },
        stdout=slave,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(slave)
    seen = bytearray()

    def read() -> str:
        while select.select([master], [], [], 0)[0]:
            try:
                seen.extend(os.read(master, 65536))
            except OSError:
                break
        return seen.decode(errors="replace")

    try:
        wait_for(lambda: read().count(CLEAR + "level") >= 3, 20, "three live lines", read)
        wait_for(lambda: '"type": "start"' in read(), 30, "an event on the terminal", read)
        daemon.send_signal(signal.SIGTERM)
        _, logs = daemon.communicate(timeout=20)
        assert daemon.returncode == 0, logs
    finally:
        player.kill()
        daemon.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    live = text.split(CLEAR + "level")[2].split("\r")[0]
    assert "dBFS  score" in live and f"/ {DEMO_THRESHOLD:.4g} [" in live, live
    assert live.rstrip().split()[-1] in {"normal", "anomaly", "starting"}, live
    assert CLEAR + '{"type": "start"' in text  # the line was cleared before the event
    # INFO from the config's log_level (its default) without --log-level: the service's log
    assert "capture: device 'pulse'" in logs and "anomaly start" in logs
    assert "\033[" not in logs and "score" not in logs  # and untouched by the live line


# --- devices --------------------------------------------------------------------------------


@pytest.mark.slow
def test_devices_lists_inputs_and_a_device_that_does_not_match_names_them(
    pulse: str, tmp_path: Path
) -> None:
    env = {"PULSE_SOURCE": pulse, "SOUNDSENTRY_DATA_DIR": str(tmp_path)}
    listing = cli("devices", env=env).stdout.splitlines()
    probe = (
        "import sounddevice as sd; print('\\n'.join(f\"{d['name']}|{d['max_input_channels']}|"
        "{d['default_samplerate']:.0f}\" for d in sd.query_devices() if d['max_input_channels']))"
    )
    truth = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **env}
    ).stdout.split()
    assert truth and len(listing) == len(truth) + 2  # a header, one line per input, the advice
    assert listing[-1].startswith("give --device (or [audio] device) a part of the name")
    for row in truth:
        name, channels, rate = row.split("|")
        assert any(f" {name}  {channels} ch, {rate} Hz" in x for x in listing), (row, listing)
    # PortAudio's default rate is 44100 Hz for the sound server, which opens at the model's
    # rate: said, so 44100 is not read as the rate it records at (a new user's walk-through)
    pulse_line = next(x for x in listing if " pulse  " in x)
    assert pulse_line.endswith("  (captures at 16000 Hz)"), pulse_line
    wrong = cli("run", "--model", str(DEMO_BUNDLE), "--device", "NOPE", env=env, check=False)
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    assert "'NOPE'" in wrong.stderr and "'pulse'" in wrong.stderr


def test_devices_says_a_rate_the_device_does_not_take_is_resampled(
    pulse: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real sound server asked a rate beyond any it takes (PortAudio's paInvalidSampleRate),
    as a USB microphone that only takes 48000 Hz is asked 16000: captured at its default rate
    and resampled, as `MicSource` does."""
    from edge.devices import input_devices

    monkeypatch.setenv("PULSE_SOURCE", pulse)
    beyond = 3_000_000
    devices = input_devices(probe_rate=beyond)
    server = next(d for d in devices if d.name == "pulse")
    assert server.captures_at == (beyond, False)
    assert server.line().endswith(f"  ({server.samplerate:.0f} Hz resampled to {beyond} Hz)")
    assert next(d for d in input_devices(16000) if d.name == "pulse").captures_at == (16000, True)


# --- doctor ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_doctor_fails_an_unset_device_and_creates_nothing(pulse: str, tmp_path: Path) -> None:
    data = tmp_path / "var" / "lib" / "soundsentry"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "{DEMO_BUNDLE}"\n')
    env = {"PULSE_SOURCE": pulse, "SOUNDSENTRY_DATA_DIR": str(data)}
    out = cli("doctor", "--config", str(cfg), env=env, check=False)
    assert out.returncode == 1
    assert "FAIL audio device: not set" in out.stdout and "soundsentry devices" in out.stdout
    assert "SKIP input level: no audio device set" in out.stdout
    assert f"PASS data folder: {data} will be created at start in {tmp_path}" in out.stdout
    assert not (tmp_path / "var").exists()  # doctor looked, and created nothing
    assert list(tmp_path.iterdir()) == [cfg]


def test_capture_below_the_model_rate_is_refused_in_one_line(pulse: str, tmp_path: Path) -> None:
    """PulseAudio captures at any rate it is asked for; at 8 kHz the model's bands above 4 kHz
    would be empty, and every window would be an anomaly. The rate is the setting's, and the
    line says so (it blamed the device, in a review)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[audio]\ndevice = "pulse"\nsamplerate = 8000\n')
    env = {"PULSE_SOURCE": pulse, "SOUNDSENTRY_DATA_DIR": str(tmp_path / "data")}
    proc = cli("run", "--model", str(DEMO_BUNDLE), "--config", str(cfg), env=env, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "soundsentry: error: audio.samplerate 8000 is below the 16000 Hz needed (the model's "
        "rate, or record's --samplerate): set it to that or more, or leave it out"
    )


# --- record ---------------------------------------------------------------------------------


def _record(sink: str, tmp_path: Path, clip: Path, *play_args: str) -> str:
    player = subprocess.Popen(["paplay", "-d", sink, *play_args, str(clip)])
    try:
        wait_for(lambda: _playing(sink), 10, "paplay to start")
        proc = cli(
            "record",
            "--seconds",
            "2",
            "--out",
            str(tmp_path / "rec"),
            "--device",
            "pulse",
            env={"PULSE_SOURCE": f"{sink}.monitor"},
        )
    finally:
        player.kill()
    return proc.stderr


def _playing(sink: str) -> bool:
    from test_site_tools import streams_into

    return streams_into(sink) > 0


@pytest.mark.slow
def test_record_says_whether_the_level_is_good_too_quiet_or_too_loud(
    sink: str, tmp_path: Path
) -> None:
    audio, rate = sf.read(str(DEMO_CLIP), dtype="float32")
    loud = tmp_path / "loud.wav"
    quarters = audio[: len(audio) // (rate // 4) * (rate // 4)].reshape(-1, rate // 4)
    peaks = 0.99 / np.abs(quarters).max(axis=1, keepdims=True)  # every 0.25 s peaks at -0.1 dB
    sf.write(str(loud), (quarters * peaks).ravel(), rate, subtype="FLOAT")
    good = _record(sink, tmp_path / "a", DEMO_CLIP)
    assert "level good: " in good and "gaps:" not in good, good
    quiet = _record(sink, tmp_path / "b", DEMO_CLIP, "--volume=16384")  # -36 dB
    assert "level too quiet: " in quiet and "raise the input gain" in quiet, quiet
    too_loud = _record(sink, tmp_path / "c", loud)
    assert "level too loud: " in too_loud and "lower the input gain" in too_loud, too_loud


def test_level_verdict_and_gap_note_name_what_is_wrong() -> None:
    assert level_verdict(-30.0, -10.0).startswith("level good: -30.0 dBFS RMS, peaks -10.0")
    quiet = level_verdict(QUIET_DBFS - 0.1, -40.0)
    assert quiet.startswith("level too quiet") and "keep this gain" not in quiet, quiet  # not
    # both: raise the gain and keep it
    assert level_verdict(-20.0, LOUD_PEAK_DBFS).startswith("level too loud")
    assert gap_note({"dropped": 0, "overflows": 0, "reopens": 0, "queue_depth": 3}) is None
    note = gap_note({"dropped": 2, "overflows": 1, "reopens": 0})
    assert note is not None and "2 dropped block(s), 1 input overflow(s):" in note
    assert gap_note({}, GAP_TOLERANCE_S) is None
    assert "gaps: 2.5 s of audio missing:" in str(gap_note({}, 2.5))
    clock = Timeline(16000)
    for i in range(11):  # 10 blocks of 0.1 s after the first, but 1.6 s passed
        clock.push(1600, 100.0 + 0.1 * i + (0.6 if i > 5 else 0.0))
    assert clock.missing_s() == pytest.approx(0.6 - 1.0 * CLOCK_DRIFT)
    hour = Timeline(16000)
    hour.push(1600, 0.0)
    hour.push(3600 * 16000, 3600 * (1 + CLOCK_DRIFT / 2))  # a slow sound card, nothing lost
    assert hour.missing_s() == 0.0


# --- missing extras -------------------------------------------------------------------------

BLOCKED = ("matplotlib", "tensorflow", "keras", "librosa", "scipy", "tqdm")
"""The modules of the [train] and [report] extras: absent on the bare install."""
BARE = """
import sys
BLOCKED = set(sys.argv[1].split(","))
class Bare:
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Bare())
from soundsentry.cli import main
sys.exit(main(sys.argv[2:]))
"""


def bare(*args: str, blocked: tuple[str, ...] = BLOCKED) -> subprocess.CompletedProcess[str]:
    """The real command with the extras' modules made unimportable (an import hook)."""
    return subprocess.run(
        [sys.executable, "-c", BARE, ",".join(blocked), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def _one_line_error(proc: subprocess.CompletedProcess[str], extra: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"needs the [{extra}] extra" in lines[0]
    assert f"pip install 'soundsentry[{extra}]'" in lines[0]


def test_commands_that_need_an_extra_say_which_in_one_line(tmp_path: Path) -> None:
    files = ["--normal", *map(str, NORMAL_FILES), "--anomalous", str(ANOMALOUS_FILE)]
    report = tmp_path / "report"
    proc = bare("evaluate", str(DEMO_BUNDLE), *files, "--report", str(report))
    _one_line_error(proc, "report")
    assert proc.stdout == "" and not report.exists()  # nothing scored, nothing half-written
    _one_line_error(bare("spectrogram", str(DEMO_CLIP), "--out", str(tmp_path / "s.png")), "report")
    out = tmp_path / "ae.bundle"
    train = ("train", "--detector", "autoencoder", "--normal", *map(str, NORMAL_FILES))
    _one_line_error(bare(*train, "--out", str(out)), "train")
    classes = bare("train", "--classes", str(tmp_path), "--out", str(out))
    _one_line_error(classes, "train")
    assert "`train --classes` needs" in classes.stderr
    # the missing extra is all it says: not the notes of a command that cannot run (a
    # multichannel recording's channel, a bundle at --out to replace)
    stereo = tmp_path / "stereo.wav"
    mono, rate = sf.read(NORMAL_FILES[0])
    sf.write(stereo, np.stack([mono, mono], axis=1), rate)
    held = tmp_path / "held.bundle"
    shutil.copytree(DEMO_BUNDLE, held)
    cnn = bare("train", "--detector", "embedding", "--normal", str(stereo), "--out", str(held))
    _one_line_error(cnn, "train")
    assert cnn.stdout == "", cnn.stdout
    keras = bare(*train, "--out", str(out), blocked=("keras",))  # TensorFlow needs Keras
    _one_line_error(keras, "train")
    assert "(keras is not installed)" in keras.stderr
    assert not out.exists()
    # a broken install (matplotlib without pyplot) fails where it is imported: still one line
    png = bare(
        "spectrogram",
        str(DEMO_CLIP),
        "--out",
        str(tmp_path / "s.png"),
        blocked=("matplotlib.pyplot",),
    )
    _one_line_error(png, "report")
    assert "(matplotlib.pyplot is not installed)" in png.stderr
    works = bare("evaluate", str(DEMO_BUNDLE), *files)  # the hook leaves the bare path working
    assert works.returncode == 0 and "AUC" in works.stdout, works.stderr
    # the default detector trains on the Pi's bare install, as README step 3 says
    fitted = bare("train", "--normal", *map(str, NORMAL_FILES), "--out", str(tmp_path / "f"))
    assert fitted.returncode == 0 and "model bundle written to" in fitted.stdout, fitted.stderr


# --- events ---------------------------------------------------------------------------------


def test_events_lists_the_local_log_for_a_spreadsheet(tmp_path: Path) -> None:
    env = {"SOUNDSENTRY_DATA_DIR": str(tmp_path)}
    replay = cli("replay", str(DEMO_BUNDLE), str(DEMO_CLIP), env=env)
    end = next(json.loads(x) for x in replay.stdout.splitlines() if '"end"' in x)
    log = tmp_path / LOG_NAME
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    rows = list(csv.DictReader(io.StringIO(cli("events", "--csv", env=env).stdout)))
    assert len(rows) == 1
    row = rows[0]
    assert row["event_id"] == end["event_id"] and row["status"] == "ended"
    assert float(row["peak_score"]) == end["peak_score"] and row["clip"] == end["clip"]
    assert row["bands"].startswith(f"{end['bands'][0]['low_hz']:.0f}-")
    assert (tmp_path / "clips" / row["clip"]).is_file()
    assert len(cli("events", "--since", "1h", "--csv", env=env).stdout.splitlines()) == 2
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat() + "T00:00Z"
    later = cli("events", "--since", tomorrow, env=env)
    assert later.stdout == "" and "0 event(s) since" in later.stderr
    assert "the service's" not in later.stderr  # a folder of its own: no hint
    # your own default log, on a Pi beside the service's: says where the service's is read
    home = tmp_path / "home"  # the suite sets a data dir of its own: name the default one
    mine = {"HOME": str(home), "SOUNDSENTRY_DATA_DIR": str(home / ".local/state/soundsentry")}
    # no such folder (`--config` forgotten): "0 event(s)" there read as all well (a review)
    none = cli("events", env=mine, check=False)
    assert none.returncode == 1 and none.stdout == "", none.stdout
    assert none.stderr.splitlines()[-1] == (
        f"soundsentry: error: no data folder {home}/.local/state/soundsentry: no daemon has run "
        "with it, so it holds no event log; the service's: sudo -u soundsentry soundsentry "
        "events --config /etc/soundsentry/config.toml"
    )
    (home / ".local/state/soundsentry").mkdir(parents=True)  # a replay made it: no log yet
    own = cli("events", env=mine)
    assert own.stderr.splitlines()[-1] == (
        "(your own log; the service's: sudo -u soundsentry soundsentry events --config "
        "/etc/soundsentry/config.toml)"
    )
    human = cli("events", "--since", "7d", env=env).stdout
    assert end["clip"] in human
    # a POSIX zone (UTC+1, no tz database needed): listed in local time, as --since reads it
    berlin = cli("events", "--since", "7d", env={**env, "TZ": "CET-1"}).stdout
    started = datetime.fromisoformat(end["started_at"].replace("Z", "+00:00"))
    local = started.astimezone(timezone(timedelta(hours=1))).isoformat(timespec="seconds")
    assert berlin.startswith(local) and local.endswith("+01:00"), berlin
    footer = cli("events", "--since", "2026-12-05", env={**env, "TZ": "CET-1"}).stderr
    assert "since 2026-12-05T00:00:00+01:00" in footer, footer  # what was asked, as it was asked
    bad = cli("events", "--since", "last week", env=env, check=False)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert "an age (90m, 24h, 7d, 2w)" in bad.stderr


def _event(kind: str, n: int) -> EventMessage:
    return EventMessage(
        type=kind,  # type: ignore[arg-type]
        event_id=f"e{n}",
        device_id="d",
        model="m",
        started_at=f"2026-01-01T00:00:{n:02d}.000Z",
        peak_score=1.0 + n,
        threshold=1.0,
        ended_at=f"2026-01-01T00:00:{n + 1:02d}.000Z" if kind == "end" else None,
    )


def test_event_log_lines_that_are_damaged_or_odd_lose_nothing_else(tmp_path: Path) -> None:
    """A damaged `end` replaced its good `start` before it was checked, so the event vanished;
    a well-formed line with a null peak or a band without its edges stopped every listing."""
    log = EventLog(tmp_path)
    log.append(_event("start", 1))
    damaged = json.loads(_event("end", 1).to_payload()) | {"started_at": "\ufffd"}
    odd = json.loads(_event("end", 2).to_payload()) | {
        "peak_score": None,
        "threshold": "high",
        "bands": [{"low_hz": 100}],
    }
    with open(log.path, "a") as fh:
        fh.write(json.dumps(damaged) + "\n" + json.dumps(odd) + "\n")
    events = read_events(tmp_path)
    assert [(e.data["event_id"], e.status) for e in events] == [("e1", "open"), ("e2", "ended")]
    assert events[1].data["bands"] is None and events[1].data["threshold"] is None
    out = io.StringIO()
    write_csv(events, out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert rows[1]["peak_score"] == "" and rows[1]["bands"] == ""
    assert "peak - (threshold -)" in format_event(events[1])


def test_damaged_event_log_lines_are_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A line cut short by a power cut was dropped without a word: `events` listed one event
    fewer than the log held, and nothing said why."""
    log = EventLog(tmp_path)
    log.append(_event("start", 1))
    with open(log.path, "a") as fh:
        fh.write('{"type": "start", "event_id": "e2", "started_at": "2026-01\n')
    log.append(_event("start", 3))
    with caplog.at_level(logging.WARNING, logger="edge.eventlog"):
        assert [e.data["event_id"] for e in read_events(tmp_path)] == ["e1", "e3"]
        assert [e.data["event_id"] for e in read_events(tmp_path)] == ["e1", "e3"]
    said = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(said) == 1 and "1 line(s) skipped" in said[0] and str(log.path) in said[0]


def test_an_interrupted_event_and_its_trigger_are_in_the_csv_and_the_listing(
    tmp_path: Path,
) -> None:
    """After a power cut the restart ends the open event; its duration runs to the restart,
    so it is an upper bound, which the spreadsheet and the listing must say."""
    log = EventLog(tmp_path)
    start = _event("start", 3)
    log.append(start)
    end = json.loads(_event("end", 3).to_payload()) | {
        "duration_s": 1020563.6,
        "interrupted": True,
        "ended_by": "stopped",
        "trigger": "cusum",
        "machine": "running",
    }
    with open(log.path, "a") as fh:
        fh.write(json.dumps(end) + "\n")
    out = io.StringIO()
    write_csv(read_events(tmp_path), out)
    header, row = out.getvalue().splitlines()[0], next(csv.DictReader(io.StringIO(out.getvalue())))
    assert header.startswith("started_at,ended_at,duration_s,")  # old columns keep their place
    assert header.endswith(",status,trigger,ended_by,interrupted,machine,fault")
    assert (row["interrupted"], row["ended_by"], row["trigger"], row["machine"]) == (
        "yes", "stopped", "cusum", "running",
    )  # fmt: skip
    assert row["fault"] == ""  # an anomaly model's event: no class to call a fault or not
    for said, column in ((True, "yes"), (False, "no"), ("x", "")):
        assert LoggedEvent(end | {"fault": said}).row()["fault"] == column
    line = format_event(read_events(tmp_path)[0])
    assert "<=1020563.6 s" in line and line.endswith("interrupted")
    assert ", raised by evidence over time)" in line, line  # "peak 2.4 (integrated) (threshold"
    # one precision for every number of the column: 4.000, not 4 beside 2.357 (a soak)
    assert "peak 4.000 (threshold 1.000, raised" in line, line


def test_events_says_how_far_back_a_rotated_log_reaches(tmp_path: Path) -> None:
    log = EventLog(tmp_path, max_bytes=600)
    for n in range(8):
        log.append(_event("start", n))
        log.append(_event("end", n))
    env = {"SOUNDSENTRY_DATA_DIR": str(tmp_path)}
    oldest = read_events(tmp_path)[0].data["started_at"]
    assert oldest != _event("start", 0).started_at  # the first ones were dropped
    listed = cli("events", "--since", "2025-12-31T00:00Z", env=env)
    assert f"reaches back to {local_time(oldest)} only" in listed.stderr
    recent = cli("events", "--since", "2026-01-01T00:00:07Z", env=env)  # inside the log
    assert "reaches back" not in recent.stderr and "1 event(s)" in recent.stderr
    month = cli("events", "--since", "2026-01-01T00:00:04Z", "--until", "2026-01-01T00:00:06Z",
                "--csv", env=env)  # fmt: skip
    assert [r["event_id"] for r in csv.DictReader(io.StringIO(month.stdout))] == ["e4", "e5"]
    assert "2 event(s) since 2026-01-01T00:00:04+00:00 until 2026-01-01T00:00:06" in month.stderr
    bad = cli("events", "--until", "someday", env=env, check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("soundsentry: error: --until 'someday'")
    swapped = cli("events", "--since", "2026-01-02", "--until", "2026-01-01", env=env, check=False)
    assert swapped.returncode == 1 and "is not before --until" in swapped.stderr
    assert "ages count back" not in swapped.stderr
    # ages count back from now: "from hour 1 to hour 2" is written the other way round
    hours = cli("events", "--since", "1h", "--until", "2h", env=env, check=False)
    assert hours.returncode == 1 and len(hours.stderr.strip().splitlines()) == 1, hours.stderr
    assert "(ages count back from now: --since 2h --until 1h)" in hours.stderr, hours.stderr
    # ages and dates at the calendar's ends: no traceback, every event
    for flags in (("--since", "3000000d"), ("--since", "0001-01-01"), ("--until", "9999-12-31")):
        ends = cli("events", *flags, env=env)
        assert f"{len(read_events(tmp_path))} event(s)" in ends.stderr, ends.stderr


def test_the_listing_names_the_id_to_mark_and_the_events_marked_normal(tmp_path: Path) -> None:
    """An operator could not tell which event to mark (without a clip no id was on the line) nor
    which were marked already (a field review). The marks of the version in use count, by whole
    id or by the 12 characters of a clip's name; not an older version's (rolled back), nor those
    of a history of another configured model."""
    log = EventLog(tmp_path)
    ids = [f"{c}" * 32 for c in "abcd"]
    for n, eid in enumerate(ids):
        for kind in ("start", "end"):
            log.append(EventMessage(**json.loads(_event(kind, n).to_payload()) | {"event_id": eid}))
    demo = load_bundle(DEMO_BUNDLE).model_id  # the version's folder: a bundle that loads
    entry = {"path": str(DEMO_BUNDLE), "base": str(DEMO_BUNDLE), "reason": "mark_normal",
             "model_id": demo}  # fmt: skip
    history = {
        "configured": demo,
        "active": 2,
        "entries": [
            entry | {"version": 1, "marked": [ids[3]]},
            entry | {"version": 2, "marked": [ids[0], ids[1][:12]]},
        ],
    }
    (tmp_path / "models").mkdir()
    path = tmp_path / "models" / "history.json"
    env = {"SOUNDSENTRY_DATA_DIR": str(tmp_path), "SOUNDSENTRY_MODEL": str(DEMO_BUNDLE)}

    def marked(history: object) -> list[bool]:
        path.write_text(history if isinstance(history, str) else json.dumps(history))
        lines = cli("events", env=env).stdout.splitlines()
        assert all(f"  id {e[:12]}" in line for e, line in zip(ids, lines, strict=True)), lines
        return [line.endswith("  marked normal") for line in lines]

    assert marked(history) == [True, True, False, False]
    assert marked(history | {"configured": "another-model"}) == [False] * 4
    labelled = json.loads(_event("start", 9).to_payload()) | {"label": "bearing wear"}
    assert "(threshold 1.000)  bearing wear  -" in format_event(LoggedEvent(labelled))
    gone = [entry | {"version": 2, "marked": [ids[0]], "path": str(tmp_path / "gone")}]
    assert marked(history | {"entries": gone}) == [False] * 4  # the daemon runs the configured
    assert marked("{") == [False] * 4  # damaged: the daemon's to mend, not the listing's


def test_the_event_log_sink_writes_what_a_full_disk_held_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An `end` lost to a full card left its event open in the log, and the next start closed
    it a second time as interrupted; the sink keeps what it could not write and writes it,
    in order, once it can."""
    sink = EventLogSink(tmp_path)
    sink.log.path.mkdir()  # any OSError of open() will do: a directory where the log goes
    with caplog.at_level(logging.INFO, logger="edge.eventlog"):
        sink.event(_event("start", 4))
        sink.event(_event("end", 4))
        sink.log.path.rmdir()  # the card has room again
        sink.metrics(None)  # type: ignore[arg-type]  # the next metrics tick writes them
        assert [e.status for e in read_events(tmp_path)] == ["ended"]
        sink.event(_event("start", 5))
    events = read_events(tmp_path)
    assert [(e.data["event_id"], e.status) for e in events] == [("e4", "ended"), ("e5", "open")]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "events still go to MQTT" in errors[0].getMessage()
    assert any("writable again" in r.getMessage() for r in caplog.records)
    # more held back than it keeps: the oldest go, and that is said, not "all written" (a review)
    caplog.clear()
    sink.log.path.rename(tmp_path / "kept.jsonl")
    sink.log.path.mkdir()
    with caplog.at_level(logging.INFO, logger="edge.eventlog"):
        for n in range(6, 6 + EventLogSink.MAX_PENDING // 2 + 3):
            sink.event(_event("start", n))
            sink.event(_event("end", n))
        sink.log.path.rmdir()
        sink.metrics(None)  # type: ignore[arg-type]
    said = [r.getMessage() for r in caplog.records]
    assert sum("the oldest are dropped from the log now" in m for m in said) == 1, said
    assert any(m.endswith("held back are in it; 6 older start and end messages are not (they "
                          "went to MQTT)") for m in said), said  # fmt: skip
    assert len(sink.log.path.read_text().splitlines()) == EventLogSink.MAX_PENDING


def test_event_log_keeps_starts_and_ends_rotates_and_survives_a_torn_line(
    tmp_path: Path,
) -> None:
    log = EventLog(tmp_path, max_bytes=600)
    for n in range(6):
        log.append(_event("start", n))
        log.append(_event("update", n))
        log.append(_event("end", n))
    log.append(_event("start", 7))  # still open
    rotated = tmp_path / (LOG_NAME + ".1")
    assert (
        rotated.exists() and log.path.stat().st_size < 2 * 600 and rotated.stat().st_size < 2 * 600
    )
    with open(log.path, "a") as fh:
        fh.write('{"type": "end", "event_id": "e7", "started_at"')  # a write cut short
    log.append(_event("start", 8))  # after the power cut: must not be glued onto the torn line
    with open(log.path, "ab") as fh:
        fh.write(b"\xff\xfe damaged sector\n")
    events = read_events(tmp_path)
    ids = [e.data["event_id"] for e in events]
    assert ids == sorted(ids) and ids[-2:] == ["e7", "e8"] and "e0" not in ids  # rotated out
    assert [e.status for e in events] == ["ended"] * (len(ids) - 2) + ["open", "open"]
    assert all(e.data["type"] != "update" for e in events)
    since = read_events(tmp_path, parse_since("2026-01-01T00:00:05Z"))
    assert [e.data["event_id"] for e in since] == ["e5", "e7", "e8"]
    now = datetime(2026, 1, 2, tzinfo=UTC)
    assert parse_since("24h", now) == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_since("90m", now) == now - timedelta(minutes=90)


@pytest.mark.slow
def test_record_notices_audio_lost_while_it_was_frozen(sink: str, tmp_path: Path) -> None:
    """SIGSTOP freezes the recorder (and its PortAudio thread) for longer than the audio
    system buffers: what the machine played meanwhile is lost, and record says so."""
    audio, rate = sf.read(str(DEMO_CLIP), dtype="float32")
    long = tmp_path / "long.wav"
    sf.write(str(long), np.concatenate([audio, audio]), rate)  # plays through the freeze
    player = play(sink, long)
    out = tmp_path / "rec"
    recorder = subprocess.Popen(
        [*SOUNDSENTRY, "record", "--seconds", "5", "--out", str(out), "--device", "pulse"],
        cwd=ROOT,
        env={**os.environ, "PULSE_SOURCE": f"{sink}.monitor"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:  # the first chunk's file appears with the first block of audio
        wait_for(lambda: list(out.glob("*.wav")), 20, "the recorder to start")
        recorder.send_signal(signal.SIGSTOP)
        subprocess.run(["sleep", str(FREEZE_S)], check=True)  # the freeze itself
        recorder.send_signal(signal.SIGCONT)
        _, err = recorder.communicate(timeout=60)
    finally:
        player.kill()
        recorder.kill()
    assert recorder.returncode == 0, err
    assert "gaps: " in err and "audio was lost" in err, err


FREEZE_S = 10
"""Longer than PulseAudio and PortAudio buffer for a client that does not read."""


def test_training_a_network_prints_no_tensorflow_converter_noise(tmp_path: Path) -> None:
    """The int8 conversion's C++ lines (`fully_quantize: 0, inference_type: 6 ...`, `NodeDef
    mentions attribute ...`) read like errors in the middle of `train`'s output; they are kept
    back unless the conversion fails."""
    out = tmp_path / "ae.bundle"
    proc = cli("train", "--detector", "autoencoder", "--normal", *map(str, NORMAL_FILES),
               "--out", str(out), "--epochs", "1")  # fmt: skip
    assert (out / "manifest.json").is_file()
    for noise in ("fully_quantize", "NodeDef mentions", "inference_type"):
        assert noise not in proc.stderr, proc.stderr[-2000:]


def test_tensorflows_load_chatter_is_dropped_and_a_native_crash_still_says_why() -> None:
    """TensorFlow's INFO lines as it loads (oneDNN's "...round-off errors...") ignore
    TF_CPP_MIN_LOG_LEVEL on some CPUs and read like a failure; they are dropped. Its errors
    stay, and so does what a native crash writes last (the filter is a process of its own: a
    filter inside the crashing process died with it, and the crash said nothing)."""
    script = "\n".join(
        [
            "import os",
            "from soundsentry.commands.common import _native_chatter_dropped",
            "with _native_chatter_dropped():",
            "    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called"
            " are written to STDERR\\n')",
            "    os.write(2, b'I0000 00:00:1796203526.540926    7775 port.cc:153] oneDNN custom"
            " operations are on. You may see slightly different numerical results\\n')",
            "    os.write(2, b'E0000 00:00:1796203526.5 7775 op.cc:9] a real error\\n')",
            "    os.write(2, b'F0000 00:00:1796203526.6 7775 cpu.cc:1] needs AVX\\n')",
            "    os.abort()",
        ]
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=ROOT, timeout=60)
    said = proc.stderr.decode()
    assert proc.returncode != 0
    assert "oneDNN" not in said and "absl::InitializeLog" not in said, said
    assert "a real error" in said and "needs AVX" in said, said


def test_record_log_lines_erase_its_progress_line_first() -> None:
    """A capture warning during `record` (a stall, a reopen) was written after the progress
    line's last character, on the same line."""
    import logging

    from edge.console import CLEAR, logs_clear

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term, log = Terminal(), logging.getLogger("edge.capture")
    with logs_clear(term):
        term.write("\rrecording   12.0 / 600 s")
        log.warning("capture: the device stalled")
        assert term.getvalue().endswith(CLEAR)  # once per root handler: pytest adds some
    erased = term.getvalue()
    log.warning("after the recording")
    assert term.getvalue() == erased
    logfile = io.StringIO()  # a log file, not a terminal: nothing is written to it
    with logs_clear(logfile):
        log.warning("in a log")
    assert logfile.getvalue() == ""


def test_the_report_timeline_draws_the_threshold_the_config_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`evaluate --config --report`: the text and histogram said the config's threshold (1.5)
    while timeline.png drew the bundle's, and the first fault seemed to cross it three times
    where the device raised an event (in a review)."""
    import soundsentry.report as report_module
    from edge.bundle import load_bundle
    from edge.settings import DetectorSettings
    from train.evaluate import evaluate

    drawn: list[tuple] = []
    monkeypatch.setattr(
        report_module, "_timeline", lambda *a: drawn.append(a) or tmp_path / "timeline.png"
    )
    detector = DetectorSettings(threshold=1.5, trigger_windows=2)
    normal, faults = list(map(str, NORMAL_FILES)), [str(ANOMALOUS_FILE)]
    report = evaluate(DEMO_BUNDLE, normal, faults, detector=detector)
    assert report.threshold == 1.5
    report_module.write_full_report(
        report, DEMO_BUNDLE, normal, faults, tmp_path, detector=detector
    )
    [(line, _)] = drawn
    assert line.threshold == 1.5 != load_bundle(DEMO_BUNDLE).threshold
    from edge.audio_io import read_audio
    from train.evaluate import device_events

    bundle = load_bundle(DEMO_BUNDLE)
    audio = read_audio(ANOMALOUS_FILE, bundle.features.samplerate)
    np.testing.assert_array_equal(line.scores, device_events(audio, bundle, detector)[0])
    # the events the device raises on it are drawn, with what started them (a CUSUM event's
    # windows may all lie below the line, and the plot showed none)
    [(start, end, trigger)] = line.events
    assert 0 <= start < end <= len(audio) / bundle.features.samplerate
    assert trigger in report_module.TRIGGERS


def test_the_install_line_of_an_extra_says_sudo_where_the_venv_is_not_the_user_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The installer's venv is root's: `/opt/soundsentry/venv/bin/python -m pip install ...`
    without `sudo` failed for the user who ran the command (a README walk-through)."""
    import edge.errors
    from edge.errors import install_extra

    monkeypatch.setattr(edge.errors.os, "access", lambda *_: False)
    assert install_extra("report") == f"sudo {sys.executable} -m pip install 'soundsentry[report]'"
    monkeypatch.setattr(edge.errors.os, "access", lambda *_: True)
    assert install_extra("report") == f"{sys.executable} -m pip install 'soundsentry[report]'"
