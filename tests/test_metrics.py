"""Metrics match scikit-learn's (the DCASE evaluation uses roc_auc_score with max_fpr)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from train.metrics import partial_auc, roc_auc, spearman


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_pauc_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=60) + labels, 1)  # rounding creates ties
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert partial_auc(labels, scores, 0.1) == pytest.approx(
        roc_auc_score(labels, scores, max_fpr=0.1), abs=1e-12
    )


def test_perfect_and_spearman() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert partial_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
