"""The default detector: band-fluctuation statistics + Mahalanobis, trained without TensorFlow."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import DEMO_BUNDLE, DEMO_CLIP, NORMAL_FILES, cli
from detector_helpers import Recorder
from sklearn.covariance import LedoitWolf

from edge.audio_io import read_audio
from edge.bundle import load_bundle
from edge.detectors.base import MIN_FEATURE_STD
from edge.features import FeatureParams, windows_of
from edge.scoring import FluctuationScorer, fluctuation_features
from train.fluctuation import MIN_SHRINKAGE, fit_statistics


def test_fluctuation_features_ignore_gain_and_slow_drift() -> None:
    audio = read_audio(NORMAL_FILES[0], 16000)
    w = windows_of(audio, FeatureParams())
    f = fluctuation_features(w)
    assert f.shape == (len(w), 64)
    louder = fluctuation_features(w + 12.0 + np.linspace(0, 3, 64))  # +12 dB, spectral tilt
    np.testing.assert_allclose(louder, f, atol=1e-4)
    np.testing.assert_allclose(fluctuation_features(w[0]), f[0])


def log_std_of_differences(window: np.ndarray) -> list[float]:
    """The fluctuation feature written out band by band, without numpy's axis arithmetic."""
    frames, bands = window.shape
    out = []
    for b in range(bands):
        steps = [float(window[t + 1, b] - window[t, b]) for t in range(frames - 1)]
        out.append(math.log(max(statistics.pstdev(steps), 1e-3)))
    return out


def test_fluctuation_features_match_a_direct_computation() -> None:
    rng = np.random.default_rng(2)
    windows = rng.normal(scale=[0.5, 1.0, 2.0, 4.0], size=(3, 32, 4)).cumsum(axis=1)
    windows[1, :, 2] = -40.0  # a band that does not move at all: the floor, not log(0)
    got = fluctuation_features(windows)
    np.testing.assert_allclose(got, [log_std_of_differences(w) for w in windows], rtol=1e-9)
    assert got[1, 2] == pytest.approx(math.log(1e-3))
    np.testing.assert_allclose(got[0], np.log([0.5, 1.0, 2.0, 4.0]), atol=0.35)  # random walk


def test_scorer_is_the_mahalanobis_distance_to_the_trained_statistics() -> None:
    """The trainer's statistics against scikit-learn's Ledoit-Wolf estimate, and the edge
    scorer against the squared Mahalanobis distance per band, written out as a double sum."""
    rng = np.random.default_rng(0)
    scale = np.exp(rng.normal(size=8))  # how much each of 8 bands moves in normal running
    normal = rng.normal(scale=scale, size=(40, 24, 8)).cumsum(axis=1)
    train = fluctuation_features(normal)
    model = fit_statistics(train)
    assert isinstance(model, FluctuationScorer)

    np.testing.assert_allclose(model.mean, train.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(model.std, train.std(axis=0), rtol=1e-4)
    z = (train - train.mean(axis=0)) / train.std(axis=0)
    lw = LedoitWolf().fit(z)
    assert lw.shrinkage_ > MIN_SHRINKAGE  # so the trainer's floor does not apply here
    np.testing.assert_allclose(model.center, 0.0, atol=1e-9)
    np.testing.assert_allclose(model.precision, lw.precision_, rtol=1e-6, atol=1e-8)

    windows = rng.normal(scale=scale, size=(6, 24, 8)).cumsum(axis=1)
    windows[3:, :, 5] *= 6.0  # one band fluctuates far more than it did in training

    def squared_distance(w: np.ndarray) -> float:
        d = (np.array(log_std_of_differences(w)) - model.mean) / model.std - model.center
        p = lw.precision_
        return sum(d[i] * p[i, j] * d[j] for i in range(8) for j in range(8)) / 8

    expected = [squared_distance(w) for w in windows]
    scores = [model.score(w, start=i) for i, w in enumerate(windows)]
    np.testing.assert_allclose([s.score for s in scores], expected, rtol=1e-6)
    np.testing.assert_allclose(model.score_many(windows), expected, rtol=1e-6)
    for s in scores:  # the explanation: each band's share, adding up to the score
        assert s.band_error.shape == (8,) and s.band_error.sum() == pytest.approx(s.score)
    assert all(int(np.argmax(s.band_error)) == 5 for s in scores[3:])
    assert min(expected[3:]) > 3 * max(model.distance(train))  # the faulty band stands out


def test_train_without_tensorflow_and_detect_the_fault(tmp_path: Path) -> None:
    out = tmp_path / "fan.bundle"
    code = (
        "import sys\n"
        "for m in ('tensorflow', 'keras', 'librosa'): sys.modules[m] = None\n"
        "from soundsentry.cli import main\n"
        f"sys.exit(main(['train', '--normal', *{[str(f) for f in NORMAL_FILES]!r}, "
        f"'--out', {str(out)!r}, '--false-alarms-per-day', '24']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    b = load_bundle(out)
    assert b.manifest.kind == "fluctuation" and b.model is None
    t = b.manifest.training
    # Four recordings are fewer than the split's step of five: each keeps its last 20 % aside.
    assert [f.name for f in t.holdout_files] == [f.name for f in NORMAL_FILES]
    assert t.holdout_seconds == pytest.approx(0.2 * t.seconds, abs=0.1)
    events = [json.loads(x) for x in cli("replay", str(out), str(DEMO_CLIP)).stdout.splitlines()]
    starts = [e for e in events if e["type"] == "start"]
    assert starts and 4.0 <= starts[0]["stream_offset_s"] <= 8.0, events  # the fault: 5-11 s
    assert starts[0]["bands"] and {"low_hz", "high_hz", "deviation"} <= set(starts[0]["bands"][0])


@pytest.mark.parametrize("all_channels", [False, True])
def test_all_channels_are_training_views(tmp_path: Path, all_channels: bool) -> None:
    rng = np.random.default_rng(1)
    for i in range(2):
        sf.write(
            tmp_path / f"array{i}.wav",
            (0.05 * rng.standard_normal((160000, 4))),  # 10 s: the last 2 s held out, 3 windows
            16000,
            format="WAVEX",
            subtype="PCM_16",
        )
    out = tmp_path / "multi.bundle"
    args = ["train", "--normal", str(tmp_path), "--out", str(out)]
    cli(*args, *(["--all-channels"] if all_channels else []))
    m = load_bundle(out).manifest
    views = 4 if all_channels else 1
    assert m.training.seconds == pytest.approx(20.0), "the recordings' seconds, not the views'"
    assert m.threshold.params["n_windows"] == views * 2 * 3  # each view's last 2 s held out
    assert m.training.channel == (-2 if all_channels else 0)


def test_the_default_detector_knows_a_machine_switched_off(tmp_path: Path) -> None:
    """The numpy trainers record how loud the machine runs, so the default bundle, with no
    setting, says `off` for a quiet room and raises no event for it."""
    from edge.daemon import Detector
    from edge.settings import Settings
    from edge.sources import FileSource

    out = tmp_path / "fan.bundle"
    cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(out))
    bundle = load_bundle(out)
    machine = bundle.manifest.machine
    assert machine is not None and machine.off_below_dbfs is not None
    rate = bundle.features.samplerate
    normal = read_audio(NORMAL_FILES[0], rate)
    assert machine.off_below_dbfs < 20 * math.log10(np.sqrt(np.mean(normal**2)))
    rng = np.random.default_rng(0)  # the room with the fan off: mains hum and a little hiss
    t = np.arange(8 * rate) / rate
    room = np.sin(2 * np.pi * 50 * t) + 0.01 * rng.standard_normal(len(t))
    ambient = (room / np.abs(room).max() * 10 ** (-60 / 20)).astype(np.float32)
    path = tmp_path / "on-off-on.wav"
    sf.write(path, np.concatenate([normal, ambient, normal]), rate, subtype="FLOAT")

    rec = Recorder()
    settings = Settings(device_id="t", model=out, data_dir=tmp_path / "data")
    Detector(settings, bundle, [rec]).run(FileSource([path], rate))
    assert "off" in [s.machine for s in rec.states]
    assert rec.events == []


def test_calibrating_where_the_machine_sounds_20_db_quieter_moves_its_off_level(
    tmp_path: Path,
) -> None:
    """The microphone moved away from the machine (README: "Moved the microphone? calibrate"):
    the calibrated bundle kept the off level of training, so at the new place the machine
    running was `off` and its fault raised nothing. The site's running level now sets it."""
    rate = load_bundle(DEMO_BUNDLE).features.samplerate
    far = tmp_path / "far"
    far.mkdir()
    for f in NORMAL_FILES:
        sf.write(far / f"{f.stem}.wav", 0.1 * read_audio(f, rate), rate, subtype="FLOAT")
    fault = tmp_path / "fault-far.wav"
    sf.write(fault, 0.1 * read_audio(DEMO_CLIP, rate), rate, subtype="FLOAT")
    near, out = tmp_path / "near.bundle", tmp_path / "far.bundle"
    cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(near))
    proc = cli("calibrate", str(near), "--normal", str(far), "--out", str(out))
    trained, site = load_bundle(near).manifest.machine, load_bundle(out).manifest.machine
    assert trained is not None and site is not None
    assert trained.off_below_dbfs is not None and site.off_below_dbfs is not None
    assert site.off_below_dbfs == pytest.approx(trained.off_below_dbfs - 20, abs=1.5)
    assert "the machine runs 20 dB quieter here than in training" in proc.stderr
    replay = cli("replay", str(out), str(fault), env={"SOUNDSENTRY_DATA_DIR": str(tmp_path)})
    assert any(json.loads(line)["type"] == "start" for line in replay.stdout.splitlines())
    assert "machine off" not in replay.stderr


def test_calibrating_on_the_empty_room_says_the_model_took_it_for_the_machine_off(
    tmp_path: Path,
) -> None:
    """Calibrated on the room with the machine off (30 dB down, another sound), the bundle took
    it for a microphone moved away, said only that the machine "runs 27 dB quieter here", and
    raised an event on every normal clip after (a field review). Its level cannot tell a gain
    from the machine off, so the line says what the trained model heard: the machine off."""
    rate = load_bundle(DEMO_BUNDLE).features.samplerate
    room = tmp_path / "room.wav"
    noise = np.random.default_rng(3).standard_normal(40 * rate)
    level = np.sqrt(np.mean(read_audio(NORMAL_FILES[0], rate) ** 2)) * 10 ** (-30 / 20)
    sf.write(room, (level * noise).astype(np.float32), rate, subtype="FLOAT")
    near, out = tmp_path / "near.bundle", tmp_path / "room.bundle"
    cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(near))
    proc = cli("calibrate", str(near), "--normal", str(room), "--out", str(out))
    line = next(x for x in proc.stderr.splitlines() if "dB quieter here" in x)
    assert "the model as trained takes most of this audio for the machine off" in line, line


def test_silence_and_the_machine_off_in_the_training_audio_leave_its_off_level_alone(
    tmp_path: Path,
) -> None:
    """A silent lead-in, or the machine switched off for a while, put the off level 10 dB
    below the quietest 1 % of all windows: below the silence itself (-130 dBFS), so `off` was
    never recognised. Now such windows are left out, and a warning says so."""
    from edge.machine_state import machine_profile

    p = load_bundle(DEMO_BUNDLE).features
    running = [read_audio(f, p.samplerate) for f in NORMAL_FILES]
    clean = machine_profile(running, p)
    rng = np.random.default_rng(1)
    lead_in = np.zeros(3 * p.samplerate, np.float32)
    switched_off = (1e-4 * rng.standard_normal(4 * p.samplerate)).astype(np.float32)
    gaps = [lead_in, switched_off]
    messy = machine_profile([np.concatenate([gaps[i % 2], a]) for i, a in enumerate(running)], p)
    # within 3 dB: the windows that straddle a gap and the running machine are still heard
    assert messy["off_below_dbfs"] == pytest.approx(clean["off_below_dbfs"], abs=3.0)
    assert messy["running_level_dbfs"]["p50"] == pytest.approx(
        clean["running_level_dbfs"]["p50"], abs=1.0
    )


def test_a_dc_offset_is_no_sound() -> None:
    """Some USB interfaces add a DC offset: the level is that of the sound, not of the offset
    (with it a quiet room measured -10 dBFS and never counted as the machine off)."""
    from edge.health import level_dbfs

    tone = 0.01 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert level_dbfs(tone + 0.3) == pytest.approx(level_dbfs(tone), abs=0.01)


def test_a_feature_that_never_moved_in_training_is_given_the_floor_spread() -> None:
    """An int8 embedding dimension can sit on one value through all of training; without a
    floor a one-step change of it is a distance of about 1e12 (seen on the fan's held-out
    audio). With the floor at one step it counts as a one-spread change."""
    rng = np.random.default_rng(3)
    train = rng.normal(size=(200, 4))
    train[:, 3] = -4.0  # never moves
    step = 0.025
    held = np.zeros((1, 4))
    held[0, 3] = -4.0 + step
    # without the step's floor, the least spread any feature gets (float rounding had made it
    # 1e12): the change counts 2.5 spreads, of a feature known only to a step
    assert fit_statistics(train).std[3] == pytest.approx(MIN_FEATURE_STD)
    floored = fit_statistics(train, std_floor=step)
    assert floored.std[3] == pytest.approx(step, rel=1e-3)
    assert floored.distance(held)[0] < 10
    np.testing.assert_allclose(floored.std[:3], train[:, :3].std(axis=0), rtol=1e-4)


def test_calibrating_on_a_site_recording_half_off_keeps_the_off_level_and_threshold(
    tmp_path: Path,
) -> None:
    """A site recording with the machine stopped for more than half of it: the median level was
    the room's, so no window was left out; the off level went below the room's
    (the device would never tell `off` again, and scored the empty room as running) and the
    threshold was set on the room too."""
    rate = load_bundle(DEMO_BUNDLE).features.samplerate
    rng = np.random.default_rng(1)
    site, whole = tmp_path / "site", tmp_path / "whole"
    site.mkdir()
    whole.mkdir()
    for n, f in enumerate(NORMAL_FILES):
        fan = read_audio(f, rate)
        room = (10 ** (-70 / 20) * rng.standard_normal(3 * len(fan) // 2)).astype(np.float32)
        sf.write(site / f"{n}.wav", np.concatenate([fan, room]), rate, subtype="FLOAT")
        sf.write(whole / f"{n}.wav", fan, rate, subtype="FLOAT")
    base, half, full = (tmp_path / f"{n}.bundle" for n in ("base", "half", "full"))
    cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(base))
    proc = cli("calibrate", str(base), "--normal", str(site), "--out", str(half))
    cli("calibrate", str(base), "--normal", str(whole), "--out", str(full))
    on_off, running = load_bundle(half).manifest, load_bundle(full).manifest
    assert on_off.machine is not None and running.machine is not None
    assert on_off.machine.off_below_dbfs == pytest.approx(running.machine.off_below_dbfs, abs=3)
    assert on_off.machine.off_below_dbfs > -65, "above the empty room (-70 dBFS)"
    assert "the calibration leaves them out" in proc.stderr
    # the windows where it stops (a sudden drop: a high fluctuation) are running to the device
    assert on_off.threshold.value < 1.3 * running.threshold.value


def test_calibrating_a_machine_that_idles_most_of_the_time_keeps_idle_running(
    tmp_path: Path,
) -> None:
    """A machine that idles 24 dB below its loaded level for most of the time (a compressor
    between cycles): calibration must neither call idle `off` nor leave it out of the refit,
    or the device never scores the state the machine spends its days in."""
    rate = 16000
    rng = np.random.default_rng(3)

    def cycle(seconds_idle: float, seconds_loaded: float) -> np.ndarray:
        idle = 10 ** (-48 / 20) * rng.standard_normal(int(seconds_idle * rate))
        loaded = 10 ** (-24 / 20) * rng.standard_normal(int(seconds_loaded * rate))
        return np.concatenate([idle, loaded]).astype(np.float32)

    for name in ("train", "site"):
        (tmp_path / name).mkdir()
        for i in range(4):
            sf.write(tmp_path / name / f"{i}.wav", cycle(17, 3), rate, subtype="FLOAT")
    base, site = tmp_path / "base.bundle", tmp_path / "site.bundle"
    cli("train", "--normal", str(tmp_path / "train"), "--out", str(base))
    proc = cli("calibrate", str(base), "--normal", str(tmp_path / "site"), "--out", str(site))
    machine = load_bundle(site).manifest.machine
    assert machine is not None and machine.off_below_dbfs is not None
    assert machine.off_below_dbfs < -52, "idle (-48 dBFS) is running"
    assert "the calibration leaves them out" not in proc.stderr, proc.stderr


def test_a_dropout_in_the_training_audio_is_left_out_as_the_device_leaves_it(
    tmp_path: Path,
) -> None:
    """The device never scores a window holding a dropout, but training fitted and set the
    threshold on them: a second of zeros in one held-out stretch lifted the threshold
    twentyfold, and no fault could pass it (a review's reproduction)."""
    from train.fluctuation import train_fluctuation

    clean, glitched = tmp_path / "clean", tmp_path / "glitched"
    clean.mkdir()
    glitched.mkdir()
    fan = np.concatenate([read_audio(f, 16000) for f in NORMAL_FILES])
    for i in range(10):  # ten 10-s recordings: numbers 4 and 9 are held out whole
        audio = np.roll(fan, i * 16000 // 3)[: 10 * 16000]
        sf.write(clean / f"{i}.wav", audio, 16000, subtype="FLOAT")
        if i == 4:
            audio = audio.copy()
            audio[5 * 16000 : 6 * 16000] = 0.0
        sf.write(glitched / f"{i}.wav", audio, 16000, subtype="FLOAT")
    thresholds = [
        load_bundle(train_fluctuation([str(d)], tmp_path / f"{d.name}.bundle")).threshold
        for d in (clean, glitched)
    ]
    assert thresholds[1] == pytest.approx(thresholds[0], rel=0.25), thresholds
