"""`soundsentry evaluate`: score normal and anomalous recordings; ROC AUC, pAUC and counts.

Needs only the edge install (numpy and the TFLite runtime): it runs on the Pi too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge.audio_io import find_audio, read_audio
from edge.bundle import MODEL_FLOAT, load_bundle
from edge.errors import AudioError
from edge.features import windows_of
from edge.scoring import Scorer
from train.metrics import partial_auc, roc_auc
from train.progress import progress

log = logging.getLogger(__name__)

MAX_FPR = 0.1


@dataclass
class Scored:
    """One scored item: a whole file or a segment of it."""

    file: str
    segment: int | None
    label: int
    score: float


@dataclass
class Report:
    """Evaluation results."""

    model: str
    variant: str
    unit: str
    auc: float
    pauc: float
    max_fpr: float
    n_normal: int
    n_anomalous: int
    threshold: float
    tpr_at_threshold: float
    fpr_at_threshold: float
    items: list[Scored] = field(default_factory=list)

    def summary(self) -> dict:
        """Metrics without per-item scores (what --json writes, plus the items)."""
        data = asdict(self)
        data.pop("items")
        return data


def item_scores(
    scorer: Scorer, windows: np.ndarray, window_s: float, hop_s: float, segment_s: float | None
) -> list[tuple[int | None, float]]:
    """Mean window score of the whole file, or of each consecutive segment of `segment_s`."""
    scores = scorer.score_many(windows)
    return [
        (k, float(scores[idx].mean()))
        for k, idx in segment_groups(len(scores), window_s, hop_s, segment_s)
    ]


def evaluate(
    model: str | Path,
    normal: list[str | Path],
    anomalous: list[str | Path],
    segment: float | None = None,
    variant: str = "int8",
    channel: int = 0,
) -> Report:
    """Score every file (or segment) and compute AUC / pAUC with anomalous as positive."""
    bundle = load_bundle(model, variant=variant)
    if bundle.model is None:
        variant = "numpy"  # no network: the same statistics serve both
    scorer = Scorer.from_bundle(bundle)
    p = bundle.features
    if segment is not None and segment < p.window_seconds:
        raise AudioError(f"--segment must be at least the window length ({p.window_seconds} s)")
    items: list[Scored] = []
    for label, paths in ((0, normal), (1, anomalous)):
        files = find_audio(paths)
        if not files:
            raise AudioError(f"no audio files in {' '.join(str(x) for x in paths)}")
        for path in progress(files, "scoring"):
            windows = windows_of(read_audio(path, p.samplerate, channel), p)
            if len(windows) == 0:
                log.warning("%s: shorter than one window; skipped", path)
                continue
            for seg, score in item_scores(
                scorer, windows, p.window_seconds, p.hop_seconds, segment
            ):
                items.append(Scored(str(path), seg, label, score))
    labels = np.array([i.label for i in items])
    scores = np.array([i.score for i in items])
    threshold = bundle.threshold
    return Report(
        model=bundle.model_id,
        variant=variant,
        unit=f"{segment:g}-s segments" if segment else "whole files",
        auc=round(roc_auc(labels, scores), 4),
        pauc=round(partial_auc(labels, scores, MAX_FPR), 4),
        max_fpr=MAX_FPR,
        n_normal=int((labels == 0).sum()),
        n_anomalous=int((labels == 1).sum()),
        threshold=threshold,
        tpr_at_threshold=round(float((scores[labels == 1] > threshold).mean()), 4),
        fpr_at_threshold=round(float((scores[labels == 0] > threshold).mean()), 4),
        items=items,
    )


def write_json(report: Report, path: str | Path) -> None:
    """Metrics and per-item scores as JSON (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = report.summary() | {"items": [asdict(i) for i in report.items]}
    path.write_text(json.dumps(data, indent=2) + "\n")


def format_report(report: Report) -> str:
    """Human-readable summary."""
    return (
        f"model {report.model} ({report.variant}), {report.unit}: "
        f"AUC {report.auc:.3f}  pAUC(FPR<={report.max_fpr}) {report.pauc:.3f}  "
        f"normal {report.n_normal}  anomalous {report.n_anomalous}  "
        f"at threshold {report.threshold:.4g}: TPR {report.tpr_at_threshold:.2f} "
        f"FPR {report.fpr_at_threshold:.2f}"
    )


def write_full_report(args: object, report: Report) -> list[Path]:
    """`evaluate --report DIR`: int8 and float side by side, plus a score timeline."""
    try:
        from train.report import write_report
    except ImportError as exc:
        raise AudioError(f"--report needs the [train] extra ({exc})") from None
    a = args
    reports = [report]
    bundle = load_bundle(a.model)  # type: ignore[attr-defined]
    other = "float" if report.variant == "int8" else "int8"
    if report.variant != "numpy" and (other == "int8" or MODEL_FLOAT in bundle.manifest.files):
        reports.append(evaluate(a.model, a.normal, a.anomalous, a.segment, other, a.channel))  # type: ignore[attr-defined]
    reports.sort(key=lambda r: r.variant != "int8")
    timeline_file = a.timeline or find_audio(a.anomalous)[0]  # type: ignore[attr-defined]
    p = bundle.features
    windows = windows_of(read_audio(timeline_file, p.samplerate, a.channel), p)  # type: ignore[attr-defined]
    scores = Scorer.from_bundle(bundle).score_many(windows)
    timeline = (Path(timeline_file).name, scores, p.hop_seconds, bundle.threshold)
    return write_report(reports, Path(a.report), timeline)  # type: ignore[attr-defined]


def render_spectrogram(
    file: str | Path, out: str | Path, model: str | Path | None = None, channel: int = 0
) -> Path:
    """`soundsentry spectrogram`: the log-mel image of a file as the model sees it."""
    from edge.bundle import read_manifest
    from edge.features import FeatureParams, LogMel

    try:
        from train.report import plot_spectrogram
    except ImportError as exc:
        raise AudioError(f"spectrogram needs the [train] extra ({exc})") from None
    params = FeatureParams.from_dict(read_manifest(model).features) if model else FeatureParams()
    audio = read_audio(file, params.samplerate, channel)
    if len(audio) < params.n_fft:
        raise AudioError(f"{file}: shorter than one FFT frame")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return plot_spectrogram(LogMel(params)(audio), params, out, f"log-mel: {Path(file).name}")


def classify_items(
    model: str | Path, classes_dir: str | Path, segment: float | None, variant: str, channel: int
) -> tuple[list[str], list[tuple[str, int | None, int, int]]]:
    """Per file (or segment): (file, segment, true index, predicted index) by mean probability."""
    from train.dataset import class_folders

    bundle = load_bundle(model, variant=variant)
    if bundle.manifest.kind != "classifier":
        raise AudioError("--classes needs a classifier bundle (trained with --classes)")
    labels = bundle.manifest.labels or []
    scorer = Scorer.from_bundle(bundle)
    p = bundle.features
    rows = []
    for name, files in class_folders(classes_dir).items():
        if name not in labels:
            raise AudioError(f"class folder {name!r} is not one of the model's {labels}")
        for path in progress(files, f"scoring {name}"):
            windows = windows_of(read_audio(path, p.samplerate, channel), p)
            if len(windows) == 0:
                continue
            probs = np.stack([scorer.probabilities(w) for w in windows])
            groups = segment_groups(len(windows), p.window_seconds, p.hop_seconds, segment)
            for seg, idx in groups:
                pred = int(probs[idx].mean(axis=0).argmax())
                rows.append((str(path), seg, labels.index(name), pred))
    return labels, rows


def segment_groups(
    n: int, window_s: float, hop_s: float, segment: float | None
) -> list[tuple[int | None, np.ndarray]]:
    """Indices of the windows lying wholly inside each consecutive segment (or all of them)."""
    if segment is None:
        return [(None, np.arange(n))]
    starts = np.arange(n) * hop_s
    out = []
    for k in range(int(np.floor((starts[-1] + window_s + 1e-9) / segment))):
        inside = np.nonzero(
            (starts >= k * segment - 1e-9) & (starts + window_s <= (k + 1) * segment + 1e-9)
        )[0]
        if len(inside):
            out.append((k, inside))
    return out


def evaluate_classes(args: object) -> int:
    """`evaluate MODEL --classes DIR`: accuracy, balanced accuracy, macro F1, confusion."""
    from train.metrics import classification_report

    a = args
    labels, rows = classify_items(a.model, a.classes, a.segment, a.variant, a.channel)  # type: ignore[attr-defined]
    report = classification_report(
        np.array([r[2] for r in rows]), np.array([r[3] for r in rows]), labels
    )
    unit = f"{a.segment:g}-s segments" if a.segment else "whole files"  # type: ignore[attr-defined]
    print(
        f"{a.variant} classifier, {unit}: accuracy {report['accuracy']:.3f}  "  # type: ignore[attr-defined]
        f"balanced accuracy {report['balanced_accuracy']:.3f}  "
        f"macro F1 {report['macro_f1']:.3f}  n {report['n']}"
    )
    width = max(len(lab) for lab in labels)
    print(" " * (width + 2) + " ".join(f"{lab[:8]:>8}" for lab in labels) + "   <- predicted")
    for lab, row in zip(labels, report["confusion"], strict=True):
        print(f"{lab:>{width}}  " + " ".join(f"{v:>8}" for v in row))
    data = report | {
        "unit": unit,
        "variant": a.variant,  # type: ignore[attr-defined]
        "items": [
            dict(
                zip(
                    ("file", "segment", "label", "predicted"),
                    (f, s, labels[t], labels[p]),
                    strict=True,
                )
            )
            for f, s, t, p in rows
        ],
    }
    if a.json:  # type: ignore[attr-defined]
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[attr-defined]
        Path(a.json).write_text(json.dumps(data, indent=2) + "\n")  # type: ignore[attr-defined]
    if a.report:  # type: ignore[attr-defined]
        from train.report import plot_confusion

        folder = Path(a.report)  # type: ignore[attr-defined]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(data, indent=2) + "\n")
        plot_confusion(
            np.array(report["confusion"]),
            labels,
            folder / "confusion.png",
            f"{a.variant} classifier, {unit}",
        )  # type: ignore[attr-defined]
        print(f"report written to {folder}: metrics.json, confusion.png")
    return 0
