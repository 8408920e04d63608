"""Kind `knn`: a bounded bank of normal windows, scored by the distance to the nearest ones."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import ANOMALOUS_FILE, NORMAL_FILES, cli
from detector_helpers import assert_refused_with, bundle_windows, window_scores

from edge.bundle import load_bundle
from edge.detectors.knn import MAX_BANK, KnnScorer, merged_bank
from edge.detectors.levels import level_features
from edge.scoring import Explainer, Scorer
from train.knn import fit_bank

N_MELS = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A knn bundle from the real command on three normal fixture files (the fourth is held
    out of training entirely)."""
    out = tmp_path_factory.mktemp("knn") / "fan.bundle"
    cli("train", "--detector", "knn", "--normal", *map(str, NORMAL_FILES[:3]), "--out", str(out))
    return out


def test_score_is_the_mean_distance_to_the_k_nearest_rows() -> None:
    """The edge scorer against a brute-force search written out row by row."""
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(30, 12, 4)).cumsum(axis=1)
    model = fit_bank(level_features(normal), neighbours=3, max_dims=5)
    assert model.components.shape == (5, 12) and model.bank.shape == (30, 5)
    np.testing.assert_allclose(model.components @ model.components.T, np.eye(5), atol=1e-9)
    scorer = KnnScorer(model.mean, model.std, model.components, model.bank, 3, 2.0)
    probes = rng.normal(size=(5, 12, 4)).cumsum(axis=1)
    probes[3:] *= 3.0  # louder and more agitated than anything in the bank

    def brute(window: np.ndarray) -> float:
        z = (level_features(window) - model.mean) / model.std
        x = [float(np.dot(z, axis)) for axis in model.components]
        d = sorted(math.dist(x, [float(v) for v in row]) for row in model.bank)
        return sum(d[:3]) / 3 / 2.0

    expected = [brute(w) for w in probes]
    np.testing.assert_allclose(scorer.score_many(probes), expected, rtol=1e-9)
    np.testing.assert_allclose([scorer.score(w).score for w in probes], expected, rtol=1e-9)
    assert min(expected[3:]) > max(expected[:3])


def test_bank_is_bounded_and_a_refit_keeps_the_site() -> None:
    rng = np.random.default_rng(1)
    big = fit_bank(rng.normal(size=(MAX_BANK + 500, 12)), neighbours=5)
    assert big.bank.shape == (MAX_BANK, 12)
    bank, site = np.zeros((MAX_BANK, 2)), np.ones((3000, 2))
    merged = merged_bank(bank, site)
    assert len(merged) == MAX_BANK and merged.sum(axis=0)[0] == MAX_BANK // 2  # half the site
    assert len(merged_bank(bank[:100], site[:50])) == 150  # room for all of both


def test_anomalous_scores_above_held_out_normal(trained: Path) -> None:
    bundle = load_bundle(trained)
    assert bundle.manifest.kind == "knn" and bundle.model is None
    held_out = window_scores(trained, NORMAL_FILES[3])  # never seen in training
    anomalous = window_scores(trained, ANOMALOUS_FILE)
    assert anomalous.min() > held_out.max(), (anomalous, held_out)
    assert bundle.manifest.normal_scores.p50 == pytest.approx(1.0)  # scaled by held-out median


def test_band_explanations_have_one_value_per_mel_band(trained: Path) -> None:
    bundle = load_bundle(trained)
    assert bundle.array("normal_band_error.std").shape == (N_MELS,)
    scored = Scorer.from_bundle(bundle).score(bundle_windows(trained, ANOMALOUS_FILE)[0])
    assert scored.band_error.shape == (N_MELS,) and np.all(scored.band_error >= 0)
    bands = Explainer(bundle).bands(scored.band_error)
    assert len(bands) == 3 and bands[0]["high_hz"] > bands[0]["low_hz"]


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("knn.bank", np.zeros((20, 7)), "knn.bank"),
        ("knn.components", np.zeros((8, N_MELS)), "knn.components"),
        ("knn.components", np.zeros((0, 3 * N_MELS)), "knn.components"),  # every score 0
        ("knn.feature_std", np.ones(N_MELS), "knn.feature_std"),
        ("knn.neighbours", np.array([2.5]), "knn.neighbours"),
        ("knn.neighbours", np.array([1e6]), "knn.neighbours"),
        # below what training allows: scores of 1e301, or "peak_score": Infinity (no JSON)
        ("knn.scale", np.array([1e-300]), "knn.scale"),
        ("knn.feature_std", np.full(3 * N_MELS, 1e-300), "knn.feature_std"),
    ],
)
def test_bundle_with_wrong_arrays_is_refused(
    trained: Path, tmp_path: Path, name: str, value: np.ndarray, match: str
) -> None:
    assert_refused_with(trained, tmp_path / "bad.bundle", match, **{name: value})


def test_calibrate_adds_the_site_to_the_bank(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "site.bundle"
    site = [NORMAL_FILES[3], NORMAL_FILES[0]]  # the first is audio the bank has not seen
    cli("calibrate", str(trained), "--normal", *map(str, site), "--out", str(out))
    before, after = load_bundle(trained), load_bundle(out)
    assert after.manifest.kind == "knn" and after.manifest.calibration is not None
    added = sum(len(bundle_windows(trained, f)) for f in site)
    np.testing.assert_array_equal(after.array("knn.bank")[added:], before.array("knn.bank"))
    for same in ("knn.components", "knn.scale", "knn.neighbours"):
        np.testing.assert_array_equal(after.array(same), before.array(same))
    assert after.manifest.normal_scores.source.startswith("on-site")
    assert after.threshold != before.threshold
    new, old = window_scores(out, site[0]), window_scores(trained, site[0])
    assert np.all(new <= old + 1e-9) and new.mean() < 0.8 * old.mean()  # one of its k is itself
    fault = window_scores(out, ANOMALOUS_FILE)
    assert fault.mean() > after.manifest.normal_scores.max  # the site's normal, file held out


def test_all_channels_are_training_views(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for i in range(2):  # 6 s: the last 20 % of each is held out for the scale and threshold
        noise = 0.05 * rng.standard_normal((96000, 3))
        sf.write(tmp_path / f"array{i}.wav", noise, 16000, format="WAVEX", subtype="PCM_16")
    out = tmp_path / "multi.bundle"
    cli(
        "train", "--detector", "knn", "--all-channels", "--normal", str(tmp_path), "--out", str(out)
    )
    m = load_bundle(out).manifest
    assert m.training.seconds == pytest.approx(12.0) and m.training.channel == -2
    assert m.threshold.params["n_windows"] == 3 * 2  # 3 views of each recording's held-out part


def test_a_trained_bank_of_float32_audio_loads(tmp_path: Path) -> None:
    """A 50 Hz square wave in a 32-bit float WAV leaves some features flat: their spread is
    floored to MIN_FEATURE_STD, which in float32 was 0.0099999998, a bundle the loader refused
    (written over a working one)."""
    t = np.arange(30 * 16000) / 16000
    square = 0.5 * np.sign(np.sin(2 * np.pi * 50 * t))
    sf.write(tmp_path / "square.wav", square.astype(np.float32), 16000, subtype="FLOAT")
    out = tmp_path / "square.bundle"
    cli("train", "--detector", "knn", "--normal", str(tmp_path / "square.wav"), "--out", str(out))
    assert load_bundle(out).manifest.kind == "knn"
