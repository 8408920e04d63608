"""Kind `ensemble`: members on a common scale from held-out normal audio, combined; the numpy
kinds, and the int8 CNN as the one network member."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ANOMALOUS_FILE, NORMAL_FILES, cli
from detector_helpers import bundle_windows, with_arrays, write_unchecked

from edge.bundle import load_bundle, write_bundle
from edge.detectors.ensemble import common_scale, member_view
from edge.errors import BundleError
from edge.scoring import Scorer
from train.ensemble import MEMBERS


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ensemble from the real command on three normal fixture files (the fourth is never
    seen in training)."""
    out = tmp_path_factory.mktemp("ensemble") / "fan.bundle"
    cli(
        "train", "--detector", "ensemble", "--normal", *map(str, NORMAL_FILES[:3]),
        "--out", str(out),
    )  # fmt: skip
    return out


def test_common_scale_is_the_median_and_mad_of_log_scores() -> None:
    center, spread = common_scale(np.exp(np.array([0.0, 1.0, 2.0, 3.0, 10.0])))
    assert center == pytest.approx(2.0) and spread == pytest.approx(1.4826)
    assert common_scale(np.ones(5))[1] > 0  # a member whose scores never move still divides


def test_score_is_the_mean_member_z_on_a_log_scale(trained: Path) -> None:
    """The ensemble's score against its members scored on their own, by hand."""
    bundle = load_bundle(trained)
    info = bundle.manifest.ensemble
    assert bundle.manifest.kind == "ensemble" and info is not None
    assert [m.kind for m in info.members] == list(MEMBERS)
    w = bundle_windows(trained, ANOMALOUS_FILE)
    z = []
    for m in info.members:
        alone = Scorer.from_bundle(member_view(bundle, m)).score_many(w)
        z.append((np.log(alone) - m.center) / m.spread)
    unit = np.mean([m.spread for m in info.members])
    expected = np.exp(np.mean(z, axis=0) * unit)
    scorer = Scorer.from_bundle(bundle)
    np.testing.assert_allclose(scorer.score_many(w), expected, rtol=1e-9)
    one = scorer.score(w[0])
    assert one.score == pytest.approx(expected[0])
    assert one.band_error.shape == (bundle.features.n_mels,) and np.all(one.band_error >= 0)


def test_the_fault_scores_above_unseen_normal_audio(trained: Path) -> None:
    scorer = Scorer.from_bundle(load_bundle(trained))
    normal = scorer.score_many(bundle_windows(trained, NORMAL_FILES[3]))
    fault = scorer.score_many(bundle_windows(trained, ANOMALOUS_FILE))
    assert np.median(fault) > normal.max(), (fault, normal)
    out = cli("replay", str(trained), str(ANOMALOUS_FILE)).stdout
    events = [json.loads(line) for line in out.splitlines()]
    assert any(e["type"] == "start" for e in events)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m["ensemble"]["members"][0].update(kind="autoencoder"), "not one of"),
        (lambda m: m["ensemble"]["members"][1].update(prefix="m0"), "share a prefix"),
        (lambda m: m.pop("ensemble"), "needs an `ensemble` section"),
        (lambda m: m["ensemble"]["members"][0].update(spread=0.0), "spread"),
    ],
)
def test_a_malformed_ensemble_is_refused(
    trained: Path, tmp_path: Path, change: object, match: str
) -> None:
    bundle = load_bundle(trained)
    manifest = bundle.manifest.model_dump(exclude={"files", "checksum", "arrays"})
    change(manifest)  # type: ignore[operator]
    with pytest.raises(BundleError, match=match):
        write_bundle(tmp_path / "bad.bundle", manifest, {}, bundle.arrays)
        load_bundle(tmp_path / "bad.bundle")


def test_a_member_with_wrong_arrays_is_refused(trained: Path, tmp_path: Path) -> None:
    new = {"m1.subspace.mean": np.zeros(3)}
    bad = with_arrays(trained, tmp_path / "bad.bundle", check=False, **new)
    with pytest.raises(BundleError, match=r"subspace\.mean"):
        load_bundle(bad)


def test_calibrate_refits_every_member_and_the_common_scale(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "site.bundle"
    site = [NORMAL_FILES[3], NORMAL_FILES[0]]
    cli("calibrate", str(trained), "--normal", *map(str, site), "--out", str(out))
    before, after = load_bundle(trained), load_bundle(out)
    assert after.manifest.kind == "ensemble" and after.manifest.calibration is not None
    assert not np.array_equal(
        after.array("m0.statistics.center"), before.array("m0.statistics.center")
    )
    assert not np.array_equal(after.array("m1.subspace.mean"), before.array("m1.subspace.mean"))
    old = [(m.center, m.spread) for m in before.manifest.ensemble.members]  # type: ignore[union-attr]
    new = [(m.center, m.spread) for m in after.manifest.ensemble.members]  # type: ignore[union-attr]
    assert new != old
    assert after.manifest.normal_scores.source.startswith("on-site")
    replayed = cli("replay", str(out), str(ANOMALOUS_FILE)).stdout.splitlines()
    assert any(json.loads(line)["type"] == "start" for line in replayed)  # still alarms
    fault = Scorer.from_bundle(after).score_many(bundle_windows(out, ANOMALOUS_FILE))
    assert np.median(fault) > 2 * after.manifest.normal_scores.p50  # two files: a wide tail


TINY_EPOCH = 512
"""Windows per epoch of the network member in these tests (the default is 4096)."""


def test_calibrating_an_ensemble_on_a_steady_signal_is_refused(
    trained: Path, tmp_path: Path
) -> None:
    """An ensemble's refit puts every member on the site's own scale, so its combined scores
    sat near 1 on a 997-Hz tone and calibrate took it: every window of the fan then scored
    above the threshold (in a review). Each member is judged on its own scale."""
    import soundfile as sf

    from edge.calibrate import calibrate_bundle
    from edge.errors import AudioError

    rate = load_bundle(trained).features.samplerate
    tone = 0.3 * np.sin(2 * np.pi * 997 * np.arange(20 * rate) / rate)
    tone += 1e-7 * np.random.default_rng(0).standard_normal(len(tone))  # a line's noise floor
    sf.write(tmp_path / "tone.wav", tone, rate, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"the site's normal audio scores .* it hardly varies"):
        calibrate_bundle(trained, [tmp_path / "tone.wav"], tmp_path / "c.bundle")
    assert not (tmp_path / "c.bundle").exists()


@pytest.fixture(scope="module")
def with_cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fluctuation and the int8 CNN on one scale, on three normal fixture files."""
    from train.ensemble import train_ensemble

    out = tmp_path_factory.mktemp("ensemble-cnn") / "fan.bundle"
    return train_ensemble(
        list(NORMAL_FILES[:3]), out, members=("fluctuation", "embedding"), epochs=2,
        epoch_windows=TINY_EPOCH,
    )  # fmt: skip


def test_the_int8_cnn_is_a_member_whose_network_is_the_bundles(with_cnn: Path) -> None:
    """The network travels as the bundle's int8 model; its head and normalisation under its
    prefix; the score is the mean z of both members, as with numpy members."""
    bundle = load_bundle(with_cnn)
    info = bundle.manifest.ensemble
    assert info is not None and [m.kind for m in info.members] == ["fluctuation", "embedding"]
    assert bundle.model is not None and "model_int8.tflite" in bundle.manifest.files
    assert bundle.model.input_shape == (1, *bundle.features.shape, 1)
    network = load_bundle(with_cnn).manifest
    assert network.training.epochs == 2 and network.validation is not None  # the CNN's record
    assert "m1.normalization.mean" in bundle.arrays and "m1.statistics.precision" in bundle.arrays
    w = bundle_windows(with_cnn, ANOMALOUS_FILE)
    z = []
    for m in info.members:
        alone = Scorer.from_bundle(member_view(bundle, m)).score_many(w)
        z.append((np.log(alone) - m.center) / m.spread)
    expected = np.exp(np.mean(z, axis=0) * np.mean([m.spread for m in info.members]))
    np.testing.assert_allclose(Scorer.from_bundle(bundle).score_many(w), expected, rtol=1e-6)
    normal = Scorer.from_bundle(bundle).score_many(bundle_windows(with_cnn, NORMAL_FILES[3]))
    assert np.median(expected) > normal.max(), (expected, normal)


def test_an_ensemble_with_the_cnn_replays_and_calibrates_on_the_edge(
    with_cnn: Path, tmp_path: Path
) -> None:
    """`replay` raises the fixture fault; `calibrate` refits both members on site (the CNN's
    head, not its network) without TensorFlow (the edge path): both run with TensorFlow and
    Keras made unimportable, as on a Pi with the bare install."""
    blocked = tmp_path / "no-tensorflow"
    for name in ("tensorflow", "keras"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked')\n")
    bare = {"PYTHONPATH": str(blocked)}
    shadowed = subprocess.run(
        [sys.executable, "-c", "import tensorflow"], env={**os.environ, **bare},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "tensorflow is blocked" in shadowed.stderr  # the stub hides the installed package
    replayed = cli("replay", str(with_cnn), str(ANOMALOUS_FILE), env=bare).stdout.splitlines()
    assert any(json.loads(line)["type"] == "start" for line in replayed)
    out = tmp_path / "site.bundle"
    normal = [str(f) for f in NORMAL_FILES[2:4]]
    cli("calibrate", str(with_cnn), "--normal", *normal, "--out", str(out), env=bare)
    before, after = load_bundle(with_cnn), load_bundle(out)
    assert after.manifest.files["model_int8.tflite"] == before.manifest.files["model_int8.tflite"]
    assert not np.array_equal(
        after.array("m1.statistics.center"), before.array("m1.statistics.center")
    )
    assert after.manifest.calibration is not None


def test_the_cnns_site_scale_is_what_refits_without_each_file_give(with_cnn: Path) -> None:
    """On site the CNN member's held-out scores come from one pass of the network; they equal
    refitting it without each file in turn (and on one file, its halves), at N times the cost."""
    from edge.detectors.base import DetectorKind
    from edge.detectors.ensemble import MEMBER_PLUGINS

    bundle = load_bundle(with_cnn)
    member = bundle.manifest.ensemble.members[1]  # type: ignore[union-attr]
    view, plugin = member_view(bundle, member), MEMBER_PLUGINS["embedding"]
    files = [bundle_windows(with_cnn, f) for f in NORMAL_FILES[2:4]]
    for per_file in (files, [files[0]]):
        refitted = DetectorKind.held_out_scores(plugin, view, per_file, 1.0)  # a refit each
        fast = plugin.held_out_scores(view, per_file, 1.0)
        assert len(fast) == (len(files[0]) + len(files[1]) if len(per_file) == 2 else
                             len(files[0]) - len(files[0]) // 2)  # fmt: skip
        np.testing.assert_allclose(fast, refitted, rtol=1e-9)


def test_an_ensemble_holds_one_network(with_cnn: Path, tmp_path: Path) -> None:
    from edge.errors import AudioError
    from train.ensemble import train_ensemble

    with pytest.raises(AudioError, match="at least one of them numpy"):  # before any training
        train_ensemble(list(NORMAL_FILES[:3]), tmp_path / "x.bundle", members=["embedding"])
    bundle = load_bundle(with_cnn)
    manifest = bundle.manifest.model_dump(exclude={"files", "checksum", "arrays"})
    manifest["ensemble"]["members"][0].update(kind="embedding", score="embedding-mahalanobis")
    files = {name: bundle.file_bytes(name) for name in ("model_int8.tflite", "model_float.tflite")}
    write_unchecked(tmp_path / "bad.bundle", manifest, files, bundle.arrays)
    with pytest.raises(BundleError, match="one network"):
        load_bundle(tmp_path / "bad.bundle")


def test_the_train_command_takes_the_members(tmp_path: Path) -> None:
    """`--members` trains the ensemble of those kinds, the CNN among them with --epochs; it is
    refused for any other detector, and --epochs without a network member."""
    from soundsentry.commands.training import ENSEMBLE_MEMBERS
    from train.ensemble import NETWORK_MEMBERS, TRAINERS

    assert set(ENSEMBLE_MEMBERS) == {*TRAINERS, *NETWORK_MEMBERS}  # the command offers them all
    out = tmp_path / "cnn.bundle"
    cli(
        "train", "--detector", "ensemble", "--members", "fluctuation", "embedding",
        "--epochs", "1", "--normal", *map(str, NORMAL_FILES[:3]), "--out", str(out),
    )  # fmt: skip
    info = load_bundle(out).manifest.ensemble
    assert info is not None and [m.kind for m in info.members] == ["fluctuation", "embedding"]
    refused = [
        (("--detector", "fluctuation", "--members", "fluctuation", "subspace"), "--members names"),
        (
            ("--detector", "ensemble", "--members", "fluctuation", "knn", "--epochs", "2"),
            "--epochs trains a network",
        ),
    ]
    for flags, said in refused:
        proc = cli("train", *flags, "--normal", str(NORMAL_FILES[0]), "--out",
                   str(tmp_path / "x.bundle"), check=False)  # fmt: skip
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert said in proc.stderr, proc.stderr


def test_an_ensemble_warns_of_a_copied_recording_once(tmp_path: Path) -> None:
    """Each member searched the folder and dropped the copy again: the same warning three
    times (and the folder read once per member)."""
    folder = tmp_path / "normal"
    folder.mkdir()
    for f in NORMAL_FILES:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "z-copy.flac").write_bytes(NORMAL_FILES[0].read_bytes())
    proc = cli("train", "--detector", "ensemble", "--normal", str(folder),
               "--out", str(tmp_path / "e.bundle"))  # fmt: skip
    assert proc.stderr.count("z-copy.flac is a copy of") == 1, proc.stderr


def test_a_dropout_in_the_held_out_audio_leaves_the_members_in_step(tmp_path: Path) -> None:
    """Every trainer leaves out the windows the device never scores; the ensemble's own
    held-out windows must too, or its members' held-out scores no longer line up."""
    import soundfile as sf

    from edge.audio_io import read_audio
    from train.ensemble import train_ensemble

    fan = np.concatenate([read_audio(f, 16000) for f in NORMAL_FILES])
    for i in range(5):  # five 10-s recordings: the last is held out whole
        audio = np.roll(fan, i * 16000 // 3)[: 10 * 16000].copy()
        if i == 4:
            audio[5 * 16000 : 6 * 16000] = 0.0
        sf.write(tmp_path / f"{i}.wav", audio, 16000, subtype="FLOAT")
    out = train_ensemble([str(tmp_path)], tmp_path / "e.bundle")
    assert load_bundle(out).threshold < 10, "the dropout's windows set no threshold"


def test_the_bundle_is_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ensemble was written to --out with band references of zeros, read back, then written
    again: a Ctrl-C or the OOM killer between the two left a bundle that loaded and reported
    band deviations of 10^9 (in a review). The first pass goes to a temporary folder."""
    import train.ensemble as ensemble

    out = tmp_path / "fan.bundle"
    written: list[Path] = []
    real = ensemble.write_bundle

    def counted(path: str | Path, *args: object, **kwargs: object) -> Path:
        written.append(Path(path))
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ensemble, "write_bundle", counted)
    ensemble.train_ensemble(list(NORMAL_FILES[:3]), out)
    assert [p for p in written if p == out] == [out]
    assert load_bundle(out).array("normal_band_error.std").max() > 0
