"""`soundsentry record`, `doctor`, `devices` and `events`: the site tools around the detector."""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.errors import SoundSentryError
from soundsentry.commands.common import channel_arg, check_output, number_arg
from soundsentry.commands.detection import DEVICE_HELP

if TYPE_CHECKING:
    from edge.eventlog import LoggedEvent


def add_record(sub: Any) -> None:
    p = sub.add_parser("record", help="record normal audio on site into chunked WAV files")
    p.add_argument(
        "--seconds", type=_at_least(1.0), required=True, help="how much to record (at least 1)"
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the WAVs")
    p.add_argument(
        "--chunk-seconds",
        type=_at_least(2.0, 3600.0),  # a window and more; a plain WAV's sizes stop at 4 GB
        default=60.0,
        metavar="S",
        help="length of each WAV file (2 to 3600, default 60)",
    )
    p.add_argument(
        "--channel",
        type=functools.partial(channel_arg, average=False),
        default=None,
        metavar="N",
        help="channel of a multichannel device to record (0-based; default [audio] channel)",
    )
    p.add_argument(
        "--samplerate",
        type=_model_rate_or_more,
        default=16000,
        help="rate of the files (Hz, at least the models' 16000)",
    )
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help="TOML settings")
    p.set_defaults(func=_cmd_record)


def add_doctor(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check audio, model, broker, clock, disk and service")
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help="TOML settings")
    p.add_argument("--model", type=Path, default=None, help="bundle (overrides the config)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.set_defaults(func=_cmd_doctor)


def add_devices(sub: Any) -> None:
    p = sub.add_parser("devices", help="list the audio input devices, their rates and channels")
    p.set_defaults(func=_cmd_devices)


def add_events(sub: Any) -> None:
    p = sub.add_parser("events", help="list the anomalies in this device's local event log")
    p.add_argument(
        "--since",
        default=None,
        metavar="WHEN",
        help="only events that started since: an ISO date or time (2026-11-30, "
        "2026-11-30T08:00; local time unless it ends in Z) or an age (90m, 24h, 7d, 2w)",
    )
    p.add_argument(
        "--until",
        default=None,
        metavar="WHEN",
        help="only events that started before: as --since (a month at a time: --since "
        "2026-11-01 --until 2026-12-01)",
    )
    p.add_argument("--csv", action="store_true", help="CSV with a header row, for a spreadsheet")
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help="TOML settings")
    p.set_defaults(func=_cmd_events)


def _at_least(low: float, high: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a number from `low` to `high`."""

    def parse(text: str) -> float:
        value = number_arg(text, float)
        if not math.isfinite(value) or not low <= value <= high:
            within = f"from {low:g} to {high:g}" if math.isfinite(high) else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {within}")
        return value

    return parse


def _model_rate_or_more(text: str) -> int:
    from edge.features import MAX_SAMPLERATE, FeatureParams

    value, model = number_arg(text, int), FeatureParams().samplerate
    if not model <= value <= MAX_SAMPLERATE:
        raise argparse.ArgumentTypeError(
            f"must be {model} to {MAX_SAMPLERATE}: the models hear up to {model // 2} Hz"
        )
    return value


def _note_service_config(config: Path | None, doing: str, to: str) -> None:
    """Without --config on a device whose service has one: say that these are not its
    settings, and how to use them."""
    from edge.doctor import CONFIG_DIR

    if config is not None or not CONFIG_DIR.is_dir():
        return
    if not os.access(CONFIG_DIR, os.R_OK | os.X_OK):  # 0750 root:soundsentry: not for pi
        print(
            f"soundsentry: note: {doing}; the service's config in {CONFIG_DIR} is readable by "
            f"root and the service only: run this with sudo and add --config "
            f"{CONFIG_DIR}/config.toml {to}",
            file=sys.stderr,
        )
        return
    service = sorted(CONFIG_DIR.glob("*.toml"))
    if service:
        print(
            f"soundsentry: note: {doing}, not those of {service[0]}; add --config {service[0]} "
            f"{to}",
            file=sys.stderr,
        )


def _cmd_record(args: argparse.Namespace) -> int:
    from edge.record import record
    from edge.settings import load_settings

    check_output(args.out, "--out", folder=True)
    audio: dict[str, Any] = {"device": args.device}
    if args.channel is not None:  # open as many channels as that one needs, at least
        channels = load_settings(args.config, audio=audio).audio.channels
        audio |= {"channel": args.channel, "channels": max(channels, args.channel + 1)}
    settings = load_settings(args.config, audio=audio)
    _note_service_config(  # the service's microphone settings (channel, device) are not these
        args.config,
        "recording with the default [audio] settings",
        "to record as the service listens",
    )
    files = record(settings, args.seconds, args.out, args.chunk_seconds, args.samplerate)
    print(f"recorded {len(files)} file(s) into {args.out}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from edge.doctor import run_checks, service_environment
    from edge.settings import load_settings

    service_environment(args.config)  # a unit's config: its data folder, not the user's home
    settings = load_settings(args.config, model=args.model, audio={"device": args.device})
    _note_service_config(args.config, "checking the default settings", "to check the service")
    checks = run_checks(settings, args.config)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if c.ok is False]
    skipped = [c for c in checks if c.ok is None]
    passed = len(checks) - len(failed) - len(skipped)
    print(f"doctor: {passed} passed, {len(failed)} failed, {len(skipped)} skipped")
    return 1 if failed else 0


def _cmd_devices(_args: argparse.Namespace) -> int:
    from edge.devices import input_devices, known_inputs
    from edge.features import FeatureParams

    rate = FeatureParams().samplerate
    devices = input_devices(probe_rate=rate)
    if not devices:  # known_inputs' words: a device held by the service is not listed either
        raise SoundSentryError(known_inputs())
    print(
        "index  name  channels, default rate, host API  (* = the default input); the rate a "
        f"{rate}-Hz model captures at"
    )
    for device in devices:
        print(device.line())
    print(
        "give --device (or [audio] device) a part of the name, e.g. USB: indexes change when "
        "devices are plugged in or the Pi restarts; two microphones of the same make have the "
        "same name: give each its port: (the USB socket it is plugged into)"
    )
    return 0


def _marks_in_force(settings: Any) -> list[str]:
    """The events marked normal that the model version in use learnt: the active version's of
    the configured model (history.json read as it is; none when it cannot be read, or the
    configured model's manifest cannot)."""
    from edge.bundle import read_manifest
    from edge.history import active_entry

    if settings.model is None:
        return []
    try:
        configured = read_manifest(settings.model).model_id
    except SoundSentryError:
        return []
    entry = active_entry(settings.data_dir / "models", configured)
    if entry is None:
        return []
    try:  # a version whose folder is gone or holds another model: the daemon runs the configured
        if read_manifest(entry["path"]).model_id != entry.get("model_id"):
            return []
    except SoundSentryError:
        return []
    marked = entry.get("marked")
    return [str(m) for m in marked] if isinstance(marked, list) else []


def _cmd_events(args: argparse.Namespace) -> int:
    from edge.eventlog import format_event, read_events, write_csv
    from edge.settings import load_settings

    since, until = _events_window(args)
    settings = load_settings(args.config)
    folder = settings.data_dir
    if not folder.is_dir():  # "0 event(s)", as if all were well, for a folder mistyped or
        # another than the service's (`--config` forgotten on the device: a walk-through)
        raise SoundSentryError(
            f"no data folder {folder}: no daemon has run with it, so it holds no event log"
            + (SERVICE_EVENTS if args.config is None else "")
        )
    everything = read_events(folder)
    events = [
        e
        for e in everything
        if (since is None or e.started >= since) and (until is None or e.started < until)
    ]
    if args.csv:
        write_csv(events, sys.stdout)
    else:
        marked = _marks_in_force(settings)
        for event in events:
            print(format_event(event, marked))
    _say_events_count(len(events), everything, folder, since, until)
    return 0


def _events_window(args: argparse.Namespace) -> tuple[datetime | None, datetime | None]:
    """--since and --until as times (None when not given); refused when no event lies between."""
    from edge.eventlog import is_age, parse_since

    since = parse_since(args.since) if args.since else None
    until = parse_since(args.until, flag="--until") if args.until else None
    if since is not None and until is not None and since >= until:
        ages = is_age(args.since) and is_age(args.until)
        raise SoundSentryError(
            f"--since {args.since!r} is not before --until {args.until!r}: no event lies between"
            + (  # `--since 1h --until 2h` read as "from hour 1 to hour 2"
                f" (ages count back from now: --since {args.until} --until {args.since})"
                if ages
                else ""
            )
        )
    return since, until


def _say_events_count(
    count: int,
    everything: list[LoggedEvent],
    folder: Path,
    since: datetime | None,
    until: datetime | None,
) -> None:
    """On stderr: how many events were listed, and what the log may not hold."""
    from edge.eventlog import has_rotated, local_time

    when = f" since {local_time(since)}" if since else ""  # as the lines above: local
    when += f" until {local_time(until)}" if until else ""
    print(f"{count} event(s){when} in {folder}", file=sys.stderr)
    if everything and has_rotated(folder) and (since is None or everything[0].started > since):
        print(  # the oldest events were dropped at a rotation: the count is not "all since"
            f"(the log reaches back to {local_time(everything[0].data['started_at'])} only: it "
            "keeps about "
            "8 MB and drops the oldest events as it fills)",
            file=sys.stderr,
        )
    if folder == Path.home() / ".local" / "state" / "soundsentry":  # not the service's
        print(  # your own log (replays); the service keeps its own, readable by its user only
            f"(your own log{SERVICE_EVENTS})", file=sys.stderr
        )


SERVICE_EVENTS = (
    "; the service's: sudo -u soundsentry soundsentry events --config /etc/soundsentry/config.toml"
)
