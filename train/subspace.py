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
FIT_BLOCK = 256
"""Windows stacked at a time while fitting (about 20 MB of stacked vectors)."""
FEATURE = "log-mel-stacked-frames"
ARCHITECTURE = "subspace-pca-v1"
DESIGN = Design("subspace", "subspace-residual", FEATURE, ARCHITECTURE)


def flat_windows(windows: np.ndarray) -> np.ndarray:
    """Log-mel windows (n, frames, mels) as rows (n, frames * mels): the run keeps them whole."""
    return windows.reshape(windows.shape[0], windows.shape[1] * windows.shape[2])


def fit_subspace(rows: np.ndarray, shape: tuple[int, int], stack: int = STACK) -> SubspaceScorer:
    """Origin and principal axes of the stacked frames of windows given as rows; scale 1.

    The scatter matrix of the stacked vectors is summed a block of windows at a time: stacked
    whole (4.4 times the windows), centred and decomposed by SVD, an hour of audio took about
    5 GB, in a review. The axes are the scatter's leading eigenvectors, as the SVD's."""
    dim = stack * shape[1]
    total, shift = 0, None
    sums, scatter = np.zeros(dim), np.zeros((dim, dim))
    for first in range(0, len(rows), FIT_BLOCK):
        block = rows[first : first + FIT_BLOCK].reshape(-1, *shape)
        x = stacked(block, stack).reshape(-1, dim).astype(np.float64)
        if shift is None:  # centred near the mean first: no cancellation in the scatter
            shift = x.mean(axis=0)
        x -= shift
        total += len(x)
        sums += x.sum(axis=0)
        scatter += x.T @ x
    if total <= COMPONENTS or shift is None:
        raise AudioError(f"not enough audio for the subspace (need more than {COMPONENTS} frames)")
    offset = sums / total
    scatter -= total * np.outer(offset, offset)
    values, vectors = np.linalg.eigh(scatter)  # ascending
    order = np.argsort(values)[::-1]
    values = np.maximum(values[order], 0.0)
    kept = float(values[:COMPONENTS].sum() / max(values.sum(), 1e-12))
    log.info(
        "subspace of %d axes over %d vectors (%.1f %% of the variance)",
        COMPONENTS,
        total,
        100 * kept,
    )
    return SubspaceScorer(shift + offset, vectors[:, order[:COMPONENTS]].T, stack, 1.0)


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
    write_bundle(run.out, manifest, {}, arrays | run.state_arrays)
    log.info("wrote %s (threshold %.4g)", run.out, run.threshold)
    return run.out


train_subspace = Trainer(flat_windows, fit_subspace_run)
"""Fit on normal audio and write a bundle; returns its path (see `Trainer`)."""
