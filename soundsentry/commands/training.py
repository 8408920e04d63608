"""`soundsentry train` and `soundsentry calibrate`: a model bundle from recordings, and its
threshold set again on a site's own audio."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.errors import SoundSentryError
from soundsentry.commands.common import (
    budget_arg,
    channel_arg,
    number_arg,
    require,
    require_present,
)

NUMPY_DETECTORS = ("fluctuation", "levels", "knn", "subspace", "ensemble")
STATE_KINDS = ("fluctuation", "levels", "knn", "subspace")
"""The numpy kinds `--normal-states` trains (on a Pi too): their model on every running state
together, with each state's level spectrum by which the edge names it."""
"""`train --detector` kinds fitted in numpy, without TensorFlow (an ensemble unless its
--members include the int8 CNN)."""

ENSEMBLE_MEMBERS = ("fluctuation", "levels", "knn", "subspace", "embedding")
"""`train --detector ensemble --members`: what an ensemble may combine (train.ensemble)."""


def add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model bundle on normal (or labelled) recordings")
    _train_inputs(p)
    _train_output(p)
    _train_network(p)
    _train_channel_and_threshold(p)
    _train_augmentation(p)
    _train_detector(p)
    p.set_defaults(func=_cmd_train)


def _train_inputs(p: argparse.ArgumentParser) -> None:
    """`train`'s inputs: normal recordings, labelled classes or state folders (one of them)."""
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
        help="normal recordings, one subfolder per operating state (`off`: the machine stopped): "
        "the embedding detector, or a numpy --detector (fluctuation, levels, knn, subspace)",
    )


def _train_output(p: argparse.ArgumentParser) -> None:
    """`train`'s output: the bundle folder."""
    p.add_argument(
        "--out", required=True, type=Path, metavar="MODEL", help="bundle folder to write"
    )


def _train_network(p: argparse.ArgumentParser) -> None:
    """`train`'s network training: epochs and seed."""
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


def _train_channel_and_threshold(p: argparse.ArgumentParser) -> None:
    """`train`'s channel and the false-alarm budget that sets the threshold."""
    p.add_argument(
        "--channel",
        type=channel_arg,
        default=None,
        help="channel to train on (default 0); -1 averages all",
    )
    p.add_argument(
        "--false-alarms-per-day",
        type=budget_arg,
        default=None,
        metavar="F",
        help="false-alarm budget that sets the threshold (default 1 per day; not --classes)",
    )


def _train_augmentation(p: argparse.ArgumentParser) -> None:
    """`train`'s training augmentation and its factor."""
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


def _train_detector(p: argparse.ArgumentParser) -> None:
    """`train`'s detector kind, training views and ensemble members."""
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


def add_calibrate(sub: Any) -> None:
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
        type=budget_arg,
        default=None,
        metavar="F",
        help="false-alarm budget (default: the model's)",
    )
    p.add_argument(
        "--channel",
        type=channel_arg,
        default=None,
        help="channel to use; -1 averages all (default: the one the model was fitted on)",
    )
    p.set_defaults(func=_cmd_calibrate)


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
        value = number_arg(text, int)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}")
        return value

    return parse


MAX_SEED = 2**32 - 1
"""The largest seed NumPy's and TensorFlow's generators take: beyond it training ended in a
traceback, once TensorFlow had loaded."""


def _seed(text: str) -> int:
    value = number_arg(text, int)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_SEED}")
    return value


def _cmd_train(args: argparse.Namespace) -> int:
    """`soundsentry train`: check every input, then train and write the bundle asked for."""
    # TensorFlow's C++ log: its errors too (a tf.data "NodeDef mentions attribute ..." line at
    # every fit reads like a failure); a real failure is a Python exception with its message.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _check_train_flags(args)
    network = _needs_network(args)
    _note_replaced(args.out)  # notes once the command can run
    if args.normal and not args.all_channels:
        _note_channels(args.normal, args.channel)
    if args.normal:
        _warn_off_folders(args.normal)
    classes = _checked_folders(args)
    if network:
        require("tensorflow", "train", _train_command(args))
    from train.augment import Augmenter

    options = tuple(dict.fromkeys(args.augment or ()))  # `shift shift`: one shift
    augment = Augmenter(options, args.augment_factor) if options else None
    if args.classes:
        return _train_classes(args, classes, augment)
    if args.detector == "embedding":
        return _train_embedding(args)
    if args.detector in NUMPY_DETECTORS:
        return _train_numpy(args)
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


def _needs_network(args: argparse.Namespace) -> bool:
    """Whether the training asked for needs TensorFlow, refused at once if it is missing;
    --all-channels refused for the trainers that read one channel."""
    one_channel = args.classes or (args.detector == "autoencoder" and not args.normal_states)
    if args.all_channels and one_channel:
        raise SoundSentryError(
            "--all-channels trains the numpy detectors and the embedding; the autoencoder and "
            "the classifier read one channel (--channel N)"
        )
    states_network = args.normal_states and args.detector in (None, "embedding")
    network = (
        args.classes
        or states_network
        or args.detector not in NUMPY_DETECTORS
        or _network_member(args)
    )
    if network:  # a missing extra is said first, without the seconds TensorFlow takes to load
        try:
            require_present(("tensorflow", "keras"), "train", _train_command(args))
        except SoundSentryError as exc:
            if not states_network:
                raise
            raise SoundSentryError(  # a Pi's install: the numpy kinds take state folders too
                f"{exc}; or --detector fluctuation trains state folders without it"
            ) from None
    return bool(network)


def _network_member(args: argparse.Namespace) -> bool:
    """Whether an ensemble's members include the int8 CNN (a network: TensorFlow, epochs)."""
    return "embedding" in (args.members or ())


def _checked_folders(args: argparse.Namespace) -> dict[str, list[Path]] | None:
    """The --classes folders (returned) and --normal-states ones (into `args.normal_states`),
    every file checked and named."""
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
    return classes


def _train_classes(
    args: argparse.Namespace, classes: dict[str, list[Path]] | None, augment: Any
) -> int:
    """Train and write a classifier on the --classes folders; print what it tells apart."""
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


def _train_numpy(args: argparse.Namespace) -> int:
    """Train and write a numpy detector (or an ensemble) on --normal or --normal-states."""
    members = {"members": args.members} if args.members else {}
    if _network_member(args):  # the network member's training
        members |= {"epochs": args.epochs, "seed": args.seed}
    if args.normal_states:
        members |= {"states": args.normal_states}
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


def _check_train_flags(args: argparse.Namespace) -> None:
    """Refuse flags the chosen trainer would ignore, and an --out that cannot take a bundle,
    before any audio is read; fills in the default --detector."""
    if args.normal_states and args.detector not in (None, "embedding", *STATE_KINDS):
        raise SoundSentryError(
            f"--normal-states trains the embedding or --detector {', '.join(STATE_KINDS)}, not "
            f"{args.detector}"
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
