"""What a person at a terminal sees: the live line of `run` (level, score against the
threshold, state), events printed above it, and the one-line summary that ends `replay`."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import TextIO

from edge.machine_state import RUNNING
from edge.messages import EventMessage, StateMessage
from edge.pipeline import Step
from edge.sink import Sink

BAR_WIDTH = 20
BAR_FULL_SCALE = 2.0
"""The bar spans 0 .. 2x the threshold; `|` marks the threshold."""
CLEAR = "\r\033[K"
"""Carriage return and erase to the end of the line."""


def score_bar(score: float, threshold: float) -> str:
    """`[#####     |         ]`: the score as a bar, the threshold at its middle."""
    filled = max(0, min(BAR_WIDTH, int(score / (threshold * BAR_FULL_SCALE) * BAR_WIDTH)))
    mark = int(BAR_WIDTH / BAR_FULL_SCALE)
    cells = ("|" if i == mark else ("#" if i < filled else " ") for i in range(BAR_WIDTH))
    return "[" + "".join(cells) + "]"


class LiveLine(Sink):
    """One line on a terminal, redrawn every window; events are printed above it as JSON
    lines and log records clear it first (see `clear_before_logs`)."""

    def __init__(self, stream: TextIO, threshold: float) -> None:
        self.stream = stream
        self.threshold = threshold
        self.state_name = "starting"
        self._text = ""

    def step(self, step: Step) -> None:
        """A window was scored: redraw with its level and score."""
        score = step.window.score
        machine = "" if step.machine == "running" else f"  machine {step.machine}"
        machine += "  (silent or flat input: not judged)" if step.dead else ""
        self._text = (
            f"level {step.level_dbfs:6.1f} dBFS  score {score:8.4g} / {self.threshold:.4g} "
            f"{score_bar(score, self.threshold)}  {self.state_name}{machine}"
        )
        self._draw()

    def state(self, message: StateMessage) -> None:
        """The state or threshold changed (or its periodic repeat)."""
        self.state_name = message.state
        self.threshold = message.threshold

    def event(self, message: EventMessage) -> None:
        """Print the event as a JSON line above the live line."""
        self.clear()
        self.stream.write(json.dumps(message.to_dict()) + "\n")
        self._draw()

    def clear(self) -> None:
        """Erase the live line (before anything else is written to the terminal)."""
        if self._text:
            self.stream.write(CLEAR)
            self.stream.flush()

    def _draw(self) -> None:
        self.stream.write(CLEAR + self._text)
        self.stream.flush()


class _ClearLine(logging.Filter):
    def __init__(self, clear: Callable[[], None]) -> None:
        super().__init__()
        self.clear = clear

    def filter(self, record: logging.LogRecord) -> bool:
        self.clear()
        return True


def clear_before_logs(line: LiveLine) -> None:
    """Make every root log handler erase the live line before it writes a record."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ClearLine(line.clear))


@contextlib.contextmanager
def logs_clear(stream: TextIO) -> Iterator[None]:
    """While the body runs, every root log handler erases the line being drawn on `stream`, a
    terminal (`record`'s progress), before it writes a record; elsewhere nothing changes."""
    if not getattr(stream, "isatty", lambda: False)():
        yield
        return

    def clear() -> None:
        with contextlib.suppress(OSError, ValueError):  # the terminal closed: log on without it
            stream.write(CLEAR)
            stream.flush()

    erase, handlers = _ClearLine(clear), list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(erase)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(erase)


class ReplayLines(Sink):
    """`replay`'s events as JSON lines, each as the daemon publishes it plus the file it began in
    (`file`) and its own position in that file (`file_offset_s`: of the start, or of the end), so
    a folder of clips tells which clip raised what."""

    def __init__(self, locate: Callable[[float], tuple[object, float]], stream: TextIO) -> None:
        self.locate = locate
        self.stream = stream
        self._began: dict[str, tuple[object, float, float]] = {}
        """Open events: the file each began in, its position there and in the stream."""

    def event(self, message: EventMessage) -> None:
        data = message.to_dict()
        at = data.get("stream_offset_s")  # None: an `interrupted` end (its end was not heard)
        if at is not None:
            began = self._began.get(message.event_id)
            if began is None:  # a start (or an event begun before this replay: from its length)
                start_s = at - (data.get("duration_s") or 0.0) if data["type"] == "end" else at
                began = (*self.locate(start_s), start_s)
                self._began[message.event_id] = began
            path, offset, start_s = began
            data |= {"file": str(path), "file_offset_s": round(offset + at - start_s, 3)}
        if data["type"] == "end":
            self._began.pop(message.event_id, None)
        self.stream.write(json.dumps(data) + "\n")
        self.stream.flush()


class ReplaySummary(Sink):
    """Counts windows and events and keeps the highest score, for the line ending `replay`."""

    def __init__(self) -> None:
        self.windows = 0
        self.off = 0
        self.unjudged = 0
        """Windows of the machine running but starting up or going quiet (not evidence)."""
        self.events = 0
        self.integrated = 0
        self.highest: float | None = None
        self.highest_heeded: float | None = None
        """The highest score of the windows that could raise an event (none held off)."""
        self.classes = False
        """The windows were a classifier's: its score is the named class's probability."""
        self.threshold: float | None = None
        """The threshold in force at the last window (a sink's `window` says it)."""
        self.model: str | None = None
        """The model in force, as the state messages name it."""
        self.events_since = 0
        """Events started since the model or its threshold last changed."""
        self.new_model = False
        """A state named a new model since the last window: the highest scores start again at
        the next one (a refit as the replay ended leaves them as they are, the old model's)."""
        self.changed = False
        """The model or its threshold changed during the replay: the highest score is of the
        windows since (a mark, a learning period or a rollback swapped the model, and a score
        of the one before was set against the new one's threshold, in a walk-through)."""

    def step(self, step: Step) -> None:
        """Count a window; only those the event logic takes as evidence set the highest score
        (not silent or flat ones, the machine off, starting up or going quiet: a machine's
        run-up had the line report a score above the threshold with no event)."""
        if self.new_model:
            self._start_again()
        self.windows += 1
        if step.machine != RUNNING:  # the pipeline's own rule: such windows raise no event
            self.off += 1
            return
        if not step.evidence:
            self.unjudged += not step.dead
            return
        self._score(step)

    def window(self, step: Step, threshold: float) -> None:
        """The threshold the window was scored against: when it changes, the highest scores
        start again from this window (`step` counted it against the one before)."""
        if self.threshold is not None and threshold != self.threshold:
            self._start_again()
            if step.machine == RUNNING and step.evidence:
                self._score(step)
        self.threshold = threshold

    def state(self, message: StateMessage) -> None:
        """A new model (a mark, a period's refit, a rollback; with a `[detector] threshold`
        every model has the one threshold): the highest scores start again at its first
        window."""
        if self.model is not None and message.model != self.model:
            self.new_model = True
        self.model = message.model

    def _start_again(self) -> None:
        self.changed, self.new_model = True, False
        self.highest = self.highest_heeded = None
        self.events_since = 0

    def _score(self, step: Step) -> None:
        self.classes = self.classes or step.window.label is not None
        score = step.score
        if score is not None:
            self.highest = score if self.highest is None else max(self.highest, score)
            if not step.held:
                h = self.highest_heeded
                self.highest_heeded = score if h is None else max(h, score)

    def event(self, message: EventMessage) -> None:
        """Count anomalies by their start."""
        if message.type == "start":
            self.events += 1
            self.events_since += 1
            self.integrated += message.trigger == "cusum"

    def line(self, files: int, threshold: float) -> str:
        """`replay: 2 file(s), 62 windows, 1 event, highest score 2.76 vs threshold 1.87 ...`;
        `threshold`: the one in force at the end, which the scores are set against unless it
        came after the last window (a refit as the replay ended)."""
        since = " since the model or its threshold last changed" if self.changed else ""
        late = self.threshold is not None and threshold != self.threshold
        if (self.new_model or late) and self.highest is not None:  # changed after the last window
            since = " of the model before" if self.new_model else " before the threshold changed"
            threshold = self.threshold if self.threshold is not None else threshold
        if self.highest is None:
            peak = (  # "23 windows, ..., no window scored" read as a contradiction
                f"none judged{since} (silent or flat, the machine off, or a start-up)"
                if self.windows
                else "the audio is shorter than one window"
            )
        elif self.classes:  # the probability of whichever class, `normal` too: no verdict
            peak = (
                f"highest class probability{since} {self.highest:.4g} (threshold {threshold:.4g})"
            )
        else:
            side = "above" if self.highest > threshold else "below"
            heeded, raised = self.highest_heeded, self.events_since
            if side == "above" and not raised and (heeded is None or heeded <= threshold):
                side = "above while events were held off: a learning period, or a mute"
            elif side == "above" and not raised:  # "(above)" beside "0 events": a review
                side = "above in passing: an event needs K of N windows above it, or a lasting rise"
            peak = f"highest score{since} {self.highest:.4g} vs threshold {threshold:.4g} ({side})"
        if self.off:
            peak += f"; the machine off in {self.off} of them"
        if self.unjudged:
            peak += (
                f"; {self.unjudged} not judged (a start-up, a stop, a change of state, or sound "
                "back after a gap)"
            )
        events = f"{self.events} event{'' if self.events == 1 else 's'}"
        if self.integrated:  # their windows can all lie below the threshold: say why
            events += f" ({self.integrated} from evidence over time)"
        return f"replay: {files} file(s), {self.windows} windows, {events}, {peak}"
