"""Detection metrics in numpy: ROC AUC and the DCASE partial AUC (McClish-standardised)."""

from __future__ import annotations

import numpy as np

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed it; 1.x has trapz


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and thresholds (higher score = anomalous)."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.all() or not labels.any():
        raise ValueError("ROC needs both normal and anomalous examples")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return fpr, tpr, np.r_[np.inf, s[distinct]]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(_trapezoid(tpr, fpr))


def partial_auc(labels: np.ndarray, scores: np.ndarray, max_fpr: float = 0.1) -> float:
    """Partial AUC up to `max_fpr`, standardised as scikit-learn and the DCASE metric do."""
    fpr, tpr, _ = roc_curve(labels, scores)
    stop = int(np.searchsorted(fpr, max_fpr, side="right"))
    x = [fpr[stop - 1], fpr[stop]]
    y = [tpr[stop - 1], tpr[stop]]
    tpr_c = np.r_[tpr[:stop], np.interp(max_fpr, x, y)]
    fpr_c = np.r_[fpr[:stop], max_fpr]
    area = float(_trapezoid(tpr_c, fpr_c))
    min_area, max_area = 0.5 * max_fpr**2, max_fpr
    return 0.5 * (1 + (area - min_area) / (max_area - min_area))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def classification_report(truth: np.ndarray, pred: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro F1, per-class recall (None for a class with no test
    items) and the confusion matrix."""
    n = len(labels)
    truth = np.asarray(truth, int)
    pred = np.asarray(pred, int)
    confusion = np.zeros((n, n), dtype=int)
    np.add.at(confusion, (truth, pred), 1)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    tp = np.diag(confusion).astype(float)
    recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(n), where=(precision + recall) > 0
    )
    present = support > 0
    return {
        "labels": labels,
        "n": len(truth),
        "accuracy": round(float(tp.sum() / max(len(truth), 1)), 4),
        "balanced_accuracy": round(float(recall[present].mean()), 4),
        "macro_f1": round(float(f1[present].mean()), 4),
        # a class without test items has no recall (None), not 0: nothing of it was missed
        "recall": {
            lab: round(float(r), 4) if n_true else None
            for lab, r, n_true in zip(labels, recall, support, strict=True)
        },
        "confusion": confusion.tolist(),
    }
