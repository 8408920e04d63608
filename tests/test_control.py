"""Detector and Controller in process over a FileSource: the public API, poisoned and flooding
commands, where a bundle may come from, audio that lies, and one stream per replayed file."""

from __future__ import annotations

import json
import logging
import shutil
import stat
import threading
import time
from pathlib import Path

import jinja2
import numpy as np
import pytest
import soundfile as sf
from conftest import AE_BUNDLE, DEMO_BUNDLE, DEMO_CLIP, NORMAL_FILES
from detector_helpers import Recorder

from edge.audio_io import read_audio
from edge.bundle import load_bundle
from edge.commands import ReplyTo
from edge.control import Controller
from edge.daemon import WORK_QUEUE_MAX, Detector
from edge.messages import ResponseMessage
from edge.settings import Settings
from edge.sources import FileSource

RATE = 16000


def fault_file(tmp_path: Path, name: str = "fault.wav") -> Path:
    """The fault section of the demo clip (anomalous throughout)."""
    clip = read_audio(DEMO_CLIP, RATE)
    path = tmp_path / name
    sf.write(path, clip[int(5.5 * RATE) : int(10.5 * RATE)], RATE, subtype="PCM_16")
    return path


def detector(tmp_path: Path, clips: bool = False, **settings) -> tuple[Detector, Recorder]:
    rec = Recorder()
    settings.setdefault("detector", {"cooldown_seconds": 0})
    s = Settings(
        device_id="unit",
        model=DEMO_BUNDLE,
        data_dir=tmp_path / "data",
        clips={"enabled": clips},
        **settings,
    )
    return Detector(s, load_bundle(DEMO_BUNDLE), [rec]), rec


def replies(rec: Recorder) -> dict[str, ResponseMessage]:
    return {r.id: r for r in rec.responses if r.id}


def test_public_api_mute_threshold_and_status_over_a_file(tmp_path: Path) -> None:
    audio = fault_file(tmp_path)
    d, rec = detector(tmp_path)
    ctl = Controller(d)
    ctl.submit_payload(b'{"command": "mute", "minutes": 10, "id": "m"}')
    d.run(FileSource([audio], RATE))
    assert replies(rec)["m"].ok and rec.kinds() == []  # muted: the fault raised nothing
    assert any(s.state == "muted" for s in rec.states)

    d, rec = detector(tmp_path)  # the same audio unmuted raises an event
    d.run(FileSource([audio], RATE))
    assert rec.kinds()[0] == "start" and rec.kinds()[-1] == "end"

    d, rec = detector(tmp_path)
    ctl = Controller(d)
    high = d.bundle.threshold * 3.9
    ctl.submit_payload(json.dumps({"command": "set_threshold", "value": high, "id": "t"}).encode())
    ctl.submit_payload(b'{"command": "status", "id": "s"}')
    d.run(FileSource([audio, audio], RATE))  # the threshold set holds into the next stream
    got = replies(rec)
    assert got["t"].ok and got["s"].status["threshold"] == pytest.approx(high)
    assert rec.kinds() == []  # the fault stays below a threshold raised this far
    assert d.threshold == pytest.approx(high)
    assert d.status()["windows_scored"] == d.windows > 0
    # one number for the threshold on every topic (the reply had 16 digits, the state 6)
    assert d.status()["threshold"] == rec.states[-1].threshold == round(high, 6)
    assert d.status()["calibrated_threshold"] == round(d.bundle.threshold, 6)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "over the 65536-byte limit"),
        (b"[" * 20_000 + b"]" * 20_000, "nested deeper"),
        (b'{"command": "status", "x": ' + b"[" * 9 + b"]" * 9 + b"}", "nested deeper"),
        (b'{"command": "mute", "minutes": "' + b"9" * 70_000 + b'"}', "byte limit"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"{oops", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"command": "mute", "minutes": NaN}', "not JSON: NaN is not a JSON number"),
        (b'{"command": "set_threshold", "value": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"command": "mute", "minutes": 1e999}', "minutes"),
        (b'{"command": "launch\\nFORGED"}', "command"),
        (b'{"command": "set_threshold", "value": -1}', "value"),
    ],
)
def test_poisoned_commands_are_rejected_with_a_reply(
    tmp_path: Path, payload: bytes, reason: str
) -> None:
    d, rec = detector(tmp_path)
    reply = Controller(d).handle_payload(payload)
    assert reply.ok is False and reason in reply.detail and "\n" not in reply.detail
    assert rec.responses == [reply]


def test_the_audit_lines_name_a_command_s_id_and_only_a_real_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A command refused by its arguments was logged without its id, and one sent without an
    id as `(id None)` (a field test): the audit log is how an operator finds a request."""
    d, _ = detector(tmp_path)
    caplog.set_level(logging.INFO, logger="edge.control")
    ctl = Controller(d)
    ctl.handle_payload(b'{"command": "mute", "minutes": "abc", "id": "x1"}')
    ctl.handle_payload(b'{"command": "unmute"}')
    # an id the command is refused for is no id: its line break forged an audit line through
    # the rejection's warning (an integrator's review)
    forged = "x\n2026-12-07 02:20:00,000 INFO edge.control: command mute (id op-17): muted"
    reply = ctl.handle_payload(json.dumps({"command": "status", "id": forged}).encode())
    assert reply.ok is False and reply.id is None and "id: String should" in reply.detail
    said = [r.getMessage() for r in caplog.records if r.name == "edge.control"]
    assert said[0].startswith("rejected command mute (id x1): minutes"), said
    assert said[1].startswith("command unmute: "), said
    assert said[2].startswith("rejected command status: id") and "\n" not in said[2], said


def test_a_command_shed_as_the_loop_empties_the_queue_is_still_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MQTT thread found the queue full, and before it kept the command as shed, the loop
    ran the last queued command and found nothing shed to answer: the command waited for its
    `busy` until another command came (a review's race). The loop's look at the shed now waits
    for the MQTT thread to have kept it."""
    from edge.control import SHED_REPLY

    d, rec = detector(tmp_path)
    ctl = Controller(d)
    loop_done = threading.Event()

    def full_queue(work: object) -> bool:  # the queue full; meanwhile the loop empties it
        loop = threading.Thread(target=lambda: (ctl._answer_shed(), loop_done.set()))
        loop.start()
        loop.join(0.5)  # blocked (fixed) or done, answering nothing (the race)
        return False

    monkeypatch.setattr(d, "submit", full_queue)
    ctl.submit_payload(b'{"command": "status", "id": "late"}')
    assert loop_done.wait(10)
    assert [(r.id, r.ok, r.detail) for r in rec.responses] == [("late", False, SHED_REPLY)]


def test_a_command_shed_is_answered_when_a_reload_comes_as_the_last_command_runs(
    tmp_path: Path,
) -> None:
    """SIGHUP queued a reload while the loop ran the last queued command: that command looked
    at the queue, saw the reload waiting and left the shed commands to the work after it; the
    reload answered none, and a shed command waited for its `busy` until another command came
    (a concurrency review)."""
    from edge.control import SHED_REPLY

    d, rec = detector(tmp_path)
    ctl = Controller(d)

    class SighupDuringTheLast(Recorder):  # the signal comes as the last command replies
        def response(self, message: ResponseMessage, reply_to: ReplyTo | None = None) -> None:
            if message.id == "last":
                ctl.submit_reload()

    d.sinks = (*d.sinks, SighupDuringTheLast())
    for i in range(WORK_QUEUE_MAX - 1):
        ctl.submit_payload(json.dumps({"command": "status", "id": str(i)}).encode())
    ctl.submit_payload(b'{"command": "status", "id": "last"}')
    ctl.submit_payload(b'{"command": "status", "id": "shed"}')  # the queue is full
    assert d.commands_shed == 1
    while d.run_pending():
        pass
    assert d.work_waiting() == 0
    assert [(r.ok, r.detail) for r in rec.responses if r.id == "shed"] == [(False, SHED_REPLY)]


def test_a_flood_is_shed_and_counted_and_audio_goes_on(tmp_path: Path) -> None:
    """A shed command is answered `busy` under its id: a Node-RED flow waiting for the reply to
    its id waited for ever (72 replies to 200 commands, in a review)."""
    from edge.control import RETAINED_REFUSAL, SHED_REPLY

    d, rec = detector(tmp_path)
    ctl = Controller(d)
    for i in range(WORK_QUEUE_MAX + 100):
        asked = ReplyTo(f"flows/{i}", str(i).encode()) if i % 2 else None  # MQTT 5's, or none
        ctl.submit_payload(json.dumps({"command": "status", "id": str(i)}).encode(), asked)
    ctl.submit_payload(b'{"command": "status", "id": "5"}', ReplyTo("flows/5", b"5"))  # a QoS 1
    ctl.submit_retained(b'{"command": "unmute", "id": "r1"}', ReplyTo("r"))  # copy; refused
    assert d.commands_shed == 102
    d.run(FileSource([NORMAL_FILES[0]], RATE))
    assert len(rec.responses) == WORK_QUEUE_MAX + 102 and d.windows > 0
    for r, to in zip(rec.responses, rec.reply_tos, strict=True):  # each where it was asked
        want = ReplyTo("r") if r.id == "r1" else ReplyTo(f"flows/{r.id}", r.id.encode())
        assert to == (want if r.id == "r1" or int(r.id) % 2 else None), (r.id, to)
    # the queued commands' own replies first, then the shed ones': a flow that takes the first
    # reply to an id never takes `busy` for a command that ran (a second review)
    ran, shed = rec.responses[:WORK_QUEUE_MAX], rec.responses[WORK_QUEUE_MAX:]
    assert [int(r.id) for r in ran] == list(range(WORK_QUEUE_MAX)) and all(r.ok for r in ran)
    busy = [int(r.id) for r in shed if r.detail == SHED_REPLY and not r.ok]
    assert busy == [*range(WORK_QUEUE_MAX, WORK_QUEUE_MAX + 100), 5]
    assert (shed[-1].id, shed[-1].ok, shed[-1].detail) == ("r1", False, RETAINED_REFUSAL)
    assert d.status()["commands_shed"] == 102


def test_a_command_that_raises_costs_one_reply_not_the_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d, _rec = detector(tmp_path)
    ran = []
    d.submit(lambda: 1 / 0)  # a bug in queued work
    d.submit(lambda: ran.append("next"))  # the work queued behind it still runs
    with caplog.at_level(logging.ERROR, logger="edge.daemon"):
        d.run(FileSource([NORMAL_FILES[0]], RATE))
    assert d.windows > 0 and ran == ["next"]
    assert "command failed: ZeroDivisionError: division by zero" in caplog.text


def test_an_empty_command_message_is_a_retained_one_cleared_and_no_command(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Clearing a retained command as the daemon's own warning says (`mosquitto_pub -r -n`)
    reaches a connected daemon as an empty message, which was rejected as "not JSON" with a
    warning and a reply on the response topic (in a review)."""
    d, rec = detector(tmp_path)
    with caplog.at_level(logging.INFO):
        Controller(d).submit_payload(b"")
        d.feed(np.zeros(RATE // 10, np.float32))  # the loop runs what was queued
    assert rec.responses == [] and "rejected" not in caplog.text
    assert "empty command message" in caplog.text


def _fifo_bundle(root: Path) -> Path:
    import os

    b = root / "fifo.bundle"
    b.mkdir()
    os.mkfifo(b / "manifest.json")
    return b


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/dev/zero", "bundles load only from"),
        ("/etc", "bundles load only from"),
        ("nonexistent.bundle", "no bundle named"),
        ("../../etc", "bundles load only from"),
        ("a" * 300, "model path not usable"),  # ENAMETOOLONG: a traceback logged as a bug
        # whether a path outside exists is not told (the security review): both refused alike
        ("/etc/shadow", "model path refused: bundles load only from"),
        ("/etc/nonexistent", "model path refused: bundles load only from"),
    ],
)
def test_reload_model_only_from_the_models_folders(tmp_path: Path, path: str, reason: str) -> None:
    d, _rec = detector(tmp_path, models_dir=tmp_path / "models")
    reply = Controller(d).handle_payload(
        json.dumps({"command": "reload_model", "path": path}).encode()
    )
    assert reply.ok is False and reason in reply.detail
    assert d.bundle.model_id == load_bundle(DEMO_BUNDLE).model_id


def test_reload_model_by_a_link_to_the_models_folder_still_loads(tmp_path: Path) -> None:
    """The check that refuses paths outside before asking whether they exist took a link to
    the models folder (`/srv/models` -> the state folder's) for outside (the diff review)."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(AE_BUNDLE, models / "ae.bundle")
    (tmp_path / "alias").symlink_to(models)
    d, _ = detector(tmp_path, models_dir=models)
    path = tmp_path / "alias" / "ae.bundle"
    reply = Controller(d).handle_payload(
        json.dumps({"command": "reload_model", "path": str(path)}).encode()
    )
    assert reply.ok, reply.detail
    assert d.bundle.model_id == load_bundle(AE_BUNDLE).model_id


def test_reload_model_by_name_and_crafted_bundles_keep_the_running_model(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(AE_BUNDLE, models / "ae.bundle")
    fifo = _fifo_bundle(models)
    d, _ = detector(tmp_path, models_dir=models)
    ctl = Controller(d)
    reply = ctl.handle_payload(json.dumps({"command": "reload_model", "path": str(fifo)}).encode())
    assert reply.ok is False and "not a regular file" in reply.detail
    reply = ctl.handle_payload(b'{"command": "reload_model", "path": "ae.bundle"}')
    assert reply.ok and d.bundle.model_id == load_bundle(AE_BUNDLE).model_id
    # the new model's threshold and status with it, as a mark's and a rollback's reply (it said
    # "loaded X" alone: a field review)
    assert reply.detail == f"loaded {d.bundle.model_id}, threshold {d.threshold:.4g}"
    assert reply.status is not None and reply.status["model"] == d.bundle.model_id


def test_reload_model_switches_the_feature_recipe_not_other_settings(tmp_path: Path) -> None:
    """A model trained now (recipe logmel-v2) loads over the v1 demo without a restart (it was
    refused: "its features differ"): the audio and its windows are the same, and the new
    pipeline computes its own recipe. A model of other feature settings still waits for a
    restart, and the running one is kept."""
    from dataclasses import replace

    from edge.features import FeatureParams
    from train.fluctuation import train_fluctuation

    models = tmp_path / "models"
    models.mkdir()
    now = train_fluctuation(list(NORMAL_FILES), models / "now.bundle")
    bands = train_fluctuation(
        list(NORMAL_FILES),
        models / "bands.bundle",
        params=replace(FeatureParams(), n_mels=32),
    )
    d, _ = detector(tmp_path, models_dir=models)
    assert d.bundle.features.frontend == "logmel-v1"
    ctl = Controller(d)
    reply = ctl.handle_payload(b'{"command": "reload_model", "path": "bands.bundle"}')
    assert reply.ok is False and "its features differ" in reply.detail
    assert d.bundle.model_id == load_bundle(DEMO_BUNDLE).model_id
    reply = ctl.handle_payload(b'{"command": "reload_model", "path": "now.bundle"}')
    assert reply.ok, reply.detail
    assert d.bundle.model_id == load_bundle(now).model_id != load_bundle(bands).model_id
    audio = read_audio(NORMAL_FILES[0], RATE)
    d.feed(audio)
    assert d.pipeline.logmel.params.frontend == "logmel-v2" and d.windows > 0


def test_sighup_applies_health_and_clips_and_keeps_a_fault_in_progress(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """[clips] and [health] were read only when the Detector was built: a reload changed
    nothing of them, and said nothing either. Now they apply at once; the silence already
    heard still counts, and a clip is written for the next anomaly."""
    d, rec = detector(tmp_path, health={"fault_seconds": 5})
    new = d.settings.model_copy(
        update={
            "health": d.settings.health.model_copy(update={"fault_seconds": 1.0}),
            "clips": d.settings.clips.model_copy(update={"enabled": True}),
        }
    )
    ctl = Controller(d, reload_settings=lambda: new)
    for _ in range(10):  # 1 s of digital silence: no fault at 5 s
        d.feed(np.zeros(RATE // 10, np.float32))
    with caplog.at_level(logging.INFO, logger="edge.control"):
        ctl.reload()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reload: applied")]
    # what took effect is said (only "the model is unchanged" was, in a field test)
    assert said == ["reload: applied [clips] enabled False -> True, [health] fault_seconds 5.0 "
                    "-> 1.0"], said  # fmt: skip
    d.feed(np.zeros(RATE // 2, np.float32))  # 1.5 s in all: a fault at 1 s
    assert [h.change for h in rec.healths if h.change] == ["fault:silence"]
    fault = read_audio(fault_file(tmp_path), RATE)
    for i in range(0, 2 * len(fault), 4096):
        d.feed(np.resize(fault, 2 * len(fault))[i : i + 4096])
    d.close_event("stopped")
    ends = [e for e in rec.events if e.type == "end"]
    assert ends and ends[-1].clip and (tmp_path / "data" / "clips" / ends[-1].clip).is_file()


def test_a_sighup_that_changes_nothing_keeps_the_threshold_set_and_the_open_event(
    tmp_path: Path,
) -> None:
    """A SIGHUP with the same settings and the same bundle rebuilt the pipeline and reloaded
    the model: an open anomaly ended (`settings_changed`) and came back under a new event id,
    a duplicate alarm, and the threshold set by command was dropped (from state.json too), where
    a restart keeps it (in a review)."""
    d, rec = detector(tmp_path)
    ctl = Controller(d, reload_settings=lambda: d.settings)
    value = round(d.bundle.threshold * 0.9, 4)
    ctl.handle_payload(json.dumps({"command": "set_threshold", "value": value}).encode())
    fault = read_audio(fault_file(tmp_path), RATE)
    for i in range(0, len(fault), 1600):
        d.feed(fault[i : i + 1600])
    assert rec.kinds() == ["start"]
    ctl.reload()
    for i in range(0, len(fault), 1600):
        d.feed(fault[i : i + 1600])
    d.close_event("stopped")
    assert [(e.type, e.ended_by) for e in rec.events] == [("start", None), ("end", "stopped")]
    assert d.threshold == pytest.approx(value)


def test_a_sighup_with_settings_the_model_refuses_ends_no_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An event logic the bundle cannot take (3 of 5 windows where it keeps 3) ended the open
    anomaly first and then failed as "command failed: SettingsError" (in a review): the
    settings are refused in one line and the event goes on."""
    d, rec = detector(tmp_path)
    detector_settings = d.settings.detector.model_copy(update={"trigger_windows": 5})
    new = d.settings.model_copy(update={"detector": detector_settings})
    fault = read_audio(fault_file(tmp_path), RATE)
    for i in range(0, len(fault), 1600):
        d.feed(fault[i : i + 1600])
    assert rec.kinds() == ["start"]
    with caplog.at_level(logging.ERROR):
        Controller(d, reload_settings=lambda: new).reload()
    assert "reload: settings not applied" in caplog.text, caplog.text
    assert rec.kinds() == ["start"] and d.settings.detector.trigger_windows != 5


def test_a_sighup_that_narrows_the_bounds_drops_a_threshold_set_outside_them(
    tmp_path: Path,
) -> None:
    """A `[detector] threshold` override widens what set_threshold accepts; with it removed by a
    reload, the value set under it (16 times the calibrated one) stayed in force, where a restart
    drops it for being out of bounds: detection all but off, without a word (in a review)."""
    d, _ = detector(tmp_path)
    calibrated = d.bundle.threshold
    wide = d.settings.detector.model_copy(update={"threshold": calibrated * 20})
    d.apply_settings(d.settings.model_copy(update={"detector": wide}))
    ctl = Controller(d, reload_settings=lambda: new)
    high = round(calibrated * 16, 3)
    reply = ctl.handle_payload(json.dumps({"command": "set_threshold", "value": high}).encode())
    assert reply.ok, reply.detail
    new = d.settings.model_copy(update={"detector": wide.model_copy(update={"threshold": None})})
    ctl.reload()
    assert d.threshold == pytest.approx(calibrated)


def test_a_reload_keeps_the_running_capture_s_stall_time(tmp_path: Path) -> None:
    """A reload applied the new [health] stall_seconds to the daemon's stall check at once but
    kept the running capture's [audio] blocks (it says both apply after a restart): 1-s blocks
    against a new stall time of 0.5 s were taken for a stalled microphone between any two
    blocks (in a review). The running stall time stays until the restart."""
    d, _ = detector(tmp_path, audio={"block_seconds": 1.0}, health={"stall_seconds": 3.0})
    new = d.settings.model_copy(
        update={
            "audio": d.settings.audio.model_copy(update={"block_seconds": 0.1}),
            "health": d.settings.health.model_copy(
                update={"stall_seconds": 0.5, "fault_seconds": 1.0}
            ),
        }
    )
    Controller(d, reload_settings=lambda: new).reload()
    health = d.settings.health
    assert (health.stall_seconds, health.fault_seconds) == (3.0, 1.0)
    assert d.settings.audio.block_seconds == 1.0


def test_a_reload_says_learning_changes_wait_for_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload with a new [learning] budget or keep_versions left the running adapter on the
    old ones without a word, where [mqtt], [audio], [web] and [health] changes say so."""
    d, _ = detector(tmp_path)
    learning = d.settings.learning.model_copy(update={"false_alarms_per_day": 0.01})
    new = d.settings.model_copy(update={"learning": learning})
    with caplog.at_level(logging.WARNING):
        Controller(d, reload_settings=lambda: new).reload()
    assert "[learning] changes apply after a restart" in caplog.text


def test_a_reload_says_what_waits_for_a_restart_and_applies_the_state_interval_now(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGHUP that changed data_dir, log_level or state_interval_seconds logged only "no
    setting that applies now changed" (an operator's review): the first two are said to wait
    for a restart, and the state messages' interval applies at once."""
    d, _ = detector(tmp_path)
    d._next_state = time.monotonic() + 10.0  # as the last state sent left it
    new = d.settings.model_copy(
        update={"data_dir": tmp_path / "elsewhere", "log_level": "DEBUG",
                "state_interval_seconds": 7.0}
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        Controller(d, reload_settings=lambda: new).reload()
    assert "reload: data_dir and log_level changes apply after a restart" in caplog.text
    assert "applied state_interval_seconds 10.0 -> 7.0" in caplog.text, caplog.text
    assert d.settings.state_interval_seconds == 7.0
    assert d._next_state <= time.monotonic() + 7.0, "not after the old interval's next state"
    assert d.settings.data_dir != tmp_path / "elsewhere"


def test_no_stall_is_reported_for_the_time_before_the_run(tmp_path: Path) -> None:
    """The stall clock started when the daemon was built, and the service waits up to 5 s for
    the broker before it runs: every start without a broker reported the microphone stalled
    (`no audio for 3 s`) before a block was due (in a review)."""
    import time

    d, rec = detector(tmp_path, health={"stall_seconds": 1.0})
    time.sleep(1.1)  # the service waiting for its broker
    d.run(iter([None]))  # a tick, before any block could have come
    assert "stalled" not in d.health.active
    assert not [h for h in rec.healths if h.change and "stall" in h.change], rec.healths


def test_the_first_block_after_a_slow_device_open_is_no_stall(tmp_path: Path) -> None:
    """1-s blocks and a 1.5-s stall time: a USB microphone that takes 0.6 s to open delivers
    its first block 1.6 s into the run, and every start reported the microphone stalled (in a
    review). The first block of a run is given a block more."""
    import time

    d, rec = detector(tmp_path, audio={"block_seconds": 1.0}, health={"stall_seconds": 1.5})
    audio = read_audio(NORMAL_FILES[0], RATE)

    def source():  # as the capture yields: None every 0.25 s while it waits
        time.sleep(0.6)  # PortAudio opening the device
        opened = time.monotonic()
        for i in range(3):
            while time.monotonic() - opened < (i + 1) * 1.0:
                time.sleep(0.25)
                yield None
            yield audio[i * RATE : (i + 1) * RATE]

    d.run(source())
    assert not [h for h in rec.healths if h.change and "stall" in h.change], rec.healths


def test_nan_audio_is_a_health_fault_not_silence(tmp_path: Path) -> None:
    clip = read_audio(NORMAL_FILES[0], RATE)
    clip[RATE // 2 : RATE] = np.nan  # 5 s: finite for RECOVER_SECONDS after the bad second
    clip[RATE] = np.inf
    path = tmp_path / "nan.wav"
    sf.write(path, clip, RATE, subtype="FLOAT")
    d, rec = detector(tmp_path)
    with np.errstate(all="raise"):  # no RuntimeWarning-only path is left
        d.run(FileSource([path], RATE))
    changes = [h.change for h in rec.healths if h.change]
    assert changes[:2] == ["fault:invalid samples", "recovered:invalid samples"]
    assert any(s.state == "fault" for s in rec.states)
    assert all(np.isfinite(s.score) for s in rec.states if s.score is not None)
    assert rec.kinds() == []


def test_each_replayed_file_is_its_own_stream(tmp_path: Path) -> None:
    files = [fault_file(tmp_path, "a.wav"), fault_file(tmp_path, "b.wav")]
    d, rec = detector(tmp_path)
    d.run(FileSource(files, RATE))
    assert rec.kinds().count("start") == 2 and rec.kinds()[-1] == "end"
    first_end = next(e for e in rec.events if e.type == "end")
    assert first_end.stream_offset_s <= 5.0  # ended within the first file

    d, rec = detector(tmp_path)
    d.run(FileSource(files, RATE, continuous=True))
    assert rec.kinds().count("start") == 1


def test_data_dir_and_clips_are_private_whoever_runs(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        d, rec = detector(tmp_path, clips=True)
        d.run(FileSource([fault_file(tmp_path)], RATE))
    finally:
        os.umask(old)
    data = tmp_path / "data"
    clips = [e.clip for e in rec.events if e.clip]
    assert clips
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "clips").stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "clips" / clips[0]).stat().st_mode) == 0o600


def test_a_machine_switched_off_is_off_not_an_anomaly(tmp_path: Path) -> None:
    normal = read_audio(NORMAL_FILES[0], RATE)
    rng = np.random.default_rng(0)  # the room with the fan off: mains hum and a little hiss
    t = np.arange(8 * RATE) / RATE
    room = np.sin(2 * np.pi * 50 * t) + 0.3 * np.sin(2 * np.pi * 150 * t)
    room += 0.01 * rng.standard_normal(len(t))
    ambient = (room / np.abs(room).max() * 10 ** (-57 / 20)).astype(np.float32)
    path = tmp_path / "on-off-on.wav"
    sf.write(path, np.concatenate([normal, ambient, normal]), RATE, subtype="FLOAT")

    d, rec = detector(tmp_path)  # without an off level, switching off is an anomaly
    d.run(FileSource([path], RATE))
    assert "start" in rec.kinds()

    off = profile_off_level(NORMAL_FILES)
    d, rec = detector(tmp_path, detector={"cooldown_seconds": 0, "off_below_dbfs": off})
    d.run(FileSource([path], RATE))
    machine = [s.machine for s in rec.states]
    assert "off" in machine and machine[-2:] == ["running", None]  # None: `stopped`
    assert rec.kinds() == []
    assert d.status()["windows_scored"] > 0


def profile_off_level(files: list[Path]) -> float:
    from edge.machine_state import machine_profile

    return machine_profile([read_audio(f, RATE) for f in files], load_bundle(DEMO_BUNDLE).features)[
        "off_below_dbfs"
    ]


def test_a_stall_during_an_anomaly_ends_it_as_a_gap_and_systemd_hears_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`audio_gap` was promised by the schema and never sent (a stall ended events as an
    `audio_fault`), and systemd's STATUS kept whatever it said at READY."""
    import socket
    import time

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    d, rec = detector(tmp_path, health={"stall_seconds": 1})
    fault = read_audio(fault_file(tmp_path), RATE)
    deadline = time.monotonic() + 20

    def microphone():
        for i in range(0, len(fault), 1600):
            yield fault[i : i + 1600]
        while not [e for e in rec.events if e.type == "end"]:  # then nothing comes
            assert time.monotonic() < deadline, "the anomaly did not end within 20 s"
            time.sleep(0.05)  # the pace at which a capture reports that nothing came
            yield None

    try:
        d.run(microphone())
        sock.setblocking(False)
        said = []
        while True:
            try:
                said.append(sock.recv(256).decode())
            except BlockingIOError:
                break
    finally:
        sock.close()
    starts = [e for e in rec.events if e.type == "start"]
    ends = [e for e in rec.events if e.type == "end"]
    assert starts and [e.ended_by for e in ends] == ["audio_gap"]
    status = [m.split("STATUS=")[1] for m in said if "STATUS=" in m]
    assert status[0].startswith("listening with"), said
    assert any(s.startswith("no audio: no audio for 1 s") for s in status[1:]), said


def test_a_stalled_microphone_sends_no_score_level_or_index_as_if_current(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the microphone unplugged for minutes, every state message repeated the last
    window's score and level with a fresh time, and MQTT's metrics, /metrics and `status` the
    last minute's anomaly index, as if current (a soak review). While no audio comes they are
    null; the index after its minute (here 2 s), as for the machine off."""
    import edge.metrics

    monkeypatch.setattr(edge.metrics, "INDEX_SECONDS", 2.0)
    d, rec = detector(tmp_path, health={"stall_seconds": 1})
    normal = read_audio(NORMAL_FILES[0], RATE)
    deadline = time.monotonic() + 20
    seen: dict[str, object] = {}

    def microphone():
        for i in range(0, len(normal), 1600):
            yield normal[i : i + 1600]
        seen["before"] = d.status()
        while "stalled" not in d.health.active or d.index.value is not None:
            assert time.monotonic() < deadline, "no stall, or the index kept its value"
            time.sleep(0.05)  # the pace at which a capture reports that nothing came
            yield None
        seen["stalled"] = d.status()
        seen["states"] = len(rec.states)
        d.emit_state()

    d.run(microphone())
    before, stalled = seen["before"], seen["stalled"]
    assert isinstance(before, dict) and isinstance(stalled, dict)
    assert before["level_dbfs"] is not None and before["anomaly_index"] is not None
    assert stalled["state"] == "fault" and stalled["faults"] == ["stalled"]
    assert stalled["level_dbfs"] is None and stalled["anomaly_index"] is None
    during = rec.states[seen["states"]]  # type: ignore[index]
    assert during.state == "fault" and during.score is None and during.level_dbfs is None


def test_the_same_id_after_another_command_runs_again(tmp_path: Path) -> None:
    """Repeats were recognised by id and content for 5 minutes whatever ran in between: with
    a fixed id (the Home Assistant example's), mute, unmute, mute answered "muted" from the
    cache and left the device unmuted."""
    d = Detector(Settings(data_dir=tmp_path), load_bundle(DEMO_BUNDLE), [])
    control = Controller(d)
    mute = b'{"command": "mute", "minutes": 240, "id": "ha-maintenance"}'
    assert control.handle_payload(mute).ok and d.muted
    assert control.handle_payload(mute).ok and d.muted, "a redelivery: the first reply again"
    assert control.handle_payload(b'{"command": "unmute"}').ok and not d.muted
    assert control.handle_payload(mute).ok and d.muted, "a new request: run again"


def test_an_oversized_command_is_not_held_while_it_waits(tmp_path: Path) -> None:
    """The size was checked on the loop's thread: up to 64 payloads of the broker's largest
    (256 MB by default) waited in the work queue, enough to take a Pi's memory."""
    d = Detector(Settings(data_dir=tmp_path), load_bundle(DEMO_BUNDLE), [])
    control = Controller(d)
    big = b"{" + b" " * (1 << 20) + b"}"
    control.submit_payload(big)
    (work,) = list(d._work.queue)
    held = [c.cell_contents for c in (work.__closure__ or ())]
    assert not any(isinstance(c, bytes) and len(c) > 1000 for c in held), "the payload is kept"
    replies = Recorder()
    d.sinks = (replies,)
    d.run_pending()
    (reply,) = replies.responses
    assert not reply.ok and "over the 65536-byte limit" in reply.detail


def test_every_threshold_home_assistant_offers_is_accepted(tmp_path: Path) -> None:
    """The number announced to Home Assistant was widened to a `[detector] threshold` override
    while set_threshold kept the narrower bounds: values at the number's ends were refused and
    the number snapped back, the refusal only on the response topic."""
    from edge.discovery import discovery_configs
    from edge.topics import Topics

    calibrated = load_bundle(DEMO_BUNDLE).threshold
    override = round(calibrated * 10, 3)
    rec = Recorder()
    settings = Settings(device_id="unit", model=DEMO_BUNDLE, data_dir=tmp_path / "data",
                        detector={"cooldown_seconds": 0, "threshold": override})  # fmt: skip
    d = Detector(settings, load_bundle(DEMO_BUNDLE), [rec], persist=True)
    topics = Topics("soundsentry", "unit")
    configs = discovery_configs(topics, "m", calibrated, in_force=override)
    number = configs[topics.ha_config("number", "threshold")]
    assert number["min"] < calibrated / 3 and number["max"] >= override
    ctl = Controller(d)
    for name in ("min", "max"):
        command = {"command": "set_threshold", "value": number[name], "id": name}
        ctl.submit_payload(json.dumps(command).encode())
    d.run(FileSource([fault_file(tmp_path)], RATE))
    got = replies(rec)
    assert got["min"].ok and got["max"].ok, (got["min"].detail, got["max"].detail)
    assert d.threshold == pytest.approx(number["max"])
    again = Detector(d.settings, load_bundle(DEMO_BUNDLE), [], persist=True)  # a restart
    assert again.threshold == pytest.approx(number["max"]), "the threshold set was dropped"


@pytest.mark.parametrize("calibrated", [0.5, 0.97, 0.003, 0.0005, 0.995])
def test_the_threshold_number_never_offers_zero_nor_a_certain_classifier(
    calibrated: float,
) -> None:
    """A classifier's number reached four times its threshold (0.5 -> 2.0), which set_threshold
    refuses above 0.99; a threshold below 0.004 gave the number a minimum of 0, also refused."""
    from edge.commands import CLASSIFIER_MAX, threshold_bounds
    from edge.discovery import discovery_configs
    from edge.topics import Topics

    topics = Topics("soundsentry", "unit")
    for classifier in (False, True):
        configs = discovery_configs(topics, "m", calibrated, classifier=classifier)
        number = configs[topics.ha_config("number", "threshold")]
        assert (number["min"], number["max"]) == threshold_bounds(calibrated, classifier)
        assert 0 < number["min"] <= calibrated <= number["max"]  # its own value, always
        if classifier:
            assert number["max"] <= max(CLASSIFIER_MAX, calibrated)


def test_a_long_anomaly_logs_its_start_and_end_not_every_update(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every 10-s update of an anomaly was an INFO line: a fault lasting a day wrote 8,640 of
    them to the journal (beside the JSON line each event already prints). Updates still reach
    every sink; the log says the start and the end."""
    caplog.set_level(logging.INFO, logger="edge.daemon")
    d, rec = detector(tmp_path, detector={"cooldown_seconds": 0, "update_seconds": 2})
    fault = read_audio(fault_file(tmp_path), RATE)
    long = np.tile(fault, 4)  # 20 s of the fault
    for i in range(0, len(long), 4096):
        d.feed(long[i : i + 4096])
    d.close_event("stopped")
    assert "update" in rec.kinds(), rec.kinds()
    said = [r.getMessage().split(":")[0] for r in caplog.records if "anomaly" in r.getMessage()]
    assert said and set(said) == {"anomaly start", "anomaly end"}, said


def test_settings_the_model_refuses_fail_the_start_as_a_start_error(tmp_path: Path) -> None:
    """[detector] trigger_windows = 5 against a model calibrated for N = 3 was refused when the
    detector was built, outside what makes a service wait a minute before it fails: systemd
    started it again every 5 s (17 000 starts a day of log lines on an SD card). It is a
    StartError now, with the dashboard's port let go."""
    import socket

    from edge.errors import StartError
    from edge.service import run_detector

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    web = {"enabled": True, "port": port}
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "data",
                        detector={"trigger_windows": 5}, web=web)  # fmt: skip
    with pytest.raises(StartError, match="trigger_windows"):
        run_detector(settings, load_bundle(DEMO_BUNDLE), FileSource([NORMAL_FILES[0]], RATE))
    with socket.socket() as again:  # the page's port (bound first) is free again
        again.bind(("127.0.0.1", port))


def test_a_stop_during_an_anomaly_goes_from_anomaly_to_stopped_with_no_normal_between(
    tmp_path: Path,
) -> None:
    """A stop with an event open sent `normal` (its score above the threshold) between the
    anomaly and `stopped`, and Home Assistant's anomaly sensor went off, the "fault cleared" of
    automations, at every `systemctl restart` (in a review). The event still ends, said so."""
    from edge.discovery import ANOMALY_TEMPLATE

    d, rec = detector(tmp_path)
    fault = read_audio(fault_file(tmp_path), RATE)
    for i in range(0, len(fault), 1600):
        d.feed(fault[i : i + 1600])
    assert rec.kinds() == ["start"] and rec.states[-1].state == "anomaly"
    seen = len(rec.states)
    d.stop()  # as SIGTERM does; the run's end then finishes
    d.finish()
    assert [s.state for s in rec.states[seen:]] == ["stopped"]
    assert [(e.type, e.ended_by) for e in rec.events] == [("start", None), ("end", "stopped")]
    # and `stopped` says nothing of the machine to Home Assistant: unknown, not off
    rendered = jinja2.Template(ANOMALY_TEMPLATE).render(value_json=rec.states[-1].to_dict())
    assert rendered.strip() == "None"
    seen = len(rec.states)  # a detector used again: its events send their states again
    for i in range(0, len(fault), 1600):
        d.feed(fault[i : i + 1600])
    assert rec.kinds()[-1] == "start" and "anomaly" in [s.state for s in rec.states[seen:]]
