"""Supervised mode: `train --classes`, int8 classifier bundle, evaluate, events with labels."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import ANOMALOUS_FILE, DEMO_CLIP, NORMAL_FILES, cli

from edge.audio_io import read_audio
from edge.bundle import load_bundle, read_manifest
from edge.errors import BundleError
from edge.events import ClassTracker, healthy_classes

pytestmark = pytest.mark.slow
RATE = 16000


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("classes")
    (root / "running").mkdir()
    (root / "fault").mkdir()
    for f in NORMAL_FILES:
        os.symlink(f, root / "running" / f.name)
    os.symlink(ANOMALOUS_FILE, root / "fault" / ANOMALOUS_FILE.name)
    clip = read_audio(DEMO_CLIP, RATE)
    sf.write(root / "fault" / "demo-fault.wav", clip[int(5.2 * RATE) : int(10.8 * RATE)], RATE)
    return root


@pytest.fixture(scope="module")
def classifier(classes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cls") / "states.bundle"
    proc = cli(
        "train",
        "--classes",
        str(classes),
        "--out",
        str(out),
        "--epochs",
        "15",
        "--seed",
        "2",
        "--augment",
        "shift",
        "noise",
        "specaugment",
    )
    (out.parent / "said.txt").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    return out


def test_training_a_classifier_says_how_it_validated_and_warns_of_a_thin_class(
    classifier: Path,
) -> None:
    """`train --classes` said only where the bundle went: its validation went to an INFO log,
    and a valve classifier at balanced accuracy 0.079 (chance 0.5) was written without a word;
    a class of 5 s trained and "validated" on two windows (a review)."""
    from train.classifier import near_chance

    stdout, _, stderr = (classifier.parent / "said.txt").read_text().partition("--- stderr")
    m = read_manifest(classifier)
    v = m.validation or {}
    line = (f"validation on {v['n']} held-out windows: balanced accuracy "
            f"{v['balanced_accuracy']:.3f} (chance 0.50)")  # fmt: skip
    assert line in stdout, stdout
    # one line an epoch, as the embedding's training prints them (Keras's were two, or a bar)
    assert "\nepoch 15/15, training windows: accuracy " in stdout, stdout
    assert "Epoch 1/15" not in stdout, stdout
    # the fault class holds 9.6 s (a 4-s clip and 5.6 s of the demo's fault)
    assert "class 'fault': only 9.6 s of audio; a class needs 10 s or more" in stderr, stderr
    assert "class 'running': only" not in stderr, stderr  # 20 s
    # what the edge will do with these classes: none is named `normal`
    assert "note: no class is named 'normal': the edge reports every change" in stderr, stderr
    held = dict(zip(m.labels, (sum(row) for row in v["confusion"]), strict=True))
    assert f"running {v['recall']['running']:.2f} ({held['running']} windows)" in stdout, stdout
    assert f"fault {v['recall']['fault']:.2f} (1 window)" in stdout, stdout  # one: "1 windows"
    report = {"labels": ["fault", "normal"], "n": 38, "balanced_accuracy": 0.0789}
    said = near_chance(report)  # the review's valve
    assert said and said.startswith("validation: balanced accuracy 0.079 on 38 held-out")
    assert near_chance(report | {"balanced_accuracy": 0.65}) is None
    assert near_chance({"labels": ["a", "b", "c"], "n": 9, "balanced_accuracy": 0.45})


def test_classifier_bundle_round_trip(classifier: Path, classes: Path) -> None:
    b = load_bundle(classifier)
    m = b.manifest
    assert m.kind == "classifier" and m.labels == ["fault", "running"]
    assert m.input.dtype == "int8" and m.output.shape == [1, 2]
    assert {"accuracy", "balanced_accuracy", "macro_f1", "confusion"} <= set(m.validation or {})
    assert (classifier / "model_int8.tflite").stat().st_size < 256 * 1024
    audio = sum(sf.info(str(f)).duration for f in classes.rglob("*.*"))
    assert m.training.seconds <= audio, "the audio fitted on, not its augmented copies"
    # how it was made, for a rerun: --augment was not recorded (a review)
    assert m.training.augment == ["shift", "noise", "specaugment"]
    assert m.training.augment_factor == 1
    # no path of the trainer's machine in the bundle (the held-out files were recorded whole)
    assert str(classes) not in (classifier / "manifest.json").read_text()
    assert m.validation["held_out_files"]["running"] == [f.name for f in NORMAL_FILES]


def test_evaluate_reports_accuracy_f1_and_confusion(
    classifier: Path, classes: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval.json"
    (tmp_path / "rep").mkdir()
    classes_given = classes
    classes = tmp_path / "classes"  # the fixture's, and a silent recording of normal running
    shutil.copytree(classes_given, classes, symlinks=True)
    sf.write(classes / "running" / "silent.wav", np.zeros(3 * RATE, np.float32), RATE)
    (tmp_path / "rep" / "roc.png").write_text("mine")  # no name --classes writes: left alone
    proc = cli(
        "evaluate",
        str(classifier),
        "--classes",
        str(classes),
        "--segment",
        "1",
        "--json",
        str(out),
        "--report",
        str(tmp_path / "rep"),
    )
    assert (tmp_path / "rep" / "roc.png").read_text() == "mine"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "confusion.png").write_text("mine")  # one it writes: refused
    refused = cli("evaluate", str(classifier), "--classes", str(classes), "--report",
                  str(tmp_path / "other"), check=False)  # fmt: skip
    assert refused.returncode == 1 and "holds confusion.png, which the report" in refused.stderr
    assert "balanced accuracy" in proc.stdout and "macro F1" in proc.stdout
    data = json.loads(out.read_text())
    assert data["labels"] == ["fault", "running"] and len(data["confusion"]) == 2
    assert data["n"] == sum(map(sum, data["confusion"]))
    assert data["balanced_accuracy"] >= 0.8  # training audio: a sanity check, not a benchmark
    # the events the device raises, each file its own stream, as replay raises them: a table
    # of whole files hid false alarms (a review)
    replayed = {}
    for folder in sorted(classes.iterdir()):
        row = replayed[folder.name] = {"files": 0, "own": 0, "other": 0, "healthy": False}
        for f in sorted(folder.iterdir()):
            said = cli("replay", str(classifier), str(f)).stdout.splitlines()
            named = {json.loads(e)["label"] for e in said if json.loads(e)["type"] == "start"}
            row["files"] += 1
            row["own"] += folder.name in named
            row["other"] += bool(named - {folder.name})
    assert data["events"] == replayed, (data["events"], replayed)
    row = replayed["fault"]
    assert (f"  fault  {row['files']} file(s): {row['own']} raise an event of 'fault', "
            f"{row['other']} of another class") in proc.stdout, proc.stdout  # fmt: skip
    # which evaluate says, as it does for an anomaly detector (it said nothing)
    assert "the model was fitted on this recording; it will look like its class" in proc.stderr
    assert (tmp_path / "rep" / "confusion.png").read_bytes().startswith(b"\x89PNG")
    # as an anomaly detector (--normal/--anomalous) its top-class probability made an AUC
    wrong = cli("evaluate", str(classifier), "--normal", str(classes / "running"),
                "--anomalous", str(classes / "fault"), check=False)  # fmt: skip
    assert wrong.returncode != 0 and "AUC" not in wrong.stdout
    assert "is a classifier: evaluate it on labelled folders with --classes" in wrong.stderr
    # segments shorter than a window held none: NaN metrics, invalid JSON, exit 0
    short = cli("evaluate", str(classifier), "--classes", str(classes), "--segment", "0.5",
                "--json", str(tmp_path / "nan.json"), check=False)  # fmt: skip
    assert short.returncode != 0 and not (tmp_path / "nan.json").exists()
    assert "--segment must be at least the window length" in short.stderr
    # the recordings of one fault are a check of its recall (refused: "need two subfolders")
    one = tmp_path / "one"
    one.mkdir()
    (one / "fault").symlink_to(classes / "fault", target_is_directory=True)
    alone = cli("evaluate", str(classifier), "--classes", str(one), "--json", str(one / "r.json"))
    assert json.loads((one / "r.json").read_text())["n"] == 2 and "fault" in alone.stdout


def test_edge_publishes_class_changes_with_labels(classifier: Path) -> None:
    proc = cli("replay", str(classifier), str(DEMO_CLIP))
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    sequence = [(e["type"], e["label"]) for e in events]
    assert sequence[:2] == [("start", "running"), ("end", "running")]
    # no class `normal`: every event is a change of class, said so to consumers and the page
    assert {e["fault"] for e in events} == {False}, events
    assert ("start", "fault") in sequence
    starts = [e for e in events if e["type"] == "start"]
    assert len({e["event_id"] for e in starts}) == len(starts)
    # an anomaly detector's threshold in the config (1.5) silenced every class event
    env = {"SOUNDSENTRY_DETECTOR__THRESHOLD": "1.5"}
    over = cli("replay", str(classifier), str(DEMO_CLIP), env=env, check=False)
    assert over.returncode != 0 and over.stdout == ""
    assert "a classifier's threshold is the probability" in over.stderr.strip().splitlines()[-1]


def test_the_warning_of_no_running_level_gives_a_classifier_a_fix_that_works(
    classifier: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It sent every classifier's user to `soundsentry calibrate`, which refuses classifiers."""
    from edge.daemon import Detector
    from edge.settings import Settings

    settings = Settings(device_id="t", model=classifier, data_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="edge.daemon"):
        Detector(settings, load_bundle(classifier), [])
    (said,) = [r.getMessage() for r in caplog.records if "no running level" in r.getMessage()]
    assert "a classifier's bundle" in said and "calibrate" not in said
    assert "[detector] off_below_dbfs" in said


def test_class_tracker_needs_k_of_n_confident_windows() -> None:
    t = ClassTracker(["a", "b"], threshold=0.6, k=2, n=3)
    assert [x.kind for x in t.feed(0.9, "a", 0, 1)] == []
    assert [(x.kind, x.label) for x in t.feed(0.9, "a", 0.5, 1.5)] == [("start", "a")]
    assert t.feed(0.9, "b", 1, 2) == []
    assert t.feed(0.5, "b", 1.5, 2.5) == []  # not confident enough
    changed = t.feed(0.8, "b", 2, 3)
    assert [(x.kind, x.label) for x in changed] == [("end", "a"), ("start", "b")]
    assert np.isclose(changed[0].ended_s, 1.5) and changed[0].ended_by == "label_changed"
    # b started at the first window that voted for it, as an anomaly starts at its first
    # of K windows (it used to start at the K-th, a window late in every event log), but not
    # before a was last heard: the windows overlap, and b's began 0.5 s before a's end
    assert changed[1].started_s == 1.5 and np.isclose(changed[1].mean_score, 0.85)
    t.close("stopped")
    t.feed(0.9, "a", 10, 11)
    (first,) = t.feed(0.9, "a", 10.5, 11.5)  # after nothing: from its first vote, as before
    assert first.kind == "start" and first.started_s == 10
    end = t.close("stopped")
    assert end.label == "a" and end.ended_by == "stopped"


def test_with_a_class_named_normal_the_others_are_faults_and_normal_has_no_event() -> None:
    """Every class was an event, normal running's too, and the state never said `anomaly`:
    Home Assistant's anomaly sensor stayed off while a fault was named (a field review)."""
    t = ClassTracker(["bearing", "Normal", "clog"], threshold=0.6, k=2, n=3)
    assert t.feed(0.9, "Normal", 0, 1) == [] and t.feed(0.9, "Normal", 0.5, 1.5) == []
    assert t.label == "Normal" and t.state == "normal" and not t.active
    t.feed(0.9, "bearing", 1, 2)
    started = t.feed(0.9, "bearing", 1.5, 2.5)
    assert [(x.kind, x.label) for x in started] == [("start", "bearing")]
    assert t.state == "anomaly" and t.active
    t.feed(0.9, "clog", 2, 3)
    changed = t.feed(0.9, "clog", 2.5, 3.5)  # one fault to another: the event changes
    assert [(x.kind, x.label, x.ended_by) for x in changed] == [
        ("end", "bearing", "label_changed"), ("start", "clog", None)
    ]  # fmt: skip
    # one after the other: the second began 0.5 s before the first ended (a review)
    assert changed[1].started_s == changed[0].ended_s == 2.5
    t.feed(0.9, "Normal", 3, 4)
    ended = t.feed(0.9, "Normal", 3.5, 4.5)
    assert [(x.kind, x.label, x.ended_by) for x in ended] == [("end", "clog", "normal")]
    assert t.state == "normal" and t.label == "Normal" and not t.active
    named = ["normal fast", "Normal-idle", "off", "bearing", "normalised"]
    assert healthy_classes(named) == {"normal fast", "Normal-idle", "off"}  # off: stopped
    assert healthy_classes(["off", "fast"]) == set()  # no `normal`: every class is news
    stops = ClassTracker(["normal", "off", "bearing"], threshold=0.6, k=2, n=3)
    for at, label in ((0, "bearing"), (0.5, "bearing"), (1, "off")):
        stops.feed(0.9, label, at, at + 1)
    stopped = stops.feed(0.9, "off", 1.5, 2.5)  # the machine stopped: not "back to normal"
    assert [(x.kind, x.ended_by) for x in stopped] == [("end", "machine_off")]
    without = ClassTracker(["fast", "slow"], threshold=0.6, k=2, n=3)  # states, no faults
    without.feed(0.9, "fast", 0, 1)
    assert [x.kind for x in without.feed(0.9, "fast", 0.5, 1.5)] == ["start"]
    assert without.state == "normal"  # news, not an anomaly


def test_classes_named_rightly_too_rarely_are_warned_of() -> None:
    """A `normal` recall of 0.68 was printed without a word, and the model raised fault events
    on 4 of 13 normal recordings it never heard (a review)."""
    from train.classifier import recall_warnings

    labels = ["bearing", "normal", "off"]
    confusion = [[3, 7, 0], [29, 61, 0], [0, 0, 20]]
    report = {"labels": labels, "confusion": confusion,
              "recall": {"bearing": 0.3, "normal": 0.6778, "off": 1.0}}  # fmt: skip
    said = recall_warnings(report)
    assert len(said) == 2, said
    assert said[0].startswith("class 'bearing': 30% of its 10 held-out windows named rightly")
    assert "a fault of it may be missed" in said[0]
    assert said[1].startswith("class 'normal': 68% of its 90 held-out windows named rightly")
    assert "raise fault events while nothing changed (false alarms)" in said[1]
    fine = {"bearing": 0.5, "normal": 0.9, "off": 0.9}  # at the lines: nothing to say
    assert recall_warnings(report | {"recall": fine}) == []
    speeds = {"labels": ["fast", "slow"], "confusion": [[8, 2], [1, 9]],
              "recall": {"fast": 0.8, "slow": 0.9}}  # fmt: skip
    (news,) = recall_warnings(speeds)  # no class `normal`: a misnamed window is a class change
    assert news.startswith("class 'fast': 80% of its 10") and "class-change events" in news
    assert recall_warnings(speeds | {"recall": {"fast": None, "slow": 0.95}}) == []


def test_train_says_what_the_edge_does_with_each_class(capsys: pytest.CaptureFixture) -> None:
    """`'normal': the machine running well (or off)` was said of a model with no class `off`
    (a review)."""
    from soundsentry.commands.training import _note_healthy_class

    _note_healthy_class(["bearing", "normal", "Off"])
    said = capsys.readouterr().err
    assert said == ("note: 'normal': the machine running well; 'Off': the machine off: no event; "
                    "'bearing': faults, each an anomaly event\n"), said  # fmt: skip
    _note_healthy_class(["bearing", "normal"])
    said = capsys.readouterr().err
    assert said.startswith("note: 'normal': the machine running well: no event; 'bearing'"), said
    assert "off" not in said
    _note_healthy_class(["fast", "slow"])
    assert "no class is named 'normal'" in capsys.readouterr().err


def test_a_fault_that_lasts_sends_updates_while_its_class_is_heard() -> None:
    """A classifier's fault heard for minutes sent its `start` and nothing until its `end`,
    where an anomaly's event sends an `update` every update_seconds (a review)."""
    t = ClassTracker(["normal", "bearing"], threshold=0.6, k=2, n=3, update_s=10.0)
    kinds = []
    for i in range(60):  # 30 s of the fault, windows every 0.5 s; unsure ones every 5 s
        confidence = 0.3 if i % 10 == 9 else 0.9
        kinds += [(x.kind, x.label, round(x.ended_s or 0, 1)) for x in
                  t.feed(confidence, "bearing", i * 0.5, i * 0.5 + 1)]  # fmt: skip
    assert [k for k, _, _ in kinds] == ["start", "update", "update"], kinds
    assert {label for _, label, _ in kinds} == {"bearing"}
    update = t.feed(0.9, "bearing", 30.5, 31.5)  # 10 s after the last, with its label
    assert [(x.kind, x.label) for x in update] == [("update", "bearing")]
    assert update[0].peak_score == 0.9 and update[0].started_s == 0.0
    # without a class `normal` a class is news, open for as long as it is heard: an update
    # every 10 s for hours of running at one speed (a diff review)
    speeds = ClassTracker(["fast", "slow"], threshold=0.6, k=2, n=3, update_s=10.0)
    said = [x.kind for i in range(7200) for x in speeds.feed(0.9, "fast", i * 0.5, i * 0.5 + 1)]
    assert said == ["start"], said[:5]


def test_a_classifier_with_a_normal_class_publishes_faults_only(
    classifier: Path, tmp_path: Path
) -> None:
    """The fixture's classes, `running` renamed `normal`: the normal running of the demo clip
    raises nothing, its fault an anomaly named `fault`, and the state says so."""
    from detector_helpers import Recorder

    from edge.console import ReplaySummary
    from edge.daemon import Detector
    from edge.settings import Settings
    from edge.sources import FileSource

    relabelled = _relabelled(classifier, tmp_path / "faults.bundle", {"running": "normal"})
    rec, summary = Recorder(), ReplaySummary()
    settings = Settings(device_id="t", model=relabelled, data_dir=tmp_path / "data")
    detector = Detector(settings, load_bundle(relabelled), [rec], on_step=summary.step, live=False)
    detector.run(FileSource([DEMO_CLIP], RATE))
    # the probability of whichever class was named, `normal` too: no "above" of a threshold
    assert "highest class probability " in summary.line(1, detector.threshold)
    assert [(e.type, e.label) for e in rec.events if e.type != "update"][:1] == [("start", "fault")]
    assert "normal" not in {e.label for e in rec.events}
    # a fault, said so: the page styled its card as a change of class (a review)
    assert {e.fault for e in rec.events} == {True}
    start = next(e for e in rec.events if e.type == "start")
    assert start.stream_offset_s >= 4.0  # the fault begins at 5 s
    assert "anomaly" in [m.state for m in rec.states]
    labels = [m.label for m in rec.states]  # Recognised class: normal, said as it is named
    assert labels.index("normal") < labels.index("fault"), labels
    # muted from 3 s to 9 s, the fault heard meanwhile: the unmute's state said `normal` with
    # the fault's name, then the name went normal, fault (a diff review); now no class is said
    # till the fault's K of N windows raise it, as they do
    rec = Recorder()
    muted = Detector(settings, load_bundle(relabelled), [rec], live=False)
    audio = read_audio(DEMO_CLIP, RATE)
    for at in range(0, len(audio), 1600):
        if at == 3 * RATE:
            muted.mute(30)
        if at == 9 * RATE:
            muted.unmute()
            assert (rec.states[-1].state, rec.states[-1].label) == ("normal", None), rec.states
            said = len(rec.states)
        muted.feed(audio[at : at + 1600])
    after = [(m.state, m.label) for m in rec.states[said:]]
    assert after[0] == ("anomaly", "fault"), after  # it said ("normal", "normal") first
    assert [e.type for e in rec.events][:1] == ["start"] and rec.events[0].label == "fault"


def test_a_classifier_s_class_off_is_the_machine_off(
    classifier: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A classifier's bundle records no off level: a stop it named `off` said `machine:
    running` in the state message, and running hours counted on (a review)."""
    from detector_helpers import Recorder

    from edge.console import ReplaySummary
    from edge.daemon import Detector
    from edge.settings import Settings
    from edge.sources import FileSource

    relabelled = _relabelled(classifier, tmp_path / "stops.bundle", STOPS)
    rec, summary, seen = Recorder(), ReplaySummary(), []
    settings = Settings(device_id="t", model=relabelled, data_dir=tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="edge.daemon"):
        detector = Detector(
            settings, load_bundle(relabelled), [rec], on_step=seen.append, live=True
        )
    # its class `off` is how it knows the machine off: no warning that it cannot
    assert not [r for r in caplog.records if "records no running level" in r.getMessage()]
    detector.run(FileSource([DEMO_CLIP], RATE))
    said = [(m.label, m.machine) for m in rec.states if m.label]
    assert ("off", "off") in said and ("normal", "running") in said, said
    assert ("off", "running") not in said, said
    assert rec.events == []  # neither is an event
    windows = int((sf.info(str(DEMO_CLIP)).duration - 1.0) / 0.5) + 1  # 1-s windows, 0.5-s hop
    # the stop's windows are not running time, but for the K (3) votes that named `normal`
    # again: the 8 of a state folder's name were credited, 2.5 s too many (a diff review)
    machines = [s.machine for s in seen]
    starts = sum(a == "off" and b == "running" for a, b in itertools.pairwise(machines))
    running = machines.count("running") + starts * (3 - 1)
    assert len(seen) == windows and starts >= 1, machines
    assert detector.running.seconds == running * 0.5, (detector.running.seconds, machines)
    for s in seen:
        summary.step(s)
    # the windows say it too (the page's Machine, the live line, replay's count of them)
    assert summary.off >= 4, summary.off
    # muted while it is off: the mute ended the class's reign, and the machine read `running`
    # for the whole mute, its hours counting (a diff review)
    rec = Recorder()
    muted = Detector(settings, load_bundle(relabelled), [rec], live=True)
    audio = read_audio(DEMO_CLIP, RATE)
    at = _feed_till_off(muted, rec, audio)
    hours = muted.running.seconds
    muted.mute(30)
    while at < int(10.6 * RATE):  # the stop goes on (the demo's fault, relabelled `off`)
        muted.feed(audio[at : at + 1600])
        at += 1600
    muted.emit_state()
    assert (rec.states[-1].state, rec.states[-1].machine) == ("muted", "off"), rec.states[-1]
    assert muted.running.seconds == hours
    # ... and it runs again, still muted: named while events are held off, or a machine muted
    # while stopped read `off` for the whole mute, run or not (a second diff review)
    while at < len(audio):
        muted.feed(audio[at : at + 1600])
        at += 1600
    muted.emit_state()
    last = rec.states[-1]
    assert (last.state, last.machine, last.label) == ("muted", "running", "normal"), last
    assert muted.running.seconds > hours
    muted.unmute()  # heeded again: the class named meanwhile is the one named
    for at in range(len(audio) - 8000, len(audio), 1600):  # the next windows
        muted.feed(audio[at : at + 1600])
    assert muted.pipeline.events.label == "normal" and rec.events == []
    for state in ("fault", "stopped"):  # nothing heard: no class named, as no machine state
        muted.emit_state(state)
        assert (rec.states[-1].label, rec.states[-1].machine) == (None, None), rec.states[-1]
    # off by its level (`off_below_dbfs`): `normal`, named before, is not a class heard now
    rec = Recorder()
    quiet = Settings(device_id="t", model=relabelled, data_dir=tmp_path / "q",
                     detector={"off_below_dbfs": -60.0})  # fmt: skip
    stops = Detector(quiet, load_bundle(relabelled), [rec], live=True)
    room = np.random.default_rng(0).normal(0, 10 ** (-80 / 20), 6 * RATE).astype(np.float32)
    for block in (audio[: 4 * RATE], room):
        for at in range(0, len(block), 1600):
            stops.feed(block[at : at + 1600])
    assert ("normal", "running") in [(m.label, m.machine) for m in rec.states], rec.states
    stops.emit_state()
    assert (rec.states[-1].machine, rec.states[-1].label) == ("off", None), rec.states[-1]


def test_a_classifier_s_class_off_is_named_on_across_a_model_switch(
    classifier: Path, tmp_path: Path
) -> None:
    """A reload, a new model or new [detector] settings build a new pipeline, whose classifier
    named no class till K of N windows: a machine stopped read `running` for 1.5 s at every
    switch, Home Assistant's Machine flipping off, running, off, and its hours counting."""
    from detector_helpers import Recorder

    from edge.daemon import Detector
    from edge.settings import DetectorSettings, Settings

    relabelled = _relabelled(classifier, tmp_path / "stops.bundle", STOPS)
    rec = Recorder()
    settings = Settings(device_id="t", model=relabelled, data_dir=tmp_path / "data")
    detector = Detector(settings, load_bundle(relabelled), [rec], live=True)
    audio = read_audio(DEMO_CLIP, RATE)
    at = _feed_till_off(detector, rec, audio)
    hours, said = detector.running.seconds, len(rec.states)
    detector.use_bundle(load_bundle(relabelled), reason="reload")
    changed = settings.model_copy(
        update={"detector": DetectorSettings(trigger_windows=2, trigger_of=3)}
    )
    for block in range(30):  # through the stop (the demo's fault, 5.2 to 10.8 s)
        if block == 15:
            detector.apply_settings(changed)
        detector.feed(audio[at : at + 1600])
        at += 1600
    assert at <= int(10.6 * RATE), at
    machines = [(m.machine, m.label) for m in rec.states[said:]]
    assert machines and set(machines) == {("off", "off")}, machines
    assert detector.running.seconds == hours
    detector.new_stream()  # the next file replayed: unrelated audio, nothing named yet
    assert detector.pipeline.named_class is None


def _relabelled(classifier: Path, out: Path, names: dict[str, str]) -> Path:
    """The fixture's classifier with its classes renamed (`names`: old to new)."""
    from edge.bundle import write_bundle

    bundle = load_bundle(classifier)
    manifest = bundle.manifest.model_dump(exclude={"files", "checksum", "arrays"})
    manifest["labels"] = [names.get(x, x) for x in manifest["labels"]]
    files = {name: (classifier / name).read_bytes() for name in bundle.manifest.files}
    files = {k: v for k, v in files.items() if not k.endswith(".npz")}
    return write_bundle(out, manifest, files, bundle.arrays)


STOPS = {"fault": "off", "running": "normal"}
"""The fixture's classes as the machine's stop and its running well."""


def _feed_till_off(detector: Any, rec: Any, audio: np.ndarray) -> int:
    """Feed `audio` in 0.1-s blocks until a state message names the class `off`; the sample
    fed up to."""
    at = 0
    while not any(m.label == "off" for m in rec.states):
        assert at < len(audio), "no state named `off`"
        detector.feed(audio[at : at + 1600])
        at += 1600
    return at


def test_votes_from_before_the_machine_went_off_do_not_name_its_state_after() -> None:
    t = ClassTracker(["a", "b"], threshold=0.6, k=2, n=3)
    assert t.feed(0.9, "a", 0, 1) == []  # one vote for a, then the machine goes off
    assert t.close("machine_off") is None
    assert t.feed(0.9, "a", 30, 31) == [], "a state needs k votes heard since it started"
    assert [(x.kind, x.label) for x in t.feed(0.9, "a", 30.5, 31.5)] == [("start", "a")]


@pytest.mark.parametrize("problem", ["named badly", "too short to hold out", "too short"])
def test_classes_that_cannot_be_trained_or_checked_are_refused_before_training(
    classes: Path, tmp_path: Path, problem: str
) -> None:
    """A class folder named `belt (loose)` was refused only after every epoch and the int8
    conversion; a class of clips shorter than a window trained an output it never learnt,
    and one with nothing held out was "validated" on its own (augmented) training windows."""
    root = tmp_path / "classes"
    shutil.copytree(classes, root, symlinks=True)
    clip = read_audio(ANOMALOUS_FILE, RATE)
    seconds = {"named badly": 10.0, "too short to hold out": 3.0, "too short": 0.8}[problem]
    name = "belt (loose)" if problem == "named badly" else "belt"
    (root / name).mkdir()
    for i in range(3):
        sf.write(root / name / f"{i}.wav", clip[i * RATE : i * RATE + int(seconds * RATE)], RATE)
    proc = cli("train", "--classes", str(root), "--out", str(tmp_path / "x.bundle"),
               "--epochs", "1", check=False)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    expected = {
        "named badly": "rename the folder",
        "too short to hold out": "no 1-s window held out to validate on",
        "too short": "no 1-s window to train on",
    }[problem]
    assert expected in line, proc.stderr
    assert "Epoch" not in proc.stdout + proc.stderr, "refused before training"
    assert not (tmp_path / "x.bundle").exists()


def test_calibrate_refuses_what_it_cannot_do_before_reading_any_audio(
    classifier: Path, classes: Path, tmp_path: Path
) -> None:
    """A classifier was refused only after every recording had been read and scored."""
    proc = cli("calibrate", str(classifier), "--normal", str(tmp_path / "not-read"),
               "--out", str(tmp_path / "x.bundle"), check=False)  # fmt: skip
    assert proc.returncode != 0 and proc.stdout == "", proc.stdout
    said = "a classifier detector cannot be refitted on site"
    assert proc.stderr.strip().splitlines() == [f"soundsentry: error: {said}"], proc.stderr


def test_calibrate_in_place_replaces_the_bundle_and_keeps_the_one_it_replaced(
    tmp_path: Path,
) -> None:
    """`calibrate MODEL --out MODEL` was refused (a rule from before bundles were written
    atomically), so a user calibrating the bundle the service runs had to invent a second path
    and move it over: in place now, the one replaced kept as MODEL.prev, as `train` does."""
    from conftest import DEMO_BUNDLE

    model = tmp_path / "pump.bundle"
    shutil.copytree(DEMO_BUNDLE, model)
    before = read_manifest(model)
    proc = cli("calibrate", str(model), "--normal", *map(str, NORMAL_FILES[2:4]),
               "--out", str(model))  # fmt: skip
    assert f"note: {model} holds a model bundle: it is replaced" in proc.stdout, proc.stdout
    after, kept = read_manifest(model), read_manifest(tmp_path / "pump.bundle.prev")
    assert kept.checksum == before.checksum and after.checksum != before.checksum
    assert (after.calibration or {}).get("from_model") == before.model_id
    load_bundle(model)  # whole: every file its manifest names, with the right hash
    # no unset key of this version's (`augment: null`): the version before refused such a
    # bundle, and a rollback dropped the site's learning (an upgrade review)
    training = json.loads((model / "manifest.json").read_text())["training"]
    assert None not in training.values() and "augment" not in training, training


def test_set_threshold_keeps_a_classifiers_threshold_a_probability(
    classifier: Path, tmp_path: Path
) -> None:
    """set_threshold allowed four times the calibrated 0.5, up to 2: past 0.996 (the int8
    softmax's most) no class event could ever be raised again."""
    from edge.control import Controller
    from edge.daemon import Detector
    from edge.settings import Settings

    settings = Settings(device_id="c", model=classifier, data_dir=tmp_path)
    controller = Controller(Detector(settings, load_bundle(classifier), []))
    refused = controller.handle_payload(b'{"command":"set_threshold","value":1.5}')
    assert not refused.ok and "within [0.125, 0.99]" in refused.detail, refused.detail
    assert controller.handle_payload(b'{"command":"set_threshold","value":0.9}').ok


def test_a_hidden_folder_with_audio_is_no_class(classes: Path, tmp_path: Path) -> None:
    """A desktop's .Trash-1000 holding deleted recordings stopped training ("a class folder's
    name ... rename the folder"), where every other search for audio skips hidden folders."""
    from train.dataset import class_folders

    root = tmp_path / "classes"
    shutil.copytree(classes, root, symlinks=True)
    trash = root / ".Trash-1000" / "files"
    trash.mkdir(parents=True)
    shutil.copy(NORMAL_FILES[0], trash / "deleted.wav")
    assert sorted(class_folders(root)) == ["fault", "running"]


def test_int8_calibration_sees_every_class_a_rare_one_too() -> None:
    """300 windows drawn at random from 20 h of normal running beside 2 min of a fault held
    none of the fault, whose activations then had a range they could clip in."""
    from train.quantize import REPRESENTATIVE_WINDOWS, _representative

    groups = np.r_[np.zeros(100_000, int), np.ones(40, int)]
    pick = _representative(len(groups), np.random.default_rng(0), groups)
    assert (groups[pick] == 1).sum() == 40
    assert (groups[pick] == 0).sum() == REPRESENTATIVE_WINDOWS // 2
    assert len(set(pick)) == len(pick)


def test_class_folders_read_mono_files_as_the_channel_given(classes: Path, tmp_path: Path) -> None:
    """`train --classes DIR --channel 3` on `record`'s mono files stopped with "channel 3 does
    not exist" (every file named) where `--normal` and `--normal-states` read a mono file as its
    one channel; a multichannel file without the channel is still refused, named."""
    from edge.errors import AudioError
    from train.dataset import class_folders

    groups = class_folders(classes, channel=3)  # the fixture's recordings are mono
    assert sorted(groups) == ["fault", "running"]
    stereo = tmp_path / "classes"
    shutil.copytree(classes, stereo)
    audio = read_audio(NORMAL_FILES[0], RATE)
    sf.write(stereo / "running" / "stereo.wav", np.stack([audio, audio], axis=1), RATE)
    with pytest.raises(AudioError, match=r"stereo\.wav: channel 3 does not exist"):
        class_folders(stereo, channel=3)


def test_a_class_validated_on_its_own_recordings_is_said(
    classes: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A class of fewer than 5 recordings is validated on the last fifth of them: the logged
    accuracy measured how well it knew its own recordings, and nothing said so."""
    from edge.features import FeatureParams
    from train.classifier import split_windows
    from train.dataset import class_folders

    split_windows(class_folders(classes), FeatureParams(), 0)
    said = [m for r in caplog.records if "not recordings it never heard" in (m := r.getMessage())]
    assert [s.split(":")[0] for s in said] == ["class 'fault'", "class 'running'"], said


def test_the_confusion_table_names_each_class_whole_and_its_recall() -> None:
    """Headers were cut to 8 characters (bearing_fault and bearing_wear both `bearing_`), and
    the per-class recall computed was never printed."""
    from soundsentry.report import format_classification

    labels = ["bearing_fault", "bearing_wear", "running"]
    text = format_classification(
        {"variant": "int8", "unit": "whole files", "accuracy": 0.8, "balanced_accuracy": 0.81,
         "macro_f1": 0.79, "n": 10, "labels": labels, "confusion": [[3, 1, 0], [0, 2, 1],
         [0, 0, 3]], "recall": {"bearing_fault": 0.75, "bearing_wear": 0.667, "running": 1.0}}
    )  # fmt: skip
    header, *rows, recall = text.splitlines()[1:]
    assert header.split()[:3] == labels and len(rows) == 3
    assert recall.split() == ["recall", "0.750", "0.667", "1.000"]
    events = {"normal": {"files": 13, "own": 0, "other": 4, "healthy": True},
              "bearing": {"files": 6, "own": 5, "other": 2, "healthy": False}}  # fmt: skip
    text = format_classification({"variant": "int8", "unit": "whole files", "accuracy": 0.8,
        "balanced_accuracy": 0.8, "macro_f1": 0.8, "n": 19, "labels": ["bearing", "normal"],
        "confusion": [[5, 1], [3, 10]], "events": events})  # fmt: skip
    assert text.splitlines()[-2:] == [
        " normal  13 file(s): 4 raise an event (false alarms: another class named)",
        "bearing  6 file(s): 5 raise an event of 'bearing', 2 of another class",
    ], text


def test_a_class_without_test_files_has_no_recall_rather_than_zero() -> None:
    """Checking a model on the recordings of one class printed recall 0.000 for every other
    class, as if all of theirs had been missed (there were none)."""
    from soundsentry.report import format_classification
    from train.metrics import classification_report

    labels = ["fault", "running", "off"]
    report = classification_report(np.array([1, 1, 1]), np.array([1, 1, 0]), labels)
    assert report["recall"] == {"fault": None, "running": 0.6667, "off": None}
    assert report["balanced_accuracy"] == 0.6667
    text = format_classification({"variant": "int8", "unit": "whole files", **report})
    assert text.splitlines()[-1].split() == ["recall", "n/a", "0.667", "n/a"]


def test_a_classifier_bundle_whose_threshold_no_window_can_reach_is_refused_as_such(
    classifier: Path, tmp_path: Path
) -> None:
    """A threshold of 1 passed the bundle's check; the tracker then refused it, blaming
    `detector.threshold`, a setting the user had not set."""
    from detector_helpers import write_unchecked

    from edge.bundle import ARRAYS, MANIFEST

    manifest = json.loads((classifier / MANIFEST).read_text())
    manifest["threshold"]["value"] = 1.0
    with np.load(classifier / ARRAYS, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    files = {n: (classifier / n).read_bytes() for n in manifest["files"] if n != ARRAYS}
    for key in ("files", "checksum"):
        manifest.pop(key, None)
    bad = write_unchecked(tmp_path / "one.bundle", manifest, files, arrays)
    with pytest.raises(BundleError, match="a classifier's threshold is a probability below 1"):
        load_bundle(bad)
