"""Training data: audio files -> log-mel windows with the edge front end, and the one held-out
split every trainer uses (autoencoder, fluctuation, classifier per class)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import soundfile as sf

from edge.advice import MIN_AUDIO_SECONDS, require_audio, warn_short
from edge.audio_io import (
    check_files,
    find_audio,
    first_few,
    read_audio,
    read_each,
    sf_path,
    skipped_folder,
    without_copies,
)
from edge.bundle import SAFE_LABEL
from edge.errors import AudioError
from edge.features import FeatureParams
from edge.machine_state import (
    OFF,
    SETTLE_SECONDS,
    dead_seconds,
    evidence_windows,
    machine_profile,
    say_once,
)
from edge.settings import DetectorSettings
from edge.threshold import Pieces, threshold_for_budget
from train.progress import progress

log = logging.getLogger(__name__)

LABEL_RULE = (
    "the letters A-Z and a-z, digits, spaces and . _ : + - (up to 64, starting with a letter or "
    "a digit); rename the folder"
)
"""What a class or state folder's name may hold (edge.bundle.SAFE_LABEL), said when it holds
more: `ä` is a letter to its user."""

HOLDOUT_FRACTION = 0.2
"""Share of the recordings kept aside for the threshold (or the classifier's validation); see
`holdout_split` for which ones."""
TRAIN_HOP_DIVISOR = 4
"""Training windows of the networks (autoencoder, classifier) are cut 4x denser than the edge's
hop: more views of the same audio for gradient descent."""
FLUCTUATION_HOP_DIVISOR = 2
"""The fluctuation model's fitting windows are cut only 2x denser than the edge's hop. It fits a
mean and a covariance, not a network: denser windows are near-copies of their neighbours that add
little to those statistics but multiply the memory of every channel view (`--all-channels`), and
the shipped fan-demo bundle and the bench/ figures were measured with this divisor."""


@dataclass
class WindowSet:
    """Windows of log-mel features and where they came from."""

    windows: np.ndarray
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    pieces: list[int] | None = None
    """Windows of each recording, in order (edge.threshold.Pieces); None: not kept apart."""


@dataclass
class Split:
    """Training windows (dense hop) and held-out windows (the edge's hop)."""

    train: WindowSet
    holdout: WindowSet
    machine: dict = field(default_factory=dict)
    """The manifest's `machine` section: how loud the machine runs (edge.machine_state)."""


@dataclass(frozen=True)
class Holdout:
    """Which audio is held out: whole recordings (`held`), or, with too few recordings to spare
    one, the last `fraction` of every recording (`held` is empty: `in_time`)."""

    fit: list[Path]
    held: list[Path]
    fraction: float = HOLDOUT_FRACTION

    @property
    def in_time(self) -> bool:
        """True when every file is split in time instead of whole files being held out."""
        return not self.held

    def parts(
        self, path: Path, audio: np.ndarray, min_samples: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """(audio to fit on, held-out audio) of one file. In a time split the tail is held out,
        unless the head or the tail would be shorter than `min_samples` (one window, say): then
        all of the file fits."""
        if not self.in_time:
            return (audio[:0], audio) if path in self.held else (audio, audio[:0])
        cut = int(len(audio) * (1 - self.fraction))
        if cut < min_samples or len(audio) - cut < min_samples:
            cut = len(audio)
        return audio[:cut], audio[cut:]

    @property
    def fit_names(self) -> list[str]:
        """`training.files` of a manifest: the paths as strings (write_bundle records them)."""
        return [str(f) for f in self.fit]

    @property
    def all_names(self) -> list[str]:
        """Every file, fitting and held out, in sorted order: what a model refitted on all the
        audio after the threshold was set was fitted on."""
        return [str(f) for f in sorted({*self.fit, *self.held})]

    @property
    def held_names(self) -> list[str]:
        """`training.holdout_files`: the files held-out audio came from (all, in a time split)."""
        return self.fit_names if self.in_time else [str(f) for f in self.held]


def holdout_split(files: list[Path], fraction: float = HOLDOUT_FRACTION) -> Holdout:
    """The held-out split of every trainer, by recording and spread across the set. Whole
    recordings, because a new recording differs more than another part of the same one.

    In sorted path order every `round(1 / fraction)`-th file (at least every 2nd) is held out
    (fraction 0.2: indices 4, 9, 14, ...; one shorter than MIN_HELD_SECONDS gives way to the
    nearest longer one before it in its group, and a group of only such files holds none; none
    held at all: the time split below), so a folder named by condition or date gives its
    held-out files from all of them rather than all from the last. Deterministic: the same files
    give the same split, in whatever order they come. With fewer files than that step (fewer
    than 5 at 0.2), or when the files held out would hold more than MAX_HELD_SHARE of the audio
    (recordings of very different lengths), none is spared: every file keeps its last
    `fraction` aside instead (`Holdout.parts`), the single place of that fallback.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be between 0 and 1, not {fraction}")
    ordered = sorted(files)
    step = max(2, round(1 / fraction))
    held = []
    seconds = {f: _seconds(f) for f in ordered}  # each file's header read once
    for end in range(step, len(ordered) + 1, step):  # one file of every `step` in sorted order
        group = ordered[end - step : end]
        usable = [f for f in group if seconds[f] >= MIN_HELD_SECONDS]
        if usable:  # the last, unless it is too short to score (a recording's final chunk)
            held.append(usable[-1])
    total = sum(seconds.values())
    if math.isfinite(total) and sum(seconds[f] for f in held) > MAX_HELD_SHARE * total:
        held = []  # one long recording among short ones: split every recording in time instead
    spared = set(held)
    return Holdout([f for f in ordered if f not in spared], held, fraction)


MAX_HELD_SHARE = 0.4
"""Whole recordings are held out only while they are at most this share of the audio: four
10-s clips beside a 20-min recording held the long one out, and the model was fitted on 40 s
(its threshold 3.0 where the model fitted on all of it runs at 1.5; no fault reported)."""


MIN_HELD_SECONDS = 2 * FeatureParams().window_seconds
"""A recording shorter than this (a 1-s last chunk of `record`) is not held out whole: it
gives too few windows for the threshold; another file of its group is held out instead."""
MIN_HELD_WINDOWS = 3
"""The fewest held-out windows a threshold is set on: a gamma fit and the K-of-N floor (K = 3
of N = 4) stand on no fewer (edge.advice)."""


def _seconds(path: Path) -> float:
    """A recording's length in seconds; unknown (unreadable here) counts as long enough: the
    audio checks name a file that cannot be read."""
    try:
        return float(sf.info(sf_path(path)).duration)
    except (sf.LibsndfileError, RuntimeError, TypeError, OSError):
        return float("inf")


def require_held_out(windows: int, params: FeatureParams, held: list[Path] | None = None) -> None:
    """Refuse (AudioError, one line) when fewer than MIN_HELD_WINDOWS windows could be held out:
    the threshold would otherwise rest on a window or two (or on the audio the model was fitted
    on, and sit too low). `held`: the recordings held out whole, named in the line."""
    if windows < MIN_HELD_WINDOWS and held:  # long enough (holdout_split): not the machine
        raise AudioError(
            f"train: too little audio could be held out to set the threshold: the recording(s) "
            f"held out whole ({', '.join(map(str, held))}) hold {windows} window(s) of the "
            f"machine running, {MIN_HELD_WINDOWS} needed: is the machine off, stopping or "
            "silent in them? give recordings of it running (or leave that one out)"
        )
    if windows < MIN_HELD_WINDOWS:
        raise AudioError(
            f"train: too little audio could be held out to set the threshold: {windows} "
            f"window(s), {MIN_HELD_WINDOWS} needed; give 5 or more recordings of at "
            f"least {MIN_HELD_SECONDS:g} s each, or recordings of at least "
            f"{MIN_HELD_SECONDS / HOLDOUT_FRACTION:g} s each (the last fifth of each is held out)"
        )


def training_audio(
    paths: list[str | Path],
    samplerate: int | None = None,
    window_seconds: float = FeatureParams().window_seconds,
    channel: int = 0,
) -> list[Path]:
    """The audio files under `paths`; an AudioError when there are none, when any cannot be
    used (all of them named; below the model's `samplerate`, or without `channel`, among them),
    or when they hold less than edge.advice.MIN_AUDIO_SECONDS (the line says how much more to
    record). Recordings shorter than one window are left out, and folders without audio named,
    in a warning. Sorted by path, whatever order they were given in: the order sets the windows',
    the held-out split's and the networks' batches', so `--seed` alone fixes the model."""
    files = sorted(find_audio(paths))
    if not files:
        raise AudioError("no audio files found in " + " ".join(str(p) for p in paths))
    for folder in (Path(p) for p in paths):
        if folder.is_dir() and not find_audio([folder], quiet=True):
            log.warning("%s: no audio files in this folder", folder)
    # every unusable file named, copies among them, and those without the channel asked for
    # (reading named only the first of them); a mono file is read as its one channel, whatever
    # the channel (what `record` writes from the channel the device listens on)
    checked = check_files(files, max(channel, 0), samplerate, mono_any=True)
    seconds = {f: n / rate for f, (n, rate) in zip(files, checked, strict=True)}
    short = [str(f) for f in files if seconds[f] < window_seconds]
    warn_short(short, window_seconds)
    files = without_copies([f for f in files if seconds[f] >= window_seconds])
    require_audio(sum(seconds[f] for f in files), "train")
    return files


def dense_params(params: FeatureParams, divisor: int = TRAIN_HOP_DIVISOR) -> FeatureParams:
    """The edge's features with the hop divided by `divisor`, for training windows."""
    return replace(params, hop_seconds=params.hop_seconds / divisor)


def threshold_from_holdout(
    scores: np.ndarray,
    false_alarms_per_day: float,
    hop_seconds: float,
    seconds: float | None = None,
    pieces: Pieces = None,
) -> tuple[float, dict]:
    """Threshold meeting the false-alarm budget on held-out normal scores, for the event logic
    (K of N windows to start, M to end) at the defaults edge defines in DetectorSettings, bounded
    by the held-out scores; the budget is shared with the CUSUM whose parameters it returns under
    'cusum' (edge.threshold). `scores` are in stream order: the floors replay them. `seconds`:
    the held-out audio's length when its channels were scored as views (less than the windows
    span). `pieces`: the held-out windows of each recording (or view), in order: each is a
    stream of its own (edge.threshold.Pieces)."""
    det = DetectorSettings()
    return threshold_for_budget(
        scores,
        false_alarms_per_day,
        *det.k_of_n(),
        det.release_windows,
        hop_seconds,
        integrate=det.integrate,
        seconds=seconds,
        pieces=pieces,
    )


def warn_dead(views: Iterable[tuple[Path, np.ndarray]], params: FeatureParams) -> None:
    """Say how much of the recordings (of any of their channels) the device hears as nothing
    (digital silence, a flat line, dropouts), which training leaves out: half of a recording
    with a 0.2-s dropout every 10 s was left out without a word, its summary counting the rest
    as the machine running (a new user's walk-through)."""
    dead: dict[Path, float] = {}
    for path, audio in views:
        dead[path] = max(dead.get(path, 0.0), dead_seconds(audio, params))
    found = {p: s for p, s in dead.items() if s > 0}
    if not found or not say_once(("dead", frozenset(found.items()))):
        return
    log.warning(
        "%.1f s of %d recording(s) (%s) hold digital silence, a flat line or dropouts (runs of "
        "zeros): the device judges nothing by such windows, nor by the %g s after a loss "
        "longer than about a second, and training leaves them out as it does; a microphone "
        "that drops out is a fault to mend (`soundsentry record` names the audio it loses)",
        sum(found.values()), len(found), first_few(map(str, found)), SETTLE_SECONDS,
    )  # fmt: skip


def load_split(paths: list[str | Path], params: FeatureParams, channel: int = 0) -> Split:
    """Read normal recordings and split them into training and held-out windows."""
    files = training_audio(paths, params.samplerate, params.window_seconds, channel)
    holdout = holdout_split(files)
    dense = dense_params(params)
    train, hold = [], []
    train_s = hold_s = 0.0
    audios = read_each(  # every file found unusable in reading named at once
        files,
        lambda path: read_audio(path, params.samplerate, channel, need_sound=True, mono_any=True),
        progress(files, "reading"),
    )
    warn_dead(zip(files, audios, strict=True), params)
    machine = machine_profile(audios, params)
    off = machine.get("off_below_dbfs")  # as the device: no dropout, not the machine off
    for path, audio in zip(files, audios, strict=True):
        fit_part, held_part = holdout.parts(path, audio, params.window_samples)
        train.append(evidence_windows(fit_part, dense, off))
        hold.append(evidence_windows(held_part, params, off))
        train_s += len(fit_part) / params.samplerate
        hold_s += len(held_part) / params.samplerate
    split = Split(
        WindowSet(np.concatenate(train), holdout.fit_names, train_s),
        WindowSet(np.concatenate(hold), holdout.held_names, hold_s, [len(w) for w in hold]),
        machine,
    )
    if len(split.train.windows) == 0:
        raise AudioError(f"not enough audio to train: need at least {params.window_seconds} s")
    require_held_out(len(split.holdout.windows), params, holdout.held)
    log.info(
        "training on %d windows (%.0f s), holding out %d (%.0f s) from %d files",
        len(split.train.windows),
        train_s,
        len(split.holdout.windows),
        hold_s,
        len(files),
    )
    return split


def class_folders(
    root: str | Path, channel: int = 0, samplerate: int | None = None, least: int = 2
) -> dict[str, list[Path]]:
    """Class name -> its audio files, from the subfolders of `root`, checked before anything is
    trained: an empty subfolder and recordings directly in `root` are named (they are no
    class), byte-identical copies used once, and every file that cannot be used named at once
    (AudioError). Training needs `least` = 2 classes; checking a model needs only one (the
    recordings of one fault, to see how many of them it recognises)."""
    root = Path(root)
    if not root.is_dir():
        raise AudioError(f"{root}: --classes needs a folder with one subfolder per class")
    groups: dict[str, list[Path]] = {}
    # hidden and system folders are skipped as every search for audio skips them (a desktop's
    # .Trash-1000 holds the deleted recordings of every class)
    folders = (d for d in root.iterdir() if d.is_dir() and not skipped_folder(d.name))
    for folder in sorted(folders):
        files = find_audio([folder])  # what the search skips in it is named
        if files and not re.fullmatch(SAFE_LABEL, folder.name):  # before training, not after
            raise AudioError(
                f"{folder}: a class folder's name is the class's name in events: {LABEL_RULE}"
            )
        if files:
            groups[folder.name] = files
        else:
            log.warning("%s holds no audio: it is not a class", folder)
    loose = [f for f in find_audio([root], quiet=True) if f.parent == root]
    if loose:
        names = ", ".join(f.name for f in loose[:3]) + (", ..." if len(loose) > 3 else "")
        log.warning(
            "%d recording(s) directly in %s belong to no class and are left out (%s): move them "
            "into a class subfolder",
            len(loose), root, names,
        )  # fmt: skip
    if len(groups) < least:
        need = "two subfolders" if least == 2 else f"{least} subfolder(s)"
        raise AudioError(f"{root}: need at least {need} with audio (one per class)")
    every = [f for v in groups.values() for f in v]
    # every file that cannot be used named at once; a mono file is read as its one channel
    # (train.classifier reads it so), as `--normal` and `--normal-states` check them
    check_files(every, max(channel, 0), samplerate, mono_any=True)
    kept = set(without_copies(every))  # across classes too: a recording in two is a mislabel
    groups = {name: [f for f in files if f in kept] for name, files in groups.items()}
    for name, files in groups.items():
        if not files:
            raise AudioError(
                f"{root / name}: every recording in it is a copy of one in another class"
            )
    return groups


UNEVEN_STATES = 0.25
"""A running state with less than this share of the audio of the state with the most is warned
of: in a review, one 12-s state beside ten of another put 48 % of its new windows above the
threshold (9 % with as much of each)."""


def state_folders(
    root: str | Path,
    samplerate: int | None = None,
    window_seconds: float = FeatureParams().window_seconds,
    channel: int = 0,
) -> dict[str, list[Path]]:
    """State name -> its audio files, from the subfolders of `root` (one state is allowed),
    checked before anything is trained: a name the bundle can carry, `off` in any case, no
    empty folder left out silently, byte-identical copies used once, every file usable (with
    `channel`), and the machine running for at least edge.advice.MIN_AUDIO_SECONDS outside
    `off`."""
    root = Path(root)
    if not root.is_dir():
        raise AudioError(f"{root}: --normal-states needs a folder with one subfolder per state")
    groups = _state_groups(root)
    # every unusable file of every state named at once; a recording shorter than one window
    # is left out, as `--normal` leaves it (a 50-ms one gave a state no level: NaN)
    every = [f for files in groups.values() for f in files]
    checked = check_files(every, max(channel, 0), samplerate, mono_any=True)
    length = {f: n / rate for f, (n, rate) in zip(every, checked, strict=True)}
    warn_short([str(f) for f in every if length[f] < window_seconds], window_seconds)
    groups = _without_short_or_copies(root, groups, length, window_seconds)
    seconds = {k: sum(length[f] for f in v) for k, v in groups.items()}
    running = {k: v for k, v in seconds.items() if k != OFF}
    if not running:
        raise AudioError(
            f"{root}: only the `{OFF}` state: record the machine running too, in a folder of "
            "its own"
        )
    require_audio(sum(running.values()), "train")
    groups = dict(sorted(groups.items()))  # the order of the names, whatever their folders' case
    _warn_uneven_states(running)
    return groups


def _state_groups(root: Path) -> dict[str, list[Path]]:
    """State name -> its audio files, one per subfolder of `root` holding audio."""
    groups: dict[str, list[Path]] = {}
    loose = [f for f in find_audio([root], quiet=True) if f.parent == root]
    if loose:  # an earlier `record --out` into the root, say: no state of its own
        log.warning(
            "%s: %d audio file(s) directly in it are not in a state's folder and are not used "
            "(%s); move them into one",
            root,
            len(loose),
            loose[0].name,
        )
    folders = (d for d in root.iterdir() if d.is_dir() and not skipped_folder(d.name))
    for folder in sorted(folders):
        name = OFF if folder.name.lower() == OFF else folder.name
        files = find_audio([folder])
        if not files:  # notes, an empty folder: no state, whatever its name
            log.warning("%s holds no audio: it is not a state", folder)
            continue
        if not re.fullmatch(SAFE_LABEL, name):
            raise AudioError(
                f"{folder}: a state folder's name is the state's name in messages: {LABEL_RULE}"
            )
        if name in groups:
            raise AudioError(f"{folder}: a second folder for the state {name!r}")
        groups[name] = files
    if not groups:
        raise AudioError(f"{root}: no subfolder with audio (one subfolder per state)")
    return groups


def _without_short_or_copies(
    root: Path, groups: dict[str, list[Path]], length: dict[Path, float], window_seconds: float
) -> dict[str, list[Path]]:
    """`groups` without recordings shorter than one window or copying another; none emptied."""
    for name, files in groups.items():
        groups[name] = [f for f in files if length[f] >= window_seconds]
        if not groups[name]:
            raise AudioError(
                f"{root}: every recording of the state {name!r} is shorter than one "
                f"{window_seconds:g}-s window"
            )
    # across states too: a copy in a second state's folder was fitted while the same recording
    # was held out in the first, and the threshold was set on audio the model had seen
    kept = set(without_copies([f for files in groups.values() for f in files]))
    groups = {name: [f for f in files if f in kept] for name, files in groups.items()}
    for name, files in groups.items():
        if not files:
            raise AudioError(f"{root}: every recording of the state {name!r} is a copy of one in "
                             "another state")  # fmt: skip
    return groups


def _warn_uneven_states(running: dict[str, float]) -> None:
    """Warn about each running state with too little audio, alone or against the others."""
    most = max(running.values())
    for name, value in running.items():
        if value < MIN_AUDIO_SECONDS:
            log.warning(
                "state %s: only %.1f s of audio; record at least %g s of each state, or it is "
                "barely held out for the threshold",
                name,
                value,
                MIN_AUDIO_SECONDS,
            )
        elif value < UNEVEN_STATES * most:
            log.warning(
                "state %s: %.0f s of audio against %.0f s of the state with the most: the "
                "normal model and its threshold come from all running states together, so a "
                "state with little audio lies at their edge and may raise false alarms while "
                "the machine runs in it; record about as much of each state",
                name, value, most,
            )  # fmt: skip
