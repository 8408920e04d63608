"""Reading audio files: any rate, bit depth and channel count, resampled to the model's rate."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import soundfile as sf
import soxr

from edge.bundle import sha256_file
from edge.errors import AudioError
from edge.health import CLIP_LEVEL, FLAT_RANGE, SILENT_PEAK

_P = TypeVar("_P")
_T = TypeVar("_T")

log = logging.getLogger(__name__)

SUFFIXES_BY_FORMAT = {
    "WAV": (".wav",),
    "FLAC": (".flac",),
    "OGG": (".ogg", ".oga", ".opus"),
    "AIFF": (".aif", ".aiff"),
    "CAF": (".caf",),
    "W64": (".w64",),
    "RF64": (".rf64",),
    "MP3": (".mp3",),
}
"""Audio a folder search picks up, by the libsndfile format that reads it (MP3 since
libsndfile 1.1; m4a/AAC never)."""
AUDIO_SUFFIXES = frozenset(
    suffix
    for fmt, suffixes in SUFFIXES_BY_FORMAT.items()
    if fmt in sf.available_formats()
    for suffix in suffixes
)
SKIPPED_FOLDERS = frozenset({"$RECYCLE.BIN", "System Volume Information"})
"""Folders of the system, not of recordings (hidden ones, a name starting with '.', too)."""
DOWNMIX = -1
"""Channel selector meaning 'average all channels'."""
FLOAT_FULL_SCALE = 1.0 + 1e-6
"""Float samples beyond this are not audio at full scale (engineering units from a logger)."""
LISTED_PROBLEMS = 3
"""Unusable files named in full in one error line; the rest are counted."""


def sf_path(path: str | Path) -> bytes:
    """A path as soundfile should get it: the file system's bytes. Given a str, soundfile
    encodes it strictly, so a name that is not valid UTF-8 (Latin-1 names from a FAT USB
    stick: b"caf\\xe9.wav") fails with UnicodeEncodeError."""
    return os.fsencode(path)


def file_digest(path: Path) -> str | None:
    """The file's SHA-256, None when it cannot be read (the audio checks name it): hashed once
    per process, as the copy check, the trained-on checks of `evaluate` and `calibrate` and
    `--report`'s second variant all ask for the same files (a long recording read four times
    over)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    return _digest_of(str(path.resolve()), key)


@functools.lru_cache(maxsize=4096)
def _digest_of(path: str, key: tuple[int, ...]) -> str | None:
    """`file_digest` keyed by the file's inode, size and times as well: a file rewritten or
    replaced (even with its time kept, as `cp -p` does) is hashed anew."""
    try:
        return sha256_file(Path(path))
    except OSError:
        return None


def without_copies(files: list[Path]) -> list[Path]:
    """The files with byte-identical copies left out (the first kept, a warning for each): a
    copy would count its audio twice and could land on both sides of the held-out split, which
    makes the threshold look better backed than it is."""
    first: dict[str, Path] = {}
    kept = []
    for path in files:
        digest = file_digest(path)
        if digest is None:
            kept.append(path)  # unreadable: the audio checks name it
            continue
        if digest in first:
            log.warning("%s is a copy of %s: used once", path, first[digest])
            continue
        first[digest] = path
        kept.append(path)
    return kept


def find_audio(paths: Iterable[str | Path], quiet: bool = False) -> list[Path]:
    """Expand files and folders (searched recursively) into a list of audio files, in the order
    given, each folder's sorted (a replay plays them so); a file reached twice (named twice, or
    inside a folder also given) is listed once. `quiet`: without the warning of what a folder
    search skipped (a second search of the same paths)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(_search(path, quiet))
        elif path.is_file():
            found.append(path)
        else:
            raise AudioError(f"{path}: {_not_there(path)}")
    seen: set[Path] = set()
    unique = []
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _not_a_file(path: Path) -> str:
    """Why a path named as one recording is none."""
    return "a folder: give the recording's file" if path.is_dir() else _not_there(path)


def _not_there(path: Path) -> str:
    """Why a path named as audio is neither a file nor a folder."""
    if path.is_symlink():
        return "a link that leads nowhere (to a file that is gone, or round in a loop)"
    if path.exists():
        return "not a file or folder (a pipe or a device): copy the recording into a file"
    return "no such file or folder"


def skipped_folder(name: str) -> bool:
    """A folder no search for audio goes into: hidden (a desktop's .Trash-1000, a USB stick's
    .Trashes, .git), or the system's (Windows's start with `$`)."""
    return name.startswith((".", "$")) or name in SKIPPED_FOLDERS


def _search(folder: Path, quiet: bool = False) -> list[Path]:
    """The audio files under `folder`, sorted, following folder links (each real folder once);
    hidden names ('.', macOS '._x.wav' and '.Trashes' among them) and system folders skipped,
    and one warning line saying what was skipped and why."""
    found: list[Path] = []
    hidden: list[str] = []
    other: list[str] = []
    seen: set[tuple[int, int]] = set()
    unreadable: list[str] = []
    walk = os.walk(folder, followlinks=True, onerror=lambda e: unreadable.append(str(e.filename)))
    for root, dirs, names in walk:
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:  # a link back up: a loop
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        hidden += [d + "/" for d in dirs if skipped_folder(d)]
        dirs[:] = sorted(d for d in dirs if not skipped_folder(d))
        for name in names:
            if name.startswith("."):
                hidden.append(name)
            elif Path(name).suffix.lower() in AUDIO_SUFFIXES:
                found.append(Path(root) / name)
            else:
                other.append(name)
    if not quiet:
        _note_skipped(folder, hidden, other, unreadable)
    return sorted(found)


def _note_skipped(folder: Path, hidden: list[str], other: list[str], unreadable: list[str]) -> None:
    """One warning line naming what a folder search left out."""
    parts = []
    if unreadable:
        parts.append(f"{len(unreadable)} folder(s) it may not read ({first_few(unreadable)})")
    if hidden:
        parts.append(f"{len(hidden)} hidden or system ({first_few(hidden)})")
    if other:
        known = ", ".join(sorted(AUDIO_SUFFIXES))
        parts.append(f"{len(other)} not a format read here ({first_few(other)}; read: {known})")
    if parts:
        log.warning("%s: skipped %s", folder, "; ".join(parts))


def first_few(names: Iterable[str], count: int = LISTED_PROBLEMS) -> str:
    """The first `count` names in sorted order, and how many more."""
    names = sorted(names)
    more = len(names) - count
    return ", ".join(names[:count]) + (f" and {more} more" if more > 0 else "")


def select_channel(audio: np.ndarray, channel: int) -> np.ndarray:
    """Pick one channel of a (frames, channels) array, or downmix with channel=-1."""
    if audio.ndim == 1:
        return audio
    if channel == DOWNMIX:
        return audio.mean(axis=1, dtype=np.float32)
    if not 0 <= channel < audio.shape[1]:
        raise _no_channel(channel, audio.shape[1])
    return np.ascontiguousarray(audio[:, channel])


def mono_channel(channel: int, channels: int) -> int:
    """The channel to read of a file of `channels` for a model of `channel`: a mono file's only
    one (what `record` writes, from the channel the service listens on), whatever it was."""
    return 0 if channel > 0 and channels == 1 else channel


def _no_channel(channel: int, channels: int, path: Path | None = None) -> AudioError:
    """The error for a channel the audio does not have."""
    where = f"{path}: " if path is not None else ""
    return AudioError(f"{where}channel {channel} does not exist: {_channels(channels)}")


MAX_RATE = 768_000
"""The highest sample rate taken: recorders reach 384 or 768 kHz. Beyond it the header is
damaged; read as it says, 10 s of 2^31 Hz asked for an 80-GB buffer (in a review)."""


def check_header_rate(path: str | Path, rate: int) -> None:
    """Refuse a sample rate no recorder makes (a damaged header) before reading any audio."""
    if not 0 < rate <= MAX_RATE:
        raise AudioError(
            f"{path}: its header says {rate} Hz, which no recorder makes (at most {MAX_RATE} Hz):"
            " a damaged file?"
        )


def _channels(count: int) -> str:
    """`the audio has 8 channels (0 to 7)`, as --channel counts them."""
    if count == 1:
        return "the audio has 1 channel (0)"
    return f"the audio has {count} channels (0 to {count - 1})"


def check_rate(path: str | Path, rate: int, samplerate: int) -> None:
    """Refuse audio recorded below the model's rate: upsampling adds no sound, so the bands
    between the file's Nyquist frequency and the model's would be empty, and a model trained on
    it alarms on real audio (or the other way round); and a rate no recorder makes."""
    check_header_rate(path, rate)
    if rate < samplerate:
        raise AudioError(
            f"{path}: recorded at {rate} Hz, below the model's {samplerate} Hz: no sound above "
            f"{rate // 2} Hz, where the model listens (record at {samplerate} Hz or more)"
        )


NO_SAMPLES = (
    "the file holds no audio samples (a recording cut off at its start, by a power cut or a "
    "kill? then nothing is lost by deleting it)"
)
EMPTY = "an empty file (a recording cut off before its header? then nothing is lost by deleting it)"


def _require_present(path: Path) -> None:
    """Refuse what is no file, and an empty one (libsndfile calls it an unknown format)."""
    if not path.is_file():
        raise AudioError(f"{path}: {_not_a_file(path)}")
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            raise AudioError(f"{path}: {EMPTY}")
    try:  # libsndfile says "not a readable audio file (System error.)" for a permission
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise AudioError(f"{path}: {exc.strerror or exc}") from None


def check_readable(
    path: str | Path,
    channel: int = 0,
    samplerate: int | None = None,
    mono_any: bool = False,
    float_samples: bool = False,
) -> tuple[int, int]:
    """Check that a file is complete, non-empty audio with that channel (and, given the model's
    `samplerate`, not recorded below it), without reading it all; return (frames, sample rate).
    `mono_any`: a mono file passes whatever the channel (its one channel is read).
    `float_samples`: for audio that is streamed, not read whole: a file of float samples is read
    through once for a peak beyond full scale, which read_audio refuses too, and a compressed one
    (FLAC, Ogg, MP3) is decoded through once, since only its decoder finds it damaged (a FLAC
    cut off mid-stream "lost sync" halfway through a replay, which stopped there with a traceback
    and left the files after it unplayed: a field review). Raises AudioError with one clear
    line."""
    path = Path(path)
    _require_present(path)
    try:
        info = sf.info(sf_path(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"{path}: not a readable audio file ({_short(exc)})") from None
    except OSError as exc:
        raise AudioError(f"{path}: {exc.strerror or exc}") from None
    _check_complete(path, info.extra_info)  # first: a damaged header also says "no samples"
    if info.frames <= 0:
        raise AudioError(f"{path}: {NO_SAMPLES}")
    if channel >= info.channels and not (mono_any and info.channels == 1):
        raise AudioError(f"{path}: channel {channel} does not exist: {_channels(info.channels)}")
    if samplerate is not None:
        check_rate(path, info.samplerate, samplerate)
    floats = info.subtype in FLOAT_SUBTYPES
    if float_samples and (floats or info.format in COMPRESSED):
        _read_through(path, floats)
    return info.frames, info.samplerate


FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")
"""Sample formats that can hold values beyond full scale, NaN or infinity."""
COMPRESSED = ("FLAC", "OGG", "MP3")
"""Formats whose damage only decoding finds (a WAV's shows in its header's sizes)."""


def _read_through(path: Path, floats: bool) -> None:
    """Decode a file through once: refuse one that cannot be decoded to its end, and (`floats`)
    one whose finite samples peak beyond full scale, as read_audio does (a logger's engineering
    units scored as audio raised events at 400 times a threshold). NaN or infinite samples are
    left to the stream's health watchdog, as a microphone's would be."""
    peak = 0.0
    try:
        with sf.SoundFile(sf_path(path)) as fh:
            for block in file_blocks(fh):
                if not floats:
                    continue
                finite = block[np.isfinite(block)]
                if finite.size:
                    peak = max(peak, float(np.max(np.abs(finite))))
                if peak > FLOAT_FULL_SCALE:
                    break
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"{path}: not a readable audio file ({_short(exc)})") from None
    except OSError as exc:
        raise AudioError(f"{path}: {exc.strerror or exc}") from None
    if peak > FLOAT_FULL_SCALE:
        raise _beyond_full_scale(path, peak)


def _above_one(peak: float) -> str:
    """A peak beyond full scale in as few digits as show it beyond 1 (1.001 read "1")."""
    for digits in range(3, 8):
        text = f"{peak:.{digits}g}"
        if float(text) > 1:
            return text
    return text


def _beyond_full_scale(path: Path, peak: float) -> AudioError:
    """The one line for a float file whose samples peak beyond full scale."""
    return AudioError(
        f"{path}: float samples reach {_above_one(peak)}, beyond full scale (+-1): scale the "
        "recording into -1..1 (divide by its peak) before using it"
    )


def check_files(
    files: Iterable[str | Path],
    channel: int = 0,
    samplerate: int | None = None,
    mono_any: bool = False,
    float_samples: bool = False,
) -> list[tuple[int, int]]:
    """`check_readable` on every file; one AudioError that names every file that cannot be used,
    so that a folder with several bad recordings is mended in one go."""
    files = list(files)
    return read_each(
        files, lambda path: check_readable(path, channel, samplerate, mono_any, float_samples)
    )


def read_each(files: Sequence[_P], read: Callable[[_P], _T], shown: Iterable[_P] | None = None
              ) -> list[_T]:  # fmt: skip
    """`read` of every file, in order; one AudioError that names every file it refused (what
    only reading finds too: a float file beyond full scale, a dead channel, silence: a folder
    with two such files was mended one file per run, in a review). `shown`: `files` wrapped
    for a progress bar, iterated instead."""
    done, problems = [], []
    for path in files if shown is None else shown:
        try:
            done.append(read(path))
        except AudioError as exc:
            problems.append(str(exc))
    if len(problems) == 1:
        raise AudioError(problems[0])
    if problems:
        more = len(problems) - LISTED_PROBLEMS
        raise AudioError(
            f"{len(problems)} of {len(files)} files cannot be used: "
            + "; ".join(problems[:LISTED_PROBLEMS])
            + (f"; and {more} more" if more > 0 else "")
        )
    return done


READ_BLOCK_SECONDS = 10.0
"""A file is read this much at a time: a long multichannel recording is never held whole (an
hour of 48 kHz stereo would take 1.4 GB before one channel is picked), only the mono audio at
the model's rate that comes out."""


def read_audio(
    path: str | Path,
    samplerate: int,
    channel: int = 0,
    need_sound: bool = False,
    mono_any: bool = False,
    offset_matters: bool = False,
) -> np.ndarray:
    """Read a whole file as mono float32 at `samplerate`; raise AudioError with one clear line.
    `need_sound`: also refuse a channel that is digital silence or a flat line all through
    (edge.health's notions: a dead or muted input, a stuck DC level; fitted on, it makes the
    statistics singular, calibrated on, a threshold near zero), for the audio a model is fitted
    or calibrated on, and warn of clipping, and with `offset_matters` of a DC offset (for a
    bundle whose features carry it: recipe `logmel-v1`). Read, checked, reduced to one channel
    and resampled block by block (READ_BLOCK_SECONDS), with the result of reading it whole.
    `mono_any`: a mono file is read as its one channel, whatever `channel` (`mono_channel`)."""
    path = Path(path)
    _require_present(path)
    try:
        with sf.SoundFile(sf_path(path)) as fh:
            rate, channels = fh.samplerate, fh.channels
            channel = mono_channel(channel, channels) if mono_any else channel
            check_header_rate(path, rate)
            valid = channel == DOWNMIX or 0 <= channel < channels
            resampler = (
                soxr.ResampleStream(rate, samplerate, 1, dtype="float32", quality="HQ")
                if valid and rate > samplerate
                else None
            )
            summary = SoundSummary(fh.subtype in FLOAT_SUBTYPES)
            kept = Samples(fh.frames * samplerate // rate + samplerate if resampler else fh.frames)
            for block in file_blocks(fh):
                if not summary.check(block) or not valid:
                    continue  # refused after the whole file is seen; nothing more to keep
                mono = select_channel(block, channel)
                summary.add(mono)
                kept.add(resampler.resample_chunk(mono) if resampler else mono)
            if resampler is not None:
                kept.add(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"{path}: not a readable audio file ({_short(exc)})") from None
    except OSError as exc:
        raise AudioError(f"{path}: {exc.strerror or exc}") from None
    _check_complete(path)  # first: a damaged header also says "no samples"
    if summary.samples == 0:
        raise AudioError(f"{path}: {NO_SAMPLES}")
    if summary.bad:
        raise AudioError(f"{path}: invalid samples ({summary.bad} are NaN or infinite)")
    check_rate(path, rate, samplerate)
    if summary.beyond_full_scale:  # engineering units, not audio
        raise _beyond_full_scale(path, summary.peak)
    if not valid:
        raise _no_channel(channel, channels, path)
    if need_sound:
        summary.check_sound(path, channel, channels, offset_matters)
    return kept.samples()


EXPECTED_MAX = 1 << 26
"""The most samples `Samples` sets aside from a header's count (70 min at 16 kHz, 268 MB)."""


class Samples:
    """Mono float32 samples copied block by block into one array sized from the file's header
    (`expected` samples; grown if the file holds more): blocks kept in a list and joined at the
    end held the audio twice (an hour of 48 kHz stereo, 0.23 GB kept, peaked at 0.57 GB; 0.28 GB
    so)."""

    def __init__(self, expected: int) -> None:
        # pages never written cost no memory; a header's count past EXPECTED_MAX (a stream's
        # "unknown") is not believed: the array grows to what comes instead
        self._data = np.empty(min(max(int(expected), 1), EXPECTED_MAX), np.float32)
        self._n = 0

    def add(self, mono: np.ndarray) -> None:
        """Copy a block in (the reader's buffer, which the next read overwrites, may be it)."""
        end = self._n + len(mono)
        if end > len(self._data):  # a header that undercounts (a cut-off or streamed file)
            grown = np.empty(max(end, 2 * len(self._data)), np.float32)
            grown[: self._n] = self._data[: self._n]
            self._data = grown
        self._data[self._n : end] = mono
        self._n = end

    def samples(self) -> np.ndarray:
        """The samples added, in order."""
        return self._data[: self._n]


def stream_audio(path: str | Path, samplerate: int) -> Iterator[np.ndarray]:
    """A file's audio as mono float32 blocks at `samplerate` (channel 0; a mono file's one),
    read READ_BLOCK_SECONDS at a time, for audio too long to hold whole (an hour-long evidence
    clip is 230 MB at 16 kHz). Raises AudioError in one line, before the first block for a file
    that cannot be used (as `check_readable`), or where a damaged one fails."""
    path = Path(path)
    check_readable(path, 0, samplerate, mono_any=True, float_samples=True)
    try:
        with sf.SoundFile(sf_path(path)) as fh:
            resampler = (
                soxr.ResampleStream(fh.samplerate, samplerate, 1, dtype="float32", quality="HQ")
                if fh.samplerate > samplerate
                else None
            )
            for block in file_blocks(fh):
                mono = select_channel(block, 0)  # the buffer is read into again: copied
                yield resampler.resample_chunk(mono) if resampler else mono.copy()
            if resampler is not None:
                yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"{path}: not a readable audio file ({_short(exc)})") from None
    except OSError as exc:
        raise AudioError(f"{path}: {exc.strerror or exc}") from None


MP3_WHOLE_SAMPLES = 32 << 20
"""An MP3 of up to this many samples (128 MB as float32: six minutes of 48 kHz stereo, half an
hour of 16 kHz mono) is read in one go; a longer one block by block, so that it cannot exhaust
a Pi's memory (a review)."""


def file_blocks(fh: sf.SoundFile, seconds: float = READ_BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """The file's audio as (frames, channels) float32 blocks of `seconds` in one reused buffer
    (each is overwritten by the next); an MP3 (up to MP3_WHOLE_SAMPLES) in one read, because
    libsndfile's MP3 decoder drops or garbles audio where one read ends and the next begins
    (and `replay`, reading it a second at a time, printed the decoder's errors there, in a
    walk-through)."""
    if fh.format == "MP3" and fh.frames * fh.channels <= MP3_WHOLE_SAMPLES:
        yield fh.read(dtype="float32", always_2d=True)
        return
    buffer = np.empty((max(1, int(seconds * fh.samplerate)), fh.channels), np.float32)
    while len(block := fh.read(dtype="float32", always_2d=True, out=buffer)):
        yield block


class SoundSummary:
    """What read_audio checks of a file, gathered block by block: how many of its samples are
    NaN or infinite and its peak; of the channel read, edge.health's `is_silent` and `is_flat`
    over the whole file, its clipped share and its mean. `record` judges its chunks by it."""

    def __init__(self, floats: bool = True) -> None:
        self.floats = floats
        """Samples stored as floats, which can lie beyond full scale: a lossy decoder's output
        overshoots it by a few per cent on loud audio (an Ogg of a clipped sine peaked at 1.04,
        refused as engineering units, in a diff review), and is no such file."""
        self.samples = 0
        self.bad = 0
        self.peak = 0.0
        self.frames = 0
        self.channel_peak = 0.0
        self.low = np.inf
        self.high = -np.inf
        self.clipped = 0
        self.total = 0.0

    def check(self, block: np.ndarray) -> bool:
        """Count the block's invalid samples and its peak; False once the file is refused."""
        self.samples += block.size
        low, high = float(block.min()), float(block.max())  # no copy of the block
        if not (np.isfinite(low) and np.isfinite(high)):
            self.bad += int(np.count_nonzero(~np.isfinite(block)))
        else:
            self.peak = max(self.peak, high, -low)
        return not self.bad and not self.beyond_full_scale

    @property
    def beyond_full_scale(self) -> bool:
        """A float file whose finite samples peak beyond full scale (read_audio refuses it)."""
        return self.floats and self.peak > FLOAT_FULL_SCALE

    def add(self, mono: np.ndarray) -> None:
        """Gather the channel read."""
        if not len(mono):
            return
        self.frames += len(mono)
        self.channel_peak = max(self.channel_peak, float(np.max(np.abs(mono))))
        self.low = min(self.low, float(np.min(mono)))
        self.high = max(self.high, float(np.max(mono)))
        self.clipped += int(np.count_nonzero(np.abs(mono) >= CLIP_LEVEL))
        self.total += float(np.sum(mono, dtype=np.float64))

    def check_sound(
        self, path: Path, channel: int, channels: int, offset_matters: bool = False
    ) -> None:
        """Refuse a channel that is digital silence or a flat line; warn of its flaws (of a DC
        offset only if it `offset_matters`)."""
        what = self.refusal()
        if what is None:
            offset = self.total / self.frames if offset_matters else 0.0
            _warn_quality(path, self.clipped / self.frames, offset)
            return
        _refuse_sound(path, what, channel, channels)

    def refusal(self) -> str | None:
        """Why the channel gathered (`add`) holds nothing to learn from, or None."""
        if self.channel_peak < SILENT_PEAK:
            return "digital silence"
        if self.high - self.low < FLAT_RANGE:
            return "a flat line (a constant level)"
        if self.clipped > SATURATED_FRACTION * self.frames:
            return f"{100 * self.clipped / self.frames:.0f} % at full scale (saturated)"
        return None


def channel_name(channel: int) -> str:
    """A channel as messages name it: `channel N`, or `their average` (DOWNMIX)."""
    return "their average" if channel == DOWNMIX else f"channel {channel}"


class DeadChannelError(AudioError):
    """One channel of a multichannel recording holds nothing to learn from (`what`)."""

    def __init__(
        self, path: str | Path, what: str, channel: int, channels: int, fix: str | None = None
    ) -> None:
        """`fix`: what to do instead of the default, picking another channel with --channel."""
        fix = fix or (
            f"a dead channel? pick one that hears the machine with --channel N (of {channels})"
        )
        super().__init__(f"{path}: {channel_name(channel)} is {what}: nothing to learn from; {fix}")
        self.path, self.what, self.channel, self.channels = path, what, channel, channels


def _refuse_sound(path: str | Path, what: str, channel: int, channels: int) -> None:
    if channels > 1:
        raise DeadChannelError(path, what, channel, channels)
    raise AudioError(
        f"{path}: the audio is {what}: nothing to learn from; check the microphone and its "
        "gain, or leave the file out"
    )


CLIPPED_FRACTION = 0.01
"""Samples at full scale beyond this share (the daemon's own `clipping` fault) are warned of."""
SATURATED_FRACTION = 0.5
"""Beyond this share at full scale a recording is refused: what is left of the machine's sound
is the sign of each sample (a square wave), whatever the machine does."""
DC_OFFSET = 0.01
"""A mean beyond this (1 % of full scale) is warned of where a bundle's features carry it (recipe
`logmel-v1`: its lowest band), so that a recording with another offset looks different to the
model; `logmel-v2` takes it out of every frame."""


def _warn_quality(path: str | Path, clipped: float, offset: float) -> None:
    """Say what makes a recording a poor reference without making it useless: clipping (a
    `clipped` share of samples at full scale: a louder fault could not show) and a DC offset
    (its mean, the interface's, not the machine's; 0 where it does not matter)."""
    if clipped > CLIPPED_FRACTION:
        log.warning(
            "%s: %.0f %% of its samples are at full scale (clipped): a louder fault cannot show "
            "in it; lower the input gain and record again",
            path, 100 * clipped,
        )  # fmt: skip
    if abs(offset) > DC_OFFSET:
        log.warning(
            "%s: a DC offset of %+.3f of full scale (the input's, not the machine's): this "
            "model's features (recipe logmel-v1) carry it, so audio with another offset looks "
            "different to it; train a new model, whose features leave it out, or high-pass the "
            "files",
            path, offset,
        )  # fmt: skip


_DATA_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_STREAMING_SIZES = frozenset({0, 0xFFFFFFFF, 0x7FFFFFFF})
_DATA_SIZE = re.compile(r"^data\s*:\s*(\d+)", re.MULTILINE)
_UNKNOWN_CHUNK = re.compile(r"Unknown chunk marker \(\w+\) at position (\d+)")
_LENGTH = re.compile(r"^Length\s*:\s*(\d+)", re.MULTILINE)
UNCHUNKED_BYTES = 4096
"""Bytes after a WAV's chunks that are none (a few pad bytes are common) before it is refused."""


def _check_complete(path: Path, extra_info: str | None = None) -> None:
    """Refuse a WAV whose header announces more audio than the file holds (a cut-off copy), or
    far less: audio after its data chunk that is no chunk at all (a header written before the
    recording ended, or damaged) would be left out without a word."""
    if path.suffix.lower() != ".wav":
        return
    info = extra_info if extra_info is not None else sf.info(sf_path(path)).extra_info
    match = _DATA_CHUNK.search(info)
    if match:
        declared, actual = int(match.group(1)), int(match.group(2))
        if declared > actual and declared not in _STREAMING_SIZES:
            raise AudioError(
                f"{path}: truncated WAV (header announces {declared} bytes of audio, "
                f"the file holds {actual})"
            )
    declared_data = _DATA_SIZE.search(info)
    stray = _UNKNOWN_CHUNK.search(info)
    length = _LENGTH.search(info)
    if declared_data and stray and length:
        left = int(length.group(1)) - int(stray.group(1))
        if left >= max(UNCHUNKED_BYTES, int(declared_data.group(1)) // 10):
            raise AudioError(
                f"{path}: damaged WAV header (it announces {declared_data.group(1)} bytes of "
                f"audio, and {left} more bytes follow that are no WAV chunk); repair it, e.g. "
                "`sox --ignore-length in.wav out.wav`"
            )


def _short(exc: BaseException) -> str:
    """The first line of an exception message, without libsndfile's path prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(": ", 1)[-1] if text.startswith("Error opening") else text
