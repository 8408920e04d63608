"""Export to TFLite: a float reference and a full-integer int8 model for the edge."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

REPRESENTATIVE_WINDOWS = 300
"""Training windows fed to the int8 calibrator."""


@contextlib.contextmanager
def _native_stderr_kept_back() -> Iterator[None]:
    """TensorFlow's converter writes lines of its own to the process's stderr from C++
    (`fully_quantize: 0, inference_type: 6 ...`, `NodeDef mentions attribute ...`), which read
    like errors in the middle of `train`'s output. They go to a temporary file instead, and are
    shown only if the conversion fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as kept:
        os.dup2(kept.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            kept.seek(0)
            sys.stderr.write(kept.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _converter(model: object, tmp: str) -> tf.lite.TFLiteConverter:
    model.export(tmp, format="tf_saved_model", verbose=False)  # type: ignore[attr-defined]
    return tf.lite.TFLiteConverter.from_saved_model(tmp)


def to_float_tflite(model: object) -> bytes:
    """Float32 TFLite flatbuffer of a Keras model."""
    with tempfile.TemporaryDirectory() as tmp, _native_stderr_kept_back():
        return _converter(model, tmp).convert()


def to_int8_tflite(
    model: object, windows: np.ndarray, seed: int = 0, groups: np.ndarray | None = None
) -> bytes:
    """Full-integer int8 TFLite (int8 input and output), calibrated on `windows` (N, T, F, 1);
    with `groups` (a class per window), as many of each group as it has up to an equal share:
    drawn from all at random, 20 h of normal running beside 2 min of a fault gave the fault
    none, and its activations a range they may clip in."""
    rng = np.random.default_rng(seed)
    pick = _representative(len(windows), rng, groups)

    def representative() -> Iterator[list[np.ndarray]]:
        for i in pick:
            yield [windows[i : i + 1].astype(np.float32)]

    with tempfile.TemporaryDirectory() as tmp, _native_stderr_kept_back():
        conv = _converter(model, tmp)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
        return conv.convert()


def _representative(n: int, rng: np.random.Generator, groups: np.ndarray | None) -> np.ndarray:
    """Indices of the windows the calibrator sees (module docstring of to_int8_tflite)."""
    if groups is None:
        return rng.choice(n, size=min(REPRESENTATIVE_WINDOWS, n), replace=False)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    share = max(1, REPRESENTATIVE_WINDOWS // len(members))
    return np.concatenate([rng.choice(m, size=min(share, len(m)), replace=False) for m in members])
