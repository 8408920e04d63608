"""Remote control and reloads, executed on the daemon's loop thread.

MQTT's network thread and signal handlers call `submit_*`, which only enqueue; the daemon
loop runs the work between blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.bundle import load_bundle
from edge.commands import (
    Command,
    CommandError,
    Mute,
    ReloadModel,
    SetThreshold,
    Status,
    Unmute,
    parse_command,
    threshold_bounds,
)
from edge.daemon import Detector
from edge.errors import SoundSentryError
from edge.messages import ResponseMessage, iso
from edge.settings import Settings

log = logging.getLogger(__name__)


class Controller:
    """Applies commands and reloads to a Detector."""

    def __init__(self, detector: Detector, reload_settings: Callable[[], Settings] | None = None):
        self.detector = detector
        self.reload_settings = reload_settings

    def submit_payload(self, payload: bytes) -> None:
        """From the MQTT thread: queue a raw command for the loop."""
        self.detector.work.put(lambda: self.handle_payload(payload))

    def submit_reload(self) -> None:
        """From the SIGHUP handler: queue a settings and model reload."""
        self.detector.work.put(self.reload)

    def handle_payload(self, payload: bytes) -> ResponseMessage:
        """Validate and run one command; reply with the outcome."""
        try:
            command = parse_command(payload)
        except CommandError as exc:
            log.warning("rejected command %s: %s", exc.command, exc)
            return self._reply(exc.command, exc.command_id, False, f"rejected: {exc}")
        try:
            detail, status = self._run(command)
        except CommandError as exc:
            log.warning("rejected command %s: %s", command.command, exc)
            return self._reply(command.command, command.id, False, f"rejected: {exc}")
        log.info("command %s: %s", command.command, detail)
        return self._reply(command.command, command.id, True, detail, status)

    def _run(self, command: Command) -> tuple[str, dict[str, Any] | None]:
        d = self.detector
        if isinstance(command, Mute):
            d.close_event()
            d.muted_until = d.clock() + command.minutes * 60
            d.emit_state()
            return f"muted for {command.minutes:g} min, until {iso(d.muted_until)}", None
        if isinstance(command, Unmute):
            d.muted_until = 0.0
            d.emit_state()
            return "unmuted", None
        if isinstance(command, SetThreshold):
            low, high = threshold_bounds(d.bundle.threshold)
            if not low <= command.value <= high:
                raise CommandError(f"value must be within [{low:.6g}, {high:.6g}]")
            d.pipeline.events.threshold = command.value
            d.emit_state()
            return f"threshold set to {command.value:.6g}", None
        if isinstance(command, ReloadModel):
            return self._reload_model(command.path), None
        if isinstance(command, Status):
            return "status", self.status()
        raise CommandError(f"unknown command {command!r}")  # pragma: no cover - union is closed

    def _reload_model(self, path: Path | None) -> str:
        d = self.detector
        target = path or d.settings.model
        if target is None:
            raise CommandError("no model path given and none configured")
        try:
            bundle = load_bundle(target)
        except SoundSentryError as exc:
            raise CommandError(f"model not loaded, keeping {d.bundle.model_id}: {exc}") from None
        if bundle.features != d.bundle.features:
            raise CommandError(
                f"model not loaded, keeping {d.bundle.model_id}: its features differ "
                "(restart the daemon to switch feature settings)"
            )
        d.use_bundle(bundle)
        d.emit_state()
        return f"loaded {bundle.model_id}"

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
        if new.mqtt != old.mqtt or new.audio != old.audio or new.device_id != old.device_id:
            log.warning("reload: [mqtt], [audio] and device_id changes apply after a restart")
        d.settings = old.model_copy(
            update={
                "detector": new.detector,
                "model": new.model,
                "clips": new.clips,
                "health": new.health,
            }
        )
        try:
            detail = self._reload_model(new.model)
            log.info("reload: %s", detail)
        except CommandError as exc:
            log.error("reload: %s", exc)
            d.use_bundle(d.bundle)  # apply the new detector settings to the current model

    def status(self) -> dict[str, Any]:
        """A status report."""
        d = self.detector
        depth, dropped = d.spool_stats()
        return {
            "state": d.current_state(),
            "model": d.bundle.model_id,
            "threshold": d.pipeline.threshold,
            "calibrated_threshold": d.bundle.threshold,
            "muted_until": iso(d.muted_until) if d.muted else None,
            "faults": sorted(d.health.active),
            "windows_scored": d.metrics.windows,
            "uptime_s": round(d.metrics.uptime_s, 1),
            "spool_depth": depth,
            "spool_dropped": dropped,
            "level_dbfs": round(d.health.level, 1),
        }

    def _reply(
        self,
        command: str,
        cid: str | None,
        ok: bool,
        detail: str,
        status: dict[str, Any] | None = None,
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
        d.respond(message)
        return message
