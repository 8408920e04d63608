"""The default detector: band-fluctuation statistics + Mahalanobis, trained without TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import DEMO_CLIP, NORMAL_FILES, cli

from edge.audio_io import read_audio
from edge.bundle import load_bundle
from edge.features import FeatureParams, windows_of
from edge.scoring import FluctuationScorer, fluctuation_features
from train.fluctuation import fit_statistics


def test_fluctuation_features_ignore_gain_and_slow_drift() -> None:
    audio = read_audio(NORMAL_FILES[0], 16000)
    w = windows_of(audio, FeatureParams())
    f = fluctuation_features(w)
    assert f.shape == (len(w), 64)
    louder = fluctuation_features(w + 12.0 + np.linspace(0, 3, 64))  # +12 dB, spectral tilt
    np.testing.assert_allclose(louder, f, atol=1e-4)
    np.testing.assert_allclose(fluctuation_features(w[0]), f[0])


def test_mahalanobis_scores_match_a_direct_computation() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    model = fit_statistics(f)
    x = rng.normal(size=(5, 8))
    z = (x - f.mean(0)) / (f.std(0) + 1e-6) - model.center
    expected = np.einsum("ij,jk,ik->i", z, model.precision, z) / 8
    got = np.array([float((d * (model.precision @ d)).sum() / 8) for d in z])
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert isinstance(model, FluctuationScorer)


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
    assert b.manifest.training.holdout_files == [str(NORMAL_FILES[-1])]
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
            (0.05 * rng.standard_normal((48000, 4))),
            16000,
            format="WAVEX",
            subtype="PCM_16",
        )
    out = tmp_path / "multi.bundle"
    args = ["train", "--normal", str(tmp_path), "--out", str(out)]
    cli(*args, *(["--all-channels"] if all_channels else []))
    m = load_bundle(out).manifest
    assert m.training.seconds == pytest.approx(4 * 6.0 if all_channels else 6.0)
    assert m.training.channel == (-2 if all_channels else 0)
