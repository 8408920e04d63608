"""What survives a restart: the threshold set by command, a maintenance mute and the machine's
running hours, kept in `{data_dir}/state.json` (atomic writes, mode 0600). A threshold belongs
to the model it was set on: after another model is loaded it is dropped. The running hours
belong to the machine, whatever model listens to it. The threshold and mute belong to the
device id that set them too: a replay under another id in the same data folder restored the
device's threshold and wrote its own over it (a field review); another id's are kept in
`others`, untouched.

A mute is kept as its start (wall clock), its length and how much of it had run at the last save
(monotonic), never as an end time: a Pi boots with a stale clock (fake-hwclock's last save, or
1970), against which an end time left hours or years of mute, and the next save wrote that back
as an end decades away. What a restart restores is at most what was left of the mute's own
length, and never more than MAX_MUTE_MINUTES."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.commands import MAX_MUTE_MINUTES
from edge.history import read_json, unreadable, write_json
from edge.private import private_dir, remove_stale_temps

log = logging.getLogger(__name__)

STATE = "state.json"
OWN = ("model", "threshold", "mute")
"""What state.json keeps of each device id (the running hours are the machine's)."""
LEGACY = "(before device ids)"
"""The key in `others` of the settings of a state.json written before it named device ids, kept
there by a replay that read them until the device's own daemon takes them (no device id can
hold a space)."""
MAX_MUTE_S = MAX_MUTE_MINUTES * 60.0


@dataclass(frozen=True)
class SavedMute:
    """A running mute as saved: when it began (wall clock), its length, and the seconds of it
    that had run by the save (monotonic, so a clock set meanwhile does not count)."""

    started: float
    seconds: float
    ran: float = 0.0

    def left(self, now: float) -> float:
        """Seconds still to run at wall time `now`: the length less what has run, by the
        saved count or by the clock, whichever is more (a clock behind the start, as at a boot
        without a real-time clock, says nothing); at most MAX_MUTE_S; 0 when over."""
        elapsed = now - self.started
        ran = max(self.ran, elapsed) if elapsed >= 0 else self.ran
        return max(0.0, min(self.seconds - ran, self.seconds, MAX_MUTE_S))


class DeviceState:
    """The persisted threshold, mute and running seconds of one device."""

    def __init__(self, data_dir: Path, device_id: str | None = None, live: bool = True) -> None:
        """`live`: the device's own daemon, which takes the settings of a file from before
        device ids as its own; a replay reads them and leaves them for the device."""
        self.path = data_dir / STATE
        self.device_id = device_id
        self.unsaved = False
        """The last save failed (a full card): the daemon tries again soon, not at its next
        10-minute save (a threshold set by command came back after a restart; a review)."""
        remove_stale_temps(data_dir)  # a save of state.json cut short by a power cut
        read = read_json(self.path)
        self.unreadable = unreadable(self.path, read)
        """state.json is there but cannot be read: not written over this run."""
        data = read or {}
        self.running_seconds: float = _number(data.get("running_seconds")) or 0.0
        others = data.get("others")
        self.others: dict[str, Any] = dict(others) if isinstance(others, dict) else {}
        """Other device ids' threshold, model and mute, kept as they were, and (LEGACY) those
        of a file from before device ids that no live daemon has taken yet."""
        writer = data.get("device_id")
        writer = writer if isinstance(writer, str) else None
        if device_id is None:  # a reader of no id (a tool, a test) writes back the writer's
            self.device_id = writer
        elif writer is None:
            # a file from before device ids: the device's. A replay (another id, or the
            # device's own) reads them as it did, and leaves them for the device to take
            old = {k: data.get(k) for k in (*OWN, "muted_until")}
            if not live and any(v is not None for v in old.values()):
                self.others.setdefault(LEGACY, old)
        elif writer != device_id:
            # the last writer was another id: its settings are kept, this one's come from others
            self.others[writer] = {k: data.get(k) for k in OWN}
            mine = self.others.pop(device_id, None)
            if not isinstance(mine, dict):
                mine = self.others.pop(LEGACY, None) if live else self.others.get(LEGACY)
            if not isinstance(mine, dict) and live:
                log.warning(
                    "%s was written by device id %s, whose threshold and mute are kept for it; "
                    "%s has none saved (a renamed host? set them again)",
                    self.path, writer, device_id,
                )  # fmt: skip
            data = mine if isinstance(mine, dict) else {}
        if live:  # once the device's, the old file's settings go to no other id
            self.others.pop(LEGACY, None)
        self.model: str | None = data.get("model")
        self.threshold: float | None = _number(data.get("threshold"))
        self.mute: SavedMute | None = _mute(data.get("mute"))
        self.muted_until: float = _number(data.get("muted_until")) or 0.0
        """The old format's end of a mute (epoch seconds), read when there is no `mute`."""

    def threshold_for(self, model_id: str) -> float | None:
        """The threshold set by command for this model, if any."""
        return self.threshold if self.model == model_id else None

    def restored_mute(self, now: float | None = None) -> SavedMute | None:
        """The persisted mute with `seconds` cut to what is left of it at wall time `now`
        (`started` and `ran` kept), None if none is running. A file of the old format gives
        only an end: what is left by the clock, at most MAX_MUTE_S."""
        now = time.time() if now is None else now
        if self.mute is not None:
            left = self.mute.left(now)
            if left <= 0:
                return None
            return SavedMute(self.mute.started, self.mute.seconds, self.mute.seconds - left)
        left = min(self.muted_until - now, MAX_MUTE_S) if self.muted_until else 0.0
        return SavedMute(now, left) if left > 0 else None

    def save(
        self,
        model_id: str,
        threshold: float | None,
        mute: SavedMute | None,
        running_seconds: float,
    ) -> None:
        """Record the current threshold override, mute and running seconds; a write error is
        logged, not raised (the running detector is right either way)."""
        self.model, self.threshold, self.mute = model_id, threshold, mute
        self.muted_until = 0.0  # the old format's end is read once and never written again
        self.running_seconds = running_seconds
        data: dict[str, Any] = {
            "model": model_id,
            "threshold": threshold,
            "mute": None
            if mute is None
            else {"started": mute.started, "seconds": mute.seconds, "ran": round(mute.ran, 1)},
            "running_seconds": round(running_seconds, 1),
        }
        if self.device_id is not None:
            data["device_id"] = self.device_id
        if self.others:
            data["others"] = self.others
        if self.unreadable:  # said once, when it could not be read
            return
        try:
            private_dir(self.path.parent)
            write_json(self.path, data)
        except OSError as exc:  # the daemon tries again (STATE_RETRY_S): said once
            level = logging.DEBUG if self.unsaved else logging.ERROR
            log.log(level, "could not save %s: %s (tried again every minute)", self.path, exc)
            self.unsaved = True
            return
        if self.unsaved:
            log.info("saved %s again", self.path)
        self.unsaved = False


def _mute(value: Any) -> SavedMute | None:
    """A saved mute from JSON, else None."""
    if not isinstance(value, dict):
        return None
    started, seconds = _number(value.get("started")), _number(value.get("seconds"))
    if started is None or seconds is None:
        return None
    return SavedMute(started, min(seconds, MAX_MUTE_S), _number(value.get("ran")) or 0.0)


def _number(value: Any) -> float | None:
    """A finite positive number from JSON, else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf"):
        return float(value)
    return None
