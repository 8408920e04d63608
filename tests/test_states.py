"""Operating states: a bundle trained with state folders names the state the machine runs in,
in state messages and in events; a machine switched off is `off`."""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import DEMO_BUNDLE, DEMO_CLIP, NORMAL_FILES, cli
from detector_helpers import Recorder, write_unchecked

from edge.audio_io import read_audio
from edge.bundle import load_bundle, write_bundle
from edge.console import ReplaySummary
from edge.daemon import Detector
from edge.errors import BundleError
from edge.features import FeatureParams, LogMel
from edge.machine_state import StateNamer
from edge.settings import Settings
from edge.sources import FileSource

QUIET_DB = -15.0
"""The `slow` state: the fan's own sound 15 dB down (the fluctuation score ignores gain)."""


def test_the_vote_names_the_nearest_state_and_ignores_one_odd_window() -> None:
    namer = StateNamer(["fast", "slow"], np.array([[0.0, 0.0], [-10.0, -10.0]]))
    assert [namer.name(np.array(v)) for v in ([1, 0], [-9, -11], [0, 1])] == ["fast"] * 3
    assert [namer.name(np.array([-10.0, -10.0])) for _ in range(8)][-1] == "slow"
    namer.reset()
    assert namer.name(np.array([-10.0, -9.0])) == "slow"


def test_the_name_does_not_flap_when_some_windows_sound_like_another_state() -> None:
    """A plain majority of 5 renamed the machine 327 times an hour when one window in five lay
    nearer the other state (a retained state message and a log line each time), and with three
    states a tie alternated the name."""
    levels = np.array([[0.0, 0.0], [-10.0, -10.0], [-20.0, -20.0]])
    namer = StateNamer(["fast", "slow", "idle"], levels)
    rng = np.random.default_rng(7)
    heard = rng.choice(3, size=7200, p=[0.6, 0.2, 0.2])  # an hour at 0.5 s, mostly fast
    names = [namer.name(levels[i]) for i in heard]
    renames = sum(a != b for a, b in itertools.pairwise(names))
    assert renames <= 4 and names[-1] == "fast", renames
    namer.reset()  # a real change of state still renames it, within SWITCH_VOTES windows
    named = [namer.name(levels[i]) for i in [0] * 10 + [1] * 10]
    assert named[9] == "fast" and named[-1] == "slow" and named[10:].index("slow") <= 8


@pytest.fixture(scope="module")
def two_states(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default detector trained on the fixture fan, with two named states added the way
    the embedding trainer records them: each state's mean log-mel band levels."""
    work = tmp_path_factory.mktemp("states")
    plain = work / "plain.bundle"
    cli(
        "train",
        "--normal",
        *map(str, NORMAL_FILES),
        "--out",
        str(plain),
        "--false-alarms-per-day",
        "24",
    )
    bundle = load_bundle(plain)
    logmel = LogMel(bundle.features)
    audio = np.concatenate([read_audio(f, bundle.features.samplerate) for f in NORMAL_FILES])
    fast = logmel(audio).mean(axis=0)
    slow = logmel(audio * 10 ** (QUIET_DB / 20)).mean(axis=0)
    manifest = bundle.manifest.model_dump(exclude={"files", "checksum", "arrays"})
    manifest["machine"]["states"] = ["fast", "slow"]
    manifest["machine"]["off_below_dbfs"] -= 20.0  # the slow state is quiet, not off
    arrays = {**bundle.arrays, "machine.state_levels": np.stack([fast, slow])}
    write_bundle(work / "states.bundle", manifest, {}, arrays)
    return work / "states.bundle"


def assert_a_day_names_its_states(bundle_path: Path, tmp_path: Path) -> None:
    """Fast, then slow (15 dB down), then a fault at the fast state's level: the state messages
    name fast, slow, fast, and the fault's event names fast."""
    bundle = load_bundle(bundle_path)
    rate = bundle.features.samplerate
    normal = read_audio(NORMAL_FILES[0], rate)
    fault = read_audio(DEMO_CLIP, rate)  # a fault at 5-11 s, at the fast state's level
    path = tmp_path / "fast-slow-fault.wav"
    stream = np.concatenate([normal, normal * 10 ** (QUIET_DB / 20), fault])
    sf.write(path, stream, rate, subtype="FLOAT")
    rec = Recorder()
    settings = Settings(device_id="t", model=bundle_path, data_dir=tmp_path / "data")
    Detector(settings, bundle, [rec]).run(FileSource([path], rate))
    named = [s.machine for s in rec.states if s.machine not in (None, "running")]  # before audio
    changes = [m for i, m in enumerate(named) if i == 0 or m != named[i - 1]]
    assert changes[:3] == ["fast", "slow", "fast"], named
    starts = [e for e in rec.events if e.type == "start"]
    assert starts and starts[0].machine == "fast", rec.events
    assert starts[0].stream_offset_s is not None and starts[0].stream_offset_s >= 14.0  # 5 + 5 + 4


def test_state_messages_and_events_name_the_state(two_states: Path, tmp_path: Path) -> None:
    assert_a_day_names_its_states(two_states, tmp_path)


def test_windows_that_sound_like_the_state_the_machine_changes_to_are_no_evidence(
    two_states: Path,
) -> None:
    """Loading, unloading or a change of speed is normal running: until the vote names the new
    state, a window that sounds like it is not judged, and the window across the change, which
    holds both sounds, scores above the threshold. In a field review a compressor's switches
    from idle to loaded raised an event at 5 of 6, the CUSUM taking such windows."""
    from edge.pipeline import Pipeline

    bundle = load_bundle(two_states)
    rate, hop = bundle.features.samplerate, bundle.features.hop_samples
    normal = read_audio(NORMAL_FILES[0], rate)
    lead = normal[: rate // 10]  # the change 0.1 s after a hop: a window mostly of the old sound
    stream = np.concatenate([normal, normal, lead, normal * 10 ** (QUIET_DB / 20)])
    pipeline = Pipeline(bundle)
    steps, heard = [], []
    for i in range(0, len(stream), hop):
        for s in pipeline.push(stream[i : i + hop]):
            steps.append(s)
            heard.append(pipeline.namer.heard if pipeline.namer else None)
    named = [(h, s.state_name) for s, h in zip(steps, heard, strict=True)]
    changing = [s for s, (h, n) in zip(steps, named, strict=True) if (h, n) == ("slow", "fast")]
    assert changing and not any(s.evidence for s in changing), named
    assert max(s.window.score for s in changing) > pipeline.threshold
    change = (2 * len(normal) + len(lead)) / rate
    across = [i for i, s in enumerate(steps) if s.start_s < change < s.end_s]  # both sounds
    assert not any(steps[i].evidence for i in across), [steps[i] for i in across]
    # heard whole, the first still sounds like the old state: its second half does not
    assert named[across[0]] == ("fast", "fast"), named
    settled = [s for i, s in enumerate(steps) if named[i][0] == named[i][1] and i not in across]
    assert {n for _, n in named} == {"fast", "slow"} and all(s.evidence for s in settled), named


def test_a_fault_that_flips_the_sound_faster_than_the_vote_is_still_judged(
    two_states: Path,
) -> None:
    """A stall or cut-out that drops the machine to its other state's sound for 0.35 s every
    second never lets the vote rename it: its windows, each half like one state, were left
    unjudged for good and the fault raised nothing (a review). The exemption of a change of
    state lasts STATE_WINDOWS windows; then they are judged, and the fault is found."""
    from edge.machine_state import STATE_WINDOWS
    from edge.pipeline import Pipeline

    bundle = load_bundle(two_states)
    rate, hop = bundle.features.samplerate, bundle.features.hop_samples
    audio = np.concatenate([read_audio(f, rate) for f in NORMAL_FILES])
    cut = (np.arange(len(audio)) % rate < 0.35 * rate) & (np.arange(len(audio)) >= 5 * rate)
    stream = np.where(cut, audio * 10 ** (QUIET_DB / 20), audio)
    pipeline = Pipeline(bundle)
    steps = [s for i in range(0, len(stream), hop) for s in pipeline.push(stream[i : i + hop])]
    later = [s for s in steps if s.start_s >= 5.0]
    assert sum(not s.evidence for s in later) <= STATE_WINDOWS, [s.evidence for s in later]
    assert any(t.kind == "start" for s in later for t in s.transitions), "the fault is found"


def test_a_change_of_state_after_a_while_of_odd_windows_is_still_not_judged(
    two_states: Path,
) -> None:
    """A machine with a window now and then that sounds like its other state (a dip of 0.3 s
    every 3 s, too brief for the vote) used up the allowance of a change for good, and a real
    change afterwards was judged, the windows across it scoring 3.9 and 5.8 against 1.68 (a
    review). Each window that sounds like the state named gives one back."""
    from edge.pipeline import Pipeline

    bundle = load_bundle(two_states)
    rate, hop = bundle.features.samplerate, bundle.features.hop_samples
    normal = np.concatenate([read_audio(f, rate) for f in NORMAL_FILES] * 2)
    t = np.arange(len(normal))
    dip = (t % (3 * rate) >= 2 * rate) & (t % (3 * rate) < int(2.3 * rate))
    lead = normal[: rate // 10]
    quiet = 10 ** (QUIET_DB / 20)
    stream = np.concatenate([np.where(dip, normal * quiet, normal), lead, normal * quiet])
    change = (len(normal) + len(lead)) / rate
    pipeline = Pipeline(bundle)
    steps = [s for i in range(0, len(stream), hop) for s in pipeline.push(stream[i : i + hop])]
    assert {s.state_name for s in steps if s.end_s <= change} == {"fast"}, "never renamed"
    across = [s for s in steps if s.start_s < change < s.end_s]
    assert across and not any(s.evidence for s in across), across
    assert not [t for s in steps for t in s.transitions], "no event"


def test_state_levels_that_do_not_match_the_states_are_refused(
    two_states: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(two_states)
    manifest = bundle.manifest.model_dump(exclude={"files", "checksum", "arrays"})
    arrays = {**bundle.arrays, "machine.state_levels": np.zeros((3, bundle.features.n_mels))}
    write_unchecked(tmp_path / "bad.bundle", manifest, {}, arrays)
    with pytest.raises(BundleError, match=r"machine\.state_levels"):
        load_bundle(tmp_path / "bad.bundle")


def clicks(like: np.ndarray, seconds: float, rate: int) -> np.ndarray:
    """Bursts of noise (20 ms every 100 ms) at the RMS of `like`: what a stopped machine's
    neighbour might sound like, and far from the fan's steady sound. Between the bursts, a
    microphone's noise floor 60 dB down (80 ms of digital zeros is a dropout to the device)."""
    rng = np.random.default_rng(7)
    n = int(seconds * rate)
    gate = (np.arange(n) % int(0.1 * rate)) < int(0.02 * rate)
    x = rng.standard_normal(n) * np.where(gate, 1.0, 1e-3)
    return x * np.std(like) / np.std(x)


def test_a_numpy_detector_trained_on_state_folders_names_them_without_tensorflow(
    tmp_path: Path,
) -> None:
    """`--normal-states` trained the int8 CNN only, which a Pi cannot train (no TensorFlow): a
    user of the default detector had no state names (a field review's two-speed machine). The
    numpy kinds take state folders too: their model on every running state, each state's level
    spectrum recorded as the CNN's trainer records it, the folder `off` left out of the model,
    and TensorFlow never imported."""
    import json
    import subprocess
    import sys

    rate = 16000
    root = tmp_path / "states"
    for name, gain_db in (("fast", 0.0), ("slow", QUIET_DB)):
        (root / name).mkdir(parents=True)
        for i, f in enumerate(NORMAL_FILES):
            audio = read_audio(f, rate) * 10 ** (gain_db / 20)
            sf.write(root / name / f"{i}.wav", audio, rate, subtype="FLOAT")
    (root / "off").mkdir()
    noise = np.random.default_rng(1).standard_normal(5 * rate) * 10 ** (-70 / 20)
    sf.write(root / "off" / "room.wav", noise, rate, subtype="FLOAT")
    out = tmp_path / "states.bundle"
    code = (
        "import sys\n"
        "sys.modules['tensorflow'] = sys.modules['keras'] = None\n"
        "from soundsentry.cli import main\n"
        f"sys.exit(main(['train', '--normal-states', {str(root)!r}, '--detector', "
        f"'fluctuation', '--out', {str(out)!r}, '--false-alarms-per-day', '24']))"
    )
    cnn = code.replace(", '--detector', 'fluctuation'", "")  # the default: the int8 CNN
    proc = subprocess.run([sys.executable, "-c", cnn], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().endswith(
        "; or --detector fluctuation trains state folders without it"
    ), proc.stderr
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (
        "states: fast 20 s, off 5 s, slow 20 s (`off`: the machine stopped; it teaches the state "
        "names, not the threshold)"
    ) in proc.stdout, proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "fluctuation"
    assert manifest["machine"]["states"] == ["fast", "off", "slow"]
    # `off` is in no count of the model's audio: a site refit weighs the training by them
    assert manifest["training"]["seconds"] == manifest["training"]["fitted_seconds"] == 40.0
    assert len(manifest["training"]["files"]) == 2 * len(NORMAL_FILES)
    bundle = load_bundle(out)
    assert bundle.array("machine.state_levels").shape == (3, bundle.features.n_mels)
    assert_a_day_names_its_states(out, tmp_path)
    refused = cli("train", "--normal-states", str(root), "--detector", "ensemble", "--out",
                  str(tmp_path / "e.bundle"), check=False)  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "soundsentry: error: --normal-states trains the embedding or --detector fluctuation, "
        "levels, knn, subspace, not ensemble"
    )


def neighbour_state(two_states: Path, out: Path, name: str, sound: np.ndarray) -> Path:
    """The two-state bundle with its `slow` state replaced by `sound`, called `name`."""
    bundle = load_bundle(two_states)
    manifest = bundle.manifest.model_dump(exclude={"files", "checksum", "arrays"})
    manifest["machine"]["states"] = ["fast", name]
    levels = bundle.array("machine.state_levels").copy()
    levels[1] = LogMel(bundle.features)(sound).mean(axis=0)
    return write_bundle(out, manifest, {}, {**bundle.arrays, "machine.state_levels": levels})


def test_a_state_named_off_is_off_no_event_and_no_running_hours(
    two_states: Path, tmp_path: Path
) -> None:
    """The machine stops but a neighbour goes on, not quieter than the fan: by its level it is
    running, and the fan's model finds the neighbour anomalous. Trained with that sound as the
    state `off`, the machine is off while it lasts: no event, no running time (the daemon counts
    running hours over windows whose machine is running); the same sound under any other state
    name raises an event and counts as running (so the test can fail)."""
    rate = load_bundle(two_states).features.samplerate
    fan = [read_audio(f, rate) for f in NORMAL_FILES[:2]]
    neighbour = clicks(fan[0], 8.0, rate)
    path = tmp_path / "fan-stops-neighbour-fan.wav"
    sf.write(path, np.concatenate([fan[0], neighbour, fan[1]]), rate, subtype="FLOAT")
    stop_s = len(fan[0]) / rate
    start_s = stop_s + len(neighbour) / rate
    seen, steps_of = {}, {}
    for name in ("off", "stopped"):
        bundle_path = neighbour_state(two_states, tmp_path / f"{name}.bundle", name, neighbour)
        rec, steps = Recorder(), []
        settings = Settings(device_id="t", model=bundle_path, data_dir=tmp_path / name)
        bundle = load_bundle(bundle_path)
        Detector(settings, bundle, [rec], on_step=steps.append).run(FileSource([path], rate))
        # Windows wholly inside the neighbour's 8 s, once the vote has had its 8 windows to turn.
        inside = [s for s in steps if stop_s + 4.0 <= s.start_s and s.end_s <= start_s]
        seen[name], steps_of[name] = (rec, inside), steps
    (off, off_inside), (control, control_inside) = seen["off"], seen["stopped"]

    # An event's offset is its first window's start: a 1-s window before the stop hears it.
    def during(rec: Recorder) -> list[float]:
        offsets = [e.stream_offset_s for e in rec.events if e.type == "start"]
        return [s for s in offsets if s is not None and stop_s - 1.0 <= s <= start_s + 1.0]

    assert during(control), control.events
    assert {s.machine for s in control_inside} == {"running"}
    assert not during(off), off.events
    assert off_inside and {(s.machine, s.state_name) for s in off_inside} == {("off", "off")}
    machines = [s.machine for s in off.states]
    assert "off" in machines and machines[-2:] == ["fast", None], machines  # None: `stopped`
    # no score while off: the room's (never judged) showed in the state as a spike at each stop
    assert [s.score for s in off.states if s.machine == "off"] == [None] * machines.count("off")
    assert any(s.score is not None for s in off.states if s.machine == "fast")
    # `replay`'s last line: the neighbour's scores (never scored for events) are left out
    summary, heard = ReplaySummary(), steps_of["off"]
    for step in heard:
        summary.step(step)
    off_windows = sum(s.machine == "off" for s in heard)
    judged = [s.score for s in heard if s.evidence]
    assert summary.off == off_windows > 0 and summary.highest == max(judged)
    assert f"; the machine off in {off_windows} of them" in summary.line(1, 1.0)


def test_replay_s_highest_score_is_of_the_windows_the_event_logic_judges() -> None:
    """`replay` took every running window for its highest score: a machine's run-up scored
    above the threshold, and the line said "highest score 2.76 vs threshold 1.87 (above)"
    with no event (in a review)."""
    from edge.pipeline import Step
    from edge.scoring import WindowScore

    def step(score: float, start: float, **kw: object) -> Step:
        return Step(WindowScore(0, score, np.zeros(64)), start, start + 1.0, (), **kw)

    summary = ReplaySummary()
    for s in (step(9.0, 0.0, evidence=False), step(1.2, 0.5), step(0.9, 1.0),
              step(7.0, 1.5, evidence=False, quieting=True), step(50.0, 2.0, machine="off",
              evidence=False)):  # fmt: skip
        summary.step(s)
    assert summary.highest == 1.2 and summary.off == 1 and summary.unjudged == 2
    line = summary.line(1, 1.87)
    assert "highest score 1.2 vs threshold 1.87 (below)" in line, line
    said = ReplaySummary()
    said.step(step(2.5, 0.0))
    assert "2.5 vs threshold 1.87 (above in passing: an event needs K of N" in said.line(1, 1.87)
    held = ReplaySummary()  # above only while events were held off: no "in passing"
    for s in (step(2.5, 0.0, held=True), step(1.0, 0.5)):
        held.step(s)
    assert "2.5 vs threshold 1.87 (above while events were held off: a learning" in held.line(
        1, 1.87
    )
    held.step(step(2.0, 1.0))  # one that could have raised one is above too
    assert "(above in passing: an event needs" in held.line(1, 1.87)
    swapped = ReplaySummary()  # a mark swapped the model: a score of the one before was set
    for s, threshold in (  # against the new threshold (a walk-through)
        (step(2.56, 0.0), 2.2),
        (step(1.2, 0.5), 2.2),
        (step(1.9, 1.0), 2.14),  # the window at the change counts, against the new one
        (step(1.5, 1.5), 2.14),
    ):
        swapped.step(s)
        swapped.window(s, threshold)
    assert ("highest score since the model or its threshold last changed 1.9 vs threshold 2.14 "
            "(below)") in swapped.line(1, 2.14), swapped.line(1, 2.14)  # fmt: skip
    # a refit as the replay ended: its scores are set against the threshold they were scored at
    late = swapped.line(1, 1.5)
    assert "highest score before the threshold changed 1.9 vs threshold 2.14" in late, late
    # a new model with the one threshold (a [detector] threshold): its state names it
    from edge.messages import EventMessage, StateMessage

    def state(model: str) -> StateMessage:
        return StateMessage(state="normal", device_id="d", model=model, threshold=2.0,
                            updated_at="2026-01-01T00:00:00Z")  # fmt: skip

    same = ReplaySummary()
    same.state(state("m-1"))
    for s in (step(2.56, 0.0), step(1.2, 0.5)):
        same.step(s)
        same.window(s, 2.0)
    start = {"event_id": "e", "device_id": "d", "model": "m-1", "threshold": 2.0}
    same.event(EventMessage(type="start", started_at="2026-01-01T00:00:00Z", peak_score=2.56,
                            **start))  # fmt: skip
    same.state(state("m-1-site-v2"))  # marked: refitted, the threshold as set
    # a refit as the replay ended (a period's): the scores are the model's before it, not
    # "none judged" (a diff review)
    ended = same.line(1, 2.0)
    assert "1 event, highest score of the model before 2.56 vs threshold 2 (above)" in ended, ended
    for s in (step(2.1, 1.0), step(1.0, 1.5)):
        same.step(s)
        same.window(s, 2.0)
    after = same.line(1, 2.0)  # the old model's event says nothing of the new one's 2.1
    assert "changed 2.1 vs threshold 2 (above in passing" in after, after
    steady = ReplaySummary()
    for s in (step(2.56, 0.0), step(1.2, 0.5)):
        steady.step(s)
        steady.window(s, 2.2)
    assert "highest score 2.56 vs threshold 2.2 (above" in steady.line(1, 2.2)
    assert line.endswith(
        "; 2 not judged (a start-up, a stop, a change of state, or sound back after a gap)"
    ), line


def test_an_event_keeps_the_state_it_was_raised_in_and_replay_adds_no_running_hours(
    tmp_path: Path,
) -> None:
    """The fan faults, then is switched off: the open event ends, and its `end` (the retained
    last event Home Assistant shows) still says the machine was running, as the schema says,
    not `off`. Before the first window the state message claims no machine state at all. A
    replay (live off) leaves the device's running hours as they were."""
    from edge.persist import DeviceState

    bundle = load_bundle(DEMO_BUNDLE)
    rate = bundle.features.samplerate
    clip = read_audio(DEMO_CLIP, rate)[: int(10.5 * rate)]  # normal running, then a fault
    rng = np.random.default_rng(3)
    off = (1e-4 * rng.standard_normal(6 * rate)).astype(np.float32)  # about -80 dBFS
    path = tmp_path / "fault-then-off.wav"
    sf.write(path, np.concatenate([clip, off]), rate, subtype="FLOAT")
    settings = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "live",
                        detector={"off_below_dbfs": -60})  # fmt: skip
    rec = Recorder()
    Detector(settings, bundle, [rec], persist=True).run(FileSource([path], rate))
    starts = [e for e in rec.events if e.type == "start"]
    ends = [e for e in rec.events if e.type == "end"]
    assert starts and ends and ends[-1].event_id == starts[-1].event_id, rec.kinds()
    assert ends[-1].ended_at is not None and ends[-1].machine == starts[-1].machine == "running"
    assert ends[-1].ended_by == "machine_off"  # why the alarm cleared, though it said `running`
    assert "off" in [s.machine for s in rec.states]  # it did go off, and the event ended there
    assert rec.states[0].machine is None  # nothing heard yet: no claim of `running`
    heard = DeviceState(tmp_path / "live").running_seconds
    assert heard > 5
    replay = Settings(device_id="t", model=DEMO_BUNDLE, data_dir=tmp_path / "live")
    Detector(replay, bundle, [Recorder()], persist=True, live=False).run(FileSource([path], rate))
    assert DeviceState(tmp_path / "live").running_seconds == heard


def test_a_daemon_started_beside_a_stopped_machine_says_off_from_the_first_window() -> None:
    """Started as running, it published `running` (or a state's name) and then `off` at every
    restart, reload or settings change next to a stopped machine, and counted running time."""
    from edge.pipeline import Pipeline
    from edge.settings import DetectorSettings

    bundle = load_bundle(DEMO_BUNDLE)
    rate = bundle.features.samplerate
    room = np.random.default_rng(3).standard_normal(3 * rate).astype(np.float32) * 10 ** (-70 / 20)
    pipeline = Pipeline(bundle, DetectorSettings(off_below_dbfs=-60.0))
    steps = pipeline.push(room)
    assert steps and [s.machine for s in steps] == ["off"] * len(steps)  # no running time
    fan = read_audio(NORMAL_FILES[0], rate)
    again = Pipeline(bundle, DetectorSettings(off_below_dbfs=-60.0)).push(fan)
    assert [s.machine for s in again] == ["running"] * len(again)


def test_a_stopped_machine_in_a_noisy_room_stays_off_and_a_start_counts_from_its_sound() -> None:
    """A stopped fan in an occupied room, its windows 1.5 +- 2 dB above the off level: two
    windows 3 dB above it in a row made it `running`, two below it `off` again, 286 times an
    hour (each a retained state message and a log line), and 60 % of the hour counted as
    running (in a review). A start is now the vote that renames a state, 8 of 10 windows."""
    from edge.machine_state import MachineState, RunningTime

    rng = np.random.default_rng(5)
    machine, clock, hop = MachineState(off_below_dbfs=-40.0), RunningTime(), 0.5

    def heard(level: float, end_s: float) -> str:
        state = machine.update(level, end_s, hop)
        clock.heard(state, False, hop)  # as the daemon counts the hours it publishes
        return state

    room = -40.0 + 1.5 + 2.0 * rng.standard_normal(7200)  # an hour of windows
    room[-10:] = -42.0  # a quiet moment before the start, so the start is the machine's alone
    states = [heard(level, 1 + i * hop) for i, level in enumerate(room)]
    assert sum(a != b for a, b in itertools.pairwise(states)) <= 4  # 8 of 10 by chance: ~1/h
    assert states[-1] == "off" and clock.seconds <= 60
    before, start = clock.seconds, 1 + len(room) * hop
    running = [heard(-25.0, start + i * hop) for i in range(20)]
    assert running.index("running") == 7  # the eighth window of the machine's sound
    assert clock.seconds - before == pytest.approx(20 * hop)  # from its first window
    assert not machine.allows_events(start + 5.0) and machine.allows_events(start + 5.5)


def test_a_start_voted_across_a_dropout_still_waits_the_settle_time() -> None:
    """The start's vote set the settle time outright and counted its loud run across a gap:
    7 loud windows, a 10-s dropout and one more loud window let events be judged 2 s after the
    sound came back, not 5 (a review's probe)."""
    from edge.machine_state import SETTLE_SECONDS, MachineState

    machine, hop = MachineState(off_below_dbfs=-40.0), 0.5
    t = 1.0
    machine.update(-50.0, t, hop)  # off from the first window
    for _ in range(7):
        t += hop
        machine.update(-25.0, t, hop)
    for _ in range(20):  # the microphone drops out for 10 s
        t += hop
        machine.heard_nothing(t)
    back = t + hop
    states = [machine.update(-25.0, back + i * hop, hop) for i in range(12)]
    assert states[0] == "off" and states[-1] == "running"  # voted on sound after the gap
    assert not machine.allows_events(back + SETTLE_SECONDS - hop)


def test_a_blip_of_silence_holds_events_back_only_while_it_lasts() -> None:
    """A dropout of 0.2 s every 10 s (a USB microphone, a player restarted) held events back
    for the 5-s settle time after each, 6.5 s of every 10, and training left out half of such
    a recording (a new user's walk-through). A running machine heard again within about a
    second needs no settle time; a longer loss, and a device reopened, still wait it."""
    from edge.machine_state import SETTLE_SECONDS, MachineState

    hop = 0.5

    def back_after(
        dead_windows: int,
        lost: bool = False,
        last: float = -25.0,
        off: float | None = -40.0,
        running: int = 30,
        back: float = -25.0,
    ) -> float:
        """Seconds from the first window heard again to the first judged; `last`: the level of
        the window before the dead ones."""
        machine, t = MachineState(off_below_dbfs=off), 0.0
        for _ in range(running):  # running, settled
            t += hop
            machine.update(-25.0, t, hop)
        assert machine.allows_events(t) or not running
        if running:
            t += hop
            machine.update(last, t, hop)
        for i in range(dead_windows):
            t += hop
            machine.heard_nothing(t, lost=lost and i == 0)
        again = t + hop
        for i in range(20):  # `back` first, then running as before
            machine.update(back if i == 0 else -25.0, again + i * hop, hop)
            if machine.allows_events(again + i * hop):
                return i * hop
        return float("inf")

    assert back_after(3) == 0.0  # a 0.2-s dropout: the 1-s windows that hold it are dead
    assert back_after(4) == 0.0  # about a second
    assert back_after(6) >= SETTLE_SECONDS - hop  # two seconds: the settle time
    assert back_after(1, lost=True) >= SETTLE_SECONDS - hop  # a reopened device: unknown loss
    assert back_after(3, off=None) == 0.0  # a bundle with no off level: the same
    # a machine going quiet before it (a stop beginning; a mains dip that stalls the motor and
    # browns out the microphone): a restart may lie behind the dropout (a diff review)
    assert back_after(3, last=-42.0) >= SETTLE_SECONDS - hop  # below the off level
    assert back_after(3, last=-38.0) >= SETTLE_SECONDS - hop  # near it: coasting down
    assert back_after(3, running=0) >= SETTLE_SECONDS - hop  # dead from the stream's start
    # the motor stalled inside the dropout: sound comes back near the off level, a run-up
    assert back_after(3, back=-39.0) >= SETTLE_SECONDS - hop


def test_training_keeps_what_surrounds_blips_of_silence_and_says_what_it_leaves_out(
    tmp_path: Path,
) -> None:
    """The same recording with a 0.2-s dropout every 10 s: training fitted 48 s of 102 ("of it
    the machine running") and said nothing of the dropouts; now it keeps all but the dropouts'
    own windows and says how much of which recordings they took."""
    audio = [read_audio(f, 16000) for f in NORMAL_FILES]
    gap = np.zeros(3200, np.float32)
    gappy = tmp_path / "gappy" / "normal.wav"
    gappy.parent.mkdir()
    sf.write(gappy, np.concatenate([x for a in audio for x in (a, gap)]), 16000)
    proc = cli("train", "--normal", str(gappy.parent), "--out", str(tmp_path / "m.bundle"))
    first = next(line for line in proc.stdout.splitlines() if line.startswith("audio:"))
    total = sum(len(a) for a in audio) / 16000 + 0.2 * len(audio)
    kept = re.search(r"fitted the model \((\d+) s of it the machine running\)", first)
    running = float(kept.group(1)) if kept else total
    dead = 3 * 0.5 * len(audio)  # three 1-s windows at a 0.5-s hop hold each dropout
    assert running >= total - dead - 2, first
    assert f"of 1 recording(s) ({gappy}) hold digital silence" in proc.stderr, proc.stderr
    said = float(proc.stderr.split(" s of 1 recording(s)")[0].split()[-1])
    assert 2 * 0.5 * (len(audio) - 1) <= said <= dead, proc.stderr  # 2 or 3 windows a dropout
    clean = tmp_path / "clean"
    clean.mkdir()
    sf.write(clean / "normal.wav", np.concatenate(audio), 16000)
    proc = cli("train", "--normal", str(clean), "--out", str(tmp_path / "c.bundle"))
    assert "digital silence" not in proc.stderr, proc.stderr


def test_dead_windows_are_said_at_every_training_and_once_for_an_ensemble_s_members(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A memo kept for an ensemble's members (each reads the same recordings) lasted for the
    whole process: a second training in it (a notebook, a library caller) said nothing (a
    review of the mends)."""
    from edge.features import FeatureParams
    from edge.machine_state import said_once
    from train.dataset import warn_dead

    audio = read_audio(NORMAL_FILES[0], 16000)
    audio[16000:19200] = 0.0
    views = [(NORMAL_FILES[0], audio)]
    params = FeatureParams()
    with caplog.at_level(logging.WARNING, logger="train.dataset"):
        warn_dead(views, params)
        warn_dead(views, params)
        with said_once():
            warn_dead(views, params)
            warn_dead(views, params)
    said = [r for r in caplog.records if "hold digital silence" in r.getMessage()]
    assert len(said) == 3, [r.getMessage() for r in said]


def test_a_quiet_state_folder_is_running_not_off() -> None:
    """State folders `fast` and `idle`, the idle fan 30 dB quieter and a fifth of the audio:
    idle is a state the user named as running, so the off level lies below it; pooled without
    the states, idle windows are left out as "the machine off for a while" and the off level
    lies above them, so the idle machine (and a fault while it idles) would read as off."""
    from edge.features import FeatureParams
    from edge.machine_state import machine_profile

    params = FeatureParams()
    fast = [read_audio(f, params.samplerate) for f in NORMAL_FILES]
    idle = [fast[0] * 10 ** (-30 / 20)]  # less of it recorded, as is usual for idling
    idle_level = machine_profile(idle, params)["running_level_dbfs"]["p01"]
    pooled = machine_profile(fast + idle, params)["off_below_dbfs"]
    by_state = machine_profile(fast + idle, params, ["fast", "idle"], groups=[0] * 4 + [1])
    assert pooled > idle_level  # the defect: idle would be off
    assert by_state["off_below_dbfs"] < idle_level
    assert by_state["off_below_dbfs"] == pytest.approx(idle_level - 10, abs=0.01)
    # idle recorded for under 1 % of the audio (3 s beside 10 min at full speed): the pooled
    # quietest 1 % is the fast state's, so the off level lay above idle
    long_fast = [np.tile(np.concatenate(fast), 30)]
    short_idle = [idle[0][: 3 * params.samplerate]]
    few = machine_profile(long_fast + short_idle, params, ["fast", "idle"], groups=[0, 1])
    short_level = machine_profile(short_idle, params)["running_level_dbfs"]["p01"]
    assert few["off_below_dbfs"] < short_level - 9


def _gentle_stop(ramp_s: float, rate: int = 16000) -> np.ndarray:
    """The fixture fan for 10 s, its level falling by 12 dB over the last `ramp_s` of them, then
    switched off: only a noise floor at -75 dBFS."""
    base = np.concatenate([read_audio(f, rate) for f in NORMAL_FILES])
    n, stop, r = len(base), len(base) // 2, int(ramp_s * rate)
    gain = np.ones(n, np.float32)
    gain[stop - r : stop] = 10 ** (np.linspace(0, -12, r) / 20)
    gain[stop:] = 0
    floor = np.random.default_rng(1).standard_normal(n) * 10 ** (-75 / 20)
    return (base * gain + floor).astype(np.float32)


def test_a_machine_coasting_down_raises_no_event_at_its_stop(tmp_path: Path) -> None:
    """Windows just above the off level were still evidence: a model of levels (the
    autoencoder) scored the last windows of a coast-down high and sent a start, then an end
    `machine_off` a second later, at every stop of the machine."""
    from conftest import AE_BUNDLE

    from edge.health import level_dbfs
    from edge.pipeline import Pipeline
    from edge.settings import DetectorSettings

    bundle = load_bundle(AE_BUNDLE)
    base = np.concatenate([read_audio(f, 16000) for f in NORMAL_FILES])
    levels = [level_dbfs(base[i : i + 16000]) for i in range(0, len(base) - 16000, 8000)]
    off = float(np.percentile(levels, 1) - 10)  # as calibrate sets it
    for ramp in (1.0, 5.0, 10.0):
        pipeline = Pipeline(bundle, DetectorSettings(cooldown_seconds=0, off_below_dbfs=off))
        audio = _gentle_stop(ramp)
        steps = [s for i in range(0, len(audio), 1600) for s in pipeline.push(audio[i : i + 1600])]
        assert steps[-1].machine == "off", "it did stop"
        assert [t.kind for s in steps for t in s.transitions] == [], f"a {ramp:g}-s coast-down"


def test_a_dead_microphone_is_an_audio_fault_not_the_machine_switched_off(tmp_path: Path) -> None:
    """Digital silence fed its -120 dB to the machine's state: after two windows the machine
    was `off`, the open event ended `machine_off` and running hours stopped, when the
    microphone was what had gone."""
    rate = 16000
    clip = read_audio(DEMO_CLIP, rate)
    fault = clip[int(5.5 * rate) : int(10.5 * rate)]
    audio = np.concatenate([fault, np.zeros(8 * rate, np.float32), fault])
    settings = Settings(
        device_id="u",
        model=DEMO_BUNDLE,
        data_dir=tmp_path,
        clips={"enabled": False},
        detector={"off_below_dbfs": -60.0, "cooldown_seconds": 0},
    )
    reports = Recorder()
    d = Detector(settings, load_bundle(DEMO_BUNDLE), [reports])

    class Source:
        def __iter__(self):  # type: ignore[no-untyped-def]
            for i in range(0, len(audio), 1600):
                yield audio[i : i + 1600]

    d.run(Source())
    ends = [e.ended_by for e in reports.events if e.type == "end"]
    assert ends[0] == "audio_fault", ends
    assert "off" not in [s.machine for s in reports.states]
    assert "fault:silence" in [h.change for h in reports.healths]


def test_an_event_open_when_the_machine_idles_just_above_the_off_level_ends() -> None:
    """Windows near the off level are no evidence: an event open when the level settled
    there got no updates, no release and no end, for as long as the machine idled."""
    from edge.health import level_dbfs
    from edge.pipeline import Pipeline
    from edge.settings import DetectorSettings

    rate = 16000
    fault = read_audio(DEMO_CLIP, rate)[int(5.5 * rate) : int(10.5 * rate)]
    quiet = np.concatenate([read_audio(f, rate) for f in NORMAL_FILES]) * 10 ** (-30 / 20)
    levels = [level_dbfs(quiet[i : i + rate]) for i in range(0, len(quiet) - rate, 800)]
    off = min(levels) - 0.2  # the idle lies just above the off level, never below it
    pipeline = Pipeline(
        load_bundle(DEMO_BUNDLE), DetectorSettings(off_below_dbfs=off, cooldown_seconds=0)
    )
    audio = np.concatenate([fault, fault, quiet, quiet])
    steps = [s for i in range(0, len(audio), 1600) for s in pipeline.push(audio[i : i + 1600])]
    kinds = [(t.kind, t.ended_by) for s in steps for t in s.transitions]
    assert kinds == [("start", None), ("end", "machine_off")], kinds
    assert steps[-1].machine == "running", "it idles: not off"


def _site(tmp_path: Path, name: str, audio: list[np.ndarray], rate: int) -> list[Path]:
    """Site recordings written as `record` writes them (mono WAV)."""
    paths = []
    for i, a in enumerate(audio):
        paths.append(tmp_path / f"{name}-{i}.wav")
        sf.write(paths[-1], a, rate, subtype="FLOAT")
    return paths


def _calibrated(bundle: Path, files: list[Path], out: Path) -> object:
    cli("calibrate", str(bundle), "--normal", *map(str, files), "--out", str(out))
    return load_bundle(out).manifest.machine


def test_calibration_keeps_the_machine_running_through_loud_transients_and_long_stops(
    two_states: Path, tmp_path: Path
) -> None:
    """The site's off level was moved by its 99th percentile of window levels against
    training's: a loud 1-s burst every 5 s lifted it above the machine, which was then `off`
    for good. Now the shift is the one whose running windows have the trained median."""
    plain = load_bundle(two_states)
    rate, trained = plain.features.samplerate, plain.manifest.machine
    normal = [read_audio(f, rate) for f in NORMAL_FILES]

    def bursts(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[rate // 2 : rate + rate // 2] *= 10  # +20 dB for 1 s of every 5-s file
        return a

    loud = _calibrated(two_states, _site(tmp_path, "loud", [bursts(a) for a in normal], rate),
                       tmp_path / "loud.bundle")  # fmt: skip
    assert abs(loud.off_below_dbfs - trained.off_below_dbfs) <= 1.0, loud
    rng = np.random.default_rng(1)
    # the machine starts after 4 s of the room; the device judges nothing in the 5 s after
    # a start, so each recording runs on for 10 s
    room = [np.concatenate([1e-4 * rng.standard_normal(4 * rate), a, a]) for a in normal]
    stopped = _calibrated(two_states, _site(tmp_path, "stopped", room, rate),
                          tmp_path / "stopped.bundle")  # fmt: skip
    assert abs(stopped.off_below_dbfs - trained.off_below_dbfs) <= 1.0, stopped


def test_calibration_leaves_out_what_sounds_like_the_state_off(
    two_states: Path, tmp_path: Path
) -> None:
    """Site audio of the machine stopped while a neighbour goes on, as loud as the fan: the
    device calls it `off` and never scores it, but calibrate kept it (by level it is running),
    and the threshold rose over every fault window (a review's reproduction)."""
    rate = load_bundle(two_states).features.samplerate
    fan = [read_audio(f, rate) for f in NORMAL_FILES[:3]]
    neighbour = clicks(fan[0], 8.0, rate)
    bundle = neighbour_state(two_states, tmp_path / "off.bundle", "off", neighbour)
    alone = tmp_path / "alone.bundle"
    _calibrated(bundle, _site(tmp_path, "fan", fan, rate), alone)
    stopped = tmp_path / "stopped.bundle"
    site = _site(tmp_path, "site", [*fan, neighbour], rate)
    proc = cli("calibrate", str(bundle), "--normal", *map(str, site), "--out", str(stopped))
    assert "or sounding like the state `off`" in proc.stderr
    assert load_bundle(stopped).threshold == pytest.approx(load_bundle(alone).threshold)


def test_calibration_moves_the_states_levels_with_the_machine_s_level(
    two_states: Path, tmp_path: Path
) -> None:
    """A microphone moved away, 20 dB down: the off level moved, but the states' band levels
    (absolute dB) did not, so the fan heard here was named after its quieter state. Here the
    quieter state sounds otherwise too (its band levels are a clicking neighbour's, about the
    fan's level), as states of different speeds or loads do: a state that differed from
    another in level alone could not be told from a microphone moved away."""
    fan = read_audio(NORMAL_FILES[0], load_bundle(two_states).features.samplerate)
    states = neighbour_state(two_states, tmp_path / "states.bundle", "idle", clicks(fan, 5, 16000))
    bundle = load_bundle(states)
    rate = bundle.features.samplerate
    far = [read_audio(f, rate) * 0.1 for f in NORMAL_FILES]
    out = tmp_path / "far.bundle"
    _calibrated(states, _site(tmp_path, "far", far, rate), out)
    moved = load_bundle(out).array("machine.state_levels") - bundle.array("machine.state_levels")
    assert np.allclose(moved, moved.flat[0]) and -21 <= moved.flat[0] <= -19, moved.flat[0]
    logmel = LogMel(bundle.features)
    before = StateNamer(["fast", "idle"], bundle.array("machine.state_levels"))
    after = StateNamer(["fast", "idle"], load_bundle(out).array("machine.state_levels"))
    assert before.name(logmel(far[0]).mean(axis=0)) == "idle"  # what the old levels said
    assert after.name(logmel(far[0]).mean(axis=0)) == "fast"


def test_calibration_in_another_mix_of_states_moves_nothing(
    two_states: Path, tmp_path: Path
) -> None:
    """The same microphone, the machine mostly in its quiet state this time: matched on the
    overall running median (the states mixed), the site's level seemed 10 dB off, and the off
    level and the states' levels moved with it. Each window against its own state: no shift."""
    bundle = load_bundle(two_states)
    rate = bundle.features.samplerate
    quiet = 10 ** (QUIET_DB / 20)
    mix = [read_audio(f, rate) * (1.0 if i == 0 else quiet) for i, f in enumerate(NORMAL_FILES)]
    out = tmp_path / "mix.bundle"
    machine = _calibrated(two_states, _site(tmp_path, "mix", mix, rate), out)
    assert abs(machine.off_below_dbfs - bundle.manifest.machine.off_below_dbfs) <= 1.0, machine
    moved = load_bundle(out).array("machine.state_levels") - bundle.array("machine.state_levels")
    assert np.all(np.abs(moved) <= 1.0), moved.flat[0]


def test_calibrating_a_bundle_without_a_running_level_warns_of_two_levels(
    tmp_path: Path,
) -> None:
    """A bundle from before running levels were recorded learns the off level from the site
    audio, all of it: with the machine stopped for most of the recording, the empty room is
    counted as running. That cannot be told apart here, so it is said."""
    assert load_bundle(DEMO_BUNDLE).manifest.machine is None
    rate = load_bundle(DEMO_BUNDLE).features.samplerate
    rng = np.random.default_rng(2)
    stopped = [np.concatenate([1e-4 * rng.standard_normal(8 * rate), read_audio(f, rate)[:rate]])
               for f in NORMAL_FILES]  # fmt: skip
    files = _site(tmp_path, "stopped", stopped, rate)
    out = cli("calibrate", str(DEMO_BUNDLE), "--normal", *map(str, files),
              "--out", str(tmp_path / "c.bundle"))  # fmt: skip
    assert "the recordings hold two levels" in out.stderr, out.stderr
    steady = cli("calibrate", str(DEMO_BUNDLE), "--normal", *map(str, NORMAL_FILES),
                 "--out", str(tmp_path / "d.bundle"))  # fmt: skip
    assert "two levels" not in steady.stderr


def test_training_keeps_the_windows_the_device_takes_as_evidence(tmp_path: Path) -> None:
    """Training kept every window that was not dead: the machine stopped for 2 s (the room,
    50 dB under the fan), its edges and its start-up, none of which the device judges, were
    fitted and set the threshold (3.5 to 10 times higher for the level-aware kinds, in a
    review). 5 s of running, a stop, 8 s of running: the 7 windows that end STOP_SECONDS (2 s)
    or more before the first quiet one (the stop began in the others) and the 5 after the
    start-up's settle time (5 s from its end)."""
    from edge.features import FeatureParams, windows_of
    from edge.machine_state import evidence_windows, machine_profile
    from train.levels import train_levels
    from train.statistics import collect

    rate, p = 16000, FeatureParams()
    fan = np.concatenate([read_audio(f, rate) for f in NORMAL_FILES[:3]])
    audio = np.concatenate([fan[: 5 * rate], fan[5 * rate : 7 * rate] / 10**2.5, fan[7 * rate :]])
    off = machine_profile([fan], p)["off_below_dbfs"]
    assert len(windows_of(audio, p, heard=True)) == 29
    assert len(evidence_windows(audio, p, off)) == 7 + 5
    assert len(evidence_windows(fan, p, off)) == 29  # a machine running throughout: every one
    assert len(evidence_windows(audio, p, None)) == 29  # no off level: the level says nothing
    blip = fan.copy()
    blip[3 * rate : 3 * rate + 1600] = 0.0  # 0.1 s: the two windows that hold it are dead,
    assert len(evidence_windows(blip, p, off)) == 29 - 2  # and the machine still runs after it
    dropout = fan.copy()
    dropout[3 * rate : 5 * rate] = 0.0  # 2 s: dead windows, then the settle time
    settled = int(5.5 * rate) + 5 * rate - p.window_samples  # the last dead one's end + 5 s
    expected = len(windows_of(fan[: 3 * rate], p)) + len(windows_of(fan[settled:], p))
    assert len(evidence_windows(dropout, p, off)) == expected
    # block by block (an hour-long clip marked normal is streamed), the very same windows
    from edge.machine_state import evidence_stream

    cuts = [0, 1, 5000, 37000, 80000, 81111, 120000, len(audio)]
    blocks = [audio[a:b] for a, b in itertools.pairwise(cuts)]
    streamed = np.stack(list(evidence_stream(blocks, p, off)))
    np.testing.assert_array_equal(streamed, evidence_windows(audio, p, off))
    # the numpy trainers take these: a stop in the held-out part (the last fifth) adds none
    path = tmp_path / "stop.wav"
    recording = np.concatenate([fan, fan, fan[: 3 * rate], fan[3 * rate : 5 * rate] / 10**2.5])
    sf.write(path, recording, rate, subtype="FLOAT")
    run = collect([path], tmp_path / "b.bundle", train_levels.featurize, p)
    held = recording[-len(recording) // 5 :]
    trained_off = run.machine["off_below_dbfs"]
    assert len(run.held) == len(evidence_windows(held, p, trained_off))
    assert len(run.held) < len(windows_of(held, p, heard=True))


def test_evidence_features_are_the_featurized_evidence_windows_a_chunk_at_a_time() -> None:
    """`train` featurizes the windows it takes as evidence a chunk at a time (the log-mels of
    every window of an hour, twice over, were most of its 0.7 GB on one 1-h file): the rows
    are those of featurizing them all at once, across chunks, blocks, a stop and a restart."""
    from edge.detectors.fluctuation import fluctuation_features
    from edge.detectors.levels import level_features
    from edge.features import windows_of
    from edge.machine_state import (
        FEATURE_CHUNK,
        evidence_features,
        evidence_windows,
        machine_profile,
    )

    p = FeatureParams()
    fan = read_audio(NORMAL_FILES[0], p.samplerate)
    reps = int(np.ceil(FEATURE_CHUNK * 1.6 * p.hop_seconds * p.samplerate / len(fan)))
    audio = np.tile(fan, reps)
    quiet = slice(len(audio) // 3, len(audio) // 3 + 8 * p.samplerate)  # the machine stops
    audio[quiet] *= 10 ** (-40 / 20)
    off = machine_profile([fan], p)["off_below_dbfs"]
    whole = evidence_windows(audio, p, off)
    assert FEATURE_CHUNK < len(whole) < len(windows_of(audio, p))  # the stop is left out
    for featurize in (fluctuation_features, level_features):
        np.testing.assert_array_equal(evidence_features(audio, p, off, featurize), featurize(whole))
    assert evidence_features(audio[:100], p, off, fluctuation_features).shape == (0, p.n_mels)


def test_evaluate_scores_the_windows_training_fits(tmp_path: Path) -> None:
    """evaluate set aside only dead and `off` windows, so a normal recording with a stop was
    scored on its start-up and on the window before the stop was confirmed, which training
    leaves out: in a review, such windows at 40 times the threshold made a normal file look
    like a fault."""
    from edge.machine_state import evidence_windows
    from train.evaluate import device_events
    from train.levels import train_levels

    rate = 16000
    fan = np.concatenate([read_audio(f, rate) for f in NORMAL_FILES])
    folder = tmp_path / "normal"
    folder.mkdir()
    for i, f in enumerate(NORMAL_FILES):
        sf.write(folder / f"n{i}.wav", read_audio(f, rate), rate, subtype="FLOAT")
    bundle = load_bundle(train_levels([str(folder)], tmp_path / "b.bundle"))
    off = bundle.manifest.machine.off_below_dbfs
    assert off is not None
    audio = np.concatenate([fan[: 6 * rate], fan[: 2 * rate] / 10**2.5, fan[6 * rate :]])
    scores, _, off_windows = device_events(audio, bundle)
    assert off_windows >= 2
    judged = int(np.sum(~np.isnan(scores)))
    # and the 3 windows ending in the 2 s (STOP_SECONDS) before the first quiet one, which
    # training leaves out because the stop began in them, but the device cannot know yet
    assert judged == len(evidence_windows(audio, bundle.features, off)) + 3, judged


def test_a_stop_in_the_training_audio_costs_no_more_than_its_audio(tmp_path: Path) -> None:
    """The windows in which the machine stops were fitted and set the threshold: the MIMII fan
    trained on its ten recordings, each stopping after 7 s, set it at 3.34 and reported none of
    its 20 fault clips, where the same recordings cut before their stops gave 3.25 and 8 (a
    probe, 2026-12-03). Now recordings with a stop train as they would without the stop and the
    seconds just before it."""
    from edge.machine_state import STOP_SECONDS

    rate = 16000
    with_stop, cut = tmp_path / "with_stop", tmp_path / "cut"
    with_stop.mkdir()
    cut.mkdir()
    fan = np.concatenate([read_audio(f, rate) for f in NORMAL_FILES])
    for i in range(5):  # five recordings, so one is held out whole
        audio = fan[i * rate : (i + 15) * rate]
        stopping = np.concatenate([audio, audio[: 2 * rate] / 10**2.5])  # then 2 s of the room
        sf.write(with_stop / f"n{i}.wav", stopping, rate, subtype="FLOAT")
        kept = len(audio) + int((1.0 - STOP_SECONDS) * rate)  # windows (1 s) ending 2 s before
        sf.write(cut / f"n{i}.wav", audio[:kept], rate, subtype="FLOAT")  # the first quiet one
    from train.fluctuation import train_fluctuation

    thresholds = [
        load_bundle(train_fluctuation([str(d)], tmp_path / f"{d.name}.bundle")).manifest
        for d in (with_stop, cut)
    ]
    stopped, plain = (m.threshold.value for m in thresholds)
    assert stopped == pytest.approx(plain, rel=0.02), (stopped, plain)


def test_training_says_which_states_their_level_spectrum_does_not_tell_apart() -> None:
    """The edge names a state by the mean band levels of its windows. Two speeds of one fan,
    10 % apart, lay nearer each other than the level drift between recordings, and the edge
    named a held-out `high` clip `low` throughout, with no word at training (a field test).
    Training now says which folders the edge cannot tell apart, before the minutes of training."""
    pytest.importorskip("tensorflow")
    from train.states import states_not_apart

    rng = np.random.default_rng(0)
    spectrum = rng.normal(-40, 6, 64)
    tilt = np.linspace(-6, 6, 64)

    def windows(level: np.ndarray, n: int = 40) -> np.ndarray:
        return level + rng.normal(0, 3, (n, 31, 64))  # a second of frames around its level

    levels = np.stack([spectrum, spectrum + tilt])  # two states 6 dB apart at the band edges
    apart = {0: windows(levels[0]), 1: windows(levels[1])}
    assert states_not_apart(levels, ["low", "high"], apart) == []
    # held-out audio of `high` that drifted to `low`'s spectrum: named `low` by the edge
    drifted = {0: windows(levels[0]), 1: windows(spectrum + 0.1 * tilt)}
    ((state, share, other),) = states_not_apart(levels, ["low", "high"], drifted)
    assert (state, other) == ("high", "low") and share < 0.2, share


def test_reading_state_folders_warns_of_states_the_edge_cannot_tell_apart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("tensorflow")
    from edge.features import FeatureParams
    from train.embedding import read_own

    quiet = tmp_path / "quiet"
    quiet.mkdir()
    for f in NORMAL_FILES[2:]:  # the same fan 20 dB down: a spectrum of its own
        sf.write(quiet / f"{f.stem}.wav", read_audio(f, 16000) * 0.1, 16000, subtype="FLOAT")
    # two folders of one sound whose recordings' level drifts more than the folders differ: the
    # whole recording each holds out (from 5 recordings up) sounds like the other folder's
    same: dict[str, list[Path]] = {"low": [], "high": []}
    sources = [*NORMAL_FILES, NORMAL_FILES[0]]
    for state, gains in (("low", [0, 0, 0, 0, -4]), ("high", [-4, -4, -4, -4, 0])):
        (tmp_path / state).mkdir()
        for i, (f, db) in enumerate(zip(sources, gains, strict=True)):
            path = tmp_path / state / f"{i}.wav"
            sf.write(path, read_audio(f, 16000) * 10 ** (db / 20), 16000, subtype="FLOAT")
            same[state].append(path)
    apart = {"low": NORMAL_FILES[:2], "quiet": sorted(quiet.iterdir())}
    with caplog.at_level(logging.WARNING, logger="train.embedding"):
        read_own(apart, FeatureParams(), 0)
        assert "level spectrum" not in caplog.text, caplog.text
        read_own(same, FeatureParams(), 0)
    said = [r.getMessage() for r in caplog.records if "level spectrum" in r.getMessage()]
    assert said and all("may call this state" in line for line in said), said


def test_a_state_bundle_tells_a_stop_by_its_off_level_or_a_folder_off(
    two_states: Path, tmp_path: Path
) -> None:
    """A bundle of state folders was said to tell the machine switched off whatever it held:
    with no off level and no folder `off`, a stopped machine reads as one of its states, and the
    page's line and the daemon's warning were withheld (a diff review)."""
    from edge.pipeline import Pipeline
    from edge.settings import DetectorSettings

    bundle = load_bundle(two_states)
    assert Pipeline(bundle, DetectorSettings()).tells_off  # its off level
    for states, tells in ((["fast", "slow"], False), (["fast", "off"], True)):
        manifest = bundle.manifest.model_dump(exclude={"files", "checksum", "arrays"})
        manifest["machine"]["off_below_dbfs"] = None
        manifest["machine"]["states"] = states
        out = tmp_path / f"{states[1]}.bundle"
        write_bundle(out, manifest, {}, dict(bundle.arrays))
        assert Pipeline(load_bundle(out), DetectorSettings()).tells_off is tells, states


def test_the_cnn_s_two_level_warning_names_a_state_folder_only_where_there_is_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The int8 CNN's trainer reads `--normal` as one group named `normal`: its two-level
    warning called that "the state folder 'normal'" and told the user to move audio into
    `off` (the last read of the change)."""
    from train.embedding import read_own

    running = np.concatenate([read_audio(f, 16000) for f in NORMAL_FILES])
    room = running * 10 ** (-35 / 20) + np.random.default_rng(0).normal(0, 1e-3, len(running))
    cycles = tmp_path / "cycles.wav"
    sf.write(cycles, np.concatenate([running, room, room]).astype(np.float32), 16000)
    with caplog.at_level(logging.WARNING, logger="edge.machine_state"):
        read_own({"normal": [cycles]}, FeatureParams(), 0, named_states=False)
        read_own({"running": [cycles]}, FeatureParams(), 0)
    said = [r.getMessage() for r in caplog.records if "holds two levels" in r.getMessage()]
    assert len(said) == 2, said
    assert said[0].startswith("the normal audio holds") and "--normal-states" in said[0]
    assert said[1].startswith("the state folder 'running' holds"), said[1]
