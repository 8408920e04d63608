"""Model bundles: a folder with the int8 model and a manifest that makes it self-describing.

    fan.bundle/
      manifest.json        feature parameters, quantisation, threshold, provenance, checksums
      model_int8.tflite    the model the edge runs
      model_float.tflite   the float reference (optional; for evaluation)

Loading validates everything: JSON, manifest checksum, file hashes, a feature recipe this
version can reproduce, and a model whose input matches the features.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.errors import BundleError
from edge.features import FeatureParams
from edge.runtime import TfliteModel

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_INT8 = "model_int8.tflite"
MODEL_FLOAT = "model_float.tflite"
FORMAT = "soundsentry-bundle"
FORMAT_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """Shape, dtype and (for int8) quantisation of a model tensor."""

    shape: list[int]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None


class Normalization(_Strict):
    """Per-mel-band standardisation applied to log-mel features before the model."""

    mean: list[float]
    std: list[float]


class Statistics(_Strict):
    """A Gaussian model of per-window feature vectors: standardisation, centre and precision."""

    feature: str
    feature_mean: list[float]
    feature_std: list[float]
    center: list[float]
    precision: list[list[float]]


class ThresholdInfo(_Strict):
    """The decision threshold on window scores and how it was set."""

    value: float
    rule: str
    params: dict[str, Any] = Field(default_factory=dict)


class ScoreStats(_Strict):
    """Distribution of window scores on held-out normal audio."""

    source: str
    n_windows: int
    mean: float
    std: float
    p50: float
    p90: float
    p99: float
    max: float


class TrainingInfo(_Strict):
    """What the model was trained on and how."""

    files: list[str]
    seconds: float
    holdout_files: list[str]
    holdout_seconds: float
    channel: int
    epochs: int
    seed: int
    architecture: str
    parameters: int


class Manifest(_Strict):
    """The bundle's manifest.json."""

    format: Literal["soundsentry-bundle"]
    format_version: int
    model_id: str
    kind: Literal["autoencoder", "classifier", "fluctuation"]
    score: Literal["reconstruction_mse", "softmax", "mahalanobis"]
    labels: list[str] | None = None
    """Class names, in output order (classifier only)."""
    validation: dict[str, Any] | None = None
    """Held-out figures measured at training time (classifier: accuracy, F1, confusion)."""
    features: dict[str, Any]
    normalization: Normalization
    input: TensorSpec | None = None
    output: TensorSpec | None = None
    threshold: ThresholdInfo
    normal_scores: ScoreStats
    normal_band_error: Normalization | None = None
    """Per-mel-band reconstruction error on held-out normal audio (explains anomalies)."""
    training: TrainingInfo
    statistics: Statistics | None = None
    """Fluctuation detector: the normal model of its per-band statistics."""
    calibration: dict[str, Any] | None = None
    """Set by `soundsentry calibrate`: the on-site audio the statistics were refitted on."""
    versions: dict[str, str]
    created_at: str
    files: dict[str, str]
    checksum: str


@dataclass
class Bundle:
    """A validated bundle, ready to score with."""

    path: Path
    manifest: Manifest
    features: FeatureParams
    model: TfliteModel | None
    """None for detectors without a network (kind `fluctuation`)."""
    variant: str

    @property
    def model_id(self) -> str:
        """Stable identifier of the trained model."""
        return self.manifest.model_id

    @property
    def threshold(self) -> float:
        """Decision threshold on window scores."""
        return self.manifest.threshold.value


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a manifest without its checksum field."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_bundle(path: str | Path, manifest: dict[str, Any], files: dict[str, bytes]) -> Path:
    """Write model files and a checksummed manifest into folder `path` (created)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    manifest = {**manifest, "files": {n: sha256_bytes(d) for n, d in files.items()}}
    manifest["checksum"] = manifest_checksum(manifest)
    Manifest.model_validate(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a bundle's manifest (JSON, checksum, fields)."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: no such model bundle")
    file = path / MANIFEST if path.is_dir() else path
    if file.name != MANIFEST:
        raise BundleError(f"{path}: a model bundle is a folder holding {MANIFEST}")
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: not a model bundle (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{file}: corrupt manifest ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{file}: not a SoundSentry bundle manifest")
    if raw.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{file}: bundle format {raw.get('format_version')!r}; this version reads "
            f"{FORMAT_VERSION} (upgrade soundsentry or re-export the model)"
        )
    if raw.get("checksum") != manifest_checksum(raw):
        raise BundleError(f"{file}: manifest checksum mismatch (the file was altered or damaged)")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise BundleError(f"{file}: invalid manifest field {where}: {err['msg']}") from None


def load_bundle(path: str | Path, variant: str = "int8", num_threads: int = 1) -> Bundle:
    """Load and fully validate a bundle; `variant` is 'int8' (the edge) or 'float'."""
    path = Path(path)
    manifest = read_manifest(path)
    folder = path if path.is_dir() else path.parent
    try:
        params = FeatureParams.from_dict(manifest.features)
    except (TypeError, ValueError) as exc:
        raise BundleError(
            f"{path}: feature parameters this version cannot reproduce: {exc}"
        ) from None
    model = None
    if manifest.kind == "fluctuation":
        _check_statistics(path, manifest)
    else:
        name = MODEL_INT8 if variant == "int8" else MODEL_FLOAT
        content = _read_checked(folder, name, manifest)
        model = TfliteModel(content, num_threads=num_threads, name=str(folder / name))
        expected = (1, *params.shape, 1)
        if model.input_shape != expected:
            raise BundleError(
                f"{path}: model input {model.input_shape} does not match the features {expected}"
            )
    if len(manifest.normalization.mean) != params.n_mels:
        raise BundleError(f"{path}: normalisation has the wrong number of mel bands")
    if manifest.kind == "classifier" and not manifest.labels:
        raise BundleError(f"{path}: a classifier bundle needs its class labels")
    return Bundle(path=folder, manifest=manifest, features=params, model=model, variant=variant)


def _check_statistics(path: Path, manifest: Manifest) -> None:
    """A fluctuation bundle's statistics must be complete and square."""
    st = manifest.statistics
    if st is None:
        raise BundleError(f"{path}: a fluctuation bundle needs its statistics")
    n = len(st.feature_mean)
    sizes = {len(st.feature_std), len(st.center), len(st.precision)}
    if sizes != {n} or any(len(row) != n for row in st.precision):
        raise BundleError(f"{path}: statistics arrays have inconsistent sizes")


def _read_checked(folder: Path, name: str, manifest: Manifest) -> bytes:
    """Read a bundle file and check it against the manifest's hash."""
    if name not in manifest.files:
        raise BundleError(f"{folder}: this bundle has no {name}")
    try:
        content = (folder / name).read_bytes()
    except OSError as exc:
        raise BundleError(f"{folder / name}: {exc.strerror or exc}") from None
    if sha256_bytes(content) != manifest.files[name]:
        raise BundleError(f"{folder / name}: checksum mismatch (the file was altered or damaged)")
    return content


def normalization_arrays(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per mel band as float32 arrays."""
    norm = manifest.normalization
    return np.asarray(norm.mean, np.float32), np.asarray(norm.std, np.float32)
