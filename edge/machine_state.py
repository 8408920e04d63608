"""Is the machine running? A window far quieter than anything heard in training means the
machine is off: it is not scored for events (silence from a stopped fan is no fault), the
state says `off`, and the hours of running are counted.

The quiet level comes from the bundle (its training audio's window levels) or from the
`[detector] off_below_dbfs` setting; with neither, every window counts as running.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from edge.features import FeatureParams, LogMel
from edge.framing import WindowBuffer, blocks, cut
from edge.health import is_dead, level_dbfs

log = logging.getLogger(__name__)

RUNNING = "running"
OFF = "off"

OFF_MARGIN_DB = 10.0
"""A window this far below the quietest 1 % of training windows (of the quietest state's) is
'off'."""
HYSTERESIS_DB = 3.0
"""Back to running only this far above the off level, so a level near it does not flap."""
CONFIRM_WINDOWS = 2
"""Consecutive windows below the off level that make a running machine `off`."""
SETTLE_SECONDS = 5.0
"""After the machine starts, events wait this long: a run-up is not a fault."""
SHORT_DROPOUT_S = 2.0
"""Dead windows (a dropout, a blip of digital silence) whose sound comes back this soon, from
the end of the first of them to the end of the first window heard again, hold events back for
no settle time after them: a machine heard running before them still runs (it does not stop and
start again within a second). With 1-s windows at a 0.5-s hop, dropouts of up to about a
second. A dropout of 0.2 s every 10 s held events back for 6.5 s of every 10, and training
left out more than half of such a recording as if the machine were not running (a new user's
walk-through). Longer losses, and a device reopened, still wait SETTLE_SECONDS."""
STATE_WINDOWS = 10
"""Windows a named state is voted over (5 s at the default hop), so odd windows do not rename
the machine."""
SWITCH_VOTES = 8
"""Votes of the last STATE_WINDOWS another state needs to take over the name (4 s of it at the
default hop). A plain majority of 5 renamed a machine 327 times an hour when one window in five
sounded nearer the other state, each time a retained state message and a log line (and with
three states, ties alternated); 8 of 10 such windows come about once in two hours. An `off`
machine is running again by the same vote of windows HYSTERESIS_DB above its off level: two in
a row flipped a stopped fan in an occupied room (its level 1.5 +- 2 dB above the off level)
286 times an hour, and counted 60 % of the hour as running."""


STOP_SECONDS = 2.0
"""Training leaves out the windows that end this long before the first window heard near the
off level: the stop (or the coast down) began in them. Such a window is at least mostly quiet,
so the stop began at most a window's length (1 s) before its end; the second more allows for a
coast down."""

QUIET_GAP_DB = 20.0
"""Training windows this far below the median level are not the machine running (a silent
lead-in, the machine switched off for part of a recording, a file recorded far quieter): they
are left out of the running level, or the off level would fall below them and never be met."""
PERCENTILES = {"p01": 1, "p50": 50, "p99": 99}
TWO_LEVELS_DB = 12.0
"""Normal audio whose windows fall into two levels this far apart (each TWO_LEVEL_SHARE of them
or more) is said at training: a compressor recorded through its cycles, as README's step 2
reads, held 200 s of the stopped machine's room 18 dB under 100 s of running; the room became
the running level, the machine never read `off`, and the threshold was set on the room (about
700 false alarms a day, in a field review). Two speeds a few dB apart are not said."""
TWO_LEVEL_SHARE = 0.1
"""Each of two levels holds at least this share of the windows to be said."""


def level_split(levels: np.ndarray) -> tuple[float, float, float] | None:
    """Otsu's split of window levels (dBFS): the mean level of the quieter part, of the louder
    part, and the quieter part's share of the windows; None where either part would hold less
    than TWO_LEVEL_SHARE of them."""
    levels = np.sort(np.asarray(levels, np.float64))
    n = len(levels)
    if n < 4:
        return None
    below = np.arange(1, n)
    low = np.cumsum(levels)[:-1] / below
    high = (levels.sum() - low * below) / (n - below)
    i = int(np.argmax(below * (n - below) * (high - low) ** 2))
    share = below[i] / n
    if not TWO_LEVEL_SHARE <= share <= 1 - TWO_LEVEL_SHARE:
        return None
    return float(low[i]), float(high[i]), float(share)


_SAID: set[object] | None = None
"""The warnings said inside `said_once`; None outside it."""


@contextmanager
def said_once() -> Iterator[None]:
    """Within it, a training warning of the same recordings is said once: an ensemble's members
    each read them (outside it every training says it: a process may train many times)."""
    global _SAID
    _SAID = set()
    try:
        yield
    finally:
        _SAID = None


def say_once(key: object) -> bool:
    """Whether the warning `key` is to be said now (`said_once`)."""
    if _SAID is None:
        return True
    if key in _SAID:
        return False
    _SAID.add(key)
    return True


def _warn_two_levels(levels: np.ndarray, state: str | None) -> None:
    """Say the running audio (or a state folder's) that holds two levels TWO_LEVELS_DB apart."""
    split = level_split(levels)
    if split is None or split[1] - split[0] < TWO_LEVELS_DB:
        return
    low, high, share = split
    if not say_once(("two levels", state, round(low, 2), round(high, 2), round(share, 4))):
        return
    if state:
        where, fix = f"the state folder {state!r}", "move that audio into the folder `off`"
        counts = f"the state {state!r}"
    else:
        where = "the normal audio"
        fix = (
            "put that audio in a folder `off` beside one of it running and train with "
            "--normal-states, or record it running only"
        )
        counts = "the machine running: it never reads `off`"
    log.warning(
        "%s holds two levels %.0f dB apart (%.0f %% of its windows near %.0f dBFS, the rest "
        "near %.0f): if the machine was off (or idling) in the quieter part, %s; trained as "
        "one, the quieter audio counts as %s, and the threshold is set on audio that is not "
        "the machine",
        where, high - low, 100 * share, low, high, fix, counts,
    )  # fmt: skip


def is_off(name: str | None) -> bool:
    """Whether a state folder's or a classifier's class name is `off` (any case): the machine
    stopped."""
    return name is not None and name.lower() == OFF


def off_level(running_p1_dbfs: float) -> float:
    """The off level for a machine whose quietest 1 % of running windows is at this level."""
    return running_p1_dbfs - OFF_MARGIN_DB


def machine_profile(
    audio: Iterable[np.ndarray],
    params: FeatureParams,
    states: list[str] | None = None,
    groups: Sequence[int] | None = None,
    say_two_levels: bool = True,
    names: Sequence[str] | None = None,
) -> dict:
    """A manifest's `machine` section from normal audio of the machine running (mono, model
    rate): the level of its windows, from which the edge tells `off` (far quieter) from
    running. Digital silence and windows QUIET_GAP_DB below the median are left out, with a
    warning that says how many. `groups`: the operating state of each recording (state
    folders); the median is then each state's own, so a quiet state the user named as running
    (idle, a low speed) is part of the running level instead of being left out as `off`.
    `say_two_levels`: warn of audio (each state's, named by `names`, the groups' names) whose
    running windows hold two levels far apart."""
    levels, group_of, silent = [], [], 0
    for n, a in enumerate(audio):
        for w in cut(a, params.window_samples, params.hop_samples):
            if is_dead(w.samples, params.hop_length):  # as the device: no level of it
                silent += 1
            else:
                levels.append(level_dbfs(w.samples))
                group_of.append(groups[n] if groups is not None else 0)
    heard, group_of = np.array(levels), np.array(group_of)
    quiet = np.zeros(len(heard), bool)
    for g in np.unique(group_of):
        mine = group_of == g
        quiet[mine] = heard[mine] < np.median(heard[mine]) - QUIET_GAP_DB
        if say_two_levels:  # of what counts as running (a lead-in left out above is not)
            state = names[g] if names is not None and groups is not None else None
            _warn_two_levels(heard[mine][~quiet[mine]], state)
    left_out = silent + int(quiet.sum())
    if left_out:
        log.warning(
            "%d of %d windows of the normal audio are silent or more than %g dB below its "
            "median level (a silent start, the machine off for a while, a recording far "
            "quieter than the others?): the machine's running level is measured without them",
            left_out, silent + len(heard), QUIET_GAP_DB,
        )  # fmt: skip
    running_levels = heard[~quiet]
    if len(running_levels) == 0:
        return {"running_level_dbfs": {}, "off_below_dbfs": None, "states": states}
    running = {k: round(float(np.percentile(running_levels, q)), 2) for k, q in PERCENTILES.items()}
    # each state's own quietest 1 %: a quiet state with under 1 % of the audio (half a minute
    # of idle beside an hour at full speed) would otherwise lie below the off level, read `off`
    quietest = min(
        float(np.percentile(running_levels[group_of[~quiet] == g], PERCENTILES["p01"]))
        for g in np.unique(group_of[~quiet])
    )
    return {
        "running_level_dbfs": running,
        "off_below_dbfs": round(off_level(quietest), 2),  # never above the pooled p01
        "states": states,
    }


@dataclass
class MachineState:
    """Running/off with hysteresis and a settle time after start (the running time it means
    is counted by `RunningTime`)."""

    off_below_dbfs: float | None
    state: str = RUNNING
    _streak: int = 0
    _settled_at: float = float("-inf")
    _named_off: bool = False
    _near_off: int = 0
    """Windows in a row within HYSTERESIS_DB of the off level: a machine coasting down."""
    _loud: deque[bool] = field(default_factory=lambda: deque(maxlen=STATE_WINDOWS))
    """While off: which of the last windows were HYSTERESIS_DB above the off level."""
    _dead_since: float | None = None
    """The end of the first of the dead windows heard since the last live one, if any (-inf
    after a device reopened: audio lost for an unknown time)."""
    _settled_before: float = float("-inf")
    """The settle time as it was before those dead windows: kept after a short dropout."""
    _heard_sound: bool = False
    """A window with sound heard since the stream began (`_fresh` waits for an off level)."""
    _heard_running: bool = False
    """The machine was heard running, steadily, up to those dead windows: not going quiet (a
    stop beginning, whose restart a dropout could hide: a mains dip that stalls the motor and
    browns out the microphone) and not yet unheard (dead windows at the start)."""
    _fresh: bool = True
    """No window heard yet: the first one sets the state as it finds it. Started as running, a
    daemon (re)started beside a stopped machine published it running, then off two windows
    later, at every restart, reload and settings change, and counted a hop of running time."""

    def near_off(self, level_dbfs: float) -> bool:
        """A window heard below the off level or within HYSTERESIS_DB of it: the machine stopped
        or coasting down, not yet (or no longer) heard running. False without an off level."""
        return self.off_below_dbfs is not None and level_dbfs < self.off_below_dbfs + HYSTERESIS_DB

    def update(self, level_dbfs: float, end_s: float, hop_s: float) -> str:
        """Feed one window's level; return the machine state after it."""
        if self._dead_since is not None:  # sound is back after dead windows
            short = end_s - self._dead_since <= SHORT_DROPOUT_S
            # and heard running again: not near the off level (a stall inside the dropout,
            # a mains dip that browns out the microphone too, comes back as a run-up)
            if self._heard_running and short and not self.near_off(level_dbfs):
                self._settled_at = self._settled_before  # a blip: no run-up to wait for
            self._dead_since = None
        self._heard_sound = True
        if self.off_below_dbfs is None:
            return self.state
        if self._fresh:
            self._fresh = False
            if level_dbfs < self.off_below_dbfs:
                self.state, self._streak = OFF, 0
                self._near_off = 1
                return self.state
        near = self.near_off(level_dbfs)
        self._near_off = self._near_off + 1 if near else 0
        if self.state == RUNNING:
            self._streak = self._streak + 1 if level_dbfs < self.off_below_dbfs else 0
            if self._streak >= CONFIRM_WINDOWS:
                self.state, self._streak = OFF, 0
                self._loud.clear()
        else:
            self._loud.append(not near)
            if sum(self._loud) >= SWITCH_VOTES:
                self.state = RUNNING
                # the settle time runs from the second window of the loud run that ends here, as
                # when two in a row were a start: judged as soon after a start as before the vote
                quiet = [i for i, loud in enumerate(self._loud) if not loud]
                run = len(self._loud) - 1 - max(quiet, default=-1)
                first = end_s - (run - 1) * hop_s
                settled = first + (CONFIRM_WINDOWS - 1) * hop_s + SETTLE_SECONDS
                self._settled_at = max(self._settled_at, settled)  # a dropout's may be later
                self._loud.clear()
        return self.state

    def named(self, name: str | None, end_s: float) -> str:
        """The machine's state once the window's named state is known (None: no names, or off
        by level): `off` while the vote names the state folder `off`; when another state takes
        over from it the machine has started, and events wait the settle time as after a quiet
        stop."""
        was_off, self._named_off = self._named_off, name == OFF
        if self._named_off:
            return OFF
        if was_off and name is not None:
            self._settled_at = end_s + SETTLE_SECONDS
        return self.state

    def heard_nothing(self, end_s: float, lost: bool = False) -> None:
        """A silent or flat window (a dropout, a muted input), or with `lost` audio lost by a
        device reopened: when sound comes back, events wait the settle time as after a start,
        whatever the level says (a microphone that reconnects is no fault), unless it comes back
        within SHORT_DROPOUT_S to a machine heard running steadily up to it."""
        if self._dead_since is None:
            self._dead_since, self._settled_before = end_s, self._settled_at
            self._heard_running = (
                self._heard_sound
                and self.state == RUNNING
                and not self._streak
                and not self._near_off
            )
        if lost:
            self._dead_since = float("-inf")
        self._settled_at = max(self._settled_at, end_s + SETTLE_SECONDS)
        self._loud.clear()  # a start is voted on sound heard after it, not across a gap

    def allows_events(self, end_s: float) -> bool:
        """True when a window may count as evidence: running, settled, not about to stop (nor
        coasting down: a window near the off level is far quieter than any running one, and a
        model of levels scores such a window high at every stop)."""
        return (
            self.state == RUNNING
            and end_s >= self._settled_at
            and self._streak == 0
            and not self._near_off
        )

    @property
    def quieting(self) -> bool:
        """The last window was the first in a row near the off level: the machine has just gone
        quiet (a stop, or a coast down, begins; in the windows just before it)."""
        return self._near_off == 1

    @property
    def quiet(self) -> bool:
        """Running, yet near the off level for CONFIRM_WINDOWS windows: an event open then
        ends (`machine_off`), since such windows are no evidence either way."""
        return self.state == RUNNING and self._near_off >= CONFIRM_WINDOWS

    def reset(self) -> None:
        """A new stream: forget the streak and settle time."""
        self.state, self._streak, self._settled_at = RUNNING, 0, float("-inf")
        self._dead_since, self._settled_before = None, float("-inf")
        self._heard_sound = self._heard_running = False
        self._loud.clear()
        self._near_off, self._fresh = 0, True


@dataclass
class RunningTime:
    """The machine's running hours, as the device publishes them: the windows heard with the
    machine running (`MachineState.named`: a state folder `off` is not running), and at a start
    the windows of the vote that called it (SWITCH_VOTES of its sound: the machine ran in them,
    published as `off` while the vote was open). A dead microphone's windows count neither way.
    The one counter: the machine state kept another, with its own rule for a start, that nothing
    published (in a review)."""

    seconds: float = 0.0
    _was_off: bool = False
    """The last window heard: the machine off."""

    def heard(self, machine: str, dead: bool, hop_s: float, votes: int = SWITCH_VOTES) -> None:
        """Count one window, its machine state as the event logic saw it; `votes`: the windows
        of the vote that calls a start (a classifier's K of N)."""
        if dead:
            return
        if machine == RUNNING:
            self.seconds += (votes if self._was_off else 1) * hop_s
        self._was_off = machine == OFF

    def restart(self) -> None:
        """A new machine state (another model or settings): no vote to credit."""
        self._was_off = False


@dataclass
class StateNamer:
    """Names the running state of a machine trained with state folders: the state whose mean
    log-mel band levels (dB) lie nearest the window's, by a vote over the last windows.

    A state folder named `off` holds what the microphone hears while the machine is stopped but
    the place is not quiet (neighbours, ventilation): a vote for it means the machine is off,
    and a window that is itself nearest to it is not evidence of a fault."""

    names: list[str]
    levels: np.ndarray
    """(states, mels): each state's mean log-mel level per band in training."""
    heard: str | None = None
    """The state nearest to the last window alone, before the vote."""
    current: str | None = None
    """The state named now."""
    _recent: deque[str] = field(default_factory=lambda: deque(maxlen=STATE_WINDOWS))
    _spare: int = STATE_WINDOWS
    """Windows that may be left unjudged as a change of state (`judged`): one spent by each such
    window, one given back by each that sounds like the state named, STATE_WINDOWS again at a
    rename."""

    def name(self, band_levels: np.ndarray) -> str:
        """Feed one running window's band levels (mels,); return the state named: the first
        window's after a reset, then another only once it holds SWITCH_VOTES of the last
        STATE_WINDOWS votes (all of them while fewer have been cast)."""
        self.heard = self.nearest(band_levels)
        self._recent.append(self.heard)
        leader, votes = Counter(self._recent).most_common(1)[0]
        if self.current is None or (
            leader != self.current and votes >= min(SWITCH_VOTES, len(self._recent))
        ):
            self.current = leader
            self._spare = STATE_WINDOWS  # the change is done
        return self.current

    def judged(self, frames: np.ndarray) -> bool:
        """After `name`: whether the window (its log-mel `frames`) is judged, for a machine
        that may be changing state. Not while it, or either half of it, sounds like another
        state than the one named: the machine may be loading, unloading, changing speed or
        stopping, all normal, and the window across the change holds both sounds (a field
        review's compressor raised an event at 5 of 6 switches from idle to loaded, that window
        scoring 26 against a threshold of 13.4; heard whole, it may still sound like the state
        before). At most STATE_WINDOWS such windows in a row, though, and one more for each
        window since that sounds like the state named: a change the vote does not name by then is
        none, and a fault that flips the sound in every window (a stall, a cut-out,
        short-cycling) is judged after STATE_WINDOWS (in a review, cuts of 0.35 s every second
        went unjudged for good), while a machine with an odd window now and then keeps its
        allowance for a real change (spent for good, in another review, when it came back only
        after STATE_WINDOWS windows in a row). A fault that sounds like another state is judged
        once the vote names it (4 s). A window that as a whole sounds like `off` is never judged
        (the place's own sound, or the machine stopping), as before any of this."""
        if self.heard == OFF:
            return False
        half = len(frames) // 2
        halves = np.stack([frames[:half].mean(axis=0), frames[half:].mean(axis=0)])
        if self.heard == self.current and all(
            self.names[i] == self.current for i in self.nearest_of(halves)
        ):
            self._spare = min(self._spare + 1, STATE_WINDOWS)
            return True
        if self._spare == 0:
            return True
        self._spare -= 1
        return False

    def nearest(self, band_levels: np.ndarray) -> str:
        """The state whose band levels lie nearest one window's, before any vote."""
        return self.names[int(self.nearest_of(band_levels[None])[0])]

    def nearest_of(self, band_levels: np.ndarray) -> np.ndarray:
        """For windows' band levels (n, mels): the index of the state nearest each."""
        return np.argmin(np.linalg.norm(band_levels[:, None, :] - self.levels[None], axis=2), 1)

    def reset(self) -> None:
        """A new stream or a machine that stopped: forget the vote."""
        self._recent.clear()
        self.heard = self.current = None
        self._spare = STATE_WINDOWS


def evidence_windows(
    audio: np.ndarray,
    params: FeatureParams,
    off_below_dbfs: float | None,
    off_like: StateNamer | None = None,
) -> np.ndarray:
    """The window features of a recording that training (and `calibrate`) take as normal
    running: those the device would take as evidence, its level replayed through
    `MachineState` as the pipeline does (so not a dead window, such as silence, a flat line or
    a dropout, nor the settling after one, not the machine off, starting up or coasting to a
    stop, nor, with `off_like`, a window nearest the state `off` of a bundle trained with one),
    and not the windows of the STOP_SECONDS before the machine is heard going quiet. The
    recording starts with the machine as it finds it (no settle time for a machine already
    running). With a hop finer than the device's (the dense windows models are fitted on) the
    window counts of the hysteresis span less time.

    3 s of the machine stopped in the held-out audio lifted the level-aware kinds' thresholds
    3.5- to 10-fold, in a review. The device still judges the windows in which a stop begins
    (it cannot know yet that the machine is stopping), but K-of-N and the CUSUM outlast them:
    the MIMII fan's bundle raised no event at 100 stops replayed into its normal test clips.
    Trained on its ten recordings each stopping after 7 s with those windows kept, it set its
    threshold at 3.34 and reported none of its 20 fault clips; without them at 3.16 and 8, as
    the same recordings cut before their stops do (3.25 and 8; a probe, 2026-12-03)."""
    return evidence_features(audio, params, off_below_dbfs, _as_they_are, off_like)


def _as_they_are(windows: np.ndarray) -> np.ndarray:
    return windows


def dead_seconds(audio: np.ndarray, params: FeatureParams) -> float:
    """How much of a recording the device hears as nothing: its windows of digital silence, a
    flat line or a dropout (a run of zeros of a STFT hop or more), in seconds of hops."""
    windows = cut(audio, params.window_samples, params.hop_samples)
    dead = sum(is_dead(w.samples, params.hop_length) for w in windows)
    return dead * params.hop_seconds


FEATURE_CHUNK = 512
"""Windows `evidence_features` featurizes at a time (4 MB of log-mels at the defaults)."""


def evidence_features(
    audio: np.ndarray,
    params: FeatureParams,
    off_below_dbfs: float | None,
    featurize: Callable[[np.ndarray], np.ndarray],
    off_like: StateNamer | None = None,
) -> np.ndarray:
    """`featurize` of `evidence_windows`, for a featurizer that maps each window on its own
    (windows (n, frames, mels) -> rows (n, dim)), made FEATURE_CHUNK windows at a time: the
    log-mels of every window of an hour's recording, twice over (a list, then its stack), were
    most of `train`'s 0.7 GB on one 1-h file once its windows were cut a block at a time."""
    rows, batch = [], []
    for features in evidence_stream(blocks(audio), params, off_below_dbfs, off_like):
        batch.append(features)
        if len(batch) == FEATURE_CHUNK:
            rows.append(featurize(np.stack(batch)))
            batch = []
    if batch or not rows:
        rows.append(
            featurize(np.stack(batch) if batch else np.zeros((0, *params.shape), np.float32))
        )
    return np.concatenate(rows)


def evidence_stream(
    blocks: Iterable[np.ndarray],
    params: FeatureParams,
    off_below_dbfs: float | None,
    off_like: StateNamer | None = None,
) -> Iterator[np.ndarray]:
    """`evidence_windows` of audio that comes in blocks, one window's features at a time, each
    once no later stop can take it back (STOP_SECONDS): an hour-long clip marked normal is never
    held whole (its audio and its windows' log-mels took 0.7 GB, in a review)."""
    machine = MachineState(off_below_dbfs)
    logmel = LogMel(params)
    kept: deque[tuple[float, np.ndarray]] = deque()
    buffer = WindowBuffer(params.window_samples, params.hop_samples)
    for block in blocks:
        for w in buffer.push(block):
            end_s = (w.start + params.window_samples) / params.samplerate
            if is_dead(w.samples, params.hop_length):
                machine.heard_nothing(end_s)
                continue
            machine.update(level_dbfs(w.samples), end_s, params.hop_seconds)
            if machine.quieting:  # the stop began in the windows just before this one
                while kept and kept[-1][0] > end_s - STOP_SECONDS:
                    kept.pop()
            if machine.allows_events(end_s):
                features = logmel(w.samples)
                if off_like is None or off_like.nearest(features.mean(axis=0)) != OFF:
                    kept.append((end_s, features))
            while kept and kept[0][0] <= end_s - STOP_SECONDS:  # beyond any later stop's reach
                yield kept.popleft()[1]
    for _, features in kept:
        yield features
