"""Kind `embedding`: a self-supervised int8 CNN embedding scored by a numpy Mahalanobis head."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import ANOMALOUS_FILE, NORMAL_FILES, ROOT

from edge.audio_io import read_audio
from edge.bundle import load_bundle
from edge.detectors.registry import plugin_for
from edge.errors import AudioError, BundleError
from edge.features import FeatureParams, windows_of
from edge.machine_state import machine_profile
from soundsentry.cli import main
from train.embedding import (
    CORPUS_FILE,
    TEMPORAL_KERNELS,
    augment_window,
    corpus_machines_heard,
    fill_edge,
    load_corpus,
    read_own,
    shift_bands,
    train_embedding,
)

MAX_MODEL_BYTES = 256 * 1024
TINY_EPOCH = 512
"""Windows per epoch in the tests (the default is 4096): enough to separate the fixture fault."""
STATES = {"idle": NORMAL_FILES[:2], "loaded": NORMAL_FILES[2:]}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny epochs on the fixture audio, given as two state folders."""
    root = tmp_path_factory.mktemp("emb")
    for state, files in STATES.items():
        (root / "states" / state).mkdir(parents=True)
        for f in files:
            (root / "states" / state / f.name).symlink_to(f)
    out = root / "emb.bundle"
    return train_embedding(
        None, out, states=root / "states", epochs=2, epoch_windows=TINY_EPOCH, seed=3
    )


def test_train_command_sends_state_folders_to_the_embedding_trainer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process, so TensorFlow is not imported again: the real trainer refuses a folder
    without state subfolders, and a kind that takes no state folders refuses them."""
    out = str(tmp_path / "b.bundle")
    assert main(["train", "--normal-states", str(tmp_path / "none"), "--out", out]) == 1
    assert "one subfolder per state" in capsys.readouterr().err
    args = ["train", "--normal-states", str(tmp_path), "--detector", "ensemble", "--out", out]
    assert main(args) == 1
    assert "not ensemble" in capsys.readouterr().err


def test_all_channels_are_training_views_and_the_autoencoder_refuses_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each channel of a 4-channel recording is a view (held out with its recording); the
    autoencoder, which reads one channel, says so in one line instead of ignoring the flag."""
    rng = np.random.default_rng(1)
    for i in range(2):
        sf.write(
            tmp_path / f"array{i}.wav",
            0.05 * rng.standard_normal((80000, 4)),
            16000,
            format="WAVEX",
            subtype="PCM_16",
        )
    out = tmp_path / "multi.bundle"
    train_embedding([tmp_path], out, epochs=1, epoch_windows=TINY_EPOCH, all_channels=True)
    m = load_bundle(out).manifest
    # 2 recordings of 5 s, 4 channels each: every view keeps its last fifth aside, and the
    # manifest counts the recordings' seconds (all of them, 2 s held out), not the views'.
    assert (m.training.seconds, m.training.holdout_seconds) == pytest.approx((10.0, 2.0))
    assert m.threshold.params["holdout_seconds"] == pytest.approx(2.0)  # not 4 channels' worth
    assert m.training.channel == -2
    args = ["train", "--normal", str(tmp_path), "--all-channels", "--out", str(out)]
    assert main([*args, "--detector", "autoencoder"]) == 1
    assert "the autoencoder and the classifier read one channel" in capsys.readouterr().err


EDGE_SCRIPT = r"""
import json, sys
import numpy as np
from edge.audio_io import read_audio
from edge.bundle import load_bundle
from edge.calibrate import calibrate_bundle
from edge.features import windows_of
from edge.scoring import Scorer

bundle_path, out, normal, anomalous = sys.argv[1], sys.argv[2], sys.argv[3:-1], sys.argv[-1]
b = load_bundle(bundle_path)
scorer = Scorer.from_bundle(b)
p = b.features
held = []
for f in normal:
    audio = read_audio(f, p.samplerate)
    held += list(scorer.score_many(windows_of(audio[int(0.8 * len(audio)):], p)))
anom = scorer.score_many(windows_of(read_audio(anomalous, p.samplerate), p))
one = scorer.score(windows_of(read_audio(anomalous, p.samplerate), p)[0])
calibrate_bundle(bundle_path, normal[:2], out)
print(json.dumps({
    "held": held, "anomalous": anom.tolist(), "band_error": one.band_error.tolist(),
    "heavy": sorted(m for m in ("tensorflow", "keras") if m in sys.modules),
}))
"""


def test_calibrating_at_another_level_moves_the_network_s_input_with_it(
    bundle: Path, tmp_path: Path
) -> None:
    """`calibrate` at a site 10 dB louder (another gain, a microphone moved closer) re-centred
    the head but fed the network inputs offset by four of a band's spreads, which its filters
    do not cancel: on the fan, clip AUC 0.89 -> 0.86 at +10 dB and 0.69 at -10 dB (in a
    review). The input moves with the site's level; a gain then changes no score."""
    from edge.calibrate import calibrate_bundle
    from edge.scoring import Scorer

    rate = load_bundle(bundle).features.samplerate
    sites = {}
    for name, gain_db in (("same", 0.0), ("louder", 10.0)):
        site = tmp_path / name
        site.mkdir()
        for f in NORMAL_FILES[:3]:
            audio = read_audio(f, rate) * 10 ** (gain_db / 20)
            sf.write(site / f"{f.stem}.wav", audio, rate, subtype="FLOAT")
        sites[name] = load_bundle(calibrate_bundle(bundle, [site], tmp_path / f"{name}.bundle"))
    same, louder = sites["same"], sites["louder"]
    moved = louder.array("normalization.mean") - same.array("normalization.mean")
    assert np.allclose(moved, 10.0, atol=0.05)
    assert louder.threshold == pytest.approx(same.threshold, rel=1e-3)
    fault = windows_of(read_audio(ANOMALOUS_FILE, rate), louder.features)
    loud_fault = windows_of(read_audio(ANOMALOUS_FILE, rate) * 10**0.5, louder.features)
    assert np.allclose(
        Scorer.from_bundle(louder).score_many(loud_fault),
        Scorer.from_bundle(same).score_many(fault),
        rtol=1e-2,
    )


def test_edge_scores_and_calibrates_without_tensorflow(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "site.bundle"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            EDGE_SCRIPT,
            str(bundle),
            str(out),
            *map(str, NORMAL_FILES),
            str(ANOMALOUS_FILE),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["heavy"] == []
    assert len(r["band_error"]) == 64 and min(r["band_error"]) >= 0
    # Held-out normal windows (the last 20 % of every file, never trained on) against the fault
    # clip: every fault window scores above every held-out normal one.
    assert min(r["anomalous"]) > max(r["held"]), r
    site = load_bundle(out)
    assert site.manifest.kind == "embedding"
    assert site.manifest.calibration is not None
    assert site.threshold > 0
    assert "leave one file out" in site.manifest.normal_scores.source


def test_the_same_seed_gives_the_same_network_whatever_order_the_files_come_in(
    tmp_path: Path,
) -> None:
    """Files named one by one kept the order they were given in, which sets the windows' order,
    the sampler's pool and the batches: `--normal a b` and `--normal b a` with the same --seed
    gave two networks and two thresholds (2.43 and 2.21; 38 and 66 on five MIMII clips)."""
    models = [
        load_bundle(
            train_embedding(files, tmp_path / f"{i}.bundle", epochs=1, epoch_windows=256, seed=5)
        )
        for i, files in enumerate((NORMAL_FILES, NORMAL_FILES[::-1]))
    ]
    # (the model files of two trainings in one process differ in Keras's layer names only)
    assert models[0].threshold == models[1].threshold
    for name, array in models[0].arrays.items():
        assert np.array_equal(array, models[1].arrays[name]), name


def test_evaluate_float_is_refused_for_a_head_fitted_on_int8_embeddings(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`evaluate --float` scored the float network's embeddings with the head fitted on the int8
    network's: the bundle's own training audio scored 20 times higher, every normal file raised
    an event, and the "float reference" looked far worse than int8 (a review)."""
    args = ["evaluate", str(bundle), "--normal", str(NORMAL_FILES[0]), "--anomalous"]
    assert main([*args, str(ANOMALOUS_FILE), "--float"]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("soundsentry: error: --float cannot evaluate") and "int8" in line


def test_bundle_holds_a_small_int8_network_and_its_head(bundle: Path) -> None:
    b = load_bundle(bundle)
    m = b.manifest
    assert m.kind == "embedding" and plugin_for(m).needs_model
    assert (bundle / "model_int8.tflite").stat().st_size <= MAX_MODEL_BYTES
    assert b.model is not None
    assert b.model.input_dtype == np.int8 and b.model.output_dtype == np.int8
    dim = b.model.output_size
    assert dim == b.features.n_mels * len(TEMPORAL_KERNELS)  # each band's log energy per filter
    assert b.array("statistics.precision").shape == (dim, dim)
    assert m.validation is not None and m.validation["states"] == list(STATES)
    # the fixture fan's recordings are clips of the corpus's fan id_00: it is left out, and
    # the other machines are there to be told apart from
    corpus = m.validation["corpus_machines"]
    assert "fan_id00" not in corpus and {"pump_id00", "valve_id00"} <= set(corpus)
    assert m.threshold.value > max(0.0, m.normal_scores.p50)
    scorer = plugin_for(m).scorer(b)
    # the head that set the threshold ships: it never saw the held-out audio, and scores it
    # as the manifest says (a head refitted on all of it shipped, whose scores of unheard
    # audio were not those the threshold was set on)
    assert not m.training.refit_on_all()
    own = read_own(STATES, b.features, 0)  # the held-out windows, as training took them
    scores = scorer.score_many(np.concatenate(own.running(own.held_windows)))
    assert len(scores) == m.normal_scores.n_windows
    assert scores.max() == pytest.approx(m.normal_scores.max, rel=1e-6)
    assert np.median(scores) == pytest.approx(m.normal_scores.p50, rel=1e-6)
    # One window at a time (the daemon) and a stack (evaluate) give the same scores, and both
    # are the Mahalanobis distance of the standardised embedding, written out here.
    windows = windows_of(read_audio(ANOMALOUS_FILE, 16000), b.features)[:3]
    one = [scorer.score(w).score for w in windows]
    np.testing.assert_allclose(one, scorer.score_many(windows), rtol=1e-9)
    e = scorer.embed(windows[0])
    z = (e - b.array("statistics.feature_mean")) / b.array("statistics.feature_std")
    z -= b.array("statistics.center")
    by_hand = (
        sum(
            z[i] * b.array("statistics.precision")[i, j] * z[j]
            for i in range(dim)
            for j in range(dim)
        )
        / dim
    )
    assert one[0] == pytest.approx(by_hand, rel=1e-9)


def test_check_refuses_a_head_of_the_wrong_width(bundle: Path) -> None:
    b = load_bundle(bundle)
    b.arrays["statistics.center"] = np.zeros(b.model.output_size + 1)
    with pytest.raises(BundleError, match=r"statistics\.center"):
        plugin_for(b.manifest).check(b)


def test_corpus_is_small_licensed_and_excludes_the_machine_under_test() -> None:
    assert CORPUS_FILE.stat().st_size <= 5 * 1024 * 1024
    readme = (CORPUS_FILE.parent / "README.md").read_text()
    assert "CC BY-SA 4.0" in readme and "Purohit" in readme
    # the licence's text travels with the adaptation (CC BY-SA 4.0, section 3(a)(1)(C))
    assert "creativecommons.org/licenses/by-sa/4.0" in readme
    assert "Attribution-ShareAlike 4.0" in (ROOT / "LICENSES" / "CC-BY-SA-4.0.txt").read_text()
    params = FeatureParams()
    full = load_corpus(params)
    assert not any(m.lower().startswith(("toycar", "toyconveyor")) for m in full.machines)
    cut = load_corpus(params, exclude=["fan/id_00", "Pump_ID04"])
    assert set(full.names) - set(cut.names) == {"fan_id00", "pump_id04"}
    assert all(s.shape[1] == params.n_mels for s in cut.sequences)
    with pytest.raises(ValueError, match="no corpus machine"):
        load_corpus(params, exclude=["fan_id99"])


def test_augmentations_do_what_their_names_say() -> None:
    frames, mels = 30, 8
    ramp = np.tile(np.arange(200, dtype=np.float32)[:, None], (1, mels))  # value = frame index
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = augment_window(ramp, frames, 1, rng)  # stretch: steps of rate != 1 frames
        assert w is not None
        step = float(np.diff(w[:, 0]).mean())
        assert 1.1 < step < 1.45 or 1 / 1.45 < step < 1 / 1.1
        w = augment_window(ramp, frames, 0, rng)  # none: steps of exactly one frame
        assert w is not None
        np.testing.assert_allclose(np.diff(w[:, 0]), 1.0, atol=1e-5)
    bands = np.tile(np.arange(mels, dtype=np.float32), (frames, 1))  # value = band index
    np.testing.assert_array_equal(shift_bands(bands, 2)[0], [0, 0, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(shift_bands(bands, -1)[0], [1, 2, 3, 4, 5, 6, 7, 7])
    np.testing.assert_array_equal(fill_edge(bands, -2)[0], [0, 1, 2, 3, 4, 5, 5, 5])
    assert augment_window(ramp[:30], frames, 1, rng) is None  # too short to stretch


def test_a_state_folder_named_off_trains_the_network_but_not_the_head(tmp_path: Path) -> None:
    """The place with the machine stopped (here a quiet hiss, 20 dB under the fan) is the
    state `off`: the network learns it as a state and the edge can name it, but the head's
    held-out scores, the threshold and the running level come from the running state alone."""
    rate = 16000
    running = tmp_path / "states" / "running"
    off = tmp_path / "states" / "off"
    running.mkdir(parents=True)
    off.mkdir()
    fan = np.concatenate([read_audio(f, rate) for f in NORMAL_FILES[:2]])  # one recording
    sf.write(running / "fan.wav", fan, rate, subtype="FLOAT")
    hiss = np.random.default_rng(2).standard_normal(len(fan) // 2) * np.std(fan) / 10
    sf.write(off / "hiss.wav", hiss, rate, subtype="FLOAT")
    out = train_embedding(
        None, tmp_path / "b.bundle", states=tmp_path / "states", epochs=1,
        epoch_windows=TINY_EPOCH,
    )  # fmt: skip
    m = load_bundle(out).manifest
    assert m.machine.states == ["off", "running"]
    from edge.advice import bundle_summary

    lines = bundle_summary(m).splitlines()  # the summary `train` prints
    assert lines[1] == (
        "states: off 5 s, running 10 s (`off`: the machine stopped; it teaches the network, "
        "not the threshold)"
    ), lines
    # the advice counts the audio that backs the threshold: the running state's, not `off`'s
    assert any(line.startswith("warning: only 10 s of the machine running;") for line in lines)
    # and its recordings: the machine ran in one of the two
    assert m.validation["state_recordings"] == {"off": 1, "running": 1}
    assert any(line.startswith("advice: all the audio is one recording") for line in lines)
    alone = read_own({"running": [running / "fan.wav"]}, FeatureParams(), 0)
    held = sum(len(w) for w in alone.held_windows)
    assert m.normal_scores.n_windows == held
    # the input is standardised by the machine running: `off` (a hiss 20 dB down, a neighbour)
    # had widened the spreads and squeezed the running windows into a few int8 steps
    running_frames = np.concatenate([f for _, f in alone.train_frames])
    mean = load_bundle(out).array("normalization.mean")
    np.testing.assert_allclose(mean, running_frames.mean(axis=0), atol=1e-3)
    expected = machine_profile(alone.audio, FeatureParams())["running_level_dbfs"]["p01"]
    assert m.machine.running_level_dbfs["p01"] == pytest.approx(expected)
    only_off = tmp_path / "only-off"
    (only_off / "off").mkdir(parents=True)
    (only_off / "off" / "hiss.wav").symlink_to(off / "hiss.wav")
    with pytest.raises(AudioError, match="only the `off` state: record the machine running"):
        train_embedding(None, tmp_path / "c.bundle", states=only_off, epochs=1)


def test_one_state_folder_is_named_as_the_user_named_it(tmp_path: Path) -> None:
    """`--normal-states` with one folder (`fast/`, no `off/`) stored no state names, so the
    edge said `running` where the README says it names the state it hears."""
    from edge.pipeline import Pipeline

    fast = tmp_path / "states" / "fast"
    fast.mkdir(parents=True)
    for f in NORMAL_FILES:
        (fast / f.name).symlink_to(f)
    out = train_embedding(
        None, tmp_path / "one.bundle", states=tmp_path / "states", epochs=1,
        epoch_windows=TINY_EPOCH,
    )  # fmt: skip
    bundle = load_bundle(out)
    assert bundle.manifest.machine.states == ["fast"]
    pipeline = Pipeline(bundle)
    steps = pipeline.push(read_audio(NORMAL_FILES[0], 16000))
    assert steps and {s.state_name for s in steps} == {"fast"}


def test_state_folders_are_checked_before_anything_is_trained(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """From a review: a 2-s state beside `off` trained a bundle whose threshold came from its
    own training windows (events on 3 of 3 normal clips); `Off` counted as a running state; an
    empty folder vanished without a word; a name the manifest cannot carry failed after the
    whole training."""
    from train.embedding import state_folders

    def states(layout: dict[str, list[Path]]) -> Path:
        root = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        for name, files in layout.items():
            (root / name).mkdir(parents=True)
            for f in files:
                (root / name / f.name).symlink_to(f)
        return root

    short = tmp_path / "two-seconds.wav"
    sf.write(short, read_audio(NORMAL_FILES[0], 16000)[: 2 * 16000], 16000)
    with pytest.raises(AudioError, match=r"2\.0 s of normal audio is too little"):
        state_folders(states({"tiny": [short], "off": list(NORMAL_FILES)}), 16000)
    groups = state_folders(states({"full": list(NORMAL_FILES[:2]), "Off": [NORMAL_FILES[2]]}))
    assert list(groups) == ["full", "off"]  # the machine-off state, whatever its case
    # a recording copied into two states: held out in one, it was fitted in the other
    copied = states({"fast": list(NORMAL_FILES[:3]), "slow": list(NORMAL_FILES[2:])})
    assert state_folders(copied)["slow"] == [copied / "slow" / NORMAL_FILES[3].name]
    with pytest.raises(AudioError, match="every recording of the state 'slow' is a copy"):
        state_folders(states({"fast": list(NORMAL_FILES[:3]), "slow": [NORMAL_FILES[2]]}))
    with pytest.raises(AudioError, match="a second folder for the state 'off'"):
        state_folders(states({"full": list(NORMAL_FILES[:2]), "OFF": [short], "off": [short]}))
    root = states({"full": list(NORMAL_FILES[:2]), "slow": [NORMAL_FILES[2]], "fast": []})
    assert list(state_folders(root)) == ["full", "slow"]
    said = [r.getMessage() for r in caplog.records]
    assert f"{root / 'fast'} holds no audio: it is not a state" in said
    assert any(m.startswith("state slow: only 5.0 s of audio") for m in said)
    rng = np.random.default_rng(5)
    for name, seconds in (("long.wav", 50), ("brief.wav", 11)):
        sf.write(tmp_path / name, rng.standard_normal(seconds * 16000) * 0.1, 16000)
    state_folders(states({"high": [tmp_path / "long.wav"], "idle": [tmp_path / "brief.wav"]}))
    (uneven,) = [r.getMessage() for r in caplog.records if "against" in r.getMessage()]
    assert uneven.startswith("state idle: 11 s of audio against 50 s") and "as much" in uneven
    bad = states({"vitesse réduite": list(NORMAL_FILES)})
    with pytest.raises(AudioError, match="vitesse réduite: a state folder's name is the state's"):
        state_folders(bad)
    bad = states({"leerlauf-ä": list(NORMAL_FILES)})  # `ä` is a letter to its user: which are not
    with pytest.raises(AudioError, match="messages: the letters A-Z and a-z, digits"):
        state_folders(bad)


def test_state_folders_leave_out_what_gives_no_window_and_name_every_bad_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """From a review: a 50-ms recording in a state gave it no band level (NaN), and the bundle
    was written and then refused; a folder of notes with a name no state may have stopped the
    training; unusable files were named one state at a time; a state whose recordings were too
    short to hold any out was left out of the threshold without a word."""
    from train.embedding import read_own, state_folders

    rate, rng = 16000, np.random.default_rng(3)
    root = tmp_path / "states"
    for state, lengths in (("high", [12.0]), ("idle", [4.0, 4.0, 4.0, 0.05])):
        (root / state).mkdir(parents=True)
        for i, seconds in enumerate(lengths):
            sf.write(
                root / state / f"{i}.wav", rng.standard_normal(int(seconds * rate)) * 0.1, rate
            )
    (root / "notes (old)").mkdir()
    (root / "notes (old)" / "readme.txt").write_text("recorded on Monday")
    groups = state_folders(root, rate)
    assert list(groups) == ["high", "idle"] and len(groups["idle"]) == 3
    said = [r.getMessage() for r in caplog.records]
    assert any("1 recording(s) shorter than one 1-s window left out" in m for m in said), said
    own = read_own(groups, FeatureParams(), 0)
    assert own.held_windows and own.state_levels()["machine.state_levels"].shape[0] == 2
    (warned,) = [r.getMessage() for r in caplog.records if "none of its audio" in r.getMessage()]
    assert warned.startswith("state idle: none of its audio could be held out (3 recording(s)")
    # every unusable file at once, whatever its state
    (root / "high" / "broken.wav").write_bytes(b"RIFF junk")
    sf.write(root / "idle" / "phone.wav", rng.standard_normal(8000 * 12) * 0.1, 8000)
    with pytest.raises(AudioError) as refused:
        state_folders(root, rate)
    assert "broken.wav" in str(refused.value) and "phone.wav" in str(refused.value)
    (root / "idle" / "phone.wav").unlink()
    (root / "high" / "broken.wav").unlink()
    for f in (root / "idle").glob("[0-2].wav"):
        f.unlink()
    with pytest.raises(AudioError, match="every recording of the state 'idle' is shorter than"):
        state_folders(root, rate)


def test_an_output_that_sat_still_in_training_cannot_set_the_threshold_alone() -> None:
    """An embedding output over a band the recordings leave empty sits at one value in
    training; the first sound in that band (a door in the held-out audio) moved it 100 int8
    steps and scored 874 against ~1 for normal windows, so the threshold went to 1674 and no
    fault reached it. Its spread is floored at half the median output's."""
    from train.embedding import RELATIVE_STD_FLOOR, std_floor
    from train.statistics import fit_statistics

    rng = np.random.default_rng(0)
    step = 0.03
    fit = np.round(rng.normal(0, 0.4, (400, 16)) / step) * step
    fit[:, 0] = -4.5  # a still output
    floor = std_floor(fit, step)
    assert floor == pytest.approx(RELATIVE_STD_FLOOR * np.median(fit.std(axis=0)))
    door = fit[:1].copy()
    door[0, 0] += 100 * step
    normal = fit[1:2]
    distance = fit_statistics(fit, std_floor=floor).distance
    assert distance(door)[0] < 100 * max(distance(normal)[0], 1.0)
    assert fit_statistics(fit, std_floor=step).distance(door)[0] > 500  # the old floor
    assert std_floor(fit[:, 1:], step) == pytest.approx(
        RELATIVE_STD_FLOOR * np.median(fit[:, 1:].std(axis=0))
    )


def test_a_steady_tonal_machine_trains_and_its_fault_raises_an_event(tmp_path: Path) -> None:
    """A clean hum with harmonics (a transformer, a compressor's motor): the int8 range set on
    augmented windows left its running a step or two of int8 input, every embedding came out
    the same, and training stopped with "the normal audio's features do not vary"."""
    import soundfile as sf
    from conftest import cli

    rng, rate = np.random.default_rng(1), 16000
    t = np.arange(10 * rate) / rate
    hum = 0.1 * (np.sin(2 * np.pi * 120 * t) + 0.5 * np.sin(2 * np.pi * 360 * t)
                 + 0.3 * np.sin(2 * np.pi * 1200 * t))  # fmt: skip
    folder = tmp_path / "normal"
    folder.mkdir()
    for k in range(6):
        noise = 0.003 * rng.standard_normal(len(t))
        sf.write(folder / f"{k}.wav", (hum + noise).astype(np.float32), rate)
    new = folder / "5.wav"
    new.rename(tmp_path / "new.wav")  # a recording it never trains on
    fault = hum * (1 + 0.3 * np.sin(2 * np.pi * 7 * t)) + 0.02 * np.sin(2 * np.pi * 2900 * t)
    fault += 0.003 * rng.standard_normal(len(t))
    sf.write(tmp_path / "fault.wav", fault.astype(np.float32), rate)
    model = tmp_path / "hum.bundle"
    cli("train", "--normal", str(folder), "--detector", "embedding", "--epochs", "2",
        "--out", str(model))  # fmt: skip
    env = {"SOUNDSENTRY_DATA_DIR": str(tmp_path / "data")}
    quiet = cli("replay", str(model), str(tmp_path / "new.wav"), env=env)
    loud = cli("replay", str(model), str(tmp_path / "fault.wav"), env=env)
    assert '"type": "start"' not in quiet.stdout and '"type":"start"' not in quiet.stdout
    assert '"type": "start"' in loud.stdout or '"type":"start"' in loud.stdout


def test_state_folders_skip_hidden_folders_and_name_loose_recordings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A USB stick's `.Trashes` folder stopped training with "rename the folder", and a
    recording left in the root (an earlier `record --out` there) was ignored without a word."""
    from train.embedding import state_folders

    root = tmp_path / "pump"
    for name, files in {"low": NORMAL_FILES[:2], "off": NORMAL_FILES[2:3], ".Trashes": []}.items():
        (root / name).mkdir(parents=True)
        for f in files:
            (root / name / f.name).symlink_to(f)
    (root / "20261202T100000-0000.wav").symlink_to(NORMAL_FILES[0])
    assert list(state_folders(root)) == ["low", "off"]
    said = [r.getMessage() for r in caplog.records]
    assert any("1 audio file(s) directly in it are not in a state's folder" in m for m in said)


def test_a_corpus_machine_whose_clips_are_the_user_s_recordings_is_left_out() -> None:
    """Someone trying SoundSentry on MIMII files (the fixture fan is MIMII fan id_00, which
    the corpus holds): the network was asked to tell the machine apart from itself."""
    params = FeatureParams()
    corpus = load_corpus(params)
    own = read_own({"normal": list(NORMAL_FILES)}, params, 0)
    assert corpus_machines_heard(own, corpus, params) == ["fan_id00"]
    for a in own.audio:  # the same fan a few milliseconds later is no clip of the corpus
        a[:] = np.roll(a, 100)
    assert corpus_machines_heard(own, corpus, params) == []


def test_a_dropout_leaves_no_frame_of_nothing_in_the_network_s_training_frames(
    tmp_path: Path,
) -> None:
    """The CNN trains on continuous frame sequences: one second of digital zeros in a minute's
    recording (a USB glitch) put 31 frames at the log floor among them, which the device never
    scores; in a review they raised the mean band spread of the standardisation from 2.1 to
    11 dB. The sequences are now cut around the dropout."""
    from edge.health import heard_pieces

    rate = 16000
    fan = np.concatenate([read_audio(f, rate) for f in NORMAL_FILES[:3]])
    cut = 4 * rate
    dropped = fan.copy()
    dropped[cut : cut + rate] = 0.0  # the same length: the same held-out split
    sf.write(tmp_path / "dropout.wav", dropped, rate, subtype="FLOAT")
    sf.write(tmp_path / "clean.wav", fan, rate, subtype="FLOAT")
    params = FeatureParams()

    def train_frames(name: str) -> np.ndarray:
        own = read_own({"s": [tmp_path / name]}, params, 0)
        return np.concatenate([f for _, f in own.train_frames])

    frames = {name: train_frames(name) for name in ("dropout.wav", "clean.wav")}
    floor = 10 * np.log10(params.amin)
    assert frames["dropout.wav"].min() > floor + 20, "a frame of the dropout's zeros remains"
    # nothing heard is lost: every frame of the clean audio but those touching the dropout
    lost = len(frames["clean.wav"]) - len(frames["dropout.wav"])
    hops = rate // params.hop_length
    assert hops <= lost <= hops + params.n_fft // params.hop_length, lost
    spread = {name: f.std(axis=0).mean() for name, f in frames.items()}
    assert spread["dropout.wav"] == pytest.approx(spread["clean.wav"], rel=0.05), spread
    # the pieces: a run of an STFT hop of zeros splits a signal, a shorter one does not
    a, b = np.ones(100, np.float32), -np.ones(50, np.float32)
    run = params.hop_length
    pieces = heard_pieces(np.concatenate([a, np.zeros(run, np.float32), b]), run)
    assert [len(p) for p in pieces] == [100, 50]
    assert len(heard_pieces(np.concatenate([a, np.zeros(run - 1, np.float32), b]), run)) == 1
    assert [len(p) for p in heard_pieces(np.zeros(3 * run, np.float32), run)] == []
    assert [len(p) for p in heard_pieces(np.concatenate([np.zeros(run), a]), run)] == [100]


def test_training_warns_of_a_running_state_a_few_db_from_being_taken_for_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An `off` folder near a running state in level (a review's neighbouring pump, 7 dB louder
    than the fan) made the edge take the fan heard 4.5 dB louder for the machine off, and its
    faults with it, without a word at training. The margin is where the edge's own naming
    turns: checked against StateNamer, then the warning."""
    import logging
    from types import SimpleNamespace

    from edge.machine_state import StateNamer
    from train.embedding import _warn_off_near
    from train.states import OFF_MARGIN_DB, off_margins

    rng = np.random.default_rng(3)
    fan = rng.normal(-50.0, 6.0, 64)
    for off, way in ((fan + 7.0 + rng.normal(0, 3, 64), "louder"), (fan - 30.0, "quieter")):
        levels = np.stack([fan, off])
        ((name, shift, said),) = off_margins(levels, ["full", "off"])
        assert (name, said) == ("full", way)
        assert (shift < OFF_MARGIN_DB) == (way == "louder"), shift  # the review's, and 15 dB
        sign = 1.0 if way == "louder" else -1.0
        namer = StateNamer(["full", "off"], levels)
        assert namer.nearest(fan + sign * 0.99 * shift) == "full"
        assert namer.nearest(fan + sign * 1.01 * shift) == "off"
        own = SimpleNamespace(
            states=["full", "off"], state_levels=lambda lv=levels: {"machine.state_levels": lv}
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="train.embedding"):
            _warn_off_near(own)  # type: ignore[arg-type]
        warned = [r.getMessage() for r in caplog.records]
        if shift < OFF_MARGIN_DB:
            assert warned and warned[0].startswith(f"state full heard {shift:.1f} dB {way} than")
        else:
            assert not warned, warned
    assert off_margins(levels, ["full", "slow"]) == []  # no `off`: nothing to be taken for
