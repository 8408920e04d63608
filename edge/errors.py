"""User-facing errors: each one becomes a single line on stderr, never a traceback."""

import os
import sys


def install_extra(extra: str) -> str:
    """How to install an extra into the interpreter that runs: on a Pi, the service's venv
    (Raspberry Pi OS refuses system-wide `pip install`, and it would land elsewhere anyway),
    with `sudo` when this user may not write it (the installer's venv is root's: the line
    without it failed for the user who ran the command, in a walk-through)."""
    sudo = "" if os.access(sys.prefix, os.W_OK) else "sudo "
    return f"{sudo}{sys.executable} -m pip install 'soundsentry[{extra}]'"


def os_error_line(exc: OSError) -> str:
    """An OSError as one line: what went wrong and the file it names (no errno, no repr)."""
    return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")


class SoundSentryError(Exception):
    """A problem the user can fix (bad input, bad setting, bad model); shown as one line."""


class AudioError(SoundSentryError):
    """An audio file that cannot be read as audio."""


class BundleError(SoundSentryError):
    """A model bundle that is missing, corrupt or incompatible with this version."""


class SettingsError(SoundSentryError):
    """An invalid setting (file, environment or flag)."""


class StartError(SoundSentryError):
    """The daemon could not start (its broker's TLS files, its dashboard's token...): found
    before its loop ran, so a service waits a minute before systemd starts it again."""
