"""What `soundsentry evaluate` and `soundsentry spectrogram` print and draw: the one-line
summary, the classifier's confusion table, and the reports people look at: ROC curves, score
histograms with the threshold, a per-item CSV, a score timeline, a confusion matrix and the
log-mel image the model sees (PNG, matplotlib).

The numbers come from `train.evaluate`; this module only presents them. matplotlib is
imported when a PNG is drawn, so printing works on the bare edge install.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.audio_io import find_audio, first_few, read_audio
from edge.bundle import MODEL_FLOAT, load_bundle, read_manifest
from edge.errors import AudioError, SoundSentryError, install_extra
from edge.features import FeatureParams, LogMel, mel_band_edges
from edge.private import atomic_write
from edge.settings import DetectorSettings
from train.evaluate import (
    Report,
    classification,
    device_run,
    evaluate,
    evidence_scores,
    output_target,
    printable,
    write_json,
    write_text_output,
)
from train.metrics import roc_curve

FIG_DPI = 110


def format_report(report: Report) -> str:
    """Human-readable summary."""
    return (
        f"model {report.model} ({report.variant}), {report.unit}: "
        f"AUC {report.auc:.3f}  pAUC(FPR<={report.max_fpr}) {_pauc(report)}  "
        f"normal {report.n_normal}  anomalous {report.n_anomalous}  "
        f"files with an event at threshold {report.threshold:.4g}"
        + (" (the int8 model's)" if report.variant == "float" else "")
        + f": anomalous {report.anomalous_files_with_event}, normal "
        f"{report.normal_files_with_event}" + _named_files(report) + _off_note(report)
    )


def _named_files(report: Report) -> str:
    """Which normal files raised an event and which faults raised none: the recordings to
    listen to, which the counts alone did not name (a new user's walk-through)."""
    lines = []
    if report.normal_files_raising:
        lines.append(
            f"normal files with an event: {first_few(map(shown, report.normal_files_raising))}"
        )
    if report.anomalous_files_silent:
        lines.append(
            f"anomalous files without one: {first_few(map(shown, report.anomalous_files_silent))}"
        )
    return "".join(f"\n{line}" for line in lines)


def _pauc(report: Report) -> str:
    """The pAUC, or `n/a` when fewer normal items than 1 / max_fpr leave it resting on none (as
    the warning above it says): "pAUC 0.579" beside "AUC 0.200" read as a figure."""
    return f"{report.pauc:.3f}" if report.pauc_measured else "n/a"


def _off_note(report: Report) -> str:
    """Windows the device would take for the machine off: they raise no event there."""
    off = report.normal_windows_off + report.anomalous_windows_off
    if not off:
        return ""
    return (
        f"\nwindows with the machine off (quieter than the model's off level, or nearer its "
        f"state `off`; the device raises no event on them): anomalous "
        f"{report.anomalous_windows_off}, normal "
        f"{report.normal_windows_off}"
    )


def format_classification(data: dict) -> str:
    """The classifier's summary line and its confusion table (rows: true class)."""
    labels = data["labels"]
    lines = [
        f"{data['variant']} classifier, {data['unit']}: accuracy {data['accuracy']:.3f}  "
        f"balanced accuracy {data['balanced_accuracy']:.3f}  "
        f"macro F1 {data['macro_f1']:.3f}  n {data['n']}"
    ]
    width = max(len(lab) for lab in [*labels, "recall"])
    cell = max(8, *(len(lab) for lab in labels))  # whole names: bearing_fault, bearing_wear
    lines.append(
        " " * (width + 2) + " ".join(f"{lab:>{cell}}" for lab in labels) + "   <- predicted"
    )
    for lab, row in zip(labels, data["confusion"], strict=True):
        lines.append(f"{lab:>{width}}  " + " ".join(f"{v:>{cell}}" for v in row))
    recall = data.get("recall") or {}
    if recall:  # of each true class: the share found
        lines.append(
            f"{'recall':>{width}}  " + " ".join(_recall_cell(recall[lab], cell) for lab in labels)
        )
    events = data.get("events") or {}
    if events:
        lines.append("events the device raises, each file its own stream:")
    for name, row in events.items():
        if row["healthy"]:  # no event of its own: any is another class's, a false alarm
            said = f"{row['other']} raise an event (false alarms: another class named)"
        else:
            said = f"{row['own']} raise an event of {name!r}, {row['other']} of another class"
        lines.append(f"{name:>{width}}  {row['files']} file(s): {said}")
    return "\n".join(lines)


def _recall_cell(value: float | None, cell: int) -> str:
    """A class's recall, or `n/a` for one with no test items (0.000 read as all missed)."""
    return f"{'n/a':>{cell}}" if value is None else f"{value:>{cell}.3f}"


def evaluate_classes(
    model: str | Path,
    classes_dir: str | Path,
    segment: float | None = None,
    variant: str = "int8",
    channel: int = 0,
    json_path: str | Path | None = None,
    report_dir: str | Path | None = None,
) -> int:
    """`evaluate MODEL --classes DIR`: accuracy, balanced accuracy, macro F1, confusion."""
    data = classification(model, classes_dir, segment, variant, channel)
    print(format_classification(data))
    text = json.dumps(data, indent=2) + "\n"
    if json_path:
        write_text_output(json_path, text)
    if report_dir:
        folder = Path(report_dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_output(folder / "metrics.json", text)
        plot_confusion(
            np.array(data["confusion"]),
            data["labels"],
            folder / "confusion.png",
            f"{variant} classifier, {data['unit']}",
        )
        print(f"report written to {folder}: metrics.json, confusion.png")
    return 0


def write_full_report(
    report: Report,
    model: str | Path,
    normal: Sequence[str | Path],
    anomalous: Sequence[str | Path],
    folder: str | Path,
    segment: float | None = None,
    channel: int = 0,
    timeline_file: str | Path | None = None,
    detector: DetectorSettings | None = None,
) -> list[Path]:
    """`evaluate --report DIR`: int8 and float side by side, plus a score timeline of
    `timeline_file` (default: the first anomalous file); `detector`: the `[detector]` settings
    `report` was made with (`evaluate --config`), for the other variant and the timeline too."""
    reports = [report]
    variant = "int8" if report.variant == "numpy" else report.variant
    bundle = load_bundle(model, variant=variant)
    other = "float" if report.variant == "int8" else "int8"
    if report.variant != "numpy" and (other == "int8" or MODEL_FLOAT in bundle.manifest.files):
        logging.disable(logging.WARNING)  # the same files' warnings were said the first time
        try:
            reports.append(
                evaluate(model, list(normal), list(anomalous), segment, other, channel, detector)
            )
        finally:
            logging.disable(logging.NOTSET)
    reports.sort(key=lambda r: r.variant != "int8")
    timeline_file = timeline_file or find_audio(list(anomalous))[0]
    p = bundle.features
    # as the device scores it: windows it judges nothing by (silence, a dropout, the machine
    # off) are gaps, not the hundreds a dropout scores
    audio = read_audio(timeline_file, p.samplerate, channel, mono_any=True)
    steps, events = device_run(audio, bundle, detector)
    scores = evidence_scores(steps)
    name = f"{Path(timeline_file).name} ({report.variant})"
    # the threshold the device runs with (a [detector] threshold drew the bundle's, in a review)
    timeline = Timeline(name, scores, p.hop_seconds, report.threshold, events)
    return write_report(reports, Path(folder), timeline)


def render_spectrogram(
    file: str | Path, out: str | Path, model: str | Path | None = None, channel: int = 0
) -> Path:
    """`soundsentry spectrogram`: the log-mel image of a file as the model sees it."""
    params = FeatureParams.from_dict(read_manifest(model).features) if model else FeatureParams()
    audio = read_audio(file, params.samplerate, channel)
    if len(audio) < params.n_fft:
        raise AudioError(f"{file}: shorter than one FFT frame")
    out = Path(out)
    # the format the name asks for where matplotlib writes it (spec.jpg, spec.svg, spec.pdf);
    # any other name gets a PNG, and the line that names the file says so
    _plt()
    from matplotlib.backend_bases import FigureCanvasBase

    if out.suffix.lower().lstrip(".") not in FigureCanvasBase.get_supported_filetypes():
        out = out.with_name(out.name + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    return plot_spectrogram(
        LogMel(params)(audio), params, out, f"log-mel: {shown(Path(file).name)}"
    )


def _plt():
    try:
        import matplotlib
    except ImportError as exc:
        raise SoundSentryError(
            f"PNG reports need the [report] extra ({exc}): " + install_extra("report")
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(
    reports: list[Report],
    folder: Path,
    timeline: Timeline | None = None,
) -> list[Path]:
    """Write metrics.json, evaluation-VARIANT.json (every item's score), roc.png, histogram.png,
    scores.csv (and timeline.png) to `folder`; returns what it wrote (the list said, once, all
    but the evaluation files)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "metrics.json"]
    write_text_output(  # atomic, as every file of the report: a second run that fails part-way
        # leaves the first run's files whole, never a torn one beside them
        folder / "metrics.json",
        json.dumps({r.variant: r.summary() for r in reports}, indent=2) + "\n",
    )
    for r in reports:
        written.append(folder / f"evaluation-{r.variant}.json")
        write_json(r, written[-1])
    written += [
        _roc(reports, folder / "roc.png"),
        _histograms(reports, folder / "histogram.png"),
        _csv(reports, folder / "scores.csv"),
    ]
    if timeline is not None:
        written.append(_timeline(timeline, folder / "timeline.png"))
    return written


def _roc(reports: list[Report], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for r in reports:
        labels = np.array([i.label for i in r.items])
        scores = np.array([i.score for i in r.items])
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{r.variant}: AUC {r.auc:.3f}, pAUC {_pauc(r)}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.axvspan(0, 0.1, color="orange", alpha=0.1, label="pAUC region (FPR ≤ 0.1)")
    ax.set(
        xlabel="false-positive rate", ylabel="true-positive rate", title=f"ROC, {reports[0].unit}"
    )
    ax.legend(loc="lower right", fontsize=8)
    return _save(plt, fig, path)


def _histograms(reports: list[Report], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(reports), figsize=(5 * len(reports), 3.6), squeeze=False)
    for ax, r in zip(axes[0], reports, strict=True):
        scores = np.array([i.score for i in r.items])
        labels = np.array([i.label for i in r.items])
        bins = np.linspace(scores.min(), max(scores.max(), r.threshold * 1.05), 40)
        ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"normal ({r.n_normal})")
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label=f"anomalous ({r.n_anomalous})")
        ax.axvline(
            r.threshold, color="red", linestyle="--", label=f"window threshold {r.threshold:.3g}"
        )
        ax.set(  # an item's mean may lie below the line while K of its windows pass it
            xlabel="mean window score of each item",
            ylabel="count",
            title=f"{r.variant} model, {r.unit}",
        )
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def shown(name: str | Path) -> str:
    """A file name as text: bytes that are not UTF-8 (a name from an old FAT stick or another
    locale) as backslash escapes, which a CSV or a plot title can hold (they stopped `evaluate
    --report` half-way through scores.csv, and `spectrogram`, in a review)."""
    return printable(str(name))


def _csv(reports: list[Report], path: Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            out = csv.writer(fh)
            out.writerow(["file", "segment", "label", *(f"score_{r.variant}" for r in reports)])
            for rows in zip(*(r.items for r in reports), strict=True):
                first = rows[0]
                label = "anomalous" if first.label else "normal"
                seg = "" if first.segment is None else first.segment
                out.writerow([shown(first.file), seg, label, *(f"{row.score:.6g}" for row in rows)])

    atomic_write(path, write, mode=0o644)
    return path


@dataclass
class Timeline:
    """One file streamed through the device's pipeline, for timeline.png."""

    name: str
    scores: np.ndarray
    """Window scores, NaN where the device takes no evidence (a gap in the line)."""
    hop_s: float
    threshold: float
    events: list[tuple[float, float, str]] = field(default_factory=list)
    """The anomalies it raised: (start, end, trigger) in seconds of the file."""


TRIGGERS = {"k_of_n": "K of N windows above", "cusum": "evidence over time (CUSUM)"}


def _timeline(line: Timeline, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3))
    t = np.arange(len(line.scores)) * line.hop_s
    ax.plot(t, line.scores, marker=".", label="window score (gaps: silence, dropout, machine off)")
    ax.axhline(line.threshold, color="red", linestyle="--", label="threshold")
    shaded = set()
    for start, end, trigger in line.events:  # a CUSUM event may hold no window above the line
        label = f"event: {TRIGGERS.get(trigger, trigger)}"
        colour = "tab:purple" if trigger == "cusum" else "tab:orange"
        ax.axvspan(start, max(end, start + line.hop_s), color=colour, alpha=0.2,
                   label=None if label in shaded else label)  # fmt: skip
        shaded.add(label)
    title = f"score timeline: {shown(line.name)}; {len(line.events) or 'no'} event" + (
        "s" if len(line.events) != 1 else ""
    )
    ax.set(xlabel="time (s, window start)", ylabel="anomaly score", title=title)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


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
    return _save(plt, fig, path)


def plot_spectrogram(features: np.ndarray, params: object, path: Path, title: str) -> Path:
    """The log-mel image of a whole file, in dB, as the model sees it (frames every hop)."""
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
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    kind = path.suffix.lower().lstrip(".") or "png"  # the format its name asks for
    target = output_target(path)
    try:
        if target is None:  # a device or a pipe: as it is
            fig.savefig(path, dpi=FIG_DPI, format=kind)
        else:  # replaced whole: a failed run leaves the last one's picture, not a torn one
            atomic_write(target, lambda tmp: fig.savefig(tmp, dpi=FIG_DPI, format=kind), 0o644)
    finally:
        plt.close(fig)
    return path
