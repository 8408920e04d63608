"""Evaluation: score normal and anomalous recordings (ROC AUC, pAUC and counts), or a
classifier's labelled folders (accuracy, confusion).

Needs only the edge install (numpy and the TFLite runtime): it runs on the Pi too. This
module computes and returns numbers; printing them and drawing them is `soundsentry.report`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge.audio_io import check_files, file_digest, find_audio, first_few, read_audio
from edge.bundle import Bundle, channel_for, load_bundle
from edge.errors import AudioError, SoundSentryError
from edge.features import FeatureParams, windows_of
from edge.framing import blocks
from edge.machine_state import OFF
from edge.pipeline import Pipeline, Step
from edge.scoring import Scorer
from edge.settings import DetectorSettings
from edge.threshold import SECONDS_PER_DAY, rate_text
from train.metrics import classification_report, partial_auc, roc_auc
from train.progress import progress

log = logging.getLogger(__name__)

MAX_FPR = 0.1
HEADS_ON_INT8 = ("embedding", "ensemble")
"""Kinds whose numpy head scores the int8 network's embeddings (the CNN, alone or in an
ensemble): the float network feeds it embeddings it was not fitted on."""


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
    normal_files_with_event: str
    """Files whose window scores raise an event in the real event logic (K-of-N and CUSUM at
    the bundle's calibrated settings), of the files scored: what the device would report."""
    anomalous_files_with_event: str
    normal_files_raising: list[str] = field(default_factory=list)
    """The normal files of `normal_files_with_event` that raise one: the recordings to listen
    to (a count alone left a new user unable to find them)."""
    anomalous_files_silent: list[str] = field(default_factory=list)
    """The anomalous files that raise none: the faults the device would miss."""
    normal_windows_off: int = 0
    """Windows the device would take for the machine off (below the bundle's
    `machine.off_below_dbfs`): they raise no event there, nor in the counts above."""
    anomalous_windows_off: int = 0
    items: list[Scored] = field(default_factory=list)

    @property
    def pauc_measured(self) -> bool:
        """The pAUC rests on at least one normal item: 1 / max_fpr of them or more."""
        return pauc_measured(self.n_normal, self.max_fpr)

    def summary(self) -> dict:
        """Metrics without per-item scores (what --json writes, plus the items); the pAUC is
        None where it rests on no normal item (printed `n/a`: the JSON said 1.0)."""
        data = asdict(self)
        data.pop("items")
        if not self.pauc_measured:
            data["pauc"] = None
        return data


def pauc_measured(n_normal: int, max_fpr: float = MAX_FPR) -> bool:
    """A pAUC up to `max_fpr` rests on at least one of `n_normal` normal items: the warning of
    `evaluate` and the `n/a` of its printed figure (soundsentry.report) read this one rule."""
    return n_normal >= 1 / max_fpr


def clip_and_segments(
    scorer: Scorer, windows: np.ndarray, window_s: float, hop_s: float, segment_s: float
) -> tuple[float, list[float]]:
    """The whole file's mean window score and each consecutive segment's (the items `evaluate`
    scores for segment None and for `segment_s`, which also leaves out windows of silence or
    the machine off: the benchmarks' recordings hold none), from one pass of the scorer."""
    return clip_and_segments_of(scorer.score_many(windows), window_s, hop_s, segment_s)


def clip_and_segments_of(
    scores: np.ndarray, window_s: float, hop_s: float, segment_s: float
) -> tuple[float, list[float]]:
    """`clip_and_segments` of window scores already computed."""
    groups = segment_groups(len(scores), window_s, hop_s, segment_s)
    return float(np.mean(scores)), [float(scores[idx].mean()) for _, idx in groups]


def _warn_if_trained_on(
    bundle: Bundle, files: list[Path], looks: str = "it will look normal"
) -> None:
    """Warn about test files the bundle was fitted on (by content: the manifest records every
    training file's hash): a model scores its own training audio as normal, which flatters the
    AUC. The numpy kinds refit the shipped model on all the audio, the held-out files too
    (bundles from before `fitted_seconds` listed only the others in `files`); a network's
    held-out files are fine to test on. A calibrated bundle was refitted on its calibration
    audio too."""
    fitted = bundle.fitted_hashes()
    calibrated = (bundle.manifest.calibration or {}).get("files") or []  # records, as training's
    fitted |= {f["sha256"] for f in calibrated if isinstance(f, dict) and f.get("sha256")}
    if not fitted:  # a bundle that kept no hashes
        log.warning(
            "the model's manifest records no hash of its training files: whether these "
            "recordings were trained on cannot be checked (a model scores its own as normal)"
        )
        return
    for path in files:
        if (digest := file_digest(path)) is not None and digest in fitted:
            log.warning("%s: the model was fitted on this recording; %s", path, looks)


def _refuse_copies_across(normal: list[Path], anomalous: list[Path]) -> None:
    """A recording given as normal and (as a copy) anomalous: its scores count on both sides
    and the AUC says nothing; refused, as the same path is."""
    digests: dict[str, Path] = {}
    for path in normal:
        if (digest := file_digest(path)) is not None:  # unreadable: the audio checks name it
            digests.setdefault(digest, path)
    for path in anomalous:
        if (twin := digests.get(file_digest(path) or "")) is not None:
            raise AudioError(f"{path} (anomalous) is a copy of {twin} (normal): keep it in one")


def evaluate(
    model: str | Path,
    normal: list[str | Path],
    anomalous: list[str | Path],
    segment: float | None = None,
    variant: str = "int8",
    channel: int | None = None,
    detector: DetectorSettings | None = None,
) -> Report:
    """Score every file (or segment) and compute AUC / pAUC with anomalous as positive;
    `channel`: by default the one the model was fitted on; `detector`: the `[detector]`
    settings the device runs with (K, N, a threshold set there...; default: the bundle's)."""
    bundle = load_bundle(model, variant=variant)
    if bundle.manifest.kind == "classifier":  # its score is a class's probability, not oddity
        raise SoundSentryError(
            f"{model} is a classifier: evaluate it on labelled folders with --classes DIR"
        )
    if channel is None:
        channel = channel_for(bundle.manifest, None, "evaluate")
    variant = _variant_to_score(bundle, model, variant)
    p = bundle.features
    if segment is not None and segment < p.window_seconds:
        raise AudioError(f"--segment must be at least the window length ({p.window_seconds} s)")
    found = _test_files(normal, anomalous)
    every = [f for files in found for f in files]
    # a mono file (what `record` writes) is read whatever channel the model was fitted on, as
    # calibrate reads it: evaluate refused the very files a bundle was calibrated on
    check_files(every, max(channel, 0), p.samplerate, mono_any=True)
    _warn_if_trained_on(bundle, every)
    tally = _Tally()
    for label, files in enumerate(found):
        for path in progress(files, "scoring"):
            _score_file(tally, path, label, bundle, detector, channel, segment)
    labels, scores = _scored_arrays(tally, p, segment)
    threshold = (detector or DetectorSettings()).threshold_in_force(bundle.threshold)
    auc = roc_auc(labels, scores)
    named, events = tally.named, tally.events
    _say_what_it_means(bundle, threshold, named[0], len(events[0]), tally.judged_s[0], auc)
    return _report_of(bundle, variant, segment, threshold, auc, labels, scores, tally)


@dataclass
class _Tally:
    """What `evaluate` gathers while scoring the files, normal (index 0) and anomalous (1)."""

    items: list[Scored] = field(default_factory=list)
    events: tuple[list[bool], list[bool]] = field(default_factory=lambda: ([], []))
    named: tuple[list[str], list[str]] = field(default_factory=lambda: ([], []))
    """Normal files with an event, faults without."""
    off: list[int] = field(default_factory=lambda: [0, 0])
    unjudged: int = 0
    unsegmented: list[str] = field(default_factory=list)
    judged_s: list[float] = field(default_factory=lambda: [0.0, 0.0])
    """Seconds of normal and anomalous audio the device judges."""


def _variant_to_score(bundle: Bundle, model: str | Path, variant: str) -> str:
    """The variant `evaluate` scores with; `--float` refused where it means nothing."""
    if bundle.model is None:
        if variant == "float":
            raise SoundSentryError(
                f"--float evaluates a network's float reference; {model} holds no network "
                f"(detector {bundle.manifest.kind}): leave --float out"
            )
        return "numpy"  # no network: the same statistics serve both
    if variant == "float" and bundle.manifest.kind in HEADS_ON_INT8:
        raise SoundSentryError(
            f"--float cannot evaluate {model}: its {bundle.manifest.kind} head is fitted on the "
            "int8 network's embeddings, which the float network's differ from (its own "
            "training audio scored 20 times higher): leave --float out"
        )
    return variant


def _test_files(normal: list[str | Path], anomalous: list[str | Path]) -> list[list[Path]]:
    """The normal and the anomalous audio files; refused if either side has none or shares any."""
    found = [find_audio(paths) for paths in (normal, anomalous)]
    for files, paths in zip(found, (normal, anomalous), strict=True):
        if not files:
            raise AudioError(f"no audio files in {' '.join(str(x) for x in paths)}")
    both = {f.resolve() for f in found[0]} & {f.resolve() for f in found[1]}
    if both:  # its scores would count as normal and as a fault: the AUC says nothing
        raise AudioError(
            f"{len(both)} file(s) given as both normal and anomalous: {first_few(map(str, both))}"
        )
    _refuse_copies_across(found[0], found[1])
    return found


def _score_file(
    tally: _Tally,
    path: Path,
    label: int,
    bundle: Bundle,
    detector: DetectorSettings | None,
    channel: int,
    segment: float | None,
) -> None:
    """Score one file as the device would and add its items, event and counts to `tally`."""
    p = bundle.features
    scores, raised, off_windows = device_events(
        read_audio(path, p.samplerate, channel, mono_any=True), bundle, detector
    )
    # (a window per hop: the machine off, silence or a start-up counts for nothing)
    tally.judged_s[label] += np.count_nonzero(~np.isnan(scores)) * p.hop_seconds
    if len(scores) == 0:
        log.warning("%s: shorter than one window; skipped", path)
        return
    tally.unjudged += int(np.isnan(scores).sum())
    if np.isnan(scores).all():  # said by name: it leaves the AUC (the device raises
        # nothing on it, which the event counts keep, as they count what it reports)
        log.warning("%s: silent, flat or the machine off throughout; not scored", path)
    items = tally.items
    before = len(items)
    for seg, idx in segment_groups(len(scores), p.window_seconds, p.hop_seconds, segment):
        judged = scores[idx][~np.isnan(scores[idx])]
        if len(judged):  # a segment of silence or the machine off says nothing
            items.append(Scored(str(path), seg, label, float(judged.mean())))
    if len(items) == before and segment and not np.isnan(scores).all():  # heard, but
        # no segment holds its scored windows whole: said once for all, below
        tally.unsegmented.append(str(path))
    tally.events[label].append(raised)
    if raised != bool(label):  # named as the items name it (printed escaped)
        tally.named[label].append(str(path))
    tally.off[label] += off_windows


def _scored_arrays(
    tally: _Tally, p: FeatureParams, segment: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """The items' labels and scores, with warnings of what was left out; refused if a side
    has nothing left to score."""
    if tally.unjudged:
        log.warning(
            "%d window(s) silent, flat or holding a dropout, with the machine off, starting or "
            "stopping, or (a model of operating states) heard as another state than the one "
            "named, as the machine changes state, are left out of the scores, as the device "
            "leaves them out of its evidence", tally.unjudged,
        )  # fmt: skip
    labels = np.array([i.label for i in tally.items])
    unsegmented = tally.unsegmented
    if unsegmented and np.any(labels == 0) and np.any(labels == 1):  # else the error says it
        log.warning(
            "%d file(s) hold no whole %g-s segment of audio the device scores (shorter than "
            "--segment?), not in the AUC: %s", len(unsegmented), segment, first_few(unsegmented),
        )  # fmt: skip
    for label, side in enumerate(("normal", "anomalous")):
        if not np.any(labels == label):
            raise AudioError(
                f"no {side} audio left to score: every {side} file is shorter than one window "
                f"({p.window_seconds:g} s)"
                + (f" or than --segment ({segment:g} s)" if segment else "")
                + ", or silent, or the machine off"
            )
    scores = np.array([i.score for i in tally.items])
    if not pauc_measured(int((labels == 0).sum())):
        log.warning(
            "only %d normal item(s): the pAUC up to a false-positive rate of %g rests on none "
            "(it needs %d or more) and the AUC on few; score more normal audio%s",
            (labels == 0).sum(), MAX_FPR, math.ceil(1 / MAX_FPR),
            ", or use --segment to score it in parts" if segment is None else "",
        )  # fmt: skip
    return labels, scores


def _report_of(
    bundle: Bundle,
    variant: str,
    segment: float | None,
    threshold: float,
    auc: float,
    labels: np.ndarray,
    scores: np.ndarray,
    tally: _Tally,
) -> Report:
    """The Report of the items scored and the files' events."""
    events, named, off = tally.events, tally.named, tally.off
    return Report(
        model=bundle.model_id,
        variant=variant,
        unit=f"{segment:g}-s segments" if segment else "whole files",
        auc=round(auc, 4),
        pauc=round(partial_auc(labels, scores, MAX_FPR), 4),
        max_fpr=MAX_FPR,
        n_normal=int((labels == 0).sum()),
        n_anomalous=int((labels == 1).sum()),
        threshold=threshold,
        normal_files_with_event=f"{sum(events[0])}/{len(events[0])}",
        anomalous_files_with_event=f"{sum(events[1])}/{len(events[1])}",
        normal_files_raising=named[0],
        anomalous_files_silent=named[1],
        normal_windows_off=off[0],
        anomalous_windows_off=off[1],
        items=tally.items,
    )


def printable(name: str) -> str:
    """A file name as text any output holds: bytes that are not UTF-8 (a name from an old FAT
    stick or another locale) as backslash escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _say_what_it_means(
    bundle: Bundle, threshold: float, raising: list[str], files: int, seconds: float, auc: float
) -> None:
    """Warn of what the figures mean for the device: normal files with an event at the
    bundle's own threshold are a rate far above the budget it was set for, and an AUC below
    0.5 ranks normal running above the faults (both printed without a word: a new user's
    walk-through on pumps and valves)."""
    budget = bundle.manifest.threshold.params.get("false_alarms_per_day")
    alarms = len(raising)
    if alarms and seconds > 0 and budget and threshold == bundle.threshold:
        per_day = alarms / seconds * SECONDS_PER_DAY
        if per_day > budget:
            log.warning(
                "%d of %d normal file(s) raised an event at the model's threshold (%s): at least "
                "%s a day in the %.0f s of them the device judged, against the %g a day it was "
                "set for. This normal running "
                "is not like the audio it was trained on: train (or calibrate) on more, and more "
                "varied, normal audio, these recordings too",
                alarms, files, first_few(map(printable, raising)), rate_text(per_day), seconds,
                budget,
            )  # fmt: skip
    if auc < 0.5:
        log.warning(
            "AUC %.3f is below 0.5: this detector scores these normal recordings above the "
            'faults; another kind may suit this machine (docs/detection.md: "Which kind '
            'for which machine")',
            auc,
        )


def device_events(
    audio: np.ndarray, bundle: Bundle, detector: DetectorSettings | None = None
) -> tuple[np.ndarray, bool, int]:
    """One file's audio streamed on its own through the daemon's pipeline: its window scores
    (NaN for the windows the device takes as no evidence: silent, flat or holding a dropout,
    the machine off, starting up or coasting to a stop, as training leaves them out), whether
    it raises an event, and how many of its windows were the machine off. The pipeline is the
    device's own gating, then K-of-N and CUSUM at the bundle's calibration, or as the device's
    `[detector]` settings change them (a review: K = N = 3 raised events on 7 of 20 fault
    files in replay with them, on 8 in evaluate without)."""
    steps, _ = device_run(audio, bundle, detector)
    raised = any(t.kind == "start" for step in steps for t in step.transitions)
    return evidence_scores(steps), raised, sum(step.machine == OFF for step in steps)


def evidence_scores(steps: list[Step]) -> np.ndarray:
    """The steps' window scores, NaN where the device takes no evidence."""
    return np.array([s.window.score if s.evidence else np.nan for s in steps], np.float64)


def device_run(
    audio: np.ndarray, bundle: Bundle, detector: DetectorSettings | None = None
) -> tuple[list[Step], list[tuple[float, float, str]]]:
    """`device_events`' stream: its steps, and each anomaly it raises as (start, end, trigger)
    in seconds of the file (an anomaly still open at the file's end ends there)."""
    pipeline = Pipeline(bundle, detector)
    # a block at a time: pushed whole, the pipeline cut a copy of every window's samples at
    # once (one 1-h file took 0.74 GB to evaluate)
    steps = [step for block in blocks(audio) for step in pipeline.push(block)]
    last = pipeline.close("end_of_stream")
    ends = [t for step in steps for t in step.transitions if t.kind == "end"]
    ends += [last] if last is not None else []
    events = [(t.started_s, float(t.ended_s or t.started_s), str(t.trigger)) for t in ends]
    return steps, events


def write_json(report: Report, path: str | Path) -> None:
    """Metrics and per-item scores as JSON (`write_text_output`)."""
    data = report.summary() | {"items": [asdict(i) for i in report.items]}
    write_text_output(path, json.dumps(data, indent=2) + "\n")


def output_target(path: str | Path) -> Path | None:
    """Where an output file of a command is replaced atomically: through a link, its target
    (`/dev/stdout` sent to a file: that file); None for a device or a pipe (a terminal's
    /dev/stdout), written to as it is. The one rule of `write_text_output`, the report's
    pictures and the early check of an output's folder."""
    path = Path(path)
    if path.exists() and not path.resolve().is_file():
        return None
    return path.resolve() if path.is_symlink() else path


def write_text_output(path: str | Path, text: str) -> None:
    """An output file of a command (`--json`): replaced atomically (`output_target`), parent
    folders created; a device or a pipe (/dev/stdout) is written to."""
    from edge.private import atomic_write

    target = output_target(path)
    if target is None:
        Path(path).write_text(text)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: tmp.write_text(text), mode=0o644)


def classify_items(
    model: str | Path,
    classes_dir: str | Path,
    segment: float | None,
    variant: str,
    channel: int,
    with_events: bool = False,
) -> tuple[list[str], list[tuple[str, int | None, int, int]], dict[str, dict]]:
    """Per file (or segment): (file, segment, true index, predicted index) by mean probability;
    and with `with_events`, what the device raises on each class's files (`_tally_events`),
    from the same reading of each file (a second pass read and resampled them all again)."""
    from edge.events import healthy_classes
    from train.dataset import class_folders

    bundle = load_bundle(model, variant=variant)
    if bundle.manifest.kind != "classifier":
        raise AudioError("--classes needs a classifier bundle (trained with --classes)")
    labels = bundle.manifest.labels or []
    healthy = healthy_classes(labels)
    scorer = Scorer.from_bundle(bundle)
    p = bundle.features
    if segment is not None and segment < p.window_seconds:  # no segment would hold a window
        raise AudioError(f"--segment must be at least the window length ({p.window_seconds} s)")
    rows = []
    events: dict[str, dict] = {}
    groups = class_folders(classes_dir, least=1)  # one class's recordings are a check too
    every = [f for files in groups.values() for f in files]
    _warn_if_trained_on(bundle, every, "it will look like its class")
    for name, files in groups.items():
        if name not in labels:
            raise AudioError(f"class folder {name!r} is not one of the model's {labels}")
        tally = {"files": 0, "own": 0, "other": 0, "healthy": name in healthy}
        if with_events:
            events[name] = tally
        for path in progress(files, f"scoring {name}"):
            audio = read_audio(path, p.samplerate, channel, mono_any=True)
            if with_events:  # a silent file too, as replay counts it (a diff review)
                _tally_events(tally, name, audio, bundle)
            windows = windows_of(audio, p, heard=True)
            if len(windows) == 0:
                log.warning("%s: shorter than one window, or silent; skipped", path)
                continue
            probs = np.stack([scorer.probabilities(w) for w in windows])
            for seg, idx in segment_groups(len(windows), p.window_seconds, p.hop_seconds, segment):
                pred = int(probs[idx].mean(axis=0).argmax())
                rows.append((str(path), seg, labels.index(name), pred))
    if not rows:
        raise AudioError(f"nothing to score in {classes_dir}: every file is shorter than a window")
    return labels, rows, events


def _tally_events(tally: dict, name: str, audio: np.ndarray, bundle: Bundle) -> None:
    """What the device raises on one file of class `name`, its own stream through its pipeline
    (K of N confident windows at the bundle's settings), counted into `tally`: the file, an
    event of its own class, an event of another (for `normal` or `off`, whose windows raise
    none of their own: false alarms). A confusion table of whole files hid them: 4 of 13 normal
    recordings raised fault events in a review, and a file named rightly raised another fault
    first."""
    steps, _ = device_run(audio, bundle)
    if not steps:  # shorter than a window: the confusion table skips it too, and replay
        return
    named = {t.label for step in steps for t in step.transitions if t.kind == "start"}
    tally["files"] += 1
    tally["own"] += name in named
    tally["other"] += bool(named - {name})


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


def classification(
    model: str | Path,
    classes_dir: str | Path,
    segment: float | None = None,
    variant: str = "int8",
    channel: int = 0,
) -> dict:
    """Accuracy, balanced accuracy, macro F1, the confusion matrix and every item's prediction
    of a classifier bundle on labelled folders (what `evaluate --classes --json` writes)."""
    labels, rows, events = classify_items(
        model, classes_dir, segment, variant, channel, with_events=True
    )
    report = classification_report(
        np.array([r[2] for r in rows]), np.array([r[3] for r in rows]), labels
    )
    return report | {
        "unit": f"{segment:g}-s segments" if segment else "whole files",
        "variant": variant,
        "events": events,
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
