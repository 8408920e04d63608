"""What the commands share: exit codes, the optional extras' checks, argument types, the
checks of output paths, and loading a model bundle."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edge.errors import SoundSentryError, install_extra

EXIT_ERROR = 1

EXIT_INTERRUPTED = 130


EXTRAS = {
    "tensorflow": "train",
    "keras": "train",
    "librosa": "train",
    "scipy": "train",
    "matplotlib": "report",
}
"""Modules of the optional extras (pyproject.toml), by top-level name."""


def number_arg(text: str, kind: type[int] | type[float]) -> Any:
    """`text` as an int or float, or argparse's one-line complaint naming what was expected."""
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


MAX_CHANNEL = 63
"""The highest channel a bundle records (its manifest's bound, as [audio] channel's)."""


def channel_arg(text: str, average: bool = True) -> int:
    """A channel number from 0 to MAX_CHANNEL; with `average`, -1 (all channels averaged) too
    (64 and more were taken, and refused by the manifest once the work was done)."""
    value = number_arg(text, int)
    if not (-1 if average else 0) <= value <= MAX_CHANNEL:
        or_average = ", or -1 (the average)" if average else ""
        raise argparse.ArgumentTypeError(
            f"must be a channel number from 0 to {MAX_CHANNEL}{or_average}"
        )
    return value


def positive_float(text: str) -> float:
    value = number_arg(text, float)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def budget_arg(text: str) -> float:
    from edge.threshold import MAX_FALSE_ALARMS_PER_DAY

    value = number_arg(text, float)
    if not math.isfinite(value) or not 0 < value <= MAX_FALSE_ALARMS_PER_DAY:
        raise argparse.ArgumentTypeError(
            f"must be a number of false alarms per day above 0 and at most "
            f"{MAX_FALSE_ALARMS_PER_DAY:g} (one every 8.6 s)"
        )
    return value


def check_output(path: Path | None, flag: str, folder: bool) -> None:
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


def check_json_output(path: Path | None, flag: str = "--json") -> None:
    """Refuse, before any work, a JSON output over a file that holds something else: `evaluate
    --json` wrote over one of the recordings it evaluated (in a review)."""
    check_output(path, flag, folder=False)
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


def extra_of(module: str | None) -> str | None:
    """The optional extra that provides `module`, if it belongs to one."""
    return EXTRAS.get((module or "").partition(".")[0])


def needs(what: str, extra: str, module: str | None) -> str:
    return f"`{what}` needs the [{extra}] extra ({module} is not installed): " + install_extra(
        extra
    )


def require_present(modules: Sequence[str], extra: str, what: str) -> None:
    """Stop with one line naming the extra if one of `modules` is not installed (found, not
    imported: TensorFlow takes seconds to import)."""
    import importlib.util

    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise SoundSentryError(needs(what, extra, module))


def require(module: str, extra: str, what: str) -> None:
    """Stop with one line naming the extra if `module` cannot be imported."""
    import importlib

    try:
        with _native_chatter_dropped():
            importlib.import_module(module)
    except ImportError as exc:  # name the module that is missing (Keras under TensorFlow)
        raise SoundSentryError(needs(what, extra, exc.name or module)) from None


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


def load_model(path: Path | None) -> Any:
    from edge.bundle import load_bundle

    if path is None:
        raise SoundSentryError("no model bundle given")
    return load_bundle(path)
