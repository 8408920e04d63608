"""Settings: TOML file < environment < flags, and one-line errors naming the key."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import DEMO_BUNDLE, NORMAL_FILES, cli

from edge.errors import SettingsError
from edge.settings import DetectorSettings, load_settings, mqtt_password
from soundsentry.cli import _parser


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = load_settings()
    assert s.device_id == socket.gethostname()
    assert s.mqtt.prefix == "soundsentry" and s.mqtt.host is None
    assert (s.detector.trigger_windows, s.detector.trigger_of) == (None, None)
    assert s.detector.k_of_n() == (3, 4)


def test_k_and_n_follow_the_bundle_unless_set() -> None:
    """A threshold is calibrated for one K of N: a bundle that says 2 of 3 runs 2 of 3, a setting
    overrides it, and a K the bundle's N cannot hold is one clear error."""
    calibrated = {"k": 2, "n": 3}
    assert DetectorSettings().k_of_n(calibrated) == (2, 3)
    assert DetectorSettings(trigger_windows=3, trigger_of=5).k_of_n(calibrated) == (3, 5)
    assert DetectorSettings(trigger_of=6).k_of_n(calibrated) == (2, 6)
    with pytest.raises(SettingsError, match=r"trigger_windows \(K = 4\).*N = 3"):
        DetectorSettings(trigger_windows=4).k_of_n(calibrated)


def test_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(
        tmp_path,
        'device_id = "pump-1"\n[mqtt]\nhost = "broker"\nport = 1884\n'
        '[audio]\ndevice = "USB"\nchannel = -1\n',
    )
    s = load_settings(cfg)
    assert (s.device_id, s.mqtt.host, s.mqtt.port, s.audio.device, s.audio.channel) == (
        "pump-1",
        "broker",
        1884,
        "USB",
        -1,
    )
    monkeypatch.setenv("SOUNDSENTRY_MQTT__PORT", "1885")
    monkeypatch.setenv("SOUNDSENTRY_DEVICE_ID", "pump-2")
    s = load_settings(cfg)
    assert (s.device_id, s.mqtt.host, s.mqtt.port) == ("pump-2", "broker", 1885)
    s = load_settings(cfg, device_id="pump-3", mqtt={"port": 1886, "host": None})
    assert (s.device_id, s.mqtt.host, s.mqtt.port) == ("pump-3", "broker", 1886)
    monkeypatch.setenv("SOUNDSENTRY_DEVICEID", "pump-4")  # a typo: ignored, as if unset
    with pytest.raises(SettingsError, match="environment SOUNDSENTRY_DEVICEID: unknown key"):
        load_settings(cfg)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('Model = "pump.bundle"\n', "Model: unknown key (keys are lower case: model)"),
        ('[MQTT]\nhost = "broker"\n', "MQTT: unknown key (keys are lower case: mqtt)"),
        ('[mqtt]\nHost = "broker"\n', "mqtt.Host: unknown key"),
        (
            'device_id = "a"\nDEVICE_ID = "b"\n',
            "DEVICE_ID: unknown key (keys are lower case: device_id)",
        ),
        ('modle = "pump.bundle"\n', "modle: unknown key"),
    ],
)
def test_keys_are_matched_in_their_case_at_every_level(
    tmp_path: Path, text: str, said: str
) -> None:
    """Top-level keys and section names were matched in any case and the keys within a section
    in theirs: `Model` and `[MQTT]` were taken, `[mqtt] Host` refused, and of `device_id` and
    `DEVICE_ID` one won without a word (a walk-through). TOML's keys have one case."""
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, text))
    assert str(caught.value) == f"invalid setting {said}"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[mqtt]\nport = 70000\n", "mqtt.port"),
        ("[detector]\ntrigger_windows = 5\ntrigger_of = 3\n", "detector"),
        ('device_id = "a/b"\n', "device_id"),
        ("[audio]\nchanel = 1\n", "audio.chanel"),
        ("[mqtt\nport = 1\n", "not valid TOML"),
        ("[mqtt]\nport = true\n", "mqtt.port"),
        ("[audio]\ndevice = false\n", "audio.device"),
        ('[mqtt]\nhost = "broker..lan"\n', "mqtt.host"),  # ended paho's thread for good
        ('[mqtt]\nhost = ".lan"\n', "mqtt.host"),
        ('[mqtt]\nhost = "broker lan"\n', "mqtt.host"),
        # no block could arrive within the stall time: the capture reopened the device for good
        ("[audio]\nblock_seconds = 1.0\n[health]\nstall_seconds = 0.5\n", "health.stall_seconds"),
        # a traceback at start, and by a reload a daemon that could never start an event
        ("[detector]\nthreshold = inf\n", "detector.threshold"),
        ("[detector]\nthreshold = 1e307\n", "detector.threshold"),
        ("[clips]\nmax_total_mb = inf\n", "clips.max_total_mb"),
        # finite but beyond any disk: an OverflowError traceback at every start (in a review)
        ("[clips]\nmax_total_mb = 1e303\n", "clips.max_total_mb"),
        ("[clips]\nmax_age_days = 1e303\n", "clips.max_age_days"),
        ("[health]\nfault_seconds = nan\n", "health.fault_seconds"),
        ('[mqtt.tls]\nca_file = " "\n', "mqtt.tls.ca_file"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
        load_settings(write(tmp_path, text))


def test_a_path_from_home_is_the_user_s_home_and_an_empty_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data_dir = "~/ss"` made a folder named `~` where the command ran, and `data_dir = ""`
    made that folder the data folder, its permissions tightened to 0700 (in a review)."""
    monkeypatch.delenv("SOUNDSENTRY_DATA_DIR", raising=False)
    s = load_settings(write(tmp_path, 'data_dir = "~/ss"\nmodel = "~/fan.bundle"\n'))
    assert s.data_dir == Path.home() / "ss" and s.model == Path.home() / "fan.bundle"
    with pytest.raises(SettingsError, match=r"^invalid setting data_dir .*an empty path"):
        load_settings(write(tmp_path, 'data_dir = ""\n'))
    with pytest.raises(SettingsError, match=r"^invalid setting data_dir .*nosuchuser"):
        load_settings(write(tmp_path, 'data_dir = "~nosuchuser/x"\n'))  # not a traceback


def test_a_stall_time_must_exceed_a_block_and_names_both_keys(tmp_path: Path) -> None:
    """A stall time not above the capture block took every stream for stalled before its first
    block and reopened it for good (in a review); above it, it works (the daemon gives the
    first block a block more). A rule across sections is one line naming both keys."""
    s = load_settings(
        write(tmp_path, "[audio]\nblock_seconds = 1.0\n[health]\nstall_seconds = 1.5\n")
    )
    assert (s.audio.block_seconds, s.health.stall_seconds) == (1.0, 1.5)
    refused = r"^invalid settings: health\.stall_seconds \(1\) must exceed audio\.block_seconds"
    with pytest.raises(SettingsError, match=refused):
        load_settings(
            write(tmp_path, "[audio]\nblock_seconds = 1.0\n[health]\nstall_seconds = 1.0\n")
        )


def test_invalid_setting_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[mqtt]\nport = 0\n")
    proc = cli("replay", str(DEMO_BUNDLE), str(NORMAL_FILES[0]), "--config", str(cfg), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "soundsentry: error: invalid setting mqtt.port (got 0): "
        "Input should be greater than or equal to 1"
    ]
    proc = cli(
        "replay",
        str(DEMO_BUNDLE),
        str(NORMAL_FILES[0]),
        check=False,
        env={"SOUNDSENTRY_DETECTOR__RELEASE_WINDOWS": "zero"},
    )
    assert proc.returncode == 1 and "detector.release_windows" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_section_set_whole_in_the_environment_is_one_line() -> None:
    """`SOUNDSENTRY_AUDIO=USB` (the `__DEVICE` forgotten) was a 45-line traceback; in a systemd
    drop-in, a restart loop of them."""
    proc = cli("replay", str(DEMO_BUNDLE), str(NORMAL_FILES[0]), check=False,
               env={"SOUNDSENTRY_AUDIO": "USB"})  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "soundsentry: error: invalid environment SOUNDSENTRY_AUDIO: it names a whole section, "
        "whose value must be JSON; set one key with a double underscore instead, e.g. "
        "SOUNDSENTRY_AUDIO__<KEY>=value"
    ]


def test_patterns_are_said_in_words_and_log_levels_in_any_case(tmp_path: Path) -> None:
    """A regex is no answer to `device_id = "pump 3"`, and `info` is as clear as `INFO`."""
    with pytest.raises(SettingsError) as err:
        load_settings(write(tmp_path, 'device_id = "pump 3"\n'))
    assert str(err.value) == (
        "invalid setting device_id (got 'pump 3'): it is part of MQTT topics: no spaces, "
        "control characters, '/', '+' or '#' (e.g. pump-3)"
    )
    # a control character or a non-character: accepted, and the broker then ended every
    # connection (a review)
    texts = ('device_id = "pump\\u0007x"\n', '[mqtt]\nprefix = "ss\\u009f"\n',
             'device_id = "pump\\uffff"\n')  # fmt: skip
    for text in texts:
        with pytest.raises(SettingsError, match="it is part of MQTT topics: no spaces, control"):
            load_settings(write(tmp_path, text))
    assert load_settings(write(tmp_path, 'device_id = "насос-1"\n')).device_id == "насос-1"
    assert load_settings(write(tmp_path, 'log_level = "info"\n')).log_level == "INFO"
    with pytest.raises(SettingsError, match=r"log_level .*one of DEBUG, INFO, WARNING, ERROR$"):
        load_settings(write(tmp_path, 'log_level = "verbose"\n'))
    assert _parser().parse_args(["run", "--log-level", "debug"]).log_level == "DEBUG"
    assert _parser().parse_args(["--log-level", "error", "run"]).log_level == "ERROR"


def test_password_from_file_and_credentials_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    s = load_settings(write(tmp_path, f'[mqtt]\nusername = "u"\npassword_file = "{secret}"\n'))
    assert mqtt_password(s.mqtt) == "s3cret"
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.model_dump())
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text("fromsystemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert mqtt_password(load_settings().mqtt) == "fromsystemd"
    monkeypatch.setenv("SOUNDSENTRY_MQTT__PASSWORD", "env-pw")
    s = load_settings()
    assert mqtt_password(s.mqtt) == "env-pw" and "env-pw" not in repr(s)


def test_a_password_file_that_is_not_text_is_one_settings_error(tmp_path: Path) -> None:
    """Its UnicodeDecodeError escaped: raised in paho's network thread when the file is read
    again after a refused login, it ended that thread, and with it every reconnect."""
    secret = tmp_path / "pw"
    secret.write_bytes(b"\xff\xfe\x00garbage")
    s = load_settings(write(tmp_path, f'[mqtt]\nusername = "u"\npassword_file = "{secret}"\n'))
    with pytest.raises(SettingsError, match="not UTF-8 text"):
        mqtt_password(s.mqtt)


def test_example_config_in_deploy_is_valid() -> None:
    from conftest import ROOT

    s = load_settings(ROOT / "deploy" / "config.example.toml")
    assert s.model is not None and s.model.name == "fan.bundle"


def test_true_or_false_is_not_a_number_and_the_file_may_start_with_a_bom(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not true or false"):
        load_settings(write(tmp_path, "[mqtt]\nport = true\n"))
    assert load_settings(write(tmp_path, "[mqtt]\ndiscovery = false\n")).mqtt.discovery is False
    bom = tmp_path / "notepad.toml"
    bom.write_bytes("\ufeff[mqtt]\nport = 1884\n".encode())
    assert load_settings(bom).mqtt.port == 1884


def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('device_id = "café"\n'.encode("latin-1"))
    proc = cli("replay", str(DEMO_BUNDLE), str(NORMAL_FILES[0]), "--config", str(latin1),
               check=False)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"soundsentry: error: {latin1}: not valid TOML (not UTF-8 text)"
    ]


def test_a_config_that_is_no_config_file_is_not_read_whole() -> None:
    """`--config /dev/zero` (or a recording given by mistake) was read whole: 24 GB, then the
    OOM killer (a review)."""
    with pytest.raises(SettingsError, match=r"^/dev/zero: over 1 MB, not a config file"):
        load_settings("/dev/zero")


def test_a_service_instance_with_another_units_data_dir_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """soundsentry@pump-3 may write /var/lib/soundsentry/pump-3 only; given a copy of the single
    unit's config (data_dir = /var/lib/soundsentry) it read that unit's state and failed at
    every write. The suite runs as root, so the sandbox's read-only view is stood in for by what
    os.access answers for the folder outside the instance's own."""
    import os

    from edge.errors import SettingsError
    from edge.settings import check_service_data_dir

    shared, own = tmp_path / "soundsentry", tmp_path / "soundsentry" / "pump-3"
    own.mkdir(parents=True)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and Path(p) != shared)
    with pytest.raises(SettingsError, match=f'set data_dir = "{own}"'):
        check_service_data_dir(shared, str(own))
    check_service_data_dir(own, str(own))  # its own folder
    check_service_data_dir(shared / "pump-3" / "new", str(own))  # inside it, created later
    check_service_data_dir(shared, "")  # not a service: nothing to check
    usb = tmp_path / "usb"  # a folder the unit was allowed (ReadWritePaths=)
    usb.mkdir()
    check_service_data_dir(usb, str(own))
