"""`soundsentry train`: normal recordings -> autoencoder -> int8 TFLite -> threshold -> bundle."""

from __future__ import annotations

import logging
import platform
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from edge import __version__
from edge.bundle import (
    FORMAT,
    FORMAT_VERSION,
    MODEL_FLOAT,
    MODEL_INT8,
    id_stem,
    sha256_bytes,
    write_bundle,
)
from edge.features import FeatureParams
from edge.runtime import TfliteModel, runtime_name
from edge.scoring import Scorer
from edge.threshold import DEFAULT_FALSE_ALARMS_PER_DAY, RULE, score_stats
from train.augment import Augmenter
from train.dataset import Split, load_split, threshold_from_holdout
from train.model import ARCHITECTURE, build_autoencoder
from train.quantize import to_float_tflite, to_int8_tflite

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 40
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
STD_FLOOR_DB = 0.1
"""Smallest per-band standard deviation used for normalisation (avoids dividing by ~0)."""


class EpochLines(keras.callbacks.Callback):
    """One line per epoch, `epoch 3/30, training windows: loss 0.412, accuracy 0.87`, as the
    embedding's training prints them: Keras's own were two lines an epoch off a terminal and a
    bar on one, so the three networks' trainings read differently (in a review). The figures
    are of the windows it trains on: a classifier's accuracy 1 there was read as its
    validation (another review)."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        shown = ", ".join(f"{k} {float(v):.3g}" for k, v in (logs or {}).items())
        print(f"epoch {epoch + 1}/{self.epochs}, training windows: {shown}", flush=True)


def train_bundle(
    normal: list[str | Path],
    out: str | Path,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    channel: int = 0,
    params: FeatureParams | None = None,
    false_alarms_per_day: float = DEFAULT_FALSE_ALARMS_PER_DAY,
    augment: Augmenter | None = None,
) -> Path:
    """Train on normal audio and write a validated bundle to `out`; returns its path."""
    params = params or FeatureParams()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    split = load_split(normal, params, channel)
    windows = split.train.windows
    rng = np.random.default_rng(seed)
    if augment is not None:
        windows, _ = augment.expand(windows, None, rng)
    mean = windows.mean(axis=(0, 1))
    std = np.maximum(windows.std(axis=(0, 1)), STD_FLOOR_DB)
    x = ((windows - mean) / std)[..., None].astype(np.float32)
    x_in = x if augment is None else ((augment.mask(windows, rng) - mean) / std)[..., None]

    model = build_autoencoder(*params.shape)
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss="mse")
    model.fit(
        x_in.astype(np.float32),
        x,
        epochs=epochs,
        batch_size=BATCH_SIZE,
        shuffle=True,
        verbose=0,
        callbacks=[EpochLines(epochs)],
    )

    float_tflite = to_float_tflite(model)
    int8_tflite = to_int8_tflite(model, x, seed)
    scorer = Scorer(TfliteModel(int8_tflite, name="int8 model"), mean, std)
    scored = [scorer.score(w) for w in split.holdout.windows]
    scores = np.array([s.score for s in scored])
    band_error = np.stack([s.band_error for s in scored])
    value, rule_params = threshold_from_holdout(
        scores, false_alarms_per_day, params.hop_seconds, pieces=split.holdout.pieces
    )

    out = Path(out)
    manifest = _manifest(
        out,
        params,
        split,
        mean,
        std,
        scorer,
        value,
        rule_params,
        scores,
        epochs,
        seed,
        channel,
        model.count_params(),
        int8_tflite,
    )
    if augment is not None:  # how the network was made, for whoever retrains it
        manifest["training"] |= augment.record()
    manifest["normal_band_error"] = {
        "mean": band_error.mean(axis=0).tolist(),
        "std": band_error.std(axis=0).tolist(),
    }
    write_bundle(out, manifest, {MODEL_INT8: int8_tflite, MODEL_FLOAT: float_tflite})
    log.info("wrote %s (int8 model %.1f KB, threshold %.4g)", out, len(int8_tflite) / 1024, value)
    return out


def base_manifest(
    out: Path,
    params: FeatureParams,
    mean: np.ndarray,
    std: np.ndarray,
    model: TfliteModel,
    int8: bytes,
) -> dict:
    """Manifest fields every kind of bundle shares (write_bundle adds hashes and checksum)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": f"{id_stem(out)}-{sha256_bytes(int8)[:8]}",
        "features": params.to_dict(),
        "normalization": {"mean": mean.tolist(), "std": std.tolist()},
        "input": _tensor(model.input_shape, model.input_dtype, model.input_quant),
        "versions": _versions(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


def _manifest(
    out: Path,
    params: FeatureParams,
    split: Split,
    mean: np.ndarray,
    std: np.ndarray,
    scorer: Scorer,
    threshold: float,
    rule_params: dict,
    scores: np.ndarray,
    epochs: int,
    seed: int,
    channel: int,
    n_params: int,
    int8: bytes,
) -> dict:
    """The autoencoder's manifest."""
    m = scorer.model
    return base_manifest(out, params, mean, std, m, int8) | {
        "kind": "autoencoder",
        "score": "reconstruction_mse",
        "output": _tensor(m.input_shape, m.output_dtype, m.output_quant),
        "threshold": {"value": threshold, "rule": RULE, "params": rule_params},
        "normal_scores": score_stats(scores, "held-out normal audio"),
        "machine": split.machine or None,
        "training": {
            "files": split.train.files,
            "seconds": round(split.train.seconds + split.holdout.seconds, 3),
            "holdout_files": split.holdout.files,
            "holdout_seconds": round(split.holdout.seconds, 3),
            "channel": channel,
            "epochs": epochs,
            "seed": seed,
            "architecture": ARCHITECTURE,
            "parameters": int(n_params),
        },
    }


def _tensor(shape: tuple, dtype: np.dtype, quant: object) -> dict:
    spec = {"shape": list(shape), "dtype": str(dtype)}
    if quant is not None:
        spec |= {"scale": quant.scale, "zero_point": quant.zero_point}  # type: ignore[attr-defined]
    return spec


def _versions() -> dict[str, str]:
    return {
        "soundsentry": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "runtime": runtime_name(),
        "librosa": _dist_version("librosa"),
    }


def _dist_version(name: str) -> str:
    try:
        return version(name)
    except Exception:  # not installed: record that rather than fail
        return "absent"
