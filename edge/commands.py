"""Remote control: JSON commands on `{prefix}/{device_id}/set`, validated before they act."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

MAX_MUTE_MINUTES = 7 * 24 * 60
THRESHOLD_FACTOR = 4.0
"""set_threshold accepts values within [calibrated / 4, calibrated * 4]."""


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = Field(None, max_length=100, description="Echoed in the response.")


class Mute(_Command):
    """Silence anomaly events for maintenance; an open anomaly is ended."""

    command: Literal["mute"]
    minutes: float = Field(gt=0, le=MAX_MUTE_MINUTES)


class Unmute(_Command):
    """End a mute early."""

    command: Literal["unmute"]


class SetThreshold(_Command):
    """Change the decision threshold (within bounds of the calibrated one)."""

    command: Literal["set_threshold"]
    value: float = Field(gt=0)


class ReloadModel(_Command):
    """Load a bundle (default: the configured one); on failure the current model stays."""

    command: Literal["reload_model"]
    path: Path | None = None


class Status(_Command):
    """Ask for a status report."""

    command: Literal["status"]


Command = Annotated[
    Mute | Unmute | SetThreshold | ReloadModel | Status, Field(discriminator="command")
]
_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


class CommandError(ValueError):
    """A command that is not valid; its message says why."""

    def __init__(self, reason: str, command: str = "invalid", command_id: str | None = None):
        super().__init__(reason)
        self.command = command
        self.command_id = command_id


def parse_command(payload: bytes | str) -> Command:
    """Parse and validate a command payload, or raise CommandError with the reason."""
    try:
        data = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CommandError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CommandError("a command is a JSON object with a 'command' key")
    name = str(data.get("command", "invalid"))
    cid = data.get("id") if isinstance(data.get("id"), str) else None
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"][1:] or err["loc"])
        raise CommandError(f"{where}: {err['msg']}", name, cid) from None


def threshold_bounds(calibrated: float) -> tuple[float, float]:
    """Allowed range for set_threshold."""
    return calibrated / THRESHOLD_FACTOR, calibrated * THRESHOLD_FACTOR
