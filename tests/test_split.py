"""The one held-out split of every trainer: by recording, spread across the set, deterministic,
a time split of every file when there are too few files, no file on both sides."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge.features import FeatureParams
from train.dataset import HOLDOUT_FRACTION, holdout_split, load_split

RATE = 16000


def names(n: int, prefix: str = "rec") -> list[Path]:
    return [Path(f"/data/{prefix}-{i:03d}.wav") for i in range(n)]


def test_every_fifth_file_is_held_out_so_every_condition_gives_some() -> None:
    files = [
        Path(f"/data/{c}-{i}.wav") for c in ("dry", "humid", "loaded", "idle") for i in range(5)
    ]
    split = holdout_split(files)
    ordered = sorted(files)
    assert split.held == [ordered[i] for i in (4, 9, 14, 19)]
    assert {f.name.split("-")[0] for f in split.held} == {"dry", "humid", "loaded", "idle"}
    assert not split.in_time and len(split.held) == round(len(files) * HOLDOUT_FRACTION)


def test_split_is_deterministic_whatever_the_order() -> None:
    files = names(23)
    shuffled = files[:]
    random.Random(7).shuffle(shuffled)
    assert holdout_split(shuffled) == holdout_split(files) == holdout_split(list(files))
    assert holdout_split(files).fit == sorted(holdout_split(files).fit)


@pytest.mark.parametrize("n", range(1, 31))
def test_no_file_is_on_both_sides(n: int) -> None:
    files = names(n)
    split = holdout_split(files)
    assert not set(split.fit) & set(split.held)
    assert sorted(split.fit + split.held) == sorted(files)
    assert len(split.held) == n // 5


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_too_few_files_hold_out_the_tail_of_each(n: int) -> None:
    files = names(n)
    split = holdout_split(files)
    assert split.in_time and split.held == [] and split.fit == files
    assert split.held_names == split.fit_names == [str(f) for f in files]
    audio = np.arange(10 * RATE, dtype=np.float32)
    fit, held = split.parts(files[0], audio, min_samples=RATE)
    assert len(held) == 2 * RATE and np.array_equal(np.concatenate([fit, held]), audio)
    fit, held = split.parts(files[0], audio[: RATE + RATE // 2], min_samples=RATE)
    assert len(fit) == RATE + RATE // 2 and len(held) == 0  # too short to split: all fits


def test_whole_files_go_to_one_side() -> None:
    files = names(10)
    split = holdout_split(files)
    audio = np.ones(RATE, np.float32)
    fit, held = split.parts(files[4], audio)
    assert len(fit) == 0 and len(held) == RATE
    fit, held = split.parts(files[0], audio)
    assert len(fit) == RATE and len(held) == 0
    assert split.held_names == [str(files[4]), str(files[9])]
    assert split.fit_names == [str(f) for i, f in enumerate(files) if i not in (4, 9)]


def test_bad_fraction_is_refused() -> None:
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="holdout fraction"):
            holdout_split(names(5), fraction)


@pytest.mark.parametrize("n", [3, 6])
def test_load_split_uses_it(tmp_path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        files.append(tmp_path / f"take-{i}.wav")
        sf.write(files[-1], 0.1 * rng.standard_normal(5 * RATE), RATE)
    split = load_split([tmp_path], FeatureParams())
    if n < 5:
        assert split.holdout.files == split.train.files == [str(f) for f in files]
        assert split.holdout.seconds == pytest.approx(5 * n * HOLDOUT_FRACTION, abs=0.01)
    else:
        assert split.holdout.files == [str(files[4])]
        assert split.train.files == [str(f) for f in files if f != files[4]]
        assert split.holdout.seconds == pytest.approx(5.0)
    assert len(split.train.windows) and len(split.holdout.windows)


def test_recordings_too_short_to_hold_any_out_are_refused(tmp_path: Path) -> None:
    """Three 4-s recordings: the last fifth of each is shorter than a window, so nothing is
    held out. The threshold then came silently from the windows the model was fitted on (and
    the manifest still said "held-out"); every trainer now refuses in one line, before any
    network trains."""
    from conftest import cli

    from edge.errors import AudioError
    from train.embedding import read_own

    rng = np.random.default_rng(3)
    files = []
    for i in range(3):
        files.append(tmp_path / f"short{i}.wav")
        sf.write(files[-1], 0.05 * rng.standard_normal(4 * RATE), RATE)
    with pytest.raises(AudioError, match="too little audio could be held out"):
        load_split(files, FeatureParams())
    with pytest.raises(AudioError, match="too little audio could be held out"):
        read_own({"running": files}, FeatureParams(), 0)
    for kind in ("fluctuation", "knn"):
        out = tmp_path / f"{kind}.bundle"
        proc = cli("train", "--detector", kind, "--normal", *map(str, files), "--out", str(out),
                   check=False)  # fmt: skip
        assert proc.returncode != 0 and not out.exists(), proc.stdout
        error = proc.stderr.strip().splitlines()[-1]
        assert "too little audio could be held out" in error and "0 window(s)" in error, error
        assert "5 or more recordings" in error, error


def test_a_threshold_is_not_set_on_two_windows(tmp_path: Path) -> None:
    """Two 5-s recordings hold out the last second of each: two windows, which training took
    for a threshold (the README says three is the fewest a gamma and the 3-of-4 floor stand
    on). Refused, naming the count and the lengths that would do."""
    from edge.errors import AudioError

    rng = np.random.default_rng(4)
    files = []
    for i in range(2):
        files.append(tmp_path / f"five{i}.wav")
        sf.write(files[-1], 0.05 * rng.standard_normal(5 * RATE), RATE)
    with pytest.raises(AudioError, match=r"2 window\(s\), 3 needed.* at least 10 s each"):
        load_split(files, FeatureParams())


def test_a_long_recording_among_short_ones_is_not_held_out_whole(tmp_path: Path) -> None:
    """Four 10-s clips and a 20-min recording: the long one was held out whole and the model
    fitted on 40 s; no fault passed its threshold. Files of a like length still go whole."""
    rng = np.random.default_rng(0)
    for i, seconds in enumerate((10, 10, 10, 10, 300)):
        sf.write(tmp_path / f"rec-{i}.wav", rng.standard_normal(seconds * RATE) * 0.1, RATE)
    files = sorted(tmp_path.glob("*.wav"))
    uneven = holdout_split(files)
    assert uneven.in_time and uneven.held == [] and uneven.fit == files
    (tmp_path / "rec-4.wav").unlink()
    sf.write(tmp_path / "rec-4.wav", rng.standard_normal(10 * RATE) * 0.1, RATE)
    assert holdout_split(files).held == [files[4]]
