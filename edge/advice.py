"""How much normal audio a threshold needs, and the summary `train`, `calibrate` and the
device's refits give of what backs theirs (numpy only: it runs on the Pi).

MIN_AUDIO_SECONDS: below it `train` and `calibrate` refuse. Training holds a fifth of the audio
out to set the threshold, and windows are 1 s long every 0.5 s: 10 s leaves 2 s held out, 3
windows, the fewest a gamma fit and the K-of-N floor (K = 3 of N = 4) can stand on at all. With
5 s a single held-out window sets the threshold, and such a model alarmed on every window.

RECOMMENDED_AUDIO_SECONDS: below it they warn. 5 minutes hold out 60 s (120 windows: the CUSUM's
median and spread and the gamma tail rest on a hundred-odd windows, and the 95 % interval of the
predicted false alarms narrows to a factor of a few), and the Gaussian of 64 band statistics is
fitted on 960 windows, fifteen per dimension.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from edge.audio_io import first_few
from edge.errors import AudioError, SoundSentryError
from edge.machine_state import OFF
from edge.threshold import describe, interval_text

log = logging.getLogger(__name__)

MIN_AUDIO_SECONDS = 10.0
RECOMMENDED_AUDIO_SECONDS = 300.0
WIDE_INTERVAL = 100.0
"""A predicted false-alarm interval whose ends differ by more than this factor is called wide."""


def warn_short(short: list[str], window_seconds: float) -> None:
    """One warning naming the recordings shorter than one window, which are left out: they
    would count towards the minimum of audio without giving the model or the threshold a single
    window."""
    if short:
        log.warning(
            "%d recording(s) shorter than one %g-s window left out: %s",
            len(short), window_seconds, first_few(short, 5),
        )  # fmt: skip


def require_audio(seconds: float, what: str) -> None:
    """Refuse (AudioError, one line) below MIN_AUDIO_SECONDS, saying how much more to record."""
    if seconds < MIN_AUDIO_SECONDS:
        more = math.ceil(MIN_AUDIO_SECONDS - seconds)
        raise AudioError(
            f"{what}: {seconds:.1f} s of normal audio is too little: at least "
            f"{MIN_AUDIO_SECONDS:g} s is needed (record {more} s more; "
            f"{RECOMMENDED_AUDIO_SECONDS:g} s or more is recommended)"
        )


def advice(
    seconds: float,
    recordings: int,
    params: Mapping[str, Any],
    what: str = "normal audio",
    sessions: int | None = None,
) -> list[str]:
    """Advice lines on audio that is too short or too uniform to trust the threshold; `seconds`
    of `what` are those that back it; `sessions`: how many sittings of `record` (or other
    recordings) the recordings come from, when known."""
    lines = []
    if seconds < RECOMMENDED_AUDIO_SECONDS:
        more = math.ceil(RECOMMENDED_AUDIO_SECONDS - seconds)
        lines.append(
            f"warning: only {seconds:.0f} s of {what}; {RECOMMENDED_AUDIO_SECONDS:g} s or "
            f"more is recommended: record {more} s more, in every state the machine runs in"
        )
    if recordings == 1 or sessions == 1:
        one = "one recording" if recordings == 1 else f"one session ({recordings} files)"
        lines.append(
            f"advice: all the audio is {one}; record at other times too (another "
            "day, shift or load), or a threshold from one session may not hold for months"
        )
    low, high = params.get("predicted_interval_per_day", (0.0, 0.0))
    if high > 0 and (low <= 0 or high / low > WIDE_INTERVAL):  # a lower end of 0 is widest
        lines.append(
            "advice: the held-out audio pins the false-alarm rate down poorly (interval "
            f"{interval_text(low, high)} per day); more, and more varied, normal audio "
            "narrows it"
        )
    return lines


RUNNING_NOTE_S = 2.0
"""Held-out audio this much longer than the windows judged in it (a window's edges aside) says
how much of it was the machine running."""


def summary(
    seconds: tuple[float, float, float],
    recordings: int,
    threshold: float,
    params: Mapping[str, Any],
    how: str = "",
    off_seconds: float = 0.0,
    off_recordings: int = 0,
    refit_all: bool = False,
    calibrated: bool = False,
    sessions: int | None = None,
    held_pieces: int | None = None,
    running_s: float | None = None,
) -> str:
    """`seconds` = (all, fitted, held out): what backs the threshold and advice, as lines;
    `refit_all`: the shipped model was refitted on all the audio once the threshold was set
    (the numpy kinds), the held-out audio included;
    `how` says how the held-out audio was held out, when it is not plain; `off_seconds` of the
    audio, in `off_recordings` of the recordings, are the machine stopped (a state folder
    `off`), which backs no threshold; `calibrated`: the audio is a site's, which refitted only
    what calibration refits (the fluctuation's centre, not its covariance)."""
    first = _audio_line(
        seconds, recordings, params, how, refit_all, calibrated, held_pieces, running_s
    )
    total = seconds[0]
    lines = [first]
    backing = describe(threshold, params)
    if backing:
        lines.append(backing)
    if off_seconds > 0:
        running = recordings - off_recordings
        lines += advice(total - off_seconds, running, params, "the machine running")
    else:
        lines += advice(total, recordings, params, sessions=sessions)
    return "\n".join(lines)


def _audio_line(
    seconds: tuple[float, float, float],
    recordings: int,
    params: Mapping[str, Any],
    how: str,
    refit_all: bool,
    calibrated: bool,
    held_pieces: int | None,
    running_s: float | None,
) -> str:
    """The summary's first line: the audio, what of it fitted the model and what scored it."""
    total, fit, held = seconds
    fitted = "calibrated the model (what calibration refits)" if calibrated else "fitted the model"
    running = _held_running(held, recordings, params, held_pieces)
    if refit_all:
        fitted += _refit_running(total, running_s)
        return (
            f"audio: {total:.0f} s from {recordings} recording(s): {fit:.0f} s {fitted}; "
            f"a fit on {total - held:.0f} s scored the other {held:.0f} s{running}, held out, "
            f"for the threshold{how}"
        )
    return (
        f"audio: {total:.0f} s from {recordings} recording(s): {fit:.0f} s {fitted}, "
        f"which scored {held:.0f} s of held-out audio{running} for the threshold{how}"
    )


def _held_running(
    held: float, recordings: int, params: Mapping[str, Any], held_pieces: int | None
) -> str:
    """How much of the held-out audio was the machine running, when that is much less."""
    # what of it the threshold stands on: the windows the device judges (the machine off,
    # silence or a stop back none), which the threshold's own lines count
    judged = float(params.get("holdout_seconds", held))
    # windows x hop counts a window less a hop of each piece held out (a recording held out
    # whole, or the last fifth of each)
    edges = float(params.get("hop_s", 0.5)) * (held_pieces or recordings)
    return (
        f" ({judged:.0f} s of it the machine running)"
        if held - judged >= max(RUNNING_NOTE_S, 0.1 * held) + edges
        else ""
    )


def _refit_running(total: float, running_s: float | None) -> str:
    """How much of all the audio (refitted on) was the machine running, when that is much less."""
    left_out = total - (total if running_s is None else running_s)
    if left_out >= max(RUNNING_NOTE_S, 0.1 * total):
        return f" ({running_s:.0f} s of it the machine running)"
    return ""


RECORD_CHUNK = re.compile(r"(\d{8}T\d{6})-\d{4}\.wav")
"""The name `record` gives its files: the session's start, then the chunk's number."""


def sessions_of(files: Iterable[tuple[str, str | None]]) -> int:
    """How many sittings the recordings (name, sha256 or None) come from: `record`'s chunks of
    one start count once (ten minutes as ten 60-s files is one session, not ten), any other
    file as its own, by its content (two state folders may each hold a `take1.wav`)."""
    seen = set()
    for name, digest in files:
        match = RECORD_CHUNK.fullmatch(Path(name).name)
        seen.add(match.group(1) if match else digest or name)
    return len(seen)


def bundle_summary(manifest: Any) -> str:
    """The summary of a trained or calibrated bundle's manifest (edge.bundle.Manifest)."""
    th = manifest.threshold
    cal = manifest.calibration
    if cal:  # calibrate: each file is held out in turn, scored by a centre fitted without it
        s = float(cal.get("seconds", 0.0))
        n = len(cal.get("files", []))
        if n == 1:  # edge.detectors.base.leave_one_out: its first half centres, its second scores
            held = float(th.params.get("holdout_seconds", s / 2))
            return summary((s, s, held), n, th.value, th.params, refit_all=True, calibrated=True)
        how = " (each recording held out in turn, scored by a fit without it)"
        return summary((s, s, s), n, th.value, th.params, how, calibrated=True)
    t = manifest.training
    # a recording by its content: state folders often hold files of the same name
    names = {f.sha256 or f.name for f in [*t.files, *t.holdout_files]}
    held = min(t.holdout_seconds, t.seconds)
    states = (manifest.validation or {}).get("state_seconds") or {}
    # the `off` folder trains the network, so its audio is in the network's training seconds;
    # a numpy model leaves it out of all it fits and counts
    network = manifest.kind == "embedding"
    off_s = float(states.get(OFF, 0.0)) if network else 0.0
    # bundles from before 2026-12-01 did not count recordings per state: advise on all of them
    recordings = (manifest.validation or {}).get("state_recordings") or {}
    off_n = int(recordings.get(OFF, 0)) if network else 0
    fitted = t.seconds - held if t.fitted_seconds is None else t.fitted_seconds
    seconds = (t.seconds, fitted, held)
    refit_all = held > 0 and t.refit_on_all()
    sittings = sessions_of((f.name, f.sha256) for f in [*t.files, *t.holdout_files])
    text = summary(
        seconds, len(names), th.value, th.params, "", off_s, off_n, refit_all, sessions=sittings,
        held_pieces=len(t.holdout_files) or None, running_s=t.running_seconds,
    )  # fmt: skip
    if states:  # trained with state folders: how much of each, and what `off` is for
        parts = [f"{name} {float(sec):.0f} s" for name, sec in states.items()]
        taught = "the network" if network else "the state names"
        note = (
            f" (`{OFF}`: the machine stopped; it teaches {taught}, not the threshold)"
            if OFF in states
            else ""
        )
        first, _, rest = text.partition("\n")
        text = "\n".join([first, "states: " + ", ".join(parts) + note, rest]).rstrip("\n")
    return text


def classifier_summary(manifest: Any) -> str:
    """The validation figures of a classifier's bundle, one line (they were only logged at
    INFO, and a classifier below chance was written without a word, in a review)."""
    v = manifest.validation or {}
    labels = v.get("labels") or manifest.labels or []
    if "balanced_accuracy" not in v or not labels:
        return "validation: none recorded"
    rows = v.get("confusion") or []
    counts = {  # how many held-out windows each recall rests on: 1.00 of 2 is not of 200
        name: sum(row)
        for name, row in zip(labels, rows, strict=False)
        if isinstance(row, list) and all(type(x) is int for x in row)
    }
    recall = ", ".join(
        f"{name} {r:.2f}"
        + (f" ({counts[name]} window{'' if counts[name] == 1 else 's'})" if name in counts else "")
        for name, r in (v.get("recall") or {}).items()
        if r is not None
    )
    return (
        f"validation on {v.get('n', 0)} held-out windows: balanced accuracy "
        f"{v['balanced_accuracy']:.3f} (chance {1 / len(labels):.2f}), accuracy "
        f"{v.get('accuracy', 0.0):.3f}, macro F1 {v.get('macro_f1', 0.0):.3f}"
        + (f"; recall {recall}" if recall else "")
    )


def channel_note(manifest: Any, listen: int) -> str | None:
    """A warning when the daemon hears another channel than the one the model was fitted on
    (edge.bundle.fitted_channel) and that one is not 0: a model trained with `--channel 1` heard
    channel 0 on the device without a word, where `evaluate` and `replay` read channel 1 (a
    README walk-through). Fitted on channel 0 says nothing: a mono file of `record --channel
    N` is read as channel 0, and the device rightly listens on N."""
    from edge.audio_io import DOWNMIX
    from edge.bundle import fitted_channel

    fitted = fitted_channel(manifest)
    if fitted is None or fitted in (0, listen):
        return None
    if fitted == DOWNMIX:
        what, fix = "the average of its recordings' channels", "[audio] channel = -1"
    else:
        what = f"channel {fitted} of its recordings"
        fix = f"[audio] channel = {fitted} (and channels = {fitted + 1} or more)"
    return (
        f"the model was fitted on {what}, and the microphone is heard on [audio] channel "
        f"{listen}: if the device's channels are the recordings', set {fix}; scores of another "
        "channel are not comparable"
    )


def event_logic_note(manifest: Any, detector: Any) -> str | None:
    """A warning when [detector] runs the bundle with another K of N than its threshold was set
    for: the false alarms a day it predicts do not hold then (an old config's 2 of 3 ran a
    bundle set for 3 of 4, said by `doctor` alone, in an upgrade review). `detector`:
    edge.settings.DetectorSettings."""
    from edge.events import DEFAULT_K, DEFAULT_N

    params = manifest.threshold.params
    if manifest.kind == "classifier":  # a probability, not a budget
        return None
    try:
        k, n = detector.k_of_n(params)
    except SoundSentryError:  # K above N: the pipeline refuses it, in its own words
        return None
    own = int(params.get("k", DEFAULT_K)), int(params.get("n", DEFAULT_N))
    if (k, n) == own:
        return None
    return (
        f"[detector] trigger_windows / trigger_of run {k} of {n} windows; the bundle's threshold "
        f"was set for {own[0]} of {own[1]}: the false alarms a day it predicts do not hold (leave "
        "both out to use the bundle's)"
    )


def discovery_note(settings: Any) -> str | None:
    """A warning when Home Assistant's discovery would announce this device under the node id
    of another device_id: `pump.3` and `pump_3` share `soundsentry_pump_3` and take over each
    other's entities, and README alone said so. (A device_id beyond ASCII has a hash added.)"""
    from edge.topics import Topics, ha_id

    device = settings.device_id
    if not (settings.mqtt.host and settings.mqtt.discovery and device.isascii()):
        return None
    shared = ha_id(device)
    if shared == device:
        return None
    node = Topics(settings.mqtt.prefix, device, settings.mqtt.discovery_prefix).ha_node
    return (
        f"device_id {device!r} is announced to Home Assistant as node {node}, as device_id "
        f"{shared!r} would be: two such devices share one set of entities (a device_id of "
        "letters, digits, _ and - has a node of its own)"
    )
