"""`soundsentry train --detector knn`: a memory bank of normal windows, scored by the mean
distance to the nearest ones (numpy, no TensorFlow).

Each window is the level-aware vector of `levels` (3 features per mel band), standardised and
projected on the first MAX_DIMS principal axes of the training windows; the bank holds the
projected training windows, thinned evenly to at most MAX_BANK rows. The score is the mean
distance to the NEIGHBOURS nearest rows over the median of that distance on held-out normal
audio, so normal running scores about 1 whatever the machine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edge.bundle import write_bundle
from edge.detectors.base import MIN_FEATURE_STD
from edge.detectors.knn import MAX_BANK, MIN_SCALE, KnnScorer, evenly
from edge.detectors.levels import LEVELS, level_features
from edge.errors import AudioError
from train.statistics import STEADY, Design, Run, Trainer, statistics_manifest

log = logging.getLogger(__name__)

NEIGHBOURS = 5
"""k: enough rows to average out one noisy neighbour, few enough that the k nearest of a normal
window still lie on its own stretch of normal running; fixed before any measurement (the
5-NN reference figure in the data README used the same k)."""
MAX_DIMS = 64
"""Principal axes kept: the 3 x 64 features are strongly correlated across bands, and 64 axes
keep one window's search of a full bank well under a millisecond."""
RANK_TOLERANCE = 1e-9
"""Singular values below this share of the largest are not axes (fewer windows than dims)."""
ARCHITECTURE = "knn-bank-v1"
DESIGN = Design("knn", "knn-distance", LEVELS, ARCHITECTURE)


def fit_bank(f: np.ndarray, neighbours: int = NEIGHBOURS, max_dims: int = MAX_DIMS) -> KnnScorer:
    """Standardisation, principal axes and bank of feature vectors (n, dim); scale 1."""
    if len(f) <= neighbours:
        raise AudioError(f"not enough audio for the bank (need more than {neighbours} windows)")
    mean = f.mean(axis=0)
    # in float64: float32 features floored in float32 gave 0.0099999998, a spread under the
    # floor the loader holds training to, so the bundle written did not load
    std = np.maximum(f.std(axis=0, dtype=np.float64), MIN_FEATURE_STD)
    z = (f - mean) / std
    _, sv, axes = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
    dims = max(1, min(max_dims, int((sv > sv[0] * RANK_TOLERANCE).sum())))
    kept = float((sv[:dims] ** 2).sum() / max((sv**2).sum(), 1e-12))
    log.info("bank of %d windows in %d dims (%.1f %% of the variance)", len(f), dims, 100 * kept)
    components = axes[:dims]
    return KnnScorer(mean, std, components, evenly(z @ components.T, MAX_BANK), neighbours, 1.0)


def fit_knn(
    run: Run, false_alarms_per_day: float, neighbours: int = NEIGHBOURS, max_dims: int = MAX_DIMS
) -> Path:
    """The bank of the level-aware features: scale and threshold from the held-out audio
    against a bank without it, the shipped bank from all the audio; writes the bundle."""
    provisional = fit_bank(run.fit, neighbours, max_dims)
    raw, bands = provisional.explain(provisional.embed(run.held))
    scale = float(np.median(raw))
    if scale < MIN_SCALE:
        raise AudioError(
            STEADY.format(why=f"held-out windows at a typical distance of {scale:.2g}")
        )
    run.set_threshold(raw / scale, false_alarms_per_day)
    final = fit_bank(run.all, neighbours, max_dims)
    return _write(run, final, scale, bands)


train_knn = Trainer(level_features, fit_knn)
"""Fit on normal audio and write a bundle; returns its path (see `Trainer`)."""


def _write(run: Run, model: KnnScorer, scale: float, bands: np.ndarray) -> Path:
    arrays = {
        "knn.feature_mean": model.mean,
        "knn.feature_std": model.std,
        "knn.components": model.components,
        "knn.bank": model.bank,
        "knn.neighbours": np.array([model.k]),
        "knn.scale": np.array([scale]),
    }
    parameters = sum(a.size for a in arrays.values())
    manifest = statistics_manifest(run, DESIGN, {}, bands, parameters, model.bank)
    write_bundle(run.out, manifest, {}, arrays | run.state_arrays)
    log.info("wrote %s (%d bank rows, threshold %.4g)", run.out, len(model.bank), run.threshold)
    return run.out
