"""Evaluation reports people look at: ROC curves, score histograms with the threshold, a
per-item CSV, a score timeline and the log-mel image the model sees (PNG, matplotlib)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from train.evaluate import Report, write_json
from train.metrics import roc_curve

FIG_DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(
    reports: list[Report],
    folder: Path,
    timeline: tuple[str, np.ndarray, float, float] | None = None,
) -> list[Path]:
    """Write metrics.json, roc.png, histogram.png, scores.csv (and timeline.png) to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "metrics.json"]
    (folder / "metrics.json").write_text(
        json.dumps({r.variant: r.summary() for r in reports}, indent=2) + "\n"
    )
    for r in reports:
        write_json(r, folder / f"evaluation-{r.variant}.json")
    written += [
        _roc(reports, folder / "roc.png"),
        _histograms(reports, folder / "histogram.png"),
        _csv(reports, folder / "scores.csv"),
    ]
    if timeline is not None:
        written.append(_timeline(*timeline, folder / "timeline.png"))
    return written


def _roc(reports: list[Report], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for r in reports:
        labels = np.array([i.label for i in r.items])
        scores = np.array([i.score for i in r.items])
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{r.variant}: AUC {r.auc:.3f}, pAUC {r.pauc:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.axvspan(0, 0.1, color="orange", alpha=0.1, label="pAUC region (FPR ≤ 0.1)")
    ax.set(
        xlabel="false-positive rate", ylabel="true-positive rate", title=f"ROC, {reports[0].unit}"
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)
    return path


def _histograms(reports: list[Report], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(reports), figsize=(5 * len(reports), 3.6), squeeze=False)
    for ax, r in zip(axes[0], reports, strict=True):
        scores = np.array([i.score for i in r.items])
        labels = np.array([i.label for i in r.items])
        bins = np.linspace(scores.min(), max(scores.max(), r.threshold * 1.05), 40)
        ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"normal ({r.n_normal})")
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label=f"anomalous ({r.n_anomalous})")
        ax.axvline(r.threshold, color="red", linestyle="--", label=f"threshold {r.threshold:.3g}")
        ax.set(xlabel="anomaly score", ylabel="count", title=f"{r.variant} model, {r.unit}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)
    return path


def _csv(reports: list[Report], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["file", "segment", "label", *(f"score_{r.variant}" for r in reports)])
        for rows in zip(*(r.items for r in reports), strict=True):
            first = rows[0]
            label = "anomalous" if first.label else "normal"
            seg = "" if first.segment is None else first.segment
            out.writerow([first.file, seg, label, *(f"{row.score:.6g}" for row in rows)])
    return path


def _timeline(name: str, scores: np.ndarray, hop_s: float, threshold: float, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3))
    t = np.arange(len(scores)) * hop_s
    ax.plot(t, scores, marker=".", label="window score")
    ax.axhline(threshold, color="red", linestyle="--", label="threshold")
    ax.set(xlabel="time (s, window start)", ylabel="anomaly score", title=f"score timeline: {name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)
    return path


def plot_confusion(matrix: np.ndarray, labels: list[str], path: Path, title: str) -> Path:
    """A confusion matrix (rows: true class, columns: predicted) as a PNG."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(labels), 1 + 0.6 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(v),
            ha="center",
            va="center",
            color="white" if v > matrix.max() / 2 else "black",
        )
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)
    return path


def plot_spectrogram(features: np.ndarray, params: object, path: Path, title: str) -> Path:
    """The log-mel image of a whole file, in dB, as the model sees it (frames every hop)."""
    from edge.features import mel_band_edges

    plt = _plt()
    p = params
    hop_s = p.hop_length / p.samplerate  # type: ignore[attr-defined]
    edges = mel_band_edges(p)  # type: ignore[arg-type]
    fig, ax = plt.subplots(figsize=(min(14, 3 + features.shape[0] * hop_s * 0.6), 4))
    image = ax.imshow(
        features.T,
        origin="lower",
        aspect="auto",
        cmap="magma",
        extent=(0, features.shape[0] * hop_s, 0, features.shape[1]),
    )
    ticks = np.linspace(0, features.shape[1] - 1, 6).astype(int)
    ax.set_yticks(ticks + 0.5, [f"{edges[i + 1]:.0f}" for i in ticks])
    ax.set(xlabel="time (s)", ylabel="mel band centre (Hz)", title=title)
    fig.colorbar(image, ax=ax, label="dB")
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)
    return path
