"""Model bundles: round trip, and refusal of corrupt or incompatible bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import AE_BUNDLE, DEMO_BUNDLE, NORMAL_FILES, cli

from edge.bundle import MANIFEST, MODEL_INT8, load_bundle, manifest_checksum, read_manifest
from edge.errors import BundleError
from edge.features import FeatureParams


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    dst = tmp_path / "copy.bundle"
    shutil.copytree(AE_BUNDLE, dst)
    return dst


def edit_manifest(bundle: Path, change: dict, rechecksum: bool) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    for dotted, value in change.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    if rechecksum:
        data["checksum"] = manifest_checksum(data)
    (bundle / MANIFEST).write_text(json.dumps(data))


def test_bundle_round_trip() -> None:
    b = load_bundle(AE_BUNDLE)
    m = b.manifest
    assert b.features == FeatureParams.from_dict(m.features) == FeatureParams()
    assert b.model.input_shape == (1, 30, 64, 1)
    assert m.input.dtype == "int8" and m.input.scale and m.input.zero_point is not None
    assert m.threshold.value > 0 and m.threshold.rule
    assert m.normal_scores.n_windows > 0 and m.training.seconds > 0 and m.training.files
    assert {"tensorflow", "numpy", "soundsentry"} <= set(m.versions)
    assert (AE_BUNDLE / MODEL_INT8).stat().st_size <= 256 * 1024
    assert load_bundle(AE_BUNDLE, variant="float").model.input_dtype.name == "float32"


def test_fluctuation_bundle_round_trip(tmp_path: Path) -> None:
    b = load_bundle(DEMO_BUNDLE)
    m = b.manifest
    assert m.kind == "fluctuation" and b.model is None and m.statistics is not None
    assert len(m.statistics.precision) == len(m.statistics.center) == b.features.n_mels
    assert m.threshold.rule == "false-alarm-budget/gamma" and m.threshold.value > 0
    broken = tmp_path / "broken.bundle"
    shutil.copytree(DEMO_BUNDLE, broken)
    edit_manifest(broken, {"statistics.center": [0.0, 1.0]}, True)
    with pytest.raises(BundleError, match="inconsistent sizes"):
        load_bundle(broken)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: (b / MANIFEST).write_text("{not json"), "corrupt manifest"),
        (lambda b: edit_manifest(b, {"threshold.value": 0.001}, False), "checksum mismatch"),
        (lambda b: (b / MODEL_INT8).write_bytes(b"\0" * 100), "checksum mismatch"),
        (lambda b: (b / MODEL_INT8).unlink(), "No such file"),
        (lambda b: edit_manifest(b, {"features.frontend": "mfcc-v9"}, True), "cannot reproduce"),
        (lambda b: edit_manifest(b, {"features.n_mels": 40}, True), "does not match"),
        (lambda b: edit_manifest(b, {"format_version": 99}, True), "bundle format 99"),
        (lambda b: edit_manifest(b, {"threshold.value": "high"}, True), "threshold.value"),
    ],
)
def test_damaged_bundle_is_refused_with_one_clear_line(copy: Path, damage, message: str) -> None:
    damage(copy)
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)
    proc = cli("replay", str(copy), str(NORMAL_FILES[0]), check=False)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr


def test_tflite_that_is_not_a_model_is_refused(copy: Path) -> None:
    (copy / MODEL_INT8).write_bytes(b"garbage" * 50)
    edit_manifest(copy, {}, True)
    data = json.loads((copy / MANIFEST).read_text())
    from edge.bundle import sha256_bytes

    data["files"][MODEL_INT8] = sha256_bytes((copy / MODEL_INT8).read_bytes())
    data["checksum"] = manifest_checksum(data)
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="not a loadable TFLite model"):
        load_bundle(copy)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        read_manifest(tmp_path)
