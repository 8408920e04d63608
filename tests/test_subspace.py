"""Kind `subspace`: stacked log-mel frames scored by their distance to the normal subspace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import ANOMALOUS_FILE, NORMAL_FILES, cli
from detector_helpers import assert_refused_with, bundle_windows, window_scores

from edge.bundle import load_bundle
from edge.detectors.subspace import SubspaceScorer, stacked
from edge.scoring import Explainer, Scorer
from train.subspace import COMPONENTS, STACK, fit_subspace, flat_windows

N_MELS = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A subspace bundle from the real command on three normal fixture files (the fourth is
    held out of training entirely)."""
    out = tmp_path_factory.mktemp("subspace") / "fan.bundle"
    cli(
        "train", "--detector", "subspace", "--normal", *map(str, NORMAL_FILES[:3]),
        "--out", str(out),
    )  # fmt: skip
    return out


def test_stacks_are_consecutive_frames_frame_major() -> None:
    w = np.arange(2 * 7 * 3, dtype=float).reshape(2, 7, 3)
    s = stacked(w, 5)
    assert s.shape == (2, 3, 15)
    np.testing.assert_array_equal(s[1, 2], w[1, 2:7].ravel())
    with pytest.raises(ValueError, match="shorter than a stack"):
        stacked(w, 8)


def test_score_is_the_mean_squared_residual_off_the_subspace() -> None:
    """The edge scorer against a projection written out with a least-squares solve."""
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 5 * 4))
    normal = (rng.normal(size=(200, 3)) @ basis).reshape(40, 5, 5, 4)  # 40 windows, rank 3
    rows = normal.reshape(40, 25, 4)[:, :12]  # windows of 12 frames, 4 mels
    model = fit_subspace(flat_windows(rows), (12, 4), stack=5)
    assert model.components.shape == (COMPONENTS, 20)
    np.testing.assert_allclose(model.components @ model.components.T, np.eye(COMPONENTS), atol=1e-9)
    probes = rng.normal(size=(3, 12, 4)) * 5.0
    x = stacked(probes, 5) - model.mean
    coef = np.linalg.lstsq(model.components.T, x.reshape(-1, 20).T, rcond=None)[0]
    resid = x.reshape(-1, 20) - (model.components.T @ coef).T
    expected = (resid**2).mean(axis=1).reshape(3, -1).mean(axis=1)
    scorer = SubspaceScorer(model.mean, model.components, 5, 2.0)
    np.testing.assert_allclose(scorer.score_many(probes), expected / 2.0, rtol=1e-9)
    scored = scorer.score(probes[0])
    assert scored.score == pytest.approx(expected[0] / 2.0)
    assert scored.band_error.shape == (4,) and scored.band_error.sum() == pytest.approx(
        scored.score
    )


def test_fitting_takes_memory_by_the_block_not_by_the_hour() -> None:
    """Stacked whole, centred and decomposed by SVD, an hour of audio took about 5 GB (a
    review); the scatter summed a block at a time gives the SVD's subspace in constant room."""
    import tracemalloc

    rng = np.random.default_rng(1)
    shape = (31, 16)
    bands = rng.normal(size=(1, 1, shape[1])) * 5
    windows = (rng.normal(size=(2400, *shape)).cumsum(axis=1) * 0.3 - 40 + bands).astype(np.float32)
    rows = flat_windows(windows)
    x = stacked(windows, STACK).reshape(-1, STACK * shape[1]).astype(np.float64)
    _, _, axes = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    reference = SubspaceScorer(x.mean(axis=0), axes[:COMPONENTS], STACK, 1.0)
    probes = rng.normal(size=(5, *shape)).cumsum(axis=1) * 0.4 - 40
    peaks = []
    for n in (600, 2400):
        tracemalloc.start()
        model = fit_subspace(rows[:n], shape)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    np.testing.assert_allclose(model.score_many(probes), reference.score_many(probes), rtol=1e-9)
    # four times the windows: the peak grows by less than the windows' own size
    assert peaks[1] - peaks[0] < rows[600:].nbytes, (peaks, rows.nbytes)


def test_anomalous_scores_above_held_out_normal(trained: Path) -> None:
    bundle = load_bundle(trained)
    assert bundle.manifest.kind == "subspace" and bundle.model is None
    assert int(bundle.array("subspace.stack")[0]) == STACK
    held_out = window_scores(trained, NORMAL_FILES[3])  # never seen in training
    anomalous = window_scores(trained, ANOMALOUS_FILE)
    assert np.median(anomalous) > np.median(held_out), (anomalous, held_out)
    assert bundle.manifest.normal_scores.p50 == pytest.approx(1.0)  # scaled by held-out median
    np.testing.assert_allclose(
        Scorer.from_bundle(bundle).score_many(bundle_windows(trained, ANOMALOUS_FILE)), anomalous
    )


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
        ("subspace.mean", np.zeros(7), "subspace.mean"),
        ("subspace.components", np.zeros((8, 7)), "subspace.components"),
        ("subspace.components", np.zeros((0, STACK * N_MELS)), "subspace.components"),
        ("subspace.stack", np.array([2.5]), "subspace.stack"),
        ("subspace.stack", np.array([1000.0]), "subspace.stack"),
        ("subspace.scale", np.array([0.0]), "subspace.scale"),
    ],
)
def test_bundle_with_wrong_arrays_is_refused(
    trained: Path, tmp_path: Path, name: str, value: np.ndarray, match: str
) -> None:
    assert_refused_with(trained, tmp_path / "bad.bundle", match, **{name: value})


def test_calibrate_moves_the_origin_to_the_site(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "site.bundle"
    site = [NORMAL_FILES[3], NORMAL_FILES[0]]  # the first is audio the model has not seen
    cli("calibrate", str(trained), "--normal", *map(str, site), "--out", str(out))
    before, after = load_bundle(trained), load_bundle(out)
    assert after.manifest.kind == "subspace" and after.manifest.calibration is not None
    for same in ("subspace.components", "subspace.scale", "subspace.stack"):
        np.testing.assert_array_equal(after.array(same), before.array(same))
    scorer = Scorer.from_bundle(before)
    site_windows = np.concatenate([bundle_windows(trained, f) for f in site])
    expected = stacked(site_windows, STACK).reshape(-1, STACK * N_MELS).mean(axis=0)
    np.testing.assert_allclose(after.array("subspace.mean"), expected, rtol=1e-5)
    assert after.manifest.normal_scores.source.startswith("on-site")
    new, old = window_scores(out, site[0]), window_scores(trained, site[0])
    assert new.mean() < old.mean()  # the origin moved towards it
    assert isinstance(scorer, SubspaceScorer)
