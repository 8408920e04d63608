"""The `soundsentry` command: train, calibrate, evaluate, spectrogram, replay, run, record,
doctor, devices, events, demo.

Training imports TensorFlow only inside its command, reports import matplotlib only when
drawing, and sounddevice is imported only when capturing, so `demo`, `replay` and
`evaluate` work without PortAudio (and everything but `train` of the network kinds and the
PNGs works on the bare edge install; those say in one line which extra they need).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

# One BLAS thread: the per-window matrices are tiny, and idle OpenBLAS workers spin-wait
# (measured: 21 % of a core at real time with the default threads, 0.8 % with one). Set
# before numpy is imported; an explicit value in the environment wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from edge import __version__  # noqa: E402
from edge.errors import SoundSentryError, os_error_line  # noqa: E402
from soundsentry.commands.common import EXIT_ERROR, EXIT_INTERRUPTED, extra_of, needs  # noqa: E402
from soundsentry.commands.detection import add_demo, add_replay, add_run  # noqa: E402
from soundsentry.commands.evaluation import add_evaluate, add_spectrogram  # noqa: E402
from soundsentry.commands.tools import add_devices, add_doctor, add_events, add_record  # noqa: E402
from soundsentry.commands.training import add_calibrate, add_train  # noqa: E402

TIMED_LOGS = ("run", "replay", "record", "demo")
"""Commands that run for minutes to months: their log lines carry the time and the source."""


class _ShortFormatter(logging.Formatter):
    """`warning: ...` and `error: ...`, as the commands' own advice lines read."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    # The daemon's commands (and any run with --log-level) log with time and source, for a
    # journal or a terminal over hours; a command that is done in a minute speaks as its own
    # `warning:` and `note:` lines do.
    timed = args.command in TIMED_LOGS or args.log_level is not None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        if timed
        else _ShortFormatter()
    )
    logging.basicConfig(level=getattr(logging, args.log_level or "WARNING"), handlers=[handler])
    try:
        return int(args.func(args) or 0)
    except SoundSentryError as exc:
        print(f"soundsentry: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ModuleNotFoundError as exc:  # an optional extra that is not installed
        extra = extra_of(exc.name)
        if extra is None:
            raise
        print(f"soundsentry: error: {needs(args.command, extra, exc.name)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a path that is the wrong kind of thing, a full or read-only disk
        print(f"soundsentry: error: {os_error_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Parser(argparse.ArgumentParser):
    """argparse with the errors of every other mistake: one line, exit status 1 (argparse
    prints its whole usage block and exits 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"soundsentry: error: {message} (`{self.prog} --help` lists the "
                  "options)\n")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="soundsentry", description="Real-time anomaly detection for machine sounds."
    )
    parser.add_argument("--version", action="version", version=f"soundsentry {__version__}")
    log_help = (
        "stderr log level, DEBUG, INFO, WARNING or ERROR (default: `run` takes the config's "
        "log_level, INFO unless set; every other command WARNING)"
    )
    parser.add_argument("--log-level", type=_log_level, metavar="LEVEL", help=log_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (
        add_train,
        add_calibrate,
        add_evaluate,
        add_spectrogram,
        add_replay,
        add_run,
        add_record,
        add_doctor,
        add_devices,
        add_events,
        add_demo,
    ):
        register(sub)
    for command in sub.choices.values():  # after the command too: `run --log-level DEBUG`
        command.add_argument(
            "--log-level", type=_log_level, metavar="LEVEL", default=argparse.SUPPRESS,
            help=log_help,
        )  # fmt: skip
    return parser


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


if __name__ == "__main__":
    sys.exit(main())
