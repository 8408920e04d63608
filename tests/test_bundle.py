"""Model bundles: format 2 round trip, format 1 still loads and scores identically, and a
table of crafted bundles each refused with one line while nothing hangs."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import AE_BUNDLE, DATA, DEMO_BUNDLE, NORMAL_FILES, ROOT, SOUNDSENTRY, cli

from edge.audio_io import read_audio
from edge.bundle import (
    ARRAYS,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MODEL_INT8,
    load_bundle,
    manifest_checksum,
    read_manifest,
    sha256_bytes,
)
from edge.errors import BundleError, os_error_line
from edge.features import FeatureParams, windows_of
from edge.scoring import Scorer

V1_BUNDLE = DATA / "fan-demo-v1.bundle"
"""The default detector as shipped in bundle format 1 (arrays inline in the manifest)."""


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    dst = tmp_path / "copy.bundle"
    shutil.copytree(AE_BUNDLE, dst)
    return dst


@pytest.fixture
def stats(tmp_path: Path) -> Path:
    dst = tmp_path / "stats.bundle"
    shutil.copytree(DEMO_BUNDLE, dst)
    return dst


def edit_manifest(bundle: Path, change: dict, rechecksum: bool = True) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    for dotted, value in change.items():
        node = data
        # file and array names hold dots themselves
        *parents, leaf = dotted.split(".", 1 if dotted.startswith(("files.", "arrays.")) else -1)
        for p in parents:
            node = node[p]
        node[leaf] = value
    if rechecksum:
        data["checksum"] = manifest_checksum(data)
    (bundle / MANIFEST).write_text(json.dumps(data))


def edit_array(bundle: Path, name: str, value: np.ndarray) -> None:
    """Replace one array in arrays.npz and re-hash it, so only validation can refuse it."""
    with np.load(bundle / ARRAYS, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays[name] = value
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (bundle / ARRAYS).write_bytes(buf.getvalue())
    edit_manifest(
        bundle,
        {f"files.{ARRAYS}": sha256_bytes(buf.getvalue()), f"arrays.{name}": list(value.shape)},
    )


def test_bundle_round_trip() -> None:
    b = load_bundle(AE_BUNDLE)
    m = b.manifest
    assert b.source_format == 2 and m.format_version == 2
    assert b.features == FeatureParams.from_dict(m.features) == FeatureParams(frontend="logmel-v1")
    assert b.model.input_shape == (1, 30, 64, 1)
    assert m.input.dtype == "int8" and m.input.scale and m.input.zero_point is not None
    assert m.threshold.value > 0 and m.threshold.rule
    assert m.normal_scores.n_windows > 0 and m.training.seconds > 0 and m.training.files
    assert all("/" not in f.name for f in m.training.files)
    assert {"tensorflow", "numpy", "soundsentry"} <= set(m.versions)
    assert b.array("normalization.std").shape == (64,)
    assert (AE_BUNDLE / MODEL_INT8).stat().st_size <= 256 * 1024
    assert load_bundle(AE_BUNDLE, variant="float").model.input_dtype.name == "float32"


@pytest.mark.parametrize("bundle", [AE_BUNDLE, DEMO_BUNDLE])
def test_shipped_manifests_are_short_and_hold_no_paths(bundle: Path) -> None:
    text = (bundle / MANIFEST).read_text()
    assert len(text.splitlines()) < 250  # the autoencoder's of 2026-12-04: 201
    assert "/work/" not in text and "/home/" not in text

    def longest(node: object) -> int:
        if isinstance(node, dict):
            return max((longest(v) for v in node.values()), default=0)
        if isinstance(node, list):
            return max([len(node), *(longest(v) for v in node)])
        return 0

    assert longest(json.loads(text)) <= 64  # no list longer than the mel bands


def test_format_1_bundle_loads_and_scores_identically() -> None:
    old, new = load_bundle(V1_BUNDLE), load_bundle(DEMO_BUNDLE)
    assert old.source_format == 1 and new.source_format == 2
    assert old.model_id == new.model_id and old.threshold == new.threshold
    windows = windows_of(read_audio(NORMAL_FILES[0], 16000), old.features)  # 5 s: 9 windows
    a = Scorer.from_bundle(old).score_many(windows)
    b = Scorer.from_bundle(new).score_many(windows)
    assert len(a) >= 9 and np.array_equal(a, b)
    proc = cli("replay", str(V1_BUNDLE), str(NORMAL_FILES[0]))
    assert proc.returncode == 0


def test_fluctuation_bundle_round_trip(stats: Path) -> None:
    b = load_bundle(DEMO_BUNDLE)
    assert b.model is None and b.manifest.statistics is not None
    assert b.array("statistics.precision").shape == (64, 64)
    edit_array(stats, "statistics.center", np.array([0.0, 1.0]))
    with pytest.raises(BundleError, match="inconsistent sizes"):
        load_bundle(stats)


def _symlink_out(b: Path) -> None:
    (b / MODEL_INT8).unlink()
    (b / MODEL_INT8).symlink_to("/etc/hostname")


def _loop(b: Path) -> None:
    (b / MANIFEST).unlink()
    (b / MANIFEST).symlink_to(b / MANIFEST)


def _fifo(b: Path) -> None:
    (b / MANIFEST).unlink()
    os.mkfifo(b / MANIFEST)


def _huge(b: Path) -> None:
    with open(b / MANIFEST, "ab") as fh:
        fh.truncate(MAX_MANIFEST_BYTES + 1)


def _dev_zero(b: Path) -> None:
    (b / MANIFEST).unlink()
    (b / MANIFEST).symlink_to("/dev/zero")


def _drop_feature(b: Path, key: str) -> None:
    data = json.loads((b / MANIFEST).read_text())
    del data["features"][key]
    data["checksum"] = manifest_checksum(data)
    (b / MANIFEST).write_text(json.dumps(data))


# Each crafted bundle: how it is made, and the words of its one-line refusal.
NETWORK_CASES = [
    (lambda b: (b / MANIFEST).write_text("{not json"), "corrupt manifest"),
    (lambda b: (b / MANIFEST).write_text("[" * 100000 + "]" * 100000), "corrupt manifest"),
    (lambda b: edit_manifest(b, {"threshold.value": 0.001}, False), "checksum mismatch"),
    (lambda b: (b / MODEL_INT8).write_bytes(b"\0" * 100), "checksum mismatch"),
    (lambda b: (b / MODEL_INT8).unlink(), "No such file"),
    (lambda b: edit_manifest(b, {"features.frontend": "mfcc-v9"}), "cannot reproduce"),
    (lambda b: edit_manifest(b, {"features.n_mels": 40}), "does not match"),
    (lambda b: edit_manifest(b, {"features.n_mels": 10**9}), "cannot reproduce"),
    # these loaded, then failed at the first window (a TypeError) or scored NaN (amin 0)
    (lambda b: edit_manifest(b, {"features.n_fft": 1024.0}), "whole numbers"),
    (lambda b: edit_manifest(b, {"features.samplerate": True}), "whole numbers"),
    (lambda b: edit_manifest(b, {"features.amin": 0}), "amin must be above 0"),
    (lambda b: edit_manifest(b, {"features.hop_seconds": "0.5"}), "must be numbers"),
    (lambda b: edit_manifest(b, {"format_version": 99}), "bundle format 99"),
    (lambda b: edit_manifest(b, {"format_version": "2"}), 'format_version is "2"; it must be'),
    (lambda b: edit_manifest(b, {"format_version": True}), "format_version is true; it must be"),
    (lambda b: edit_manifest(b, {"threshold.value": "high"}), "threshold.value"),
    (lambda b: edit_manifest(b, {"threshold.value": "1.5"}), "threshold.value"),
    (lambda b: edit_manifest(b, {"threshold.value": True}), "threshold.value"),
    (lambda b: edit_manifest(b, {"training.seconds": "60"}), "training.seconds"),
    (lambda b: edit_manifest(b, {"threshold.value": float("nan")}), "threshold.value"),
    (lambda b: edit_manifest(b, {"threshold.value": float("inf")}), "threshold.value"),
    (lambda b: edit_manifest(b, {"threshold.value": -1.0}), "threshold.value"),
    (lambda b: edit_manifest(b, {"threshold.value": 0.0}), "threshold.value"),
    (lambda b: edit_manifest(b, {"model_id": "fan\nFORGED log line"}), "model_id"),
    (lambda b: edit_manifest(b, {"model_id": "../../x"}), "model_id"),
    (lambda b: edit_manifest(b, {"kind": "telepathy"}), "unknown to this version"),
    (lambda b: edit_manifest(b, {"files.../../etc/passwd": "0" * 64}), "not a plain file"),
    (lambda b: edit_manifest(b, {"files./etc/passwd": "0" * 64}), "not a plain file"),
    (lambda b: edit_manifest(b, {f"files.{MODEL_INT8}": "0" * 64}), "checksum mismatch"),
    (lambda b: edit_array(b, "normalization.std", np.zeros(64)), "must be > 0"),
    (lambda b: edit_array(b, "normalization.mean", np.full(64, np.nan)), "NaN or infinite"),
    (lambda b: edit_array(b, "normalization.mean", np.full(64, np.inf)), "NaN or infinite"),
    (lambda b: edit_array(b, "normalization.mean", np.zeros(7)), "inconsistent sizes"),
    (lambda b: edit_array(b, "normalization.mean", np.array(["a"] * 64)), "not numeric"),
    (_symlink_out, "outside the bundle folder"),
    (_loop, "cannot be opened"),
    (_fifo, "not a regular file"),
    (_dev_zero, "outside the bundle folder"),
    (_huge, "over the"),
    (lambda b: (b / ARRAYS).write_bytes(b"PK garbage"), "checksum mismatch"),
    # these loaded, then stopped every command with a traceback (the service in a crash loop)
    (lambda b: edit_manifest(b, {"threshold.params.k": 0}), "threshold.params.k"),
    (lambda b: edit_manifest(b, {"threshold.params.k": "three"}), "threshold.params.k"),
    (lambda b: edit_manifest(b, {"threshold.params.n": None}), "threshold.params.n"),
    (lambda b: edit_manifest(b, {"threshold.params.m": 2.5}), "threshold.params.m"),
    (lambda b: edit_manifest(b, {"threshold.params.k": 5}), "must not exceed"),
    (lambda b: edit_manifest(b, {"threshold.params.false_alarms_per_day": "x"}), "per_day"),
    (lambda b: edit_manifest(b, {"threshold.params.false_alarms_per_day": -1}), "per_day"),
    (lambda b: edit_manifest(b, {"threshold.params.false_alarms_per_day": 1e300}), "per_day"),
    (lambda b: edit_manifest(b, {"calibration": {"channel": "left"}}), "calibration.channel"),
    (lambda b: edit_manifest(b, {"calibration": {"channel": None}}), "calibration.channel"),
    (lambda b: edit_manifest(b, {"training.channel": 99}), "training.channel"),
    # a feature left out was filled with this version's default: a bundle of 44.1 kHz features
    # run at 16 kHz, and doctor stopped with KeyError: 'samplerate'
    (lambda b: _drop_feature(b, "samplerate"), "missing feature parameters ['samplerate']"),
    (lambda b: _drop_feature(b, "n_mels"), "missing feature parameters ['n_mels']"),
]


@pytest.mark.parametrize(("damage", "message"), NETWORK_CASES)
def test_crafted_bundle_is_refused_with_one_line(copy: Path, damage, message: str) -> None:
    damage(copy)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            load_bundle(copy)
            outcome.append(None)
        except BaseException as exc:  # the assertion below names it
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert outcome, "loading the crafted bundle hung"
    assert isinstance(outcome[0], BundleError), f"{type(outcome[0]).__name__}: {outcome[0]}"
    assert message in str(outcome[0]) and "\n" not in str(outcome[0])


STATISTICS_CASES = [
    (lambda b: edit_array(b, "statistics.feature_std", np.zeros(64)), "must be > 0"),
    (lambda b: edit_array(b, "statistics.precision", np.eye(63)), "inconsistent sizes"),
    (lambda b: edit_array(b, "statistics.center", np.full(64, -np.inf)), "NaN or infinite"),
    (lambda b: edit_array(b, "statistics.center", np.full((64, 2), 1.0)), "inconsistent sizes"),
    (lambda b: edit_manifest(b, {"normal_scores.mean": float("nan")}), "normal_scores"),
    (lambda b: edit_manifest(b, {"score": "reconstruction_mse"}), "is not 'mahalanobis'"),
    (lambda b: edit_manifest(b, {"threshold.params.cusum": {"h": -1}}), "cusum"),
    (lambda b: edit_manifest(b, {"threshold.params.cusum": "x"}), "cusum"),
    # finite arrays whose arithmetic overflows: every window scored NaN, "below" the threshold,
    # and doctor passed it (in a review)
    (
        lambda b: edit_array(b, "statistics.feature_mean", np.full(64, 1e300)),
        "scores a window of quiet noise as nan",
    ),
    # above any score: detection silently off, and from 4.5e307 a traceback at every start
    (lambda b: edit_manifest(b, {"threshold.value": 1e30}), "threshold.value"),
    (lambda b: edit_manifest(b, {"kind": "spectral"}), "stats.bundle"),  # the file is named
]


@pytest.mark.parametrize(("damage", "message"), STATISTICS_CASES)
def test_crafted_statistics_are_refused(stats: Path, damage, message: str) -> None:
    damage(stats)
    with pytest.raises(BundleError, match=message):
        load_bundle(stats)


def test_refusal_on_the_command_line_is_one_line(copy: Path) -> None:
    edit_manifest(copy, {"threshold.value": float("nan")})
    proc = cli("replay", str(copy), str(NORMAL_FILES[0]), check=False)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "threshold.value" in proc.stderr


def test_tflite_that_is_not_a_model_is_refused(copy: Path) -> None:
    (copy / MODEL_INT8).write_bytes(b"garbage" * 50)
    edit_manifest(copy, {f"files.{MODEL_INT8}": sha256_bytes((copy / MODEL_INT8).read_bytes())})
    with pytest.raises(BundleError, match="not a loadable TFLite model"):
        load_bundle(copy)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).mkdir()
    with pytest.raises(BundleError, match="not a regular file"):
        read_manifest(tmp_path)


def test_a_long_recording_is_hashed_without_holding_it_in_memory(tmp_path: Path) -> None:
    """train, evaluate and the manifest hash every recording; a two-hour WAV was read whole for
    it (about 0.5 GB at 16 kHz, more at 48 kHz stereo) on a Pi with 1 GB."""
    import hashlib
    import tracemalloc

    from edge.bundle import sha256_file

    path = tmp_path / "long.wav"
    data = np.random.default_rng(0).integers(0, 255, 40 << 20, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    del data
    tracemalloc.start()
    try:
        assert sha256_file(path) == expected
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.0f} MB held to hash a 40-MB file"


def _rewrite(source: Path, target: Path) -> None:
    """Write `source`'s bundle to `target` with write_bundle, as train and calibrate do."""
    from edge.bundle import write_bundle

    manifest = json.loads((source / MANIFEST).read_text())
    with np.load(source / ARRAYS, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    files = {n: (source / n).read_bytes() for n in manifest["files"] if n != ARRAYS}
    write_bundle(target, manifest, files, arrays)


def test_an_interrupted_write_leaves_the_earlier_bundle_whole(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or a full disk) while `train --out` replaces a deployed bundle: the earlier model
    still loads as it was. Files used to be replaced one by one, so its manifest stayed beside
    the new arrays: 'checksum mismatch', the deployed model lost."""
    import edge.bundle

    before = load_bundle(copy).model_id
    real = edge.bundle._atomic_write

    def interrupted(target: Path, data: bytes) -> None:
        if target.name == MANIFEST:
            raise KeyboardInterrupt
        real(target, data)

    monkeypatch.setattr(edge.bundle, "_atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _rewrite(DEMO_BUNDLE, copy)
    assert load_bundle(copy).model_id == before
    assert sorted(p.name for p in copy.parent.iterdir()) == [copy.name]  # nothing left beside


def test_a_replaced_bundle_keeps_the_users_files_and_its_symlink(copy: Path) -> None:
    (copy / "NOTES.txt").write_text("pump 3, installed 2026-11-02\n")
    link = copy.parent / "active"
    link.symlink_to(copy.name)
    _rewrite(DEMO_BUNDLE, link)
    assert link.is_symlink() and load_bundle(link).model_id == load_bundle(DEMO_BUNDLE).model_id
    assert (copy / "NOTES.txt").read_text().startswith("pump 3")
    assert not (copy / MODEL_INT8).exists()  # the autoencoder's model went with its manifest
    assert sorted(p.name for p in copy.parent.iterdir()) == ["active", copy.name]


def test_train_says_it_replaces_a_bundle_and_keeps_it_as_prev(tmp_path: Path) -> None:
    """`train --out` onto a deployed bundle replaced it without a word, and left no way back."""
    out = tmp_path / "deployed.bundle"
    shutil.copytree(DEMO_BUNDLE, out)
    proc = cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(out))
    assert f"note: {out} holds a model bundle: it is replaced" in proc.stdout
    prev = tmp_path / "deployed.bundle.prev"  # and the one that worked is kept, once
    assert f"kept as {prev}" in proc.stdout
    assert load_bundle(prev).model_id == load_bundle(DEMO_BUNDLE).model_id
    assert load_bundle(out).model_id != load_bundle(DEMO_BUNDLE).model_id
    cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(out))
    assert load_bundle(prev).model_id == load_bundle(out).model_id  # the last one replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployed.bundle", prev.name]
    fresh = cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(tmp_path / "new"))
    assert "holds a model bundle" not in fresh.stdout
    # a format-1 bundle (a manifest alone: it lists no other file) was written over with no
    # copy and no note, though it was the only one the version before could read (a review)
    old = shutil.copytree(V1_BUNDLE, tmp_path / "v1.bundle")
    proc = cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(old))
    assert f"note: {old} holds a model bundle: it is replaced" in proc.stdout, proc.stdout
    kept = tmp_path / "v1.bundle.prev"
    assert (kept / "manifest.json").read_bytes() == (V1_BUNDLE / "manifest.json").read_bytes()


def test_the_kept_copy_is_the_bundle_alone_and_made_when_the_new_one_is_written(
    copy: Path, tmp_path: Path
) -> None:
    """The copy was made before the work: a run that failed, or a second attempt, replaced the
    `.prev` that worked with the bundle being replaced, and calibrating `X.prev --out X` read
    the model it was overwriting. It copied the user's own files too (a broken symlink among
    them ended the run)."""
    from edge.bundle import keep_previous_on_write

    (copy / "NOTES.txt").write_text("pump 3\n")
    (copy / "dangling").symlink_to(tmp_path / "nowhere")
    prev = keep_previous_on_write(copy)
    assert not prev.exists(), "nothing is copied before the new bundle is written"
    _rewrite(DEMO_BUNDLE, copy)
    assert load_bundle(prev).model_id == load_bundle(AE_BUNDLE).model_id
    assert not (prev / "NOTES.txt").exists() and not (prev / "dangling").is_symlink()
    assert load_bundle(copy).model_id == load_bundle(DEMO_BUNDLE).model_id
    _rewrite(AE_BUNDLE, copy)  # not asked to keep this time: the copy stays as it was
    assert load_bundle(prev).model_id == load_bundle(AE_BUNDLE).model_id
    keep_previous_on_write(copy)  # from the kept copy back onto the bundle: a swap
    _rewrite(prev, copy)
    assert load_bundle(copy).model_id == load_bundle(AE_BUNDLE).model_id
    assert load_bundle(prev).model_id == load_bundle(AE_BUNDLE).model_id
    assert sorted(p.name for p in tmp_path.iterdir() if "bundle" in p.name) == [
        copy.name,
        prev.name,
    ], "nothing left beside"


def test_the_kept_copy_is_on_the_card_before_the_older_one_goes(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new bundle was fsynced before its swap, the `.prev` copy never: a power cut soon
    after a calibration could leave `.prev` empty, the older copy already deleted for it (a
    power-loss review, under strace). Every file of the copy is synced before it is renamed."""
    import edge.bundle as bundle_module
    from edge.bundle import keep_previous_on_write

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(bundle_module.os, "fsync", fsync)
    prev = keep_previous_on_write(copy)
    _rewrite(DEMO_BUNDLE, copy)
    part = copy.with_name(f".{copy.name}.prev.part")
    names = sorted(p.name for p in prev.iterdir())
    assert "manifest.json" in names and "arrays.npz" in names, names
    assert all(str(part / n) in synced for n in names), (names, synced)
    assert str(part) in synced and str(copy.parent) in synced  # the folder, the new name


def test_a_write_that_fails_keeps_the_older_copy(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `.prev` copy was made before the new bundle was swapped in: a calibrate that ended in
    "No space left on device" left the bundle whole but had replaced the copy of the one before
    it, the model that worked (in a review). The copy replaces the older one only once the new
    bundle is in place."""
    import edge.bundle
    from edge.bundle import keep_previous_on_write

    prev = keep_previous_on_write(copy)
    _rewrite(DEMO_BUNDLE, copy)  # copy.bundle.prev: the autoencoder
    assert load_bundle(prev).model_id == load_bundle(AE_BUNDLE).model_id

    def full_disk(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(edge.bundle, "_swap_in", full_disk)
    keep_previous_on_write(copy)
    with pytest.raises(OSError, match="No space left") as raised:
        _rewrite(AE_BUNDLE, copy)
    # the bundle named: "No space left on device" alone was all a user saw (a review)
    assert os_error_line(raised.value) == f"No space left on device: {copy}"
    assert load_bundle(prev).model_id == load_bundle(AE_BUNDLE).model_id, "the older copy kept"
    assert load_bundle(copy).model_id == load_bundle(DEMO_BUNDLE).model_id
    assert sorted(p.name for p in copy.parent.iterdir() if "bundle" in p.name) == [
        copy.name,
        prev.name,
    ], "nothing left beside"


def test_a_copy_that_cannot_be_made_does_not_stop_the_write(
    copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edge.bundle import keep_previous_on_write

    (copy.parent / f"{copy.name}.prev").write_text("a file in the way, not a folder\n")
    (copy / MODEL_INT8).unlink()  # a damaged bundle: a file it lists is missing
    keep_previous_on_write(copy)
    _rewrite(DEMO_BUNDLE, copy)
    assert load_bundle(copy).model_id == load_bundle(DEMO_BUNDLE).model_id
    assert "no copy of " in caplog.text and "could be kept as copy.bundle.prev" in caplog.text
    assert (copy.parent / f"{copy.name}.prev").read_text().startswith("a file in the way")


def _dead_pid() -> int:
    """The PID of a process that has exited."""
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_swap_cut_short_between_its_renames_is_repaired(copy: Path) -> None:
    """Where the file system cannot swap two folders in one step, a power cut between the two
    renames leaves the earlier bundle aside as `.<name>.old-<pid>` and nothing in its place;
    the next write puts it back first (the user's files in it survive), and a dead process's
    staging folder is removed."""
    (copy / "NOTES.txt").write_text("pump 3\n")
    aside = copy.with_name(f".{copy.name}.old-{_dead_pid()}")
    copy.rename(aside)
    staged = copy.with_name(f".{copy.name}.tmp-{_dead_pid()}")
    staged.mkdir()
    _rewrite(DEMO_BUNDLE, copy)
    assert load_bundle(copy).model_id == load_bundle(DEMO_BUNDLE).model_id
    assert (copy / "NOTES.txt").read_text() == "pump 3\n"
    assert sorted(p.name for p in copy.parent.iterdir()) == [copy.name]


def test_a_bundle_a_cut_short_swap_left_aside_is_put_back_when_loaded(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was put back at the next write only: until then the service refused to start, "no
    such model bundle", every minute, with the bundle beside it (a power-loss review). A
    start (here `replay`, which loads it as `run` does) puts it back and runs; one that may not
    rename it says where it is."""
    before = load_bundle(copy).model_id
    aside = copy.with_name(f".{copy.name}.old-{_dead_pid()}")
    copy.rename(aside)
    proc = cli("replay", str(copy), str(NORMAL_FILES[0]))
    assert "put back the bundle a cut-short write had left aside" in proc.stderr, proc.stderr
    assert load_bundle(copy).model_id == before and not aside.exists()
    # after a power cut the pid in the name is of the boot before: any process may have it
    # now, and a live `sleep` kept it aside (a review); and through a symlink, whose target
    # the write swapped, the link's name was looked for (a review)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        copy.rename(copy.with_name(f".{copy.name}.old-{sleeper.pid}"))
        link = copy.with_name("current.bundle")
        link.symlink_to(copy.name)
        assert load_bundle(link).model_id == before and copy.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    copy.rename(aside)  # named by its manifest, as load_bundle takes it too (a review)
    assert load_bundle(copy / "manifest.json").model_id == before and copy.is_dir()
    copy.rename(aside)
    real_rename = os.rename

    def raced(a: object, b: object) -> None:  # another loader (doctor) put it back first
        real_rename(a, b)
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(os, "rename", raced)
    assert load_bundle(copy).model_id == before
    monkeypatch.undo()
    copy.rename(aside)

    def refused(*_: object) -> None:  # a folder the service user may not write
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refused)
    with pytest.raises(BundleError, match=f"left it as {aside} .*rename that back"):
        load_bundle(copy)


def test_the_two_renames_are_undone_when_the_second_fails(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edge.bundle

    before = load_bundle(copy).model_id
    monkeypatch.setattr(edge.bundle, "_exchange", lambda a, b: False)  # as on vfat
    real = os.rename

    def second_fails(src: object, dst: object) -> None:
        if Path(str(src)).name.startswith(f".{copy.name}.tmp-") and Path(str(dst)) == copy:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(OSError, match="No space"):
        _rewrite(DEMO_BUNDLE, copy)
    assert load_bundle(copy).model_id == before
    assert sorted(p.name for p in copy.parent.iterdir()) == [copy.name]
    monkeypatch.setattr(os, "rename", real)
    _rewrite(DEMO_BUNDLE, copy)  # and without the failure, the renames put the new one in place
    assert load_bundle(copy).model_id == load_bundle(DEMO_BUNDLE).model_id


def test_a_bundle_is_written_into_the_working_folder_and_a_parent_it_may_not_write(
    tmp_path: Path, copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out .` crashed (a path without a name); the folder the shell stands in is written in,
    not swapped away under it. Where no sibling folder can be made, the files are replaced one
    by one inside the bundle, the manifest last, as before."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    _rewrite(DEMO_BUNDLE, Path("."))
    assert load_bundle(here).model_id == load_bundle(DEMO_BUNDLE).model_id
    assert os.stat(".").st_ino == here.stat().st_ino
    real = Path.mkdir

    def no_sibling(self: Path, *args: object, **kwargs: object) -> None:
        if self.name.startswith(f".{copy.name}.tmp-"):
            raise PermissionError(13, "Permission denied", str(self))
        real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", no_sibling)
    _rewrite(DEMO_BUNDLE, copy)
    assert load_bundle(copy).model_id == load_bundle(DEMO_BUNDLE).model_id
    assert not (copy / MODEL_INT8).exists()


def test_a_bundle_with_a_field_this_version_does_not_know_says_it_may_be_newer(
    tmp_path: Path,
) -> None:
    """A bundle trained by a newer soundsentry on a laptop, deployed to a Pi not yet upgraded,
    was refused as `Extra inputs are not permitted`, which names no way out."""
    bundle = tmp_path / "newer.bundle"
    shutil.copytree(DEMO_BUNDLE, bundle)
    edit_manifest(bundle, {"site_notes": "pump room 3"})
    with pytest.raises(BundleError, match=r"site_notes.*written by a newer soundsentry"):
        load_bundle(bundle)


def test_a_rename_is_synced_into_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's data was fsynced before its rename, the folder never: after a power cut the
    card could come back with the old state.json or without a bundle just reported written.
    The real fsync runs; only which folders it was given is noted."""
    import stat

    import edge.private
    from edge.bundle import write_bundle
    from edge.private import atomic_write

    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            synced.append(st.st_ino)
        real(fd)

    monkeypatch.setattr(edge.private.os, "fsync", fsync)
    atomic_write(tmp_path / "state.json", lambda tmp: tmp.write_text("{}"))
    assert synced == [tmp_path.stat().st_ino]
    synced.clear()
    shutil.copytree(DEMO_BUNDLE, tmp_path / "b.bundle")
    bundle = load_bundle(tmp_path / "b.bundle")
    manifest = bundle.manifest.model_dump(exclude={"files", "checksum", "arrays"})
    write_bundle(tmp_path / "b.bundle", manifest, {}, bundle.arrays)  # swapped in
    assert tmp_path.stat().st_ino in synced, "the folder that holds the swapped bundle"
    assert (tmp_path / "b.bundle").stat().st_ino in synced
    assert load_bundle(tmp_path / "b.bundle").model_id == bundle.model_id


def test_a_bundle_load_bundle_would_refuse_for_its_arrays_is_never_written(
    tmp_path: Path,
) -> None:
    """A state of 50 ms gave its band levels NaN: training wrote the bundle, and only then was
    it refused ("holds NaN or infinite values"), the folder left behind (in a review)."""
    from edge.bundle import write_bundle

    bundle = load_bundle(DEMO_BUNDLE)
    manifest = bundle.manifest.model_dump(exclude={"files", "checksum", "arrays"})
    arrays = dict(bundle.arrays)
    name = sorted(arrays)[0]
    arrays[name] = np.full_like(arrays[name], np.nan)
    with pytest.raises(BundleError, match=f"refusing to write array {name}: NaN or infinite"):
        write_bundle(tmp_path / "nan.bundle", manifest, {}, arrays)
    assert not (tmp_path / "nan.bundle").exists()


@pytest.mark.parametrize("where", ["beside", "in place"])
def test_a_bundle_that_would_not_load_never_replaces_one_that_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A knn fit whose float32 spread floor made a bundle the loader refused was written over
    a good one (in a review): the machine was left without a model that loads. The new bundle
    must load, as the edge loads it, before it replaces anything, whether it is swapped in
    beside (a sibling folder) or written file by file in place (here: the shell's own folder)."""
    from edge.bundle import write_bundle

    target = tmp_path / "b.bundle"
    shutil.copytree(DEMO_BUNDLE, target)
    before = {f.name: f.read_bytes() for f in target.iterdir()}
    bundle = load_bundle(target)
    manifest = bundle.manifest.model_dump(exclude={"files", "checksum", "arrays"})
    name, array = next((k, v) for k, v in sorted(bundle.arrays.items()) if v.ndim == 2)
    arrays = {**bundle.arrays, name: array[:-1]}  # finite, valid JSON: only a load can tell
    if where == "in place":
        monkeypatch.chdir(target)
    with pytest.raises(BundleError, match=f"^{target}: not written, the new bundle would not load"):
        write_bundle(target, manifest, {}, arrays)
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["b.bundle"]  # no staging folder left
    assert load_bundle(target).model_id == bundle.model_id
    write_bundle(target, manifest, {}, bundle.arrays)  # a bundle that loads is written
    assert load_bundle(target).model_id == bundle.model_id


def test_a_model_the_old_tflite_runtime_cannot_run_says_to_install_litert(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tflite-runtime (the fallback; it stops at 2.14) lacks the int8 LOG of the embedding
    network: its own words alone did not say what to do. Its error is scripted here, since it
    cannot be installed beside this numpy."""
    import edge.runtime as runtime

    class OldInterpreter:
        __module__ = "tflite_runtime.interpreter"

        def __init__(self, **_: object) -> None:
            raise RuntimeError("Didn't find op for builtin opcode 'LOG' version '2'.\nmore")

    monkeypatch.setattr(runtime, "_interpreter_class", lambda: OldInterpreter)
    with pytest.raises(BundleError, match=r"'LOG' version '2'.*install ai-edge-litert"):
        runtime.TfliteModel(b"model", name="model_int8.tflite")


def test_a_fit_part_a_rounding_over_the_difference_is_not_a_refit() -> None:
    """The manifest rounds each figure to 1 ms on its own: 112,010 fitted and 48,010 held-out
    samples (16 kHz) read 10.001 / 7.001 / 3.001 s, and an embedding bundle whose head never saw
    the held-out audio said it was refitted on it (in a review)."""
    from edge.bundle import TrainingInfo

    def info(seconds: float, fitted: float, held: float) -> TrainingInfo:
        return TrainingInfo(files=[], seconds=seconds, holdout_files=[], holdout_seconds=held,
                            fitted_seconds=fitted, channel=0, epochs=2, seed=0,
                            architecture="cnn", parameters=1)  # fmt: skip

    assert not info(10.001, 7.001, 3.001).refit_on_all()
    assert not info(10.0, 7.0, 3.0).refit_on_all()
    assert info(10.001, 10.001, 3.001).refit_on_all()  # the numpy kinds: all of it


def test_an_autoencoder_whose_network_does_not_reconstruct_its_input_is_refused(
    copy: Path,
) -> None:
    """An autoencoder bundle carrying another kind's network (an embedding of 8 values) loaded,
    doctor passed it, and every command stopped at the first window with `cannot reshape array
    of size 8 into shape (30,64)` (in a review)."""
    import tensorflow as tf

    inputs = tf.keras.Input((30, 64, 1), batch_size=1)
    outputs = tf.keras.layers.Dense(8)(tf.keras.layers.Flatten()(inputs))
    network = tf.keras.Model(inputs, outputs)
    content = tf.lite.TFLiteConverter.from_keras_model(network).convert()
    (copy / MODEL_INT8).write_bytes(content)
    edit_manifest(copy, {f"files.{MODEL_INT8}": sha256_bytes(content)})
    with pytest.raises(BundleError, match=r"output \(1, 8\) does not match the \(1, 30, 64, 1\)"):
        load_bundle(copy)


PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE = 1
"""From linux/prctl.h and linux/capability.h: root without this capability is held to a
folder's mode bits like any user (and access(2) says so), as on a read-only file system."""


def _drop_dac_override() -> None:
    """In the child, before exec: out of the bounding set, so root's exec does not get it."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _held_to_mode_bits(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command, for whom a folder chmod 0555 cannot be written, root included (tests
    run as root in CI, where chmod alone stops nothing)."""
    return subprocess.run(
        [*SOUNDSENTRY, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        preexec_fn=_drop_dac_override if os.geteuid() == 0 else None,
    )


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_audio_is_read(
    tmp_path: Path,
) -> None:
    """An --out that cannot be written (a read-only file system, another user's folder) was
    found once the model was trained, after a warning that the bundle there was "replaced
    without a copy", which it was not."""
    locked = tmp_path / "locked"
    deployed = locked / "deployed.bundle"
    shutil.copytree(DEMO_BUNDLE, deployed)
    deployed.chmod(0o555)
    locked.chmod(0o555)
    normal = ["--normal", *map(str, NORMAL_FILES)]
    try:
        for command in (
            ("train", *normal, "--out", str(deployed)),
            ("train", *normal, "--out", str(locked / "new" / "m.bundle")),
            ("calibrate", str(DEMO_BUNDLE), *normal, "--out", str(locked / "site.bundle")),
        ):
            proc = _held_to_mode_bits(*command)
            assert proc.returncode == 1 and proc.stdout == "", proc.stderr  # before any work
            (line,) = proc.stderr.strip().splitlines()
            assert "is not writable" in line and "choose another bundle path" in line, line
        assert load_bundle(deployed).model_id == load_bundle(DEMO_BUNDLE).model_id
    finally:
        locked.chmod(0o755)
        deployed.chmod(0o755)


@pytest.mark.parametrize(
    "change",
    [{"training": "oops"}, {"training.files": 5}, {"calibration": {"files": 5}}],
)
def test_a_format_1_manifest_of_the_wrong_shape_is_one_line(tmp_path: Path, change: dict) -> None:
    """A format-1 manifest whose `training` was a string, or whose file lists were numbers,
    ended replay and doctor in a ValueError or TypeError traceback (in a review)."""
    old = shutil.copytree(V1_BUNDLE, tmp_path / "old.bundle")
    edit_manifest(old, change)
    with pytest.raises(BundleError, match=r"old\.bundle") as caught:
        load_bundle(old)
    assert "\n" not in str(caught.value)


def test_a_network_of_two_inputs_is_refused(copy: Path) -> None:
    """A TFLite model with a second input loaded, that input was never fed, and the scores came
    out wrong (1.706 where the model gives 0.609) without a word (in a review)."""
    import tensorflow as tf

    first = tf.keras.Input((30, 64, 1), batch_size=1)
    second = tf.keras.Input((30, 64, 1), batch_size=1)
    network = tf.keras.Model([first, second], tf.keras.layers.Add()([first, second]))
    content = tf.lite.TFLiteConverter.from_keras_model(network).convert()
    (copy / MODEL_INT8).write_bytes(content)
    edit_manifest(copy, {f"files.{MODEL_INT8}": sha256_bytes(content)})
    with pytest.raises(BundleError, match="2 inputs and 1 outputs"):
        load_bundle(copy)


def test_an_unwritable_bundle_folder_is_an_os_error_too() -> None:
    """The writability check raised a BundleError, which a site version's writer
    (edge.history.write_version) does not take for a disk that failed: a learning period whose
    models folder could not be written was dropped as refused, and the model marked failed for
    good, where a disk error keeps the period for the next try (in a review)."""
    from edge.bundle import UnwritableError

    assert issubclass(UnwritableError, BundleError) and issubclass(UnwritableError, OSError)


def _forged(out: Path, extra: dict[str, bytes], shapes: dict[str, list[int]]) -> Path:
    """The demo bundle with extra .npy members (raw bytes, headers as given) listed in its
    manifest and checksums: what an untrusted bundle may hold."""
    import hashlib
    import zipfile

    from edge.bundle import manifest_checksum

    shutil.copytree(DEMO_BUNDLE, out)
    manifest = json.loads((out / "manifest.json").read_text())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, value in np.load(DEMO_BUNDLE / "arrays.npz").items():
            npy = io.BytesIO()
            np.save(npy, value)
            zf.writestr(f"{name}.npy", npy.getvalue())
        for name, raw in extra.items():
            zf.writestr(f"{name}.npy", raw)
    data = buf.getvalue()
    (out / "arrays.npz").write_bytes(data)
    manifest["arrays"] |= shapes
    manifest["files"]["arrays.npz"] = hashlib.sha256(data).hexdigest()
    manifest.pop("checksum")
    manifest["checksum"] = manifest_checksum(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_a_bundle_s_arrays_are_sized_from_their_headers_before_any_is_read(
    tmp_path: Path,
) -> None:
    """An untrusted bundle of 15 int8 arrays at the per-array bound took 600 MB as float64,
    past the unit's MemoryMax, and one whose .npy header declared 2**44 elements ended `doctor`
    in numpy's MemoryError traceback (the security review): both refused with one line."""
    from edge.bundle import MAX_ARRAY_ELEMENTS

    def npy(value: np.ndarray) -> bytes:
        out = io.BytesIO()
        np.save(out, value)
        return out.getvalue()

    many = {f"pad.a{i}": npy(np.ones(MAX_ARRAY_ELEMENTS // 2, np.int8)) for i in range(3)}
    big = _forged(tmp_path / "many.bundle", many, {k: [MAX_ARRAY_ELEMENTS // 2] for k in many})
    with pytest.raises(BundleError, match="elements together, more than"):
        load_bundle(big)
    header = io.BytesIO()
    shape = {"descr": "<f8", "fortran_order": False, "shape": (1 << 44,)}
    np.lib.format.write_array_header_1_0(header, shape)
    huge = {"pad.x": header.getvalue() + b"\0" * 64}
    forged = _forged(tmp_path / "huge.bundle", huge, {"pad.x": [1 << 44]})
    with pytest.raises(BundleError, match="holds 17592186044416 elements"):
        load_bundle(forged)
    proc = cli("doctor", "--model", str(forged), check=False)
    assert "Traceback" not in proc.stderr and "elements" in proc.stdout + proc.stderr
    negative = io.BytesIO()  # a negative size lowered the total (the diff review)
    np.lib.format.write_array_header_1_0(negative, {**shape, "shape": (-(1 << 30),)})
    bad = {**many, "pad.n": negative.getvalue()}
    sizes = {**{k: [MAX_ARRAY_ELEMENTS // 2] for k in many}, "pad.n": [-(1 << 30)]}
    with pytest.raises(BundleError, match=r"pad.n.npy has shape \(-1073741824,\)"):
        load_bundle(_forged(tmp_path / "negative.bundle", bad, sizes))


def test_a_model_that_declares_gigabytes_of_tensors_is_refused_before_allocating(
    tmp_path: Path,
) -> None:
    """An untrusted bundle's .tflite can declare tensors of any size, and `allocate_tensors`
    took the memory at once (untested, said the security review): the bytes its shapes declare
    are counted first. A broadcast to 2**28 floats (1 GB) in a model of a few hundred bytes."""
    import tensorflow as tf

    from edge.runtime import TfliteModel

    @tf.function(input_signature=[tf.TensorSpec([1], tf.float32)])
    def wide(x: tf.Tensor) -> tf.Tensor:
        return tf.reduce_sum(tf.broadcast_to(x, [1 << 28]), keepdims=True)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [wide.get_concrete_function()], wide
    )
    content = converter.convert()
    assert len(content) < 100_000
    with pytest.raises(BundleError, match=r"its tensors would take 1024 MB, more than"):
        TfliteModel(content, name="wide.tflite")

    @tf.function(input_signature=[tf.TensorSpec([1], tf.float32)])
    def looped(x: tf.Tensor) -> tf.Tensor:  # the broadcast in a loop's body, a graph of its own
        def body(i: tf.Tensor, acc: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return i + 1, acc + tf.reduce_sum(tf.broadcast_to(x, [1 << 25]), keepdims=True)

        return tf.while_loop(lambda i, a: i < 2, body, [tf.constant(0), tf.zeros([1])])[1]

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [looped.get_concrete_function()], looped
    )
    with pytest.raises(BundleError, match=r"a model of \d+ subgraphs \(control flow\)"):
        TfliteModel(converter.convert(), name="looped.tflite")  # passed the count (a review)
    small = TfliteModel((AE_BUNDLE / "model_int8.tflite").read_bytes())  # a real one loads
    assert small.input_shape
