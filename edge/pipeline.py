"""The detection pipeline: audio blocks -> windows -> log-mel -> model score -> events.

The daemon (`run`), `replay` and `demo` all feed this same class, so what is tested on
files is what runs on the microphone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edge.bundle import Bundle
from edge.detectors.base import Tracker, WindowScore
from edge.detectors.registry import plugin_for
from edge.events import ClassTracker, Transition
from edge.features import LogMel
from edge.framing import WindowBuffer
from edge.health import is_dead, level_dbfs
from edge.machine_state import OFF, RUNNING, MachineState, StateNamer, is_off
from edge.settings import DetectorSettings


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of one analysis window."""

    window: WindowScore
    start_s: float
    end_s: float
    transitions: tuple[Transition, ...]
    dead: bool = False
    """The window was digital silence or a flat line, or held a dropout (an STFT hop of
    digital silence or more): scored, but not used for events."""
    elapsed_s: float = 0.0
    """Time spent on features and inference."""
    level_dbfs: float = 0.0
    """RMS level of the window."""
    machine: str = RUNNING
    """The machine's state at this window: running or off."""
    state_name: str | None = None
    """A bundle trained with state folders: the state the machine runs in, or `off` when a
    state folder of that name is what it sounds like (None when off by its level)."""
    heard: tuple[Transition, ...] = ()
    """Events held off to listen (`Pipeline.push(listen=True)`): what they would have done."""
    evidence: bool = True
    """The event logic took this window as evidence: the machine running and settled (not
    starting up or coasting to a stop), the window neither dead nor, with state folders,
    sounding like another state than the one named (`off`, or the state the machine is
    changing to). Only such windows may be learnt as the machine's normal running."""
    quieting: bool = False
    """This window is the first in a row heard near the machine's off level: the machine went
    quiet in the windows just before it (edge.machine_state.STOP_SECONDS), so a learning period
    does not learn them as its running."""
    held: bool = False
    """Events were held off for this window (`Pipeline.push(detect=False)`: a mute, a learning
    period, audio that is not valid): it could raise none, whatever its score."""

    @property
    def score(self) -> float | None:
        """The window's score as reported (state, page, summaries); None for a dead window,
        whose score (hundreds, for digital silence) says nothing about the machine."""
        return None if self.dead else self.window.score

    @property
    def transition(self) -> Transition | None:
        """The last transition of this window, if any."""
        return self.transitions[-1] if self.transitions else None


class Pipeline:
    """Streaming detector for one model: push blocks of any size, get one Step per window."""

    def __init__(self, bundle: Bundle, detector: DetectorSettings | None = None) -> None:
        detector = detector or DetectorSettings()
        self.bundle = bundle
        p = bundle.features
        self.buffer = WindowBuffer(p.window_samples, p.hop_samples)
        self.logmel = LogMel(p)
        plugin = plugin_for(bundle.manifest)
        self.scorer = plugin.scorer(bundle)
        threshold = detector.threshold_in_force(bundle.threshold)
        self.events: Tracker = plugin.tracker(bundle, detector, threshold)
        self._new_tracker = lambda: plugin.tracker(bundle, detector, self.events.threshold)
        self._shadow: Tracker | None = None
        """While events are held off to listen (a learning period), the events the model would
        raise, gated as the real ones: nothing is published of them."""
        self._rate = p.samplerate
        self._length_s = p.window_samples / self._rate
        self._hop_s = p.hop_seconds
        self._dropout = p.hop_length  # as many zeros make frames of next to nothing
        info = bundle.manifest.machine
        off = detector.off_below_dbfs
        if off is None and info is not None:
            off = info.off_below_dbfs
        self.machine = MachineState(off)
        self.namer = state_namer(bundle)
        self._last_name: str | None = None

    @property
    def threshold(self) -> float:
        """Threshold in force."""
        return self.events.threshold

    def push(self, block: np.ndarray, detect: bool = True, listen: bool = False) -> list[Step]:
        """Process a mono block at the model's rate; `detect=False` scores without events, and
        with `listen` too its steps carry the transitions the events would have made
        (`Step.heard`)."""
        steps = []
        for window in self.buffer.push(block):
            t0 = time.perf_counter()
            features = self.logmel(window.samples)
            scored = self.scorer.score(features, window.start)
            elapsed = time.perf_counter() - t0
            start_s = window.start / self._rate
            end_s = start_s + self._length_s
            dead = is_dead(window.samples, self._dropout)
            level = level_dbfs(window.samples)
            if dead:  # a dead or unplugged microphone says nothing of the machine: no `off`
                self.machine.heard_nothing(end_s)
                name = self._last_name
            else:
                name = self._name(self.machine.update(level, end_s, self._hop_s), features)
                self._last_name = name
            machine = self.machine.named(name, end_s)
            evidence = (
                machine == RUNNING
                and not dead
                and self.machine.allows_events(end_s)
                and self._heard_as_named(features)
            )
            ends = machine != RUNNING or self.machine.quiet  # an open event, even unheeded
            window_at = (scored, start_s, end_s)
            found = _feed(self.events, detect and evidence, ends, *window_at)
            heard: tuple[Transition, ...] = ()
            # held off, a classifier still names its classes (a machine stopped while muted
            # read `off` for the whole mute, run or not: a diff review), and a period listens
            if not detect and (listen or isinstance(self.events, ClassTracker)):
                if self._shadow is None:
                    self._shadow = self._new_tracker()
                    if isinstance(self._shadow, ClassTracker):  # `off` or `normal` goes on
                        self._shadow.name_on(self.events.label)
                self._shadow.threshold = self.events.threshold  # one set by command too
                shadowed = _feed(self._shadow, evidence, ends, *window_at)
                heard = shadowed if listen else ()
            else:
                self.heed()
                self._shadow = None
            if is_off(self.named_class):  # a classifier names the machine stopped: its bundle
                machine = OFF  # has no off level, and a stop it named said `running` (a review)
            quieting = not dead and self.machine.quieting
            fields = (found, dead, elapsed, level, machine, name, heard, evidence, quieting)
            steps.append(Step(scored, start_s, end_s, *fields, held=not detect))
        return steps

    @property
    def tells_off(self) -> bool:
        """Whether this model can tell the machine switched off: an off level (trained,
        calibrated or set), or a class or state folder `off`. Without, a stopped
        machine reads `running`, and its silence may score as an anomaly."""
        named = [*(self.bundle.manifest.labels or []), *(self.namer.names if self.namer else [])]
        return self.machine.off_below_dbfs is not None or any(map(is_off, named))

    @property
    def named_class(self) -> str | None:
        """The class a classifier names now, while events are held off too (None for an
        anomaly model)."""
        return (self._shadow if self._shadow is not None else self.events).label

    def heed(self) -> None:
        """Events heeded again (a mute ended): what a classifier named while they were held off
        is what it names now, a class with no event of its own (`normal`, `off`) as it is, a
        fault as none till its K of N windows raise it (an `off` from before the mute came
        back over a fault heard during it: a diff review)."""
        shadow, events = self._shadow, self.events
        if isinstance(shadow, ClassTracker) and isinstance(events, ClassTracker):
            events.name_on(shadow.label)
        self._shadow = None

    def named_on(self, before: Pipeline) -> None:
        """This pipeline takes over from `before` (a reload, another model, new [detector]
        settings): a class with no event of its own that it named (`off`, `normal`) is named on
        if this model has it, a fault none till its K of N windows raise it. Named afresh, a
        machine stopped read `running` for the K windows of the vote at every switch, its
        running hours counting."""
        if isinstance(self.events, ClassTracker):
            self.events.name_on(before.named_class)

    def _name(self, machine: str, features: np.ndarray) -> str | None:
        """The named state of a running window, for a bundle trained with state folders."""
        if self.namer is None:
            return None
        if machine == OFF:
            self.namer.reset()
            return None
        return self.namer.name(features.mean(axis=0))

    def _heard_as_named(self, features: np.ndarray) -> bool:
        """False while the machine may be changing state (`StateNamer.judged`)."""
        return self.namer is None or self.namer.judged(features)

    def reset(self) -> None:
        """Drop buffered audio (after a gap in the stream)."""
        self.buffer.reset()

    def close(self, reason: str = "end_of_stream") -> Transition | None:
        """End an open anomaly, for `reason` (one of edge.events.ENDED_BY): by default the
        stream ended."""
        return self.events.close(reason)


def _feed(
    tracker: Tracker, evidence: bool, ends: bool, scored: WindowScore, start_s: float, end_s: float
) -> tuple[Transition, ...]:
    """What a window does to a tracker: as evidence it updates it; else, with the machine
    switched off or idling just above the off level (`ends`), an open event ends."""
    if evidence:
        return tuple(tracker.update(scored, start_s, end_s))
    if ends:
        ended = tracker.close("machine_off")
        return (ended,) if ended is not None else ()
    return ()


def state_namer(bundle: Bundle) -> StateNamer | None:
    """The state namer of a bundle trained with state folders (one is named too), else None."""
    info = bundle.manifest.machine
    if info is None or not info.states:
        return None
    if "machine.state_levels" not in bundle.arrays:
        return None
    return StateNamer(list(info.states), bundle.array("machine.state_levels"))
