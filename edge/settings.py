"""Settings: one pydantic model fed by a TOML file, SOUNDSENTRY_* environment variables and
CLI flags (highest priority last: file < environment < flags)."""

from __future__ import annotations

import contextvars
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as PydanticSettingsError

from edge.errors import SettingsError
from edge.events import DEFAULT_K, DEFAULT_M, DEFAULT_N
from edge.threshold import MAX_FALSE_ALARMS_PER_DAY

_NONCHARACTERS = r"\x{FDD0}-\x{FDEF}" + "".join(
    rf"\x{{{plane:X}FFFE}}\x{{{plane:X}FFFF}}" for plane in range(17)
)
_TOPIC_SAFE = rf"^[^/+#\s\x00-\x1f\x7f-\x9f{_NONCHARACTERS}]+$"
"""No MQTT wildcard, separator, space, control character or Unicode non-character: mosquitto
ends the connection of a client whose will topic holds one, and the daemon retried for good
(an integrator's review, then a diff review for the non-characters). The code points in braces
are for pydantic's regex engine, Rust's."""
_LOG_LEVELS = r"^(DEBUG|INFO|WARNING|ERROR)$"
_PATTERN_MEANS = {
    _TOPIC_SAFE: "it is part of MQTT topics: no spaces, control characters, '/', '+' or '#' "
    "(e.g. pump-3)",
    _LOG_LEVELS: "one of DEBUG, INFO, WARNING, ERROR",
}
"""What a pattern asks for, in words, for the one-line error."""
_CONFIG_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("config", default=None)


def _not_a_bool(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """Refuse true/false where a number or a name is expected: pydantic would read `port =
    true` as port 1."""
    if isinstance(value, bool) and info.field_name is not None:
        annotation = cls.model_fields[info.field_name].annotation
        if annotation is not bool and bool not in get_args(annotation):
            raise ValueError("expected a number or a name, not true or false")
    return value


_NOT_A_BOOL = field_validator("*", mode="before")(_not_a_bool)


def _a_path(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A path setting: an empty one is refused (`data_dir = ""` made the folder `run` was
    started in the data folder, and tightened its permissions to 0700, in a review) and a
    leading `~` is the user's home, as in a shell (it made a folder named `~`)."""
    if isinstance(value, str) and info.field_name is not None:
        annotation = cls.model_fields[info.field_name].annotation
        if annotation is Path or Path in get_args(annotation):
            if not value.strip():
                raise ValueError("an empty path: leave the key out for its default")
            try:
                return Path(value).expanduser() if value.startswith("~") else value
            except RuntimeError as exc:  # ~nosuchuser
                raise ValueError(str(exc)) from None
    return value


_A_PATH = field_validator("*", mode="before")(_a_path)


class _Section(BaseModel):
    # inf and nan are no setting: `threshold = inf` stopped the daemon with a traceback at
    # start and, by a reload, silenced it for good (in a review)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    check_not_a_bool = _NOT_A_BOOL
    check_a_path = _A_PATH


class AudioSettings(_Section):
    """Where the audio comes from."""

    device: int | str | None = Field(
        None,
        description="Input device: index, a substring of its name, or port: and a part of its "
        "USB port's name (`soundsentry devices` lists them); unset = default.",
    )
    samplerate: int | None = Field(
        None,
        ge=8000,
        le=384000,
        description="Capture rate in Hz (at least the model's); unset = the model's rate.",
    )
    channels: int = Field(1, ge=1, le=64, description="Channels to open on the device.")
    channel: int = Field(
        0, ge=-1, le=63, description="Channel the model hears (0-based); -1 averages all."
    )
    block_seconds: float = Field(0.1, gt=0.0, le=1.0, description="Capture block length, seconds.")
    queue_blocks: int = Field(
        100, ge=4, le=10000, description="Capture queue length in blocks before blocks drop."
    )


class TlsSettings(_Section):
    """TLS towards the broker."""

    enabled: bool = Field(False, description="Connect with TLS.")
    ca_file: Path | None = Field(None, description="CA bundle; unset = system CAs.")
    cert_file: Path | None = Field(None, description="Client certificate (PEM).")
    key_file: Path | None = Field(None, description="Client private key (PEM).")
    insecure: bool = Field(False, description="Skip certificate verification (testing only).")


class MqttSettings(_Section):
    """The MQTT broker events go to; no host = no MQTT."""

    host: str | None = Field(None, description="Broker host name or address; unset = off.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port.")
    prefix: str = Field(
        "soundsentry", pattern=_TOPIC_SAFE, description="First topic level of every topic."
    )
    username: str | None = Field(None, description="User name, if the broker wants one.")
    password: SecretStr | None = Field(
        None, description="Password (prefer password_file or systemd credentials)."
    )
    password_file: Path | None = Field(None, description="File whose first line is the password.")
    keepalive: int = Field(30, ge=5, le=3600, description="MQTT keepalive, seconds.")
    reconnect_max_seconds: float = Field(
        30.0, ge=1.0, le=3600.0, description="Longest wait between reconnect attempts."
    )
    spool_max_messages: int = Field(
        10000,
        ge=10,
        le=10_000_000,
        description="Durable spool size; when full, replaced and update messages drop first.",
    )
    metrics_interval_seconds: float = Field(
        60.0, ge=1.0, le=86400.0, description="Interval of the metrics message."
    )
    discovery: bool = Field(True, description="Announce Home Assistant MQTT discovery.")
    discovery_prefix: str = Field(
        "homeassistant", pattern=_TOPIC_SAFE, description="Home Assistant discovery prefix."
    )
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("host")
    @classmethod
    def _a_host_name(cls, value: str | None) -> str | None:
        """A name the resolver can be asked for: an empty label (`broker..lan`, `.lan`) or one
        over 63 characters ended paho's network thread at its first connect (UnicodeError, not
        the OSError it retries), and the daemon spooled every event from then on."""
        if value is None:
            return None
        if not value or any(c.isspace() for c in value):
            raise ValueError("a host name or address without spaces")
        try:
            value.encode("idna")
        except UnicodeError:
            raise ValueError(
                "not a host name: a part between dots is empty or over 63 characters"
            ) from None
        return value


class DetectorSettings(_Section):
    """Event logic: K of the last N windows above the threshold (or the bundle's CUSUM) start an
    anomaly; M below (and the CUSUM back at zero) end it."""

    trigger_windows: int | None = Field(
        None,
        ge=1,
        le=100,
        description="K: windows above to start; unset = what the bundle's threshold was "
        f"calibrated for ({DEFAULT_K} if it does not say).",
    )
    trigger_of: int | None = Field(
        None,
        ge=1,
        le=100,
        description="N: how many recent windows count; unset = the bundle's "
        f"({DEFAULT_N} if it does not say).",
    )
    release_windows: int = Field(DEFAULT_M, ge=1, le=1000, description="M: windows below to end.")
    threshold: float | None = Field(
        None,
        gt=0.0,
        le=1e12,  # above any detector's score; 1e307 overflowed the Home Assistant number's range
        description="Override the bundle's threshold; unset = the bundle's.",
    )
    update_seconds: float = Field(
        10.0, gt=0.0, le=3600.0, description="Interval of `update` events while one lasts."
    )
    cooldown_seconds: float = Field(
        5.0, ge=0.0, le=3600.0, description="Quiet time after an anomaly ends."
    )
    integrate: bool = Field(
        True,
        description="Also start an anomaly on evidence integrated over time (the CUSUM the "
        "bundle was calibrated with, if any), so a small deviation that persists is reported.",
    )
    off_below_dbfs: float | None = Field(
        None,
        ge=-140.0,
        le=0.0,
        description="Windows quieter than this mean the machine is off (no events); "
        "unset = 10 dB below the quietest 1 % of the bundle's training windows.",
    )

    @model_validator(mode="after")
    def _k_within_n(self) -> DetectorSettings:
        k, n = self.trigger_windows, self.trigger_of
        if k is not None and n is not None and k > n:
            raise ValueError("trigger_windows (K) must not exceed trigger_of (N)")
        return self

    def k_of_n(self, calibrated: Mapping[str, Any] | None = None) -> tuple[int, int]:
        """(K, N): the settings' where set, else those the threshold was calibrated for
        (`calibrated`: the bundle's threshold parameters), else the defaults. A threshold is
        only as good as the event logic it was set for, so a bundle keeps its own K and N."""
        calibrated = calibrated or {}
        k = self.trigger_windows or int(calibrated.get("k", DEFAULT_K))
        n = self.trigger_of or int(calibrated.get("n", DEFAULT_N))
        if k > n:
            raise SettingsError(
                f"detector.trigger_windows (K = {k}) must not exceed trigger_of (N = {n}); set both"
            )
        return k, n

    def threshold_in_force(self, calibrated: float) -> float:
        """The window threshold the device runs with: this override, else the bundle's."""
        return self.threshold if self.threshold is not None else calibrated

    def event_logic(self, calibrated: Mapping[str, Any] | None = None) -> tuple[int, int, int]:
        """(K, N, M) the daemon runs with a bundle whose threshold has these parameters."""
        return (*self.k_of_n(calibrated), self.release_windows)


class ClipSettings(_Section):
    """Evidence clips: a WAV of every anomaly, with pre-roll, under data_dir/clips."""

    enabled: bool = Field(True, description="Save a clip of every anomaly.")
    preroll_seconds: float = Field(3.0, ge=0.0, le=30.0, description="Audio kept before start.")
    max_seconds: float = Field(60.0, gt=0.0, le=3600.0, description="Longest clip, seconds.")
    # bounded above (a petabyte, a century): 1e303 passed and overflowed at every start
    max_total_mb: float = Field(500.0, gt=0.0, le=1e9, description="Clips folder size limit, MB.")
    max_age_days: float = Field(
        30.0, gt=0.0, le=36500.0, description="Clips older than this are deleted."
    )


class HealthSettings(_Section):
    """Audio-liveness watchdog."""

    fault_seconds: float = Field(
        5.0, ge=0.5, le=600.0, description="Silence, flat line or clipping this long = fault."
    )
    stall_seconds: float = Field(
        3.0, ge=0.5, le=600.0, description="No audio blocks this long = stalled stream."
    )
    clip_fraction: float = Field(
        0.01, gt=0.0, le=1.0, description="Share of clipped samples that counts as clipping."
    )
    reopen_max_seconds: float = Field(
        30.0, ge=1.0, le=3600.0, description="Longest wait between device reopen attempts."
    )


WEB_PORT = 8080
"""Default dashboard port."""
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for a host name or address that only this machine can reach."""
    import ipaddress

    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class WebSettings(_Section):
    """The dashboard the daemon serves: live state, events, clips, actions, /metrics."""

    enabled: bool = Field(False, description="Serve the dashboard and its JSON endpoints.")
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        max_length=253,
        description="Address to listen on; beyond loopback a token_file is required.",
    )
    port: int = Field(WEB_PORT, ge=1, le=65535, description="TCP port of the dashboard.")
    token_file: Path | None = Field(
        None,
        description="File whose first line is the access token (required beyond loopback); "
        "unset on loopback = no token.",
    )
    public_url: str | None = Field(
        None,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="Base URL others reach the dashboard at (clip links in events, Home "
        "Assistant's link to the page); unset = http://{host}:{port}, with the host name when "
        "bound to all addresses, and no links at all on loopback.",
    )

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> WebSettings:
        if self.enabled and not is_loopback(self.host) and self.token_file is None:
            raise ValueError(
                f"host {self.host!r} is reachable beyond this machine: set web.token_file"
            )
        return self


class LearningSettings(_Section):
    """Learning on site: a commissioning period, "that was normal" feedback and the bundle
    versions they make (edge/learning.py, edge/history.py)."""

    seconds: float = Field(
        0.0,
        ge=0.0,
        le=30 * 86400.0,
        description="Commissioning period at the first start of a model, seconds of audio "
        "heard (0 = none; the `learn` command starts one at any time).",
    )
    max_windows: int = Field(
        20000,
        ge=100,
        le=1_000_000,
        description="Most per-window feature vectors kept as the site's normal set (a uniform "
        "sample beyond that); 20000 windows of 64 float32 numbers are 5 MB.",
    )
    keep_versions: int = Field(
        10, ge=1, le=1000, description="Bundle versions made on the device that are kept."
    )
    false_alarms_per_day: float | None = Field(
        None,
        gt=0.0,
        le=MAX_FALSE_ALARMS_PER_DAY,
        description="Budget of refits; unset = the bundle's own.",
    )


def check_service_data_dir(data_dir: Path, state: str | None = None) -> None:
    """As a systemd service (`$STATE_DIRECTORY` set), a `data_dir` elsewhere that the unit may
    not write is a SettingsError: an instance of soundsentry@.service given a copy of the
    single unit's config would otherwise read that unit's state and event log and fail at every
    write (a USB stick needs `ReadWritePaths=` in a drop-in, and passes once it has it)."""
    import os

    state = os.environ.get("STATE_DIRECTORY") if state is None else state
    if not state:
        return
    own = Path(state.split(":")[0])
    if data_dir.resolve() == own.resolve():
        return
    probe = data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise SettingsError(
            f"data_dir {data_dir} cannot be written by this service, whose state folder is "
            f'{own}: set data_dir = "{own}" (or leave it unset), or allow {data_dir} with '
            "ReadWritePaths= in a drop-in (systemctl edit)"
        )


def _default_data_dir() -> Path:
    """systemd's StateDirectory when run as a service, else ~/.local/state/soundsentry."""
    import os

    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0])
    return Path.home() / ".local" / "state" / "soundsentry"


ENV_PREFIX = "SOUNDSENTRY_"


class Settings(BaseSettings):
    """All SoundSentry settings."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
        allow_inf_nan=False,
    )
    check_not_a_bool = _NOT_A_BOOL
    check_a_path = _A_PATH

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case(cls, value: Any) -> Any:
        """`info` is as clear as `INFO`."""
        return value.upper() if isinstance(value, str) else value

    device_id: str = Field(
        default_factory=socket.gethostname,
        pattern=_TOPIC_SAFE,
        description="Name of this detector in topics and events; default: the host name.",
    )
    model: Path | None = Field(None, description="Model bundle folder.")
    log_level: str = Field("INFO", pattern=_LOG_LEVELS, description="Logging level.")
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Spool and evidence clips; default: $STATE_DIRECTORY or ~/.local/state.",
    )
    models_dir: Path | None = Field(
        None,
        description="Where reload_model may load bundles from (besides the configured "
        "model's folder); unset = {data_dir}/models.",
    )
    state_interval_seconds: float = Field(
        10.0, ge=1.0, le=3600.0, description="Interval of the retained state (score, level)."
    )
    audio: AudioSettings = Field(default_factory=AudioSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    detector: DetectorSettings = Field(default_factory=DetectorSettings)
    clips: ClipSettings = Field(default_factory=ClipSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    learning: LearningSettings = Field(default_factory=LearningSettings)
    web: WebSettings = Field(default_factory=WebSettings)

    @model_validator(mode="after")
    def _blocks_within_a_stall(self) -> Settings:
        """A capture block arrives every block_seconds: a stall time not above one of them
        called every stream stalled before its first block, and reopened it for good (in a
        review). The daemon gives the first block of a run a block more (the device opening)."""
        block, stall = self.audio.block_seconds, self.health.stall_seconds
        if stall <= block:
            raise ValueError(
                f"health.stall_seconds ({stall:g}) must exceed audio.block_seconds ({block:g}): "
                "a block comes every block_seconds, and a stream with none for stall_seconds is "
                "taken for stalled"
            )
        return self

    @property
    def model_folders(self) -> list[Path]:
        """Folders a remote reload_model may load bundles from."""
        folders = [self.models_dir or self.data_dir / "models"]
        if self.model is not None:
            folders.append(self.model.parent)
        return folders

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags, then environment, then the TOML file."""
        toml = InitSettingsSource(settings_cls, init_kwargs=_read_toml(_CONFIG_FILE.get()))
        return (init_settings, env_settings, toml)


MAX_CONFIG_BYTES = 1 << 20
"""A config file is a few kilobytes; beyond this it is something else, not read whole."""


def _read_toml(path: Path | None) -> dict[str, Any]:
    """The TOML config as a dict; {} without a file."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as fh:
            text = fh.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:  # `--config /dev/zero` grew to 24 GB (in a review)
            raise SettingsError(
                f"{path}: over {MAX_CONFIG_BYTES >> 20} MB, not a config file (give the .toml)"
            )
        data = tomllib.loads(text.decode("utf-8-sig"))  # a BOM (Notepad) is fine
    except FileNotFoundError:
        raise SettingsError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: not valid TOML (not UTF-8 text)") from None
    except OSError as exc:
        raise SettingsError(f"{path}: {exc.strerror or exc}") from None
    for key in data:  # pydantic-settings matches top-level keys and sections in any case, and
        # the keys within a section in theirs: `Model` and `[MQTT]` were taken, `[mqtt] Host`
        # refused, and of `device_id` and `DEVICE_ID` one won without a word (a walk-through)
        if key not in Settings.model_fields:
            hint = f" (keys are lower case: {key.lower()})" if key != key.lower() else ""
            raise SettingsError(f"invalid setting {key}: unknown key{hint}")
    return data


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from the config file, the environment and flag overrides (nested dicts)."""
    for name in os.environ:  # a key's typo in the TOML stops; one in a variable did not
        key = name.removeprefix(ENV_PREFIX).split("__")[0].lower()
        if name.startswith(ENV_PREFIX) and key not in Settings.model_fields:
            raise SettingsError(f"invalid setting in the environment {name}: unknown key {key!r}")
    token = _CONFIG_FILE.set(Path(config) if config else None)
    try:
        return Settings(**_drop_none(overrides))
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None
    except PydanticSettingsError as exc:  # a variable whose value should have been JSON
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"SOUNDSENTRY_{field.group(1).upper()}" if field else "SOUNDSENTRY_..."
        raise SettingsError(
            f"invalid environment {name}: it names a whole section, whose value must be JSON; "
            f"set one key with a double underscore instead, e.g. {name}__<KEY>=value"
        ) from None
    finally:
        _CONFIG_FILE.reset(token)


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming the first bad key and what is allowed."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if not key:  # a rule across sections names its keys itself
        return f"invalid settings: {err['msg'].removeprefix('Value error, ')}"
    if err["type"] == "extra_forbidden":
        return f"invalid setting {key}: unknown key"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    means = _PATTERN_MEANS.get(str(err.get("ctx", {}).get("pattern")))
    if err["type"] == "string_pattern_mismatch" and means:
        return f"invalid setting {key}{shown}: {means}"
    return f"invalid setting {key}{shown}: {err['msg'].removeprefix('Value error, ')}"


def mqtt_password(mqtt: MqttSettings) -> str | None:
    """The broker password from the settings, a password file, or systemd credentials."""
    import os

    if mqtt.password is not None:
        return mqtt.password.get_secret_value()
    candidates = [mqtt.password_file] if mqtt.password_file else []
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        candidates.append(Path(cred_dir) / "mqtt_password")
    for path in candidates:
        try:
            text = path.read_text().strip()
            if text or path == mqtt.password_file:
                return text.splitlines()[0].strip() if text else ""
        except FileNotFoundError:
            if path == mqtt.password_file:
                raise SettingsError(f"mqtt.password_file {path}: not found") from None
        except OSError as exc:
            raise SettingsError(f"mqtt.password_file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:  # raised in paho's thread at a re-read, it would end it
            raise SettingsError(f"mqtt.password_file {path}: not UTF-8 text") from None
    return None


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    """Remove unset (None) flags, recursively, so they do not override lower sources."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if not value:
                continue
        if value is not None:
            out[key] = value
    return out
