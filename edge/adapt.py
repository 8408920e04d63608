"""Adapting the model on site: the commissioning period, the events marked normal, the refits
they cause and the bundle versions they make (edge.history), with rollback.

Files under `{data_dir}`: `learning/period.json` + `period.npz` (a period in progress: it
resumes after a restart), `learning/site-<time>-<period id>.npz` (the features of a finished
period), `learning/marked/<event_id>.npz` (the windows of an event marked normal), and
`models/history.json` with the versions. Each version records which period and which marks it
was fitted on, so a refit after a rollback starts from what that version knew; the features no
kept version uses are deleted as versions are pruned, and a version carries at most MAX_MARKS
marks. Every refit
starts from the trained bundle (`base`), never from a refitted one, so nothing is counted twice.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import Bundle, load_bundle
from edge.clips import same_event
from edge.commands import ReplyTo
from edge.detectors.thresholds import EventLogic
from edge.errors import BundleError, SoundSentryError
from edge.features import FeatureParams
from edge.history import (
    ModelHistory,
    VersionUnwrittenError,
    load_version,
    now_iso,
    read_json,
    write_json,
)
from edge.learning import (
    FeatureStore,
    LearningError,
    chunk_seconds,
    combine,
    featurizer,
    flags,
    has_training,
    mark_capacity,
    refit_summary,
    require_period,
    site_capacity,
    site_refit,
)
from edge.private import private_dir, remove_stale_temps
from edge.settings import LearningSettings

log = logging.getLogger(__name__)

PERIOD = "period"
SAVE_EVERY_S = 600.0
"""A period in progress is saved after every 10 minutes of audio it collects (and at stop). Each
save rewrites its whole feature store (5.3 MB at 20000 windows) with fsync: every minute that was
7 GB a day, 220 GB over a 30-day period, on an SD card; a power cut now loses at most 10 minutes
of a period that lasts hours or days."""
UNWRITTEN_RETRY_S = 600.0
"""How often a period's refit that a full card stopped, with its save, is tried again."""
MAX_MARKS = 20
"""Events marked normal that a version carries; beyond it the oldest mark is dropped (logged).
Every version carried all marks into the next and every refit loaded them all, so they grew
without bound on a device that runs for years."""
SAFE_EVENT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def feature_dim(bundle: Bundle) -> int:
    """Numbers per window a period keeps for `bundle` (LearningError: its kind cannot learn)."""
    return len(featurizer(bundle)(np.zeros((1, *bundle.features.shape)))[0])


class UnwrittenError(LearningError):
    """A refit whose version could not be written (a full or failing disk): its data stand."""


@dataclass(frozen=True)
class Asker:
    """The `learn start` a period answers when it ends, however it ends (a second reply under
    the command's id; None: it gave none). An automatic period ([learning] seconds) has none."""

    id: str | None
    reply_to: ReplyTo | None = None
    """Where its MQTT 5 Response Topic asked for the replies (this run only: not saved)."""


class Period:
    """A commissioning period: its length, how much audio it has collected, and the features."""

    def __init__(
        self,
        target_s: float,
        bundle: Bundle,
        store: FeatureStore,
        of: str,
        collected_s: float = 0,
        asker: Asker | None = None,
    ) -> None:
        self.target_s = target_s
        self.asker = asker
        """Who is answered when it ends; saved with it, so a period resumed after a restart
        answers its start's id too."""
        self.hop_s = bundle.features.hop_seconds
        self.store = store
        self.of = of
        """The configured model it was begun for: the versions it ends in are that model's."""
        self.model = bundle.model_id
        self.kind = bundle.manifest.kind
        self.features = bundle.manifest.features
        """The model in use it was begun with (a version loaded by reload_model, say, not the
        configured one), its kind and feature parameters: they make its windows, and a restart
        resumes it only with a model that makes the same."""
        self.collected_s = collected_s
        self.started_at = now_iso()
        self.period_id = uuid.uuid4().hex[:16]
        """Names the period in the version it ends in (started_at is to the second: a period
        begun within the second of the last one's was taken as ended already)."""
        self.tried_s = collected_s
        """When a save was last tried: a failed one is tried again after SAVE_EVERY_S more audio,
        not at every window (a full card logged two lines a second, in a full-disk review)."""
        self.heard_events = 0
        """Events the model in use would have raised on the period's audio (events are held
        off while it runs): a fault heard then is learnt as normal, so the refit says so."""

    @property
    def begun_with(self) -> dict[str, Any]:
        """The model it was begun with, its kind and feature parameters, as saved with it."""
        return {"model": self.model, "kind": self.kind, "features": self.features}

    @property
    def progress(self) -> float:
        """Share of the period done, 0 to 1."""
        return min(1.0, self.collected_s / self.target_s)

    @property
    def done(self) -> bool:
        """True once the period has heard its length of audio."""
        return self.collected_s >= self.target_s

    def take(self, row: np.ndarray) -> None:
        """Keep one running window's features."""
        self.store.add(row, int(self.collected_s // chunk_seconds(self.target_s)))
        self.collected_s += self.hop_s


class Adapter:
    """The site's learning state of one device, and the refits it makes."""

    def __init__(
        self,
        data_dir: Path,
        settings: LearningSettings,
        configured: Bundle,
        path: Path | None,
        event_logic: Callable[[Bundle], EventLogic] | None = None,
        runs: Callable[[Bundle], object] | None = None,
    ) -> None:
        self.settings = settings
        self.event_logic = event_logic
        """K, N and M the daemon runs a bundle with (its settings may change the bundle's): a
        refit's threshold is set for those."""
        self.runs = runs
        """Raises SoundSentryError when the settings in force cannot run a bundle (the daemon
        builds its pipeline): a version made under other [detector] settings may not."""
        self.configured = configured
        self.configured_path = path or configured.path
        self.folder = data_dir / "learning"
        self.history = ModelHistory(
            data_dir / "models", settings.keep_versions, configured.model_id
        )
        self.period: Period | None = None
        self.unwritten: Period | None = None
        """A period that has ended whose refit and save both failed (a full card): kept in
        memory, refitted by `retry_unwritten` once there is room, saved at a stop. It went on
        learning instead, events held off, for as long as the card stayed full: the daemon
        raised none, and learnt the faults it heard as normal (a full-disk review)."""
        self.on_ended: Callable[[Asker, dict[str, Any]], None] | None = None
        """Told when a period begun by a command ends here rather than in the daemon's refit:
        dropped unfinished (`dropped`: why; replaced, another model in use, cancelled, a saved
        one that cannot resume), or found ended in a version already after a power cut (that
        version's refit): the daemon answers its `learn start` again."""
        self._marks_learnt: tuple[object, bool] | None = None  # `marks_learnt`, by version
        self.channel: int | None = None
        """The channel the site's audio comes from (the source's: [audio] channel, or replay's
        --channel), recorded in a refit's calibration as `calibrate` records its own: a
        version learnt on channel 4 is a model of channel 4 (`edge.bundle.fitted_channel`)."""
        for folder in (self.folder, self.folder / "marked", self.history.folder):
            remove_stale_temps(folder)  # what writes cut short by a power cut left
        if self.history.prune():
            self._tidy()

    @property
    def last_refit(self) -> dict[str, Any] | None:
        """The outcome of the last refit, kept in the history across restarts."""
        return self.history.last_refit

    @last_refit.setter
    def last_refit(self, outcome: dict[str, Any] | None) -> None:
        self.history.last_refit = outcome
        try:
            self.history.save()
        except OSError as exc:  # this run's status still says it
            log.error("learning: could not record the last refit: %s", exc)

    # --- the model in use --------------------------------------------------------------------

    def restore(self) -> Bundle:
        """The bundle to start with, and the period saved before the restart resumed with it:
        the period was begun with the model then in use, which may be a version rather than
        the configured model, so it is checked against the bundle chosen here."""
        bundle = self._restored()
        self._resume(bundle)
        return bundle

    def _restored(self) -> Bundle:
        """The active version if it still loads, is the bundle its entry recorded and runs
        under the settings now, else the configured."""
        entry = self.history.current
        if entry is None:
            return self.configured
        try:
            bundle = load_version(entry)
        except SoundSentryError as exc:
            log.error("version %d unusable, using the configured model: %s", entry["version"], exc)
            try:
                self.history.set_active(None)
            except OSError as why:  # a full or read-only card: this run only, said
                self.history.active = None
                log.error("could not record the switch to the configured model: %s", why)
            return self.configured
        try:
            self._check_runs(bundle)
        except SoundSentryError as exc:
            # The settings changed, not the version (a [detector] edit: its threshold was set
            # for the K and N it was made under, which taking apart would change its alarm
            # rate). Starting is what matters: the configured model runs, and the history keeps
            # the version, used again at a start whose settings allow it.
            self.history.hold_back()  # saved as active all the same (a refit's save, say)
            log.error(
                "version %d (%s) cannot run under the settings now, so the configured model %s "
                "runs until they allow it again: %s",
                entry["version"],
                bundle.model_id,
                self.configured.model_id,
                exc,
            )
            return self.configured
        log.warning(  # not the model named in the config or on the command line: say so
            "using version %d (%s, %s) instead of %s: the device switched to it before (%s); "
            "the rollback command steps back from it, towards %s",
            entry["version"],
            bundle.model_id,
            entry["reason"],
            self.configured.model_id,
            self.history.path,
            self.configured.model_id,
        )
        return bundle

    def base(self) -> Bundle:
        """The trained bundle refits start from: the active version's base, or the configured."""
        entry = self.history.current
        if entry is None or Path(entry["base"]) == self.configured.path:
            return self.configured
        try:
            return load_bundle(entry["base"])
        except SoundSentryError as exc:
            raise LearningError(f"the base model of version {entry['version']}: {exc}") from None

    def marks_learnt(self) -> bool:
        """Whether an event marked normal can be learnt now (the page offers *Mark normal* only
        then): the base bundle carries its training windows, or the version in use holds a
        period's audio of the site to back the threshold. The demo's bundle has neither before a
        learning period: the page offered the button on its events and every mark was refused
        with a command the page cannot send (a phone review). Not while history.json cannot
        be read: every mark is refused, as no version can be recorded (a diff review)."""
        if self.history.unreadable:
            return False
        current = self.history.current
        key = (self.configured.model_id, (current or {}).get("version"))
        if self._marks_learnt is None or self._marks_learnt[0] != key:
            try:
                backed = bool(current and current.get("site")) or has_training(self.base())
            except LearningError:  # its base is gone: the mark would say so
                backed = True
            self._marks_learnt = (key, backed)
        return self._marks_learnt[1]

    def switched(self, bundle: Bundle, reason: str) -> None:
        """Record a bundle loaded from outside (reload_model, SIGHUP) as a version."""
        self.history.record(
            bundle, reason, bundle.path, False, site=None, marked=[], of=self.configured.model_id
        )
        self._tidy()

    @property
    def learned(self) -> bool:
        """True once a period has ended in a version for the configured model (kept apart
        from the versions, which are pruned), in a refit that failed, or was cancelled: an
        automatic period is not begun again at every start."""
        m = self.configured.model_id
        return m in self.history.learned or m in self.history.failed

    def rollback(self) -> Bundle:
        """The bundle the active version replaced, loaded; the history points to it. Refused
        (LearningError) when it no longer loads, is no longer the bundle its entry recorded,
        or cannot run under the settings now."""
        target = self.history.rollback_target()
        entry = self.history.entry(target)
        try:
            bundle = self.configured if entry is None else load_version(entry)
            self._check_runs(bundle)
        except SoundSentryError as exc:
            what = "the configured model" if entry is None else f"version {target}"
            raise LearningError(f"cannot roll back to {what}: {exc}") from None
        self.history.set_active(target)
        self.drop_unwritten("a rollback")  # its refit would undo the rollback
        p = self.period
        if p is not None:  # a model of another kind: its windows would not fit the period's
            try:
                _check_takes(p.begun_with, p.store.dim, bundle)
            except LearningError:
                self.model_changed(bundle)
        return bundle

    def _check_runs(self, bundle: Bundle) -> None:
        """SoundSentryError when the settings in force cannot run `bundle`."""
        if self.runs is not None:
            self.runs(bundle)

    # --- the commissioning period ------------------------------------------------------------

    def check_start(self, seconds: float, bundle: Bundle) -> int:
        """Refuse (LearningError) a period `bundle` cannot learn or too short for its refit,
        before anything changes; the number of features its windows have."""
        self._require_history()
        dim = feature_dim(bundle)
        require_period(self.base(), seconds)
        return dim

    def _require_history(self) -> None:
        """Refuse (LearningError) what ends in a version while history.json cannot be read:
        it could not be recorded, and a period would hold events off for nothing."""
        if self.history.unreadable:
            raise LearningError(
                f"{self.history.path} cannot be read, so no version can be recorded: check "
                "its owner and the card, then restart"
            )

    def start(self, seconds: float, bundle: Bundle, asker: Asker | None = None) -> None:
        """Begin a period of `seconds` of audio (a running one is replaced)."""
        dim = self.check_start(seconds, bundle)
        self.cancel("another `learn start` replaced it")
        self.drop_unwritten("a new period begins")
        capacity = site_capacity(dim, self.settings.max_windows)
        if capacity < self.settings.max_windows:
            log.warning(
                "learning: keeps at most %d windows of %d features (max_windows %d would not fit "
                "the service's memory at the refit)",
                capacity,
                dim,
                self.settings.max_windows,
            )
        store = FeatureStore(dim, capacity)
        self.period = Period(seconds, bundle, store, self.configured.model_id, asker=asker)
        self.save_period()
        log.info("learning: started, %g s of audio", seconds)

    def observe(self, row: np.ndarray) -> bool:
        """Feed one running window's features to the period; True when it has ended."""
        p = self.period
        if p is None:
            return False
        p.take(row)
        if p.collected_s - p.tried_s >= SAVE_EVERY_S:
            p.tried_s = p.collected_s
            self.save_period()
        return p.done

    def model_changed(self, bundle: Bundle) -> None:
        """Another model is now in use (reload_model, calibrate): a running period's features
        belong to the model it was begun with, so it is dropped, and said."""
        self.drop_unwritten(f"{bundle.model_id} is now in use")
        if self.cancel(f"{bundle.model_id} is now in use"):
            log.warning(
                "learning: the period was cancelled: %s is now in use (a period's features "
                "belong to the model it began with; `learn start` begins one for this model)",
                bundle.model_id,
            )

    def decline(self) -> None:
        """The user cancelled the period: an automatic one ([learning] seconds) is not begun
        again at every start for this model; the `learn` command still begins one."""
        m = self.configured.model_id
        if m in self.history.learned or m in self.history.failed:
            return
        self.history.failed.add(m)
        try:
            self.history.save()
        except OSError as exc:
            log.error("learning: could not record the cancel: %s", exc)

    def check_stop(self) -> None:
        """Refuse (LearningError) a stop before the period has learnt anything: a version of
        nothing, the model as it was, would mark the model as learnt. Not a refit that failed:
        the last refit's outcome stays as it was."""
        if self.period is None:
            raise LearningError("no learning period is running")
        if not len(self.period.store):
            raise LearningError(
                "nothing has been learnt in this period yet (it learns windows of the machine "
                "running, heard well above its off level); it goes on: `learn cancel` drops it"
            )

    def cancel(self, why: str | None = None) -> Period | None:
        """Drop the period and its features; the one that was running, if any. With `why` it
        was dropped unfinished, and its asker is told (`on_ended`)."""
        had = self.period
        self.period = None
        if why is not None and had is not None:
            self._dropped(had.asker, why)
        self._forget_saved()
        return had

    def _forget_saved(self) -> None:
        """Delete the saved period's files."""
        for name in (f"{PERIOD}.json", f"{PERIOD}.npz"):
            try:
                (self.folder / name).unlink(missing_ok=True)
            except OSError as exc:  # a read-only card: a start must not fail on it
                log.error("learning: could not delete the period's %s: %s", name, exc)

    def saved_period_answered(self) -> None:
        """The saved period's asker has been answered (its refit could not be written, and is
        made at the next start): it is not answered again then."""
        path = self.folder / f"{PERIOD}.json"
        data = read_json(path)
        if data and data.pop("asker", None) is not None:
            try:
                write_json(path, data)
            except OSError as exc:  # the next start answers the start again: said
                log.error("learning: could not update the saved period: %s", exc)

    def _dropped(self, asker: Asker | None, why: str) -> None:
        self._ended(asker, {"dropped": why})

    def _ended(self, asker: Asker | None, outcome: dict[str, Any]) -> None:
        if asker is not None and self.on_ended is not None:
            self.on_ended(asker, outcome)

    def finish(self, in_use: Bundle) -> Bundle:
        """End the period (early for `stop`) and refit with its features. A refit the data
        refuses ends the period for good (its features are dropped); one that could not be
        written (a full or failing disk) keeps the saved period, finished at the next start,
        and a power cut before the new version is recorded loses nothing either. When the
        period could not be saved either, it has ended all the same, and what it heard waits in
        memory (`unwritten`) for room to refit it; events are raised meanwhile."""
        p = self.period
        if p is None:
            raise LearningError("no learning period is running")
        p.target_s = min(p.target_s, p.collected_s)  # stopped early: ended, even if resumed
        saved = self.save_period()  # all it heard: a power cut during the refit loses none of it
        self.period = None
        # its id too: a clock set back (a Pi without RTC after a power cut) can end two periods
        # in the same second, and a refused one's clean-up deleted the file a version used
        name = f"site-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{p.period_id}.npz"
        log.info("learning: ended after %.0f s of audio (%d windows)", p.collected_s, len(p.store))
        current = self.history.current
        marked = list(current.get("marked", [])) if current else []
        try:
            private_dir(self.folder)
            p.store.save(self.folder / name)
            heard = _heard(p.heard_events)
            bundle = self._refit("learning", in_use, name, marked, p.period_id, heard, p.store)
        except (UnwrittenError, OSError) as exc:  # the period as saved above stays
            (self.folder / name).unlink(missing_ok=True)
            said = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            if not saved:
                self.unwritten, p.asker = p, None  # its asker is answered now, with this error
                # the file holds an older save, of a period still running: a restart resumed
                # it, events held off again (a diff review); a delete frees room, it can be done
                self._forget_saved()
                raise UnwrittenError(
                    f"{said}; the period could not be saved either: what it heard is kept in "
                    f"memory and refitted once there is room (tried every "
                    f"{UNWRITTEN_RETRY_S / 60:g} min), the model in use detecting meanwhile"
                ) from None
            raise UnwrittenError(
                f"{said}; the period's audio is kept and refitted at the next start"
            ) from None
        except Exception:  # the data's fault, or a bug: not again at every start
            (self.folder / name).unlink(missing_ok=True)  # no version uses it: one per failure
            self.cancel()
            self.history.failed.add(self.configured.model_id)
            try:
                self.history.save()
            except OSError as exc:
                log.error("learning: could not record the failed refit: %s", exc)
            raise
        self.cancel()
        return bundle

    def retry_unwritten(self, in_use: Bundle) -> Bundle:
        """Refit the period that ended when neither its refit nor its save could be written
        (`finish`, which keeps it in memory again if they still cannot)."""
        if self.unwritten is None:
            raise LearningError("no period waits for its refit")
        self.period, self.unwritten = self.unwritten, None
        return self.finish(in_use)

    def drop_unwritten(self, why: str) -> None:
        """Forget the period waiting in memory for room to refit it (one file holds one period:
        a new one replaces it; another model in use makes other features), and say so."""
        if self.unwritten is not None:
            log.warning(
                "learning: the ended period waiting for room to refit it is dropped (%s)", why
            )
            self.unwritten = None

    def save_unwritten(self) -> None:
        """At a stop or a new configured model: the period waiting in memory for its refit is
        saved, ended, and refitted at the next start (of another model, dropped by it, said);
        what a card still full loses is said."""
        p, self.unwritten = self.unwritten, None
        if p is None:
            return
        self.period = p
        if not self.save_period():
            log.error(
                "learning: the ended period's %d windows, kept in memory for their refit, are "
                "lost: there was no room to save them",
                len(p.store),
            )
            self._forget_saved()  # a save cut short by the full card: not resumed half-written
        self.period = None

    # --- marks -----------------------------------------------------------------------------

    def mark(self, event_id: str, rows: np.ndarray, in_use: Bundle) -> Bundle:
        """Add an event's windows to the site's normal set and refit."""
        if not SAFE_EVENT.match(event_id):
            raise LearningError(f"not an event id: {event_id!r}")
        self._require_history()
        current = self.history.current
        for m in current.get("marked", []) if current else []:
            if same_event(m, event_id):
                raise LearningError(
                    f"event {m} is already marked normal (version {current['version']}); "
                    "nothing changed"
                )
        # a long event's windows beyond mark_capacity: a uniform sample in runs
        store = FeatureStore(rows.shape[1], min(max(len(rows), 1), mark_capacity(rows.shape[1])))
        store.add(rows, 0)
        path = private_dir(self.folder / "marked") / f"{event_id}.npz"
        new = not path.exists()
        store.save(path)
        site = current.get("site") if current else None
        marked = [*dict.fromkeys([*(current.get("marked", []) if current else []), event_id])]
        note = None
        if len(marked) > MAX_MARKS:  # said in the reply: the model forgets that sound
            note = (
                f"at most {MAX_MARKS} marks are carried, so the oldest no longer is: "
                f"{', '.join(marked[:-MAX_MARKS])} (learn start learns the site's sound as a "
                "whole)"
            )
            log.warning("mark_normal: %s", note)
            marked = marked[-MAX_MARKS:]
        try:
            return self._refit("mark_normal", in_use, site, marked, note=note)
        except LearningError:
            if new:  # refused: the mark is not kept, so a later refit does not pick it up
                path.unlink(missing_ok=True)
            raise

    # --- reports -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Learning progress, the versions and the last refit, for `status`."""
        p = self.period
        return {
            "learning": None
            if p is None
            else {
                "progress": round(p.progress, 4),
                "collected_s": round(p.collected_s, 1),
                "seconds": p.target_s,
                "started_at": p.started_at,
            },
            "version": self.history.active,
            "history": self.history.summary(),
            "last_refit": self.last_refit,
            # the page offers "Mark normal" on no event the version in use already learnt
            "marked": list((self.history.current or {}).get("marked", [])),
        }

    # --- internals ---------------------------------------------------------------------------

    def _refit(
        self,
        reason: str,
        in_use: Bundle,
        site: str | None,
        marked: list[str],
        period: str | None = None,
        heard: dict[str, Any] | None = None,
        store: FeatureStore | None = None,
        note: str | None = None,
    ) -> Bundle:
        """Refit the base with the site's features, write and load the new version; `period`:
        the start of the period it ends, recorded so that a restart does not refit it again;
        `heard`: what the model in use heard during it, recorded with the outcome; `store`: the
        features of `site` when they are in memory already (not read back: a second copy);
        `note`: what the reply must say besides, kept with the outcome."""
        base = self.base()
        stores = self._site_stores(site, store)
        marks, marked = self._mark_stores(marked)
        stores += marks
        x, chunks = combine(stores)
        from_marks = flags(stores, [False] * (len(stores) - len(marked)) + [True] * len(marked))
        logic = self.event_logic(base) if self.event_logic is not None else None
        refit = site_refit(base, x, chunks, self.settings.false_alarms_per_day, from_marks, logic)
        manifest = self._refit_manifest(base, refit.manifest, reason, marked, len(x))
        bundle = self._write_refit(base, manifest, refit.arrays, in_use)
        summary = refit_summary(in_use.threshold, manifest) | (heard or {})
        if note:
            summary["note"] = note
        self._record_refit(bundle, reason, base, site, marked, period, summary)
        log.info(
            "%s: refitted %s on %d site windows: threshold %.4g -> %.4g",
            reason,
            base.model_id,
            len(x),
            in_use.threshold,
            bundle.threshold,
        )
        return bundle

    def _site_stores(self, site: str | None, store: FeatureStore | None) -> list[FeatureStore]:
        """The site's features a refit starts from: `store`, else read from `site`'s file."""
        try:
            return (
                [store or FeatureStore.load(self.folder / site, self.settings.max_windows)]
                if site
                else []
            )
        except LearningError as exc:  # every later refit would stop here: say what mends it
            raise LearningError(
                f"{exc}; the site's learnt audio is lost: learn the site again "
                f'({{"command": "learn", "action": "start"}}) or roll back'
            ) from None

    def _mark_stores(self, marked: list[str]) -> tuple[list[FeatureStore], list[str]]:
        """The features of the events `marked` normal, and which marks they are (those read)."""
        stores, readable = [], []
        for e in marked:  # a mark the card damaged costs that mark, not the period or the refit
            try:
                path = self.folder / "marked" / f"{e}.npz"
                stores.append(FeatureStore.load(path, self.settings.max_windows))
                readable.append(e)
            except LearningError as exc:
                log.error("learning: the event marked normal %s is left out: %s", e, exc)
        return stores, readable

    def _refit_manifest(
        self, base: Bundle, fitted: dict[str, Any], reason: str, marked: list[str], windows: int
    ) -> dict[str, Any]:
        """The refitted version's manifest: the base's with the refit's parts and how it was
        calibrated."""
        manifest = base.manifest.model_dump(exclude={"files", "checksum", "arrays"})
        manifest |= fitted
        manifest["calibration"] = {
            "reason": reason,
            "from_model": base.model_id,
            "seconds": round(windows * base.features.hop_seconds, 3),
            "windows": windows,
            "marked": marked,
            "created_at": now_iso(),
            "files": [],
            **({"channel": self.channel} if self.channel is not None else {}),
        }
        return manifest

    def _write_refit(
        self, base: Bundle, manifest: dict[str, Any], arrays: dict[str, Any], in_use: Bundle
    ) -> Bundle:
        """Write the refitted version and load it back as a start would; refused (and removed)
        when it does not load or makes other features than the running model."""
        try:
            path = self.history.write_version(base, manifest, {**base.arrays, **arrays})
        except VersionUnwrittenError as exc:  # the disk's fault; a bundle refused is the data's
            raise UnwrittenError(str(exc)) from None
        except BundleError as exc:  # refused before it was written (NaN arrays): the data's
            why = str(exc).split(": ", 1)[-1]  # not the temporary folder's name
            raise LearningError(f"the refitted bundle was refused: {why}") from None
        try:
            bundle = load_bundle(path)
        except SoundSentryError as exc:
            shutil.rmtree(path, ignore_errors=True)
            raise LearningError(f"the refitted bundle was refused: {exc}") from None
        if bundle.features != in_use.features:
            shutil.rmtree(path, ignore_errors=True)
            raise LearningError("the refitted bundle's features differ from the running model's")
        return bundle

    def _record_refit(
        self,
        bundle: Bundle,
        reason: str,
        base: Bundle,
        site: str | None,
        marked: list[str],
        period: str | None,
        summary: dict[str, Any],
    ) -> None:
        """Record the refitted version in the history and its outcome as the last refit."""
        self._record(
            bundle,
            reason,
            base.path,
            True,
            site=site,
            marked=marked,
            of=self.configured.model_id,
            **({"period": period} if period else {}),
            **summary,
        )
        self.last_refit = {"reason": reason, "model": bundle.model_id, **summary}

    def _record(self, bundle: Bundle, *args: Any, **detail: Any) -> None:
        """Add a version to the history; a history that cannot be written fails the refit."""
        try:
            self.history.record(bundle, *args, **detail)
        except OSError as exc:
            shutil.rmtree(bundle.path, ignore_errors=True)
            raise UnwrittenError(f"could not write the model history: {exc}") from None
        self._tidy()

    def _tidy(self) -> None:
        """Delete the site features and marks that no kept version uses: they go with the
        versions pruned from the history (each period left up to 5.3 MB for good)."""
        if self.history.unreadable:  # which versions use them is not known this run
            return
        entries = self.history.entries
        sites = {e.get("site") for e in entries}
        marks = {f"{m}.npz" for e in entries for m in e.get("marked", [])}
        unused = [p for p in self.folder.glob("site-*.npz") if p.name not in sites]
        unused += [p for p in (self.folder / "marked").glob("*.npz") if p.name not in marks]
        for path in unused:
            try:
                path.unlink()
                log.info("learning: deleted %s, which no kept version uses", path.name)
            except OSError as exc:
                log.error("learning: could not delete %s: %s", path, exc)

    def save_period(self) -> bool:
        """Save a period in progress (every SAVE_EVERY_S of audio, and when the daemon stops);
        False if it could not be written (said in the log)."""
        p = self.period
        if p is None:
            return True
        try:
            private_dir(self.folder)
            p.store.save(self.folder / f"{PERIOD}.npz")
            write_json(
                self.folder / f"{PERIOD}.json",
                {
                    "seconds": p.target_s,
                    "collected_s": p.collected_s,
                    "started_at": p.started_at,
                    "period_id": p.period_id,
                    "of": p.of,
                    **p.begun_with,
                    "heard_events": p.heard_events,
                    **({"asker": {"id": p.asker.id}} if p.asker else {}),
                },
            )
        except OSError as exc:
            log.error("learning: could not save the period: %s", exc)
            return False
        return True

    def _resume(self, bundle: Bundle) -> None:
        """A period saved before a restart continues where it was saved, if it was begun for
        the model configured now and `bundle`, the model restored, makes windows like those it
        holds (it was begun with the model then in use, a version loaded by reload_model say:
        checked against the configured model instead, it was dropped at every start)."""
        data = read_json(self.folder / f"{PERIOD}.json")
        if not data:
            return
        if self.history.unreadable:  # its version could not be recorded: left as it is
            log.error("learning: the saved period waits until %s can be read", self.history.path)
            return
        model = self.configured.model_id
        asked = data.get("asker")
        asker = Asker(asked.get("id")) if isinstance(asked, dict) else None
        if asker is not None and not isinstance(asker.id, str | None):
            asker = Asker(None)
        try:
            # saved before periods recorded their model: the one configured when the history
            # was saved (an upgrade with another model configured resumed it into that one)
            of = data.get("of") or self.history.was_configured
            if of is None:
                raise LearningError("it was saved by a release that did not record its model")
            if of != model:
                raise LearningError(f"it was begun for {of}, and {model} is configured now")
            store = FeatureStore.load(self.folder / f"{PERIOD}.npz", self.settings.max_windows)
            _check_takes(data, store.dim, bundle)
            seconds, collected = float(data["seconds"]), float(data["collected_s"])
        except (LearningError, KeyError, TypeError, ValueError) as exc:
            log.warning("learning: the saved period is dropped: %s", exc)
            self.cancel()
            self._dropped(asker, f"the saved period cannot go on: {exc}")
            return
        ident = data.get("period_id") or data.get("started_at")  # older saves: their start
        done = [e for e in self.history.entries if ident and e.get("period") == ident]
        if done:  # a power cut between the version's record and the period's deletion
            log.info("learning: the saved period ended in version %d already", done[-1]["version"])
            self.cancel()
            self._ended(asker, {**done[-1], "model": done[-1].get("model_id")})
            return
        self.period = Period(seconds, bundle, store, model, collected, asker)
        self.period.started_at = str(data.get("started_at", now_iso()))
        if data.get("period_id"):
            self.period.period_id = str(data["period_id"])
        heard = data.get("heard_events", 0)
        self.period.heard_events = heard if isinstance(heard, int) and heard > 0 else 0
        log.info("learning: resumed at %.0f of %g s", collected, seconds)


def _check_takes(begun: dict[str, Any], dim: int, bundle: Bundle) -> None:
    """LearningError unless `bundle` makes windows like a period's of `dim` features: the kind
    and feature parameters of the model it was `begun` with (Period.begun_with; saves from
    before they were recorded: the same number of features), said naming both models."""
    kind = begun.get("kind")
    was = f"{begun.get('model', 'another model')} ({kind or 'its kind unrecorded'})"
    now = f"{bundle.model_id} ({bundle.manifest.kind})"
    if kind is not None and kind != bundle.manifest.kind:
        why = "windows of another kind"
    elif "features" in begun and FeatureParams.from_dict(begun["features"]) != bundle.features:
        why = "windows of other feature parameters"
    else:
        why = _dim_differs(dim, bundle)
    if why:
        raise LearningError(f"it was begun on {was}, and {now}, in use now, makes {why}")


def _dim_differs(dim: int, bundle: Bundle) -> str:
    """How `bundle`'s windows differ from `dim` features each ("" when they do not)."""
    try:
        have = feature_dim(bundle)
    except LearningError:
        return "no windows to learn"
    return "" if have == dim else f"windows of {have} features, not {dim}"


def _heard(events: int) -> dict[str, Any]:
    """What the model in use heard during a period, for the refit's outcome: the count, and
    with any, a warning that its audio may not all have been normal running."""
    if not events:
        return {"heard_events": 0}
    warning = (
        f"during the period the model in use would have raised {events} event(s), and the "
        "refit learnt that sound as normal: if the machine was not running normally then, "
        'roll back ({"command": "rollback"}) and learn again'
    )
    log.warning("learning: %s", warning)
    return {"heard_events": events, "warning": warning}
