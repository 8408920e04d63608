"""`soundsentry train --detector subspace`: the principal subspace of stacked log-mel frames of
normal audio, scored by the distance to it (numpy, no TensorFlow).

The linear form of the DCASE 2020 baseline autoencoder: STACK frames of raw log-mel levels per
vector and COMPONENTS axes, the baseline's context and bottleneck, fixed before any
measurement. Level matters to this model, so a bundle moved to another microphone or place
wants `soundsentry calibrate`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edge.bundle import write_bundle
from edge.detectors.subspace import SubspaceScorer, stacked
from edge.errors import AudioError
from train.statistics import STEADY, Design, Run, Trainer, statistics_manifest

log = logging.getLogger(__name__)

STACK = 5
"""Consecutive frames per vector: the DCASE 2020 baseline's context."""
COMPONENTS = 8
"""Axes of the normal subspace: the DCASE 2020 baseline's bottleneck width."""
MIN_SCALE = 0.01
"""The least typical residual (dB², 6.5 on the fan of shared/data) of a model that can work: a
steady signal's is float rounding (5e-24 for a pure tone, in a review), and dividing by it made
any change an anomaly. Below it training is refused."""
FEATURE = "log-mel-stacked-frames"
ARCHITECTURE = "subspace-pca-v1"
DESIGN = Design("subspace", "subspace-residual", FEATURE, ARCHITECTURE)


def flat_windows(windows: np.ndarray) -> np.ndarray:
    """Log-mel windows (n, frames, mels) as rows (n, frames * mels): the run keeps them whole."""
    return windows.reshape(windows.shape[0], windows.shape[1] * windows.shape[2])


def fit_subspace(rows: np.ndarray, shape: tuple[int, int], stack: int = STACK) -> SubspaceScorer:
    """Origin and principal axes of the stacked frames of windows given as rows; scale 1."""
    windows = rows.reshape(len(rows), *shape)
    x = stacked(windows, stack).reshape(-1, stack * shape[1])
    if len(x) <= COMPONENTS:
        raise AudioError(f"not enough audio for the subspace (need more than {COMPONENTS} frames)")
    mean = x.mean(axis=0)
    _, sv, axes = np.linalg.svd(x - mean, full_matrices=False)
    kept = float((sv[:COMPONENTS] ** 2).sum() / max((sv**2).sum(), 1e-12))
    log.info(
        "subspace of %d axes over %d vectors (%.1f %% of the variance)",
        COMPONENTS,
        len(x),
        100 * kept,
    )
    return SubspaceScorer(mean, axes[:COMPONENTS], stack, 1.0)


def fit_subspace_run(run: Run, false_alarms_per_day: float) -> Path:
    """The scale and threshold from held-out audio against a subspace fitted without it, the
    shipped subspace from all the audio; writes the bundle."""
    shape = run.params.shape
    provisional = fit_subspace(run.fit, shape)
    raw, bands = provisional.explain(run.held.reshape(len(run.held), *shape))
    scale = float(np.median(raw))
    if scale < MIN_SCALE:
        raise AudioError(
            STEADY.format(why=f"held-out windows at a typical residual of {scale:.2g}")
        )
    run.set_threshold(raw / scale, false_alarms_per_day)
    final = fit_subspace(run.all, shape)
    arrays = {
        "subspace.mean": final.mean,
        "subspace.components": final.components,
        "subspace.stack": np.array([final.stack]),
        "subspace.scale": np.array([scale]),
    }
    parameters = sum(a.size for a in arrays.values())
    manifest = statistics_manifest(run, DESIGN, {}, bands / scale, parameters, final.components)
    write_bundle(run.out, manifest, {}, arrays)
    log.info("wrote %s (threshold %.4g)", run.out, run.threshold)
    return run.out


train_subspace = Trainer(flat_windows, fit_subspace_run)
"""Fit on normal audio and write a bundle; returns its path (see `Trainer`)."""
