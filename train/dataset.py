"""Training data: audio files -> log-mel windows with the edge front end, split for validation."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edge.audio_io import find_audio, read_audio
from edge.errors import AudioError
from edge.features import FeatureParams, windows_of
from train.progress import progress

log = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.2
"""Share of the audio kept aside for the threshold: whole files when there are at least
MIN_FILES_FOR_FILE_SPLIT of them (new recordings differ more than parts of one), otherwise
the tail of every file (a time split, no overlap)."""
MIN_FILES_FOR_FILE_SPLIT = 4
TRAIN_HOP_DIVISOR = 4
"""Training windows are cut 4x denser than the edge's hop: more views of the same audio."""


@dataclass
class WindowSet:
    """Windows of log-mel features and where they came from."""

    windows: np.ndarray
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Split:
    """Training windows (dense hop) and held-out windows (the edge's hop)."""

    train: WindowSet
    holdout: WindowSet


def load_split(paths: list[str | Path], params: FeatureParams, channel: int = 0) -> Split:
    """Read normal recordings and split them into training and held-out windows."""
    files = find_audio(paths)
    if not files:
        raise AudioError("no audio files found in " + " ".join(str(p) for p in paths))
    dense = replace(params, hop_seconds=params.hop_seconds / TRAIN_HOP_DIVISOR)
    n_hold = round(len(files) * HOLDOUT_FRACTION) if len(files) >= MIN_FILES_FOR_FILE_SPLIT else 0
    held_files = set(files[len(files) - n_hold :]) if n_hold else set()
    train, hold = [], []
    train_s = hold_s = 0.0
    for path in progress(files, "features"):
        audio = read_audio(path, params.samplerate, channel)
        if path in held_files:
            cut = 0
        elif n_hold:
            cut = len(audio)
        else:
            cut = int(len(audio) * (1 - HOLDOUT_FRACTION))
            if cut < params.window_samples or len(audio) - cut < params.window_samples:
                cut = len(audio)  # too short to split: all of it trains
        train.append(windows_of(audio[:cut], dense))
        hold.append(windows_of(audio[cut:], params))
        train_s += cut / params.samplerate
        hold_s += (len(audio) - cut) / params.samplerate
    train_names = [str(f) for f in files if f not in held_files]
    hold_names = [str(f) for f in files if f in held_files] if n_hold else train_names
    split = Split(
        WindowSet(np.concatenate(train), train_names, train_s),
        WindowSet(np.concatenate(hold), hold_names, hold_s),
    )
    if len(split.train.windows) == 0:
        raise AudioError(f"not enough audio to train: need at least {params.window_seconds} s")
    log.info(
        "training on %d windows (%.0f s), holding out %d (%.0f s) from %d files",
        len(split.train.windows),
        train_s,
        len(split.holdout.windows),
        hold_s,
        len(files),
    )
    return split


def class_folders(root: str | Path) -> dict[str, list[Path]]:
    """Class name -> its audio files, from the subfolders of `root`."""
    root = Path(root)
    if not root.is_dir():
        raise AudioError(f"{root}: --classes needs a folder with one subfolder per class")
    classes = {d.name: find_audio([d]) for d in sorted(root.iterdir()) if d.is_dir()}
    classes = {k: v for k, v in classes.items() if v}
    if len(classes) < 2:
        raise AudioError(f"{root}: need at least two subfolders with audio (one per class)")
    return classes
