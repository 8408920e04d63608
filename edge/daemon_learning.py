"""Learning on site, as a mixin of `edge.daemon.Detector`: the commands that begin, stop and
cancel a commissioning period, mark an event normal and roll back (each answered with its
refit's outcome), the refit at a period's end, and the per-window bookkeeping that feeds a
period and keeps an open event's features for a mark. The work itself (periods, marks,
versions) is `edge.adapt.Adapter`'s; this is the daemon's side of it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.adapt import Adapter, UnwrittenError
from edge.audio_io import stream_audio
from edge.clips import clips_of
from edge.errors import SoundSentryError
from edge.history import lineage
from edge.learning import FEATURIZERS, LearningError
from edge.machine_state import STOP_SECONDS, evidence_stream
from edge.pipeline import Pipeline

if TYPE_CHECKING:
    from collections.abc import Callable

    from edge.adapt import Asker
    from edge.bundle import Bundle
    from edge.pipeline import Step
    from edge.scoring import ScorerTap

log = logging.getLogger("edge.daemon")
"""The daemon's logger: these are its records, and operators and tests select them by it."""

FEATURIZE_BATCH = 256
"""Windows of an evidence clip featurised at once when it is marked normal."""
KEPT_EVENT_WINDOWS = 240
"""Most windows kept per event (2 minutes); the evidence clip, when there is one, is used
instead."""


class SiteLearning:
    """Learning on site for `Detector`, which calls `_new_adapter` and `_auto_learn` when it
    starts and `_keep`, `_learn_unlearnt` and `_finish_learning` from its loop.

    It uses the detector's settings, bundle, pipeline, health, index, notifier and recent
    events; its learning state (`adapter`, `on_learning_end`, `_learning_ends`, `_unlearnt`,
    `_unwritten_tried`, `_featurize`, `_kept`, `_source`, `_threshold`, `muted`,
    `_clip_folder`); and its methods `_load`, `use_bundle`, `close_event`, `emit_state` and
    `_save_state`."""

    def start_learning(self, seconds: float | None = None, asker: Asker | None = None) -> float:
        """Begin a commissioning period of `seconds` of audio (default [learning] seconds);
        no anomaly events until it ends. Returns its length. `asker`: the command that began
        it, answered again when it ends. A period refused changes nothing (an open event goes
        on)."""
        adapter = self._adapter()
        length = seconds or self.settings.learning.seconds
        if not length:
            raise LearningError("give the seconds to learn (no [learning] seconds is set)")
        adapter.check_start(length, self.bundle)
        self.close_event("learning")
        adapter.start(length, self.bundle, asker)
        self.emit_state()
        return length

    def stop_learning(self) -> dict[str, Any]:
        """End the period now and refit with what it collected; the outcome of the refit. With
        no period running, the refit of one that ended on a full card is tried again now."""
        adapter = self._adapter()
        if adapter.period is None and adapter.unwritten is not None:
            return self._finish_learning(raise_errors=True, ended_by="stop", retry=True)
        adapter.check_stop()
        return self._finish_learning(raise_errors=True, ended_by="stop")

    def cancel_learning(self) -> None:
        """Drop the period and what it collected; the model stays, and [learning] seconds
        does not begin the period again at the next start."""
        adapter = self._adapter()
        if not adapter.cancel("cancelled by `learn cancel`"):
            raise LearningError("no learning period is running")
        adapter.decline()
        log.info("learning: cancelled")
        self.emit_state()

    def _new_adapter(self, configured: Bundle) -> Adapter:
        adapter = Adapter(
            self.settings.data_dir,
            self.settings.learning,
            configured,
            self.settings.model,
            self._logic,
            self._runs,
        )
        adapter.on_ended = self._learning_ended
        return adapter

    def answer_learning_ends(self, callback: Callable[[Asker, dict[str, Any]], None]) -> None:
        """Have `callback` told how each period begun by a command ends (`on_learning_end`),
        those that ended before it was set first."""
        self.on_learning_end = callback
        ended, self._learning_ends = self._learning_ends, []
        for asker, outcome in ended:
            callback(asker, outcome)

    def _learning_ended(self, asker: Asker | None, outcome: dict[str, Any]) -> None:
        if asker is None:  # an automatic period: its outcome is in the log, state and status
            return
        if self.on_learning_end is None:
            self._learning_ends.append((asker, outcome))
        else:
            self.on_learning_end(asker, outcome)

    def _logic(self, bundle: Bundle) -> tuple[int, int, int]:
        """K, N and M the event logic runs `bundle` with, under the settings now in force."""
        return self.settings.detector.event_logic(bundle.manifest.threshold.params)

    def _runs(self, bundle: Bundle) -> None:
        """Build `bundle`'s pipeline under the settings now in force, as _load does: raises
        SoundSentryError when they cannot run it (a version whose threshold carries a K above
        the trigger_of set since), so the adapter never picks a model the start then fails on."""
        Pipeline(bundle, self.settings.detector)

    def reconfigure(self, bundle: Bundle) -> None:
        """A new configured model (SIGHUP with another [model]): the version a restart with it
        would run (its site version, when it has one), and its learning as after a restart;
        the versions of the old one stay in the history."""
        if self.adapter is not None:  # a period of another model is dropped (and answered) by
            self.adapter.save_period()  # the new adapter's restore; of the same, it goes on
            self.adapter.save_unwritten()  # one that ended on a full card too (a diff review)
            self.adapter = self._new_adapter(bundle)
            self.adapter.channel = getattr(self._source, "channel", None)
            bundle = self.adapter.restore()
        self.use_bundle(bundle)
        self._auto_learn()
        self.emit_state()

    def mark_normal(self, event_id: str) -> dict[str, Any]:
        """That was normal: the event's windows (its evidence clip when there is one) join
        the site's normal set and the model is refitted. Returns the refit's outcome."""
        adapter = self._adapter()
        eid = self.recent.named(event_id)
        if eid is None:
            raise LearningError("no event to mark: none since the start and no evidence clip")
        raised_by = self.recent.model_of(eid)
        if raised_by is not None and lineage(raised_by) != lineage(self.bundle.model_id):
            # its sound would be learnt into another machine's model (a phone review)
            raise LearningError(
                f"event {eid} was raised by model {raised_by}, not by {self.bundle.model_id} "
                "or a version of it: mark it while that model runs; if this model raises an "
                "event on the same sound, mark that one"
            )
        with self.notifier.busy():  # an hour-long clip's windows take seconds on a Pi
            rows = self._event_rows(eid)  # refused (a kind that cannot learn): the event goes on
            bundle = adapter.mark(eid, rows, self.bundle)
        self._say_override_dropped(adapter)
        out = {"event_id": eid, **(adapter.last_refit or {})}
        if self.pipeline.events.event_id == eid:
            self.close_event("marked_normal")
            # only what was heard so far is learnt: in a field review, a false alarm marked 1 s
            # after its start was learnt from 4 s of sound, and 3 s later the same sound raised
            # another event that lasted half a minute, with nothing said
            p = self.bundle.features
            heard = round((len(rows) - 1) * p.hop_seconds + p.window_samples / p.samplerate, 1)
            open_note = (
                f"the event was still open: about {heard:g} s of its sound was learnt; if the "
                "sound goes on and raises another event, mark that one once it has ended (or "
                "send learn start to learn minutes of it)"
            )
            out["note"] = "; ".join(n for n in (out.get("note"), open_note) if n)
        self._switch(bundle)
        return out

    def rollback(self) -> str:
        """Return to the model version the current one replaced; returns its model id."""
        with self.notifier.busy():
            bundle = self._adapter().rollback()
        self._switch(bundle)
        return bundle.model_id

    @property
    def learning(self) -> bool:
        """True during a commissioning period."""
        return self.adapter is not None and self.adapter.period is not None

    def _adapter(self) -> Adapter:
        if self.adapter is None:
            raise LearningError("learning on site needs the daemon (run or replay)")
        return self.adapter

    def _switch(self, bundle: Bundle) -> None:
        """Use a bundle the adapter made or rolled back to (already in the history)."""
        self.close_event("model_changed")
        self._load(bundle, self.settings, threshold=None)
        self._save_state()
        self.emit_state()

    def _finish_learning(
        self, raise_errors: bool = False, ended_by: str = "itself", retry: bool = False
    ) -> dict[str, Any]:
        """Refit at the end of a period (`retry`: of the one that ended when a full card took
        neither its refit nor its save); a failed refit keeps the running model. The period's
        asker is told, once it has ended (a refit that could not be written keeps it)."""
        adapter = self._adapter()
        asker = adapter.period.asker if adapter.period is not None else None
        self._unwritten_tried = time.monotonic()
        try:
            with self.notifier.busy():  # seconds on a Pi: systemd's watchdog must not fire
                bundle = (
                    adapter.retry_unwritten(self.bundle) if retry else adapter.finish(self.bundle)
                )
        except Exception as exc:  # whatever went wrong, the running model goes on detecting
            reason = " ".join(str(exc).split())
            if not isinstance(exc, (SoundSentryError, OSError)):  # a bug: its traceback
                reason = f"{type(exc).__name__}: {reason}"
                log.exception("learning: refit failed")
            log.error("learning: refit failed, keeping %s: %s", self.bundle.model_id, reason)
            adapter.last_refit = {"reason": "learning", "error": reason}
            self.emit_state()
            # Refused by its data, the period has ended. A refit that could not be written
            # keeps it: in memory, it goes on and is answered when it ends; saved for the next
            # start, it is answered now (the error says so), and that refit is not again.
            if not isinstance(exc, UnwrittenError) or adapter.period is None:
                self._learning_ended(asker, {**adapter.last_refit, "ended_by": ended_by})
                if isinstance(exc, UnwrittenError):
                    adapter.saved_period_answered()
            if raise_errors:
                raise LearningError(
                    f"refit failed, keeping {self.bundle.model_id}: {reason}"
                ) from None
            return adapter.last_refit
        self._say_override_dropped(adapter)
        self._switch(bundle)
        self._learning_ended(asker, {**(adapter.last_refit or {}), "ended_by": ended_by})
        return adapter.last_refit or {}

    def _say_override_dropped(self, adapter: Adapter) -> None:
        """A refit's new version runs at its own threshold: one set by command is dropped with
        the model it was set on. The reply said "threshold 2.507 -> 2.667" where 3.5, set by
        the operator, had been in force, and the device became more sensitive than they had set
        it without a word (a walk-through). Its note says so."""
        if self._threshold is None or adapter.last_refit is None:
            return
        dropped = (
            f"the threshold {self._threshold:.6g} set by command was for the model before and "
            "is dropped: the new version runs at its own; set it again if it is still wanted"
        )
        note = adapter.last_refit.get("note")
        adapter.last_refit["note"] = f"{note}; {dropped}" if note else dropped

    def _event_rows(self, eid: str) -> np.ndarray:
        """The features of an event's windows: from its evidence clip if there is one, else
        the windows kept while it lasted."""
        if self._featurize is None:  # "a embedding model cannot learn on site" said no more
            kind = self.bundle.manifest.kind
            raise LearningError(
                f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} model cannot learn on site (only "
                f"{' and '.join(FEATURIZERS)} models do): raise its threshold (set_threshold) "
                "if this sound is normal, or train it again with recordings that hold it"
            )
        kept = self._kept.get(eid, {})
        folder = self._clip_folder
        clip = None
        if folder is not None:
            named = folder / kept["clip"] if kept.get("clip") else None
            found = clips_of(folder, eid)
            clip = named if named and named.is_file() else (found[-1] if found else None)
        if clip is not None:
            # the windows the device takes as evidence, as training, a period and calibrate
            # keep them: 0.1 s of zeros in a marked clip had lifted the threshold fourfold,
            # and a fault ending in a stop taught the model the machine's coast-down
            # read and featurised a block at a time: an hour-long clip is 230 MB of audio
            windows = evidence_stream(
                stream_audio(clip, self.bundle.features.samplerate),
                self.bundle.features,
                self.pipeline.machine.off_below_dbfs,
                self.pipeline.namer,
            )
            rows = []
            while batch := list(itertools.islice(windows, FEATURIZE_BATCH)):
                rows.append(self._featurize(np.stack(batch)))
            if rows:
                return np.concatenate(rows)
        rows = kept.get("rows", [])
        if not rows and not self.recent.known(eid):  # a mistyped id read as one whose clip was gone
            raise LearningError(
                f"no event {eid} is known here (not recent, not in the event log, no clip): "
                "`soundsentry events` lists the events with the names mark_normal takes"
            )
        if not rows:
            # with clips off an older event cannot be marked: said with what can be done
            raise LearningError(
                f"no windows of event {eid} are kept (no clip, not recent): mark an event "
                'while its windows are kept, or {"command": "learn", "action": "start"} learns '
                "the machine's normal sound as a whole"
            )
        return np.stack(rows)

    def _keep(self, step: Step, tap: ScorerTap, end_s: float) -> None:
        """Per window: the anomaly index, and features for the period or the open event; only
        of windows the event logic takes as evidence (a machine's start-up, its coasting to a
        stop and the room while it is off had set the learnt threshold's floor: in a review,
        3-s stops in a learning period raised it from 1.63 to 5.35). A period learns a window
        STOP_SECONDS after it, unless the machine has gone quiet since: the stop began in it.
        `end_s`: the window's end in the time of the whole run, which a reload or refit (a new
        pipeline, its own time from 0) does not set back."""
        if step.quieting:
            self._unlearnt = deque(u for u in self._unlearnt if u[0] <= end_s - STOP_SECONDS)
        self._learn_unlearnt(end_s)
        if not step.evidence or not self.health.ok:
            self.index.skip()
            return
        self.index.add(step.window.score)
        eid = self.pipeline.events.event_id
        # a mute pauses the period: maintenance (grinding, a machine opened up) is not normal
        period = self.adapter.period if self.adapter is not None and not self.muted else None
        if self._featurize is None or not (eid or period) or step.window.start not in tap.windows:
            return
        row = self._featurize(tap.windows[step.window.start])
        kept = self._kept.get(eid) if eid else None
        if kept is not None and len(kept["rows"]) < KEPT_EVENT_WINDOWS:
            kept["rows"].append(row)
        if period is not None:
            self._unlearnt.append((end_s, row, period))

    def _learn_unlearnt(self, now_s: float) -> None:
        """Feed the period the windows that ended STOP_SECONDS before `now_s` (the run's time);
        those of a period that has ended since are dropped."""
        while self._unlearnt and self._unlearnt[0][0] <= now_s - STOP_SECONDS:
            _, row, period = self._unlearnt.popleft()
            if self.adapter is None or self.adapter.period is not period or self.muted:
                continue
            if self.adapter.observe(row):
                self._finish_learning()

    def _auto_learn(self) -> None:
        """[learning] seconds: a period at the first start of a configured model."""
        a, seconds = self.adapter, self.settings.learning.seconds
        if a is None or not seconds or a.period is not None:
            return
        if a.learned:  # said: a setting that starts nothing, silently, puzzled a field review
            log.info(
                "learning: [learning] seconds begins no period: %s's period has ended before "
                '(rolled back or not); {"command": "learn", "action": "start"} learns again',
                a.configured.model_id,
            )
            return
        try:
            a.start(seconds, self.bundle)
        except LearningError as exc:
            log.warning("learning: not started: %s", exc)

    def marks_learnt(self) -> bool:
        """Whether mark_normal can be learnt now: a model that learns on site, with the data
        folder's learning (not a replay without `--config`), and audio to back the refit's
        threshold (`Adapter.marks_learnt`)."""
        return (
            self._featurize is not None and self.adapter is not None and self.adapter.marks_learnt()
        )
