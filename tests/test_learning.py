"""Learning on site with real parts: the minimum-audio refusal and training summary of the real
CLI, a commissioning period on recordings (`replay --config`) and on a PulseAudio microphone
with a real broker, `mark_normal` then replay, rollback, a failing refit, and the threshold and
mute that survive a restart."""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import (
    AE_BUNDLE,
    ANOMALOUS_FILE,
    DEMO_BUNDLE,
    DEMO_CLIP,
    NORMAL_FILES,
    ROOT,
    SOUNDSENTRY,
    Broker,
    cli,
    wait_for,
)
from detector_helpers import Recorder
from mqtt_helpers import Subscriber

from edge.adapt import Adapter
from edge.audio_io import read_audio
from edge.bundle import Bundle, load_bundle, write_bundle
from edge.commands import ReplyTo
from edge.control import Controller
from edge.daemon import Detector
from edge.errors import SettingsError
from edge.eventlog import EventLogSink
from edge.features import windows_of
from edge.health import level_dbfs
from edge.learning import (
    CALIBRATED_SOURCE,
    CALIBRATION_CENTERS,
    CALIBRATION_FEATURES,
    CALIBRATION_FOLD,
    FIT_CENTER,
    TRAINING_FEATURES,
    LearningError,
    site_refit,
)
from edge.settings import load_settings
from edge.sink import JsonLinesSink
from edge.sources import FileSource

RATE = 16000
SINK = "learnmic"
"""The PulseAudio null sink the commissioning test plays its machine into."""
LEARN_S = 15.0
"""Shorter than the 18 s of windows in the four fixture recordings: the period ends in them."""


# --- helpers -----------------------------------------------------------------------------------


def other_fault(tmp_path: Path) -> Path:
    """A real fault of another recording (MIMII anomalous clip 2, inside the demo clip)."""
    path = tmp_path / "other-fault.wav"
    clip = read_audio(DEMO_CLIP, RATE)
    sf.write(path, clip[int(5.5 * RATE) : int(10.5 * RATE)], RATE, subtype="PCM_16")
    return path


class Device:
    """A Detector with persistence over a data_dir, as `replay` builds it; each `replay` is a
    restart (a new Detector on the same data_dir) that plays files and returns the events."""

    def __init__(self, tmp_path: Path, bundle: Path = DEMO_BUNDLE, **learning: float) -> None:
        self.bundle = bundle
        self.data = tmp_path / "data"
        self.learning = learning
        self.event_logic: dict[str, int] = {}
        """[detector] settings of the event logic (trigger_windows, trigger_of, ...)."""
        self.detector: Detector | None = None

    def settings(self) -> object:
        return load_settings(
            None,
            model=self.bundle,
            data_dir=self.data,
            device_id="site",
            detector={"cooldown_seconds": 0, **self.event_logic},
            learning=self.learning,
        )

    def replay(self, *files: Path) -> list[dict]:
        out = io.StringIO()
        self.detector = Detector(
            self.settings(),
            load_bundle(self.bundle),
            [JsonLinesSink(out), EventLogSink(self.data)],  # as the service runs it
            persist=True,
        )
        self.detector.run(FileSource(list(files), RATE))
        return [json.loads(line) for line in out.getvalue().splitlines()]

    def adapter_period_heard(self) -> int:
        """Events the model in use would have raised in the running period."""
        assert self.detector is not None and self.detector.adapter is not None
        assert self.detector.adapter.period is not None
        return self.detector.adapter.period.heard_events

    def command(self, **payload: object) -> object:
        assert self.detector is not None
        return Controller(self.detector).handle_payload(json.dumps(payload).encode())


def starts(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "start"]


# --- honest training ---------------------------------------------------------------------------


def test_train_refuses_too_little_audio_and_summarises_what_backs_the_threshold(
    tmp_path: Path,
) -> None:
    short = cli(
        "train", "--normal", str(NORMAL_FILES[0]), "--out", str(tmp_path / "a"), check=False
    )
    assert short.returncode == 1
    assert short.stderr.strip().splitlines() == [
        "soundsentry: error: train: 5.0 s of normal audio is too little: at least 10 s is "
        "needed (record 5 s more; 300 s or more is recommended)"
    ]
    out = tmp_path / "fan.bundle"
    proc = cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(out))
    assert (
        "audio: 20 s from 4 recording(s): 20 s fitted the model; a fit on 16 s scored the "
        "other 4 s, held out, for the threshold"
    ) in proc.stdout
    assert "predicted false alarms per day" in proc.stdout and "95% interval" in proc.stdout
    assert "warning: only 20 s of normal audio; 300 s or more is recommended" in proc.stdout
    bundle = load_bundle(out)  # what a refit on site pools with the site's audio
    assert bundle.array(TRAINING_FEATURES).shape[1] == bundle.features.n_mels
    assert bundle.array(FIT_CENTER).shape == (bundle.features.n_mels,)
    cal = cli(
        "calibrate", str(out), "--normal", str(NORMAL_FILES[1]), "--out", str(tmp_path / "c"),
        check=False,
    )  # fmt: skip
    assert cal.returncode == 1 and "record 5 s more" in cal.stderr
    ok = cli("calibrate", str(out), "--normal", *map(str, NORMAL_FILES[:2]), "--out",
             str(tmp_path / "site.bundle"))  # fmt: skip
    assert "audio: 10 s from 2 recording(s)" in ok.stdout and "warning: only 10 s" in ok.stdout


# --- a commissioning period on files -----------------------------------------------------------


def test_replay_config_learns_on_files_and_keeps_the_new_version_after_a_restart(
    tmp_path: Path,
) -> None:
    config = tmp_path / "site.toml"
    config.write_text(f'device_id = "site"\n[learning]\nseconds = {LEARN_S}\n')
    env = {"SOUNDSENTRY_DATA_DIR": str(tmp_path / "data")}  # the environment beats the file
    first = cli("--log-level", "INFO", "replay", str(DEMO_BUNDLE), *map(str, NORMAL_FILES),
                str(ANOMALOUS_FILE), "--config", str(config), env=env)  # fmt: skip
    assert "learning: started, 15 s of audio" in first.stderr
    assert "learning: ended after 15 s of audio (30 windows)" in first.stderr
    events = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(starts(events)) == 1, "the normal recordings raise nothing, the fault does"
    assert starts(events)[0]["model"] == "fan-demo-12483c73-site-v1"
    assert starts(events)[0]["stream_offset_s"] >= LEARN_S
    history = json.loads((tmp_path / "data" / "models" / "history.json").read_text())
    (entry,) = history["entries"]
    assert history["active"] == 1 and entry["reason"] == "learning"
    learned = load_bundle(entry["path"])
    assert Path(entry["path"]).parent == tmp_path / "data" / "models"
    assert learned.manifest.calibration["reason"] == "learning"
    assert learned.manifest.calibration["windows"] == 30
    assert learned.threshold == pytest.approx(entry["new_threshold"], rel=1e-5)
    # doctor names the version the daemon runs, not only the configured model
    from edge.doctor import check_model
    from edge.settings import Settings

    site = Settings(device_id="site", data_dir=tmp_path / "data", model=DEMO_BUNDLE)
    model = check_model(site)
    assert (
        model.ok and "in use: site version 1 (fan-demo-12483c73-site-v1, learning" in model.detail
    )
    shutil.move(entry["path"], tmp_path / "moved.bundle")  # a version that no longer loads
    model = check_model(site)
    assert model.ok and "site version 1 does not load" in model.detail, model.detail
    shutil.move(tmp_path / "moved.bundle", entry["path"])
    # its folder written over since with a bundle this version cannot read: not "does not
    # load", since the daemon would not run it anyway (its checksum is not the version's)
    manifest = Path(entry["path"]) / "manifest.json"
    kept = manifest.read_text()
    other = json.loads(kept) | {"checksum": "0" * 64, "format_version": 99, "model_id": "other"}
    manifest.write_text(json.dumps(other))
    model = check_model(site)
    assert model.ok and f"site version 1's folder holds {other['model_id']} since" in model.detail
    manifest.write_text(kept)
    again = cli("--log-level", "INFO", "replay", str(DEMO_BUNDLE), str(ANOMALOUS_FILE),
                "--config", str(config), env=env)  # fmt: skip
    assert "using version 1 (fan-demo-12483c73-site-v1, learning)" in again.stderr
    assert "learning: started" not in again.stderr, "a model learns once, not at every start"
    assert "learning: [learning] seconds begins no period: fan-demo-12483c73's" in again.stderr
    assert [e["model"] for e in starts(map(json.loads, again.stdout.splitlines()))] == [
        "fan-demo-12483c73-site-v1"
    ]


def test_a_replay_of_another_model_leaves_the_device_s_learning_and_state_alone(
    tmp_path: Path,
) -> None:
    """A test `replay OTHER.bundle --config DEVICE.toml` while the device was stopped dropped
    the device's saved commissioning period (an hour of learning, deleted), recorded the other
    model as the device's in the model history and saved its own threshold and mute over the
    device's (a new-user walk-through). It now says so and leaves them alone; a replay of the
    device's own model still acts as the device and resumes the period."""
    data = tmp_path / "data"
    config = tmp_path / "device.toml"
    config.write_text(f'device_id = "site"\nmodel = "{DEMO_BUNDLE}"\n[learning]\nseconds = 60\n')
    env = {"SOUNDSENTRY_DATA_DIR": str(data)}
    run = ("--log-level", "INFO", "replay", "--config", str(config))
    begun = cli(*run, str(DEMO_BUNDLE), str(NORMAL_FILES[0]), env=env)
    assert "learning: started, 60 s of audio" in begun.stderr, begun.stderr
    # begun by the replay itself, and saved for the device's next start: said too (a review)
    assert "WARNING edge.daemon: learning: the files go into a commissioning period of" in (
        begun.stderr
    )
    from edge.persist import DeviceState

    DeviceState(data).save("fan-demo-12483c73", 2.5, None, 0.0)  # a threshold set by command
    kept = {p: p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file() and p.suffix != ""}
    assert {data / "learning" / "period.npz", data / "state.json"} <= set(kept), sorted(kept)
    other = cli(*run, str(AE_BUNDLE), str(ANOMALOUS_FILE), env=env)
    assert (
        "note: the config's device runs fan-demo-12483c73, not fan-autoencoder-" in other.stderr
        and "leaves its learning, model versions, threshold and mute as they are" in other.stderr
    ), other.stderr
    assert "the saved period is dropped" not in other.stderr, other.stderr
    assert "replay: 1 file(s), 7 windows" in other.stderr, "replayed all the same"
    for path, content in kept.items():
        if path.suffix != ".jsonl":  # its events are logged, as any replay's with the config
            assert path.read_bytes() == content, path
    again = cli(*run, str(DEMO_BUNDLE), str(NORMAL_FILES[1]), env=env)
    assert re.search(r"learning: resumed at [1-9]\d* of 60 s", again.stderr), again.stderr
    # said at WARNING, as a restored mute is: fault recordings replayed into a period were
    # learnt as normal with a line at INFO (an operator's review)
    assert (
        f"WARNING edge.daemon: learning: the files go into a commissioning period of {data}"
        in again.stderr
    )
    assert "threshold 2.5 restored (set by command)" in again.stderr, again.stderr
    # a config without `model` (the service given it in its environment): what the data
    # folder records names the device's model (a review)
    config.write_text('device_id = "site"\n[learning]\nseconds = 60\n')
    kept = {p: p.read_bytes() for p in (data / "learning").iterdir()}
    unnamed = cli(*run, str(AE_BUNDLE), str(ANOMALOUS_FILE), env=env)
    assert "note: the config's device runs fan-demo-12483c73, not fan-autoencoder-" in (
        unnamed.stderr
    )
    assert {p: p.read_bytes() for p in (data / "learning").iterdir()} == kept


def test_a_replay_takes_any_record_of_another_model_for_another_device_s(tmp_path: Path) -> None:
    """Without a `model` in the config, the data folder's records say which model the device
    runs; they are saved at different times, and the history's named the model before while
    the saved period was the new one's: a replay of the old model then deleted the new one's
    period (a review). Any record of another model keeps the replay out of the device's."""
    from soundsentry.commands.detection import _device_model

    config = tmp_path / "device.toml"
    config.write_text('device_id = "site"\n')
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "learning").mkdir()
    (data / "models" / "history.json").write_text('{"configured": "pump-v1"}')
    (data / "learning" / "period.json").write_text('{"of": "pump-v2"}')
    (data / "state.json").write_text('{"model": "pump-v2-site-v3"}')  # a site version of v2
    assert _device_model(config, data, "pump-v1") == "pump-v2"
    assert _device_model(config, data, "pump-v2") == "pump-v1"  # the stale history: kept out
    (data / "models" / "history.json").write_text('{"configured": "pump-v2"}')
    assert _device_model(config, data, "pump-v2") is None, "the device's own model acts as it"
    assert _device_model(None, data, "pump-v1") is None, "no config: the replay's own folder"


def test_a_damaged_history_does_not_begin_commissioning_again_nor_write_over_a_version(
    tmp_path: Path,
) -> None:
    """models/history.json damaged on the card (a power-loss review): the site's version was
    dropped and the commissioning period began again, holding events off for its length
    (days, as configured) and learning whatever the machine sounded like then, a fault
    included; the next version would have written over the first's folder. Now the configured
    model runs and raises events, one error names the versions on disk, and numbering goes on."""
    from edge.history import ModelHistory

    config = tmp_path / "site.toml"
    config.write_text(f'device_id = "site"\n[learning]\nseconds = {LEARN_S}\n')
    env = {"SOUNDSENTRY_DATA_DIR": str(tmp_path / "data")}
    run = ("--log-level", "INFO", "replay", str(DEMO_BUNDLE))
    cli(*run, *map(str, NORMAL_FILES), "--config", str(config), env=env)
    models = tmp_path / "data" / "models"
    history = models / "history.json"
    text = history.read_text()
    history.write_text(text[: len(text) * 2 // 3])  # the card lost its end
    again = cli(*run, str(ANOMALOUS_FILE), "--config", str(config), env=env)
    assert "history.json unreadable, starting afresh (kept as history.json.damaged-" in again.stderr
    said = "history.json was damaged: the versions made on site (fan-demo-12483c73-v1.bundle)"
    assert said in again.stderr, again.stderr
    assert "learning: started" not in again.stderr, "no period holds events off"
    events = [json.loads(line) for line in again.stdout.splitlines()]
    assert [e["model"] for e in starts(events)] == ["fan-demo-12483c73"], "the fault is seen"
    third = cli(*run, str(ANOMALOUS_FILE), "--config", str(config), env=env)
    assert "was damaged" not in third.stderr and "learning: started" not in third.stderr
    assert ModelHistory(models, keep=5, configured="fan-demo-12483c73")._next() == 2


def test_a_history_set_aside_stays_lost_and_one_that_cannot_be_read_for_now_is_kept(
    tmp_path: Path,
) -> None:
    """A review of the mend above: a damaged history set aside on a full card (its fresh copy
    not saved) began commissioning at the next start after all; and a link there was taken as
    lost and written over with no versions: it is set aside, its target untouched."""
    from edge.history import ModelHistory

    models = tmp_path / "models"
    (models / "fan-demo-12483c73-v1.bundle").mkdir(parents=True)
    (models / "history.json.damaged-1796496985").write_text('{"entries": [')  # a full card:
    again = ModelHistory(models, keep=5, configured="fan-demo-12483c73")  # nothing saved
    assert "fan-demo-12483c73" in again.learned, "no period begun at the next start either"
    for name in ("history.json", "history.json.damaged-1796496985"):
        (models / name).unlink(missing_ok=True)
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps({"learned": ["fan-demo-12483c73"], "entries": []}))
    (models / "history.json").symlink_to(kept)  # never followed: set aside, as damage is
    # (taken for a file unreadable for now, no version was ever recorded again, in a review)
    again = ModelHistory(models, keep=5, configured="fan-demo-12483c73")
    assert not again.unreadable and not (models / "history.json").is_symlink()
    (aside,) = models.glob("history.json.damaged-*")
    assert aside.is_symlink() and json.loads(kept.read_text())["learned"], "its target as it was"


def test_a_version_learnt_on_another_channel_is_a_model_of_that_channel(tmp_path: Path) -> None:
    """A period learnt with --channel 3 (as a device whose [audio] channel is 3): the version
    records the channel, as `calibrate` does, and a later replay on that data folder takes it by
    default and does not call it another channel than the model's (the demo bundle's, trained on
    all eight channels as views, fits any; the version named the training's instead)."""
    config = tmp_path / "site.toml"
    config.write_text(f'device_id = "site"\n[learning]\nseconds = {LEARN_S}\n')
    env = {"SOUNDSENTRY_DATA_DIR": str(tmp_path / "data")}
    first = cli("--log-level", "INFO", "replay", str(DEMO_BUNDLE), "--channel", "3",
                *map(str, NORMAL_FILES), "--config", str(config), env=env)  # fmt: skip
    assert "learning: ended after 15 s of audio" in first.stderr
    history = json.loads((tmp_path / "data" / "models" / "history.json").read_text())
    (entry,) = history["entries"]
    learned = load_bundle(entry["path"])
    assert learned.manifest.calibration["channel"] == 3
    for channel in (["--channel", "3"], []):
        again = cli("replay", str(DEMO_BUNDLE), *channel, str(ANOMALOUS_FILE),
                    "--config", str(config), env=env)  # fmt: skip
        assert "using version 1" in again.stderr
        assert "fitted on channel" not in again.stderr, again.stderr
    other = cli("replay", str(DEMO_BUNDLE), "--channel", "0", str(ANOMALOUS_FILE),
                "--config", str(config), env=env)  # fmt: skip
    assert "but the model was fitted on channel 3" in other.stderr
    # a version that no longer loads (its arrays damaged): the configured model runs, and the
    # channel is the configured model's, not the version's (it read channel 3 for a model of
    # another, and called the right one another)
    (Path(entry["path"]) / "arrays.npz").write_bytes(b"damaged")
    configured = cli("--log-level", "INFO", "replay", str(DEMO_BUNDLE), "--channel", "0",
                     str(ANOMALOUS_FILE), "--config", str(config), env=env)  # fmt: skip
    assert "version 1 unusable, using the configured model" in configured.stderr
    assert "fitted on channel" not in configured.stderr, configured.stderr


def test_a_model_learns_once_even_after_its_learning_version_is_pruned(tmp_path: Path) -> None:
    """`learned` looked for a history entry of reason learning, and pruning drops the oldest:
    after keep_versions later versions the next restart began a new commissioning period (no
    anomaly events for up to 30 days)."""
    device = Device(tmp_path, seconds=LEARN_S, keep_versions=2)
    device.replay(*NORMAL_FILES)
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v1"
    for _ in range(2):  # two later versions (SIGHUP reloads): version 1 is pruned
        device.detector.use_bundle(load_bundle(DEMO_BUNDLE), reason="reload")
    history = json.loads((device.data / "models" / "history.json").read_text())
    assert [e["reason"] for e in history["entries"]] == ["reload", "reload"]
    device.replay(NORMAL_FILES[0])  # a restart
    assert not device.detector.learning, "a model learns once, not again after pruning"
    assert device.detector.adapter.period is None


def test_a_record_that_cannot_be_read_for_now_is_neither_used_nor_written_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """history.json and state.json that the daemon could not read (a permission, a failing
    card's EIO) were taken for empty: a new commissioning period began (events held off), the
    site features of the version it could not see were deleted as unused, and both files were
    replaced, the site version and 9,000,000 running seconds lost (an operator's review). Now
    the configured model runs and raises events, and nothing is deleted or written over."""
    import errno

    from edge import history, persist

    device = Device(tmp_path, seconds=LEARN_S)
    device.replay(*NORMAL_FILES)
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v1"
    device.detector.set_threshold(2.2)  # saved in state.json
    device.replay(NORMAL_FILES[0])
    kept = {p: p.read_bytes() for p in device.data.rglob("*") if p.is_file()}
    records = {device.data / "models" / "history.json", device.data / "state.json"}
    assert records <= set(kept) and any(p.name.startswith("site-") for p in kept)
    real = history.read_regular

    def failing(path: Path, *args: object, **kwargs: object) -> bytes:
        if Path(path) in records:
            raise OSError(errno.EIO, "Input/output error")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(history, "read_regular", failing)
    events = device.replay(NORMAL_FILES[0], ANOMALOUS_FILE)
    assert not device.detector.learning, "no period holds events off"
    assert [e["model"] for e in starts(events)] == ["fan-demo-12483c73"], "the fault is seen"
    assert persist.DeviceState(device.data).unreadable
    reply = device.command(command="learn", action="start", seconds=60)  # it could not end
    assert not reply.ok and "history.json cannot be read" in reply.detail, reply.detail
    assert not device.detector.learning  # in a version, and would hold events off for nothing
    for path, content in kept.items():
        if path.suffix not in (".jsonl", ".wav"):  # events and their clips are logged anew
            assert path.exists() and path.read_bytes() == content, path


def test_records_nested_past_the_parser_s_depth_or_linked_are_set_aside_as_damaged(
    tmp_path: Path,
) -> None:
    """A history.json or state.json of 100,000 `[` ended the start in a RecursionError
    traceback, for good (an operator's review): set aside as a damaged file is."""
    from edge.history import ModelHistory
    from edge.persist import DeviceState

    models = tmp_path / "models"
    models.mkdir()
    for path in (models / "history.json", tmp_path / "state.json"):
        path.write_text("[" * 100_000)
    assert ModelHistory(models, keep=5, configured="fan-demo-12483c73").entries == []
    assert DeviceState(tmp_path).running_seconds == 0.0
    assert len(list(models.glob("history.json.damaged-*"))) == 1
    assert len(list(tmp_path.glob("state.json.damaged-*"))) == 1
    # a link there (never followed) is damage too, not a file that cannot be read for now:
    # taken for that, nothing was ever saved again (a review)
    (tmp_path / "state.json").symlink_to(tmp_path / "elsewhere.json")
    state = DeviceState(tmp_path)
    assert not state.unreadable
    state.save("fan-demo-12483c73", 2.0, None, 5.0)
    assert DeviceState(tmp_path).threshold == 2.0


# --- that was normal, and rollback ----------------------------------------------------------


def test_mark_normal_then_replay_rollback_and_the_audit_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = Device(tmp_path, seconds=LEARN_S)
    assert starts(device.replay(*NORMAL_FILES)) == []
    learned = device.detector.bundle.model_id
    assert learned.endswith("-site-v1")
    assert device.detector.status()["learns"] is True  # the site's audio backs a mark now
    device.learning = {}
    fault = starts(device.replay(ANOMALOUS_FILE))
    assert len(fault) == 1, "the sound the operator will call normal raises an event"
    caplog.set_level(logging.INFO, logger="edge.control")
    reply = device.command(command="mark_normal", event_id="last", id="op-17")
    assert reply.ok, reply.detail
    assert f"event {fault[0]['event_id']} marked normal" in reply.detail
    assert "threshold" in reply.detail and "->" in reply.detail
    assert "(on the refitted model's own scale)" in reply.detail  # lower is not more sensitive
    assert "predicted false alarms per day" in reply.detail
    assert reply.status["last_refit"]["old_threshold"] == pytest.approx(
        load_bundle(device.data / "models" / "fan-demo-12483c73-v1.bundle").threshold, rel=1e-5
    )
    assert any("command mark_normal (id op-17)" in r.message for r in caplog.records)
    assert [h["reason"] for h in reply.status["history"]] == ["mark_normal", "learning"]
    assert reply.status["marked"] == [fault[0]["event_id"]], "the page offers it no more"
    assert starts(device.replay(ANOMALOUS_FILE)) == [], "the same sound no longer alarms"
    assert len(starts(device.replay(other_fault(tmp_path)))) == 1, "another fault still does"
    assert starts(device.replay(*NORMAL_FILES)) == []

    reply = device.command(command="rollback", id="rb-1")
    assert reply.ok and reply.detail == f"rolled back to {learned}"
    assert reply.status["version"] == 1
    assert len(starts(device.replay(ANOMALOUS_FILE))) == 1, "back to the model before the mark"
    assert device.detector.bundle.model_id == learned, "a rollback survives a restart"
    assert device.command(command="rollback").detail == "rolled back to fan-demo-12483c73"
    assert device.detector.status()["learns"] is False  # the demo's bundle alone again
    refused = device.command(command="rollback", id="rb-3")
    assert not refused.ok and "no version to roll back" in refused.detail
    assert any("rejected command rollback (id rb-3)" in r.message for r in caplog.records)


def test_mark_normal_of_an_unknown_event_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    device = Device(tmp_path)
    (event,) = starts(device.replay(ANOMALOUS_FILE))
    for clip in (device.data / "clips").glob("*.wav"):
        clip.unlink()  # its clip gone, and a restart: none of its windows kept
    device.replay(NORMAL_FILES[0])
    # a mistyped id was said to be an event whose clip was gone (a walk-through)
    reply = device.command(command="mark_normal", event_id="0123456789abcdef")
    assert not reply.ok and reply.detail.endswith(
        "no event 0123456789abcdef is known here (not recent, not in the event log, no clip): "
        "`soundsentry events` lists the events with the names mark_normal takes"
    ), reply.detail
    reply = device.command(command="mark_normal", event_id=event["event_id"])
    assert not reply.ok and f"no windows of event {event['event_id']} are kept" in reply.detail
    assert '{"command": "learn", "action": "start"} learns' in reply.detail  # what to do instead
    bad = device.command(command="mark_normal", event_id="../etc")
    assert not bad.ok and "event_id" in bad.detail
    assert device.detector.bundle.model_id == "fan-demo-12483c73"
    assert not (device.data / "models" / "history.json").exists()


def test_mark_normal_refused_for_want_of_site_audio_says_what_to_do_and_keeps_no_mark(
    tmp_path: Path,
) -> None:
    """The demo bundle carries no training windows: a mark needs 10 s learnt on site first.
    The reply says how, and the refused mark leaves nothing that a later refit would pick up."""
    device = Device(tmp_path)
    (event,) = starts(device.replay(ANOMALOUS_FILE))
    # the page offers no Mark normal that would be refused (with a command it cannot send)
    assert device.detector.status()["learns"] is False
    reply = device.command(command="mark_normal", event_id=event["event_id"])
    assert not reply.ok
    assert "run the learn command" in reply.detail and '"action": "start"' in reply.detail
    assert not list((device.data / "learning").glob("marked/*.npz"))
    assert device.detector.bundle.model_id == "fan-demo-12483c73"


# --- a failing refit ---------------------------------------------------------------------------


def test_a_refit_that_fails_keeps_the_running_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = Device(tmp_path, seconds=4.0)  # fan-demo carries no training windows: 10 s needed
    # refused at its start, not after its 4 s (its refit failed then, said in the journal only);
    # what it says is enough: a period of 10 s, not "6 s more"
    with caplog.at_level(logging.WARNING, logger="edge.daemon"):
        assert starts(device.replay(NORMAL_FILES[0])) == []
    assert "learning: not started" in caplog.text and "a period of at least 10 s" in caplog.text
    status = device.detector.status()
    assert status["model"] == "fan-demo-12483c73" and status["state"] == "normal"
    assert status["learning"] is None and status["last_refit"] is None
    assert not list(device.data.glob("models/*.bundle")), "no version was written"
    assert not list(device.data.glob("learning/site-*.npz")), "features no version uses"
    assert len(starts(device.replay(ANOMALOUS_FILE))) == 1, "detection goes on as before"
    assert not device.detector.learning and device.detector.adapter.period is None
    reply = device.command(command="learn", action="start", seconds=4)
    assert not reply.ok and "ask for a period of at least 10 s" in reply.detail

    shutil.rmtree(device.data / "models", ignore_errors=True)
    (device.data / "models").write_text("not a folder")  # the versions cannot be written
    reply = device.command(command="learn", action="start", seconds=LEARN_S)
    assert reply.ok and device.detector.current_state() == "learning"
    device.replay(*NORMAL_FILES)
    assert device.detector.bundle.model_id == "fan-demo-12483c73"
    error = device.detector.status()["last_refit"]["error"]
    assert "could not write" in error and "kept and refitted at the next start" in error
    assert not list(device.data.glob("models*/**/*.bundle"))
    # A disk error is not the data's fault: the period's audio was dropped with it (days of
    # commissioning lost to a full SD card). It is kept, and the next start refits it.
    assert (device.data / "learning" / "period.json").is_file()
    (device.data / "models").unlink()
    device.replay(NORMAL_FILES[0])
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v1"
    assert device.detector.status()["last_refit"]["reason"] == "learning"
    assert not (device.data / "learning" / "period.json").exists()


def test_a_learning_period_is_answered_again_when_it_ends_and_a_muted_one_says_it_waits(
    tmp_path: Path,
) -> None:
    """A Node-RED flow saw `learn start` answered ok and then `normal`, whether its refit made a
    version or failed (said in the journal only); started while muted, the period waited with
    no word (a review of the MQTT contract)."""

    def device(data: Path) -> tuple[Detector, Controller, Recorder]:
        rec = Recorder()
        settings = load_settings(None, model=DEMO_BUNDLE, data_dir=data, device_id="site")
        d = Detector(settings, load_bundle(DEMO_BUNDLE), [rec], persist=True)
        return d, Controller(d), rec

    def learn(ctl: Controller, cid: str, seconds: float = LEARN_S) -> None:
        payload = {"command": "learn", "action": "start", "seconds": seconds, "id": cid}
        ctl.submit_payload(json.dumps(payload).encode(), ReplyTo(f"flows/{cid}", cid.encode()))

    d, ctl, rec = device(tmp_path / "ok")
    learn(ctl, "L")
    d.run(FileSource(NORMAL_FILES, RATE))
    first, second = [r for r in rec.responses if r.id == "L"]
    # both replies go where its MQTT 5 Response Topic asked, as well as to `response`
    assert [t for r, t in zip(rec.responses, rec.reply_tos, strict=True) if r.id == "L"] == [
        ReplyTo("flows/L", b"L")
    ] * 2
    assert first.ok and "a second reply says how it ended" in first.detail
    assert second.ok and second.command == "learn"
    assert second.detail.startswith("learning ended: model fan-demo-12483c73-site-v1, threshold")
    assert second.status["version"] == 1 and d.bundle.model_id.endswith("-site-v1")

    d, ctl, rec = device(tmp_path / "full")
    shutil.rmtree(tmp_path / "full" / "models", ignore_errors=True)
    (tmp_path / "full" / "models").write_text("not a folder")  # the version cannot be written
    learn(ctl, "F")
    d.run(FileSource(NORMAL_FILES, RATE))
    _, failed = [r for r in rec.responses if r.id == "F"]
    assert not failed.ok and failed.detail.startswith("learning ended, keeping fan-demo-12483c73:")
    assert "could not write" in failed.detail

    d, ctl, rec = device(tmp_path / "muted")
    ctl.submit_payload(b'{"command": "mute", "minutes": 5}')
    learn(ctl, "M")
    d.run(FileSource(NORMAL_FILES, RATE))
    (waiting,) = [r for r in rec.responses if r.id == "M"]  # no end: muted all through
    assert waiting.ok and "paused while muted: it learns once unmuted" in waiting.detail


def test_every_learn_start_is_answered_once_more_under_its_own_id_however_its_period_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The id of the `learn start` a period would answer lived in the Controller: a refused
    `learn stop` cleared it (the end was answered without an id), a restart lost it, a period
    dropped by a reload or replaced by another start was never answered, and the stale id was
    given to another model's period; a refused start ended the open event (a review)."""

    def device(data: Path) -> tuple[Detector, Controller, Recorder]:
        rec = Recorder()
        settings = load_settings(
            None, model=DEMO_BUNDLE, data_dir=data, device_id="site", models_dir=AE_BUNDLE.parent
        )
        d = Detector(settings, load_bundle(DEMO_BUNDLE), [rec], persist=True)
        return d, Controller(d), rec

    def hooked(files: list[Path], hooks: dict[int, Callable[[], object]]) -> Iterator[object]:
        for i, block in enumerate(FileSource(files, RATE)):  # 0.1-s blocks
            if i in hooks:
                hooks[i]()
            yield block

    def send(ctl: Controller, **payload: object) -> Callable[[], None]:
        return lambda: ctl.submit_payload(json.dumps(payload).encode())

    def replies(rec: Recorder, cid: str) -> list[tuple[bool, str]]:
        return [(r.ok, r.detail) for r in rec.responses if r.id == cid]

    start = {"command": "learn", "action": "start", "seconds": LEARN_S}
    d, ctl, rec = device(tmp_path / "stop")  # a stop refused: the period goes on, and so its id
    stop = send(ctl, command="learn", action="stop", id="S")
    d.run(hooked(NORMAL_FILES, {5: send(ctl, **start, id="L"), 6: stop}))
    (refused,) = replies(rec, "S")
    assert not refused[0] and "nothing has been learnt in this period yet" in refused[1]
    _, ended = replies(rec, "L")
    assert ended[0] and ended[1].startswith("learning ended: model fan-demo-12483c73-site-v1")

    d, ctl, rec = device(tmp_path / "restart")  # stopped midway, resumed at the next start
    d.run(hooked(NORMAL_FILES, {5: send(ctl, **start, id="R"), 100: d.stop}))
    assert len(replies(rec, "R")) == 1
    d, ctl, rec = device(tmp_path / "restart")
    d.run(FileSource(NORMAL_FILES, RATE))
    ((ok, detail),) = replies(rec, "R")
    assert ok and detail.startswith("learning ended: model fan-demo-12483c73-site-v1"), detail

    d, ctl, rec = device(tmp_path / "dropped")  # replaced by another start, then by a reload
    reload = send(ctl, command="reload_model", path=AE_BUNDLE.name)
    d.run(hooked(NORMAL_FILES, {5: send(ctl, **start, id="A"), 10: send(ctl, **start, id="B"),
                                60: reload}))  # fmt: skip
    _, replaced = replies(rec, "A")
    assert replaced == (False, "learning dropped: another `learn start` replaced it")
    _, dropped = replies(rec, "B")
    assert dropped == (False, f"learning dropped: {load_bundle(AE_BUNDLE).model_id} is now in use")

    d, ctl, rec = device(tmp_path / "refused")  # a start refused changes nothing
    d.run(hooked([ANOMALOUS_FILE] * 3, {25: send(ctl, **start | {"seconds": 1}, id="X")}))
    ((ok, detail),) = replies(rec, "X")
    assert not ok and detail.startswith("rejected:"), detail
    assert "learning" not in [e.ended_by for e in rec.events if e.type == "end"]

    # a second review: a reload sent with the start's id is no stop (the start was unanswered)
    d, ctl, rec = device(tmp_path / "reload-same-id")
    reload = send(ctl, command="reload_model", path=AE_BUNDLE.name, id="Y")
    d.run(hooked(NORMAL_FILES, {5: send(ctl, **start, id="Y"), 60: reload}))
    assert [r.command for r in rec.responses if r.id == "Y"] == ["learn", "learn", "reload_model"]
    # a refit that cannot be written keeps the period for the next start: answered at once (the
    # error says so), and not again when the next start makes the version
    data = tmp_path / "unwritten"
    d, ctl, rec = device(data)

    def unwritable() -> None:
        shutil.rmtree(data / "models", ignore_errors=True)
        (data / "models").write_text("not a folder")

    d.run(hooked(NORMAL_FILES, {5: send(ctl, **start, id="W"), 50: unwritable}))
    _, (ok, detail) = replies(rec, "W")
    assert not ok and detail.endswith("the period's audio is kept and refitted at the next start")
    (data / "models").unlink()
    d, ctl, rec = device(data)
    d.run(FileSource(NORMAL_FILES[:1], RATE))
    assert d.bundle.model_id == "fan-demo-12483c73-site-v1" and not replies(rec, "W")
    # a SIGHUP that configures the same model (a copy at another path) lets the period go on
    copy = tmp_path / "copy.bundle"
    shutil.copytree(DEMO_BUNDLE, copy)
    d, ctl, rec = device(tmp_path / "same-model")
    d.run(hooked(NORMAL_FILES, {5: send(ctl, **start, id="Z"),
                                60: lambda: d.reconfigure(load_bundle(copy))}))  # fmt: skip
    assert [ok for ok, _ in replies(rec, "Z")] == [True, True], replies(rec, "Z")
    assert replies(rec, "Z")[1][1].startswith("learning ended: model fan-demo-12483c73-site-v1")
    # a power cut between the version's record and the period's deletion: the next start finds
    # the period ended in that version and answers it then, once, without a second refit
    data = tmp_path / "power-cut"
    d, ctl, rec = device(data)
    record = Adapter._record

    class PowerCut(BaseException):
        pass

    def cut(self: Adapter, *args: object, **kwargs: object) -> None:
        record(self, *args, **kwargs)
        for name in ("period.json", "period.npz"):  # as the card holds them at the cut
            shutil.copy(self.folder / name, tmp_path / name)
        raise PowerCut

    monkeypatch.setattr(Adapter, "_record", cut)
    with pytest.raises(PowerCut):
        d.run(hooked(NORMAL_FILES, {5: send(ctl, **start, id="P")}))
    monkeypatch.setattr(Adapter, "_record", record)
    assert len(replies(rec, "P")) == 1, "begun, not yet ended"
    for name in ("period.json", "period.npz"):
        shutil.copy(tmp_path / name, data / "learning" / name)
    d, ctl, rec = device(data)
    d.run(FileSource(NORMAL_FILES[:1], RATE))
    ((ok, detail),) = replies(rec, "P")
    assert ok and detail.startswith("learning ended: model fan-demo-12483c73-site-v1"), detail
    assert d.bundle.model_id == "fan-demo-12483c73-site-v1", "the version made before the cut"
    assert not (data / "learning" / "period.json").exists()


def test_while_learning_no_anomaly_event_is_raised_but_health_faults_still_are(
    tmp_path: Path,
) -> None:
    dead = tmp_path / "dead.wav"
    sf.write(dead, np.zeros(8 * RATE, np.float32), RATE)  # a dead microphone, 8 s
    settings = load_settings(
        None, model=DEMO_BUNDLE, data_dir=tmp_path / "data", learning={"seconds": 600}
    )
    events, reports = io.StringIO(), Recorder()
    d = Detector(settings, load_bundle(DEMO_BUNDLE), [JsonLinesSink(events), reports], persist=True)
    d.run(FileSource([ANOMALOUS_FILE, dead], RATE))
    assert events.getvalue() == "", "no anomaly event while learning, even for a fault"
    assert "fault:silence" in [h.change for h in reports.healths]
    assert {"learning", "fault"} <= {s.state for s in reports.states}
    assert [s.progress for s in reports.states if s.progress][-1] == round(3.5 / 600, 4)
    assert d.adapter.period.collected_s == pytest.approx(3.5), "7 running windows, no silence"


def test_learning_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match=r"^invalid setting learning.seconds \(got -1\)"):
        load_settings(None, learning={"seconds": -1})
    with pytest.raises(SettingsError, match=r"learning\.days: unknown key"):
        load_settings(None, learning={"days": 1})


# --- remote changes that persist ---------------------------------------------------------------


def test_threshold_and_mute_survive_a_restart_and_the_threshold_belongs_to_its_model(
    tmp_path: Path,
) -> None:
    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    value = load_bundle(DEMO_BUNDLE).threshold * 1.5
    assert device.command(command="set_threshold", value=value, id="t1").ok
    assert device.command(command="mute", minutes=30, id="m1").ok
    events = device.replay(ANOMALOUS_FILE)  # a restart
    d = device.detector
    assert d.threshold == pytest.approx(value) and d.status()["muted_until"] is not None
    assert starts(events) == [], "muted across the restart"
    assert device.command(command="unmute").ok
    assert device.replay(NORMAL_FILES[0]) == [] and device.detector.muted_until == 0.0
    assert device.detector.threshold == pytest.approx(value)
    device.detector.use_bundle(load_bundle(AE_BUNDLE), reason="reload")
    assert device.detector.threshold == pytest.approx(load_bundle(AE_BUNDLE).threshold)
    state = json.loads((device.data / "state.json").read_text())
    assert state["threshold"] is None and state["model"] == load_bundle(AE_BUNDLE).model_id


# --- the trend ---------------------------------------------------------------------------------


def test_the_anomaly_index_is_about_one_on_normal_audio_and_high_on_a_fault(
    tmp_path: Path,
) -> None:
    device = Device(tmp_path)
    device.replay(*NORMAL_FILES)
    normal = device.detector.status()["anomaly_index"]
    device.replay(ANOMALOUS_FILE)
    fault = device.detector.status()["anomaly_index"]
    assert 0.5 < normal < 1.5 and fault > 1.5 * normal, (normal, fault)


# --- the daemon on a microphone, with a broker -------------------------------------------------


@pytest.mark.slow
def test_commissioning_on_a_pulseaudio_microphone_ends_in_a_version_used_after_a_restart(
    pulse: str, broker: Broker, tmp_path: Path
) -> None:
    normal = tmp_path / "normal.wav"
    audio = np.concatenate([read_audio(f, RATE) for f in NORMAL_FILES])
    sf.write(normal, np.tile(audio, 6), RATE, subtype="PCM_16")
    config = tmp_path / "mic.toml"
    config.write_text(
        f'device_id = "mic"\ndata_dir = "{tmp_path / "data"}"\nstate_interval_seconds = 1\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nmetrics_interval_seconds = 1\n'
    )
    sub = Subscriber(broker.port, "soundsentry/mic/#")
    module = subprocess.run(  # a sink of its own: no other test's audio mixes into it
        ["pactl", "load-module", "module-null-sink", f"sink_name={SINK}", "rate=16000",
         "channels=1"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    player = subprocess.Popen(["paplay", "-d", SINK, str(normal)])
    log = tmp_path / "daemon.log"

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*SOUNDSENTRY, "--log-level", "INFO", "run", "--model", str(DEMO_BUNDLE), "--device",
             "pulse", "--config", str(config)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("a"), text=True,
            env={**_env(), "PULSE_SOURCE": f"{SINK}.monitor"},
        )  # fmt: skip

    def send(**payload: object) -> dict:
        before = len(sub.on("/response"))
        sub.client.publish("soundsentry/mic/set", json.dumps(payload), qos=1)
        assert sub.wait_for(lambda _: len(sub.on("/response")) > before, timeout=15), payload
        return sub.on("/response")[-1].json()

    def states() -> list[dict]:
        return [m.json() for m in sub.on("/state") if m.payload.startswith("{")]

    proc = start()
    try:
        assert sub.wait_for(lambda ms: any(m.payload == "online" for m in ms), timeout=60)
        reply = send(command="learn", action="start", seconds=10, id="l-1")
        assert reply["ok"] and reply["id"] == "l-1", reply
        wait_for(
            lambda: any(s["state"] == "learning" and 0 < s.get("progress", 0) < 1
                        for s in states()),
            20, "state `learning` with its progress", lambda: states()[-3:],
        )  # fmt: skip
        learned = wait_for(
            lambda: next((s["model"] for s in states() if s["model"].endswith("-site-v1")), None),
            30, "the learned version in use", lambda: states()[-3:],
        )  # fmt: skip
        index = wait_for(
            lambda: [m.json()["anomaly_index"] for m in sub.on("/metrics")
                     if m.json().get("anomaly_index") is not None],
            20, "the anomaly index in metrics",
        )  # fmt: skip
        assert 0 < index[-1] < 5
        proc.send_signal(signal.SIGHUP)  # a reload with the same configured model keeps it
        wait_for(lambda: "keeping version 1" in log.read_text(), 20, "the reload to keep version 1")
        value = load_bundle(DEMO_BUNDLE).threshold  # within the learned one's bounds
        assert send(command="set_threshold", value=value, id="th-1")["ok"]
        assert send(command="mute", minutes=60, id="mu-1")["ok"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        sub.messages.clear()
        proc = start()
        wait_for(
            lambda: any(s["model"] == learned and s["state"] == "muted" for s in states()),
            30, "the learned version, still muted, after the restart", lambda: states()[-3:],
        )  # fmt: skip
        status = send(command="status", id="st-1")["status"]
        assert status["threshold"] == pytest.approx(value) and status["version"] == 1
        assert [h["reason"] for h in status["history"]] == ["learning"]
        (entry,) = json.loads((tmp_path / "data" / "models" / "history.json").read_text())[
            "entries"
        ]
        assert load_bundle(entry["path"]).manifest.calibration["channel"] == 0  # the mic's
        text = log.read_text()
        for line in ("command learn (id l-1)", "command set_threshold (id th-1)",
                     "command mute (id mu-1)", "using version 1"):  # fmt: skip
            assert line in text, line
    finally:
        proc.kill()
        player.kill()
        sub.close()
        subprocess.run(["pactl", "unload-module", module], capture_output=True)


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "SOUNDSENTRY_DATA_DIR"}


# --- the parts: pooling, bounded storage, bounded history --------------------------------------


def test_pooling_is_the_gaussian_of_both_samples_together() -> None:
    from edge.detectors.fluctuation import FluctuationScorer, fluctuation_features
    from edge.features import FeatureParams
    from edge.learning import SHRINKAGE, pooled

    params = replace(FeatureParams(), hop_seconds=1 / 16)  # dense: 130 windows a file
    feats = [fluctuation_features(windows_of(read_audio(f, RATE), params)) for f in NORMAL_FILES]
    train, site = (np.concatenate(f).astype(np.float64) for f in (feats[:2], feats[2:]))
    mean, std = train.mean(axis=0), train.std(axis=0)
    z_train, z_site = (train - mean) / std, (site - mean) / std
    cov_train = np.cov(z_train, rowvar=False, bias=True)
    trained = FluctuationScorer(mean, std, z_train.mean(axis=0), np.linalg.inv(cov_train))
    center, precision = pooled(trained, len(train), z_site)
    both = np.concatenate([z_train, z_site])
    cov = np.cov(both, rowvar=False, bias=True)
    shrunk = (1 - SHRINKAGE) * cov + SHRINKAGE * np.trace(cov) / len(cov) * np.eye(len(cov))
    np.testing.assert_allclose(center, both.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(np.linalg.inv(precision), shrunk, rtol=1e-6, atol=1e-9)


def test_a_long_period_keeps_how_neighbouring_windows_correlate() -> None:
    """Beyond max_windows the store kept single windows at random: read back in order, windows
    hours apart sat side by side, the refit measured r = 0.06 where the audio had 0.25, and
    its threshold allowed for independent windows (false alarms several times the budget)."""
    from edge.learning import FeatureStore
    from edge.threshold import score_autocorrelation

    rng = np.random.default_rng(0)
    n, r = 40000, 0.25
    z = np.zeros(n)
    for i in range(1, n):
        z[i] = r * z[i - 1] + math.sqrt(1 - r * r) * rng.standard_normal()
    scores = np.exp(0.3 * z)
    store = FeatureStore(1, capacity=4000)
    for i in range(0, n, 13):  # 13 windows per audio block, a new chunk every 10 minutes
        store.add(scores[i : i + 13, None], chunk=i // 1200)
    assert len(store) == 4000 and store.seen == n
    assert score_autocorrelation(store.x[:, 0]) == pytest.approx(
        score_autocorrelation(scores), abs=0.04
    )


def test_a_period_resumed_after_a_restart_keeps_a_uniform_sample(tmp_path: Path) -> None:
    """A store loaded from disk began counting its runs afresh, so every new run after a restart
    was kept: the sample became the windows heard since the restart."""
    from edge.learning import FeatureStore

    idx = np.arange(100000, dtype=float)[:, None]
    store = FeatureStore(1, capacity=2000)
    for i in range(0, 50000, 13):
        store.add(idx[i : min(i + 13, 50000)], chunk=i // 1200)
    store.save(tmp_path / "period.npz")
    store = FeatureStore.load(tmp_path / "period.npz", 2000)  # the daemon restarted
    for i in range(50000, 100000, 13):
        store.add(idx[i : i + 13], chunk=i // 1200)
    assert store.seen == 100000 and len(store) == 2000
    assert np.mean(store.x[:, 0] >= 50000) == pytest.approx(0.5, abs=0.15)


def test_site_features_stay_bounded_and_survive_a_save(tmp_path: Path) -> None:
    from edge.learning import FeatureStore

    store = FeatureStore(4, capacity=1000)
    rows = np.arange(20000, dtype=float)[:, None] * np.ones(4)
    for i in range(0, len(rows), 7):
        store.add(rows[i : i + 7], chunk=i // 120)
    assert len(store) == 1000 and store.seen == 20000
    # a uniform sample of all, in 50 runs of 20 (the mean's spread: 8 %)
    assert store.x[:, 0].mean() == pytest.approx(10000, rel=0.2), "a uniform sample of all"
    assert len(np.unique(store.x[:, 0] // 5000)) == 4, "from every quarter of the period"
    # read back in arrival order (the refit's CUSUM measures neighbouring windows' correlation)
    assert np.all(np.diff(store.x[:, 0]) > 0) and np.all(np.diff(store.chunk) >= 0)
    store.save(tmp_path / "s.npz")
    again = FeatureStore.load(tmp_path / "s.npz", 1000)
    assert np.array_equal(again.x, store.x) and np.array_equal(again.chunk, store.chunk)
    again.add(np.arange(20000, 30000, dtype=float)[:, None] * np.ones(4), chunk=200)
    assert np.all(np.diff(again.x[:, 0]) > 0), "still in order after a reload"
    assert (tmp_path / "s.npz").stat().st_mode & 0o777 == 0o600


def test_what_the_site_keeps_fits_the_service_s_memory_whatever_max_windows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`max_windows` was accepted up to a million and a refit held about 40 bytes per feature
    number: 50,000 windows of the levels kind's 192 features took a refit to 369 MB, past the
    unit's MemoryMax (killed at the end of the period, and again at every start), and an
    hour-long event marked normal added all its 7,200 windows (a review). A period keeps
    SITE_NUMBERS numbers at most, a mark MARK_NUMBERS, each a uniform sample beyond."""
    from edge.adapt import Adapter
    from edge.learning import MARK_NUMBERS, SITE_NUMBERS, FeatureStore

    bundle = load_bundle(DEMO_BUNDLE)  # fluctuation: 64 numbers per window
    data = tmp_path / "data"
    settings = load_settings(
        None, model=DEMO_BUNDLE, data_dir=data, learning={"max_windows": 1_000_000}
    )
    adapter = Adapter(data, settings.learning, bundle, DEMO_BUNDLE)
    with caplog.at_level(logging.WARNING, logger="edge.adapt"):
        adapter.start(LEARN_S, bundle)
    assert adapter.period is not None
    assert adapter.period.store.capacity == SITE_NUMBERS // 64 < 1_000_000
    assert f"keeps at most {SITE_NUMBERS // 64} windows of 64 features" in caplog.text
    adapter.cancel()
    small = load_settings(None, model=DEMO_BUNDLE, data_dir=data, learning={"max_windows": 500})
    adapter = Adapter(data, small.learning, bundle, DEMO_BUNDLE)
    adapter.start(LEARN_S, bundle)
    assert adapter.period is not None and adapter.period.store.capacity == 500, "within: as set"
    rows = fluctuation_rows(bundle)
    assert any(adapter.observe(row) for row in rows)
    in_use = adapter.finish(bundle)
    # an hour-long event marked normal: a sample of its windows, from all of it
    rng = np.random.default_rng(0)
    hour = np.resize(rows, (7200, rows.shape[1])) + rng.normal(0, 0.01, (7200, rows.shape[1]))
    hour[:, 0] += np.arange(7200) * 1e-3  # each window's place in the event, to see the sample
    adapter.mark("e1", hour, in_use)
    kept = FeatureStore.load(data / "learning" / "marked" / "e1.npz", 1_000_000)
    assert len(kept) == MARK_NUMBERS // 64 < 7200 and kept.seen == 7200
    place = np.round((kept.x[:, 0] - hour[0, 0]) / 1e-3)
    assert place.max() > 6000 > 1000 > place.min(), "from the whole event, not its start"
    # a store saved larger (a period resumed after a restart, a release before the cap): its
    # room is the cap's again, and what it holds beyond, evenly spaced runs (a second review)
    big = FeatureStore(64, 100_000)
    big.add(np.arange(100_000, dtype=np.float32)[:, None] * np.ones(64, np.float32), 0)
    big.save(tmp_path / "period.npz")
    with caplog.at_level(logging.WARNING, logger="edge.learning"):
        resumed = FeatureStore.load(tmp_path / "period.npz", 1_000_000)
    assert resumed.capacity == len(resumed) == SITE_NUMBERS // 64 and resumed.seen == 100_000
    assert resumed.x[0, 0] == 0 and resumed.x[-1, 0] == 99_999, "from all of it"
    assert "holds 100000 windows; keeping 62500 of them" in caplog.text


def test_a_saved_period_larger_than_the_cap_is_thinned_as_it_is_read(tmp_path: Path) -> None:
    """A period saved with a million windows (under a larger `max_windows`, or by a release
    before the cap) was read whole to keep 62,500 of them: 360 MB at the start, past the unit's
    MemoryMax, at every start (an upgrade review). It is read a block at a time: the memory is
    that of the windows kept, which are the evenly spaced runs `spread` names."""
    import tracemalloc

    from edge.learning import SITE_NUMBERS, FeatureStore, spread

    n = 200_000  # 51 MB of float32 features
    big = FeatureStore(64, n)
    big.add(np.arange(n, dtype=np.float32)[:, None] * np.ones(64, np.float32), 0)
    big.save(tmp_path / "period.npz")
    del big
    tracemalloc.start()
    try:
        resumed = FeatureStore.load(tmp_path / "period.npz", 1_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    kept = SITE_NUMBERS // 64
    assert len(resumed) == kept and resumed.seen == n
    assert np.array_equal(resumed.x[:, 0], spread(n, kept).astype(np.float32))
    assert np.array_equal(resumed.x[:, 63], resumed.x[:, 0])
    assert peak < 2 * kept * 64 * 4, f"{peak / 1e6:.0f} MB to keep {kept * 64 * 4 / 1e6:.0f} MB"


def fluctuation_rows(bundle: Bundle) -> np.ndarray:
    """The demo fan's normal windows as the fluctuation kind's feature vectors."""
    from edge.learning import FEATURIZERS

    featurize = FEATURIZERS[bundle.manifest.kind]
    return np.concatenate(
        [featurize(windows_of(read_audio(f, RATE), bundle.features)) for f in NORMAL_FILES]
    )


def test_a_learning_period_is_saved_every_ten_minutes_of_audio_not_every_minute(
    tmp_path: Path,
) -> None:
    """Every minute of audio rewrote the whole feature store with fsync (5.3 MB at 20000
    windows): 7 GB a day on an SD card. 11 minutes of running fan audio now save it once
    between the start and the stop, and the saved period resumes after a restart."""
    minutes = 11
    device = Device(tmp_path, seconds=3600)
    period = device.data / "learning" / "period.npz"
    writes: list[tuple[int, int]] = []

    def look(_step: object) -> None:
        st = period.stat()
        if not writes or writes[-1] != (st.st_ino, st.st_mtime_ns):
            writes.append((st.st_ino, st.st_mtime_ns))

    fan = np.concatenate([read_audio(f, RATE) for f in NORMAL_FILES])
    block = 4096
    total = minutes * 60 * RATE
    audio = np.resize(fan, total)  # the fan, running for 11 minutes
    detector = Detector(device.settings(), load_bundle(DEMO_BUNDLE), [], on_step=look, persist=True)
    assert detector.learning
    detector.run(audio[i : i + block] for i in range(0, total, block))
    assert len(writes) == 2, "the save at the start, then one after 10 minutes of audio"
    with np.load(period) as saved:
        assert len(saved["x"]) > 2 * 600  # the stop saved everything collected
    again = Detector(device.settings(), load_bundle(DEMO_BUNDLE), [], persist=True)
    assert again.adapter.period.collected_s == pytest.approx(minutes * 60, abs=2)


def test_a_failed_save_leaves_no_temporary_file_and_old_ones_go_at_start(tmp_path: Path) -> None:
    """A save that failed (a full disk) left `.period.npz.tmp-PID` (up to 5 MB) and
    `.history.json.tmp-PID` behind, one more at each restart (the PID is in the name). A
    file-size limit in a child process makes the writes fail part-way, as a full disk does."""
    folder = tmp_path / "full"
    folder.mkdir()
    script = f"""
import resource, signal, sys
import numpy as np
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from edge.history import write_json
from edge.learning import FeatureStore
folder = Path({str(folder)!r})
store = FeatureStore(64, 5000)
store.add(np.random.default_rng(0).standard_normal((5000, 64)), 0)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
for write in (lambda: store.save(folder / "period.npz"),
              lambda: write_json(folder / "history.json", {{"x": "y" * 10000}})):
    try:
        write()
    except OSError as exc:
        print("failed:", exc.strerror)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert proc.stdout.count("failed: File too large") == 2, proc.stdout + proc.stderr
    assert list(folder.iterdir()) == [], "neither the store's nor the JSON's temporary file"
    # temporary files of writes a power cut interrupted: a dead process's go, a live one's stay
    dead = _dead_pid()
    data = tmp_path / "data"
    stale = [
        data / "learning" / f".period.npz.tmp-{dead}",
        data / "learning" / "marked" / f".ev1.npz.tmp-{dead}",
        data / "models" / f".history.json.tmp-{dead}",
        data / f".state.json.tmp-{dead}",
    ]
    live = data / "learning" / ".period.npz.tmp-1"  # PID 1 always runs
    for path in [*stale, live]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
    Device(tmp_path).replay(NORMAL_FILES[0])  # a start
    assert [p for p in stale if p.exists()] == [] and live.exists()


def _dead_pid() -> int:
    """The PID of a process that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_command_delivered_twice_runs_once_and_gets_its_first_reply_again(
    tmp_path: Path,
) -> None:
    """MQTT QoS 1 delivers at least once: a repeated `learn start` restarted the period, a
    repeated rollback stepped back two versions. A command of the same id and content within
    a few minutes gets the first reply again and is not run; another id runs."""
    device = Device(tmp_path)
    detector = Detector(device.settings(), load_bundle(DEMO_BUNDLE), [], persist=True)
    control = Controller(detector)
    start = json.dumps({"command": "learn", "action": "start", "seconds": 600, "id": "L1"})
    first = control.handle_payload(start.encode())
    assert first.ok and detector.learning
    fan = read_audio(NORMAL_FILES[0], RATE)
    for i in range(0, len(fan), 4096):
        detector.feed(fan[i : i + 4096])
    collected = detector.adapter.period.collected_s
    assert collected > 2  # 4.5 s of windows, the last 2 s not yet learnt (STOP_SECONDS)
    again = control.handle_payload(start.encode())  # the broker's redelivery
    assert again == first and detector.adapter.period.collected_s == collected
    other = control.handle_payload(start.replace('"L1"', '"L2"').encode())  # a new command
    assert other.ok and other != first and detector.adapter.period.collected_s == 0


def test_learning_data_goes_with_the_versions_that_use_it_and_marks_are_bounded(
    tmp_path: Path,
) -> None:
    """Each finished period left learning/site-<time>.npz (up to 5.3 MB) and each mark
    learning/marked/<id>.npz, never deleted when their versions were pruned; and every version
    carried all marks into the next, each refit loading them all (growing without bound)."""
    from edge.adapt import MAX_MARKS, Adapter
    from edge.learning import FEATURIZERS

    bundle = load_bundle(DEMO_BUNDLE)
    data = tmp_path / "data"
    settings = load_settings(None, model=DEMO_BUNDLE, data_dir=data, learning={"keep_versions": 1})
    adapter = Adapter(data, settings.learning, bundle, DEMO_BUNDLE)
    featurize = FEATURIZERS[bundle.manifest.kind]
    normal = np.concatenate(
        [featurize(windows_of(read_audio(f, RATE), bundle.features)) for f in NORMAL_FILES]
    )

    def learn(in_use: object) -> object:
        adapter.start(LEARN_S, bundle)
        assert any(adapter.observe(row) for row in normal)
        return adapter.finish(in_use)

    in_use = learn(bundle)
    (first_site,) = (data / "learning").glob("site-*.npz")
    fault = featurize(windows_of(read_audio(ANOMALOUS_FILE, RATE), bundle.features))
    for n in range(MAX_MARKS + 1):
        in_use = adapter.mark(f"e{n}", fault[n % 3 : n % 3 + 4], in_use)
    carried = adapter.history.current["marked"]
    assert carried == [f"e{n}" for n in range(1, MAX_MARKS + 1)], "the oldest mark goes"
    note = adapter.last_refit["note"]  # and the reply says so (only logged at INFO, in a review)
    assert note.startswith(f"at most {MAX_MARKS} marks are carried") and ": e0 (" in note
    marks = {p.stem for p in (data / "learning" / "marked").glob("*.npz")}
    assert marks == set(carried), "its file with it"
    wait_for(lambda: time.strftime("%S") != first_site.stem[-2:], 10, "the next second")
    learn(in_use)  # a new period: the first one's version is long pruned
    (site,) = (data / "learning").glob("site-*.npz")
    assert site != first_site and adapter.history.current["site"] == site.name


def test_learn_cancel_and_stop_and_a_bounded_history(tmp_path: Path) -> None:
    device = Device(tmp_path, keep_versions=2)
    device.replay(NORMAL_FILES[0])
    assert device.command(command="learn", action="start", seconds=600, id="a").ok
    assert device.detector.current_state() == "learning"
    assert device.command(command="learn", action="cancel").ok
    assert device.detector.current_state() == "normal"
    assert not (device.data / "learning" / "period.json").exists()
    assert not device.command(command="learn", action="stop").ok, "nothing to stop"
    assert device.command(command="learn", action="start", seconds=600).ok
    before = device.detector.status()["last_refit"]
    reply = device.command(command="learn", action="stop")  # nothing heard: no empty version
    assert not reply.ok and "nothing has been learnt" in reply.detail, reply.detail
    assert "refit failed" not in reply.detail, "no refit ran"
    assert device.detector.status()["last_refit"] == before, "the last refit's outcome stays"
    assert device.detector.current_state() == "learning"
    assert device.command(command="learn", action="cancel").ok
    device.command(command="learn", action="start", seconds=600)
    assert starts(device.replay(*NORMAL_FILES)) == [], "no anomaly events while learning"
    reply = device.command(command="learn", action="stop", id="b")
    assert reply.ok and "learning stopped: model fan-demo-12483c73-site-v1" in reply.detail
    for fault in (ANOMALOUS_FILE, other_fault(tmp_path)):
        (event,) = starts(device.replay(fault))
        assert device.command(command="mark_normal", event_id=event["event_id"]).ok
    status = device.detector.status()
    assert [h["version"] for h in status["history"]] == [3, 2], "keep_versions = 2"
    assert not (device.data / "models" / "fan-demo-12483c73-v1.bundle").exists()
    assert device.command(command="rollback").detail == "rolled back to fan-demo-12483c73-site-v2"
    assert device.command(command="rollback").detail == "rolled back to fan-demo-12483c73"
    assert device.detector.status()["learns"] is False  # the demo's bundle alone again


def test_a_mute_pauses_the_learning_period(tmp_path: Path) -> None:
    """Muted for maintenance, a period went on taking every running window: a fault (or the
    grinding of a repair) joined the site's normal set and raised the refitted threshold."""
    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    assert device.command(command="learn", action="start", seconds=600).ok
    assert device.command(command="mute", minutes=30).ok
    device.replay(ANOMALOUS_FILE)
    assert device.detector.status()["learning"]["collected_s"] == 0
    assert device.command(command="unmute").ok
    device.replay(NORMAL_FILES[0])
    assert device.detector.status()["learning"]["collected_s"] > 0


def test_a_period_whose_version_was_recorded_is_not_refitted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut after the new version was recorded but before the period's files went: the
    restart resumed the finished period and refitted it a second time (version 2, the same
    audio), and held events off until it had."""
    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    assert device.command(command="learn", action="start", seconds=3600).ok
    device.replay(*NORMAL_FILES)
    real_cancel = Adapter.cancel
    with monkeypatch.context() as patch:
        patch.setattr(Adapter, "cancel", lambda self: False)  # the cut comes before it runs
        assert device.command(command="learn", action="stop").ok
    assert (device.data / "learning" / "period.json").exists()
    assert Adapter.cancel is real_cancel
    device.replay(NORMAL_FILES[0])
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v1"
    assert not device.detector.learning
    assert [h["version"] for h in device.detector.status()["history"]] == [1]
    assert not (device.data / "learning" / "period.json").exists()


def test_the_summary_counts_recordings_by_content_not_by_name() -> None:
    """State folders often hold files of the same names (00000000.wav in each): the summary
    counted 16 recordings for 26."""
    from conftest import DEMO_BUNDLE

    from edge.advice import bundle_summary
    from edge.bundle import FileRecord, load_bundle

    manifest = load_bundle(DEMO_BUNDLE).manifest
    same_name = [FileRecord(name="00000000.wav", sha256=f"{i:064x}") for i in range(3)]
    training = manifest.training.model_copy(update={"files": same_name, "holdout_files": []})
    text = bundle_summary(manifest.model_copy(update={"training": training, "calibration": None}))
    assert " from 3 recording(s)" in text.splitlines()[0], text


def test_a_history_that_cannot_be_saved_is_left_as_it_was(tmp_path: Path) -> None:
    """record() appended the entry, made it active and deleted the folders of pruned versions
    before saving: when the save failed (a full disk) the refit failed, yet the history in
    memory named a version whose bundle was gone, and the next successful save wrote it."""
    from edge.history import ModelHistory

    folder = tmp_path / "models"
    history = ModelHistory(folder, keep=1, configured="fan-demo-12483c73")
    v1 = shutil.copytree(DEMO_BUNDLE, folder / "v1.bundle")
    history.record(load_bundle(v1), "learning", DEMO_BUNDLE, True, of="fan-demo-12483c73")
    v2 = shutil.copytree(DEMO_BUNDLE, folder / "v2.bundle")
    before = json.loads(history.path.read_text())
    history.path.unlink()
    history.path.mkdir()  # history.json cannot be replaced now
    (history.path / "keep").write_text("x")
    with pytest.raises(OSError):
        history.record(load_bundle(v2), "mark_normal", DEMO_BUNDLE, True)
    assert history.active == 1 and [e["version"] for e in history.entries] == [1]
    assert v1.is_dir(), "the version it would have pruned is still there"
    shutil.rmtree(history.path)
    history.save()
    assert json.loads(history.path.read_text())["entries"] == before["entries"]


def test_a_period_begun_for_another_model_is_not_resumed_by_it(tmp_path: Path) -> None:
    """A period saved for one model was resumed by whatever model was configured next: an
    autoencoder (which cannot learn) stayed `learning` for good and never raised an event
    again; a model with other features crashed on every window, restart after restart."""
    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    assert device.command(command="learn", action="start", seconds=600).ok
    device.replay(NORMAL_FILES[1])  # saved at the stop, for fan-demo
    assert json.loads((device.data / "learning" / "period.json").read_text())["collected_s"] > 0
    device.bundle = AE_BUNDLE  # the config now names another model
    device.event_logic = {"threshold": 0.3}  # below the fault's windows (0.6 at most)
    events = device.replay(ANOMALOUS_FILE)
    assert not device.detector.learning and device.detector.current_state() != "learning"
    assert len(starts(events)) == 1, "the new model raises events"
    assert not (device.data / "learning" / "period.json").exists()


def test_a_period_saved_before_periods_named_their_model_is_not_resumed_by_another(
    tmp_path: Path,
) -> None:
    """A period saved by a release that did not record its model (`of`) was resumed by any
    model of the same kind configured after an upgrade: the old setup's sound learnt as normal
    into the new model (an upgrade review). The history says which model was configured."""
    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    assert device.command(command="learn", action="start", seconds=600).ok
    device.replay(NORMAL_FILES[1])  # saved at the stop, for fan-demo
    path = device.data / "learning" / "period.json"
    saved = json.loads(path.read_text())
    old = {k: saved[k] for k in ("seconds", "collected_s", "started_at")}  # the old format
    windows = (device.data / "learning" / "period.npz").read_bytes()

    def put_back() -> None:
        path.write_text(json.dumps(old))
        (device.data / "learning" / "period.npz").write_bytes(windows)

    history = device.data / "models" / "history.json"
    model = load_bundle(DEMO_BUNDLE).model_id
    history.parent.mkdir(exist_ok=True)
    for recorded in (None, model):  # no history: its model unknown, so not resumed
        if recorded:
            history.write_text(json.dumps({"configured": recorded, "active": None, "entries": []}))
        put_back()
        device.replay(NORMAL_FILES[1])  # the same model configured
        assert device.detector.learning == bool(recorded), recorded
    put_back()
    other = tmp_path / "other.bundle"  # a model of the same kind
    cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(other))
    device.bundle = other
    device.replay(NORMAL_FILES[0])
    assert not device.detector.learning, "resumed into another model"
    assert not path.exists()


def test_a_period_is_cancelled_when_another_model_is_loaded(tmp_path: Path) -> None:
    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    assert device.command(command="learn", action="start", seconds=600).ok
    other = tmp_path / "models" / "other.bundle"
    cli("train", "--normal", *map(str, NORMAL_FILES[1:]), str(ANOMALOUS_FILE), "--out", str(other))
    device.detector.settings = device.detector.settings.model_copy(
        update={"models_dir": other.parent}
    )
    reply = device.command(command="reload_model", path=str(other))
    assert reply.ok, reply.detail
    assert not device.detector.learning, "its features were the old model's"
    assert not (device.data / "learning" / "period.json").exists()


def test_sighup_to_another_configured_model_starts_its_learning_afresh(tmp_path: Path) -> None:
    """The adapter kept the first configured model: versions made after the switch were
    filed under it (and thrown away at the next start), rollback went back to it."""
    device = Device(tmp_path, seconds=LEARN_S)
    device.replay(*NORMAL_FILES)  # fan-demo learns: version 1
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v1"
    other = tmp_path / "other.bundle"
    cli("train", "--normal", *map(str, NORMAL_FILES), str(DEMO_CLIP), "--out", str(other))
    new = device.detector.settings.model_copy(update={"model": other})
    Controller(device.detector, reload_settings=lambda: new).reload()
    d = device.detector
    assert d.bundle.path == other.resolve() or d.bundle.path == other
    assert d.adapter.configured.path == d.bundle.path
    assert d.learning, "[learning] seconds begins the new model's period, as a restart would"
    reply = device.command(command="rollback")
    assert not reply.ok and "configured model is in use" in reply.detail
    # and back: the first model's site version, as a restart with it would run (the configured
    # model was loaded while the history said version 1, which a restart then ran)
    back = device.detector.settings.model_copy(update={"model": DEMO_BUNDLE})
    Controller(device.detector, reload_settings=lambda: back).reload()
    assert d.bundle.model_id == "fan-demo-12483c73-site-v1"
    assert d.status()["version"] == 1


@pytest.mark.parametrize("persist", [True, False], ids=["service", "replay"])
def test_sighup_to_another_model_checks_the_settings_against_it(
    tmp_path: Path, persist: bool
) -> None:
    """A SIGHUP with another [model] and [detector] settings only that model can take (K = 5
    where it keeps N = 6 and the running one 3) was refused as a whole: the settings were
    checked against the running model, and the new one was loaded only at a restart. Without
    a data_dir kept (`replay`) it was refused still, after the service's path was mended."""
    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    six = _keeping_six_windows(tmp_path)
    d = device.detector
    if not persist:
        d = Detector(d.settings, d.bundle, [], persist=False)
    k5 = d.settings.detector.model_copy(update={"trigger_windows": 5})
    new = d.settings.model_copy(update={"model": six, "detector": k5})
    Controller(d, reload_settings=lambda: new).reload()
    assert d.bundle.path == load_bundle(six).path
    assert (d.pipeline.events.k, d.pipeline.events.n) == (5, 6)


def test_sighup_to_another_model_that_cannot_take_the_settings_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The settings were applied against the running model (K = 5 of its N = 6), then the new
    one (N = 3) failed to build with them: "command failed: SettingsError", and the daemon went
    on with the old model under settings that named the new one (in a review). Now refused in
    one line, with nothing changed."""
    device = Device(tmp_path, bundle=_keeping_six_windows(tmp_path))
    device.replay(NORMAL_FILES[0])
    d = device.detector
    k5 = d.settings.detector.model_copy(update={"trigger_windows": 5})
    new = d.settings.model_copy(update={"model": DEMO_BUNDLE, "detector": k5})
    with caplog.at_level(logging.ERROR):
        Controller(d, reload_settings=lambda: new).reload()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(said) == 1 and said[0].startswith("reload: settings not applied"), said
    assert d.bundle.path == device.bundle.resolve() or d.bundle.path == device.bundle
    assert d.settings.detector.trigger_windows is None and d.settings.model == device.bundle


def _keeping_six_windows(tmp_path: Path) -> Path:
    """The demo bundle, its threshold calibrated for K of N = 6 windows (as if older)."""
    demo = load_bundle(DEMO_BUNDLE)
    manifest = demo.manifest.model_dump(exclude={"files", "checksum", "arrays"})
    manifest["threshold"]["params"]["n"] = 6
    return write_bundle(tmp_path / "six.bundle", manifest, {}, demo.arrays)


def test_sighup_after_a_bundle_was_trained_again_at_the_same_path_loads_it(
    tmp_path: Path,
) -> None:
    """With a learned version in use, a reload compared the configured path only: a bundle
    trained again and written over it was ignored ("the model is unchanged: keeping version
    1") until a restart, and refits went on from the old one."""
    configured = shutil.copytree(DEMO_BUNDLE, tmp_path / "models" / "fan.bundle")
    device = Device(tmp_path, bundle=configured, seconds=LEARN_S)
    device.replay(*NORMAL_FILES)
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v1"
    cli("train", "--normal", *map(str, NORMAL_FILES), str(DEMO_CLIP), "--out", str(configured))
    retrained = load_bundle(configured).model_id
    assert retrained != "fan-demo-12483c73"
    Controller(device.detector, reload_settings=device.settings).reload()
    d = device.detector
    assert d.bundle.model_id == retrained and d.adapter.configured.model_id == retrained
    Controller(device.detector, reload_settings=device.settings).reload()  # nothing new
    assert d.bundle.model_id == retrained


def test_sighup_after_the_configured_bundle_was_deleted_says_a_restart_would_fail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With a site version in use, the configured bundle deleted: a reload said only "the model
    is unchanged: keeping version 1", and the next restart failed with "no such model bundle"
    (an operator's review). The version goes on, and the reload says what a restart will do."""
    configured = shutil.copytree(DEMO_BUNDLE, tmp_path / "models" / "fan.bundle")
    device = Device(tmp_path, bundle=configured, seconds=LEARN_S)
    device.replay(*NORMAL_FILES)
    shutil.rmtree(configured)
    with caplog.at_level(logging.INFO):
        Controller(device.detector, reload_settings=device.settings).reload()
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v1"
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(said) == 1 and said[0].startswith(f"reload: the configured model {configured} "
                                                 "does not load ("), said  # fmt: skip
    assert said[0].endswith(
        "version 1 goes on until the daemon restarts, which fails until the bundle is put back"
    )


def test_sighup_after_a_bundle_was_trained_again_before_any_site_version_configures_it(
    tmp_path: Path,
) -> None:
    """Without a site version the reload loaded the retrained bundle but the adapter kept the
    old one as the configured model: a period then refitted the old model (`from_model`),
    rollback went back to a model no longer on disk, and the next restart dropped the versions
    as made for another model (in a review)."""
    configured = shutil.copytree(DEMO_BUNDLE, tmp_path / "models" / "fan.bundle")
    device = Device(tmp_path, bundle=configured)
    device.replay(NORMAL_FILES[0])
    cli("train", "--normal", *map(str, NORMAL_FILES), str(DEMO_CLIP), "--out", str(configured))
    retrained = load_bundle(configured).model_id
    Controller(device.detector, reload_settings=device.settings).reload()
    d = device.detector
    assert d.bundle.model_id == retrained and d.adapter.configured.model_id == retrained


def test_sighup_after_a_bundle_was_trained_again_with_another_budget_takes_its_threshold(
    tmp_path: Path,
) -> None:
    """The reload compared model ids, which are the fitted arrays': the same recordings trained
    again with a tenth of the false-alarm budget kept the id, and the reload said "the model is
    unchanged", keeping the old threshold until a restart (in a review)."""
    configured = tmp_path / "models" / "fan.bundle"
    cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(configured))
    device = Device(tmp_path, bundle=configured)
    device.replay(NORMAL_FILES[0])
    before = device.detector.threshold
    cli(
        "train", "--normal", *map(str, NORMAL_FILES), "--out", str(configured),
        "--false-alarms-per-day", "0.1",
    )  # fmt: skip
    retrained = load_bundle(configured)
    assert retrained.threshold != before
    Controller(device.detector, reload_settings=device.settings).reload()
    assert device.detector.threshold == pytest.approx(retrained.threshold)


def test_a_refused_period_ending_in_the_same_second_keeps_the_features_a_version_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Site features were named by the second a period ended: after the clock was set back (a
    Pi without RTC), a refused period's clean-up deleted the file of version 1, and every
    later mark_normal failed ("site features ... unreadable")."""
    import edge.adapt

    frozen = time.gmtime(1_700_000_000)
    monkeypatch.setattr(edge.adapt.time, "gmtime", lambda *_: frozen)
    device = Device(tmp_path, seconds=LEARN_S)
    device.replay(*NORMAL_FILES)
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v1"
    device.learning = {}
    assert device.command(command="learn", action="start", seconds=LEARN_S).ok
    device.replay(NORMAL_FILES[0])  # 5 s, and a stop: too little audio, that refit is refused
    assert not device.command(command="learn", action="stop").ok
    assert "error" in device.detector.status()["last_refit"]
    (event,) = starts(device.replay(ANOMALOUS_FILE))
    reply = device.command(command="mark_normal", event_id=event["event_id"])
    assert reply.ok, reply.detail


def test_a_mark_with_the_event_logic_changed_in_the_settings_lets_the_event_pass(
    tmp_path: Path,
) -> None:
    """A refit set its threshold for the bundle's 3 of 4 while the daemon ran the settings' 1
    of 1: "marked normal, threshold 1.317 -> 1.775", and the same sound raised its event again
    (and the predicted false alarms were those of another event logic)."""
    device = Device(tmp_path, seconds=LEARN_S)
    device.event_logic = {"trigger_windows": 1, "trigger_of": 1, "release_windows": 2}
    device.replay(*NORMAL_FILES)
    device.learning = {}
    assert len(starts(device.replay(ANOMALOUS_FILE))) == 1
    assert device.command(command="mark_normal", event_id="last").ok
    params = device.detector.bundle.manifest.threshold.params
    assert (params["k"], params["n"], params["m"]) == (1, 1, 2)
    assert starts(device.replay(ANOMALOUS_FILE)) == []


def test_last_after_a_restart_is_the_latest_event_though_the_clock_went_back(
    tmp_path: Path,
) -> None:
    """`last` after a restart was the newest clip by its name, a wall-clock stamp: a Pi
    without RTC, set back 30 min after a power cut, named the latest event's clip earlier
    than the one before, and the wrong sound was marked normal."""
    device = Device(tmp_path)
    starts(device.replay(ANOMALOUS_FILE))
    clips = device.data / "clips"
    before = set(clips.glob("*.wav"))
    (latest,) = starts(device.replay(ANOMALOUS_FILE))
    (clip,) = set(clips.glob("*.wav")) - before
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() - 1800))
    clip.rename(clip.with_name(f"{stamp}-{clip.name.split('-', 1)[1]}"))
    device.replay(NORMAL_FILES[0])  # a restart: no event of this run to go by
    assert device.detector.recent.named("last") == latest["event_id"]


def test_a_period_that_heard_what_the_model_in_use_calls_a_fault_says_so(tmp_path: Path) -> None:
    """Events are held off while a period runs and every running window is learnt: a fault
    heard then became normal (the threshold rose, the same fault raised nothing after), and
    the outcome said nothing of it. The refit still happens (a new site may sound unlike the
    model in use); its outcome counts the events the model in use would have raised and
    says how to undo it, and a normal period's counts none."""
    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    assert device.command(command="learn", action="start", seconds=3600).ok
    device.replay(*NORMAL_FILES[1:], ANOMALOUS_FILE)
    device.replay(NORMAL_FILES[0])  # a restart mid-period: what was heard before is kept
    reply = device.command(command="learn", action="stop")
    assert reply.ok and "WARNING: during the period" in reply.detail, reply.detail
    outcome = device.detector.status()["last_refit"]
    assert outcome["heard_events"] >= 1 and "rollback" in outcome["warning"], outcome

    calm = Device(tmp_path / "calm")
    calm.replay(NORMAL_FILES[0])
    assert calm.command(command="learn", action="start", seconds=3600).ok
    calm.replay(*NORMAL_FILES)
    assert calm.command(command="learn", action="stop").ok
    outcome = calm.detector.status()["last_refit"]
    assert outcome["heard_events"] == 0 and "warning" not in outcome, outcome


def test_a_period_counts_the_events_the_daemon_raises_on_the_same_audio(tmp_path: Path) -> None:
    """The count of events heard in a period is the real event logic's, gated as events are:
    the same files raise as many events outside a period (each file a new stream, as a
    restarted pipeline is; a tracker kept across them counted the second fault as the first's
    cooldown)."""
    files = (ANOMALOUS_FILE, NORMAL_FILES[0], ANOMALOUS_FILE)
    raised = len(starts(Device(tmp_path / "plain").replay(*files)))
    assert raised >= 2
    device = Device(tmp_path / "learning")
    device.replay(NORMAL_FILES[0])
    assert device.command(command="learn", action="start", seconds=3600).ok
    assert starts(device.replay(*files)) == [], "events are held off in a period"
    assert device.adapter_period_heard() == raised


def test_an_event_marked_normal_twice_makes_one_version(tmp_path: Path) -> None:
    """`last` after a restart names the event by its clip (12 characters of its id): the same
    event was marked again, and every press of the button made another identical version
    (ten presses pushed the learning version and the rollback chain out of the history)."""
    device = Device(tmp_path, seconds=LEARN_S)
    device.replay(*NORMAL_FILES)
    (event,) = starts(device.replay(ANOMALOUS_FILE))
    assert device.command(command="mark_normal", event_id=event["event_id"]).ok
    versions = device.detector.status()["version"]
    (clip,) = (device.data / "clips").glob("*.wav")  # by its clip's name, as `events` lists
    # it: refused by the command's pattern, and without `.wav` not found (a walk-through)
    for again in (event["event_id"], event["event_id"][:12], clip.name, clip.stem):
        reply = device.command(command="mark_normal", event_id=again)
        assert not reply.ok and "already marked normal" in reply.detail, reply.detail
    assert device.detector.status()["version"] == versions


def test_a_cancelled_automatic_period_is_not_begun_again_at_the_next_start(
    tmp_path: Path,
) -> None:
    device = Device(tmp_path, seconds=3600)
    device.replay(NORMAL_FILES[0])
    assert device.detector.learning
    assert device.command(command="learn", action="cancel").ok
    events = device.replay(ANOMALOUS_FILE)
    assert not device.detector.learning and len(starts(events)) == 1
    assert device.command(command="learn", action="start", seconds=60).ok, "on request it can"


def test_a_failed_rollback_keeps_the_version_in_use(tmp_path: Path) -> None:
    from edge.history import ModelHistory

    folder = tmp_path / "models"
    history = ModelHistory(folder, keep=5, configured="fan-demo-12483c73")
    for n in (1, 2):
        v = shutil.copytree(DEMO_BUNDLE, folder / f"v{n}.bundle")
        history.record(load_bundle(v), "mark_normal", DEMO_BUNDLE, True)
    history.path.unlink()
    history.path.mkdir()  # history.json cannot be replaced now (a full disk)
    with pytest.raises(OSError):
        history.set_active(history.rollback_target())
    assert history.active == 2, "the model in use is still version 2"


def test_pruning_keeps_a_folder_a_reload_of_it_still_uses(tmp_path: Path) -> None:
    """`reload_model` of an older version's folder made an entry with the same path; pruning
    the old entry deleted the folder of the bundle just made active."""
    from edge.history import ModelHistory

    folder = tmp_path / "models"
    history = ModelHistory(folder, keep=2, configured="fan-demo-12483c73")
    v1 = shutil.copytree(DEMO_BUNDLE, folder / "v1.bundle")
    history.record(load_bundle(v1), "learning", DEMO_BUNDLE, True)
    v2 = shutil.copytree(DEMO_BUNDLE, folder / "v2.bundle")
    history.record(load_bundle(v2), "mark_normal", DEMO_BUNDLE, True)
    history.record(load_bundle(v1), "reload", v1, False)  # v1 again, loaded by reload_model
    assert [e["version"] for e in history.entries] == [2, 3]
    assert v1.is_dir() and load_bundle(history.current["path"]).path == v1


def test_pruning_never_deletes_the_configured_model_nor_a_kept_version_s_base(
    tmp_path: Path,
) -> None:
    """A config whose `model` pins a site version (`keep_versions = 1`): the next refit pruned
    it and deleted its folder, the configured model, and the next start failed with "no such
    model bundle" (an operator's review). Nor may a kept version's base go."""
    from edge.history import ModelHistory

    demo, ae = load_bundle(DEMO_BUNDLE), load_bundle(AE_BUNDLE)
    for configured, base_of_v2, kept in (
        (demo.model_id, AE_BUNDLE, True),  # v1 is the configured model
        (ae.model_id, "v1", True),  # v2 is refitted from v1
        (ae.model_id, AE_BUNDLE, False),  # neither: pruned v1 goes
    ):
        folder = tmp_path / f"{configured}-{base_of_v2 == 'v1'}" / "models"
        history = ModelHistory(folder, keep=1, configured=configured)
        v1 = shutil.copytree(DEMO_BUNDLE, folder / "fan-demo-12483c73-v1.bundle")
        history.record(load_bundle(v1), "learning", AE_BUNDLE, True)
        v2 = shutil.copytree(AE_BUNDLE, folder / "fan-demo-12483c73-v2.bundle")
        history.record(
            load_bundle(v2), "mark_normal", v1 if base_of_v2 == "v1" else AE_BUNDLE, True
        )
        assert [e["version"] for e in history.entries] == [2]
        assert v1.is_dir() is kept, (configured, base_of_v2)


def test_versions_are_found_in_a_data_folder_moved_or_copied_and_only_its_own_are_pruned(
    tmp_path: Path,
) -> None:
    """history.json names versions by absolute path: a data_dir moved (to a USB disk, say)
    found none of its versions and ran the configured model at its factory threshold, and a
    copy's refit deleted the original's active version (an operator's review)."""
    from edge.history import ModelHistory, active_entry, load_version

    first = tmp_path / "first" / "models"
    history = ModelHistory(first, keep=1, configured="pump-1")
    v1 = shutil.copytree(DEMO_BUNDLE, first / "fan-demo-12483c73-v1.bundle")
    history.record(load_bundle(v1), "learning", DEMO_BUNDLE, True)
    copy = shutil.copytree(tmp_path / "first", tmp_path / "copy") / "models"
    copied = ModelHistory(copy, keep=1, configured="pump-1")
    assert copied.current["path"] == str(copy / v1.name)
    assert load_version(copied.current).path == copy / v1.name
    v2 = shutil.copytree(DEMO_BUNDLE, copy / "fan-demo-12483c73-v2.bundle")
    copied.record(load_bundle(v2), "mark_normal", DEMO_BUNDLE, True)
    assert v1.is_dir(), "the original's version is not the copy's to delete"
    assert not (copy / v1.name).exists(), "the copy's own is pruned"
    moved = (tmp_path / "first").rename(tmp_path / "moved") / "models"
    assert active_entry(moved, "pump-1")["path"] == str(moved / v1.name)
    again = ModelHistory(moved, keep=1, configured="pump-1")
    assert load_version(again.current).path == moved / v1.name
    # the one entry kept a `reload` of a version, which the device did not write (a review)
    again.record(load_bundle(moved / v1.name), "reload", moved / v1.name, False)
    assert [e["made"] for e in again.entries] == [False]
    moved = (tmp_path / "moved").rename(tmp_path / "again") / "models"
    assert load_version(ModelHistory(moved, keep=1, configured="pump-1").current).path == (
        moved / v1.name
    )


def test_a_stopped_period_whose_refit_could_not_be_written_is_refitted_not_resumed(
    tmp_path: Path,
) -> None:
    """Saved again with its full length, a period stopped early (`learn stop`) whose version
    could not be written resumed at the next start and held events off for the rest of it."""
    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    assert device.command(command="learn", action="start", seconds=3600).ok
    device.replay(*NORMAL_FILES)
    shutil.rmtree(device.data / "models", ignore_errors=True)
    (device.data / "models").write_text("not a folder")  # the versions cannot be written
    reply = device.command(command="learn", action="stop")
    assert not reply.ok and "kept and refitted at the next start" in reply.detail, reply.detail
    (device.data / "models").unlink()
    device.replay(NORMAL_FILES[0])
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v1", "refitted at once"
    assert not device.detector.learning


def test_a_stop_on_a_full_disk_keeps_what_the_period_heard_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`learn stop` on a full disk: neither the period nor the version could be written, the
    reply said the period's audio was kept for the next start, and the period ended; the file
    on disk held its last save (nothing learnt, its full length), so the daemon said `normal`
    and the next start learnt the whole period again, events held off all along. What it heard
    is kept in memory for its refit, which the next `learn stop` makes once there is room (and
    the daemon by itself, `test_a_period_that_ends_on_a_full_card_...`)."""
    import edge.bundle
    import edge.history
    import edge.learning

    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    assert device.command(command="learn", action="start", seconds=3600).ok
    device.replay(*NORMAL_FILES)
    heard = device.detector.status()["learning"]["collected_s"]
    assert heard > 10

    def full(path: Path, *_: object, **__: object) -> None:
        raise OSError(28, "No space left on device", str(path))

    with monkeypatch.context() as patch:
        for module in (edge.bundle, edge.history, edge.learning):
            patch.setattr(module, "atomic_write", full)
        reply = device.command(command="learn", action="stop")
    assert not reply.ok and "No space left on device" in reply.detail
    assert "kept and refitted at the next start" not in reply.detail, reply.detail
    assert "kept in memory and refitted once there is room" in reply.detail, reply.detail
    assert device.detector.current_state() != "learning"  # it ended: events are raised
    assert device.detector.adapter.unwritten.collected_s == heard
    reply = device.command(command="learn", action="stop")  # the disk has room again
    assert reply.ok and "fan-demo-12483c73-site-v1" in reply.detail, reply.detail
    assert not device.detector.learning


def test_a_period_that_ends_on_a_full_card_raises_events_and_is_refitted_once_there_is_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A period that ended while the card was full (neither its version nor its save could be
    written) went on learning, events held off, for as long as the card stayed full, and
    logged its failed save at every window (1,203 lines; a full-disk review): a device deaf to
    faults, learning them as normal. It ends; the model in use raises events; its refit is
    tried again (every UNWRITTEN_RETRY_S) and made once there is room, in the same run."""
    import edge.bundle
    import edge.daemon
    import edge.history
    import edge.learning

    device = Device(tmp_path, seconds=LEARN_S)
    device.replay(NORMAL_FILES[0])  # begins the period, saved while there is room
    card = {"full": True}

    def full(real: Callable[..., None]) -> Callable[..., None]:
        def write(path: Path, *args: object, **kwargs: object) -> None:
            if card["full"]:
                raise OSError(28, "No space left on device", str(path))
            real(path, *args, **kwargs)

        return write

    class RoomOnceRefused(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "refit failed" in record.getMessage():  # then the other program's file goes
                self.refused = getattr(self, "refused", 0) + 1
                card["full"] = self.refused < 2

    for module in (edge.bundle, edge.history, edge.learning):
        monkeypatch.setattr(module, "atomic_write", full(module.atomic_write))
    monkeypatch.setattr(edge.daemon, "UNWRITTEN_RETRY_S", 0.0)
    room = RoomOnceRefused()
    logging.getLogger("edge").addHandler(room)
    try:
        with caplog.at_level(logging.ERROR):
            events = device.replay(*NORMAL_FILES, *NORMAL_FILES, DEMO_CLIP)
    finally:
        logging.getLogger("edge").removeHandler(room)
    assert room.refused == 2, "refused at the period's end, then once again while full"
    saves = [r for r in caplog.records if "could not save the period" in r.getMessage()]
    assert len(saves) <= 3, [r.getMessage() for r in saves]
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v1", "refitted in the run"
    assert device.detector.adapter.unwritten is None and not device.detector.learning
    assert starts(events), "the fault in the demo clip raised an event after the period ended"


def _stop_on_a_full_card(device: Device, monkeypatch: pytest.MonkeyPatch, stop: bool) -> None:
    """A period of 3600 s, `learn stop` after its first files on a card that takes no write
    (the refit waits in memory); with `stop`, the daemon stopped too while the card is full."""
    import edge.adapt
    import edge.bundle
    import edge.history
    import edge.learning

    def full(path: Path, *_: object, **__: object) -> None:
        raise OSError(28, "No space left on device", str(path))

    device.replay(NORMAL_FILES[0])
    assert device.command(command="learn", action="start", seconds=3600).ok
    device.replay(*NORMAL_FILES)
    with monkeypatch.context() as patch:
        for module in (edge.bundle, edge.history, edge.learning):
            patch.setattr(module, "atomic_write", full)
        patch.setattr(edge.adapt, "write_json", full)
        assert not device.command(command="learn", action="stop").ok
        assert device.detector.adapter.unwritten is not None and not device.detector.learning
        if stop:
            device.detector.finish()


def test_a_period_that_ended_on_a_full_card_does_not_resume_as_running_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The card kept the period's older save, of a period still running (3600 s): a restart
    resumed it, events held off for the hour left (a diff review). Ended on a full card, its
    file goes (a delete frees room); what it heard, lost at a stop still full, is said."""
    device = Device(tmp_path)
    with caplog.at_level(logging.ERROR):
        _stop_on_a_full_card(device, monkeypatch, stop=True)
    assert any("are lost: there was no room" in r.getMessage() for r in caplog.records)
    assert not (device.data / "learning" / "period.json").exists()
    device.replay(NORMAL_FILES[0])  # the restart, with room
    assert not device.detector.learning, device.detector.status()["learning"]


def test_a_new_configured_model_saves_a_period_that_ended_on_a_full_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGHUP with a new [model] built a new adapter and dropped the period waiting in memory
    for room without a word, or resumed the older save as a running period (a diff review).
    With room by then it is saved as ended, and refitted at the next window of the model."""
    device = Device(tmp_path)
    _stop_on_a_full_card(device, monkeypatch, stop=False)
    waiting = device.detector.adapter.unwritten
    device.detector.reconfigure(load_bundle(DEMO_BUNDLE))  # the card has room again
    saved = json.loads((device.data / "learning" / "period.json").read_text())
    assert saved["seconds"] == saved["collected_s"] == waiting.collected_s, "saved as ended"
    device.replay(NORMAL_FILES[0])  # a restart: the first window ends it
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v1"
    assert not device.detector.learning


def test_a_sighup_whose_new_model_failed_to_load_loads_it_at_the_next_one(tmp_path: Path) -> None:
    """The new path went into the settings before the load was tried: after a failed load
    the next SIGHUP saw no change, and the adapter kept the old configured model."""
    device = Device(tmp_path, seconds=LEARN_S)
    device.replay(*NORMAL_FILES)  # version 1 of fan-demo is active
    other = tmp_path / "later" / "other.bundle"  # named in the config before it is copied
    new = device.detector.settings.model_copy(update={"model": other})
    controller = Controller(device.detector, reload_settings=lambda: new)
    controller.reload()
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v1", "kept"
    cli("train", "--normal", *map(str, NORMAL_FILES), str(DEMO_CLIP), "--out", str(other))
    controller.reload()
    d = device.detector
    assert d.bundle.path.resolve() == other.resolve()
    assert d.adapter.configured.path.resolve() == other.resolve()


def _feed_till_an_event_opens(d: Detector) -> None:
    """The demo clip a tenth of a second at a time, until its fault opens an event."""
    audio = read_audio(DEMO_CLIP, RATE)
    for i in range(0, len(audio), RATE // 10):
        d.feed(audio[i : i + RATE // 10])
        if d.pipeline.events.event_id:
            break
    assert d.pipeline.events.event_id, "an event is open"


def test_a_mark_normal_that_is_refused_leaves_the_open_event_open(tmp_path: Path) -> None:
    """The open event was ended (`marked_normal`) before the mark was tried: a model that
    cannot learn on site, or a refit the data refuse, replied "rejected ... changes nothing"
    while the alarm had been cleared."""
    settings = load_settings(None, model=AE_BUNDLE, data_dir=tmp_path / "data",
                             detector={"cooldown_seconds": 0})  # fmt: skip
    reports = Recorder()
    d = Detector(settings, load_bundle(AE_BUNDLE), [reports], persist=True)
    _feed_till_an_event_opens(d)
    reply = Controller(d).handle_payload(b'{"command": "mark_normal", "event_id": "last"}')
    assert not reply.ok and reply.detail.endswith(
        "an autoencoder model cannot learn on site (only fluctuation and levels models do): "
        "raise its threshold (set_threshold) if this sound is normal, or train it again with "
        "recordings that hold it"
    ), reply.detail
    assert d.pipeline.events.event_id, "still open"
    assert [e.type for e in reports.events] == ["start"]


def test_marking_an_open_event_normal_says_how_much_of_its_sound_was_learnt(
    tmp_path: Path,
) -> None:
    """Only what was heard so far is learnt: a false alarm marked 1 s after its start was learnt
    from 4 s of sound, and the same sound raised another event 3 s later, with nothing said (a
    field review). The reply says how much was learnt and what to do if it comes back."""
    device = Device(tmp_path, seconds=LEARN_S)
    assert starts(device.replay(*NORMAL_FILES)) == []  # the site learnt first
    d = Detector(device.settings(), load_bundle(DEMO_BUNDLE), [Recorder()], persist=True)
    _feed_till_an_event_opens(d)
    reply = Controller(d).handle_payload(b'{"command": "mark_normal", "event_id": "last"}')
    assert reply.ok, reply.detail
    said = re.search(
        r"the event was still open: about ([0-9.]+) s of its sound was learnt", reply.detail
    )
    assert said and 1.0 <= float(said[1]) <= 10.0, reply.detail
    assert "mark that one once it has ended" in reply.detail


def test_an_event_without_a_clip_is_marked_by_the_id_events_lists(tmp_path: Path) -> None:
    """With clips off, `events` lists an event by the 12 characters a clip's name would carry;
    its windows are kept under the whole id, and a mark by the short one found none of them."""
    from edge.eventlog import format_event, read_events

    device = Device(tmp_path, seconds=LEARN_S)
    assert starts(device.replay(*NORMAL_FILES)) == []  # the site learnt first
    settings = load_settings(None, model=DEMO_BUNDLE, data_dir=device.data, device_id="site",
                             detector={"cooldown_seconds": 0}, clips={"enabled": False},
                             learning={"seconds": LEARN_S})  # fmt: skip
    d = Detector(settings, load_bundle(DEMO_BUNDLE), [EventLogSink(device.data)], persist=True)
    d.run(FileSource([ANOMALOUS_FILE], RATE))
    (event,) = read_events(device.data)
    listed = format_event(event).split("  id ")[1].split()[0]
    assert len(listed) == 12 and event.data["event_id"].startswith(listed)
    command = {"command": "mark_normal", "event_id": listed}
    reply = Controller(d).handle_payload(json.dumps(command).encode())
    assert reply.ok and f"event {event.data['event_id']} marked normal" in reply.detail, reply


def test_a_saved_period_the_card_damaged_is_dropped_not_a_restart_loop(tmp_path: Path) -> None:
    """An empty or truncated `period.npz` (fsck after a power cut, a bad sector) raised
    EOFError or BadZipFile out of the daemon's start: the service restarted every 5 s, deaf."""
    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    assert device.command(command="learn", action="start", seconds=600).ok
    device.replay(NORMAL_FILES[1])  # saved at the stop
    period = device.data / "learning" / "period.npz"
    period.write_bytes(period.read_bytes()[:100])  # truncated
    events = device.replay(ANOMALOUS_FILE)
    assert not device.detector.learning
    assert len(starts(events)) == 1, "it detects again"
    assert not period.exists()


def test_a_damaged_mark_is_left_out_of_a_refit_and_costs_neither_the_period_nor_the_daemon(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A refit at a period's end pools the events marked normal; one whose file the card
    damaged raised BadZipFile out of `feed()`: the daemon died, the period had been deleted
    and the model was recorded as failed, so it never learnt again."""
    device = Device(tmp_path, seconds=LEARN_S)
    device.replay(*NORMAL_FILES)  # version 1
    (event,) = starts(device.replay(ANOMALOUS_FILE))
    assert device.command(command="mark_normal", event_id=event["event_id"]).ok  # version 2
    (mark,) = (device.data / "learning" / "marked").glob("*.npz")
    mark.write_bytes(b"PK\x03\x04 a bad block")
    assert device.command(command="learn", action="start", seconds=LEARN_S).ok
    with caplog.at_level(logging.ERROR, logger="edge.adapt"):
        device.replay(*NORMAL_FILES)  # the period ends in these: refitted without the mark
    assert any("is left out" in r.getMessage() for r in caplog.records), caplog.text
    d = device.detector
    assert not d.learning and d.bundle.model_id.endswith("-site-v3"), d.bundle.model_id
    assert d.bundle.manifest.calibration["marked"] == []
    assert len(starts(device.replay(other_fault(tmp_path)))) == 1, "and it detects"


def test_a_lowered_keep_versions_frees_the_card_at_the_next_start(tmp_path: Path) -> None:
    """Pruning ran only when a version was made: lowering `keep_versions` to free a card kept
    every old version folder until a refit that might never come."""
    device = Device(tmp_path, seconds=LEARN_S, keep_versions=5)
    device.replay(*NORMAL_FILES)  # version 1
    for fault in (ANOMALOUS_FILE, other_fault(tmp_path)):  # versions 2 and 3
        (event,) = starts(device.replay(fault))
        assert device.command(command="mark_normal", event_id=event["event_id"]).ok
    folders = sorted((device.data / "models").glob("*.bundle"))
    assert len(folders) == 3, folders
    device.learning["keep_versions"] = 1
    device.replay(NORMAL_FILES[0])
    assert [h["version"] for h in device.detector.status()["history"]] == [3]
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v3", "the active one stays"
    assert sorted((device.data / "models").glob("*.bundle")) == folders[-1:]


@pytest.mark.parametrize(
    "damage",
    [
        {"entries": [{"version": 1}], "learned": None},  # an entry without its folder
        {"entries": {"version": 1}, "active": 1, "failed": 7},  # wrong shapes throughout
        {"entries": ["x", {"version": "1", "path": "p"}], "active": "1"},
        {"entries": [{"version": 1, "path": str(DEMO_BUNDLE)}], "active": 1},  # no reason, base
    ],
)
def test_a_history_of_another_shape_is_read_for_what_it_holds(tmp_path: Path, damage: dict) -> None:
    """history.json that parses but holds other shapes (a downgrade, a hand edit, a bit flip)
    raised KeyError, AttributeError or TypeError at every start: a restart loop."""
    device = Device(tmp_path)
    (device.data / "models").mkdir(parents=True)
    (device.data / "models" / "history.json").write_text(json.dumps(damage))
    events = device.replay(ANOMALOUS_FILE)
    assert device.detector.bundle.model_id == "fan-demo-12483c73", "the configured model"
    assert len(starts(events)) == 1


def test_a_history_the_card_damaged_is_set_aside_not_overwritten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unreadable history.json was replaced at the next save: the versions made on site,
    whose folders stay on the card, could no longer be traced. It is now kept beside it."""
    device = Device(tmp_path, seconds=LEARN_S)
    device.replay(*NORMAL_FILES)  # version 1: history.json written
    history = device.data / "models" / "history.json"
    before = history.read_bytes()
    history.write_bytes(before[: len(before) // 2])  # truncated by a power cut
    with caplog.at_level(logging.ERROR, logger="edge.history"):
        device.replay(ANOMALOUS_FILE)
    (aside,) = history.parent.glob("history.json.damaged-*")
    assert aside.read_bytes() == before[: len(before) // 2]
    assert any(aside.name in r.getMessage() for r in caplog.records), caplog.text


def test_refits_on_the_loop_keep_the_watchdog_fed(tmp_path: Path) -> None:
    """A refit runs on the audio loop, whose ticks alone pinged systemd's watchdog: the refit
    at a period's end, a mark as normal and a rollback each run inside `busy`, which pings
    meanwhile (tests/test_field_units.py)."""
    from contextlib import contextmanager

    from edge.sdnotify import SystemdNotifier

    class Counting(SystemdNotifier):
        entered = 0

        @contextmanager
        def busy(self, limit_s: float = 600.0):  # type: ignore[override]
            Counting.entered += 1
            with super().busy(limit_s):
                yield

    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    device.command(command="learn", action="start", seconds=600)
    device.replay(*NORMAL_FILES)
    device.detector.notifier = Counting()
    assert device.command(command="learn", action="stop").ok
    assert Counting.entered == 1
    assert device.command(command="rollback").ok
    assert Counting.entered == 2


def test_a_period_begun_within_the_second_of_the_last_one_is_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart drops a saved period that a recorded version already ended; that was judged by
    its start time, to the second, so a period begun within the second of the last one's (a
    test, a script) was taken as ended and dropped at the restart."""
    import edge.adapt

    monkeypatch.setattr(edge.adapt, "now_iso", lambda: "2026-12-02T22:00:00Z")
    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    assert device.command(command="learn", action="start", seconds=3600).ok
    device.replay(*NORMAL_FILES)
    assert device.command(command="learn", action="stop").ok  # version 1
    assert device.command(command="learn", action="start", seconds=3600).ok  # the same second
    device.replay(NORMAL_FILES[0])
    assert device.detector.learning, "the second period was dropped at the restart"
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v1"


def test_a_period_saved_before_periods_had_an_id_is_still_known_as_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Versions recorded before periods had an id name theirs by its start: a period saved by
    that release, which a recorded version ended, is not refitted again after the upgrade."""
    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    assert device.command(command="learn", action="start", seconds=3600).ok
    device.replay(*NORMAL_FILES)
    with monkeypatch.context() as patch:
        patch.setattr(Adapter, "cancel", lambda self: False)  # a power cut before it runs
        assert device.command(command="learn", action="stop").ok
    saved = device.data / "learning" / "period.json"
    old = json.loads(saved.read_text())
    del old["period_id"]  # as the release before wrote it
    saved.write_text(json.dumps(old))
    history = device.data / "models" / "history.json"
    data = json.loads(history.read_text())
    for entry in data["entries"]:
        if entry.get("period"):
            entry["period"] = old["started_at"]  # as that release recorded it
    history.write_text(json.dumps(data))
    device.replay(NORMAL_FILES[0])
    assert not device.detector.learning
    assert [h["version"] for h in device.detector.status()["history"]] == [1]


def test_a_learning_period_learns_only_what_the_event_logic_takes_as_evidence(
    tmp_path: Path,
) -> None:
    """Two 3-s stops of the machine in a commissioning period: the windows of each stop's
    edges (coasting down, the first one below the off level, the start-up's settling) are
    never evidence for the event logic, but were learnt as normal running and set the new
    threshold's floor (1.27 -> 12.0 here; 1.63 -> 5.35 in a review on MIMII)."""
    running = np.concatenate([read_audio(f, RATE) for f in NORMAL_FILES])
    stop = running[: 3 * RATE] * 10 ** (-50 / 20)  # the room, 50 dB under the fan
    off_below = float(np.percentile(
        [level_dbfs(w) for w in np.array_split(running, len(running) // RATE)], 1
    )) - 10  # fmt: skip
    thresholds = {}
    for name, parts in (("steady", [running] * 3), ("stops", [running, stop] * 2 + [running])):
        site = tmp_path / name / "site.wav"
        site.parent.mkdir()
        sf.write(site, np.concatenate(parts).astype(np.float32), RATE, subtype="FLOAT")
        device = Device(tmp_path / name, seconds=30.0)
        device.event_logic = {"off_below_dbfs": off_below}
        device.replay(site)
        assert device.detector.bundle.model_id.endswith("-site-v1"), name
        thresholds[name] = device.detector.bundle.threshold
    assert thresholds["stops"] == pytest.approx(thresholds["steady"], rel=0.1), thresholds


def test_a_learning_period_learns_no_window_the_machine_stopped_in(tmp_path: Path) -> None:
    """A window in which the machine stops is evidence until the stop is heard (the device
    cannot know it yet), and a period learnt it as running, where training leaves such
    windows out (edge.machine_state.STOP_SECONDS): every window a period learns is one that
    training, given the same audio, would fit on too."""
    from edge.features import FeatureParams
    from edge.learning import FeatureStore
    from edge.machine_state import evidence_windows
    from edge.scoring import fluctuation_features

    fan = np.concatenate([read_audio(f, RATE) for f in NORMAL_FILES] * 2)  # 40 s
    room = fan[: 3 * RATE] * 10 ** (-50 / 20)
    cuts = [0, int(9.3 * RATE), int(24.8 * RATE), len(fan)]  # stops inside windows
    parts = [fan[a:b] for a, b in itertools.pairwise(cuts)]
    site_audio = np.concatenate([parts[0], room, parts[1], room, parts[2]]).astype(np.float32)
    site = tmp_path / "site.wav"
    sf.write(site, site_audio, RATE, subtype="FLOAT")
    off_below = float(np.percentile(
        [level_dbfs(w) for w in np.array_split(fan, len(fan) // RATE)], 1
    )) - 10  # fmt: skip
    device = Device(tmp_path, seconds=20.0)
    device.event_logic = {"off_below_dbfs": off_below}
    device.replay(site)
    assert device.detector.bundle.model_id.endswith("-site-v1")
    (stored,) = (device.data / "learning").glob("site-*.npz")
    learnt = FeatureStore.load(stored, 10_000).x
    recipe = FeatureParams(frontend=device.detector.bundle.features.frontend)  # the demo's v1
    allowed = fluctuation_features(evidence_windows(site_audio, recipe, off_below))
    distance = np.abs(learnt[:, None, :] - allowed[None, :, :]).max(axis=2).min(axis=1)
    assert len(learnt) >= 30 and distance.max() < 1e-4, (len(learnt), distance.max())


def test_learning_goes_on_across_a_reload_and_after_a_period_ends(tmp_path: Path) -> None:
    """A window waits STOP_SECONDS before a period learns it, timed at first by the pipeline,
    whose time starts from 0 again at a reload (SIGHUP), a refit or a rollback: the windows
    waiting then held up every later one, and a period learnt nothing more until the new
    time caught up with the old (80 MB a day of waiting windows; in a review)."""
    fan = np.concatenate([read_audio(f, RATE) for f in NORMAL_FILES])  # 20 s

    def feed(detector: Detector, audio: np.ndarray) -> None:
        for i in range(0, len(audio), 4096):
            detector.feed(audio[i : i + 4096])

    device = Device(tmp_path)
    detector = Detector(device.settings(), load_bundle(DEMO_BUNDLE), [], persist=True)
    detector.start_learning(3600)
    feed(detector, np.concatenate([fan] * 3))
    before = detector.adapter.period.collected_s
    detector.apply_settings(device.settings())  # a reload: a new pipeline, the period goes on
    feed(detector, fan)
    assert detector.adapter.period.collected_s - before > 15
    assert len(detector._unlearnt) <= 5  # the last 2 s
    detector.start_learning(40)  # a new period, which ends by its count
    feed(detector, np.concatenate([fan] * 3))
    assert not detector.learning and detector.bundle.model_id.endswith("-site-v1")
    detector.start_learning(600)  # and `learn start` again at once
    feed(detector, fan)
    assert detector.adapter.period.collected_s > 15


def test_a_refit_refused_before_it_is_written_keeps_no_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refit whose arrays write_bundle refuses (NaN) escaped as a bare BundleError naming a
    temporary folder, and the mark's windows stayed to be picked up by a later refit (in a
    review). It is a refused refit like any other."""
    from dataclasses import replace

    import edge.adapt

    device = Device(tmp_path, seconds=LEARN_S)
    assert starts(device.replay(*NORMAL_FILES)) == []  # the site learnt first
    real = edge.adapt.site_refit

    def broken(*args: object, **kw: object) -> object:
        out = real(*args, **kw)
        return replace(out, arrays={k: np.full_like(v, np.nan) for k, v in out.arrays.items()})

    monkeypatch.setattr(edge.adapt, "site_refit", broken)
    device.learning = {}
    assert len(starts(device.replay(ANOMALOUS_FILE))) == 1
    reply = device.command(command="mark_normal", event_id="last")
    assert not reply.ok and "the refitted bundle was refused" in reply.detail, reply.detail
    assert ".tmp-" not in reply.detail
    assert not list((device.data / "learning").glob("marked/*.npz"))


def test_a_marked_clip_s_dropout_is_not_learnt(tmp_path: Path) -> None:
    """`mark_normal` learnt every window of the event's clip: 0.1 s of zeros in it (a USB
    glitch) lifted the threshold fourfold in a review, though the device never scores such a
    window. The marked windows are those the device would take as evidence."""
    fault = read_audio(ANOMALOUS_FILE, RATE)
    glitch = fault.copy()
    glitch[2 * RATE : int(2.1 * RATE)] = 0.0
    thresholds = {}
    for name, audio in (("clean", fault), ("glitch", glitch)):
        clip = tmp_path / name / "fault.wav"
        clip.parent.mkdir()
        sf.write(clip, audio, RATE, subtype="FLOAT")
        device = Device(tmp_path / name, seconds=LEARN_S)
        assert starts(device.replay(*NORMAL_FILES)) == []  # the site learnt first
        device.learning = {}
        assert len(starts(device.replay(clip))) == 1, name
        reply = device.command(command="mark_normal", event_id="last")
        assert reply.ok, reply.detail
        thresholds[name] = device.detector.bundle.threshold
    assert thresholds["glitch"] == pytest.approx(thresholds["clean"], rel=0.1), thresholds


def test_a_marked_clip_s_stop_is_not_learnt(tmp_path: Path) -> None:
    """`mark_normal` took a clip's windows as each alone tells (`judged_windows`): a fault that
    ends with the machine stopping taught the model its coast-down, which training, a learning
    period and `calibrate` all leave out (`evidence_windows`)."""
    from edge.machine_state import evidence_windows

    fault = read_audio(ANOMALOUS_FILE, RATE)[: 8 * RATE]
    fade = np.geomspace(1.0, 10 ** (-60 / 20), RATE // 2)  # a stop: 60 dB down in 0.5 s
    rng = np.random.default_rng(3)
    off = (1e-4 * rng.standard_normal(3 * RATE)).astype(np.float32)
    clip = tmp_path / "fault-then-stop.wav"
    sf.write(clip, np.concatenate([fault, fault[: RATE // 2] * fade, off]), RATE, subtype="FLOAT")
    bundle = tmp_path / "fan.bundle"  # one that records its running level: it knows a stop
    cli("train", "--normal", *map(str, NORMAL_FILES), str(DEMO_CLIP), "--out", str(bundle))
    device = Device(tmp_path, bundle=bundle, seconds=LEARN_S)
    assert starts(device.replay(*NORMAL_FILES)) == []  # the site learnt first
    device.learning = {}
    (event,) = starts(device.replay(clip))
    d = device.detector
    rows = d._event_rows(event["event_id"])
    kept = sorted((d.settings.data_dir / "clips").glob("*.wav"))[-1]
    audio = read_audio(kept, RATE)
    expected = evidence_windows(audio, d.bundle.features, d.pipeline.machine.off_below_dbfs)
    assert d.pipeline.machine.off_below_dbfs is not None
    assert len(rows) == len(expected) > 0


def test_a_machine_heard_near_its_off_level_for_a_minute_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A microphone 9 dB quieter than the training's: the machine was heard running but within
    3 dB of its off level, so no window was judged: a learning period stayed at 0 s for good and
    detection was deaf, without a word in the log (in a review)."""
    bundle = tmp_path / "fan.bundle"  # one that records its running level
    cli("train", "--normal", *map(str, NORMAL_FILES), str(DEMO_CLIP), "--out", str(bundle))
    audio = np.concatenate([read_audio(f, RATE) for f in NORMAL_FILES])
    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, np.tile(audio, 4) * 10 ** (-9 / 20), RATE, subtype="FLOAT")  # 80 s
    device = Device(tmp_path, bundle=bundle, seconds=600)
    with caplog.at_level(logging.WARNING):
        device.replay(quiet)
    assert device.detector.status()["learning"]["collected_s"] == 0
    said = [r.getMessage() for r in caplog.records if "off level" in r.getMessage()]
    assert len(said) == 1 and "no window is judged" in said[0], said
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        device.replay(NORMAL_FILES[0])  # as loud as in training: judged, and learnt
    assert device.detector.status()["learning"]["collected_s"] > 0
    assert not [r for r in caplog.records if "off level" in r.getMessage()]


def test_a_mark_on_damaged_site_features_says_what_mends_it(tmp_path: Path) -> None:
    """The site's learnt features, damaged on the card, refused every later mark with a bare
    `BadZipFile`, until a new period happened to be learnt."""
    device = Device(tmp_path, seconds=LEARN_S)
    assert starts(device.replay(*NORMAL_FILES)) == []
    (site,) = (device.data / "learning").glob("site-*.npz")
    site.write_bytes(site.read_bytes()[:1000])
    device.learning = {}
    assert len(starts(device.replay(ANOMALOUS_FILE))) == 1
    reply = device.command(command="mark_normal", event_id="last")
    assert not reply.ok
    assert f"site features {site.name} unreadable" in reply.detail, reply.detail
    assert 'learn the site again ({"command": "learn", "action": "start"})' in reply.detail
    assert device.command(command="learn", action="start", seconds=LEARN_S).ok


# --- what a restart resumes and restores -----------------------------------------------------


def test_an_automatic_period_on_a_model_loaded_by_reload_model_ends_across_restarts(
    tmp_path: Path,
) -> None:
    """A period begun with a bundle loaded by reload_model was checked at a restart against
    the configured model (here the autoencoder, which cannot learn), before the version in use
    was restored: dropped at every start and begun again from 0 by [learning] seconds, it never
    ended while restarts came more often than its length, and no event was raised (in a
    review)."""
    device = Device(tmp_path, bundle=AE_BUNDLE, seconds=10)
    device.replay(NORMAL_FILES[0])
    demo = shutil.copytree(DEMO_BUNDLE, device.data / "models" / "demo.bundle")
    assert device.command(command="reload_model", path=str(demo)).ok
    device.replay(*NORMAL_FILES[:2])  # a restart: the period begins on fan-demo, the model in use
    first = device.detector.status()["learning"]
    assert first is not None and 0 < first["collected_s"] < 10
    device.replay(*NORMAL_FILES[2:])  # a restart: resumed, it ends
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v2"
    assert not device.detector.learning
    assert len(starts(device.replay(ANOMALOUS_FILE))) == 1, "events are raised again"


def test_a_period_the_restored_model_cannot_take_is_dropped_once_naming_both_models(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A period begun on a bundle loaded by reload_model that no longer loads at the restart:
    its windows are not the configured model's, and the line said only the configured one's
    feature count; the automatic period then begun is resumed at the next start, not begun
    again at every one."""
    levels = tmp_path / "levels.bundle"
    cli("train", "--normal", *map(str, NORMAL_FILES), "--detector", "levels", "--out", str(levels))
    levels_id = load_bundle(levels).model_id
    device = Device(tmp_path, bundle=levels, seconds=600)
    device.replay(NORMAL_FILES[0])
    demo = shutil.copytree(DEMO_BUNDLE, device.data / "models" / "demo.bundle")
    assert device.command(command="reload_model", path=str(demo)).ok
    device.replay(NORMAL_FILES[1])  # a restart: the period begins on fan-demo, the model in use
    assert device.detector.status()["learning"]["collected_s"] > 0
    shutil.rmtree(demo)  # the version does not load: the configured model runs
    with caplog.at_level(logging.WARNING, logger="edge.adapt"):
        device.replay(NORMAL_FILES[2])
    said = [r.getMessage() for r in caplog.records if "saved period is dropped" in r.getMessage()]
    assert len(said) == 1 and "fan-demo-12483c73" in said[0] and levels_id in said[0], said
    assert device.detector.bundle.model_id == levels_id
    collected = device.detector.status()["learning"]["collected_s"]
    assert collected > 0, "[learning] seconds began one for the model in use"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edge.adapt"):
        device.replay(NORMAL_FILES[3])
    assert device.detector.status()["learning"]["collected_s"] > collected, "resumed"
    assert not [r for r in caplog.records if "saved period is dropped" in r.getMessage()]


def test_a_learnt_version_the_detector_settings_cannot_run_lets_the_device_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Learnt under trigger_windows = trigger_of = 4, the version's threshold carries K = 4:
    with only trigger_of = 3 set later, every start raised "trigger_windows (K = 4) must not
    exceed trigger_of (N = 3)", a K the user never set, and the service crash-looped (in a
    review). The configured model runs, said once; the settings set back, the version does."""
    device = Device(tmp_path, seconds=LEARN_S)
    device.event_logic = {"trigger_windows": 4, "trigger_of": 4}
    device.replay(*NORMAL_FILES)
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v1"
    device.event_logic = {"trigger_of": 3}
    with caplog.at_level(logging.ERROR, logger="edge.adapt"):
        events = device.replay(ANOMALOUS_FILE)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(said) == 1 and "version 1" in said[0] and "trigger_of" in said[0], said
    assert device.detector.bundle.model_id == "fan-demo-12483c73"
    assert device.detector.status()["version"] is None and not device.detector.learning
    assert len(starts(events)) == 1, "the configured model detects"
    device.detector.adapter.history.save()  # any save of this run (a refit's outcome, say)
    device.event_logic = {"trigger_windows": 4, "trigger_of": 4}
    device.replay(NORMAL_FILES[0])
    assert device.detector.bundle.model_id == "fan-demo-12483c73-site-v1"


def _calibrated(out: Path, *normal: Path) -> str:
    """`soundsentry calibrate` of the demo bundle into `out` (the old one kept as .prev)."""
    cli("calibrate", str(DEMO_BUNDLE), "--normal", *map(str, normal), "--out", str(out))
    return load_bundle(out).model_id


def test_a_rollback_to_a_bundle_written_over_since_is_refused(tmp_path: Path) -> None:
    """A version loaded by reload_model was recorded by its path alone: after `calibrate`
    wrote the same --out again, "rolled back to" ran the new contents while the history said
    the old version (in a review)."""
    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    site = device.data / "models" / "site.bundle"
    first = _calibrated(site, *NORMAL_FILES[:2])
    assert device.command(command="reload_model", path=str(site)).ok  # version 1
    second = _calibrated(site, *NORMAL_FILES[1:])
    assert second != first
    assert device.command(command="reload_model", path=str(site)).ok  # version 2
    reply = device.command(command="rollback")
    assert not reply.ok and "version 1" in reply.detail and first in reply.detail, reply.detail
    assert device.detector.status()["version"] == 2
    assert device.detector.bundle.model_id == second
    # written over by a bundle this version cannot read: said as written over, not as a
    # bundle that does not load (the checksum is read before anything is loaded)
    manifest = site / "manifest.json"
    other = json.loads(manifest.read_text()) | {"checksum": "0" * 64, "format_version": 99}
    manifest.write_text(json.dumps(other | {"model_id": "other"}))
    reply = device.command(command="rollback")
    assert not reply.ok and "now holds other, not the" in reply.detail, reply.detail


def test_a_restart_does_not_run_a_version_whose_bundle_was_written_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    site = device.data / "models" / "site.bundle"
    first = _calibrated(site, *NORMAL_FILES[:2])
    assert device.command(command="reload_model", path=str(site)).ok  # version 1
    second = _calibrated(site, *NORMAL_FILES[1:])  # not loaded
    from edge.doctor import check_model

    said = check_model(device.settings()).detail  # what the next start will run
    assert f"version 1's folder holds {second} since" in said and "in use" not in said, said
    with caplog.at_level(logging.ERROR, logger="edge.adapt"):
        device.replay(NORMAL_FILES[0])
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(said) == 1 and "version 1" in said[0] and second in said[0], said
    assert device.detector.bundle.model_id == "fan-demo-12483c73", f"not {second} as {first}"
    assert device.detector.status()["version"] is None


def test_a_version_recorded_before_checksums_loads_what_its_path_holds(tmp_path: Path) -> None:
    """History entries written before each recorded its bundle's checksum cannot tell another
    bundle from theirs: they keep loading what is at their path, as they always did."""
    device = Device(tmp_path)
    device.replay(NORMAL_FILES[0])
    site = device.data / "models" / "site.bundle"
    _calibrated(site, *NORMAL_FILES[:2])
    assert device.command(command="reload_model", path=str(site)).ok  # version 1
    second = _calibrated(site, *NORMAL_FILES[1:])
    path = device.data / "models" / "history.json"
    history = json.loads(path.read_text())
    for entry in history["entries"]:
        del entry["checksum"]
    path.write_text(json.dumps(history))
    device.replay(NORMAL_FILES[0])
    assert device.detector.bundle.model_id == second
    assert device.detector.status()["version"] == 1


def test_a_rollback_to_a_model_of_another_kind_ends_the_period_instead_of_crashing(
    tmp_path: Path,
) -> None:
    """A period running on a bundle loaded by reload_model went on after a rollback to the
    configured model of another kind: its 192 numbers a window did not fit the period's 64,
    and the next window stopped the daemon with a ValueError."""
    levels = tmp_path / "levels.bundle"
    cli("train", "--normal", *map(str, NORMAL_FILES), "--detector", "levels", "--out", str(levels))
    device = Device(tmp_path, bundle=levels)
    device.replay(NORMAL_FILES[0])
    demo = shutil.copytree(DEMO_BUNDLE, device.data / "models" / "demo.bundle")
    assert device.command(command="reload_model", path=str(demo)).ok
    assert device.command(command="learn", action="start", seconds=600).ok
    assert device.command(command="rollback").ok
    assert not device.detector.learning, "its windows were fan-demo's"
    device.detector.run(FileSource([NORMAL_FILES[1]], RATE))
    assert device.detector.bundle.model_id == load_bundle(levels).model_id


def test_a_model_offers_no_mark_while_its_history_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle with its training windows said `learns` while history.json could not be read,
    and every mark was refused for the history: the page offered a button that could only
    fail (a diff review)."""
    import errno

    from edge import history

    bundle = tmp_path / "fan.bundle"
    cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(bundle))
    device = Device(tmp_path, bundle=bundle)
    device.replay(ANOMALOUS_FILE)
    assert device.detector.status()["learns"] is True  # its training windows back a mark
    record = device.data / "models" / "history.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text('{"entries": []}')  # there, and not to be read
    real = history.read_regular

    def failing(path: Path, *args: object, **kwargs: object) -> bytes:
        if Path(path) == record:  # a permission, a failing card's EIO
            raise OSError(errno.EIO, "Input/output error")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(history, "read_regular", failing)
    events = device.replay(ANOMALOUS_FILE)
    assert device.detector.status()["learns"] is False
    assert starts(events), "the fault is seen, by the configured model"
    reply = device.command(command="mark_normal", event_id="last")
    assert not reply.ok and "history.json cannot be read" in reply.detail, reply.detail


def test_an_event_of_another_model_is_not_learnt_into_the_model_in_use(tmp_path: Path) -> None:
    """After a switch to another model (reload_model, a restart with another bundle), Mark
    normal on an event the first one raised learnt that sound into the second (a phone review):
    refused, saying why, from the events kept in memory and from the event log alike."""
    device = Device(tmp_path, seconds=LEARN_S)
    device.replay(*NORMAL_FILES)  # the demo learns: version 1, which learns marks
    device.learning = {}
    (fault,) = starts(device.replay(ANOMALOUS_FILE))
    raised_by = fault["model"]
    assert raised_by == "fan-demo-12483c73-site-v1"
    other = tmp_path / "models" / "other.bundle"
    cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(other))
    device.detector.settings = device.detector.settings.model_copy(
        update={"models_dir": other.parent}
    )
    assert device.command(command="reload_model", path=str(other)).ok
    in_use = device.detector.bundle.model_id
    assert in_use == load_bundle(other).model_id and device.detector.status()["learns"]
    for restarted in (False, True):
        reply = device.command(command="mark_normal", event_id=fault["event_id"])
        assert not reply.ok, reply.detail
        assert f"was raised by model {raised_by}, not by {in_use} or a version" in reply.detail
        assert device.detector.bundle.model_id == in_use and not device.detector.status()["marked"]
        if not restarted:
            device.replay(NORMAL_FILES[0])  # a restart: the event is in the event log only
            assert device.detector.bundle.model_id == in_use
            assert fault["event_id"] not in device.detector._kept
    # a calibrated copy of the model that raised it is that model (README's step for a moved
    # microphone): not refused as another's (a diff review)
    calibrated = tmp_path / "models" / "demo-here.bundle"
    cli("calibrate", str(DEMO_BUNDLE), "--normal", *map(str, NORMAL_FILES), "--out",
        str(calibrated))  # fmt: skip
    device.detector.settings = device.detector.settings.model_copy(
        update={"models_dir": calibrated.parent}
    )
    assert device.command(command="reload_model", path=str(calibrated)).ok
    assert device.detector.bundle.model_id.startswith("fan-demo-12483c73-cal-")
    reply = device.command(command="mark_normal", event_id=fault["event_id"])
    # taken: its calibration's audio backs the refit (the demo carries no training windows)
    assert reply.ok and "was raised by model" not in reply.detail, reply.detail
    assert device.detector.bundle.model_id.startswith("fan-demo-12483c73-cal-")
    assert re.search(r"-cal-[0-9a-f]{8}-site-v\d+$", device.detector.bundle.model_id)
    # a version of the model that raised it may learn it: back to it, the mark is taken
    for _ in range(3):  # the calibrated copy's version, the copy, the other model
        assert device.command(command="rollback").ok
    assert device.detector.bundle.model_id == raised_by
    assert device.command(command="mark_normal", event_id=fault["event_id"]).ok


def test_the_windows_of_a_block_a_period_ends_in_carry_the_threshold_they_were_scored_with(
    tmp_path: Path,
) -> None:
    """A period's refit at a window partway through a capture block: the block's later windows,
    scored by the model before it, went to the page and MQTT with the new model's threshold, a
    score on one scale against a threshold on another (a before-stop read's leftover)."""

    class Windows(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.thresholds: list[float] = []

        def window(self, step: object, threshold: float) -> None:
            self.thresholds.append(threshold)

    device = Device(tmp_path, seconds=LEARN_S)
    windows = Windows()
    detector = Detector(device.settings(), load_bundle(DEMO_BUNDLE), [windows], persist=True)
    assert detector.learning
    before = detector.threshold
    detector.feed(np.concatenate([read_audio(f, RATE) for f in NORMAL_FILES]))  # 20 s: one block
    assert detector.bundle.model_id == "fan-demo-12483c73-site-v1", "the period ended in it"
    assert detector.threshold != before and set(windows.thresholds) == {before}
    detector.feed(read_audio(NORMAL_FILES[0], RATE))
    assert windows.thresholds[-1] == detector.threshold


def _moved(tmp_path: Path) -> Path:
    """The fixture's normal recordings as heard at another place: a noise floor 20 dB below the
    machine (a microphone moved away, nearer a fan of the building)."""
    rng = np.random.default_rng(0)
    site = tmp_path / "site"
    site.mkdir(parents=True)
    for f in NORMAL_FILES:
        a = read_audio(f, RATE)
        noisy = a + 0.1 * np.sqrt(np.mean(a**2)) * rng.standard_normal(len(a))
        sf.write(site / f"{f.stem}.wav", noisy.astype(np.float32), RATE, subtype="FLOAT")
    return site


@pytest.mark.parametrize("kind", ["fluctuation", "levels"])
def test_a_refit_after_a_calibration_sets_its_threshold_on_the_calibration_audio(
    tmp_path: Path, kind: str
) -> None:
    """A mark after `calibrate` for a moved microphone (README's steps 7 and 8) set the refit's
    threshold on the training's held-out windows, heard at the old place against the old
    centre: the calibration's threshold was lost (the MIMII fan trained on channel 0 and
    calibrated on channel 4: 1.96, and after one mark of a normal clip 2.40 to 2.62, above the
    uncalibrated 2.51). `calibrate` records the windows its threshold was set on, and a refit
    of the calibrated bundle scores them, each against the centre it was scored against."""
    trained, out = tmp_path / "trained.bundle", tmp_path / "site.bundle"
    cli("train", "--normal", *map(str, NORMAL_FILES), "--detector", kind, "--out", str(trained))
    cli("calibrate", str(trained), "--normal", str(_moved(tmp_path)), "--out", str(out))
    site = load_bundle(out)
    rows, fold = site.array(CALIBRATION_FEATURES), site.array(CALIBRATION_FOLD)
    centers = site.array(CALIBRATION_CENTERS)
    assert sorted(set(fold.tolist())) == list(range(len(NORMAL_FILES)))  # each file left out
    assert rows.shape == (len(fold), centers.shape[1]) and len(centers) == len(NORMAL_FILES)
    # no site audio yet: the refit's threshold is the calibration's (its files, here one
    # stream, there each its own: within a few per cent), not the training's
    nothing = np.zeros((0, centers.shape[1]), np.float32)
    refit = site_refit(site, nothing, np.zeros(0, np.int64), None)
    value = refit.manifest["threshold"]["value"]
    assert value == pytest.approx(site.manifest.threshold.value, rel=0.05)
    assert abs(load_bundle(trained).manifest.threshold.value / value - 1) > 0.15, "alike"
    assert refit.manifest["normal_scores"]["source"] == CALIBRATED_SOURCE


@pytest.mark.parametrize("shift", [100, 0.5])
def test_a_damaged_calibration_summary_refuses_the_refit_in_one_line(
    tmp_path: Path, shift: float
) -> None:
    """The calibration's windows are read only by a refit: one whose indices point past its
    centres (+100), or are no index at all (+0.5: arrays are read back as float64, and a fold
    of 0.5 matched no centre, its windows dropped without a word, and with none left the refit
    ended in an IndexError), is refused there with what to do."""
    out = tmp_path / "site.bundle"
    cli("calibrate", str(DEMO_BUNDLE), "--normal", str(_moved(tmp_path)), "--out", str(out))
    site = load_bundle(out)
    arrays = {**site.arrays, CALIBRATION_FOLD: site.array(CALIBRATION_FOLD) + shift}
    manifest = site.manifest.model_dump(exclude={"files", "checksum", "arrays"})
    write_bundle(tmp_path / "damaged.bundle", manifest, {}, arrays)
    damaged = load_bundle(tmp_path / "damaged.bundle")
    rows = site.array(CALIBRATION_FEATURES)[:20]
    with pytest.raises(LearningError, match="run soundsentry calibrate again") as e:
        site_refit(damaged, rows, np.zeros(len(rows), np.int64), None, np.ones(len(rows), bool))
    assert "\n" not in str(e.value)


def test_a_calibration_on_many_files_keeps_its_summary_and_its_refits_bounded() -> None:
    """The summary kept at least a run of every file: 160 ten-second clips (channels 0-7 of
    the MIMII fan's normal clips) kept 3,040 windows, not the 1,000 it promised, and 160
    centres; a refit scored them a centre at a time, pooling the whole site set with each
    (its sums and outer products made again each time): with a full site set of the levels
    kind (20,833 windows) 4.6 s of CPU instead of 0.6 s without the summary, on the audio loop
    (x86; several times that on a Pi), growing with the calibration's files."""
    from edge.learning import MAX_TRAINING_WINDOWS, RUN, calibration_summary

    bundle = load_bundle(DEMO_BUNDLE)
    rng = np.random.default_rng(0)
    shape = (19, *bundle.features.shape)  # a ten-second file's windows
    per_file = [rng.standard_normal(shape) for _ in range(160)]
    summary = calibration_summary(bundle, per_file)
    rows, fold = summary[CALIBRATION_FEATURES], summary[CALIBRATION_FOLD]
    assert len(rows) <= MAX_TRAINING_WINDOWS, len(rows)
    assert len(summary[CALIBRATION_CENTERS]) <= MAX_TRAINING_WINDOWS // RUN
    assert fold.max() < len(summary[CALIBRATION_CENTERS])
    assert np.all(np.diff(fold) >= 0)  # each fold's windows in one run of the file's own
    # a few files: all their windows, every file its own fold, as before
    few = calibration_summary(bundle, per_file[:10])
    assert len(few[CALIBRATION_FEATURES]) == 190 and len(few[CALIBRATION_CENTERS]) == 10


def test_a_new_configured_model_names_the_marks_it_does_not_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A calibration for a moved microphone (a new configured model) dropped the events marked
    normal in the old one's version without a word: the engineer had to remember them to mark
    them again (a field review). The start's line names them."""
    device = Device(tmp_path, seconds=LEARN_S)
    device.replay(*NORMAL_FILES)  # version 1, which learns marks
    device.learning = {}
    (fault,) = starts(device.replay(ANOMALOUS_FILE))
    assert device.command(command="mark_normal", event_id="last").ok
    calibrated = tmp_path / "demo-here.bundle"
    cli("calibrate", str(DEMO_BUNDLE), "--normal", *map(str, NORMAL_FILES), "--out",
        str(calibrated))  # fmt: skip
    device.bundle = calibrated
    with caplog.at_level(logging.WARNING, logger="edge.history"):
        device.replay(NORMAL_FILES[0])
    said = [r.getMessage() for r in caplog.records if "configured model is now" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert "the 1 event(s) marked normal in the one in use are not learnt" in said[0], said
    assert f"normal running (the newest: {fault['event_id']})" in said[0], said
    # another model refuses events it did not raise: not told to mark them (a diff review)
    other = tmp_path / "other.bundle"
    cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(other))
    device.bundle = DEMO_BUNDLE
    device.replay(NORMAL_FILES[0])  # the demo's version with the mark is in use again
    assert device.detector.status()["marked"] == [fault["event_id"]]
    device.bundle = other
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edge.history"):
        device.replay(NORMAL_FILES[0])
    said = [r.getMessage() for r in caplog.records if "configured model is now" in r.getMessage()]
    assert "they were another model's: this one raises events of its own to mark" in said[0]
    assert "mark_normal them again" not in said[0]


def test_state_json_keeps_each_device_ids_threshold_and_mute_and_the_machines_hours(
    tmp_path: Path,
) -> None:
    """A second id in the folder neither restores the first's threshold and mute nor writes over
    them; the running hours are the machine's, whichever id counted them. A file of the format
    before device ids is the device's: a replay that reads it first reads its settings, as
    before, and leaves them for the device's daemon, which takes them for good."""
    from edge.persist import STATE, DeviceState, SavedMute

    DeviceState(tmp_path, "one").save("m", 2.0, SavedMute(100.0, 600.0), 7.0)
    two = DeviceState(tmp_path, "two")
    assert two.threshold_for("m") is None and two.mute is None and two.running_seconds == 7.0
    two.save("m", 3.0, None, 9.0)
    one = DeviceState(tmp_path, "one")
    assert one.threshold_for("m") == 2.0 and one.mute == SavedMute(100.0, 600.0)
    assert one.running_seconds == 9.0
    one.save("m", None, None, 9.0)
    assert DeviceState(tmp_path, "two").threshold_for("m") == 3.0
    assert DeviceState(tmp_path, "one").threshold_for("m") is None
    DeviceState(tmp_path).save("m", 4.0, None, 9.0)  # a reader of no id writes as the writer
    assert DeviceState(tmp_path, "one").threshold_for("m") == 4.0
    assert DeviceState(tmp_path, "two").threshold_for("m") == 3.0

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / STATE).write_text(json.dumps({"model": "m", "threshold": 2.0, "running_seconds": 7}))
    replay = DeviceState(legacy, "host-replay", live=False)
    assert replay.threshold_for("m") == 2.0
    replay.save("m", None, None, 7.0)
    host = DeviceState(legacy, "host")  # the device's own daemon takes them
    assert host.threshold_for("m") == 2.0
    host.save("m", None, None, 7.0)  # and resets the threshold: no other id gets the old one
    assert DeviceState(legacy, "host-replay", live=False).threshold_for("m") is None
    assert DeviceState(legacy, "renamed").threshold_for("m") is None
    assert DeviceState(legacy, "host").threshold_for("m") is None


def test_a_mark_says_it_drops_the_threshold_set_by_command(tmp_path: Path) -> None:
    """The operator raised the threshold to 3.5, then marked an event normal: the reply said
    "threshold 2.507 -> 2.667" and the new version ran at 2.667, more sensitive than they had
    set it, without a word (a walk-through). The reply says the override is dropped."""
    device = Device(tmp_path, seconds=LEARN_S)
    assert starts(device.replay(*NORMAL_FILES)) == []  # the site learnt first
    d = Detector(device.settings(), load_bundle(DEMO_BUNDLE), [Recorder()], persist=True)
    _feed_till_an_event_opens(d)
    controller = Controller(d)
    raised = 1.5 * d.threshold
    assert controller.handle_payload(
        json.dumps({"command": "set_threshold", "value": raised}).encode()
    ).ok
    reply = controller.handle_payload(b'{"command": "mark_normal", "event_id": "last"}')
    assert reply.ok, reply.detail
    assert f"the threshold {raised:.6g} set by command was for the model before" in reply.detail
    assert d.threshold != pytest.approx(raised)  # the new version's own
