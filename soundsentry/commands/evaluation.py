"""`soundsentry evaluate` and `soundsentry spectrogram`: how well a bundle tells normal from
fault recordings, and what it hears."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.errors import SoundSentryError
from soundsentry.commands.common import (
    MAX_JSON_OUTPUT,
    channel_arg,
    check_json_output,
    check_output,
    positive_float,
    require,
)

if TYPE_CHECKING:
    from edge.bundle import Manifest


def add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="ROC AUC and pAUC (or accuracy) on labelled recordings")
    p.add_argument("model", type=Path, metavar="MODEL")
    _add_evaluate_recordings(p)
    _add_evaluate_scoring(p)
    _add_evaluate_report(p)
    p.set_defaults(func=_cmd_evaluate)


def _add_evaluate_recordings(p: argparse.ArgumentParser) -> None:
    """evaluate's recordings: --normal, --anomalous, --classes, and --segment."""
    # given twice, both sets count (the second replaced the first)
    p.add_argument(
        "--normal",
        nargs="+",
        action="extend",
        metavar="PATH",
        help="recordings (files or folders) of normal running, not the model's training audio",
    )
    p.add_argument(
        "--anomalous",
        nargs="+",
        action="extend",
        metavar="PATH",
        help="recordings (files or folders) of faults",
    )
    p.add_argument(
        "--classes",
        type=Path,
        metavar="DIR",
        help="labelled recordings, one subfolder per class (to check a classifier bundle)",
    )
    p.add_argument(
        "--segment",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="score consecutive segments of this length instead of whole files",
    )


def _add_evaluate_scoring(p: argparse.ArgumentParser) -> None:
    """evaluate's --json, and how the model scores and counts: --float, --channel, --config."""
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write metrics as JSON")
    p.add_argument(
        "--float",
        dest="variant",
        action="store_const",
        const="float",
        default="int8",
        help="evaluate the float reference model instead of the int8 one",
    )
    p.add_argument(
        "--channel",
        type=channel_arg,
        default=None,
        help="channel to score; -1 averages all (default: the one the model was fitted on)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="count events with the [detector] settings of this config, as that device would "
        "(default: the bundle's K, N and threshold)",
    )


def _add_evaluate_report(p: argparse.ArgumentParser) -> None:
    """evaluate's report: --report and --timeline."""
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="DIR",
        help="write metrics.json, evaluation-VARIANT.json (every item's score: int8 and float "
        "for a network, numpy for the statistics kinds), roc.png, histogram.png, scores.csv, "
        "timeline.png (a network's int8 and float side by side; needs the [report] extra)",
    )
    p.add_argument(
        "--timeline",
        type=Path,
        default=None,
        metavar="FILE",
        help="file for timeline.png (default: the first anomalous file)",
    )


def add_spectrogram(sub: Any) -> None:
    p = sub.add_parser(
        "spectrogram", help="render the log-mel image the model sees (PNG; JPG, SVG, PDF by name)"
    )
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--out", required=True, type=Path, metavar="IMAGE")
    p.add_argument("--model", type=Path, default=None, help="use this bundle's feature settings")
    p.add_argument("--channel", type=channel_arg, default=0, help="channel; -1 averages all")
    p.set_defaults(func=_cmd_spectrogram)


REPORT_NAMES = ("metrics.json", "scores.csv", "roc.png", "histogram.png", "timeline.png")
"""The files `evaluate --report` writes, beside evaluation-VARIANT.json."""

CLASSES_REPORT_NAMES = ("metrics.json", "confusion.png")
"""The files `evaluate --classes --report` writes."""


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _written_by_a_report(path: Path) -> bool:
    """True if `path`, a name the report writes, holds what a report writes there: a PNG, a
    JSON document, or scores.csv's header row."""
    if not path.is_file():
        return False
    try:
        with path.open("rb") as fh:
            if path.suffix == ".png":
                return fh.read(len(PNG_MAGIC)) == PNG_MAGIC
            if path.suffix == ".csv":
                return fh.readline(256).startswith(b"file,segment,label,score_")
            json.loads(fh.read(MAX_JSON_OUTPUT + 1) or b"")
            return True
    except (ValueError, OSError):
        return False


def _check_report_folder(path: Path | None, inputs: Sequence[Path], classes: bool) -> None:
    """Refuse a --report folder that holds the recordings evaluated (a folder given as input,
    or one a file given lies in), or lies within one (a class subfolder of --classes, which
    the report's files would join as recordings of that class): the report's files would mix
    with them, and replace any of theirs of the same name. Refuse too a folder with a file
    of a name the report writes that no report wrote (a user's own scores.csv, a recording
    named timeline.png: replaced without a word, in a review); an earlier report's files are
    replaced, as `--json` replaces only JSON."""
    if path is None:
        return
    target = path.resolve()
    for given in inputs:
        if given.is_dir():  # searched with its subfolders: a class subfolder of --classes too
            refused = target.is_relative_to(given.resolve())
        else:
            refused = target == given.resolve().parent
        if refused:
            raise SoundSentryError(
                f"--report {path}: lies in the recordings being evaluated ({given}); give a "
                "folder of its own outside them"
            )
    if path.is_dir():
        names = CLASSES_REPORT_NAMES if classes else REPORT_NAMES

        def replaced(p: Path) -> bool:  # by this report: --classes writes two files
            evaluation = p.name.startswith("evaluation-") and p.suffix == ".json"
            return p.name in names or (evaluation and not classes)

        foreign = [
            p.name for p in sorted(path.iterdir()) if replaced(p) and not _written_by_a_report(p)
        ]
        if foreign:
            raise SoundSentryError(
                f"--report {path}: holds {', '.join(foreign)}, which the report would replace "
                "and no report wrote; give a new or empty folder"
            )


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from edge.bundle import channel_for, read_manifest

    _check_evaluate_outputs(args)
    manifest = read_manifest(args.model)
    args.channel = channel_for(manifest, args.channel, "evaluate")
    if args.timeline:  # checked before minutes of scoring, not after
        _check_timeline(args, manifest)
    from soundsentry.report import evaluate_classes

    if args.classes:
        return evaluate_classes(
            args.model,
            args.classes,
            args.segment,
            args.variant,
            args.channel,
            json_path=args.json,
            report_dir=args.report,
        )
    if not (args.normal and args.anomalous):
        raise SoundSentryError("evaluate needs --normal and --anomalous (or --classes)")
    return _evaluate_normal_anomalous(args)


def _check_evaluate_outputs(args: argparse.Namespace) -> None:
    """Refuse a --json or --report that cannot be written, before anything is read."""
    check_json_output(args.json)
    check_output(args.report, "--report", folder=True)
    inputs = [
        *(args.normal or []),
        *(args.anomalous or []),
        *([args.classes] if args.classes else []),
    ]
    _check_report_folder(args.report, [Path(p) for p in inputs], bool(args.classes))
    if args.report:  # before anything is scored or written: no half-written report
        require("matplotlib", "report", "evaluate --report")


def _check_timeline(args: argparse.Namespace, manifest: Manifest) -> None:
    """Refuse a --timeline without --report, or a file the model cannot read."""
    if not args.report:
        raise SoundSentryError("--timeline draws into the report: give --report DIR too")
    from edge.audio_io import check_files
    from edge.features import FeatureParams

    rate = FeatureParams.from_dict(manifest.features).samplerate
    check_files([args.timeline], max(args.channel, 0), rate, mono_any=True)


def _evaluate_normal_anomalous(args: argparse.Namespace) -> int:
    """Score --normal against --anomalous; print the metrics, write --json and --report."""
    from soundsentry.report import format_report, write_full_report
    from train.evaluate import evaluate, write_json

    detector = None
    if args.config is not None:
        from edge.settings import load_settings

        detector = load_settings(args.config).detector
    report = evaluate(
        args.model, args.normal, args.anomalous, args.segment, args.variant, args.channel,
        detector,
    )  # fmt: skip
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
    if args.report:
        written = write_full_report(
            report,
            args.model,
            args.normal,
            args.anomalous,
            args.report,
            segment=args.segment,
            channel=args.channel,
            timeline_file=args.timeline,
            detector=detector,
        )
        print(f"report written to {args.report}: {', '.join(p.name for p in written)}")
    return 0


def _cmd_spectrogram(args: argparse.Namespace) -> int:
    check_output(args.out, "--out", folder=False)
    require("matplotlib", "report", "spectrogram")
    from soundsentry.report import render_spectrogram

    out = render_spectrogram(args.file, args.out, args.model, args.channel)
    print(f"spectrogram written to {out}")
    return 0
