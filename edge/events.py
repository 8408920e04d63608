"""Event logic: per-window scores -> anomaly start / update / end, with K-of-N hysteresis,
evidence integrated over time (a one-sided CUSUM), periodic updates while an anomaly lasts and a
cooldown after it ends."""

from __future__ import annotations

import math
import re
import uuid
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from edge.machine_state import is_off

DEFAULT_K = 3
"""Windows above the threshold, among the last N, that start an event. Windows are 1 s long at a
0.5 s hop, so one instantaneous sound (a click, a door, a dropped tool) lands in two consecutive
windows: K = 1 + window / hop = 3 is the least that needs more than one such sound, which is
what "isolated spikes are ignored" means on overlapping windows (bench/SELECTION.md)."""
DEFAULT_N = 4
"""Recent windows the K are counted over (one of the four may dip)."""
DEFAULT_M = 4
"""Consecutive windows below the threshold that end an event."""
K_OF_N = "k_of_n"
CUSUM = "cusum"
"""The two paths that start an anomaly (Transition.trigger)."""
ENDED_BY = (
    "normal",  # the sound came back below the threshold and the integrated evidence to zero
    "machine_off",  # the machine stopped
    "label_changed",  # supervised: another state took over
    "audio_fault",  # the audio cannot be trusted: silence, clipping, invalid samples
    "audio_gap",  # no audio arrived: a stalled or unplugged microphone
    "muted",
    "learning",  # a commissioning period began
    "marked_normal",  # the operator marked the event normal
    "model_changed",  # another model (reload, calibrate, a refit or rollback)
    "settings_changed",  # SIGHUP
    "stopped",  # the daemon shut down
    "end_of_stream",  # a replayed recording ended (or the next one began)
    "interrupted",  # the daemon stopped without ending it; ended when it started again
)
"""Why an anomaly ended (Transition.ended_by, the `end` message's `ended_by`)."""
DEFAULT_DRIFT = 0.5
"""CUSUM reference value, in normal spreads: half the shift it is tuned to find (one spread of
the normal log score, i.e. a level about e^spread times the normal one), the textbook choice."""
DEFAULT_CAP = 3.0
"""Largest normalised score one window adds to the CUSUM. Normal windows almost never reach it
(0.13 % of a normal distribution lies above 3), so it leaves the CUSUM's false-alarm rate as
designed, but one outlier adds at most cap - drift: isolated spikes are the K-of-N path's to
judge, the CUSUM answers to evidence that persists."""
_SCORE_FLOOR = 1e-12
"""Scores are floored here before the logarithm (a score of 0 stays finite)."""


@dataclass(frozen=True)
class Cusum:
    """One-sided CUSUM of normalised log scores: S = max(0, S + min(z, cap) - drift) with
    z = (ln score - center) / scale; it fires when S exceeds h.

    CUSUM rather than EWMA: for a persistent shift of known size from a known normal level it
    has the shortest detection delay for a given false-alarm rate (Lorden, Moustakides), it
    restarts from zero after normal stretches instead of carrying their (negative) memory, and
    its one threshold h is set from the false-alarm budget by an exact Markov-chain computation
    (edge.threshold). The logarithm makes a multiplicative rise of the score (what a subtle fault
    does to a distance or an error) an additive shift, and makes chi-square-like scores nearly
    normal.
    """

    h: float
    center: float
    scale: float
    drift: float = DEFAULT_DRIFT
    cap: float = DEFAULT_CAP

    def __post_init__(self) -> None:
        values = (self.h, self.center, self.scale, self.drift, self.cap)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"CUSUM parameters must be finite: {self}")
        if self.h <= 0 or self.scale <= 0 or self.cap <= self.drift:
            raise ValueError(f"CUSUM needs h > 0, scale > 0 and cap > drift: {self}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Cusum | None:
        """The CUSUM stored under params['cusum'] of a manifest's threshold; None if absent."""
        stored = params.get("cusum")
        if stored is None:
            return None
        if not isinstance(stored, Mapping):
            raise ValueError("threshold.params.cusum must be an object")
        try:
            return cls(
                float(stored["h"]),
                float(stored["center"]),
                float(stored["scale"]),
                float(stored.get("drift", DEFAULT_DRIFT)),
                float(stored.get("cap", DEFAULT_CAP)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"threshold.params.cusum needs h, center and scale ({exc})") from None

    def to_params(self) -> dict[str, float]:
        """The parameters as stored in the manifest."""
        return asdict(self)

    def normalise(self, score: float) -> float:
        """z of one window score: its log, centred and scaled by the normal ones."""
        return (math.log(max(score, _SCORE_FLOOR)) - self.center) / self.scale

    def increment(self, score: float) -> float:
        """What one window adds to the CUSUM (before the floor at zero)."""
        return min(self.normalise(score), self.cap) - self.drift


@dataclass(frozen=True)
class Transition:
    """An anomaly starting, continuing or ending, in stream time (seconds from stream start)."""

    kind: str
    event_id: str
    started_s: float
    peak_score: float
    mean_score: float
    ended_s: float | None = None
    label: str | None = None
    trigger: str | None = None
    """What started the anomaly: `k_of_n` (K of the last N windows above the threshold) or
    `cusum` (evidence integrated over time, possibly from windows all below the threshold)."""
    ended_by: str | None = None
    """On an end: why (one of ENDED_BY)."""


class _OpenEventHolder:
    """What both trackers say about their open event."""

    _event: _OpenEvent | None

    @property
    def active(self) -> bool:
        """True while an event is open (an anomaly, or the current label)."""
        return self._event is not None

    @property
    def event_id(self) -> str | None:
        """Id of the open event, if any."""
        return self._event.event_id if self._event else None


class EventDetector(_OpenEventHolder):
    """An anomaly starts when `k` of the last `n` windows exceed the threshold, or (with a
    `cusum`) when the evidence integrated over time exceeds its h. It ends after `m` consecutive
    windows below the threshold once the CUSUM has also come back to zero (it is held at h while
    the anomaly lasts, so it does within about 2h windows of normal audio). While it lasts an
    `update` is due every `update_s` seconds; after it ends, windows are ignored for
    `cooldown_s` seconds. Without a `cusum` this is K-of-N alone.

    The CUSUM was calibrated beside a window threshold (`calibrated`, by default `threshold`);
    a threshold set above it (`[detector] threshold`, the set_threshold command) raises the
    CUSUM's normal level by the same factor, so raising the threshold to quieten a machine
    quietens both paths, not K of N alone; one set below it leaves the CUSUM at its budget."""

    def __init__(
        self,
        threshold: float,
        k: int = DEFAULT_K,
        n: int = DEFAULT_N,
        m: int = DEFAULT_M,
        update_s: float = 10.0,
        cooldown_s: float = 0.0,
        cusum: Cusum | None = None,
        calibrated: float | None = None,
    ) -> None:
        if not 1 <= k <= n or m < 1:
            raise ValueError(f"need 1 <= k <= n and m >= 1, got k={k} n={n} m={m}")
        self._calibrated_cusum = cusum
        self._calibrated = threshold if calibrated is None else calibrated
        self.cusum = cusum
        self.threshold = threshold
        self.k, self.n, self.m = k, n, m
        self.update_s = update_s
        self.cooldown_s = cooldown_s
        self._recent: deque[tuple[bool, float, float, float]] = deque(maxlen=n)
        self._event: _OpenEvent | None = None
        self._below = 0
        self._quiet_until = float("-inf")
        self.evidence = 0.0
        """The CUSUM statistic S (0 without a cusum)."""
        self._run: _OpenEvent | None = None
        """The windows that raised S since it last left zero: the event if the CUSUM fires."""

    @property
    def threshold(self) -> float:
        """The window threshold in force."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = value
        base = self._calibrated_cusum
        if base is None:
            return
        factor = value / self._calibrated if self._calibrated > 0 else math.nan
        # raised, the CUSUM's normal level rises with it (a user quietening a machine got
        # `cusum` events at the calibrated level); lowered, it stays at its budget: a 20 % lower
        # threshold is a spread or two of the normal log score, and the CUSUM then climbed on
        # normal audio, in an event 36 % of a simulated day (in a review). K of N is the path a
        # lower threshold makes more sensitive.
        moved = math.isfinite(factor) and factor > 1  # then its log is finite and positive
        self.cusum = replace(base, center=base.center + math.log(factor)) if moved else base

    @property
    def label(self) -> str | None:
        """Anomaly events carry no label."""
        return None

    @property
    def state(self) -> str:
        """'anomaly' while an event is open, else 'normal'."""
        return "anomaly" if self._event is not None else "normal"

    def update(self, window: Any, start_s: float, end_s: float) -> list[Transition]:
        """Tracker interface: feed one scored window; return the transitions it causes."""
        t = self.feed(window.score, start_s, end_s)
        return [t] if t is not None else []

    def feed(self, score: float, start_s: float, end_s: float) -> Transition | None:
        """Feed one window's score and its time span; return a transition if one happens."""
        if self._event is None and end_s <= self._quiet_until:
            return None
        above = score > self.threshold
        rising = self._integrate(score, start_s, end_s)
        self._recent.append((above, start_s, end_s, score))
        event = self._event
        if event is None:
            return self._maybe_start(end_s)
        if above or rising:
            event.add(score, end_s)
        self._below = 0 if above else self._below + 1
        if self._below >= self.m and self.evidence == 0.0:
            return self.close("normal")
        if (above or rising) and end_s - event.last_update_s >= self.update_s:
            event.last_update_s = end_s
            return event.transition("update")
        return None

    def _integrate(self, score: float, start_s: float, end_s: float) -> bool:
        """Update the CUSUM; True when this window raised it (with an event open: kept it at
        h, where it is held; a normal window on its way back down counted, and made a 5.5-s
        fault an event of 14 s whose mean was diluted by normal windows, in a review)."""
        if self.cusum is None:
            return False
        step = self.cusum.increment(score)
        self.evidence = max(0.0, self.evidence + step)
        if self._event is not None:
            self.evidence = min(self.evidence, self.cusum.h)
        if self.evidence == 0.0:
            self._run = None
        elif step > 0:
            if self._run is None:
                self._run = _OpenEvent("", start_s, end_s)
            self._run.add(score, end_s)
        if self._event is not None:  # held at h while open: evidence only while it stays there
            return step > 0 and self.evidence >= self.cusum.h
        return step > 0

    def _maybe_start(self, end_s: float) -> Transition | None:
        hits = [(s, e, sc) for a, s, e, sc in self._recent if a]
        if len(hits) >= self.k:
            event = _OpenEvent(uuid.uuid4().hex, hits[0][0], end_s)
            for _, end, sc in hits:
                event.add(sc, end)
            event.trigger = K_OF_N
        elif self.cusum is not None and self._run is not None and self.evidence > self.cusum.h:
            event, self._run = self._run, None
            event.event_id = uuid.uuid4().hex
            event.last_update_s = end_s
            event.trigger = CUSUM
        else:
            return None
        self._event, self._below = event, 0
        if self.cusum is not None:
            self.evidence = min(self.evidence, self.cusum.h)
        return event.transition("start")

    def close(self, reason: str) -> Transition | None:
        """End the open anomaly now, for `reason` (one of ENDED_BY)."""
        event, self._event = self._event, None
        self._recent.clear()
        self._below = 0
        self.evidence, self._run = 0.0, None
        if event is None:
            return None
        self._quiet_until = event.last_above_s + self.cooldown_s
        return event.transition("end", ended_by=reason)


class _OpenEvent:
    """Running statistics of the anomaly in progress."""

    def __init__(self, event_id: str, started_s: float, now_s: float) -> None:
        self.event_id = event_id
        self.started_s = started_s
        self.last_above_s = now_s
        self.last_update_s = now_s
        self.peak = float("-inf")
        self.total = 0.0
        self.count = 0
        self.trigger: str | None = None

    def add(self, score: float, end_s: float) -> None:
        self.peak = max(self.peak, score)
        self.total += score
        self.count += 1
        self.last_above_s = end_s

    def transition(
        self, kind: str, ended_by: str | None = None, label: str | None = None
    ) -> Transition:
        """A start or update (`ended_by` None) or an end, and why it ended."""
        if ended_by is not None and ended_by not in ENDED_BY:
            raise ValueError(f"unknown reason for an end: {ended_by!r}")
        return Transition(
            kind=kind,
            event_id=self.event_id,
            started_s=self.started_s,
            peak_score=self.peak,
            mean_score=self.total / max(self.count, 1),
            ended_s=self.last_above_s if ended_by is not None else None,
            label=label,
            trigger=self.trigger,
            ended_by=ended_by,
        )


HEALTHY_CLASS = "normal"
"""A classifier's class of this name (any case), or beginning with it and a separator (`normal
fast`, `normal-idle`), is the machine running well: no event while it is heard, and every other
class is a fault, but `off` (the machine stopped). In a field review every class was an event,
normal running's too, and the state never said `anomaly`: Home Assistant's anomaly sensor stayed
off while a fault was named, and an automation texted "sounds wrong (normal)"."""
_HEALTHY = re.compile(rf"^{HEALTHY_CLASS}([ ._:+-].*)?$", re.IGNORECASE)


def healthy_classes(labels: list[str]) -> set[str]:
    """The classes that raise no event: with any named `normal` (HEALTHY_CLASS), those and
    `off`; without, none (every class change is news)."""
    normal = {x for x in labels if _HEALTHY.match(x)}
    return normal | {x for x in labels if is_off(x)} if normal else set()


def is_fault(label: str, healthy: Collection[str]) -> bool:
    """Whether a classifier's class is a fault: beside classes that raise no event of their own
    (`healthy_classes`, not empty when one is named `normal`), any other class."""
    return bool(healthy) and label not in healthy


class ClassTracker(_OpenEventHolder):
    """Supervised mode: the machine's state is a class label. A new label takes over when
    `k` of the last `n` confident windows (probability >= `threshold`) agree on it; the old
    label's event ends and the new one's starts. With a class named `normal` (HEALTHY_CLASS)
    the others are faults: it has no event of its own (a fault's ends, `normal`, when it takes
    over) and a fault's event is an anomaly. Without one every class is an event, news rather
    than an anomaly (states such as speeds). While a fault lasts, an `update` is due every
    `update_s` seconds of windows confident of its class, as an anomaly's."""

    def __init__(
        self,
        labels: list[str],
        threshold: float = 0.5,
        k: int = DEFAULT_K,
        n: int = DEFAULT_N,
        update_s: float = 10.0,
    ) -> None:
        if not 1 <= k <= n:
            raise ValueError(f"need 1 <= k <= n, got k={k} n={n}")
        self.labels = labels
        self.threshold = threshold
        self.k, self.n = k, n
        self.update_s = update_s
        # (label if confident else None, start_s, end_s, confidence) of the last n windows
        self._recent: deque[tuple[str | None, float, float, float]] = deque(maxlen=n)
        self._event: _OpenEvent | None = None
        self.label: str | None = None
        self.healthy = healthy_classes(labels)

    @property
    def state(self) -> str:
        """`anomaly` while a fault is named (a class other than `normal`, when there is one);
        else a class change is news, not an anomaly: 'normal'."""
        return "anomaly" if self.healthy and self._event is not None else "normal"

    def update(self, window: Any, start_s: float, end_s: float) -> list[Transition]:
        """Tracker interface: feed one scored window (its top label and probability)."""
        return self.feed(window.score, window.label or "", start_s, end_s)

    def feed(self, confidence: float, label: str, start_s: float, end_s: float) -> list[Transition]:
        """Feed one window's top label and its probability; return end/start on a change.
        A new label's event starts at the first of the windows that voted for it, as an
        anomaly starts at the first of its K windows."""
        confident = confidence >= self.threshold
        self._recent.append((label if confident else None, start_s, end_s, confidence))
        if label == self.label and confident and self._event:
            event = self._event
            event.add(confidence, end_s)
            # a fault's only: a class change of a model without `normal` (a speed) is news
            # that stays open, and sent an update every 10 s for as long (a diff review)
            if not self.healthy or end_s - event.last_update_s < self.update_s:
                return []
            # a fault heard for hours sent its start and nothing more (a review)
            event.last_update_s = end_s
            return [event.transition("update", label=label)]
        votes = [(s, e, c) for x, s, e, c in self._recent if x == label]
        if not confident or len(votes) < self.k or label == self.label:
            return []
        healthy = label in self.healthy
        why = "label_changed" if not healthy else "machine_off" if is_off(label) else "normal"
        ended = [t for t in [self.close(why)] if t is not None]
        if healthy:  # named, with no event of its own
            self.label = label
            self._recent.append((label, start_s, end_s, confidence))
            return ended
        # from its first vote, but not before the class it follows was last heard: windows
        # overlap, and a fault named after another began 0.5 to 1.5 s before the other's end,
        # so their durations added up to more than the audio (a review)
        begun = max([votes[0][0], *(t.ended_s for t in ended if t.ended_s is not None)])
        self._event = _OpenEvent(uuid.uuid4().hex, begun, end_s)
        for _, e, c in votes:
            self._event.add(c, e)
        self.label = label
        self._recent.append((label, start_s, end_s, confidence))
        return [*ended, self._event.transition("start", label=label)]

    def name_on(self, label: str | None) -> None:
        """Go on naming `label`, what another tracker named (before a mute, a reload, a new
        model), if it is a class with no event of its own here (`normal`, `off`); a fault is
        named by none till its K of N windows raise it here. An open event keeps its class."""
        if self._event is None:
            self.label = label if label in self.healthy else None

    def close(self, reason: str) -> Transition | None:
        """End the current label's event, for `reason` (one of ENDED_BY); the votes go with it
        (those from before the machine went off must not name its state after it starts). A
        class with no event of its own (`normal`, `off`) stays named till another is: a mute
        closed it, and a machine named `off` read `running` for the whole mute (a review)."""
        event, self._event = self._event, None
        label = self.label
        if event is not None:
            self.label = None
        self._recent.clear()
        return event.transition("end", ended_by=reason, label=label) if event else None
