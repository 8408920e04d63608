"""Model bundles: a folder with the model files, the arrays and a short manifest that makes it
self-describing.

    fan.bundle/
      manifest.json        feature parameters, quantisation, threshold, provenance, checksums
      arrays.npz           normalisation and statistics (numbers travel as arrays)
      model_int8.tflite    the model the edge runs (kinds with a network)
      model_float.tflite   the float reference (optional; for evaluation)

Loading trusts nothing: the manifest is read only if it is a regular file of bounded size
inside the folder; every listed file is a plain name with a matching SHA-256; every number is
finite and in range; arrays load without pickle and have the shapes the detector kind needs.
Each failure is one `BundleError` line. Format 1 bundles (arrays inline as JSON lists) still
load; writing always writes format 2.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from edge.errors import BundleError
from edge.events import DEFAULT_K, DEFAULT_N
from edge.features import FeatureParams
from edge.private import atomic_write, file_on_the_way, pid_running, sync_file, sync_folder
from edge.runtime import TfliteModel
from edge.threshold import MAX_FALSE_ALARMS_PER_DAY

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_INT8 = "model_int8.tflite"
MODEL_FLOAT = "model_float.tflite"
ARRAYS = "arrays.npz"
FORMAT = "soundsentry-bundle"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""A manifest larger than this is refused before it is read (format 1 ones reach ~140 KB)."""
MAX_FILE_BYTES = 64 * 1024 * 1024
"""Largest model or array file a bundle may list."""
MAX_ARRAY_ELEMENTS = 1 << 22
MAX_TOTAL_ELEMENTS = 1 << 22
"""Elements of all a bundle's arrays together (the largest kinds hold a few hundred thousand):
each is held as float64, and a bundle of 15 int8 arrays at the per-array bound took 600 MB,
past the unit's MemoryMax, in a review. Checked from the arrays' headers before any is read."""

SAFE_ID = r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$"
"""Model ids go into logs, topics and file names: no spaces, slashes or control characters."""
SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._:+-]+")
SAFE_LABEL = r"^[A-Za-z0-9][A-Za-z0-9 ._:+-]{0,63}$"
ALL_CHANNELS = -2
"""`training.channel` of a model trained on every channel as a view."""

# Format 1 kept these sections inline as JSON lists; format 2 keeps them in arrays.npz under
# "<section>.<key>" names.
ARRAY_SECTIONS = {
    "normalization": ("mean", "std"),
    "normal_band_error": ("mean", "std"),
    "statistics": ("feature_mean", "feature_std", "center", "precision"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TensorSpec(_Strict):
    """Shape, dtype and (for int8) quantisation of a model tensor."""

    shape: list[int] = Field(max_length=8)
    dtype: str = Field(max_length=16)
    scale: float | None = Field(None, gt=0)
    zero_point: int | None = None


class ThresholdInfo(_Strict):
    """The decision threshold on window scores and how it was set."""

    # bounded as [detector] threshold is: 1e30 switched detection off without a word, and from
    # 4.5e307 the Home Assistant number's bounds overflowed at every start
    value: float = Field(gt=0, le=1e12)
    rule: str = Field(max_length=100)
    params: dict[str, Any] = Field(default_factory=dict)


class _EventLogicParams(BaseModel):
    """The keys of `threshold.params` the event logic reads (the others describe the fit): a
    K of 0 or "three" loaded, then stopped every command with a traceback."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    k: int = Field(DEFAULT_K, ge=1, le=100)
    n: int = Field(DEFAULT_N, ge=1, le=100)
    m: int = Field(1, ge=1, le=1000)
    # as the CLI and [learning] cap it: 1e300 loaded, and calibrate and refits used it
    false_alarms_per_day: float = Field(1.0, gt=0, le=MAX_FALSE_ALARMS_PER_DAY)


class _CalibrationParams(BaseModel):
    """The key of `calibration` a command reads (the others are its provenance)."""

    model_config = ConfigDict(extra="allow")
    channel: int = Field(0, ge=ALL_CHANNELS, le=63)


class ScoreStats(_Strict):
    """Distribution of window scores on held-out normal audio."""

    source: str = Field(max_length=200)
    n_windows: int = Field(ge=0)
    mean: float
    std: float = Field(ge=0)
    p50: float
    p90: float
    p99: float
    max: float


class FileRecord(_Strict):
    """A training or calibration file, by name, size and content hash (never a full path)."""

    name: str = Field(max_length=255)
    bytes: int | None = Field(None, ge=0)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


ROUNDING_S = 0.0025
"""What three figures each rounded to 1 ms may be off by together."""


class TrainingInfo(_Strict):
    """What the model was trained on and how."""

    files: list[FileRecord]
    """Every file the shipped model was fitted on (the numpy kinds: all, the held-out ones too)."""
    seconds: float = Field(ge=0)
    holdout_files: list[FileRecord]
    """The files held out for the threshold (scored by a provisional fit without them)."""
    holdout_seconds: float = Field(ge=0)
    fitted_seconds: float | None = Field(None, ge=0)
    """Seconds the shipped model was fitted on; None (networks, older bundles): all but the
    held-out seconds."""
    running_seconds: float | None = Field(None, ge=0)
    """Of `seconds`, those whose windows were taken as the machine running (not silence, a
    dropout, the machine off or stopping): what the model was fitted on. None: not counted
    (networks, older bundles)."""
    channel: int = Field(ge=ALL_CHANNELS, le=63)
    epochs: int = Field(ge=0)
    seed: int
    augment: list[str] | None = Field(None, max_length=16)
    """`train --augment`'s options, the network was trained with; None: without (or a bundle
    from before it was recorded, when a rerun could not tell how the model was made)."""
    augment_factor: int | None = Field(None, ge=1)

    def refit_on_all(self, unknown: bool = False) -> bool:
        """Whether the shipped model was fitted on the held-out audio too (more seconds than
        the rest); `unknown`: the answer for a bundle from before `fitted_seconds`."""
        if self.fitted_seconds is None:
            return unknown
        # each figure is rounded to 1 ms on its own: a fit part 1 ms over the difference is
        # rounding, not a refit (an embedding bundle said "refitted" for 28 % of lengths)
        unfitted = self.seconds - min(self.holdout_seconds, self.seconds)
        return self.fitted_seconds > unfitted + ROUNDING_S

    architecture: str = Field(max_length=200)
    parameters: int = Field(ge=0)


class MachineInfo(_Strict):
    """How loud the machine is when it runs (window RMS, dBFS), and the states it was
    trained on; the edge calls a window far quieter than this `off`."""

    running_level_dbfs: dict[str, float] = Field(max_length=8)
    off_below_dbfs: float | None = Field(None, ge=-200, le=0)
    states: list[Annotated[str, StringConstraints(pattern=SAFE_LABEL)]] | None = Field(
        None, max_length=64
    )


class StatisticsInfo(_Strict):
    """Which per-window feature a statistics detector models (its numbers are arrays)."""

    feature: str = Field(max_length=100)


class EnsembleMember(_Strict):
    """One member of an `ensemble` bundle: its kind, where its arrays are, and where its
    held-out normal scores sat (median and spread of their logs: the common scale)."""

    kind: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    score: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    prefix: str = Field(pattern=r"^m[0-9]$")
    center: float
    spread: float = Field(gt=0)
    statistics: StatisticsInfo | None = None


class EnsembleInfo(_Strict):
    """The members of an `ensemble` bundle, combined by the mean of their z scores."""

    combine: Literal["mean-z"] = "mean-z"
    members: list[EnsembleMember] = Field(min_length=1, max_length=8)


class Manifest(_Strict):
    """The bundle's manifest.json (format 2)."""

    format: str = Field(pattern=f"^{FORMAT}$")
    format_version: int
    model_id: str = Field(pattern=SAFE_ID)
    kind: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    score: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    labels: list[Annotated[str, StringConstraints(pattern=SAFE_LABEL)]] | None = Field(
        None, max_length=256
    )
    """Class names, in output order (classifier only)."""
    validation: dict[str, Any] | None = None
    """Held-out figures measured at training time (classifier: accuracy, F1, confusion)."""
    features: dict[str, Any]
    input: TensorSpec | None = None
    output: TensorSpec | None = None
    threshold: ThresholdInfo
    normal_scores: ScoreStats
    training: TrainingInfo
    statistics: StatisticsInfo | None = None
    machine: MachineInfo | None = None
    """Optional (bundles from before it have none: then every window counts as running)."""
    ensemble: EnsembleInfo | None = None
    """Kind `ensemble` only: its members."""
    calibration: dict[str, Any] | None = None
    """Set by `soundsentry calibrate`: the on-site audio the statistics were refitted on."""
    arrays: dict[str, list[int]] = Field(default_factory=dict)
    """Name -> shape of each array in arrays.npz."""
    versions: dict[str, str]
    created_at: str = Field(max_length=40)
    files: dict[str, Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]]
    checksum: str


def fitted_channel(manifest: Manifest) -> int | None:
    """The channel the bundle's statistics come from: the calibration's when it records one,
    else the training's; None when every channel was a training view (any one fits)."""
    channel = (manifest.calibration or {}).get("channel", manifest.training.channel)
    return None if channel == ALL_CHANNELS else int(channel)


def channel_for(manifest: Manifest, requested: int | None, command: str) -> int:
    """The channel `command` reads: `requested`, or by default the one the bundle was fitted
    on (a dead channel 0 would otherwise be scored against a model of channel 1); a warning
    when the user asks for another."""
    fitted = fitted_channel(manifest)
    if requested is None:
        return 0 if fitted is None else fitted
    if fitted is not None and requested != fitted and command == "calibrate":
        log.info(  # what calibrate is for: the model's statistics are fitted on it now
            "calibrate: --channel %d: the model, fitted on channel %d, is refitted on it",
            requested,
            fitted,
        )
    elif fitted is not None and requested != fitted:
        log.warning(
            "%s: --channel %d, but the model was fitted on channel %d (%s); scores of "
            "another channel are not comparable",
            command,
            requested,
            fitted,
            "the average" if fitted == -1 else "leave --channel out to use it",
        )
    return requested


@dataclass
class Bundle:
    """A validated bundle, ready to score with."""

    path: Path
    manifest: Manifest
    features: FeatureParams
    model: TfliteModel | None
    """None for detectors without a network."""
    variant: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    source_format: int = FORMAT_VERSION

    @property
    def model_id(self) -> str:
        """Stable identifier of the trained model."""
        return self.manifest.model_id

    @property
    def threshold(self) -> float:
        """Decision threshold on window scores."""
        return self.manifest.threshold.value

    def array(self, name: str) -> np.ndarray:
        """A named array (e.g. 'normalization.mean'); BundleError if the bundle lacks it."""
        try:
            return self.arrays[name]
        except KeyError:
            raise BundleError(f"{self.path}: the bundle has no array {name}") from None

    def file_bytes(self, name: str) -> bytes:
        """A listed file's content, checked against its hash."""
        return _read_listed(self.path, name, self.manifest.files)

    def fitted_hashes(self) -> set[str]:
        """The SHA-256 of every training file the shipped model was fitted on: the held-out
        ones too when it was refitted on all the audio (as its manifest says, or, for a bundle
        from before it said, when it has no network: the numpy kinds always were). Audio in it
        scores as normal: `evaluate` warns of it, `calibrate` of site audio that is."""
        t = self.manifest.training
        records = [*t.files, *(t.holdout_files if t.refit_on_all(self.model is None) else [])]
        return {f.sha256 for f in records if f.sha256}


def id_stem(path: str | Path) -> str:
    """The first part of a model id, from the bundle folder's name: what SAFE_ID does not allow
    (spaces, accents, ...) becomes '-', so `--out "my pump.bundle"` gives `my-pump`."""
    stem = _UNSAFE_ID_CHARS.sub("-", Path(path).name.removesuffix(".bundle"))
    return stem.strip("-._:+")[:100] or "model"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read a megabyte at a time (a two-hour recording is never held
    in memory whole for its hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a manifest without its checksum field."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


# --- writing ---------------------------------------------------------------------------------


def write_bundle(
    path: str | Path,
    manifest: dict[str, Any],
    files: dict[str, bytes],
    arrays: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a format-2 bundle into folder `path` (created): the one builder of manifests.

    Array sections given inline as lists (`normalization`, `normal_band_error`,
    `statistics`) move to arrays.npz; training and calibration file paths become records of
    name, size and hash. The manifest is written last, replacing any earlier one atomically.
    """
    path = Path(path)
    body = dict(manifest)
    all_arrays = {**_lift_arrays(body), **(arrays or {})}
    body["format"], body["format_version"] = FORMAT, FORMAT_VERSION
    body["training"] = _training_records(body.get("training", {}))
    if body.get("calibration"):
        cal = dict(body["calibration"])
        cal["files"] = [_file_record(f) for f in cal.get("files", [])]
        body["calibration"] = cal
    blobs = {n: d for n, d in files.items() if n != ARRAYS}
    body["arrays"] = {}
    if all_arrays:
        body["arrays"] = _put_arrays(path, all_arrays, blobs)
    body["files"] = {n: sha256_bytes(d) for n, d in sorted(blobs.items())}
    body.pop("checksum", None)
    body["checksum"] = manifest_checksum(body)
    _check_writable_manifest(path, body)
    earlier = check_bundle_target(path)
    copied = _copy_if_kept(path, earlier)
    blobs[MANIFEST] = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
    _swap_in_or_undo(path, blobs, earlier, copied)
    if copied is not None:
        _keep_previous(path, copied)
    return path


def _put_arrays(
    path: Path, all_arrays: dict[str, np.ndarray], blobs: dict[str, bytes]
) -> dict[str, list[int]]:
    """Put the arrays into `blobs` as arrays.npz; their shapes, for the manifest."""
    clean = {k: np.ascontiguousarray(v, np.float64) for k, v in sorted(all_arrays.items())}
    for name, a in clean.items():  # as load_bundle checks: no bundle it would refuse
        if not np.all(np.isfinite(a)):
            raise BundleError(f"{path}: refusing to write array {name}: NaN or infinite")
    blobs[ARRAYS] = _npz_bytes(clean)
    return {k: list(v.shape) for k, v in clean.items()}


def _check_writable_manifest(path: Path, body: dict[str, Any]) -> None:
    """Refuse (BundleError) a manifest load_bundle would refuse."""
    try:
        # what is validated is what is written, and read back as load_bundle reads it
        Manifest.model_validate(json.loads(json.dumps(body)), strict=True)
    except ValidationError as exc:
        raise BundleError(f"{path}: refusing to write an invalid manifest: {_first(exc)}") from None


def _copy_if_kept(path: Path, earlier: set[str]) -> Path | None:
    """The earlier bundle's copy, when `keep_previous_on_write` asked for one and there is one."""
    copied = None
    if Path(os.path.abspath(path)) in _KEEP_PREVIOUS:
        _KEEP_PREVIOUS.discard(Path(os.path.abspath(path)))
        if (path / MANIFEST).is_file():
            copied = _copy_previous(path, earlier)
    return copied


def _swap_in_or_undo(
    path: Path, blobs: dict[str, bytes], earlier: set[str], copied: Path | None
) -> None:
    """Swap the bundle in; on failure remove the copy of the earlier one and name the bundle."""
    try:
        _swap_in(path.resolve() if path.is_symlink() else path, blobs, earlier)
    except BaseException as exc:
        if copied is not None:  # the bundle it copied is still in place, and so is `.prev`
            shutil.rmtree(copied, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk: "No space left on device" named no bundle
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def _swap_in(path: Path, blobs: dict[str, bytes], earlier: set[str]) -> None:
    """Write the bundle's files into a hidden sibling folder `.<name>.tmp-<pid>` and swap it with
    `path` in one atomic step (Linux's RENAME_EXCHANGE; where the file system cannot, two renames,
    undone if the second fails, and a power cut between them is repaired at the next write): an
    interrupt, a full disk or a power cut leaves the earlier bundle whole, never its manifest
    beside the new arrays. Files of the user's in the earlier folder (not the bundle's) move into
    the new one. Where there is no earlier bundle to protect (a new or empty folder), where
    `path` is a mount point or the working folder, and where no sibling can be made (a parent
    the user may not write), the files are replaced one by one inside `path`, the manifest
    last."""
    path = Path(os.path.abspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_swap(path)
    if path.exists() and (
        not (path / MANIFEST).exists()  # a new or empty folder: no earlier bundle to keep whole
        or os.path.ismount(path)
        or path == Path.cwd()  # the shell's own folder stays the same folder
    ):
        _write_in_place(path, blobs, earlier)
        return
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
    except OSError:  # a parent folder this user may not write
        _write_in_place(path, blobs, earlier)
        return
    try:
        for name, data in blobs.items():
            _atomic_write(staging / name, data)
        _check_loads(staging, path)
        if not path.exists():
            os.rename(staging, path)
            sync_folder(path.parent)  # the new name survives a power cut
            return
        kept = os.stat(path)
        os.chmod(staging, stat.S_IMODE(kept.st_mode))
        if os.geteuid() == 0:  # root replacing the service user's bundle: it stays theirs
            os.chown(staging, kept.st_uid, kept.st_gid)
        if not _exchange(staging, path):
            _rename_twice(staging, path)
        for entry in staging.iterdir():  # staging now holds the earlier bundle
            if entry.name not in earlier and entry.name not in blobs:
                os.rename(entry, path / entry.name)
        sync_folder(path)  # the user's files moved in
        sync_folder(path.parent)  # and the swap survive a power cut
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_in_place(path: Path, blobs: dict[str, bytes], earlier: set[str]) -> None:
    """Each file replaced atomically inside `path`, the manifest last (it names the others),
    once a copy in a temporary folder has loaded."""
    with tempfile.TemporaryDirectory(prefix="soundsentry-bundle-") as tmp:
        for name, data in blobs.items():
            (Path(tmp) / name).write_bytes(data)
        _check_loads(Path(tmp), path)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in blobs.items():
        if name != MANIFEST:
            _atomic_write(path / name, data)
    _atomic_write(path / MANIFEST, blobs[MANIFEST])
    for name in earlier - set(blobs):  # an earlier bundle's model that this one does not have
        (path / name).unlink(missing_ok=True)


def _check_loads(folder: Path, path: Path) -> None:
    """BundleError unless the bundle written in `folder` loads as the edge loads it (every
    check and the noise probe of load_bundle): a trainer or a refit whose bundle would not load
    (the float32 spread floor of a knn fit, once) must not replace one that does."""
    try:
        load_bundle(folder)
    except BundleError as exc:
        reason = str(exc).replace(f"{folder}/", "").replace(f"{folder}: ", "")
        raise BundleError(f"{path}: not written, the new bundle would not load: {reason}") from None


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 with RENAME_EXCHANGE); False where the C library or
    the file system cannot (vfat, older kernels)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _rename_twice(staging: Path, path: Path) -> None:
    """`path` aside, `staging` in its place, the earlier bundle back in `staging`'s; the first
    rename undone if the second fails."""
    retired = path.with_name(f".{path.name}.old-{os.getpid()}")  # _repair_swap's name for it
    os.rename(path, retired)
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(retired, path)
        raise
    os.rename(retired, staging)


def _repair_swap(path: Path) -> None:
    """What a write of this bundle that was cut short (a power cut, kill -9) left beside it: a
    staging folder `.<name>.tmp-<pid>` is removed; between _rename_twice's renames, the earlier
    bundle was left as `.<name>.old-<pid>` with nothing at `path`, and is put back."""
    for left in sorted(path.parent.glob(f".{glob.escape(path.name)}.*-*")):
        kind, _, pid = left.name.removeprefix(f".{path.name}.").partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or pid_running(int(pid)):
            continue
        if kind == "old" and not path.exists():
            os.rename(left, path)
            log.warning("%s: put back the bundle a cut-short write had left aside", path)
        else:
            shutil.rmtree(left, ignore_errors=True)


def _put_back(path: Path) -> bool:
    """A bundle that is not at `path` because a write cut short between _rename_twice's two
    renames (a file system without RENAME_EXCHANGE: a FAT stick) left it aside as
    `.<name>.old-<pid>`: put back, True. Done at the next write only, the service meanwhile
    refused to start, "no such model bundle", with the bundle beside it (a power-loss review).
    Through a symlink, beside its target, where the write swapped it. A folder the loader may
    not write, or one a write still running may be swapping, gets a BundleError naming it."""
    link = Path(path)
    if link.name == MANIFEST:  # the bundle named by its manifest, as load_bundle takes it
        link = link.parent
    where = Path(os.path.realpath(link)) if link.is_symlink() else Path(os.path.abspath(link))
    for left in sorted(where.parent.glob(f".{glob.escape(where.name)}.old-*")):
        pid = left.name.rpartition("-")[2]
        if not pid.isdigit() or not (left / MANIFEST).is_file():
            continue
        if _writer_running(int(pid)):
            raise BundleError(
                f"{path}: not there: a write by process {pid}, still running, has it aside as "
                f"{left}; if that write is over, rename it back to {where.name}"
            )
        try:
            os.rename(left, where)
        except OSError as exc:
            if where.is_dir() and not left.exists():  # another loader put it back meanwhile
                return True
            raise BundleError(
                f"{path}: not there: a write cut short left it as {left} ({exc.strerror}); "
                f"rename that back to {where.name}"
            ) from None
        sync_folder(where.parent)
        log.warning("%s: put back the bundle a cut-short write had left aside", path)
        return True
    return False


def _writer_running(pid: int) -> bool:
    """Process `pid` runs and may be a write of ours (a Python program). After a power cut the
    pid in a name is of the boot before, and any process may have it now: one that is no
    Python program is no writer (a review: a live `sleep` kept the service down)."""
    if not pid_running(pid):
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # another user's, where /proc hides it: it may be one
        return True
    return b"python" in command or b"soundsentry" in command


_KEEP_PREVIOUS: set[Path] = set()
"""Bundle folders whose bundle the next write_bundle there keeps as `NAME.prev` first."""


def keep_previous_on_write(path: str | Path) -> Path:
    """Have the next write_bundle to `path` keep the bundle it replaces as `PATH.prev` (`train`
    and `calibrate --out`: a calibration on the wrong audio must not cost the one that worked).
    Made when the new bundle is written, not before: a run that fails keeps the older copy."""
    where = Path(os.path.abspath(path))
    _KEEP_PREVIOUS.add(where)
    return where.with_name(where.name + ".prev")


def _copy_previous(path: Path, names: set[str]) -> Path | None:
    """Copy the bundle at `path` (a symlink's target): its manifest and the files it lists,
    not whatever else the folder holds, to the hidden `.NAME.prev.part` beside it, owned as the
    bundle is; `_keep_previous` makes it `PATH.prev` once the new bundle is in place (a write
    that failed, on a full disk, had already replaced the copy of the model that worked). A
    copy that cannot be made is a warning and None: the write goes on (the copy is a
    convenience, not a condition of it)."""
    where = Path(os.path.abspath(path))
    source = where.resolve()
    part = where.with_name(f".{where.name}.prev.part")
    try:
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir()
        owner = source.stat()
        for name in sorted(names | {MANIFEST}):
            shutil.copy2(source / name, part / name)
        shutil.copystat(source, part)
        if os.geteuid() == 0:  # root training for the service user: the copy stays theirs
            for item in (part, *part.iterdir()):
                os.chown(item, owner.st_uid, owner.st_gid)
        for item in part.iterdir():  # on the card before the older copy is deleted for it: a
            sync_file(item)  # power cut after a calibration left `.prev` empty (a review)
        sync_folder(part)
    except OSError as exc:
        shutil.rmtree(part, ignore_errors=True)
        log.warning(  # said before the write, which may yet fail and leave it in place
            "no copy of %s could be kept as %s.prev (%s): the new bundle replaces it without one",
            where, where.name, exc.strerror or exc,
        )  # fmt: skip
        return None
    return part


def _keep_previous(path: Path, part: Path) -> None:
    """The copy `_copy_previous` made becomes `PATH.prev`, replacing an older one."""
    where = Path(os.path.abspath(path))
    prev = where.with_name(where.name + ".prev")
    old = where.with_name(f".{where.name}.prev.old")
    try:
        if prev.is_symlink() or prev.is_file():
            prev.unlink()
        elif prev.exists():
            shutil.rmtree(old, ignore_errors=True)
            prev.rename(old)
        part.rename(prev)
        sync_folder(where.parent)  # the new name survives a power cut
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(part, ignore_errors=True)
        if old.exists() and not prev.exists():
            old.rename(prev)
        log.warning("%s is replaced without a copy as %s: %s", where, prev.name, exc)


def check_bundle_target(path: str | Path) -> set[str]:
    """The files of the bundle already at `path` (none for a new folder); BundleError for a
    path that is a file, a folder that holds other things, so that a bundle never lands among
    someone's recordings, or a folder this user may not write (`train` and `calibrate` check
    before they start)."""
    path = Path(path)
    if not path.exists():
        on_the_way = file_on_the_way(path)
        if on_the_way != path and not on_the_way.is_dir():
            raise BundleError(
                f"{path}: {on_the_way} is a file, not a folder; choose another bundle path"
            )
        if on_the_way == path:  # a dangling symlink: the bundle is written where it points
            on_the_way = next(p for p in path.resolve().parents if p.exists())
        _require_writable(path, on_the_way)
        return set()
    if not path.is_dir():
        raise BundleError(f"{path}: exists and is not a folder; choose another bundle path")
    _require_writable(path, path)
    if not (path / MANIFEST).is_file():
        if any(p for p in path.iterdir() if not p.name.startswith(".")):
            raise BundleError(
                f"{path}: the folder holds other files and no model bundle; choose an empty or "
                "new folder for the bundle"
            )
        return set()
    try:
        listed = json.loads((path / MANIFEST).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return set()  # a damaged earlier bundle: overwritten, nothing of it removed
    return {n for n in listed if isinstance(n, str) and SAFE_FILE.match(n) and n != MANIFEST}


class UnwritableError(BundleError, PermissionError):
    """A bundle folder this user may not write: a BundleError for the commands' one line, and an
    OSError, as writing there would have raised, for a site version (edge.history), whose
    learning period is then kept for a later try instead of being dropped as refused."""


def _require_writable(path: Path, folder: Path) -> None:
    """UnwritableError unless this user may make files in `folder` (the bundle's own, or the
    nearest one above a new bundle): else a whole training ended in "Read-only file system",
    after a warning that the earlier bundle was "replaced without a copy", which it was not.
    access(2) also says no to root on a read-only file system."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UnwritableError(
            f"{path}: {folder} is not writable (a read-only file system, or a folder this user "
            "may not write); choose another bundle path"
        )


def _lift_arrays(body: dict[str, Any]) -> dict[str, np.ndarray]:
    """Take format-1 style inline lists out of the manifest dict, as named arrays."""
    out: dict[str, np.ndarray] = {}
    for section, keys in ARRAY_SECTIONS.items():
        value = body.get(section)
        if not isinstance(value, dict):
            if value is None:
                body.pop(section, None)
            continue
        rest = {k: v for k, v in value.items() if k not in keys}
        for k in keys:
            if k in value and value[k] is not None:
                out[f"{section}.{k}"] = np.asarray(value[k], np.float64)
        if rest:
            body[section] = rest
        else:
            body.pop(section)
    return out


def _training_records(training: dict[str, Any]) -> dict[str, Any]:
    """`files` and `holdout_files` as records; a file in both (held out, then refitted on) is
    read and hashed once. Keys left unset (None) are left out: a copied manifest (`calibrate`,
    a site version) carried `augment: null`, and the version before, which knows no such key,
    refused the bundle, so a rollback dropped the site's learning (an upgrade review); their
    default is None anyway."""
    out = {key: value for key, value in training.items() if value is not None}
    records: dict[str, dict[str, Any]] = {}
    for key in ("files", "holdout_files"):
        out[key] = []
        for item in training.get(key, []):
            if isinstance(item, dict) or str(item) not in records:
                records[str(item)] = _file_record(item)
            out[key].append(records[str(item)])
    return out


def _file_record(item: Any) -> dict[str, Any]:
    """A record of a file: name, and size and hash when the file can be read here."""
    if isinstance(item, dict):
        return item
    p = Path(str(item))
    # a name that is not valid UTF-8 (a FAT stick's Latin-1) is kept readable: caf\\xe9.wav
    name = os.fsencode(p.name).decode("utf-8", "backslashreplace")
    try:
        if not p.is_file():
            return {"name": name}
        return {"name": name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
    except OSError:
        return {"name": name}


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _atomic_write(target: Path, data: bytes) -> None:
    """A bundle file written atomically, readable as the umask allows (models are shared)."""
    atomic_write(target, lambda tmp: tmp.write_bytes(data), mode=0o666)


# --- reading ---------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a bundle's manifest (format 1 is converted; arrays not loaded)."""
    manifest, _arrays, _version = _read(Path(path), load_arrays=False)
    return manifest


def load_bundle(path: str | Path, variant: str = "int8", num_threads: int = 1) -> Bundle:
    """Load and fully validate a bundle; `variant` is 'int8' (the edge) or 'float'."""
    from edge.detectors.registry import plugin_for  # the registry imports bundle types

    path = Path(path)
    manifest, arrays, version = _read(path, load_arrays=True)
    folder = _folder_of(path)  # after _read, which may put a folder left aside back
    try:
        params = FeatureParams.from_dict(manifest.features)
    except (TypeError, ValueError) as exc:
        raise BundleError(
            f"{path}: feature parameters this version cannot reproduce: {exc}"
        ) from None
    try:
        plugin = plugin_for(manifest)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    model = None
    if plugin.wants_model(manifest):
        name = MODEL_INT8 if variant == "int8" else MODEL_FLOAT
        if name not in manifest.files:
            raise BundleError(f"{folder}: this bundle has no {name}")
        content = _read_listed(folder, name, manifest.files)
        model = TfliteModel(content, num_threads=num_threads, name=str(folder / name))
        expected = (1, *params.shape, 1)
        if model.input_shape != expected:
            raise BundleError(
                f"{path}: model input {model.input_shape} does not match the features {expected}"
            )
    bundle = Bundle(folder, manifest, params, model, variant, arrays, version)
    plugin.check(bundle)
    _check_scores(bundle, plugin)
    return bundle


PROBE_LEVEL = 0.01
"""RMS of the seeded white noise a loaded bundle must score as a finite number."""


@lru_cache(maxsize=8)
def _probe_window(params: FeatureParams) -> np.ndarray:
    """The log-mel features of the probe's noise, once per feature parameters (the filterbank
    took most of a load's time when made at every load)."""
    from edge.features import LogMel  # edge.features imports nothing of the bundle's

    noise = np.random.default_rng(0).standard_normal(params.window_samples) * PROBE_LEVEL
    features = LogMel(params)(noise.astype(np.float32))
    features.setflags(write=False)
    return features


def _check_scores(bundle: Bundle, plugin: Any) -> None:
    """Refuse a bundle that scores a window of quiet noise as NaN or infinity: finite arrays
    whose arithmetic overflows, or a network that outputs NaN, scored every window NaN, which
    the event logic takes as below any threshold: detection off, and doctor passed it."""
    with np.errstate(all="ignore"):  # the overflow is what is refused, in one line
        score = plugin.scorer(bundle).score(_probe_window(bundle.features).copy(), 0).score
    if not np.isfinite(score):
        raise BundleError(
            f"{bundle.path}: scores a window of quiet noise as {score}: its arrays or its network "
            "are damaged; train it again or restore a copy"
        )


def _folder_of(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _read(path: Path, load_arrays: bool) -> tuple[Manifest, dict[str, np.ndarray], int]:
    _check_is_bundle(path)
    folder = _folder_of(path)
    file = folder / MANIFEST
    raw = _raw_manifest(path, folder, file)
    version = _check_header(file, raw)
    arrays: dict[str, np.ndarray] = {}
    if version == 1:
        raw, arrays = _from_v1(file, raw)
    _check_files_listed(file, raw.get("files"))
    manifest = _validate_read(file, raw)
    _check_read_params(file, manifest)
    if version == 2 and load_arrays:
        arrays = _load_arrays(folder, manifest)
    elif version == 1:
        _check_arrays(folder, manifest, arrays)
    return manifest, arrays, version


def _check_is_bundle(path: Path) -> None:
    """Refuse (BundleError) a path that is no bundle folder (nor its manifest)."""
    try:
        exists = path.exists()
    except OSError as exc:
        raise BundleError(f"{path}: {exc.strerror or exc}") from None
    if not exists and not _put_back(path):
        raise BundleError(f"{path}: no such model bundle")
    if not path.is_dir() and path.name != MANIFEST:
        raise BundleError(f"{path}: a model bundle is a folder holding {MANIFEST}")


def _raw_manifest(path: Path, folder: Path, file: Path) -> Any:
    """The manifest's JSON as read, not yet checked."""
    try:
        text = _read_inside(folder, MANIFEST, MAX_MANIFEST_BYTES).decode()
        raw = json.loads(text)
    except FileNotFoundError:
        raise BundleError(f"{path}: not a model bundle (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{file}: corrupt manifest ({_one_line(exc)})") from None
    return raw


def _check_header(file: Path, raw: Any) -> int:
    """The manifest's format version, once its format, version and checksum are checked."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{file}: not a SoundSentry bundle manifest")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(
            f"{file}: format_version is {json.dumps(version)}; it must be a whole number "
            "such as 2, not text (the manifest was edited by hand? re-export the model)"
        )
    if version not in READABLE_VERSIONS:
        raise BundleError(
            f"{file}: bundle format {version!r}; this version reads "
            f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade soundsentry or re-export the model)"
        )
    if raw.get("checksum") != manifest_checksum(raw):
        raise BundleError(
            f"{file}: manifest checksum mismatch (the file was altered or damaged: "
            "copy the bundle again)"
        )
    return version


def _validate_read(file: Path, raw: dict[str, Any]) -> Manifest:
    """The manifest, validated strictly; BundleError naming the first field refused."""
    try:
        # strict: a hand-edited "1.5" or true is refused, not read as the number it resembles
        return Manifest.model_validate(raw, strict=True)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "extra_forbidden":  # a field this version does not know
            raise BundleError(
                f"{file}: invalid manifest field {_first(exc)}: the bundle was probably "
                "written by a newer soundsentry; upgrade this one (sudo deploy/install.sh) or "
                "train it with this version"
            ) from None
        raise BundleError(f"{file}: invalid manifest field {_first(exc)}") from None


def _from_v1(file: Path, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A format-1 manifest as format 2 in memory: inline lists become arrays."""
    body = dict(raw)
    try:
        arrays = _lift_arrays(body)
    except (TypeError, ValueError) as exc:
        raise BundleError(
            f"{file}: format-1 manifest arrays are malformed: {_one_line(exc)}"
        ) from None
    try:  # a `training` that is a string, file lists that are numbers: a traceback in doctor
        return _v1_records(body, arrays)
    except (TypeError, ValueError, AttributeError) as exc:
        raise BundleError(
            f"{file}: format-1 manifest fields are malformed: {_one_line(exc)}"
        ) from None


def _v1_records(
    body: dict[str, Any], arrays: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Format-1 training and calibration file lists as format-2 records."""
    training = dict(body.get("training") or {})
    for key in ("files", "holdout_files"):
        training[key] = [{"name": Path(str(f)).name} for f in training.get(key, [])]
    body["training"] = training
    if isinstance(body.get("calibration"), dict):
        cal = dict(body["calibration"])
        cal["files"] = [{"name": Path(str(f)).name} for f in cal.get("files", [])]
        body["calibration"] = cal
    body["arrays"] = {k: list(v.shape) for k, v in arrays.items()}
    body["format_version"] = FORMAT_VERSION
    return body, arrays


def _check_read_params(file: Path, manifest: Manifest) -> None:
    """The values commands read out of the manifest's free-form parts, checked as its typed
    fields are: K, N, M and the budget of the threshold, the calibration's channel."""
    for part, model, values in (
        ("threshold.params", _EventLogicParams, manifest.threshold.params),
        ("calibration", _CalibrationParams, manifest.calibration or {}),
    ):
        try:
            model.model_validate(values, strict=True)
        except ValidationError as exc:
            raise BundleError(f"{file}: invalid manifest field {part}.{_first(exc)}") from None
    k = manifest.threshold.params.get("k", DEFAULT_K)
    n = manifest.threshold.params.get("n", DEFAULT_N)
    if k > n:
        raise BundleError(
            f"{file}: invalid manifest field threshold.params: k ({k}) must not exceed n ({n})"
        )


def _check_files_listed(file: Path, files: Any) -> None:
    if not isinstance(files, dict):
        raise BundleError(f"{file}: invalid manifest field files: not a mapping")
    for name in files:
        if not isinstance(name, str) or not SAFE_FILE.match(name) or name == MANIFEST:
            raise BundleError(f"{file}: listed file {name!r} is not a plain file name")


def _load_arrays(folder: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    if not manifest.arrays:
        return {}
    if ARRAYS not in manifest.files:
        raise BundleError(f"{folder}: the manifest lists arrays but not {ARRAYS}")
    data = _read_listed(folder, ARRAYS, manifest.files)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            if any(i.compress_type != zipfile.ZIP_STORED for i in zf.infolist()):
                raise BundleError(f"{folder / ARRAYS}: compressed arrays are not accepted")
            _check_sizes(folder, zf)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
    except BundleError:
        raise
    except MemoryError:  # a header's shape beyond what the sizes above let through
        raise BundleError(f"{folder / ARRAYS}: arrays too large to load") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise BundleError(f"{folder / ARRAYS}: unreadable arrays ({_one_line(exc)})") from None
    if set(arrays) != set(manifest.arrays):
        raise BundleError(f"{folder / ARRAYS}: arrays do not match the manifest's list")
    _check_arrays(folder, manifest, arrays)
    return arrays


def npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of the .npy array whose file `f` is at the start of, read
    from its header alone (the array's data not read)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)  # 2.0, and 3.0's ASCII headers alike


def _check_sizes(folder: Path, zf: zipfile.ZipFile) -> None:
    """Each array's size from its .npy header, before it is read: one declaring 2**44 elements
    ended `doctor` in a traceback (numpy's MemoryError), and many arrays within the per-array
    bound took the machine's memory (a review)."""
    total = 0
    for info in zf.infolist():
        with zf.open(info) as f:
            shape, _fortran, _dtype = npy_header(f)
        size = math.prod(shape)
        if any(n < 0 for n in shape):  # a negative one lowered the total (the diff review)
            raise BundleError(f"{folder / ARRAYS}: array {info.filename} has shape {shape}")
        if size > MAX_ARRAY_ELEMENTS:
            raise BundleError(
                f"{folder / ARRAYS}: array {info.filename} holds {size} elements, more than "
                f"{MAX_ARRAY_ELEMENTS}"
            )
        total += size
    if total > MAX_TOTAL_ELEMENTS:
        raise BundleError(
            f"{folder / ARRAYS}: the arrays hold {total} elements together, more than "
            f"{MAX_TOTAL_ELEMENTS}"
        )


def _check_arrays(folder: Path, manifest: Manifest, arrays: dict[str, np.ndarray]) -> None:
    """Every array: a float array of the declared shape, bounded in size, all finite."""
    for name, a in arrays.items():
        if a.dtype.kind not in "fiu":
            raise BundleError(f"{folder}: array {name} is not numeric ({a.dtype})")
        if list(a.shape) != manifest.arrays.get(name) or a.size > MAX_ARRAY_ELEMENTS:
            raise BundleError(f"{folder}: array {name} has shape {a.shape}, not as listed")
        if not np.all(np.isfinite(a)):
            raise BundleError(f"{folder}: array {name} holds NaN or infinite values")
        arrays[name] = a.astype(np.float64, copy=False)


def _read_listed(folder: Path, name: str, files: dict[str, str]) -> bytes:
    """Read a listed bundle file and check it against the manifest's hash."""
    if name not in files or not SAFE_FILE.match(name):
        raise BundleError(f"{folder}: this bundle has no {name}")
    content = _read_inside(folder, name, MAX_FILE_BYTES, missing_is_error=True)
    if sha256_bytes(content) != files[name]:
        raise BundleError(
            f"{folder / name}: checksum mismatch (the file was altered or damaged: "
            "copy the bundle again)"
        )
    return content


def _read_inside(folder: Path, name: str, limit: int, missing_is_error: bool = False) -> bytes:
    """Read `folder/name` only if it is a regular file inside `folder` of at most `limit`
    bytes: devices, FIFOs, directories, symlinks out of the folder and loops are refused
    before anything is read, so a hostile path can neither hang nor exhaust the daemon."""
    target = folder / name
    try:
        base = folder.resolve(strict=True)
        real = target.resolve(strict=True)
    except FileNotFoundError:
        if missing_is_error:
            raise BundleError(f"{target}: No such file") from None
        raise
    except (OSError, RuntimeError) as exc:
        raise BundleError(f"{target}: cannot be opened ({_one_line(exc)})") from None
    if real.parent != base:
        raise BundleError(f"{target}: leads outside the bundle folder; refused")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise BundleError(f"{target}: cannot be opened ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{target}: not a regular file; refused")
        if st.st_size > limit:
            raise BundleError(f"{target}: {st.st_size} bytes is over the {limit}-byte limit")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise BundleError(f"{target}: over the {limit}-byte limit")
    return data


def _first(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return _one_line(f"{where}: {err['msg']}")


def _one_line(exc: object) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."
