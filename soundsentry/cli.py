"""The `soundsentry` command: train, calibrate, evaluate, spectrogram, replay, run, record,
doctor, devices, events, demo.

Training imports TensorFlow only inside its command, reports import matplotlib only when
drawing, and sounddevice is imported only when capturing, so `demo`, `replay` and
`evaluate` work without PortAudio (and everything but `train` of the network kinds and the
PNGs works on the bare edge install; those say in one line which extra they need).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

# One BLAS thread: the per-window matrices are tiny, and idle OpenBLAS workers spin-wait
# (measured: 21 % of a core at real time with the default threads, 0.8 % with one). Set
# before numpy is imported; an explicit value in the environment wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from edge import __version__  # noqa: E402
from edge.errors import SoundSentryError, install_extra, os_error_line  # noqa: E402

log = logging.getLogger("soundsentry")

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
NUMPY_DETECTORS = ("fluctuation", "levels", "knn", "subspace", "ensemble")
"""`train --detector` kinds fitted in numpy, without TensorFlow (an ensemble unless its
--members include the int8 CNN)."""
ENSEMBLE_MEMBERS = ("fluctuation", "levels", "knn", "subspace", "embedding")
"""`train --detector ensemble --members`: what an ensemble may combine (train.ensemble)."""
EXTRAS = {
    "tensorflow": "train",
    "keras": "train",
    "librosa": "train",
    "scipy": "train",
    "matplotlib": "report",
}
"""Modules of the optional extras (pyproject.toml), by top-level name."""


TIMED_LOGS = ("run", "replay", "record", "demo")
"""Commands that run for minutes to months: their log lines carry the time and the source."""


class _ShortFormatter(logging.Formatter):
    """`warning: ...` and `error: ...`, as the commands' own advice lines read."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    # The daemon's commands (and any run with --log-level) log with time and source, for a
    # journal or a terminal over hours; a command that is done in a minute speaks as its own
    # `warning:` and `note:` lines do.
    timed = args.command in TIMED_LOGS or args.log_level is not None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        if timed
        else _ShortFormatter()
    )
    logging.basicConfig(level=getattr(logging, args.log_level or "WARNING"), handlers=[handler])
    try:
        return int(args.func(args) or 0)
    except SoundSentryError as exc:
        print(f"soundsentry: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ModuleNotFoundError as exc:  # an optional extra that is not installed
        extra = _extra_of(exc.name)
        if extra is None:
            raise
        print(f"soundsentry: error: {_needs(args.command, extra, exc.name)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a path that is the wrong kind of thing, a full or read-only disk
        print(f"soundsentry: error: {os_error_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Parser(argparse.ArgumentParser):
    """argparse with the errors of every other mistake: one line, exit status 1 (argparse
    prints its whole usage block and exits 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"soundsentry: error: {message} (`{self.prog} --help` lists the "
                  "options)\n")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="soundsentry", description="Real-time anomaly detection for machine sounds."
    )
    parser.add_argument("--version", action="version", version=f"soundsentry {__version__}")
    log_help = (
        "stderr log level, DEBUG, INFO, WARNING or ERROR (default: `run` takes the config's "
        "log_level, INFO unless set; every other command WARNING)"
    )
    parser.add_argument("--log-level", type=_log_level, metavar="LEVEL", help=log_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (
        _add_train,
        _add_calibrate,
        _add_evaluate,
        _add_spectrogram,
        _add_replay,
        _add_run,
        _add_record,
        _add_doctor,
        _add_devices,
        _add_events,
        _add_demo,
    ):
        register(sub)
    for command in sub.choices.values():  # after the command too: `run --log-level DEBUG`
        command.add_argument(
            "--log-level", type=_log_level, metavar="LEVEL", default=argparse.SUPPRESS,
            help=log_help,
        )  # fmt: skip
    return parser


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model bundle on normal (or labelled) recordings")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--normal",
        nargs="+",
        action="extend",  # given twice, both sets count (the second replaced the first)
        metavar="PATH",
        help="normal recordings: files or folders (searched recursively): an anomaly detector "
        "of the --detector kind",
    )
    what.add_argument(
        "--classes",
        type=Path,
        metavar="DIR",
        help="labelled recordings, one subfolder per class: a CNN classifier",
    )
    what.add_argument(
        "--normal-states",
        type=Path,
        metavar="DIR",
        help="normal recordings, one subfolder per operating state: the embedding detector",
    )
    p.add_argument(
        "--out", required=True, type=Path, metavar="MODEL", help="bundle folder to write"
    )
    p.add_argument(
        "--epochs",
        type=_whole_between(1, MAX_EPOCHS),
        default=None,
        help="training epochs of a network, 1 to 1000 (default: embedding 12, autoencoder 40, "
        "classifier 30)",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=None,
        help="random seed of a network, 0 to 2**32 - 1 (same seed, same model)",
    )
    p.add_argument(
        "--channel",
        type=_channel,
        default=None,
        help="channel to train on (default 0); -1 averages all",
    )
    p.add_argument(
        "--false-alarms-per-day",
        type=_budget,
        default=None,
        metavar="F",
        help="false-alarm budget that sets the threshold (default 1 per day; not --classes)",
    )
    p.add_argument(
        "--augment",
        nargs="+",
        default=None,
        metavar="OPTION",
        choices=("shift", "stretch", "pitch", "mixup", "noise", "specaugment"),
        help="training augmentation of the autoencoder and the classifier: shift stretch pitch "
        "mixup noise specaugment",
    )
    p.add_argument(
        "--augment-factor",
        type=_whole_between(1, MAX_AUGMENT_FACTOR),
        default=1,
        metavar="N",
        help="augmented copies per training window, 1 to 16 (default 1); the training set is "
        "held in memory N + 1 times",
    )
    p.add_argument(
        "--detector",
        choices=(*NUMPY_DETECTORS, "autoencoder", "embedding"),
        default=None,
        help="with --normal: band-fluctuation statistics (default), level-aware band "
        "statistics (levels), a nearest-neighbour bank (knn), the principal subspace of "
        "stacked log-mel frames (subspace), fluctuation and subspace together on a common "
        "scale (ensemble; --members picks others), all numpy with no network; or "
        "the int8 convolutional autoencoder, or the int8 self-supervised CNN embedding",
    )
    p.add_argument(
        "--all-channels",
        action="store_true",
        help="use every channel of multichannel recordings as a training view",
    )
    p.add_argument(
        "--members",
        nargs="+",
        choices=ENSEMBLE_MEMBERS,
        metavar="KIND",
        help="with --detector ensemble: the kinds it combines (default fluctuation subspace); "
        "one may be embedding, the int8 CNN, which needs the [train] extra's TensorFlow; of: "
        + ", ".join(ENSEMBLE_MEMBERS),
    )
    p.set_defaults(func=_cmd_train)


def _add_calibrate(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate", help="adapt a bundle to its site from normal audio (numpy only)"
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument(
        "--normal",
        nargs="+",
        action="extend",  # given twice, both sets count
        required=True,
        metavar="PATH",
        help="normal audio recorded where the detector is installed",
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="MODEL2",
        help="bundle to write (MODEL itself: replaced, and kept as MODEL.prev)",
    )
    p.add_argument(
        "--false-alarms-per-day",
        type=_budget,
        default=None,
        metavar="F",
        help="false-alarm budget (default: the model's)",
    )
    p.add_argument(
        "--channel",
        type=_channel,
        default=None,
        help="channel to use; -1 averages all (default: the one the model was fitted on)",
    )
    p.set_defaults(func=_cmd_calibrate)


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="ROC AUC and pAUC (or accuracy) on labelled recordings")
    p.add_argument("model", type=Path, metavar="MODEL")
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
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="score consecutive segments of this length instead of whole files",
    )
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
        type=_channel,
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
    p.set_defaults(func=_cmd_evaluate)


def _add_spectrogram(sub: Any) -> None:
    p = sub.add_parser(
        "spectrogram", help="render the log-mel image the model sees (PNG; JPG, SVG, PDF by name)"
    )
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--out", required=True, type=Path, metavar="IMAGE")
    p.add_argument("--model", type=Path, default=None, help="use this bundle's feature settings")
    p.add_argument("--channel", type=_channel, default=0, help="channel; -1 averages all")
    p.set_defaults(func=_cmd_spectrogram)


def _add_replay(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="run the daemon's pipeline on files; events as JSON lines",
        description="Run the daemon's pipeline on files and print its events as JSON lines. "
        "Event times take the audio as just recorded: it ends when the replay starts "
        "(with --realtime, it starts then).",
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument(
        "files", nargs="+", type=Path, metavar="PATH", help="audio files or folders (recursive)"
    )
    p.add_argument("--realtime", action="store_true", help="pace the audio at real time")
    p.add_argument(
        "--continuous",
        action="store_true",
        help="play the files back to back as one stream; by default each file is its own "
        "stream: the detector resets between files and an open event ends at each file's end",
    )
    p.add_argument(
        "--channel",
        type=_channel,
        default=None,
        help="channel of the files to hear; -1 averages all (default: the one the model was "
        "fitted on, as `evaluate` does; [audio] channel is the microphone's, not the files')",
    )
    _add_common(p)
    p.set_defaults(func=_cmd_replay)


DEVICE_HELP = "input device: index, part of its name, or port:... (see `soundsentry devices`)"


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="the daemon: capture the microphone, publish events")
    p.add_argument("--model", type=Path, default=None, help="bundle (overrides the config)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    _add_common(p)
    p.set_defaults(func=_cmd_run)


def _add_record(sub: Any) -> None:
    p = sub.add_parser("record", help="record normal audio on site into chunked WAV files")
    p.add_argument(
        "--seconds", type=_at_least(1.0), required=True, help="how much to record (at least 1)"
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the WAVs")
    p.add_argument(
        "--chunk-seconds",
        type=_at_least(2.0, 3600.0),  # a window and more; a plain WAV's sizes stop at 4 GB
        default=60.0,
        metavar="S",
        help="length of each WAV file (2 to 3600, default 60)",
    )
    p.add_argument(
        "--channel",
        type=functools.partial(_channel, average=False),
        default=None,
        metavar="N",
        help="channel of a multichannel device to record (0-based; default [audio] channel)",
    )
    p.add_argument(
        "--samplerate",
        type=_model_rate_or_more,
        default=16000,
        help="rate of the files (Hz, at least the models' 16000)",
    )
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help="TOML settings")
    p.set_defaults(func=_cmd_record)


def _add_doctor(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check audio, model, broker, clock, disk and service")
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help="TOML settings")
    p.add_argument("--model", type=Path, default=None, help="bundle (overrides the config)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.set_defaults(func=_cmd_doctor)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="stream the bundled clip through the bundled model")
    p.add_argument("--fast", action="store_true", help="as fast as possible, not in real time")
    p.set_defaults(func=_cmd_demo)


def _add_devices(sub: Any) -> None:
    p = sub.add_parser("devices", help="list the audio input devices, their rates and channels")
    p.set_defaults(func=_cmd_devices)


def _add_events(sub: Any) -> None:
    p = sub.add_parser("events", help="list the anomalies in this device's local event log")
    p.add_argument(
        "--since",
        default=None,
        metavar="WHEN",
        help="only events that started since: an ISO date or time (2026-11-30, "
        "2026-11-30T08:00; local time unless it ends in Z) or an age (90m, 24h, 7d, 2w)",
    )
    p.add_argument(
        "--until",
        default=None,
        metavar="WHEN",
        help="only events that started before: as --since (a month at a time: --since "
        "2026-11-01 --until 2026-12-01)",
    )
    p.add_argument("--csv", action="store_true", help="CSV with a header row, for a spreadsheet")
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help="TOML settings")
    p.set_defaults(func=_cmd_events)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help="TOML settings")
    p.add_argument(
        "--device-id",
        default=None,
        help="name of this detector (default: the config's device_id, else the host name)",
    )
    p.add_argument("--mqtt-host", default=None, help="broker host (overrides the config)")
    p.add_argument("--mqtt-port", type=int, default=None, help="broker port")


def _number(text: str, kind: type[int] | type[float]) -> Any:
    """`text` as an int or float, or argparse's one-line complaint naming what was expected."""
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


MAX_EPOCHS = 1000
"""`--epochs` beyond this is a typo (an epoch of 10 min of audio takes seconds to a minute):
100000 trained for days with no word of it."""
MAX_AUGMENT_FACTOR = 16
"""`--augment-factor` beyond this: every copy of the training windows is held in memory at
once (10 min of audio, about 10 MB a copy, more in the network's training), and a factor of
1000 took the machine's memory before training began."""


def _whole_between(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}")
        return value

    return parse


MAX_SEED = 2**32 - 1
"""The largest seed NumPy's and TensorFlow's generators take: beyond it training ended in a
traceback, once TensorFlow had loaded."""


def _seed(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_SEED}")
    return value


MAX_CHANNEL = 63
"""The highest channel a bundle records (its manifest's bound, as [audio] channel's)."""


def _channel(text: str, average: bool = True) -> int:
    """A channel number from 0 to MAX_CHANNEL; with `average`, -1 (all channels averaged) too
    (64 and more were taken, and refused by the manifest once the work was done)."""
    value = _number(text, int)
    if not (-1 if average else 0) <= value <= MAX_CHANNEL:
        or_average = ", or -1 (the average)" if average else ""
        raise argparse.ArgumentTypeError(
            f"must be a channel number from 0 to {MAX_CHANNEL}{or_average}"
        )
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _at_least(low: float, high: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a number from `low` to `high`."""

    def parse(text: str) -> float:
        value = _number(text, float)
        if not math.isfinite(value) or not low <= value <= high:
            within = f"from {low:g} to {high:g}" if math.isfinite(high) else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {within}")
        return value

    return parse


def _budget(text: str) -> float:
    from edge.threshold import MAX_FALSE_ALARMS_PER_DAY

    value = _number(text, float)
    if not math.isfinite(value) or not 0 < value <= MAX_FALSE_ALARMS_PER_DAY:
        raise argparse.ArgumentTypeError(
            f"must be a number of false alarms per day above 0 and at most "
            f"{MAX_FALSE_ALARMS_PER_DAY:g} (one every 8.6 s)"
        )
    return value


def _model_rate_or_more(text: str) -> int:
    from edge.features import MAX_SAMPLERATE, FeatureParams

    value, model = _number(text, int), FeatureParams().samplerate
    if not model <= value <= MAX_SAMPLERATE:
        raise argparse.ArgumentTypeError(
            f"must be {model} to {MAX_SAMPLERATE}: the models hear up to {model // 2} Hz"
        )
    return value


def _cmd_train(args: argparse.Namespace) -> int:
    # TensorFlow's C++ log: its errors too (a tf.data "NodeDef mentions attribute ..." line at
    # every fit reads like a failure); a real failure is a Python exception with its message.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _check_train_flags(args)
    one_channel = args.classes or (args.detector == "autoencoder" and not args.normal_states)
    if args.all_channels and one_channel:
        raise SoundSentryError(
            "--all-channels trains the numpy detectors and the embedding; the autoencoder and "
            "the classifier read one channel (--channel N)"
        )
    network_member = "embedding" in (args.members or ())
    network = (
        args.classes or args.normal_states or args.detector not in NUMPY_DETECTORS or network_member
    )
    if network:  # a missing extra is said first, without the seconds TensorFlow takes to load
        _require_present(("tensorflow", "keras"), "train", _train_command(args))
    _note_replaced(args.out)  # notes once the command can run
    if args.normal and not args.all_channels:
        _note_channels(args.normal, args.channel)
    if args.normal:
        _warn_off_folders(args.normal)
    classes = None
    if args.classes:  # every file checked, and named, before TensorFlow loads
        from edge.features import FeatureParams
        from train.dataset import class_folders

        classes = class_folders(args.classes, args.channel, FeatureParams().samplerate)
        _note_healthy_class(list(classes))
    if args.normal_states:  # so are the state folders (their refusals waited for TensorFlow)
        from edge.features import FeatureParams
        from train.dataset import state_folders

        args.normal_states = state_folders(
            args.normal_states, FeatureParams().samplerate, channel=args.channel
        )
    if network:
        _require("tensorflow", "train", _train_command(args))
    from train.augment import Augmenter

    options = tuple(dict.fromkeys(args.augment or ()))  # `shift shift`: one shift
    augment = Augmenter(options, args.augment_factor) if options else None
    if args.classes:
        from train.classifier import DEFAULT_EPOCHS as CLASSIFIER_EPOCHS
        from train.classifier import train_classifier

        out = train_classifier(
            classes,
            args.out,
            epochs=args.epochs or CLASSIFIER_EPOCHS,
            seed=args.seed,
            channel=args.channel,
            augment=augment,
        )
        from edge.advice import classifier_summary
        from edge.bundle import read_manifest

        print(f"model bundle written to {out}\n{classifier_summary(read_manifest(out))}")
        return 0
    if args.normal_states or args.detector == "embedding":
        return _train_embedding(args)
    if args.detector in NUMPY_DETECTORS:
        members = {"members": args.members} if args.members else {}
        if network_member:  # the network member's training
            members |= {"epochs": args.epochs, "seed": args.seed}
        out = _numpy_trainer(args.detector)(
            args.normal,
            args.out,
            channel=args.channel,
            all_channels=args.all_channels,
            false_alarms_per_day=args.false_alarms_per_day,
            **members,
        )
        _say_written(out)
        return 0
    from train.trainer import DEFAULT_EPOCHS, train_bundle

    out = train_bundle(
        args.normal,
        args.out,
        epochs=args.epochs or DEFAULT_EPOCHS,
        seed=args.seed,
        channel=args.channel,
        false_alarms_per_day=args.false_alarms_per_day,
        augment=augment,
    )
    _say_written(out)
    return 0


def _check_train_flags(args: argparse.Namespace) -> None:
    """Refuse flags the chosen trainer would ignore, and an --out that cannot take a bundle,
    before any audio is read; fills in the default --detector."""
    if args.normal_states and args.detector not in (None, "embedding"):
        raise SoundSentryError(
            f"--normal-states trains the embedding detector only, not {args.detector}"
        )
    if args.classes and args.detector is not None:
        raise SoundSentryError("--detector is for --normal; --classes trains a classifier")
    if args.classes and args.false_alarms_per_day is not None:
        raise SoundSentryError(
            "--false-alarms-per-day sets an anomaly detector's threshold; a classifier (--classes) "
            "has none"
        )
    if args.false_alarms_per_day is None:
        from edge.threshold import DEFAULT_FALSE_ALARMS_PER_DAY

        args.false_alarms_per_day = DEFAULT_FALSE_ALARMS_PER_DAY
    args.detector = args.detector or ("embedding" if args.normal_states else "fluctuation")
    if args.members and args.detector != "ensemble":
        raise SoundSentryError(
            f"--members names what --detector ensemble combines, not --detector {args.detector}"
        )
    network = (
        args.classes
        or args.detector in ("autoencoder", "embedding")
        or "embedding" in (args.members or ())
    )
    if args.epochs is not None and not network:
        raise SoundSentryError(
            f"--epochs trains a network; --detector {args.detector} is fitted in numpy"
        )
    if args.seed is not None and not network:
        raise SoundSentryError(
            f"--seed trains a network; --detector {args.detector} is fitted in numpy, the same "
            "every time"
        )
    args.seed = 0 if args.seed is None else args.seed
    if args.augment and not (args.classes or args.detector == "autoencoder"):
        raise SoundSentryError(
            f"--augment is for the autoencoder and the classifier, not --detector {args.detector}"
        )
    if args.augment_factor != 1 and not args.augment:
        raise SoundSentryError("--augment-factor sets how many copies --augment makes: give both")
    if args.all_channels and args.channel is not None:
        raise SoundSentryError("--channel picks one channel; --all-channels trains on every one")
    args.channel = 0 if args.channel is None else args.channel


def _note_channels(paths: list[str], channel: int) -> None:
    """Say which channel of multichannel recordings is trained on, and how to choose."""
    import soundfile as sf

    from edge.audio_io import find_audio, sf_path

    widest, narrowest, mono = 1, None, 0
    for path in find_audio(paths, quiet=True):  # the trainer's own search says what it skips
        try:
            channels = sf.info(sf_path(path)).channels
        except (sf.LibsndfileError, RuntimeError, TypeError, OSError):
            continue  # the audio checks name the file
        if channels == 1:  # read as its one channel, whatever the channel (as `record` writes)
            mono += 1
            continue
        widest = max(widest, channels)
        narrowest = channels if narrowest is None else min(narrowest, channels)
    # mono files beside them are read as they are: say so, it is another microphone's channel
    besides = f"; the {mono} mono one(s) as they are" if mono and widest > 1 else ""
    if widest > 1 and channel < (narrowest or 1):  # a channel that is not there: its error
        used = "their average" if channel == -1 else f"channel {channel}"
        # a stereo file among 8-channel ones was left unsaid (a walk-through)
        span = f"{widest}" if narrowest == widest else f"{narrowest}- to {widest}"
        print(
            f"note: {span}-channel recordings: training on {used}{besides} (--channel N "
            "picks another, -1 the average, --all-channels uses every channel as a view)"
        )
    elif mono and widest == 1 and channel > 0:
        print(f"note: mono recordings: each one's only channel is trained on as channel {channel}")


def _warn_off_folders(paths: list[str]) -> None:
    """Warn of a folder named `off` in the normal audio: README's step 2 records states into
    `~/pump/off`, `low`, `high`, and `train --normal ~/pump` (the Pi has no TensorFlow for
    `--normal-states`) learnt the stopped machine as running, its off level 16 dB lower, with
    no word (a walk-through); so did `~/pump/*`, or a file of it (a diff review)."""
    from edge.audio_io import find_audio
    from edge.machine_state import OFF, is_off

    offs: dict[Path, None] = {}
    for raw in paths:
        given = Path(raw)
        top = given if given.is_dir() else given.parent
        for f in find_audio([given], quiet=True):
            inside = f.parent.relative_to(top).parts if f.is_relative_to(top) else ()
            folders = [top, *(top.joinpath(*inside[: i + 1]) for i in range(len(inside)))]
            offs.update(dict.fromkeys(d.resolve() for d in folders if is_off(d.name)))
        # `--normal .` inside it, or a day's folder of it (~/pump/off/day1): by its real name
        offs.update(dict.fromkeys(d for d in top.resolve().parents if is_off(d.name)))
        if is_off(top.resolve().name):
            offs[top.resolve()] = None
    for off in offs:
        print(f"warning: {off}: a folder named {OFF!r} in --normal is trained on as the machine "
              "running, so the stopped machine is learnt as running and its off level falls; "
              f"leave it out, or train operating states with --normal-states {off.parent} (one "
              "subfolder per state; the [train] extra)", file=sys.stderr)  # fmt: skip


def _note_healthy_class(labels: list[str]) -> None:
    """Say what the edge does with these classes: with one named `normal`, only the others are
    events (faults, the anomaly state); without, every class change is an event and none an
    anomaly (a field review's user, with `ok` and faults, expected alarms of the faults only)."""
    from edge.events import HEALTHY_CLASS, healthy_classes, is_fault
    from edge.machine_state import is_off

    healthy = sorted(healthy_classes(labels))
    if healthy:
        faults = [x for x in labels if is_fault(x, healthy)]
        said = f"; {', '.join(map(repr, faults))}: faults, each an anomaly event" if faults else ""
        off = [x for x in healthy if is_off(x)]  # said of `off` only if there is one
        well = ", ".join(repr(x) for x in healthy if x not in off)
        stopped = f"; {off[0]!r}: the machine off" if off else ""
        print(f"note: {well}: the machine running well{stopped}: no event{said}",
              file=sys.stderr)  # fmt: skip
    else:
        print(f"note: no class is named {HEALTHY_CLASS!r}: the edge reports every change of class "
              "as an event, none as an anomaly (states such as speeds); name the folder of the "
              f"machine running well {HEALTHY_CLASS!r} for alarms of the faults only",
              file=sys.stderr)  # fmt: skip


def _train_command(args: argparse.Namespace) -> str:
    """How the user asked for a network, as the missing-extra message names it."""
    if args.classes:
        return "train --classes"
    if args.normal_states:
        return "train --normal-states"
    if args.members:
        return f"train --detector {args.detector} --members {' '.join(args.members)}"
    return f"train --detector {args.detector}"


def _train_embedding(args: argparse.Namespace) -> int:
    """`train --detector embedding` or `--normal-states`: the self-supervised CNN embedding."""
    from train.embedding import DEFAULT_EPOCHS, train_embedding

    out = train_embedding(
        args.normal,
        args.out,
        states=args.normal_states,
        epochs=args.epochs or DEFAULT_EPOCHS,
        seed=args.seed,
        channel=args.channel,
        false_alarms_per_day=args.false_alarms_per_day,
        all_channels=args.all_channels,
    )
    _say_written(out)
    return 0


def _say_written(out: Path, what: str = "model") -> None:
    """Say where the bundle was written, with the summary of what it holds."""
    from edge.advice import bundle_summary
    from edge.bundle import load_bundle

    print(f"{what} bundle written to {out}\n{bundle_summary(load_bundle(out).manifest)}")


def _numpy_trainer(detector: str) -> Callable[..., Path]:
    """The trainer of a numpy detector kind, imported only when training."""
    if detector == "levels":
        from train.levels import train_levels

        return train_levels
    if detector == "knn":
        from train.knn import train_knn

        return train_knn
    if detector == "subspace":
        from train.subspace import train_subspace

        return train_subspace
    if detector == "ensemble":
        from train.ensemble import train_ensemble

        return train_ensemble
    from train.fluctuation import train_fluctuation

    return train_fluctuation


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from edge.bundle import read_manifest
    from edge.calibrate import calibrate_bundle, check_calibratable

    check_calibratable(args.model)  # before any note, and before the audio is read
    before = read_manifest(args.model).threshold.value
    _note_replaced(args.out)
    out = calibrate_bundle(
        args.model, args.normal, args.out, args.false_alarms_per_day, args.channel
    )
    _say_written(out, "calibrated")
    after = read_manifest(out).threshold.value  # how far it moved was not said (a review)
    print(
        f"threshold {before:.4g} before calibration, {after:.4g} now ({after / before - 1:+.0%}); "
        "`evaluate` on fault recordings shows what that costs or buys"
    )
    return 0


def _note_replaced(out: Path) -> None:
    """Refuse an --out that cannot take a bundle (edge.bundle.check_bundle_target), and say so
    when it holds one: it is replaced, whole, once the new one is written, and kept as
    `OUT.prev` first (a calibration on the wrong audio must not cost the one that worked)."""
    from edge.bundle import MANIFEST, check_bundle_target, keep_previous_on_write

    # a manifest alone is a bundle too: a format-1 statistics bundle lists no other file, and
    # was written over with no copy and no note (an upgrade review)
    if check_bundle_target(out) or (Path(out) / MANIFEST).is_file():
        prev = keep_previous_on_write(out)
        print(
            f"note: {out} holds a model bundle: it is replaced when this one is written "
            f"(and kept as {prev})"
        )


def _check_output(path: Path | None, flag: str, folder: bool) -> None:
    """Refuse, before any work, an output path that is the wrong kind of thing: a file where
    a folder is to be written, or a folder where a file is (missing folders are created)."""
    if path is None:
        return
    if folder and path.exists() and not path.is_dir():
        raise SoundSentryError(f"{flag} {path}: exists and is not a folder; choose another path")
    if not folder and path.is_dir():
        raise SoundSentryError(f"{flag} {path}: is a folder; give a file name")
    _check_writable(path, flag, folder)


def _check_writable(path: Path, flag: str, folder: bool) -> None:
    """Refuse, before any work, an output where nothing can be written (`/proc/x.json`, a
    read-only card, a folder of another user's): found only after minutes of scoring, in a
    review. The nearest folder that exists of where it is written (`output_target`: through
    a link, /dev/stdout sent to a file) gets a file made and removed in it; a device or a
    pipe (a terminal's /dev/stdout) is written as it is."""
    from train.evaluate import output_target

    if folder:
        where = path.resolve()
    else:
        target = output_target(path)
        if target is None:
            return
        where = target.resolve().parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".soundsentry-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SoundSentryError(
            f"{flag} {path}: no file can be written in {where} ({exc.strerror or exc})"
        ) from None


def _check_json_output(path: Path | None, flag: str = "--json") -> None:
    """Refuse, before any work, a JSON output over a file that holds something else: `evaluate
    --json` wrote over one of the recordings it evaluated (in a review)."""
    _check_output(path, flag, folder=False)
    if path is None:
        return
    bundle = _bundle_holding(path)
    if bundle is not None:  # its manifest written over: the model no longer loaded (a review)
        raise SoundSentryError(
            f"{flag} {path}: lies in the model bundle {bundle}; refusing to write into it: "
            "choose another path"
        )
    if not path.is_file():
        return
    try:
        with path.open("rb") as fh:
            json.loads(fh.read(MAX_JSON_OUTPUT + 1) or b"null")
    except (ValueError, OSError):
        raise SoundSentryError(
            f"{flag} {path}: exists and is not JSON (an audio file?); refusing to write over it: "
            "choose another path"
        ) from None


def _bundle_holding(path: Path) -> Path | None:
    """The model bundle folder `path` lies in (its manifest one of the bundle format), or None."""
    from edge.bundle import FORMAT, MANIFEST

    folder = path.resolve().parent
    try:
        with (folder / MANIFEST).open("rb") as fh:
            body = json.loads(fh.read(MAX_JSON_OUTPUT + 1))
    except (ValueError, OSError):
        return None
    return folder if isinstance(body, dict) and body.get("format") == FORMAT else None


MAX_JSON_OUTPUT = 256 << 20
"""A JSON output larger than this is taken for something else."""


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

    _check_json_output(args.json)
    _check_output(args.report, "--report", folder=True)
    inputs = [
        *(args.normal or []),
        *(args.anomalous or []),
        *([args.classes] if args.classes else []),
    ]
    _check_report_folder(args.report, [Path(p) for p in inputs], bool(args.classes))
    if args.report:  # before anything is scored or written: no half-written report
        _require("matplotlib", "report", "evaluate --report")
    manifest = read_manifest(args.model)
    args.channel = channel_for(manifest, args.channel, "evaluate")
    if args.timeline:  # checked before minutes of scoring, not after
        if not args.report:
            raise SoundSentryError("--timeline draws into the report: give --report DIR too")
        from edge.audio_io import check_files
        from edge.features import FeatureParams

        rate = FeatureParams.from_dict(manifest.features).samplerate
        check_files([args.timeline], max(args.channel, 0), rate, mono_any=True)
    from soundsentry.report import evaluate_classes, format_report, write_full_report
    from train.evaluate import evaluate, write_json

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
    _check_output(args.out, "--out", folder=False)
    _require("matplotlib", "report", "spectrogram")
    from soundsentry.report import render_spectrogram

    out = render_spectrogram(args.file, args.out, args.model, args.channel)
    print(f"spectrogram written to {out}")
    return 0


def _settings_from(args: argparse.Namespace, model: Path | None) -> Any:
    from edge.settings import load_settings

    return load_settings(
        args.config,
        model=model,
        device_id=args.device_id,
        mqtt={"host": args.mqtt_host, "port": args.mqtt_port},
        audio={"device": getattr(args, "device", None)},
    )


def _warn_at_start(bundle: Any, settings: Any, listening: bool) -> None:
    """What the settings do to the bundle that it was not made for: another K of N than its
    threshold was set for, and, for the microphone (`listening`), another channel; and a
    device_id that Home Assistant's discovery would confuse with another."""
    from edge.advice import channel_note, discovery_note, event_logic_note

    notes = [event_logic_note(bundle.manifest, settings.detector), discovery_note(settings)]
    if listening:  # a replay reads the channel the model was fitted on by default
        notes.append(channel_note(bundle.manifest, settings.audio.channel))
    for note in notes:
        if note:
            log.warning("%s", note)


REPLAY_SUFFIX = "-replay"


def _replay_settings(args: argparse.Namespace) -> tuple[Any, bool]:
    """A replay's settings, and whether its device_id was made for it: publishing to a broker
    (`--mqtt-host`) with no config and no device_id chosen (flag, environment), it is
    `HOST-replay`, not the host name the device's own detector defaults to: a test replay's
    events reached the device's Home Assistant entities and its automations ("pump sounds
    wrong"), and left it `offline` (in a review). With a config it acts as that device, as
    the README says (its spool, event log and history go by its device_id)."""
    settings = _settings_from(args, args.model)
    if args.config is None and settings.mqtt.host and "device_id" not in settings.model_fields_set:
        update = {"device_id": settings.device_id + REPLAY_SUFFIX}
        return settings.model_copy(update=update), True
    return settings, False


def _device_model(config: Path | None, data_dir: Path, replayed: str) -> str | None:
    """The model id the device of `config` runs when it is not `replayed`, else None. A replay
    acts as the device of its config; of another model it dropped the device's saved learning
    period, recorded the replayed model as the device's in the model history (its site version
    unused from then on) and saved its own threshold over the one set by command (a new-user
    walk-through). The config's `model` says which; without one that loads (the service given
    it in its environment, a bundle damaged), what `data_dir` records of it."""
    from edge.bundle import read_manifest
    from edge.settings import load_settings

    if config is None:
        return None
    model = load_settings(config).model
    runs = None
    if model is not None:
        with contextlib.suppress(SoundSentryError):
            runs = read_manifest(model).model_id
    if runs is not None:
        return runs if runs != replayed else None
    # any record of another model: this replay is not the device's (the records are saved at
    # different times, so one may be older than another: a review found the history's naming
    # the model before while the saved period was the new one's)
    return next((m for m in _recorded_models(data_dir) if not _of_model(m, replayed)), None)


def _of_model(model_id: str, replayed: str) -> bool:
    """`model_id` is the replayed model or a site version of it (`<id>-site-v2`, calibrated)."""
    return model_id == replayed or model_id.startswith(f"{replayed}-")


def _recorded_models(data_dir: Path) -> list[str]:
    """The models the data folder's records name (a saved period, the saved state, the model
    history), read without changing anything."""
    from edge.history import peek_json

    found = []
    for path, key in (
        (data_dir / "learning" / "period.json", "of"),
        (data_dir / "state.json", "model"),
        (data_dir / "models" / "history.json", "configured"),
    ):
        data = peek_json(path) or {}
        if isinstance(data.get(key), str):
            found.append(data[key])
    return found


def _cmd_replay(args: argparse.Namespace) -> int:
    from edge.audio_io import find_audio
    from edge.bundle import channel_for
    from edge.console import ReplayLines, ReplaySummary
    from edge.history import manifest_in_use
    from edge.pipeline import Pipeline
    from edge.service import run_detector
    from edge.sources import FileSource

    settings, renamed = _replay_settings(args)
    if renamed:
        print(
            f"note: replay publishes to the broker as device {settings.device_id}, not as the "
            "detector of this host: its events reach no Home Assistant entity or automation of "
            "the device's (--device-id chooses one; with the device's --config it acts as it)",
            file=sys.stderr,
        )
    bundle = _load(settings.model)
    _warn_at_start(bundle, settings, listening=False)
    device_model = _device_model(args.config, settings.data_dir, bundle.model_id)
    files = find_audio(args.files)  # folders searched recursively, as everywhere else
    if not files:
        raise SoundSentryError("no audio files found in " + " ".join(map(str, args.files)))
    # a stereo file's other machine; the site version the data folder runs, if it has one
    running = manifest_in_use(
        settings.data_dir / "models", bundle, lambda b: Pipeline(b, settings.detector)
    )
    source = FileSource(
        files,
        bundle.features.samplerate,
        channel_for(running, args.channel, "replay"),
        settings.audio.block_seconds,
        realtime=args.realtime,
        continuous=args.continuous,
    )
    summary = ReplaySummary()
    detector = run_detector(
        settings,
        bundle,
        source,
        print_events=False,  # ReplayLines prints them, naming each one's file
        reload_settings=lambda: _replay_settings(args)[0],
        extra_sinks=[ReplayLines(source.locate, sys.stdout), summary],
        on_step=summary.step,
        persist=device_model is None,
        on_started=None
        if device_model is None
        else lambda: print(
            f"note: the config's device runs {device_model}, not {bundle.model_id}: this replay "
            "leaves its learning, model versions, threshold and mute as they are, and uses none "
            "of them",
            file=sys.stderr,
        ),
    )
    line = summary.line(len(files), detector.threshold)
    if detector.cut_short:  # read as a finished run, exit 0, by a script (a review)
        print(f"{line}; stopped (Ctrl-C or SIGTERM) before the audio ended", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(line, file=sys.stderr)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from edge.capture import MicSource
    from edge.errors import StartError
    from edge.sdnotify import SystemdNotifier
    from edge.service import hold_data_dir, run_detector
    from edge.settings import check_service_data_dir

    try:
        settings = _settings_from(args, args.model)
        if args.log_level is None:  # the service's log (the journal): its audit trail of commands
            logging.getLogger().setLevel(settings.log_level)
        if settings.model is None:
            raise SoundSentryError("no model: set `model` in the config file or pass --model")
        check_service_data_dir(settings.data_dir)
        bundle = _load(settings.model)
        lock = hold_data_dir(settings.data_dir)  # another run or a replay on it: said, held
    except (SoundSentryError, OSError) as exc:  # OSError: a model the service cannot read
        _hold_before_failing(SystemdNotifier(), exc)
        raise
    _warn_at_start(bundle, settings, listening=True)
    h = settings.health
    # As a service, a microphone missing at start (a USB one enumerated late, unplugged) is
    # waited for and reported on `health`; on a terminal, a device that matches nothing (a typo)
    # is one line at once.
    service = SystemdNotifier().enabled
    source = MicSource(
        settings.audio, bundle.features.samplerate, h.stall_seconds, h.reopen_max_seconds, service
    )
    live = _live_line(bundle.threshold)
    try:
        run_detector(
            settings,
            bundle,
            source,
            # events as JSON lines to a pipe, not to the journal: its log has each start and
            # end, and an update every 10 s of a day-long fault was 8,640 lines a day there
            print_events=live is None and not _stdout_is_journal(),
            on_stop=source.stop,
            reload_settings=lambda: _settings_from(args, args.model),
            extra_sinks=[live] if live else [],
            on_step=live.step if live else None,
            live=True,
            lock=lock,
        )
    except StartError as exc:  # the broker's TLS files, the web's token...: found before the
        _hold_before_failing(SystemdNotifier(), exc)  # loop ran, retried each minute as well
        raise
    if live:
        live.clear()
    return 0


START_RETRY_S = 60.0
"""As a service, a start that fails on its settings or its model waits this long, saying why in
`systemctl status`, before it exits for systemd to start it again: a typo or a model not copied
yet is retried every minute instead of every RestartSec (5 s: 17 000 starts a day, each with
its log lines, on an SD card), and is still picked up by itself once mended. Below the unit's
TimeoutStartSec (120 s)."""


def _hold_before_failing(notifier: Any, exc: Exception) -> None:
    """Under systemd: STATUS says why the start failed, then wait START_RETRY_S (SIGTERM ends
    the wait at once); on a terminal, nothing: the error is one line at once."""
    if not notifier.enabled:
        return
    notifier.status(f"cannot start: {exc} (starting again in {START_RETRY_S:g} s)")
    print(f"soundsentry: cannot start: {exc}; starting again in {START_RETRY_S:g} s",
          file=sys.stderr, flush=True)  # fmt: skip
    time.sleep(START_RETRY_S)


def _stdout_is_journal() -> bool:
    """stdout is systemd's journal (the service): JOURNAL_STREAM names its device and inode."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stdout.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):  # no such variable, or a stdout with no fd
        return False


def _live_line(threshold: float) -> Any:
    """On a terminal, the live line of `run` (events print above it); elsewhere None."""
    if not sys.stdout.isatty():
        return None
    from edge.console import LiveLine, clear_before_logs

    live = LiveLine(sys.stdout, threshold)
    clear_before_logs(live)
    return live


def _note_service_config(config: Path | None, doing: str, to: str) -> None:
    """Without --config on a device whose service has one: say that these are not its
    settings, and how to use them."""
    from edge.doctor import CONFIG_DIR

    if config is not None or not CONFIG_DIR.is_dir():
        return
    if not os.access(CONFIG_DIR, os.R_OK | os.X_OK):  # 0750 root:soundsentry: not for pi
        print(
            f"soundsentry: note: {doing}; the service's config in {CONFIG_DIR} is readable by "
            f"root and the service only: run this with sudo and add --config "
            f"{CONFIG_DIR}/config.toml {to}",
            file=sys.stderr,
        )
        return
    service = sorted(CONFIG_DIR.glob("*.toml"))
    if service:
        print(
            f"soundsentry: note: {doing}, not those of {service[0]}; add --config {service[0]} "
            f"{to}",
            file=sys.stderr,
        )


def _cmd_record(args: argparse.Namespace) -> int:
    from edge.record import record
    from edge.settings import load_settings

    _check_output(args.out, "--out", folder=True)
    audio: dict[str, Any] = {"device": args.device}
    if args.channel is not None:  # open as many channels as that one needs, at least
        channels = load_settings(args.config, audio=audio).audio.channels
        audio |= {"channel": args.channel, "channels": max(channels, args.channel + 1)}
    settings = load_settings(args.config, audio=audio)
    _note_service_config(  # the service's microphone settings (channel, device) are not these
        args.config,
        "recording with the default [audio] settings",
        "to record as the service listens",
    )
    files = record(settings, args.seconds, args.out, args.chunk_seconds, args.samplerate)
    print(f"recorded {len(files)} file(s) into {args.out}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from edge.doctor import run_checks, service_environment
    from edge.settings import load_settings

    service_environment(args.config)  # a unit's config: its data folder, not the user's home
    settings = load_settings(args.config, model=args.model, audio={"device": args.device})
    _note_service_config(args.config, "checking the default settings", "to check the service")
    checks = run_checks(settings, args.config)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if c.ok is False]
    skipped = [c for c in checks if c.ok is None]
    passed = len(checks) - len(failed) - len(skipped)
    print(f"doctor: {passed} passed, {len(failed)} failed, {len(skipped)} skipped")
    return 1 if failed else 0


def _cmd_devices(_args: argparse.Namespace) -> int:
    from edge.devices import input_devices, known_inputs

    devices = input_devices()
    if not devices:  # known_inputs' words: a device held by the service is not listed either
        raise SoundSentryError(known_inputs())
    print("index  name  channels, default rate, host API  (* = the default input)")
    for device in devices:
        print(device.line())
    print(
        "give --device (or [audio] device) a part of the name, e.g. USB: indexes change when "
        "devices are plugged in or the Pi restarts; two microphones of the same make have the "
        "same name: give each its port: (the USB socket it is plugged into)"
    )
    return 0


def _marks_in_force(settings: Any) -> list[str]:
    """The events marked normal that the model version in use learnt: the active version's of
    the configured model (history.json read as it is; none when it cannot be read, or the
    configured model's manifest cannot)."""
    from edge.bundle import read_manifest
    from edge.history import active_entry

    if settings.model is None:
        return []
    try:
        configured = read_manifest(settings.model).model_id
    except SoundSentryError:
        return []
    entry = active_entry(settings.data_dir / "models", configured)
    if entry is None:
        return []
    try:  # a version whose folder is gone or holds another model: the daemon runs the configured
        if read_manifest(entry["path"]).model_id != entry.get("model_id"):
            return []
    except SoundSentryError:
        return []
    marked = entry.get("marked")
    return [str(m) for m in marked] if isinstance(marked, list) else []


def _cmd_events(args: argparse.Namespace) -> int:
    from edge.eventlog import (
        format_event,
        has_rotated,
        is_age,
        local_time,
        parse_since,
        read_events,
        write_csv,
    )
    from edge.settings import load_settings

    since = parse_since(args.since) if args.since else None
    until = parse_since(args.until, flag="--until") if args.until else None
    if since is not None and until is not None and since >= until:
        ages = is_age(args.since) and is_age(args.until)
        raise SoundSentryError(
            f"--since {args.since!r} is not before --until {args.until!r}: no event lies between"
            + (  # `--since 1h --until 2h` read as "from hour 1 to hour 2"
                f" (ages count back from now: --since {args.until} --until {args.since})"
                if ages
                else ""
            )
        )
    settings = load_settings(args.config)
    folder = settings.data_dir
    if not folder.is_dir():  # "0 event(s)", as if all were well, for a folder mistyped or
        # another than the service's (`--config` forgotten on the device: a walk-through)
        raise SoundSentryError(
            f"no data folder {folder}: no daemon has run with it, so it holds no event log"
            + (SERVICE_EVENTS if args.config is None else "")
        )
    everything = read_events(folder)
    events = [
        e
        for e in everything
        if (since is None or e.started >= since) and (until is None or e.started < until)
    ]
    if args.csv:
        write_csv(events, sys.stdout)
    else:
        marked = _marks_in_force(settings)
        for event in events:
            print(format_event(event, marked))
    when = f" since {local_time(since)}" if since else ""  # as the lines above: local
    when += f" until {local_time(until)}" if until else ""
    print(f"{len(events)} event(s){when} in {folder}", file=sys.stderr)
    if everything and has_rotated(folder) and (since is None or everything[0].started > since):
        print(  # the oldest events were dropped at a rotation: the count is not "all since"
            f"(the log reaches back to {local_time(everything[0].data['started_at'])} only: it "
            "keeps about "
            "8 MB and drops the oldest events as it fills)",
            file=sys.stderr,
        )
    if folder == Path.home() / ".local" / "state" / "soundsentry":  # not the service's
        print(  # your own log (replays); the service keeps its own, readable by its user only
            f"(your own log{SERVICE_EVENTS})", file=sys.stderr
        )
    return 0


SERVICE_EVENTS = (
    "; the service's: sudo -u soundsentry soundsentry events --config /etc/soundsentry/config.toml"
)


def _cmd_demo(args: argparse.Namespace) -> int:
    from edge.demo import run_demo

    run_demo(realtime=not args.fast)
    return 0


def _extra_of(module: str | None) -> str | None:
    """The optional extra that provides `module`, if it belongs to one."""
    return EXTRAS.get((module or "").partition(".")[0])


def _needs(what: str, extra: str, module: str | None) -> str:
    return f"`{what}` needs the [{extra}] extra ({module} is not installed): " + install_extra(
        extra
    )


def _require_present(modules: Sequence[str], extra: str, what: str) -> None:
    """Stop with one line naming the extra if one of `modules` is not installed (found, not
    imported: TensorFlow takes seconds to import)."""
    import importlib.util

    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise SoundSentryError(_needs(what, extra, module))


def _require(module: str, extra: str, what: str) -> None:
    """Stop with one line naming the extra if `module` cannot be imported."""
    import importlib

    try:
        with _native_chatter_dropped():
            importlib.import_module(module)
    except ImportError as exc:  # name the module that is missing (Keras under TensorFlow)
        raise SoundSentryError(_needs(what, extra, exc.name or module)) from None


NATIVE_CHATTER = (
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IW]\d{4} [\d:.]+ +\d+ \w+\.cc:\d+\] )"
)
"""What TensorFlow's C++ side prints as it loads, whatever TF_CPP_MIN_LOG_LEVEL says, on some
CPUs: absl's notice and INFO / WARNING lines (oneDNN's "...floating-point round-off errors...",
the CPU features it was built for), which read like failures above a training's output."""
_FILTER = (
    "import re, sys\n"
    "chatter = re.compile(sys.argv[1].encode())\n"
    "for line in sys.stdin.buffer:\n"
    "    if not chatter.match(line):\n"
    "        sys.stdout.buffer.write(line)\n"
    "        sys.stdout.buffer.flush()\n"
)
"""The filter process: stderr's lines but NATIVE_CHATTER, passed on as they come."""


@contextlib.contextmanager
def _native_chatter_dropped() -> Iterator[None]:
    """Run the body with file descriptor 2 read by a small filter process that passes on
    every line but NATIVE_CHATTER as it comes: a process of its own, so that what a native
    crash (an abort on a CPU TensorFlow was not built for) writes last still reaches the
    terminal. Without fd 2 or a process to spare, nothing is filtered."""
    import subprocess

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        filtering = subprocess.Popen(
            [sys.executable, "-c", _FILTER, NATIVE_CHATTER],
            stdin=subprocess.PIPE,
            stdout=saved,
            stderr=saved,
        )
    except OSError:
        os.close(saved)
        yield
        return
    assert filtering.stdin is not None
    os.dup2(filtering.stdin.fileno(), 2)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer is gone once its own end closes: EOF
        os.close(saved)
        filtering.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            filtering.wait(timeout=10)


def _load(path: Path | None) -> Any:
    from edge.bundle import load_bundle

    if path is None:
        raise SoundSentryError("no model bundle given")
    return load_bundle(path)


if __name__ == "__main__":
    sys.exit(main())
