"""`soundsentry train --classes DIR`: labelled recordings (one subfolder per class) -> a
compact CNN classifier on the same front end -> int8 TFLite -> bundle."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from edge.advice import MIN_AUDIO_SECONDS, RECOMMENDED_AUDIO_SECONDS
from edge.audio_io import read_audio
from edge.bundle import MODEL_FLOAT, MODEL_INT8, id_stem, sha256_bytes, write_bundle
from edge.errors import AudioError
from edge.features import FeatureParams, windows_of
from edge.runtime import TfliteModel
from edge.scoring import Scorer
from edge.threshold import score_stats
from train.augment import Augmenter
from train.dataset import TRAIN_HOP_DIVISOR, Holdout, class_folders, dense_params, holdout_split
from train.metrics import classification_report
from train.model import CLASSIFIER, build_classifier
from train.progress import progress
from train.quantize import to_float_tflite, to_int8_tflite
from train.trainer import BATCH_SIZE, LEARNING_RATE, STD_FLOOR_DB, EpochLines, base_manifest

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 30
MIN_CONFIDENCE = 0.5
NEAR_CHANCE = 0.15
"""A validation balanced accuracy less than this above chance (1 / classes) is warned of: a
valve's normal-against-fault classifier validated at 0.079 and was written without a word
(the figure went to an INFO log), in a review."""


def split_windows(
    classes: dict[str, list[Path]], params: FeatureParams, channel: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Holdout]]:
    """Training windows (dense hop) and validation windows (edge hop) with labels, and the
    held-out split of each class: `holdout_split` applied to every class folder on its own."""
    dense = dense_params(params)
    xt, yt, xv, yv = [], [], [], []
    holdouts: dict[str, Holdout] = {}
    seconds = dict.fromkeys(classes, 0.0)
    for label, (name, files) in enumerate(classes.items()):
        holdout = holdouts[name] = holdout_split(files)
        if holdout.in_time:  # the validation then says how it knows its recordings, no more
            log.warning(
                "class %r: %d recording(s), so its validation windows are the last fifth of "
                "the same recordings, not recordings it never heard: its accuracy flatters it; "
                "give it 5 or more recordings",
                name, len(files),
            )  # fmt: skip
        for path in progress(files, f"features {name}"):
            audio = read_audio(path, params.samplerate, channel, mono_any=True)
            seconds[name] += len(audio) / params.samplerate
            train_part, val_part = holdout.parts(path, audio, params.window_samples)
            for part, xs, ys, p in ((train_part, xt, yt, dense), (val_part, xv, yv, params)):
                w = windows_of(part, p, heard=True)  # as the device hears them
                xs.append(w)
                ys.append(np.full(len(w), label))
    yt_all, yv_all = np.concatenate(yt), np.concatenate(yv)
    for name, sec in seconds.items():  # as `--normal` refuses below it: here only said, for
        if sec < MIN_AUDIO_SECONDS:  # a fault's few seconds may be all there is of it
            log.warning(
                "class %r: only %.1f s of audio; a class needs %g s or more to be learnt and "
                "checked on audio it did not learn from (%g s recommended): its validation "
                "below stands on a few windows",
                name, sec, MIN_AUDIO_SECONDS, RECOMMENDED_AUDIO_SECONDS,
            )  # fmt: skip
    for label, name in enumerate(classes):  # a class with nothing to learn or to check on
        fit, held = int((yt_all == label).sum()), int((yv_all == label).sum())
        if not fit or not held:  # trained blind, or validated on its own training windows
            which = "to train on" if not fit else "held out to validate on"
            raise AudioError(
                f"class {name!r}: no {params.window_seconds:g}-s window {which} (its "
                f"{len(classes[name])} recording(s) are too short, or silent: digital silence, "
                "a flat line or dropouts are never windows of a class); give it 5 or more "
                f"recordings, or recordings of at least {5 * params.window_seconds:g} s "
                "(the last fifth of each is held out)"
            )
    return np.concatenate(xt), yt_all, np.concatenate(xv), yv_all, holdouts


def near_chance(report: dict) -> str | None:
    """The warning for a validation (train.metrics.classification_report) no better than
    chance, or None."""
    chance = 1 / len(report["labels"])
    if report["balanced_accuracy"] >= chance + NEAR_CHANCE:
        return None
    return (
        f"validation: balanced accuracy {report['balanced_accuracy']:.3f} on {report['n']} "
        f"held-out windows, no better than chance ({chance:.2f}): this classifier does not "
        "tell its classes apart in audio it did not learn from, and its class events cannot "
        "be trusted; record more, and more varied, audio of each class (other days, loads, "
        "positions)"
    )


RECALL_WARN_FAULT = 0.5
"""A fault class whose held-out windows are named rightly less often than this is warned of:
most of its windows would be named another class, and a fault of it missed or misnamed."""
RECALL_WARN_NEWS = 0.9
"""A class that raises no event of its own (`normal`, `off`), or any class of a model without
a class `normal` (each change of class is an event), named rightly less often than this is
warned of: its windows named another class raise events where nothing changed. In a review a
`normal` recall of 0.68, said without a word, raised 6 fault events in 4 of 13 normal
recordings the model never heard."""


def recall_warnings(report: dict) -> list[str]:
    """The warnings for classes (train.metrics.classification_report) named rightly too rarely
    in the validation: false alarms where the machine runs well, or faults missed."""
    from edge.events import healthy_classes, is_fault

    labels = report["labels"]
    healthy = healthy_classes(labels)
    counts = dict(zip(labels, np.asarray(report["confusion"]).sum(axis=1), strict=True))
    said = []
    for name, recall in (report.get("recall") or {}).items():
        if recall is None:
            continue
        fault = is_fault(name, healthy)
        if recall >= (RECALL_WARN_FAULT if fault else RECALL_WARN_NEWS):
            continue
        share = f"class {name!r}: {recall:.0%} of its {counts[name]} held-out windows named rightly"
        if fault:
            said.append(
                f"{share}: most of its windows are named another class, so a fault of it may be "
                "missed or reported under another name; record more of it (other days, "
                "positions) or check its recordings hold the fault"
            )
        else:
            what = "fault events" if healthy else "class-change events"
            said.append(
                f"{share}: its other windows are named another class, and K of N of them raise "
                f"{what} while nothing changed (false alarms); record more of it (other days, "
                "loads, positions) and check with `replay` on recordings the model never heard"
            )
    return said


def _classes_of(
    classes_dir: str | Path | dict[str, list[Path]], channel: int, params: FeatureParams
) -> dict[str, list[Path]]:
    """The class folders' recordings, by class: `classes_dir` itself when already found."""
    return (
        classes_dir
        if isinstance(classes_dir, dict)
        else class_folders(classes_dir, channel, params.samplerate)
    )


def _standardised(xt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-band mean and spread of the training windows, and the windows standardised by
    them as the network takes them."""
    mean = xt.mean(axis=(0, 1))
    std = np.maximum(xt.std(axis=(0, 1)), STD_FLOOR_DB)
    return mean, std, ((xt - mean) / std)[..., None].astype(np.float32)


def _fit_network(
    x: np.ndarray, yt: np.ndarray, labels: list[str], params: FeatureParams, epochs: int
) -> keras.Model:
    """The CNN classifier trained on the standardised windows, each class weighted by its
    share of the windows."""
    counts = np.bincount(yt, minlength=len(labels))
    weights = {i: len(yt) / (len(labels) * max(c, 1)) for i, c in enumerate(counts)}
    model = build_classifier(*params.shape, len(labels))
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(
        x,
        yt,
        epochs=epochs,
        batch_size=BATCH_SIZE,
        shuffle=True,
        class_weight=weights,
        verbose=0,
        callbacks=[EpochLines(epochs)],
    )
    return model


def _validate(
    scorer: Scorer, xv: np.ndarray, yv: np.ndarray, labels: list[str]
) -> tuple[np.ndarray, dict]:
    """The int8 model's probabilities on the validation windows and their report; warns of a
    validation near chance or of classes named rightly too rarely."""
    probs = np.stack([scorer.probabilities(w) for w in xv])  # every class has some (above)
    report = classification_report(yv, probs.argmax(axis=1), labels)
    said = near_chance(report)
    for warning in [said] if said else recall_warnings(report):  # near chance: that says it
        log.warning("%s", warning)
    return probs, report


def _classifier_fields(
    m: TfliteModel, labels: list[str], probs: np.ndarray, report: dict, holdouts: dict[str, Holdout]
) -> dict:
    """The manifest's classifier fields: output, threshold, scores and validation."""
    return {
        "kind": "classifier",
        "score": "softmax",
        "labels": labels,
        "output": {
            "shape": [1, len(labels)],
            "dtype": str(m.output_dtype),
            "scale": m.output_quant.scale,
            "zero_point": m.output_quant.zero_point,
        },
        "threshold": {
            "value": MIN_CONFIDENCE,
            "rule": "min-confidence",
            "params": {"meaning": "a window counts for a class at this probability"},
        },
        "normal_scores": score_stats(
            probs.max(axis=1), "validation windows: top-class probability"
        ),
        # by name: a bundle never records the trainer's paths (training.holdout_files records
        # them by name, size and hash)
        "validation": report
        | {
            "held_out_files": {k: [Path(f).name for f in h.held_names] for k, h in holdouts.items()}
        },
    }


def _training_record(
    holdouts: dict[str, Holdout],
    seconds: float,
    holdout_seconds: float,
    channel: int,
    epochs: int,
    seed: int,
    model: keras.Model,
    augment: Augmenter | None,
) -> dict:
    """The manifest's `training` section."""
    return {
        "files": [f for h in holdouts.values() for f in h.fit_names],
        "seconds": round(seconds, 1),
        "holdout_files": [f for h in holdouts.values() for f in h.held_names],
        "holdout_seconds": round(holdout_seconds, 1),
        "channel": channel,
        "epochs": epochs,
        "seed": seed,
        "architecture": CLASSIFIER,
        "parameters": int(model.count_params()),
    } | (augment.record() if augment is not None else {})


def train_classifier(
    classes_dir: str | Path | dict[str, list[Path]],
    out: str | Path,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    channel: int = 0,
    params: FeatureParams | None = None,
    augment: Augmenter | None = None,
) -> Path:
    """Train a classifier bundle; returns its path. `classes_dir`: the folder of class folders,
    or what train.dataset.class_folders made of it."""
    params = params or FeatureParams()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    classes = _classes_of(classes_dir, channel, params)
    labels = list(classes)
    xt, yt, xv, yv, holdouts = split_windows(classes, params, channel)
    seconds = len(xt) * params.hop_seconds / TRAIN_HOP_DIVISOR  # the audio's, not its copies'
    if augment is not None:
        xt, yt = augment.labelled_copies(xt, yt, np.random.default_rng(seed))
    mean, std, x = _standardised(xt)
    model = _fit_network(x, yt, labels, params, epochs)
    float_tflite = to_float_tflite(model)
    int8_tflite = to_int8_tflite(model, x, seed, groups=yt)  # every class, a rare fault too
    scorer = Scorer(TfliteModel(int8_tflite, name="int8 model"), mean, std, labels)
    probs, report = _validate(scorer, xv, yv, labels)
    out = Path(out)
    m = scorer.model
    manifest = base_manifest(out, params, mean, std, m, int8_tflite)
    manifest |= _classifier_fields(m, labels, probs, report, holdouts) | {
        "training": _training_record(
            holdouts, seconds, len(xv) * params.hop_seconds, channel, epochs, seed, model, augment
        ),
    }
    manifest["model_id"] = f"{id_stem(out)}-{sha256_bytes(int8_tflite)[:8]}"
    write_bundle(out, manifest, {MODEL_INT8: int8_tflite, MODEL_FLOAT: float_tflite})
    log.info("wrote %s: validation balanced accuracy %.3f", out, report["balanced_accuracy"])
    return out
