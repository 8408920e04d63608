"""What users hand `train`, `calibrate` and `evaluate`: multichannel recordings with a dead
channel, silence, held-out recordings, folders from other systems, file names from other
systems. Real commands on fixture audio (fluctuation, the default kind: seconds to train)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
from conftest import ANOMALOUS_FILE, NORMAL_FILES, cli

RATE = 16000


def _mono(path: Path) -> np.ndarray:
    return sf.read(str(path), dtype="float32")[0]


def _stereo_ch0_dead(sources: list[Path], folder: Path) -> list[Path]:
    """Stereo WAVs of the sources whose channel 0 is digital silence (a dead microphone)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sources:
        audio = _mono(src)
        path = folder / f"{src.stem}.wav"
        sf.write(str(path), np.stack([np.zeros_like(audio), audio], 1), RATE, subtype="PCM_16")
        out.append(path)
    return out


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_calibrate_and_evaluate_use_the_channel_the_model_was_trained_on(tmp_path: Path) -> None:
    """Both read channel 0 whatever the bundle was trained on: with a dead channel 0,
    `calibrate` wrote a threshold of 5e-28 and `evaluate` reported AUC 0.000, without a word."""
    normal = _stereo_ch0_dead(NORMAL_FILES, tmp_path / "normal")
    (fault,) = _stereo_ch0_dead([ANOMALOUS_FILE], tmp_path / "fault")
    model, site = tmp_path / "m.bundle", tmp_path / "site.bundle"
    cli("train", "--normal", str(tmp_path / "normal"), "--channel", "1", "--out", str(model))
    trained = _manifest(model)["threshold"]["value"]
    cli("calibrate", str(model), "--normal", str(tmp_path / "normal"), "--out", str(site))
    calibrated = _manifest(site)
    assert calibrated["calibration"]["channel"] == 1
    assert trained / 10 < calibrated["threshold"]["value"] < trained * 10
    report = tmp_path / "eval.json"
    proc = cli("evaluate", str(site), "--normal", str(normal[3]), "--anomalous", str(fault),
               "--segment", "1", "--json", str(report))  # fmt: skip
    assert json.loads(report.read_text())["auc"] > 0.9
    assert "fitted on channel" not in proc.stderr
    other = cli("evaluate", str(model), "--normal", str(normal[3]), "--anomalous", str(fault),
                "--channel", "0")  # fmt: skip
    assert "--channel 0, but the model was fitted on channel 1" in other.stderr
