"""Kind `levels`: mean level, level spread and fluctuation per band, Mahalanobis distance."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import ANOMALOUS_FILE, NORMAL_FILES, cli
from detector_helpers import window_scores, write_unchecked

from edge.audio_io import read_audio
from edge.bundle import load_bundle
from edge.detectors.levels import LevelsScorer, level_features
from edge.errors import BundleError
from edge.features import windows_of
from edge.scoring import Explainer, Scorer

N_MELS = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Levels bundle from the real command on three normal fixture files (the fourth is
    held out of training entirely)."""
    out = tmp_path_factory.mktemp("levels") / "fan.bundle"
    cli("train", "--detector", "levels", "--normal", *map(str, NORMAL_FILES[:3]), "--out", str(out))
    return out


def test_level_features_match_a_direct_computation() -> None:
    rng = np.random.default_rng(3)
    windows = rng.normal(scale=[0.5, 1.0, 2.0], size=(2, 20, 3)).cumsum(axis=1) - 30.0
    windows[1, :, 1] = -50.0  # a band that does not move: the floor, not log(0)
    got = level_features(windows)
    assert got.shape == (2, 9)
    for w, g in zip(windows, got, strict=True):
        for b in range(3):
            column = [float(v) for v in w[:, b]]
            steps = [column[t + 1] - column[t] for t in range(len(column) - 1)]
            assert g[b] == pytest.approx(statistics.fmean(column), rel=1e-9)
            assert g[3 + b] == pytest.approx(math.log(max(statistics.pstdev(column), 1e-3)))
            assert g[6 + b] == pytest.approx(math.log(max(statistics.pstdev(steps), 1e-3)))
    np.testing.assert_allclose(level_features(windows[0]), got[0])
    louder = level_features(windows + 6.0)  # +6 dB moves the levels only
    np.testing.assert_allclose(louder[:, :3], got[:, :3] + 6.0)
    np.testing.assert_allclose(louder[:, 3:], got[:, 3:], atol=1e-9)


def test_anomalous_scores_above_held_out_normal(trained: Path) -> None:
    bundle = load_bundle(trained)
    assert bundle.manifest.kind == "levels" and bundle.model is None
    held_out = window_scores(trained, NORMAL_FILES[3])  # never seen in training
    anomalous = window_scores(trained, ANOMALOUS_FILE)
    assert anomalous.min() > 2 * held_out.max(), (anomalous, held_out)


def test_band_explanations_have_one_value_per_mel_band(trained: Path) -> None:
    bundle = load_bundle(trained)
    assert bundle.array("normal_band_error.mean").shape == (N_MELS,)
    w = windows_of(read_audio(ANOMALOUS_FILE, 16000), bundle.features)
    scored = Scorer.from_bundle(bundle).score(w[0])
    assert scored.band_error.shape == (N_MELS,)
    assert scored.band_error.sum() == pytest.approx(scored.score)  # shares of the distance
    bands = Explainer(bundle).bands(scored.band_error)
    assert len(bands) == 3 and bands[0]["high_hz"] > bands[0]["low_hz"]


@pytest.mark.parametrize(
    ("name", "shape"),
    [("statistics.precision", (N_MELS, N_MELS)), ("statistics.feature_std", (N_MELS,))],
)
def test_bundle_with_fluctuation_sized_arrays_is_refused(
    trained: Path, tmp_path: Path, name: str, shape: tuple[int, ...]
) -> None:
    bundle = load_bundle(trained)
    manifest = bundle.manifest.model_dump(exclude={"files", "checksum", "arrays"})
    arrays = {**bundle.arrays, name: np.ones(shape)}
    write_unchecked(tmp_path / "bad.bundle", manifest, {}, arrays)
    with pytest.raises(BundleError, match=name):
        load_bundle(tmp_path / "bad.bundle")


def test_calibrate_recentres_and_keeps_the_precision(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "site.bundle"
    site = [str(NORMAL_FILES[0]), str(NORMAL_FILES[1])]
    cli("calibrate", str(trained), "--normal", *site, "--out", str(out))
    before, after = load_bundle(trained), load_bundle(out)
    assert after.manifest.kind == "levels" and after.manifest.calibration is not None
    np.testing.assert_array_equal(
        after.array("statistics.precision"), before.array("statistics.precision")
    )
    feats = np.concatenate(
        [level_features(windows_of(read_audio(f, 16000), after.features)) for f in site]
    )
    expected = LevelsScorer.from_bundle(before).standardize(feats).mean(axis=0)
    np.testing.assert_allclose(after.array("statistics.center"), expected, atol=1e-5)
    assert after.manifest.normal_scores.source.startswith("on-site")
    assert window_scores(out, ANOMALOUS_FILE).min() > after.threshold


def test_a_stop_and_start_in_the_site_audio_leaves_the_threshold_where_it_was(
    trained: Path, tmp_path: Path
) -> None:
    """Calibrate scored every window above the off level, the machine coasting down and
    running up too, which the device never takes as evidence: one stop in each site
    recording (1.5 s down, 3 s off, 1.5 s up) lifted the threshold 25-fold (a review's
    reproduction). Now it leaves out what training does."""
    rate = 16000
    fan = [read_audio(f, rate) for f in NORMAL_FILES]
    rng = np.random.default_rng(0)
    fade = 10 ** (np.linspace(0, -30, int(1.5 * rate)) / 20)

    def site(name: str, stop: bool) -> list[str]:
        paths = []
        for i, a in enumerate(fan):
            b = fan[(i + 1) % len(fan)]
            if stop:
                a, b = a.copy(), b.copy()
                a[-len(fade) :] *= fade
                b[: len(fade)] *= fade[::-1]
                room = 1e-4 * rng.standard_normal(3 * rate)
                audio = np.concatenate([a, room, b])
            else:
                audio = np.concatenate([a, b])
            paths.append(str(tmp_path / f"{name}-{i}.wav"))
            sf.write(paths[-1], audio.astype(np.float32), rate, subtype="FLOAT")
        return paths

    clean, stops = tmp_path / "clean.bundle", tmp_path / "stops.bundle"
    cli("calibrate", str(trained), "--normal", *site("clean", False), "--out", str(clean))
    proc = cli("calibrate", str(trained), "--normal", *site("stops", True), "--out", str(stops))
    assert load_bundle(stops).threshold < 1.5 * load_bundle(clean).threshold
    assert "starting or stopping" in proc.stderr


def test_all_channels_are_training_views(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for i in range(2):
        noise = 0.05 * rng.standard_normal((80000, 3))  # 5 s: 10 s in all, train's minimum
        sf.write(tmp_path / f"array{i}.wav", noise, 16000, format="WAVEX", subtype="PCM_16")
    out = tmp_path / "multi.bundle"
    cli(
        "train",
        "--detector",
        "levels",
        "--all-channels",
        "--normal",
        str(tmp_path),
        "--out",
        str(out),
    )
    m = load_bundle(out).manifest
    assert m.training.seconds == pytest.approx(10.0) and m.training.channel == -2
    assert m.threshold.params["n_windows"] == 3 * 2  # 3 views of each recording's held-out part


def test_a_bundle_that_cannot_score_is_refused_at_load(trained: Path, tmp_path: Path) -> None:
    """Hand-edited bundles that loaded and scored wrongly without a word: a negated precision
    (every distance negative: a fault scores below normal running) and a window of one frame
    (no frame changes: every score NaN, so nothing ever alarms)."""
    from detector_helpers import assert_refused_with

    precision = load_bundle(trained).array("statistics.precision")
    assert_refused_with(
        trained, tmp_path / "neg.bundle", "not symmetric positive definite",
        **{"statistics.precision": -precision},
    )  # fmt: skip
    bundle = load_bundle(trained)
    manifest = bundle.manifest.model_dump(exclude={"files", "checksum", "arrays"})
    manifest["features"]["window_seconds"] = manifest["features"]["n_fft"] / 16000
    manifest["features"]["hop_seconds"] = manifest["features"]["window_seconds"]
    short = write_unchecked(tmp_path / "short.bundle", manifest, {}, bundle.arrays)
    with pytest.raises(BundleError, match=r"a window of 1 frame\(s\) .* at least 3"):
        load_bundle(short)
