"""The daemon loop: audio blocks -> pipeline -> events, with the liveness watchdog, evidence
clips, periodic state and metrics, remote commands and systemd notifications.

Everything runs on one thread: MQTT callbacks and signal handlers only enqueue work, which
the loop executes between blocks, so no state is shared across threads.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from edge.adapt import UNWRITTEN_RETRY_S, Asker, Period
from edge.bundle import Bundle
from edge.clips import clip_keeper, clip_recorder
from edge.clock import believable
from edge.commands import ReplyTo, threshold_bounds
from edge.daemon_learning import FEATURIZE_BATCH as FEATURIZE_BATCH  # for bench/site_memory.py
from edge.daemon_learning import SiteLearning
from edge.eventlog import RecentEvents
from edge.events import ClassTracker, Transition, is_fault
from edge.health import INVALID, AudioHealth, HealthChange
from edge.learning import FEATURIZERS
from edge.machine_state import (
    HYSTERESIS_DB,
    OFF,
    RUNNING,
    SWITCH_VOTES,
    RunningTime,
    is_off,
)
from edge.messages import (
    EventMessage,
    HealthMessage,
    MetricsMessage,
    ResponseMessage,
    StateMessage,
    iso,
)
from edge.metrics import AnomalyIndex, Metrics, cpu_temperature_c, throttled
from edge.persist import DeviceState, SavedMute
from edge.pipeline import Pipeline, Step
from edge.scoring import Explainer, ScorerTap
from edge.sdnotify import SystemdNotifier
from edge.settings import Settings
from edge.sink import MqttSink, Sink
from edge.sources import AudioGap, NewStream

log = logging.getLogger(__name__)

NEAR_OFF_SAY_S = 60.0
"""The machine heard running near its off level this long (no window judged) is said in the
log: longer than a coast down or a quiet spell of a running machine."""
JUDGED_RESET_S = 10.0
"""Judged windows this long in a row end such a spell (a few between near-off ones do not)."""

RUNNING_SAVE_S = 600.0
"""Running time between saves of the running hours to state.json (and at every stop); and
time between saves while a mute runs, so a restart on a clock behind the mute's start, which
has only the saved count to go by, mutes at most this much longer than was left."""
WORK_QUEUE_MAX = 64
"""Commands and reloads waiting for the loop; beyond this a flood is shed and counted."""
WORK_PER_TICK = 8
"""Most queued commands run between two audio blocks, so a flood never stalls the audio."""
CLOCK_SLACK_S = 2.0
"""How far the clock and a paced source's sample time may part, beyond what its capture queue
holds, before event times follow the clock again."""
CLOCK_JUMP_S = 60.0
"""A parting this large is a jump of the clock (logged as a warning; smaller ones as info)."""
_ENDED = object()
"""What `next` gives for a source that has ended (run()'s look ahead at a stop)."""
STATE_RETRY_S = 60.0
"""How soon a state.json save that failed (a full card) is tried again."""


def _say_overrides(bundle: Bundle, settings: Settings) -> None:
    """[detector] threshold and off_below_dbfs take precedence over the bundle's calibrated
    values: a calibration or a learnt version then changes less than its summary says."""
    d, machine = settings.detector, bundle.manifest.machine
    if d.threshold is not None and d.threshold != bundle.threshold:
        log.info("[detector] threshold %g is used, not %s's calibrated %.4g",
                 d.threshold, bundle.model_id, bundle.threshold)  # fmt: skip
    trained = machine.off_below_dbfs if machine is not None else None
    if d.off_below_dbfs is not None and trained is not None and d.off_below_dbfs != trained:
        log.info("[detector] off_below_dbfs %g is used, not %s's %.1f dBFS",
                 d.off_below_dbfs, bundle.model_id, trained)  # fmt: skip


class Detector(SiteLearning):
    """Runs the pipeline over a source of blocks (None = no audio yet, a tick).

    With `persist`, remote changes survive a restart (edge.persist) and the model learns on
    site (edge.adapt): a commissioning period, events marked normal, versions and rollback."""

    def __init__(
        self,
        settings: Settings,
        bundle: Bundle,
        sinks: Iterable[Sink],
        on_step: Callable[[Step], None] | None = None,
        clock: Callable[[], float] = time.time,
        notifier: SystemdNotifier | None = None,
        spool_stats: Callable[[], tuple[int, int]] | None = None,
        persist: bool = False,
        live: bool = True,
    ) -> None:
        self._init_wiring(settings, sinks, on_step, clock, notifier, live)
        self._init_work(spool_stats)
        self._init_mute()
        self._init_run(clock)
        self._init_running()
        self._init_evidence(settings, bundle, live)
        self._init_learning(settings, bundle, persist, live)
        # restore() resumes a saved period too, checked against the version it chose (a period
        # begun on a bundle loaded by reload_model is that bundle's, not the configured one's)
        self._load(self.adapter.restore() if self.adapter else bundle, named_on=False)
        self._restore_state()
        self._auto_learn()
        if not live and self.adapter is not None and self.adapter.period is not None:
            self._warn_replay_learns(self.adapter.period)

    def _init_wiring(
        self,
        settings: Settings,
        sinks: Iterable[Sink],
        on_step: Callable[[Step], None] | None,
        clock: Callable[[], float],
        notifier: SystemdNotifier | None,
        live: bool,
    ) -> None:
        """The settings, where results go (sinks, on_step, systemd, metrics) and the clocks."""
        self.settings = settings
        self.live = live
        """The device's own daemon (`run`): its running hours count the running time heard, and
        a bundle that cannot tell the machine off is warned of. Not a replay."""
        self.sinks = tuple(sinks)
        self._failing: set[tuple[int, str]] = set()
        self._paced, self._slack_s = False, CLOCK_SLACK_S  # run() reads them off its source
        self._wall_offset = clock() - time.monotonic()
        """The wall clock minus the monotonic one: it changes only when the clock is set."""
        self.on_step = on_step
        self.clock = clock
        self.notifier = notifier or SystemdNotifier()
        self.metrics = Metrics()

    def _init_work(self, spool_stats: Callable[[], tuple[int, int]] | None) -> None:
        """The work queue and signals' work for the loop, and the source's and spool's counts."""
        self._work: queue.Queue[Callable[[], None]] = queue.Queue(WORK_QUEUE_MAX)
        self._signalled: deque[Callable[[], None]] = deque(maxlen=WORK_QUEUE_MAX)
        """Work from signal handlers: a deque's append takes no lock, the queue's put does, and
        a handler runs on this thread, perhaps while it holds that very lock in run_pending."""
        self.commands_shed = 0
        self.source_stats: Callable[[], dict[str, int]] = dict
        self._source: object = None
        self.spool_stats: Callable[[], tuple[int, int]] = spool_stats or (lambda: (0, 0))

    def _init_mute(self) -> None:
        """No mute running."""
        self._mute_end = 0.0
        """When the running mute ends on the monotonic clock, 0 if none runs."""
        self._mute = SavedMute(0.0, 0.0)
        """The running mute's start (wall clock) and length, as state.json keeps them."""
        self._mute_dated_here = False
        """The mute's start was read off this run's clock (not restored): a clock set later
        (NTP after a boot without a real-time clock) moves it too."""

    def _init_run(self, clock: Callable[[], float]) -> None:
        """The run's state: its stop, the samples and blocks heard and when, what systemd and
        the last state message were told, the last score and machine state."""
        self._threshold: float | None = None
        self._stop = threading.Event()
        self._label_said: str | None = None
        """The classifier's label the last state message carried."""
        self.cut_short = False
        """A replay's run() ended at stop() (SIGTERM, SIGINT) before its source did (a stop that
        comes as the source ends, or while open events are closed and the broker is flushed,
        does not)."""
        self._samples = 0
        self._origin = clock()
        self._last_block = time.monotonic()
        self._first_block = True
        self._last_window = float("-inf")
        self._next_state = self._next_metrics = 0.0
        self._ready = False
        self._status = ""
        """The STATUS line systemd last heard."""
        self._status_detail: str | None = None
        """Why the input last stalled, for STATUS."""
        self._last_score: float | None = None
        self._machine: str | None = None  # unknown until a window is heard

    def _init_running(self) -> None:
        """The running time heard and its saves, spells near the off level, the band levels."""
        self.running = RunningTime()  # counted while live: what the microphone heard
        self._running_saved = 0.0
        self._saved_at = time.monotonic()
        self._unwritten_tried = time.monotonic()
        """When the refit of a period a full card kept in memory was last tried."""
        self._near_off_s = 0.0
        """Seconds of the machine heard running within HYSTERESIS_DB of its off level (no
        window judged) since JUDGED_RESET_S were last judged in a row; said at NEAR_OFF_SAY_S."""
        self._judged_s = 0.0
        """Seconds of windows judged in a row."""
        self._band_sum: np.ndarray | None = None
        self._band_n = 0

    def _init_evidence(self, settings: Settings, bundle: Bundle, live: bool) -> None:
        """The audio's health, the evidence clips and the recent events."""
        self.clip_url: Callable[[str], str | None] | None = None
        """Gives the URL a clip is served at (set when the dashboard runs)."""
        rate = bundle.features.samplerate
        h = settings.health
        self.health = AudioHealth(rate, h.fault_seconds, h.clip_fraction)
        self.clips = clip_recorder(settings, rate)
        self._clip_keeper = clip_keeper(settings, rate) if live else None
        self.recent = RecentEvents(lambda: self.settings, lambda: self._clip_folder)
        self._kept = self.recent.kept
        self._finishing = False
        """In `finish`: the event it ends sends no state of its own (`stopped` follows)."""

    def _init_learning(self, settings: Settings, bundle: Bundle, persist: bool, live: bool) -> None:
        """The learning side: windows not yet learnt, state.json and the adapter (`persist`)."""
        self._unlearnt: deque[tuple[float, np.ndarray, object]] = deque()
        """A learning period's windows (end, features, period) of the last STOP_SECONDS, learnt
        only once the machine has not gone quiet after them (training's rule)."""
        self.state = DeviceState(settings.data_dir, settings.device_id, live) if persist else None
        self.on_learning_end: Callable[[Asker, dict[str, Any]], None] | None = None
        """Told how a period begun by a command ended, with its asker: the refit's summary (or
        `error`) and `ended_by` (`itself`, `stop`), or `dropped` and why (replaced, cancelled,
        another model in use, a saved one that could not resume). The controller answers the
        `learn start` with it; what comes before it is set is kept for it
        (`answer_learning_ends`: a saved period dropped or ended at the start)."""
        self._learning_ends: list[tuple[Asker, dict[str, Any]]] = []
        self.adapter = self._new_adapter(bundle) if persist else None

    def _warn_replay_learns(self, p: Period) -> None:
        """A replay whose config begins or resumes a period learns the files: said as it starts."""
        # six fault recordings replayed with the device's config went into its period
        # with a line at INFO, events held off (an operator's review); one the replay
        # begins ([learning] seconds) is saved for the device's next start too (a review)
        log.warning(
            "learning: the files go into a commissioning period of %s (%.0f of %g s heard): "
            "they are learnt as the machine's normal sound and raise no event (a config of "
            "the replay's own keeps them out of a device's)",
            self.settings.data_dir,
            p.collected_s,
            p.target_s,
        )

    # --- model -----------------------------------------------------------------------------

    def use_bundle(self, bundle: Bundle, reason: str | None = None) -> None:
        """Switch to a (validated) bundle; an open anomaly is ended first and a threshold
        set by command is dropped (it belonged to the old model). With a `reason` (reload,
        calibrate) the switch is recorded in the model history."""
        self._load(bundle, self.settings, threshold=None, close="model_changed")
        if self.adapter is not None and reason is not None:
            self.adapter.model_changed(bundle)
            try:
                self.adapter.switched(bundle, reason)
            except OSError as exc:  # the switch stands; only its record is missing
                log.error("could not record %s in the model history: %s", bundle.model_id, exc)
        self._save_state()
        self.emit_state()

    def apply_settings(self, settings: Settings, bundle: Bundle | None = None) -> None:
        """Take new settings (reload): new detector settings rebuild the pipeline (an open
        anomaly ends; settings it cannot take raise and change nothing), [health] and [clips]
        apply at once. Unchanged detector settings keep the pipeline and an open anomaly.
        `bundle`: the model that comes with them (SIGHUP with another [model]): they are checked
        against it, not the running one, and the caller switches to it (`reconfigure`). They
        were checked against the running one, and [detector] settings only the new model could
        take (its K of N) were refused with it."""
        if bundle is not None:
            Pipeline(bundle, settings.detector)  # settings it cannot take raise: nothing changes
            self.settings = settings
        elif settings.detector != self.settings.detector:
            threshold = self._threshold
            if threshold is not None:  # kept as a restart keeps it: within the new bounds
                low, high = self.threshold_bounds(settings)
                if not low <= threshold <= high:
                    log.warning(
                        "threshold %.6g set by command dropped: the new [detector] settings "
                        "allow %.6g to %.6g",
                        threshold,
                        low,
                        high,
                    )
                    threshold = None
            self._load(self.bundle, settings, threshold, close="settings_changed")
        else:
            self.settings = settings
        h, c = settings.health, settings.clips  # faults in progress and the ring are kept
        self.health.fault_seconds, self.health.clip_fraction = h.fault_seconds, h.clip_fraction
        before = self.clips or self._clip_keeper
        if self.clips and c.enabled:
            self.clips.configure(c.preroll_seconds, c.max_seconds, c.max_total_mb, c.max_age_days)
        else:
            self.clips = clip_recorder(settings, self._rate, self._samples)
        self._clip_keeper = clip_keeper(settings, self._rate) if self.live else None
        after = self.clips or self._clip_keeper
        if before is not None and after is not None and after is not before:
            after.written_before(before)  # this run's clips keep their ages (a review)
        interval = settings.state_interval_seconds  # the next state is due by it at the latest
        self._next_state = min(self._next_state, time.monotonic() + interval)

    def _load(
        self,
        bundle: Bundle,
        settings: Settings | None = None,
        threshold: float | None = None,
        close: str | None = None,
        named_on: bool = True,
    ) -> None:
        """Build the pipeline and explainer of a bundle; stream time restarts at this sample.
        Nothing changes if the pipeline cannot be built (the running model stays whole, and
        an open anomaly goes on); once it is, an open anomaly ends for `close`. `named_on`: the
        same stream goes on (`Pipeline.named_on`), not at the start or a new stream."""
        settings = settings or self.settings
        pipeline = Pipeline(bundle, settings.detector)
        if close is not None:
            self.close_event(close)
        if self.live and not pipeline.tells_off:
            why, fix = (
                ("a classifier's bundle", "")
                if bundle.manifest.kind == "classifier"
                else ("a bundle from before it did", "`soundsentry calibrate` adds it, or ")
            )
            log.warning(
                "%s records no running level (%s): a machine switched off is not recognised as "
                "off; %sset [detector] off_below_dbfs", bundle.model_id, why, fix,
            )  # fmt: skip
        if self.live:
            _say_overrides(bundle, settings)
        if named_on:
            pipeline.named_on(self.pipeline)
        self.bundle, self.pipeline, self.settings = bundle, pipeline, settings
        self.running.restart()  # its machine state starts afresh: no vote to credit
        self._threshold = threshold
        if threshold is not None:
            pipeline.events.threshold = threshold
        self.explainer = Explainer(bundle)
        self._band_sum, self._band_n = None, 0
        self._base = self._samples
        self._tap = ScorerTap(pipeline.scorer)
        pipeline.scorer = self._tap  # type: ignore[assignment]
        self._featurize = FEATURIZERS.get(bundle.manifest.kind)
        self.index = AnomalyIndex(bundle.manifest.normal_scores.p50, bundle.features.hop_seconds)

    # --- remote control --------------------------------------------------------------------

    def mute(self, minutes: float) -> float:
        """Silence anomaly events for `minutes`; an open anomaly ends. Returns the end time."""
        self.close_event("muted")
        self.muted_until = self.clock() + minutes * 60
        self._save_state()
        self.emit_state()
        return self.muted_until

    def unmute(self) -> None:
        """End a mute now."""
        self.muted_until = 0.0
        self.pipeline.heed()  # a class named while muted is the one the state names
        self._save_state()
        self.emit_state()

    def set_threshold(self, value: float) -> None:
        """Use `value` as the threshold until another model is loaded."""
        self._threshold = value
        self.pipeline.events.threshold = value
        self._save_state()
        self.emit_state()

    @property
    def threshold(self) -> float:
        """The threshold in force."""
        return self.pipeline.threshold

    def threshold_bounds(self, settings: Settings | None = None) -> tuple[float, float]:
        """The thresholds set_threshold accepts for the running model and settings (or these)."""
        return threshold_bounds(
            self.bundle.threshold,
            self.bundle.manifest.kind == "classifier",
            (settings or self.settings).detector.threshold,
        )

    # --- saved state, queued work, status --------------------------------------------------

    def _restore_state(self) -> None:
        """A threshold set by command for this model and a mute still running, from data_dir.
        Said at WARNING in a replay (whose log shows warnings only): a replay with a device's
        config that took on its mute raised no event while its summary showed windows above the
        threshold, and one that took on its threshold raised fewer (in a review)."""
        if self.state is None:
            return
        level = logging.INFO if self.live else logging.WARNING
        value = self.state.threshold_for(self.bundle.model_id)
        low, high = self.threshold_bounds()  # as set_threshold accepted it
        if value is not None and low <= value <= high:
            self._threshold = value
            self.pipeline.events.threshold = value
            log.log(level, "threshold %.6g restored (set by command)", value)
        mute = self.state.restored_mute(self.clock())
        if mute is not None:  # at most what was left of its length (edge.persist)
            self._mute, self._mute_end = mute, time.monotonic() + mute.seconds - mute.ran
            log.log(level, "mute restored, until %s: no events until then", iso(self.muted_until))
        self.running.seconds = max(self.running.seconds, self.state.running_seconds)

    def _save_state(self) -> None:
        if self.state is not None:
            left = self._mute_end - time.monotonic() if self._mute_end else 0.0
            self._clock_set()  # a mute begun before NTP set the clock is dated by it
            m = self._mute
            mute = SavedMute(m.started, m.seconds, m.seconds - left) if left > 0 else None
            self.state.save(self.bundle.model_id, self._threshold, mute, self.running.seconds)
            self._running_saved = self.running.seconds
        self._saved_at = time.monotonic()

    def submit(self, work: Callable[[], None]) -> bool:
        """From any thread: queue work for the loop. A full queue sheds it (counted)."""
        try:
            self._work.put_nowait(work)
            return True
        except queue.Full:
            self.commands_shed += 1
            if self.commands_shed == 1 or self.commands_shed % 100 == 0:
                log.warning("command queue full: %d command(s) shed so far", self.commands_shed)
            return False

    def work_waiting(self) -> int:
        """How many queued items wait for the loop."""
        return self._work.qsize() + len(self._signalled)

    def submit_from_signal(self, work: Callable[[], None]) -> None:
        """From a signal handler: queue work for the loop without taking a lock."""
        self._signalled.append(work)

    def run_pending(self, limit: int = WORK_PER_TICK) -> int:
        """Run up to `limit` queued items on this thread (signals' first); a failing item is
        logged, not raised."""
        done = 0
        while done < limit:
            try:
                work = self._signalled.popleft() if self._signalled else self._work.get_nowait()
            except queue.Empty:
                break
            done += 1
            try:
                work()
            except Exception as exc:  # one bad command must never stop the monitor
                log.error("command failed: %s: %s", type(exc).__name__, " ".join(str(exc).split()))
        return done

    def status(self) -> dict[str, Any]:
        """A status report."""
        depth, dropped = self.spool_stats()
        return {
            "state": self.current_state(),
            "model": self.bundle.model_id,
            # as the state message rounds it: a SCADA mapper saw 1.8726604335196857 and 1.87266
            "threshold": round(self.threshold, 6),
            "calibrated_threshold": round(self.bundle.threshold, 6),
            "muted_until": iso(self.muted_until) if self.muted else None,
            "faults": sorted(self.health.active),
            "windows_scored": self.metrics.windows,
            "uptime_s": round(self.metrics.uptime_s, 1),
            "spool_depth": depth,
            "spool_dropped": dropped,
            "commands_shed": self.commands_shed,
            "level_dbfs": self._level_dbfs,
            "anomaly_index": _round(self.index.value, 4),
            "learns": self.marks_learnt(),  # the page offers Mark normal only then
            "tells_off": self.pipeline.tells_off,  # else the page says a stop reads `running`
            "same_device_id": self._same_device_id(),
            **(self.adapter.status() if self.adapter is not None else {}),
        }

    def _same_device_id(self) -> list[str]:
        """Other SoundSentry instances heard online under this device_id (edge.publish)."""
        return sorted(  # a copy: paho's thread adds to `duplicates` meanwhile
            other
            for sink in self.sinks
            if isinstance(sink, MqttSink)
            for other in list(getattr(sink.publisher, "duplicates", {}))
        )

    @property
    def windows(self) -> int:
        """Windows scored so far."""
        return self.metrics.windows

    @property
    def _clip_folder(self) -> Path | None:
        return self.clips.folder if self.clips else None

    # --- the loop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish after the current block (signal handlers call this)."""
        self._stop.set()

    def run(self, source: Iterable[np.ndarray | None]) -> None:
        """Process blocks until the source ends or stop() is called; then close open events."""
        self.source_stats = getattr(source, "stats", dict)
        self._source = source
        if self.adapter is not None:  # the channel a refit's site audio is of
            self.adapter.channel = getattr(source, "channel", None)
        self._paced = bool(getattr(source, "paced", False))
        # Stream time goes on from any earlier run; a recording replayed faster than it was
        # heard lies in the past, ending now.
        ahead = 0.0 if self._paced else float(getattr(source, "seconds", 0.0))
        self._origin = self.clock() - self._samples / self._rate - ahead
        self._slack_s = float(getattr(source, "latency_s", 0.0)) + CLOCK_SLACK_S
        self._wall_offset = self.clock() - time.monotonic()
        self._last_block = time.monotonic()  # no block was due before (the broker waited for)
        self._first_block = True  # and the first comes a block after the device has opened
        self.emit_state()
        self._emit_health(None)
        blocks = iter(source)
        try:
            for block in blocks:
                if isinstance(block, NewStream):
                    self.new_stream()
                elif isinstance(block, AudioGap):
                    self.audio_gap(block.reopened)
                elif block is not None:
                    self.feed(block)
                self.tick()
                if self._stop.is_set():  # cut short if the source had more (one look ahead;
                    # not at a microphone, which always has more and may be reopening)
                    self.cut_short = not self.live and next(blocks, _ENDED) is not _ENDED
                    break
        finally:
            self.finish()

    def feed(self, block: np.ndarray) -> list[Step]:
        """Process one block: health, clip ring, windows, events."""
        t0 = time.perf_counter()
        now = time.monotonic()
        block = self._take(block, now)
        tap, base_s = self._tap, self._base / self._rate  # of the pipeline the steps come from
        pipeline = self.pipeline  # a period's refit partway through the block replaces it: the
        # block's later windows were scored by this one, against its threshold
        heeded = not self.muted and INVALID not in self.health.active
        # in a learning period events are held off, and the model in use listens to what it
        # would have raised: the refit says so, for a fault heard then is learnt as normal
        steps = pipeline.push(
            block, detect=heeded and not self.learning, listen=heeded and self.learning
        )
        self._samples += len(block)
        if self._paced:
            self._follow_clock()
        for step in steps:
            self._hear_window(step, pipeline, now)
            self._pass_window_on(step, pipeline)
            self._keep(step, tap, base_s + step.end_s)
        tap.windows.clear()
        self.metrics.block_processed(len(block) / self._rate, time.perf_counter() - t0)
        self._last_block = time.monotonic()  # a slow block (a refit at a period's end) is no stall
        self._first_block = False
        return steps

    def _take(self, block: np.ndarray, now: float) -> np.ndarray:
        """Take a block in: resync after a stall, health, the clip ring; the block to score."""
        if self._stalled:
            self._resync()
        self._last_block = now
        for change in self.health.push(block):
            self._emit_health(change)
        if INVALID in self.health.active:
            block = np.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0)
        if self.clips:
            self.clips.push(block)
        return block

    def _hear_window(self, step: Step, pipeline: Pipeline, now: float) -> None:
        """A window scored: its score, the machine heard running or not, the state it names."""
        self.metrics.window_scored(step.elapsed_s)
        first = not self._heard
        if not step.dead:  # a dead microphone's windows say nothing of the machine: a
            self._last_window = now  # start on one said `normal`, machine `running`
        # the machine off has no score to show: the room scored 30 against a threshold of
        # 3.6 while the fan was off, and Home Assistant's score graph spiked at every stop
        # (a walk-through)
        machine = step.state_name or step.machine  # a named state when trained with them
        # nor the windows of a stop heard near or below the off level before it is named
        # `off` (a field review: 7.8 and 48 against 2.7 in the two windows before each
        # `off`), which are no evidence either (a machine coasting down: the diff review)
        quiet = pipeline.machine.near_off(step.level_dbfs)
        self._last_score = None if machine == OFF or quiet else step.score
        if self.live:  # a classifier's class `off` ends in its K of N votes, not the 8
            events = self.pipeline.events  # that rename a state
            votes = events.k if isinstance(events, ClassTracker) else SWITCH_VOTES
            self.running.heard(step.machine, step.dead, self.bundle.features.hop_seconds, votes)
        self._heard_near_off(step)
        if not self._heard:
            pass  # `starting`, the machine unknown, until a window that is not dead
        elif machine != self._machine:
            log.info("machine %s", machine)
            self._machine = machine
            self.emit_state()
        elif first:
            self.emit_state()  # `starting` ends with the first window heard

    def _pass_window_on(self, step: Step, pipeline: Pipeline) -> None:
        """A window scored: to on_step and the sinks, its bands, its transitions dispatched."""
        if self.on_step:
            self.on_step(step)
        self._to_sinks("window", step, pipeline.threshold)
        self._track_bands(step)
        for transition in step.transitions:
            self._dispatch(transition)
        if self.pipeline.named_class != self._label_said:  # a class named with no event
            self.emit_state()  # of its own (`normal`): Recognised class waited for a report
        if step.heard and self.adapter is not None and self.adapter.period is not None:
            self.adapter.period.heard_events += sum(t.kind == "start" for t in step.heard)

    def _heard_near_off(self, step: Step) -> None:
        """Say once when the machine has been heard running but near its off level for
        NEAR_OFF_SAY_S (windows judged now and then between do not reset it, JUDGED_RESET_S of
        them in a row do): no window is judged then, so detection is deaf and a learning period
        learns nothing; a microphone 9 dB quieter than the training's did that in silence."""
        hop = self.bundle.features.hop_seconds
        if step.evidence:
            self._judged_s += hop
            if self._judged_s >= JUDGED_RESET_S and self._near_off_s:
                if self._near_off_s >= NEAR_OFF_SAY_S:
                    log.warning("the machine is heard above its off level again: judged")
                self._near_off_s = 0.0
            return
        if step.dead or step.machine != RUNNING:
            return
        if not self.pipeline.machine.near_off(step.level_dbfs):
            return  # starting up or settling (or no off level): not the level's doing
        self._judged_s = 0.0
        before = self._near_off_s
        self._near_off_s += hop
        if before < NEAR_OFF_SAY_S <= self._near_off_s:
            log.warning(
                "the machine has been heard running at %.1f dBFS, within %g dB of its off "
                "level (%.1f dBFS), for %.0f s: no window is judged then, so no event is "
                "raised and no learning period learns; a quieter microphone or gain than the "
                "model's recordings? `soundsentry calibrate` with recordings of this microphone "
                "sets the levels, or set [detector] off_below_dbfs",
                step.level_dbfs,
                HYSTERESIS_DB,
                self.pipeline.machine.off_below_dbfs,
                self._near_off_s,
            )

    def tick(self) -> None:
        """Housekeeping between blocks: stall check, commands, mute, watchdog, reports."""
        now = time.monotonic()
        self._check_stall(now)
        self.run_pending()
        keeper = self.clips or self._clip_keeper
        if keeper:
            keeper.housekeep(now)  # clips past max_age_days go on a quiet machine too
        self._end_mute(now)
        self._tell_systemd()
        self._report_due(now)
        self._save_due(now)
        a = self.adapter
        if (
            a is not None
            and a.unwritten is not None
            and now - self._unwritten_tried >= (UNWRITTEN_RETRY_S)
        ):
            self._finish_learning(retry=True)

    def _check_stall(self, now: float) -> None:
        """Report a stall on `health` when no block came for the stall time."""
        stall = self.settings.health.stall_seconds
        if self._first_block:  # the device opening: 0.6 s for a USB microphone, in a review
            stall += self.settings.audio.block_seconds
        if now - self._last_block > stall:
            self.index.no_audio(now - self._last_block)
            problem = getattr(self._source, "problem", None)  # the capture's own account
            detail = f"no audio for {stall:g} s" + (f": {problem}" if problem else "")
            for change in self.health.stalled(detail):
                self._emit_health(change)

    def _end_mute(self, now: float) -> None:
        """End a mute whose time is up."""
        if self._mute_end and now >= self._mute_end:
            self._mute_end = 0.0
            log.info("mute ended")
            self.pipeline.heed()
            self._save_state()
            self.emit_state()

    def _tell_systemd(self) -> None:
        """Ready once, the status line when it changes, and the watchdog's ping."""
        # Alive = the loop turns. A stalled or missing microphone is the capture's to reopen
        # (rescanning PortAudio, with backoff) and is reported on `health` and in systemd's
        # STATUS: restarting for it sent `offline` every two minutes and a core dump every 30 s
        # for as long as a microphone stayed unplugged. A hung loop stops the pings.
        status = self._status_line()
        if not self._ready:
            self._ready = True
            self.notifier.ready(status)
        elif status != self._status:
            self.notifier.status(status)
        self._status = status
        self.notifier.watchdog()

    def _report_due(self, now: float) -> None:
        """Emit the state and the metrics when their intervals are up."""
        if now >= self._next_state:
            self._next_state = now + self.settings.state_interval_seconds
            self.emit_state()
        if now >= self._next_metrics:
            self._next_metrics = now + self.settings.mqtt.metrics_interval_seconds
            self._emit_metrics()

    def _save_due(self, now: float) -> None:
        """Save the state when a change waits to be saved or enough running time went by."""
        # a mute's count ran on saves of running time alone: a mute through a stop (what a mute
        # is for) saved none, and a restart on a clock behind its start muted for its whole
        # length again (a power-loss review); nor on the metrics' tick (up to a day apart)
        muting = self._mute_end and now - self._saved_at >= RUNNING_SAVE_S
        unsaved = self.state is not None and self.state.unsaved
        if unsaved and now - self._saved_at >= STATE_RETRY_S:
            self._save_state()  # a threshold or mute set while the card was full (a review)
        elif self.running.seconds - self._running_saved >= RUNNING_SAVE_S or muting:
            self._save_state()  # a crash loses at most this much; the SD card is spared

    def audio_gap(self, reopened: bool) -> None:
        """The microphone lost audio here: no window joins the two sides. A reopened device
        (seconds lost) ends an open anomaly (`audio_gap`) and waits the settle time, as after
        a stall; blocks dropped by a full queue only restart the windowing."""
        if reopened:
            self._resync()
            self.pipeline.machine.heard_nothing(
                (self._samples - self._base) / self._rate, lost=True
            )
        else:
            self.pipeline.reset()

    def new_stream(self) -> None:
        """A new, unrelated stream follows (the next replayed file): the open anomaly ends
        where the last one stopped, and windowing and event logic start afresh. A learning
        period learns the last one's final windows: it ended with the machine running."""
        self._learn_unlearnt(math.inf)
        self.close_event("end_of_stream")
        if self.clips:  # a clip's pre-roll held the last file's end (in a review)
            self.clips.ring.forget()
        self._load(self.bundle, self.settings, self._threshold, named_on=False)

    def finish(self) -> None:
        """End an open anomaly, save a learning period in progress and the running hours, send
        the last metrics, mark the state stopped. A learning period learns the final windows
        of a source that ended (a recording: as training would), not of one stopped (a
        service's stop is not held up by a refit; those seconds are not learnt)."""
        if not self._stop.is_set():
            self._learn_unlearnt(math.inf)
        # the open event ends with no state message of its own: `normal` (score above the
        # threshold) went out between the anomaly and `stopped`, and Home Assistant's anomaly
        # sensor went off, the "fault cleared" of automations, at every restart (in a review)
        self._finishing = True
        try:
            self.close_event("stopped" if self.live or self._stop.is_set() else "end_of_stream")
        finally:
            self._finishing = False
        if self.adapter is not None:
            self.adapter.save_period()
            self.adapter.save_unwritten()  # refitted at the next start
        self._save_state()
        self.notifier.stopping()
        self._emit_metrics(final=True)  # the last running hours and counts (retained over MQTT)
        self.emit_state("stopped")

    # --- anomalies -------------------------------------------------------------------------

    @property
    def _level_dbfs(self) -> float | None:
        """The input level for messages; None before any audio (the meter's floor is none) and
        while none comes (the last block's level was sent every 10 s, as if current, through a
        microphone unplugged for minutes: a soak review)."""
        return round(self.health.level, 1) if self._heard and not self._stalled else None

    @property
    def _stalled(self) -> bool:
        """No audio comes (the capture stalled, a microphone unplugged)."""
        return "stalled" in self.health.active

    @property
    def _heard(self) -> bool:
        """True once a window that is not dead has been scored (before it, `starting`)."""
        return self._last_window != float("-inf")

    @property
    def muted(self) -> bool:
        """True during a maintenance mute."""
        return self._mute_end > time.monotonic()

    @property
    def muted_until(self) -> float:
        """When the running mute ends on the wall clock (epoch seconds), 0 if none runs. The
        mute itself runs on the monotonic clock: a Pi without a real-time clock boots in the
        past and jumps forward at NTP sync, which ended a 60-min mute at once (or, backwards,
        stretched a 1-min one to a day)."""
        left = self._mute_end - time.monotonic()
        return self.clock() + left if self._mute_end and left > 0 else 0.0

    @muted_until.setter
    def muted_until(self, wall: float) -> None:
        self._clock_set()  # a step not yet noticed must not move this mute again later
        left = wall - self.clock() if wall else 0.0
        self._mute_end = time.monotonic() + left if left > 0 else 0.0
        self._mute = SavedMute(self.clock(), max(left, 0.0))
        self._mute_dated_here = True

    @property
    def _rate(self) -> int:
        return self.bundle.features.samplerate

    def _resync(self) -> None:
        """After a gap in the audio: restart windowing and re-anchor stream time to the clock."""
        self.close_event("audio_gap")
        self.pipeline.reset()
        self._origin = self.clock() - self._samples / self._rate
        self._clock_set()

    def _follow_clock(self) -> None:
        """Audio that comes at the pace of the clock (a microphone) is timed by its samples
        from the start. When that time and the clock part by more than the capture queue can
        hold (a Pi without a real-time clock set by NTP after boot, dropped blocks, a USB
        microphone's own clock over weeks), event times follow the clock again."""
        behind = self.clock() - (self._origin + self._samples / self._rate)
        if -CLOCK_SLACK_S <= behind <= self._slack_s:
            return
        level = logging.WARNING if abs(behind) > CLOCK_JUMP_S else logging.INFO
        log.log(
            level,
            "the clock is %+.1f s off the audio's own time (set at boot, dropped audio or a "
            "drifting microphone): event times follow the clock",
            behind,
        )
        self._origin += behind
        self._clock_set()

    def _clock_set(self) -> None:
        """When the wall clock was set (it parted from the monotonic clock by more than
        CLOCK_JUMP_S since the last look), the clips written so far move with it. Dropped
        audio or a stall part the audio's time from the clock too, but leave file times true."""
        offset = self.clock() - time.monotonic()
        moved = offset - self._wall_offset
        if abs(moved) > CLOCK_JUMP_S:  # not NTP's slewing, nor jitter
            self._wall_offset = offset
            if self.clips:
                self.clips.clock_moved(moved)
            if self._mute_dated_here:  # its start was read off the clock now set
                m = self._mute
                self._mute = SavedMute(m.started + moved, m.seconds, m.ran)

    def _wall(self, stream_s: float) -> float:
        return self._origin + self._base / self._rate + stream_s

    def _track_bands(self, step: Step) -> None:
        if not self.explainer.enabled:
            return
        if self.pipeline.events.active and not step.dead:
            err = step.window.band_error
            self._band_sum = err.copy() if self._band_sum is None else self._band_sum + err
            self._band_n += 1

    def close_event(self, reason: str) -> None:
        """End an open anomaly now, for `reason` (one of edge.events.ENDED_BY)."""
        transition = self.pipeline.close(reason)
        if transition is not None:
            self._dispatch(transition)

    def _dispatch(self, t: Transition) -> None:
        clip = None
        if t.kind == "start":  # the machine's state as it was raised, for all its messages
            self._kept[t.event_id] = {
                "rows": [],
                "clip": None,
                "machine": self._machine,
                "model": self.bundle.model_id,  # a mark learns it into this model's line only
                "started_at": self._wall(t.started_s),  # kept: the clock may be set meanwhile
                "seq": 0,
            }
            self.recent.trim()
            if self.clips:
                first = self._base + int(t.started_s * self._rate)
                self.clips.start(t.event_id, first, self._wall(t.started_s))
        elif t.kind == "end" and self.clips:
            clip = self.clips.finish(t.event_id)
        message = self._message(t, clip)
        if clip and t.event_id in self._kept:
            self._kept[t.event_id]["clip"] = clip[0]
        if t.kind == "end":
            self._band_sum, self._band_n = None, 0
        log.log(  # an update every update_seconds of a day-long fault: not for the journal
            logging.DEBUG if t.kind == "update" else logging.INFO,
            "anomaly %s: %s (peak %.4g)", message.type, message.event_id, message.peak_score,
        )  # fmt: skip
        self._to_sinks("event", message)
        if t.kind != "update" and not self._finishing:  # `stopped` follows, from finish
            self.emit_state()

    def _message(self, t: Transition, clip: tuple[str, float] | None) -> EventMessage:
        ended = t.ended_s is not None
        bands = (
            self.explainer.bands(self._band_sum / self._band_n)
            if self._band_sum is not None
            else None
        )
        kept = self._kept.get(t.event_id, {})
        started = kept.get("started_at", self._wall(t.started_s))  # a clock set since: not after
        # numbered here, for every sink alike: the publisher alone numbered them, and the event
        # log's copy, re-sent retained on `last_event` at every start, came without its `seq`
        # (a new message to Home Assistant's triggers and Node-RED, in a review)
        seq = kept.get("seq")
        if seq is not None:
            kept["seq"] = seq + 1
        return EventMessage(
            type=t.kind,  # type: ignore[arg-type]
            event_id=t.event_id,
            device_id=self.settings.device_id,
            model=self.bundle.model_id,
            started_at=iso(started),
            ended_at=iso(max(self._wall(t.ended_s), started)) if ended else None,  # type: ignore[arg-type]
            duration_s=round(t.ended_s - t.started_s, 3) if ended else None,  # type: ignore[operator]
            peak_score=round(t.peak_score, 6),
            mean_score=round(t.mean_score, 6),
            threshold=round(self.pipeline.threshold, 6),
            stream_offset_s=round(
                (self._base / self._rate) + (t.ended_s if ended else t.started_s), 3
            ),  # type: ignore[operator]
            bands=bands,
            clip=clip[0] if clip else None,
            clip_seconds=clip[1] if clip else None,
            label=t.label,
            fault=self._is_fault(t.label),
            machine=kept.get("machine", self._machine),
            trigger=t.trigger,  # type: ignore[arg-type]
            ended_by=t.ended_by,  # type: ignore[arg-type]
            clip_url=self.clip_url(clip[0]) if clip and self.clip_url else None,
            seq=seq,
            clock_unset=True if believable() is not None else None,
        )

    def _is_fault(self, label: str | None) -> bool | None:
        """A classifier's class: a fault beside a class `normal`, else a change of class; None
        for an anomaly model's event (its card was styled as a class change, in a review)."""
        healthy = getattr(self.pipeline.events, "healthy", None)
        if label is None or healthy is None:
            return None
        return is_fault(label, healthy)

    # --- reports ---------------------------------------------------------------------------

    def current_state(self) -> str:
        """fault, muted, learning, or what the event logic says (normal, anomaly)."""
        if not self.health.ok:
            return "fault"
        if self.muted:
            return "muted"
        if self.learning:
            return "learning"
        if not self._heard:
            return "starting"  # nothing heard yet: not a claim that the machine sounds normal
        return self.pipeline.events.state

    def emit_state(self, state: str | None = None) -> None:
        """Send the current state (or `state`) to every sink."""
        state = state or self.current_state()
        gone = state == "stopped"  # retained till the next start: no reading of a daemon gone
        self._label_said = label = self.pipeline.named_class
        message = StateMessage(
            state=state,  # type: ignore[arg-type]
            device_id=self.settings.device_id,
            model=self.bundle.model_id,
            threshold=round(self.pipeline.threshold, 6),
            updated_at=iso(self.clock()),
            # NaN (a float WAV's 1e30) is none, nor the last window's while no audio comes
            score=None if gone or self._stalled else _round(self._last_score, 6),
            level_dbfs=None if gone else self._level_dbfs,
            event_id=self.pipeline.events.event_id,
            # `stopped` says nothing of when it ends; a mute's end beside it read as a restart time
            muted_until=iso(self.muted_until) if self.muted and not gone else None,
            # nothing heard of it (a dead microphone, a daemon gone), or the machine off by its
            # level: a class kept from before is not one heard now (a diff review)
            label=None
            if state == "fault" or gone or (self._machine == OFF and not is_off(label))
            else label,
            # faulty audio says nothing, nor a daemon gone (`stopped` stays retained till its start)
            machine=None if state == "fault" or gone else self._machine,
            progress=round(self.adapter.period.progress, 4)
            if self.adapter is not None and self.adapter.period is not None and not gone
            else None,
        )
        self._to_sinks("state", message)

    def _status_line(self) -> str:
        """systemd's STATUS: what the daemon listens with, or why it hears nothing."""
        problem = getattr(self._source, "problem", None)  # the capture's own account
        if self._stalled or problem:
            return f"no audio: {problem or self._status_detail or 'nothing from the device'}"
        others = self._same_device_id()
        if others:  # logged once each; here for as long as this run lasts
            return (
                f"listening with {self.bundle.model_id}; another SoundSentry publishes as this "
                f"device_id ({', '.join(others)}): give each its own"
            )
        return f"listening with {self.bundle.model_id}"

    def _emit_health(self, change: HealthChange | None) -> None:
        if change is not None:
            level = logging.WARNING if change.kind == "fault" else logging.INFO
            log.log(level, "audio %s: %s (%s)", change.kind, change.fault, change.detail)
            if change.fault == "stalled":
                self._status_detail = change.detail
            if change.kind == "fault":  # no audio at all, or audio that cannot be trusted
                self.close_event("audio_gap" if change.fault == "stalled" else "audio_fault")
            elif change.fault == INVALID:  # windows holding the bad samples are not scored
                self.pipeline.reset()
        message = HealthMessage(
            status="ok" if self.health.ok else "fault",
            device_id=self.settings.device_id,
            updated_at=iso(self.clock()),
            faults=sorted(self.health.active),
            change=f"{change.kind}:{change.fault}" if change else None,
            detail=change.detail if change else None,
        )
        self._to_sinks("health", message)
        if change is not None:
            self.emit_state()

    def _emit_metrics(self, final: bool = False) -> None:
        """Send the metrics to every sink. The `final` one, at a stop, stays retained while the
        daemon is gone: it keeps the totals and counts but no level or trend, which a SCADA tag
        or a Node-RED flow would read as live (as `stopped` keeps no score; an integrator's
        review)."""
        src = self.source_stats()
        spool_depth, spool_dropped = self.spool_stats()
        m = self.metrics
        rtf = m.realtime_factor
        message = MetricsMessage(
            device_id=self.settings.device_id,
            model=self.bundle.model_id,
            updated_at=iso(self.clock()),
            uptime_s=round(m.uptime_s, 1),
            windows_scored=m.windows,
            realtime_factor=None if rtf is None else round(rtf, 5),
            inference_ms_p50=_round(m.latency_ms(50)),
            inference_ms_p95=_round(m.latency_ms(95)),
            dropped_blocks=int(src.get("dropped", 0)),
            overflows=int(src.get("overflows", 0)),
            queue_depth=int(src.get("queue_depth", 0)),
            level_dbfs=None if final else self._level_dbfs,
            spool_depth=spool_depth,
            spool_dropped=spool_dropped,
            commands_shed=self.commands_shed,
            running_hours=round(self.running.seconds / 3600, 4),  # in total: kept in state.json
            cpu_temp_c=cpu_temperature_c(),
            throttled=throttled(),
            anomaly_index=None if final else _round(self.index.value, 4),
        )
        self._to_sinks("metrics", message)

    def respond(self, message: ResponseMessage, reply_to: ReplyTo | None = None) -> None:
        """Send a command response to every sink (`reply_to`: where the command asked for it)."""
        self._to_sinks("response", message, reply_to)

    def _to_sinks(self, method: str, *args: Any) -> None:
        """Hand a message to every sink. One that raises (the spool or the event log on a full
        disk) is logged, once until it works again, and the others still get the message: no
        output may stop the monitor or the outputs after it. Only a closed stdout ends a
        replay, as a pipe into `head` expects; the device's daemon (`run`, whose stdout is the
        journal's stream) goes on: an exit 0 there would not be restarted by systemd."""
        for sink in self.sinks:
            key = (id(sink), method)
            try:
                getattr(sink, method)(*args)
            except BrokenPipeError:  # stdout closed (`replay ... | head`): the command ends
                if not self.live:
                    raise
                if key not in self._failing:
                    log.error("%s: its output was closed; events still go to the other outputs",
                              type(sink).__name__)  # fmt: skip
                self._failing.add(key)
            except Exception:
                if key not in self._failing:
                    log.exception("%s.%s failed; carrying on", type(sink).__name__, method)
                self._failing.add(key)
            else:
                self._failing.discard(key)


def _round(value: float | None, digits: int = 3) -> float | None:
    """Rounded for a message; None for no value, or one that is not a number (JSON has none)."""
    return None if value is None or not math.isfinite(value) else round(value, digits)
