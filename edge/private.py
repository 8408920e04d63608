"""Private by default: the data folder, evidence clips (which can hold speech) and the spool
are readable by the daemon's user only, whoever starts it and whatever its umask."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)$")
"""What an atomic write is written as before its rename: `.<name>.tmp-<pid>`."""


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) 0700; tighten it if it is ours and looser. A file
    where a folder must be (it, or one on its way) is said as such, not "File exists"."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    except (FileExistsError, NotADirectoryError):
        there = file_on_the_way(path)
        said = "a file, not a folder" if there == path else f"{there} is a file, not a folder"
        raise NotADirectoryError(errno.ENOTDIR, said, str(path)) from None
    _tighten(path, DIR_MODE)
    return path


def file_on_the_way(path: Path) -> Path:
    """The first of `path` and its parents that exists (a file where a folder must be)."""
    return next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), path)


def private_file(path: Path) -> Path:
    """Create an empty file 0600 if it does not exist; tighten it if it is ours and looser."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    os.close(fd)
    _tighten(path, FILE_MODE)
    return path


def _tighten(path: Path, mode: int) -> None:
    with contextlib.suppress(OSError):
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o777 & ~mode:
            path.chmod(mode)


def atomic_write(path: Path, write: Callable[[Path], object], mode: int = FILE_MODE) -> None:
    """Replace `path` with what `write` writes to the temporary path it is given, atomically:
    `.<name>.tmp-<pid>` in the same folder (created with `mode`), fsync, rename. On any error
    (a full disk) the temporary file is removed and the error raised; `path` is never left
    torn. `write` gets a path, not a file object: libsndfile then reports a short write as its
    own error."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode))
        write(tmp)
        sync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def read_regular(path: Path) -> str:
    """The text of `path` if it is a regular file; ValueError for anything else. A FIFO left
    in the state folder hung the daemon's start in open() (the security review), and a
    folder or device there is no state either. FileNotFoundError when it is not there."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read().decode()
    finally:
        os.close(fd)


def sync_file(path: Path) -> None:
    """fsync a file written by a name (OSError when it cannot be)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so a rename in it survives a power cut (the file's data was synced, but
    until its folder is, the card may come back with the old name); best effort: a file
    system that cannot sync folders is left as it is."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete what atomic writes left in `folder` when their process died mid-write (a power
    cut, kill -9): `.<name>.tmp-<pid>` files and folders of a process that no longer runs. The
    name holds the PID, so every restart would otherwise add one (a period's is up to 5 MB)."""
    try:
        paths = list(folder.iterdir())
    except OSError:
        return []
    removed = []
    for path in paths:
        found = TEMP_NAME.match(path.name)
        if found is None or pid_running(int(found.group(1))):
            continue
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
            log.info("removed %s, left by a write that did not finish", path)
    return removed


def pid_running(pid: int) -> bool:
    """True if another process with this PID runs (it may be writing its temporary file)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # it runs, as another user
    except (OSError, OverflowError):
        return False
    return True


def user_name(uid: int) -> str:
    """The name of the user `uid` (the number where the system has none)."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
