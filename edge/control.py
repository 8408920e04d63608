"""Remote control and reloads, executed on the daemon's loop thread.

MQTT's network thread and signal handlers call `submit_*`, which only enqueue (a bounded
queue: a flood is shed and counted); the daemon loop runs the work between blocks. Every
failure to parse, validate or carry out a command ends in a rejected reply, never in an
exception out of the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.adapt import Asker
from edge.bundle import Bundle, load_bundle, read_manifest
from edge.commands import (
    MAX_COMMAND_BYTES,
    Command,
    CommandError,
    Learn,
    MarkNormal,
    Mute,
    ReloadModel,
    ReplyTo,
    Rollback,
    SetThreshold,
    Status,
    Unmute,
    check_size,
    parse_command,
)
from edge.daemon import Detector
from edge.errors import SoundSentryError
from edge.messages import ResponseMessage, iso
from edge.settings import Settings
from edge.threshold import interval_text, rate_text

log = logging.getLogger(__name__)

RETAINED_REFUSAL = (
    "rejected: the command was published retained, and a retained command is never run (stored "
    "on the broker, it would run again at every start): publish it without retain, and clear "
    "the stored one with an empty retained message on the same topic"
)
SHED_REPLY = "busy: the command queue was full, and this command was not run; send it again"
SHED_REPLIES = 1000
"""At most this many shed commands wait for their `busy` reply (the oldest go first)."""
REPEAT_WINDOW_S = 300.0
"""A command with the `id` and content of the last one answered, this recently, is a repeated
delivery (MQTT QoS 1 delivers at least once): it gets the first reply again and is not run
again, so a rollback does not step back twice, nor a learn start restart the period."""


class Controller:
    """Applies commands and reloads to a Detector through its public API."""

    def __init__(self, detector: Detector, reload_settings: Callable[[], Settings] | None = None):
        self.detector = detector
        self.reload_settings = reload_settings
        self._last: tuple[str, float, ResponseMessage] | None = None
        """The last command run, if it had an id: its id and content, when, and its reply."""
        self._running: Command | None = None
        """The command being run: a `learn stop` or `cancel` sent with its start's id is itself
        the start's second reply (where that command asked for its reply)."""
        self._running_reply_to: ReplyTo | None = None
        """Where the command being run asked for its reply (MQTT 5)."""
        detector.answer_learning_ends(self._learning_ended)
        self._shed: deque[tuple[str, str | None, str, ReplyTo | None]] = deque(maxlen=SHED_REPLIES)
        """Name, id, reply and reply address of commands a full queue shed, from the MQTT
        thread: answered (`busy`, or a retained command's refusal) once the queue is worked
        off."""
        self._shed_lock = threading.Lock()
        """Held while a command is queued or shed, and while the loop sees the queue empty and
        takes the shed: else one shed just as the loop ran its last queued command waited for
        its `busy` until the next command came."""

    def submit_payload(self, payload: bytes, reply_to: ReplyTo | None = None) -> None:
        """From the MQTT thread: queue a raw command for the loop (shed if the queue is full).
        One over the size limit is not held while it waits (64 of the broker's largest would
        take a Pi's memory): only its size is. `reply_to`: where its MQTT 5 Response Topic
        asks for the reply (beside `response`)."""
        if not payload:  # how a retained command is cleared (`mosquitto_pub -r -n`)
            log.info("empty command message ignored (a retained command cleared)")
            return
        if len(payload) > MAX_COMMAND_BYTES:
            size = len(payload)
            self._queue(
                lambda: self.handle_payload(b"", oversize=size, reply_to=reply_to),
                lambda: ("invalid", None, SHED_REPLY, reply_to),
            )
            return
        self._queue(
            lambda: self.handle_payload(payload, reply_to=reply_to),
            lambda: (*_name_and_id(payload), SHED_REPLY, reply_to),
        )

    def _queue(
        self,
        work: Callable[[], object],
        shed: Callable[[], tuple[str, str | None, str, ReplyTo | None]],
    ) -> None:
        """Queue `work` for the loop, or keep `shed()` (name, id, reply, address: a command
        parsed for it only when shed) to be answered once the queue is worked off."""
        with self._shed_lock:
            if not self.detector.submit(work):
                self._shed.append(shed())

    def _answer_shed(self) -> None:
        """Reply to the commands a full queue shed, once the queue has been worked off (on the
        loop): a Node-RED flow waiting for the reply to its id waited for ever (in a review).
        Not before: a QoS 1 copy of a command still queued got `busy` before the command's
        own reply, and a flow that takes the first reply sent it again (a second review)."""
        with self._shed_lock:
            if self.detector.work_waiting():
                return
            shed = list(self._shed)
            self._shed.clear()
        for name, cid, detail, reply_to in shed:  # replied outside the lock: the MQTT thread
            self._reply(name, cid, False, detail, reply_to=reply_to)  # never waits on a send

    def submit_retained(self, payload: bytes, reply_to: ReplyTo | None = None) -> None:
        """From the MQTT thread: a command published retained, answered with a refusal and never
        run (stored on the broker, it would run again at every start)."""
        kept = payload[:MAX_COMMAND_BYTES]
        self._queue(
            lambda: self.refuse_retained(kept, reply_to),
            lambda: (*_name_and_id(kept), RETAINED_REFUSAL, reply_to),
        )

    def refuse_retained(self, payload: bytes, reply_to: ReplyTo | None = None) -> ResponseMessage:
        """The refusal of a retained command, under its name and id when it has them."""
        try:
            name, cid = _name_and_id(payload)
            return self._reply(name, cid, False, RETAINED_REFUSAL, reply_to=reply_to)
        finally:
            self._answer_shed()

    def submit_reload(self) -> None:
        """From the SIGHUP handler: queue a settings and model reload, after which the commands
        a full queue shed are answered if the queue is empty (queued as the last command ran,
        it was the work that command left them to)."""
        self.detector.submit_from_signal(self._reload_and_answer)

    def _reload_and_answer(self) -> None:
        try:
            self.reload()
        finally:
            self._answer_shed()

    def handle_payload(
        self, payload: bytes, oversize: int = 0, reply_to: ReplyTo | None = None
    ) -> ResponseMessage:
        """Validate and run one command; reply with the outcome, whatever the payload
        (`oversize`: the size of one too large to be kept; `reply_to`: where else the reply
        goes); then the commands a full queue shed are answered, if the queue is empty."""
        try:
            return self._handle_payload(payload, oversize, reply_to)
        finally:
            self._answer_shed()

    def _handle_payload(
        self, payload: bytes, oversize: int, reply_to: ReplyTo | None
    ) -> ResponseMessage:
        try:
            check_size(oversize)
            command = parse_command(payload)
        except CommandError as exc:
            log.warning("rejected command %s%s: %s", exc.command, _id_text(exc.command_id), exc)
            detail = f"rejected: {exc}"
            return self._reply(exc.command, exc.command_id, False, detail, reply_to=reply_to)
        key = command.model_dump_json() if command.id is not None else None
        first = self._repeat_of(key) if key else None
        if first is not None:
            log.info(
                "command %s%s: a repeated delivery, not run again",
                first.command,
                _id_text(first.id),
            )
            self.detector.respond(first, reply_to)
            return first
        reply = self._handle(command, reply_to)
        # A delivery repeated by QoS 1 comes before anything else is run; once another command
        # has run, the same id and content is a new request (mute, unmute, mute: muted again).
        self._last = (key, time.monotonic(), reply) if key else None
        return reply

    def _repeat_of(self, key: str) -> ResponseMessage | None:
        """The reply to the last command run, if it had this id and content and ran within
        REPEAT_WINDOW_S."""
        if self._last is None:
            return None
        last, when, reply = self._last
        return reply if last == key and time.monotonic() - when <= REPEAT_WINDOW_S else None

    def _handle(self, command: Command, reply_to: ReplyTo | None = None) -> ResponseMessage:
        """Run a valid command and reply with the outcome."""
        self._running = command
        self._running_reply_to = reply_to
        name, cid = command.command, command.id
        try:
            detail, status = self._run(command)
        except CommandError as exc:
            log.warning("rejected command %s%s: %s", name, _id_text(cid), exc)
            return self._reply(name, cid, False, f"rejected: {exc}", reply_to=reply_to)
        except Exception as exc:  # a bug must cost one command, not the monitor
            log.exception("command %s failed", name)
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            return self._reply(name, cid, False, f"failed: {reason}", reply_to=reply_to)
        finally:
            self._running = None
            self._running_reply_to = None
        log.info("command %s%s: %s", name, _id_text(cid), detail)
        return self._reply(name, cid, True, detail, status, reply_to)

    def _run(self, command: Command) -> tuple[str, dict[str, Any] | None]:
        d = self.detector
        if isinstance(command, Mute):
            until = d.mute(command.minutes)
            return f"muted for {command.minutes:g} min, until {iso(until)}", None
        if isinstance(command, Unmute):
            d.unmute()
            return "unmuted", None
        if isinstance(command, SetThreshold):
            low, high = d.threshold_bounds()
            if not low <= command.value <= high:
                raise CommandError(f"value must be within [{low:.6g}, {high:.6g}]")
            d.set_threshold(command.value)
            return f"threshold set to {command.value:.6g}", None
        if isinstance(command, ReloadModel):
            target = self._allowed(command.path) if command.path else d.settings.model
            # the new model's threshold, marks and history with it, as a mark's and a
            # rollback's reply has them (its reply said "loaded X" alone: a field review)
            return self._reload_model(target), d.status()
        if isinstance(command, Status):
            return "status", d.status()
        if isinstance(command, Learn | MarkNormal | Rollback):
            try:
                return self._learning(command)
            except (SoundSentryError, OSError) as exc:
                raise CommandError(" ".join(str(exc).split())) from None
        raise CommandError(f"unknown command {command!r}")  # pragma: no cover - union is closed

    def _learning(
        self, command: Learn | MarkNormal | Rollback
    ) -> tuple[str, dict[str, Any] | None]:
        """learn, mark_normal and rollback; a failure raises and keeps the running model."""
        d = self.detector
        if isinstance(command, Rollback):
            return f"rolled back to {d.rollback()}", d.status()
        if isinstance(command, MarkNormal):
            out = d.mark_normal(command.event_id)
            return f"event {out['event_id']} marked normal: {_refit_line(out)}", d.status()
        if command.action == "start":
            seconds = d.start_learning(command.seconds, Asker(command.id, self._running_reply_to))
            paused = (  # a mute's audio is not learnt (maintenance is not normal running)
                "; paused while muted: it learns once unmuted" if d.muted else ""
            )
            return (
                f"learning for {seconds:g} s of audio; no anomaly events until it ends{paused}; "
                "a second reply says how it ended",
                None,
            )
        if command.action == "cancel":
            d.cancel_learning()
            return f"learning cancelled, keeping {d.bundle.model_id}", None
        out = d.stop_learning()
        return f"learning stopped: {_refit_line(out)}", d.status()

    def _learning_ended(self, asker: Asker, outcome: dict[str, Any]) -> None:
        """The second reply to a `learn start` (same id), however its period ended: ok when a
        new version runs from it; a refit that failed, or a period dropped unfinished, was
        said only in the journal. A `learn stop` or `cancel` with the start's own id is that
        reply already."""
        running = self._running  # a stop or cancel: its reply is the outcome, under its id
        stopping = isinstance(running, Learn) and running.action != "start"
        if stopping and running.id is not None and running.id == asker.id:
            return
        d = self.detector
        how = " by `learn stop`" if outcome.get("ended_by") == "stop" else ""
        to = asker.reply_to
        if "dropped" in outcome:
            detail = f"learning dropped: {outcome['dropped']}"
            self._reply("learn", asker.id, False, detail, reply_to=to)
        elif "error" in outcome:
            detail = (
                f"learning ended{how}, keeping {d.bundle.model_id}: refit failed: "
                f"{outcome['error']}"
            )
            self._reply("learn", asker.id, False, detail, reply_to=to)
        else:
            line = f"learning ended{how}: {_refit_line(outcome)}"
            self._reply("learn", asker.id, True, line, d.status(), to)

    def _allowed(self, path: Path) -> Path:
        """A bundle name in a models folder, or a path inside one; anything else is refused."""
        folders = self.detector.settings.model_folders
        where = ", ".join(str(f) for f in folders)
        if ".." in path.parts or str(path) in ("", "."):
            raise CommandError(f"model path refused: bundles load only from {where}")
        if not path.is_absolute():  # a name, relative to the models folders, never to our cwd
            try:
                found = next((f / path for f in folders if (f / path).exists()), None)
            except OSError as exc:  # a name too long for the file system, say
                raise CommandError(f"model path not usable: {exc.strerror}") from None
            if found is None:
                raise CommandError(f"no bundle named {str(path)!r} in the models folder")
            path = found
        elif not any(_within(path, folder) for folder in folders):  # before the file system is
            # asked whether it exists: a sender learnt whether any path does ("not usable: No
            # such file" against "refused", in the security review); a link to a models folder
            # still leads there (resolved without needing the path to exist)
            raise CommandError(f"model path refused: bundles load only from {where}")
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise CommandError(f"model path not usable: {' '.join(str(exc).split())}") from None
        for folder in folders:
            try:
                base = folder.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if real != base and real.is_relative_to(base):
                return real
        raise CommandError(f"model path refused: bundles load only from {where}")

    def _reload_model(self, target: Path | None) -> str:
        d = self.detector
        if target is None:
            raise CommandError("no model path given and none configured")
        bundle = self._load(target)
        if bundle.model_id == d.bundle.model_id:
            d.use_bundle(bundle)
        else:
            d.use_bundle(bundle, reason=_reason(bundle))
        return f"loaded {bundle.model_id}, threshold {d.threshold:.4g}"

    def _load(self, target: Path) -> Bundle:
        d = self.detector
        try:
            bundle = load_bundle(target)
        except SoundSentryError as exc:
            raise CommandError(f"model not loaded, keeping {d.bundle.model_id}: {exc}") from None
        if not bundle.features.same_settings(d.bundle.features):
            raise CommandError(
                f"model not loaded, keeping {d.bundle.model_id}: its features differ "
                "(restart the daemon to switch feature settings)"
            )
        return bundle

    def reload(self) -> None:
        """SIGHUP: re-read settings and the model; on any error keep what runs."""
        d = self.detector
        if self.reload_settings is None:
            return
        try:
            new = self.reload_settings()
        except SoundSentryError as exc:
            log.error("reload: settings not applied: %s", exc)
            return
        old = d.settings
        _warn_restart_only(new, old)
        applied = _applied_now(new, old)
        version, same, replaced, switching = self._model_change(new, old)
        bundle = self._load_for_reload(new.model) if switching else None
        if not self._apply_reloaded(old, applied, bundle):
            return
        if bundle is not None:
            d.reconfigure(bundle)
            log.info("reload: loaded %s, the configured model now", bundle.model_id)
            return
        if switching:  # its model did not load: said above
            return
        self._reload_unswitched(new.model, version, same, replaced)

    def _model_change(self, new: Settings, old: Settings) -> tuple[int | None, bool, bool, bool]:
        """For a reload to `new`: the learned version running (None without one), whether the
        configured model path is the same, whether a new model was written there, and whether
        to switch models before the settings apply."""
        d = self.detector
        version = d.adapter.history.active if d.adapter is not None else None
        configured = d.adapter.configured_path if d.adapter is not None else old.model
        same = _same_path(new.model, configured)  # not old.model: a load that failed is retried
        replaced = same and self._replaced(new.model)
        # another model, or new contents at the configured path (a retrained bundle): loaded
        # first, so that the settings are checked against the model they will run with. Without
        # an adapter (`replay`) a model is reloaded unless the running one is it, byte for byte
        if d.adapter is not None:
            switching = new.model is not None and (not same or replaced)
        else:
            switching = new.model is not None and not (same and _holds(new.model, d.bundle))
        return version, same, replaced, switching

    def _load_for_reload(self, model: Path) -> Bundle | None:
        """The bundle a reload switches to, None (said) when it does not load."""
        try:
            return self._load(model)
        except CommandError as exc:  # the settings still apply, to the running model
            log.error("reload: %s", exc)
            return None

    def _apply_reloaded(self, old: Settings, applied: Settings, bundle: Bundle | None) -> bool:
        """Apply a reload's settings (with `bundle`, if one loaded) and say what took effect;
        False (said) when they are not applied."""
        try:
            self.detector.apply_settings(applied, bundle)
        except SoundSentryError as exc:  # the detector settings the model cannot take
            log.error("reload: settings not applied: %s", exc)
            return False
        # what took effect, said (a SIGHUP that applied a new cooldown said only that the
        # model was unchanged, in a field test)
        changes = _changes(
            old, applied, ("detector", "clips", "health", "models_dir", "state_interval_seconds")
        )
        log.info(
            "reload: %s", f"applied {changes}" if changes else "no setting that applies now changed"
        )
        return True

    def _reload_unswitched(
        self, model: Path | None, version: int | None, same: bool, replaced: bool
    ) -> None:
        """After a reload that switched no model: keep the running one when it is unchanged,
        else load the configured one."""
        d = self.detector
        if version is not None and same and not replaced:
            log.info("reload: the model is unchanged: keeping version %d", version)
            broken = _unloadable(model)
            if broken:  # "unchanged", and the next start failed on it (an operator's review)
                log.error(
                    "reload: the configured model %s does not load (%s): version %d goes on "
                    "until the daemon restarts, which fails until the bundle is put back",
                    model, broken, version,
                )  # fmt: skip
            return
        if same and not replaced and _holds(model, d.bundle):
            # the running model, reloaded, would only drop the threshold set by command
            log.info("reload: the model is unchanged: keeping %s", d.bundle.model_id)
            return
        try:
            detail = self._reload_model(model)
            log.info("reload: %s", detail)
        except CommandError as exc:
            log.error("reload: %s", exc)

    def _replaced(self, path: Path | None) -> bool:
        """The configured path now holds another model than the one learned from (a bundle
        trained again and written over it): reloading it is what SIGHUP is for. A bundle that
        does not load there is no reason to leave the running version."""
        adapter = self.detector.adapter
        if path is None or adapter is None:
            return False
        try:
            return read_manifest(path).checksum != adapter.configured.manifest.checksum
        except SoundSentryError:
            return False

    def status(self) -> dict[str, Any]:
        """A status report."""
        return self.detector.status()

    def _reply(
        self,
        command: str,
        cid: str | None,
        ok: bool,
        detail: str,
        status: dict[str, Any] | None = None,
        reply_to: ReplyTo | None = None,
    ) -> ResponseMessage:
        d = self.detector
        message = ResponseMessage(
            command=command,
            ok=ok,
            device_id=d.settings.device_id,
            updated_at=iso(d.clock()),
            id=cid,
            detail=detail,
            status=status,
        )
        d.respond(message, reply_to)
        return message


def _name_and_id(payload: bytes) -> tuple[str, str | None]:
    """A command's name and id, for a reply to one not run (`invalid` and None if it has none)."""
    try:
        command = parse_command(payload)
        return command.command, command.id
    except CommandError as exc:
        return exc.command, exc.command_id


def _warn_restart_only(new: Settings, old: Settings) -> None:
    """Warn of the reloaded settings that take effect only after a restart."""
    if new.mqtt != old.mqtt or new.audio != old.audio or new.device_id != old.device_id:
        log.warning("reload: [mqtt], [audio] and device_id changes apply after a restart")
    if new.web != old.web:  # a rotated token_file too: the old token stays valid till then
        log.warning("reload: [web] changes (its token_file too) apply after a restart")
    if new.learning != old.learning:  # the site's versions and periods are kept by them
        log.warning("reload: [learning] changes apply after a restart")
    later = [k for k in ("data_dir", "log_level") if getattr(new, k) != getattr(old, k)]
    if later:  # "no setting that applies now changed" alone (an operator's review)
        log.warning("reload: %s changes apply after a restart", " and ".join(later))
    h, was = new.health, old.health
    if (h.stall_seconds, h.reopen_max_seconds) != (was.stall_seconds, was.reopen_max_seconds):
        log.warning(
            "reload: [health] stall_seconds and reopen_max_seconds apply to the microphone's "
            "reopening after a restart"
        )


def _applied_now(new: Settings, old: Settings) -> Settings:
    """The running settings with the reloaded ones that apply without a restart."""
    h, was = new.health, old.health
    return old.model_copy(
        update={
            "detector": new.detector,
            "model": new.model,
            "models_dir": new.models_dir,
            "clips": new.clips,
            "state_interval_seconds": new.state_interval_seconds,  # from the next state
            # as said above: the running capture keeps its blocks and reopening, and
            # its stall time with them (checked against its block length at start)
            "health": h.model_copy(
                update={
                    "stall_seconds": was.stall_seconds,
                    "reopen_max_seconds": was.reopen_max_seconds,
                }
            ),
        }
    )


def _reason(bundle: Bundle) -> str:
    """Why a loaded bundle enters the history: `calibrate` for a `soundsentry calibrate`
    output, else `reload`."""
    cal = bundle.manifest.calibration or {}
    return "calibrate" if cal.get("from_model") and "reason" not in cal else "reload"


def _refit_line(out: dict[str, Any]) -> str:
    """Old and new threshold and the predicted alarm rate of a refit, in a reply. The refitted
    model scores on a scale of its own: a lower threshold than the old one is no more sensitive
    (a new user read "2.507 -> 2.333" after marking a false alarm normal as the opposite)."""
    low, high = out.get("predicted_interval_per_day") or (None, None)
    return (
        f"model {out.get('model')}, threshold {_num(out.get('old_threshold'))} -> "
        f"{_num(out.get('new_threshold'))} (on the refitted model's own scale), predicted false "
        f"alarms per day {_per_day(out.get('predicted_false_alarms_per_day'))} (95% interval "
        f"{'? to ?' if low is None or high is None else interval_text(low, high)})"
        + (f"; {out['note']}" if out.get("note") else "")
        + (f"; WARNING: {out['warning']}" if out.get("warning") else "")
    )


def _per_day(value: Any) -> str:
    """As the training summary writes a rate ("0.0005826 to 1297" here, "<0.001 to 1.3e+03"
    there: the same interval in two forms)."""
    return "?" if value is None else rate_text(value)


def _num(value: Any) -> str:
    return "?" if value is None else f"{value:.4g}"


def _holds(path: Path | None, bundle: Bundle) -> bool:
    """The bundle at `path` is `bundle`, byte for byte (its manifest's checksum covers every
    file's hash): a model id alone is the fitted arrays', and a bundle trained again with another
    budget has the same id and another threshold. False when it cannot be read."""
    if path is None:
        return False
    try:
        return read_manifest(path).checksum == bundle.manifest.checksum
    except SoundSentryError:
        return False


def _within(path: Path, folder: Path) -> bool:
    """`path` (absolute) lies inside `folder`, as written or with the links of both followed
    as far as they exist (a path that does not exist resolves as written: whether it exists is
    not told); the strict resolve after must still land inside."""
    try:
        paths, folders = {path, path.resolve()}, {folder, folder.resolve()}
    except (OSError, RuntimeError):  # a loop of links: as written
        paths, folders = {path}, {folder}
    return any(p != f and p.is_relative_to(f) for p in paths for f in folders)


def _unloadable(path: Path | None) -> str | None:
    """Why the bundle at `path` does not load as a start would load it, None when it does."""
    if path is None:
        return None
    try:
        load_bundle(path)
    except SoundSentryError as exc:
        return str(exc)
    return None


def _same_path(a: Path | None, b: Path | None) -> bool:
    """Both name the same file (or neither is set)."""
    if a is None or b is None:
        return a is b
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return Path(a) == Path(b)


def _id_text(command_id: str | None) -> str:
    """A command's id as its audit line names it: ` (id X)`, or nothing for a command sent
    without one (`(id None)` read as an id of that name)."""
    return "" if command_id is None else f" (id {command_id})"


def _changes(old: Any, new: Any, names: tuple[str, ...]) -> str:
    """The settings of `names` that differ, as `[section] key old -> new`, comma-separated."""
    said = []
    for name in names:
        was, now = getattr(old, name), getattr(new, name)
        if was == now:
            continue
        if not hasattr(was, "model_dump"):
            said.append(f"{name} {was} -> {now}")
            continue
        before, after = was.model_dump(), now.model_dump()
        said += [
            f"[{name}] {key} {before.get(key)} -> {after.get(key)}"
            for key in after
            if before.get(key) != after.get(key)
        ]
    return ", ".join(said)
