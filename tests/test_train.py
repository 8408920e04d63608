"""Training: the real `train` command on fixture audio, int8 vs float, determinism, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import ANOMALOUS_FILE, DEMO_CLIP, NORMAL_FILES, TINY_EPOCHS, cli

from edge.audio_io import read_audio
from edge.bundle import MODEL_INT8, load_bundle
from edge.features import windows_of
from edge.scoring import Scorer
from train.metrics import spearman

MIN_SPEARMAN = 0.95
MIN_AUC = 0.95
"""The fixture fault is plain: the tiny model scores its segments about three times as high
as normal ones (AUC 1.0 when written); a model that cannot tell them apart fails this."""


def test_train_writes_a_valid_bundle(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    m = b.manifest
    assert tiny_bundle.parent.name == "nested"  # --out's parent folders were created
    assert m.kind == "autoencoder" and m.input.dtype == "int8" and m.output.dtype == "int8"
    assert m.training.seed == 1 and m.training.epochs == int(TINY_EPOCHS)
    assert len(m.training.files) + len(m.training.holdout_files) >= len(NORMAL_FILES) - 1
    assert (
        m.threshold.rule == "false-alarm-budget/gamma" and m.threshold.value > m.normal_scores.p50
    )
    assert (tiny_bundle / MODEL_INT8).stat().st_size < 256 * 1024


def test_int8_ranks_windows_like_float(tiny_bundle: Path) -> None:
    int8 = Scorer.from_bundle(load_bundle(tiny_bundle, "int8"))
    flt = Scorer.from_bundle(load_bundle(tiny_bundle, "float"))
    p = load_bundle(tiny_bundle).features
    windows = np.concatenate(
        [
            windows_of(read_audio(f, p.samplerate), p)
            for f in [*NORMAL_FILES, ANOMALOUS_FILE, DEMO_CLIP]
        ]
    )
    rho = spearman(int8.score_many(windows), flt.score_many(windows))
    assert rho >= MIN_SPEARMAN, rho


def test_same_seed_same_model(tiny_bundle: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.bundle"
    cli(
        "train",
        "--detector",
        "autoencoder",
        "--normal",
        *map(str, NORMAL_FILES),
        "--out",
        str(again),
        "--epochs",
        TINY_EPOCHS,
        "--seed",
        "1",
    )
    assert (again / MODEL_INT8).read_bytes() == (tiny_bundle / MODEL_INT8).read_bytes()
    first = load_bundle(tiny_bundle).manifest
    assert load_bundle(again).manifest.threshold.value == first.threshold.value


def test_evaluate_prints_and_writes_json(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "eval.json"
    proc = cli(
        "evaluate",
        str(tiny_bundle),
        "--normal",
        *map(str, NORMAL_FILES[:2]),
        "--anomalous",
        str(ANOMALOUS_FILE),
        "--segment",
        "1",
        "--json",
        str(out),
    )
    assert "AUC" in proc.stdout and "pAUC" in proc.stdout
    data = json.loads(out.read_text())
    assert {"auc", "pauc", "n_normal", "n_anomalous"} <= set(data)
    assert (data["n_normal"], data["n_anomalous"]) == (10, 4)
    assert data["auc"] >= MIN_AUC, data
    assert data["pauc"] >= MIN_AUC, data  # at false-positive rates up to 0.1
    whole = cli(
        "evaluate",
        str(tiny_bundle),
        "--float",
        "--normal",
        *map(str, NORMAL_FILES),
        "--anomalous",
        str(ANOMALOUS_FILE),
    )
    assert "(float), whole files" in whole.stdout and "normal 4  anomalous 1" in whole.stdout


def test_evaluate_report_files(tiny_bundle: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"
    proc = cli(
        "evaluate",
        str(tiny_bundle),
        "--normal",
        *map(str, NORMAL_FILES),
        "--anomalous",
        str(ANOMALOUS_FILE),
        str(DEMO_CLIP),
        "--segment",
        "1",
        "--report",
        str(report),
    )
    assert "report written" in proc.stdout
    for name in ("roc.png", "histogram.png", "timeline.png"):
        data = (report / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, name
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics) == {"int8", "float"}
    assert {"auc", "pauc", "n_normal", "n_anomalous"} <= set(metrics["int8"])
    rows = (report / "scores.csv").read_text().splitlines()
    assert rows[0] == "file,segment,label,score_int8,score_float"
    assert len(rows) == 1 + metrics["int8"]["n_normal"] + metrics["int8"]["n_anomalous"]
    scores: dict[str, list[float]] = {}
    for row in rows[1:]:
        name, _, _, int8, _ = row.split(",")
        scores.setdefault(Path(name).name, []).append(float(int8))
    fault, demo = scores.pop(ANOMALOUS_FILE.name), scores.pop(DEMO_CLIP.name)
    normal = [x for xs in scores.values() for x in xs]
    threshold = load_bundle(tiny_bundle).manifest.threshold.value
    assert len(fault) == 4 and len(normal) == 20 and len(demo) == 15, scores
    # Every segment of the faulty fan is above the calibrated threshold and above every
    # normal segment (the model separates the fault, not merely ranks it a little higher) ...
    assert min(fault) > threshold and min(fault) > max(normal), (fault, threshold, max(normal))
    # ... and in the demo clip (normal, a fault from 5 to 11 s, normal) it is the fault's
    # segments that cross the threshold, give or take the segment at each edge.
    above = {i for i, x in enumerate(demo) if x > threshold}
    assert set(range(6, 10)) <= above <= set(range(4, 12)), (demo, threshold)


def test_spectrogram_png(tmp_path: Path) -> None:
    out = tmp_path / "figs" / "spec.png"
    cli("spectrogram", str(DEMO_CLIP), "--out", str(out))
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10000
    proc = cli("spectrogram", str(tmp_path / "missing.wav"), "--out", str(out), check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
