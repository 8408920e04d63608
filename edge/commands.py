"""Remote control: JSON commands on `{prefix}/{device_id}/set`, validated before they act."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

MAX_COMMAND_BYTES = 64 * 1024
"""Larger payloads are refused before they are parsed."""
MAX_JSON_DEPTH = 8
"""Commands are flat objects; deeper nesting is refused before it is parsed."""
MAX_MUTE_MINUTES = 7 * 24 * 60
MAX_LEARN_SECONDS = 30 * 24 * 3600
"""Longest commissioning period: 30 days of audio."""
EVENT_ID = r"^(last|[A-Za-z0-9_-]{1,64}(\.wav)?)$"
"""`last`, an event's id, or its clip's name as `events` lists it (edge.clips.event_of)."""
LAST = "last"
"""mark_normal's event_id for the most recent event."""
THRESHOLD_FACTOR = 4.0
"""set_threshold accepts values within [calibrated / 4, calibrated * 4]."""


@dataclass(frozen=True)
class ReplyTo:
    """Where an MQTT 5 command asked for its reply (its Response Topic) and what to send back
    with it (its Correlation Data): the request/response of Node-RED's MQTT nodes and of other
    MQTT 5 clients. The reply goes to the device's `response` topic as well, as for any command."""

    topic: str
    correlation: bytes | None = None


ID_PATTERN = r"^[!-~]+$"
_ID = re.compile(ID_PATTERN)


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = Field(
        None,
        max_length=100,
        pattern=ID_PATTERN,  # printable ASCII, no spaces: a newline in it forged log lines
        description="Echoed in the response.",
    )


class Mute(_Command):
    """Silence anomaly events for maintenance; an open anomaly is ended."""

    command: Literal["mute"]
    minutes: float = Field(gt=0, le=MAX_MUTE_MINUTES, strict=True)  # not "60", not true


class Unmute(_Command):
    """End a mute early."""

    command: Literal["unmute"]


class SetThreshold(_Command):
    """Change the decision threshold (within bounds of the calibrated one)."""

    command: Literal["set_threshold"]
    value: float = Field(gt=0, strict=True)


class ReloadModel(_Command):
    """Load a bundle (default: the configured one); on failure the current model stays."""

    command: Literal["reload_model"]
    path: Path | None = Field(
        None, description="A bundle name in the models folder, or a path inside it."
    )


class Status(_Command):
    """Ask for a status report."""

    command: Literal["status"]


class Learn(_Command):
    """Start a commissioning period, stop it early (and refit), or cancel it (keep the model)."""

    command: Literal["learn"]
    action: Literal["start", "stop", "cancel"]
    seconds: float | None = Field(
        None,
        gt=0,
        le=MAX_LEARN_SECONDS,
        strict=True,
        description="start: seconds of audio to learn from.",
    )


class MarkNormal(_Command):
    """That was normal: add an event's windows to the site's normal set and refit."""

    command: Literal["mark_normal"]
    event_id: str = Field(
        pattern=EVENT_ID,
        description=(
            "An event's event_id (or its first 12 characters), its clip's name, or `last` for "
            "the most recent."
        ),
    )


class Rollback(_Command):
    """Return to the model version the current one replaced."""

    command: Literal["rollback"]


Command = Annotated[
    Mute | Unmute | SetThreshold | ReloadModel | Status | Learn | MarkNormal | Rollback,
    Field(discriminator="command"),
]
_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)
COMMANDS = tuple(
    get_args(kind.model_fields["command"].annotation)[0] for kind in get_args(get_args(Command)[0])
)
"""The command names the daemon knows."""


class CommandError(ValueError):
    """A command that is not valid; its message says why."""

    def __init__(self, reason: str, command: str = "invalid", command_id: str | None = None):
        super().__init__(reason)
        self.command = command
        self.command_id = command_id


def check_size(size: int) -> None:
    """CommandError for a payload of `size` bytes over MAX_COMMAND_BYTES."""
    if size > MAX_COMMAND_BYTES:
        raise CommandError(f"payload of {size} bytes is over the {MAX_COMMAND_BYTES}-byte limit")


def parse_command(payload: bytes | str) -> Command:
    """Parse and validate a command payload, or raise CommandError with the reason.

    Size and nesting are checked before the JSON parser runs, so no payload can exhaust
    memory or the stack; whatever the payload, the outcome is a command or a CommandError.
    """
    check_size(len(payload))
    try:
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
    except UnicodeDecodeError as exc:
        raise CommandError(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise CommandError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:  # NaN and Infinity are not JSON (Python's parser takes them: NaN was refused as
        # "less than or equal to 10080", an integrator's review)
        data = json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise CommandError(f"not JSON: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise CommandError("a command is a JSON object with a 'command' key")
    name = data.get("command")
    name = name if isinstance(name, str) and name.isidentifier() and len(name) <= 32 else "invalid"
    cid = data.get("id") if isinstance(data.get("id"), str) else None
    # echoed and logged only as a valid id: one with a line break forged an audit line in the
    # journal through the rejection's warning (an integrator's review)
    cid = cid if cid is not None and len(cid) <= 100 and _ID.fullmatch(cid) else None
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            known = ", ".join(sorted(COMMANDS))  # "rejected: : Input tag 'x' found using ..."
            said = data.get("command")
            what = f"unknown command {said!r}" if "command" in data else "no 'command' key"
            raise CommandError(f"{what}; known: {known}", name, cid) from None
        where = ".".join(str(p) for p in err["loc"][1:] or err["loc"])
        raise CommandError(_one_line(f"{where}: {err['msg']}"), name, cid) from None


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def json_depth(text: str) -> int:
    """Deepest nesting of arrays and objects in JSON text (strings skipped), without
    recursion; malformed text gets some number and is refused by the parser later."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _one_line(text: object, limit: int = 200) -> str:
    """Text on one line, shortened: replies and logs never carry a payload's line breaks."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


THRESHOLD_STEPS = 100
"""The threshold moves in steps of about 1/100 of the calibrated value..."""
MIN_STEP = 0.001
"""...but never finer than Home Assistant's smallest step."""


CLASSIFIER_MAX = 0.99
"""A classifier's threshold is a probability, which its int8 output never reaches at 1."""


def threshold_bounds(
    calibrated: float, classifier: bool = False, override: float | None = None
) -> tuple[float, float]:
    """Allowed range for set_threshold: a factor of THRESHOLD_FACTOR either way, rounded
    outward onto the step grid (`threshold_step`) of Home Assistant's threshold number, so
    every value it offers is accepted and every accepted one can be shown; never 0 (one step
    at least), a classifier's never above CLASSIFIER_MAX, always holding the calibrated value
    itself, and widened to a `[detector] threshold` `override` beyond them (the number shows
    it, so it may be chosen again)."""
    step = threshold_step(calibrated)
    low = max(step, on_step(calibrated / THRESHOLD_FACTOR, step, math.floor))
    high = on_step(calibrated * THRESHOLD_FACTOR, step, math.ceil)
    if classifier:
        high = min(high, CLASSIFIER_MAX)
    low, high = min(low, calibrated), max(high, calibrated)  # off the grid if need be
    if override is not None:
        below = on_step(override, step, math.floor)
        low = min(low, below if below > 0 else override)  # off the grid, never 0
        high = max(high, on_step(override, step, math.ceil))
    return low, high


def threshold_step(calibrated: float) -> float:
    """A round step for the threshold number: about 1/100 of the calibrated threshold."""
    step = 10 ** math.floor(math.log10(calibrated / THRESHOLD_STEPS))
    return max(MIN_STEP, step)


def on_step(value: float, step: float, direction: Callable[[float], float]) -> float:
    """`value` moved onto the step grid by `direction` (math.floor or math.ceil)."""
    digits = max(0, -math.floor(math.log10(step)))
    return round(direction(round(value / step, 6)) * step, digits)
