"""`soundsentry replay`, `run` and `demo`: the detector listening, to files, to the microphone
(the service), or to the bundled recording."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.errors import SoundSentryError
from soundsentry.commands.common import EXIT_INTERRUPTED, channel_arg, load_model

log = logging.getLogger("soundsentry")


def add_replay(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="run the daemon's pipeline on files; events as JSON lines",
        description="Run the daemon's pipeline on files and print its events as JSON lines. "
        "Event times take the audio as just recorded: it ends when the replay starts "
        "(with --realtime, it starts then).",
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument(
        "files", nargs="+", type=Path, metavar="PATH", help="audio files or folders (recursive)"
    )
    p.add_argument("--realtime", action="store_true", help="pace the audio at real time")
    p.add_argument(
        "--continuous",
        action="store_true",
        help="play the files back to back as one stream; by default each file is its own "
        "stream: the detector resets between files and an open event ends at each file's end",
    )
    p.add_argument(
        "--channel",
        type=channel_arg,
        default=None,
        help="channel of the files to hear; -1 averages all (default: the one the model was "
        "fitted on, as `evaluate` does; [audio] channel is the microphone's, not the files')",
    )
    _add_common(p)
    p.set_defaults(func=_cmd_replay)


DEVICE_HELP = "input device: index, part of its name, or port:... (see `soundsentry devices`)"


def add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="the daemon: capture the microphone, publish events")
    p.add_argument("--model", type=Path, default=None, help="bundle (overrides the config)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    _add_common(p)
    p.set_defaults(func=_cmd_run)


def add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="stream the bundled clip through the bundled model")
    p.add_argument("--fast", action="store_true", help="as fast as possible, not in real time")
    p.set_defaults(func=_cmd_demo)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help="TOML settings")
    p.add_argument(
        "--device-id",
        default=None,
        help="name of this detector (default: the config's device_id, else the host name)",
    )
    p.add_argument("--mqtt-host", default=None, help="broker host (overrides the config)")
    p.add_argument("--mqtt-port", type=int, default=None, help="broker port")


def _settings_from(args: argparse.Namespace, model: Path | None) -> Any:
    from edge.settings import load_settings

    return load_settings(
        args.config,
        model=model,
        device_id=args.device_id,
        mqtt={"host": args.mqtt_host, "port": args.mqtt_port},
        audio={"device": getattr(args, "device", None)},
    )


def _warn_at_start(bundle: Any, settings: Any, listening: bool) -> None:
    """What the settings do to the bundle that it was not made for: another K of N than its
    threshold was set for, and, for the microphone (`listening`), another channel; and a
    device_id that Home Assistant's discovery would confuse with another."""
    from edge.advice import channel_note, discovery_note, event_logic_note

    notes = [event_logic_note(bundle.manifest, settings.detector), discovery_note(settings)]
    if listening:  # a replay reads the channel the model was fitted on by default
        notes.append(channel_note(bundle.manifest, settings.audio.channel))
    for note in notes:
        if note:
            log.warning("%s", note)


REPLAY_SUFFIX = "-replay"


def _replay_settings(args: argparse.Namespace) -> tuple[Any, bool]:
    """A replay's settings, and whether its device_id was made for it: publishing to a broker
    (`--mqtt-host`) with no config and no device_id chosen (flag, environment), it is
    `HOST-replay`, not the host name the device's own detector defaults to: a test replay's
    events reached the device's Home Assistant entities and its automations ("pump sounds
    wrong"), and left it `offline` (in a review). With a config it acts as that device, as
    the README says (its spool, event log and history go by its device_id)."""
    settings = _settings_from(args, args.model)
    if args.config is None and settings.mqtt.host and "device_id" not in settings.model_fields_set:
        update = {"device_id": settings.device_id + REPLAY_SUFFIX}
        return settings.model_copy(update=update), True
    return settings, False


def _device_model(config: Path | None, data_dir: Path, replayed: str) -> str | None:
    """The model id the device of `config` runs when it is not `replayed`, else None. A replay
    acts as the device of its config; of another model it dropped the device's saved learning
    period, recorded the replayed model as the device's in the model history (its site version
    unused from then on) and saved its own threshold over the one set by command (a new-user
    walk-through). The config's `model` says which; without one that loads (the service given
    it in its environment, a bundle damaged), what `data_dir` records of it."""
    from edge.bundle import read_manifest
    from edge.settings import load_settings

    if config is None:
        return None
    model = load_settings(config).model
    runs = None
    if model is not None:
        with contextlib.suppress(SoundSentryError):
            runs = read_manifest(model).model_id
    if runs is not None:
        return runs if runs != replayed else None
    # any record of another model: this replay is not the device's (the records are saved at
    # different times, so one may be older than another: a review found the history's naming
    # the model before while the saved period was the new one's)
    return next((m for m in _recorded_models(data_dir) if not _of_model(m, replayed)), None)


def _of_model(model_id: str, replayed: str) -> bool:
    """`model_id` is the replayed model or a site version of it (`<id>-site-v2`, calibrated)."""
    return model_id == replayed or model_id.startswith(f"{replayed}-")


def _recorded_models(data_dir: Path) -> list[str]:
    """The models the data folder's records name (a saved period, the saved state, the model
    history), read without changing anything."""
    from edge.history import peek_json

    found = []
    for path, key in (
        (data_dir / "learning" / "period.json", "of"),
        (data_dir / "state.json", "model"),
        (data_dir / "models" / "history.json", "configured"),
    ):
        data = peek_json(path) or {}
        if isinstance(data.get(key), str):
            found.append(data[key])
    return found


def _cmd_replay(args: argparse.Namespace) -> int:
    from edge.console import ReplayLines, ReplaySummary
    from edge.service import run_detector

    settings, renamed = _replay_settings(args)
    if renamed:
        print(
            f"note: replay publishes to the broker as device {settings.device_id}, not as the "
            "detector of this host: its events reach no Home Assistant entity or automation of "
            "the device's (--device-id chooses one; with the device's --config it acts as it)",
            file=sys.stderr,
        )
    bundle = load_model(settings.model)
    _warn_at_start(bundle, settings, listening=False)
    device_model = _device_model(args.config, settings.data_dir, bundle.model_id)
    files, source = _replay_source(args, settings, bundle)
    summary = ReplaySummary()
    detector = run_detector(
        settings,
        bundle,
        source,
        print_events=False,  # ReplayLines prints them, naming each one's file
        reload_settings=lambda: _replay_settings(args)[0],
        extra_sinks=[ReplayLines(source.locate, sys.stdout), summary],
        on_step=summary.step,
        persist=device_model is None,
        on_started=_note_device_model(device_model, bundle.model_id),
    )
    line = summary.line(len(files), detector.threshold)
    if detector.cut_short:  # read as a finished run, exit 0, by a script (a review)
        print(f"{line}; stopped (Ctrl-C or SIGTERM) before the audio ended", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(line, file=sys.stderr)
    return 0


def _replay_source(args: argparse.Namespace, settings: Any, bundle: Any) -> tuple[list[Path], Any]:
    """The audio files replay found, and the source that streams them."""
    from edge.audio_io import find_audio
    from edge.bundle import channel_for
    from edge.history import manifest_in_use
    from edge.pipeline import Pipeline
    from edge.sources import FileSource

    files = find_audio(args.files)  # folders searched recursively, as everywhere else
    if not files:
        raise SoundSentryError("no audio files found in " + " ".join(map(str, args.files)))
    # a stereo file's other machine; the site version the data folder runs, if it has one
    running = manifest_in_use(
        settings.data_dir / "models", bundle, lambda b: Pipeline(b, settings.detector)
    )
    source = FileSource(
        files,
        bundle.features.samplerate,
        channel_for(running, args.channel, "replay"),
        settings.audio.block_seconds,
        realtime=args.realtime,
        continuous=args.continuous,
    )
    return files, source


def _note_device_model(device_model: str | None, model_id: str) -> Callable[[], None] | None:
    """What replay says once started when the config's device runs another model (None when
    it runs this one)."""
    return (
        None
        if device_model is None
        else lambda: print(
            f"note: the config's device runs {device_model}, not {model_id}: this replay "
            "leaves its learning, model versions, threshold and mute as they are, and uses none "
            "of them",
            file=sys.stderr,
        )
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from edge.capture import MicSource
    from edge.errors import StartError
    from edge.sdnotify import SystemdNotifier
    from edge.service import hold_data_dir, run_detector
    from edge.settings import check_service_data_dir

    try:
        settings = _settings_from(args, args.model)
        if args.log_level is None:  # the service's log (the journal): its audit trail of commands
            logging.getLogger().setLevel(settings.log_level)
        if settings.model is None:
            raise SoundSentryError("no model: set `model` in the config file or pass --model")
        check_service_data_dir(settings.data_dir)
        bundle = load_model(settings.model)
        lock = hold_data_dir(settings.data_dir)  # another run or a replay on it: said, held
    except (SoundSentryError, OSError) as exc:  # OSError: a model the service cannot read
        _hold_before_failing(SystemdNotifier(), exc)
        raise
    _warn_at_start(bundle, settings, listening=True)
    h = settings.health
    # As a service, a microphone missing at start (a USB one enumerated late, unplugged) is
    # waited for and reported on `health`; on a terminal, a device that matches nothing (a typo)
    # is one line at once.
    service = SystemdNotifier().enabled
    source = MicSource(
        settings.audio, bundle.features.samplerate, h.stall_seconds, h.reopen_max_seconds, service
    )
    live = _live_line(bundle.threshold)
    try:
        run_detector(
            settings,
            bundle,
            source,
            # events as JSON lines to a pipe, not to the journal: its log has each start and
            # end, and an update every 10 s of a day-long fault was 8,640 lines a day there
            print_events=live is None and not _stdout_is_journal(),
            on_stop=source.stop,
            reload_settings=lambda: _settings_from(args, args.model),
            extra_sinks=[live] if live else [],
            on_step=live.step if live else None,
            live=True,
            lock=lock,
        )
    except StartError as exc:  # the broker's TLS files, the web's token...: found before the
        _hold_before_failing(SystemdNotifier(), exc)  # loop ran, retried each minute as well
        raise
    if live:
        live.clear()
    return 0


START_RETRY_S = 60.0
"""As a service, a start that fails on its settings or its model waits this long, saying why in
`systemctl status`, before it exits for systemd to start it again: a typo or a model not copied
yet is retried every minute instead of every RestartSec (5 s: 17 000 starts a day, each with
its log lines, on an SD card), and is still picked up by itself once mended. Below the unit's
TimeoutStartSec (120 s)."""


def _hold_before_failing(notifier: Any, exc: Exception) -> None:
    """Under systemd: STATUS says why the start failed, then wait START_RETRY_S (SIGTERM ends
    the wait at once); on a terminal, nothing: the error is one line at once."""
    if not notifier.enabled:
        return
    notifier.status(f"cannot start: {exc} (starting again in {START_RETRY_S:g} s)")
    print(f"soundsentry: cannot start: {exc}; starting again in {START_RETRY_S:g} s",
          file=sys.stderr, flush=True)  # fmt: skip
    time.sleep(START_RETRY_S)


def _stdout_is_journal() -> bool:
    """stdout is systemd's journal (the service): JOURNAL_STREAM names its device and inode."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stdout.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):  # no such variable, or a stdout with no fd
        return False


def _live_line(threshold: float) -> Any:
    """On a terminal, the live line of `run` (events print above it); elsewhere None."""
    if not sys.stdout.isatty():
        return None
    from edge.console import LiveLine, clear_before_logs

    live = LiveLine(sys.stdout, threshold)
    clear_before_logs(live)
    return live


def _cmd_demo(args: argparse.Namespace) -> int:
    from edge.demo import run_demo

    run_demo(realtime=not args.fast)
    return 0
