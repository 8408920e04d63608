"""Deployment: the systemd units pass systemd-analyze (verify, and security exposure <= 2.5),
the installer builds the expected tree under --root without touching the host, and the bare
edge install resolves to aarch64 wheels for the Pythons of Raspberry Pi OS."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from conftest import ROOT

DEPLOY = ROOT / "deploy"
INSTALL_SH = DEPLOY / "install.sh"
UNITS = ("soundsentry.service", "soundsentry@.service")
INSTALLED_EXE = "/opt/soundsentry/venv/bin/soundsentry"
MAX_EXPOSURE = 2.5
INSTALL_TIMEOUT_S = 600
RESTART = "would run: systemctl try-restart soundsentry.service soundsentry@*.service"
"""What an upgrade's dry run prints when it restarts whatever runs."""
# Settings the template may (must) set differently from the single unit, all per instance.
PER_INSTANCE = {
    "Description",
    "ExecStart",
    "WorkingDirectory",
    "StateDirectory",
    "LogsDirectory",
    "LoadCredential",
}


def _load_check_aarch64() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_aarch64", DEPLOY / "check_aarch64.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_aarch64 = _load_check_aarch64()


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real systemd-analyze."""
    exe = shutil.which("systemd-analyze")
    if not exe:
        pytest.fail("systemd-analyze is not installed (apt-get install systemd)")
    return subprocess.run(
        [exe, "--no-pager", *args], capture_output=True, text=True, timeout=60, check=False
    )


def with_exec_start(unit: str, dest_dir: Path, exe: Path) -> Path:
    """A copy of a unit whose ExecStart runs `exe` instead of the (here absent) install path."""
    text = (DEPLOY / unit).read_text()
    assert text.count(INSTALLED_EXE) == 1, f"{unit}: ExecStart should run {INSTALLED_EXE}"
    dest_dir.mkdir(parents=True, exist_ok=True)
    copy = dest_dir / unit
    copy.write_text(text.replace(INSTALLED_EXE, str(exe)))
    return copy


def service_settings(unit: str) -> collections.Counter[tuple[str, str]]:
    """The unit's Key=value lines (comments and sections dropped), as a multiset."""
    pairs = []
    for raw in (DEPLOY / unit).read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return collections.Counter(pairs)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    # On the test machine /opt/soundsentry does not exist; the only complaint allowed on the
    # unit as shipped is that one, and a copy running this venv's soundsentry is clean.
    shipped = systemd_analyze("verify", str(DEPLOY / unit))
    for line in shipped.stderr.splitlines():
        assert f"Command {INSTALLED_EXE} is not executable" in line, shipped.stderr
    copy = with_exec_start(unit, tmp_path, Path(sys.executable).parent / "soundsentry")
    proc = systemd_analyze("verify", str(copy))
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure_is_at_most_2_5(unit: str) -> None:
    proc = systemd_analyze("security", "--offline=yes", str(DEPLOY / unit))
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert found, proc.stdout
    assert float(found[1]) <= MAX_EXPOSURE, proc.stdout


def test_template_has_the_same_hardening_as_the_single_unit() -> None:
    single, template = service_settings(UNITS[0]), service_settings(UNITS[1])
    differ = {key for key, _ in (single - template) + (template - single)}
    assert differ <= PER_INSTANCE, f"unexpected differences: {sorted(differ - PER_INSTANCE)}"
    for key, value in template:
        if key in PER_INSTANCE and key != "Description":
            assert "%i" in value, f"{key}={value} is not per instance"


@pytest.mark.parametrize("unit", UNITS)
def test_the_service_starts_after_the_clock_is_put_forward_and_never_waits_for_ntp(
    unit: str,
) -> None:
    """A Pi has no real-time clock: started before timesyncd restored its saved time, the
    daemon stamped its first events 1970 (a clock review). time-sync.target is not waited
    for: with systemd-time-wait-sync enabled it waits for an NTP server that a plant network
    may never offer, and the machine would go unwatched."""
    text = (DEPLOY / unit).read_text()
    after = [w for line in text.splitlines() if line.startswith("After=") for w in line[6:].split()]
    assert "time-set.target" in after and "time-sync.target" not in after, after
    assert "time-sync.target" not in " ".join(
        line for line in text.splitlines() if line.startswith(("Wants=", "Requires="))
    )


def test_shell_scripts_pass_shellcheck() -> None:
    """The installer and the README's one-command scripts (with what they source)."""
    exe = shutil.which("shellcheck")
    if not exe:
        pytest.fail("shellcheck is not installed (apt-get install shellcheck)")
    scripts = [INSTALL_SH, *sorted((ROOT / "scripts").glob("*.sh"))]
    assert len(scripts) >= 4, scripts
    proc = subprocess.run(
        [exe, "-x", *map(str, scripts)], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout


def _make_venv(venv: Path) -> subprocess.CompletedProcess[str]:
    script = f'set -euo pipefail; source scripts/setup.sh; make_venv "{sys.executable}" "{venv}"'
    return subprocess.run(
        ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_a_virtualenv_left_without_pip_gets_pip_and_keeps_its_files(tmp_path: Path) -> None:
    """Debian's python3 without python3-venv creates bin/python and then fails on pip; the
    scripts skipped an existing bin/python, so every later run failed until the user deleted
    the folder. make_venv (scripts/setup.sh) gives such a virtualenv pip, keeping what is in it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (venv / "kept.txt").write_text("mine\n")
    assert _make_venv(venv).returncode == 0
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"], check=False)
    assert pip.returncode == 0 and (venv / "kept.txt").read_text() == "mine\n"


def test_a_folder_that_is_not_a_virtualenv_is_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    proc = _make_venv(folder)
    assert proc.returncode == 1 and "is not a virtualenv" in proc.stderr, proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("script", ["test.sh", "demo.sh"])
def test_the_readme_scripts_refuse_an_old_python_before_installing(
    tmp_path: Path, script: str
) -> None:
    """Both one-command scripts check the Python first (one function in setup.sh): the test
    script had installed Debian packages and a virtualenv before pip refused the package."""
    fake = tmp_path / "python3.9"
    fake.write_text('#!/bin/sh\ncase "$1" in --version) echo "Python 3.9.2" ;; *) exit 1 ;; esac\n')
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / script)],
        env={**os.environ, "PYTHON": str(fake), "VENV": str(venv)},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [
        "SoundSentry needs Python 3.11 or newer (found: Python 3.9.2)",
        "set PYTHON=python3.11 (or newer) to choose another",
    ]
    assert not venv.exists()


def run_installer(
    root: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """deploy/install.sh --root ROOT (nothing outside ROOT is written) with this Python."""
    proc = subprocess.run(
        ["bash", str(INSTALL_SH), "--root", str(root), "--python", sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"install.sh {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def tree(root: Path) -> dict[str, int]:
    """Relative path -> mode of everything under root, except the venv's insides."""
    skip = root / "opt/soundsentry/venv"
    return {
        str(p.relative_to(root)): p.lstat().st_mode
        for p in root.rglob("*")
        if skip not in p.parents
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real install (venv and all) under a temporary root; yields the root."""
    if not check_aarch64.pypi_reachable():
        pytest.skip(f"PyPI is not reachable ({check_aarch64.PROBE_URL}): cannot build the venv")
    root = tmp_path_factory.mktemp("root")
    # a Pi that lacks the Debian packages, whatever this host has: dpkg-query finds none
    shims = tmp_path_factory.mktemp("bin")
    (shims / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")
    (shims / "dpkg-query").chmod(0o755)
    proc = run_installer(root, env={**os.environ, "PATH": f"{shims}:{os.environ['PATH']}"})
    (root / "install.log").write_text(proc.stdout)
    yield root


@pytest.mark.slow
def test_fresh_install_creates_the_tree(installed: Path, tmp_path: Path) -> None:
    venv = installed / "opt/soundsentry/venv"
    version = subprocess.run(
        [venv / "bin/soundsentry", "--version"], capture_output=True, text=True, check=True
    )
    # the version names the commit installed (hatch-vcs): an upgrade's "put back the version
    # installed before" and a bundle's manifest say which code they are
    git = shutil.which("git")
    head = git and subprocess.run(
        [git, "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if not head or head.returncode:  # no git, or no history it reads (an archive): the fallback
        assert version.stdout == "soundsentry 0.1.0\n"
    else:
        commit = re.fullmatch(
            r"soundsentry \d+\.\d+\.\d+\.dev\d+\+g([0-9a-f]{7,})\S*\n", version.stdout
        )
        assert commit, version.stdout
        assert head.stdout.startswith(commit[1]), (version.stdout, head.stdout)
    no_tf = "import importlib.util as u; print(u.find_spec('tensorflow') is None)"
    bare = subprocess.run([venv / "bin/python", "-c", no_tf], capture_output=True, text=True)
    assert bare.stdout.strip() == "True", "the edge install must not pull in TensorFlow"
    web = subprocess.run([venv / "bin/python", "-c", "import prometheus_client"], check=False)
    assert web.returncode == 0, "[web] enabled = true must work on the installed runtime"

    conf = installed / "etc/soundsentry/config.toml"
    assert conf.read_text() == (DEPLOY / "config.example.toml").read_text()
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    assert stat.S_IMODE(conf.parent.stat().st_mode) == 0o750
    assert (installed / "var/lib/soundsentry/models").is_dir()
    for unit in UNITS:
        copied = installed / "etc/systemd/system" / unit
        assert copied.read_bytes() == (DEPLOY / unit).read_bytes()
        assert stat.S_IMODE(copied.stat().st_mode) == 0o644
    wants = installed / "etc/systemd/system/multi-user.target.wants/soundsentry.service"
    assert os.readlink(wants) == "/etc/systemd/system/soundsentry.service"
    # the README's `soundsentry ...` works on the Pi: the command is on PATH
    on_path = installed / "usr/local/bin/soundsentry"
    assert os.readlink(on_path) == "/opt/soundsentry/venv/bin/soundsentry"

    log = (installed / "install.log").read_text()
    assert "would run: useradd --system --user-group --groups audio" in log
    assert "would run: systemctl daemon-reload" in log
    assert (
        "not starting: model /var/lib/soundsentry/models/fan.bundle not found. Copy your "
        "bundle there (or name it as model in /etc/soundsentry/config.toml), then: sudo "
        "systemctl start soundsentry" in log
    ), log
    # with --root nothing is installed: "installing alsa-utils" read as done (a walk-through)
    apt = [line for line in log.splitlines() if "installing" in line and " into " not in line]
    assert apt == [], apt
    assert (
        "would run: env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
        "--no-install-recommends python3 python3-venv libportaudio2 libsndfile1 alsa-utils "
        "ca-certificates" in log
    ), log

    # The installed unit, pointed at the installed venv, verifies clean.
    unit = with_exec_start(UNITS[0], tmp_path, venv / "bin/soundsentry")
    proc = systemd_analyze("verify", str(unit))
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@pytest.mark.slow
def test_bare_install_calibrates_evaluates_and_replays(installed: Path, tmp_path: Path) -> None:
    """The Pi's install (numpy + LiteRT, no TensorFlow, SciPy or librosa) runs site tools."""
    from conftest import ANOMALOUS_FILE, DEMO_BUNDLE, DEMO_CLIP, NORMAL_FILES

    exe = installed / "opt/soundsentry/venv/bin/soundsentry"
    heavy = subprocess.run(
        [
            installed / "opt/soundsentry/venv/bin/python",
            "-c",
            "import importlib.util as u; print([m for m in ('scipy', 'librosa', 'sklearn', 'keras')"
            " if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert heavy.stdout.strip() == "[]"
    out = tmp_path / "site.bundle"
    env = {**os.environ, "SOUNDSENTRY_DATA_DIR": str(tmp_path / "data")}
    cal = subprocess.run(
        [exe, "calibrate", DEMO_BUNDLE, "--normal", *NORMAL_FILES[:2], "--out", out],
        capture_output=True,
        text=True,
        env=env,
    )
    assert cal.returncode == 0, cal.stderr
    ev = subprocess.run(
        [exe, "evaluate", out, "--normal", *NORMAL_FILES[2:], "--anomalous", ANOMALOUS_FILE],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ev.returncode == 0 and "AUC" in ev.stdout, ev.stderr
    rep = subprocess.run([exe, "replay", out, DEMO_CLIP], capture_output=True, text=True, env=env)
    assert rep.returncode == 0 and '"type": "start"' in rep.stdout, rep.stderr
    png = subprocess.run(  # no matplotlib here: one line naming the extra, nothing written
        [
            exe,
            "evaluate",
            out,
            "--normal",
            *NORMAL_FILES[2:],
            "--anomalous",
            ANOMALOUS_FILE,
            "--report",
            tmp_path / "report",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert png.returncode == 1 and not (tmp_path / "report").exists()
    python = Path(exe).parent / "python"  # the venv's own pip, not the system's
    assert png.stderr.splitlines() == [
        "soundsentry: error: `evaluate --report` needs the [report] extra (matplotlib is not "
        f"installed): {python} -m pip install 'soundsentry[report]'"
    ]


@pytest.mark.slow
def test_second_run_is_idempotent_and_keeps_the_config(installed: Path) -> None:
    conf = installed / "etc/soundsentry/config.toml"
    conf.write_text('device_id = "pump-3"\n' + conf.read_text())  # at the top: not in a table
    edited = conf.read_text()
    pyvenv = installed / "opt/soundsentry/venv/pyvenv.cfg"
    before, venv_id = tree(installed), (pyvenv.stat().st_ino, pyvenv.stat().st_mtime_ns)

    proc = run_installer(installed)

    assert "keeping" in proc.stdout
    assert RESTART in proc.stdout, "an upgrade restarts what runs"
    assert conf.read_text() == edited
    assert tree(installed) == before
    assert (pyvenv.stat().st_ino, pyvenv.stat().st_mtime_ns) == venv_id, "venv was rebuilt"

    # a kept config this version no longer reads (a renamed key): said, no restart into the
    # service's cannot-start loop, and the install fails (it said "done", exit 0, with the new
    # code in place for the next reboot to start)
    conf.write_text('devise_id = "pump-3"\n' + edited)
    try:
        stale = run_installer(installed, check=False)
    finally:
        conf.write_text(edited)
    assert stale.returncode == 1 and stale.stderr.count("config.toml") == 1, stale.stderr
    assert "invalid setting devise_id: unknown key" in stale.stderr, stale.stderr
    assert "a kept config or its model above does not load" in stale.stderr
    assert "put back the version installed before" in stale.stdout
    assert RESTART not in stale.stdout and "done" not in stale.stdout
    assert not (installed / "opt/soundsentry/venv.prev").exists()
    venv_python = installed / "opt/soundsentry/venv/bin/python"
    subprocess.run([str(venv_python), "-c", "import edge.daemon"], check=True)


def _upgrade_then_drop_format(installed: Path, bundle: Path) -> subprocess.CompletedProcess[str]:
    """An upgrade with `bundle` as it is (the service restarts), then one with `bundle` in a
    format the new release does not read: the second run's outcome."""
    good = run_installer(installed)
    assert RESTART in good.stdout, good.stdout + good.stderr
    manifest = bundle / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format_version": 2', '"format_version": 99'))
    return run_installer(installed, check=False)


def _upgrade_over_site_version(
    installed: Path, bundle: Path, name: str = "v1", **entry: object
) -> subprocess.CompletedProcess[str]:
    """`_upgrade_then_drop_format` on the site version the history names active (`name`, a copy
    of `bundle`, as is the configured model; `entry`: more fields of its history entry)."""
    models = installed / "var/lib/soundsentry/models"
    model, site = models / "fan.bundle", models / name
    shutil.copytree(bundle, model)
    shutil.copytree(bundle, site)
    entry = {"version": 1, "path": f"/var/lib/soundsentry/models/{name}",
             "base": "/var/lib/soundsentry/models/fan.bundle"} | entry  # fmt: skip
    (models / "history.json").write_text(json.dumps({"active": 1, "entries": [entry]}))
    try:
        return _upgrade_then_drop_format(installed, site)
    finally:
        shutil.rmtree(model)
        shutil.rmtree(site)
        (models / "history.json").unlink()


def _refusal(installed: Path, bad: subprocess.CompletedProcess[str]) -> str:
    """The one line an upgrade that restarted nothing names the kept config's problem in."""
    conf = installed / "etc/soundsentry/config.toml"
    assert bad.returncode == 1 and RESTART not in bad.stdout
    lines = [x for x in bad.stderr.splitlines() if x.strip() and "install: error" not in x]
    assert len(lines) == 1 and lines[0].startswith(f"{conf}: "), bad.stderr
    return lines[0].removeprefix(f"{conf}: ")


@pytest.mark.slow
def test_an_upgrade_loads_the_configured_model_before_it_restarts(
    installed: Path, tiny_bundle: Path
) -> None:
    """A bundle the new code cannot read (a format it dropped, a damaged copy) is named and
    nothing restarts; a bundle it reads restarts the service as before."""
    model = installed / "var/lib/soundsentry/models/fan.bundle"  # config.example.toml's model
    shutil.copytree(tiny_bundle, model)
    try:
        bad = _upgrade_then_drop_format(installed, model)
    finally:
        shutil.rmtree(model)
    said = _refusal(installed, bad)  # the model's path as the config names it
    assert said.startswith("/var/lib/soundsentry/models/fan.bundle") and "format 99" in said
    assert "a kept config or its model above does not load" in bad.stderr


@pytest.mark.slow
def test_an_upgrade_leaves_a_masked_unit_masked_and_reads_a_model_under_the_service_s_home(
    installed: Path, tiny_bundle: Path
) -> None:
    """An upgrade wrote the unit over an admin's mask (`systemctl mask soundsentry`, the
    instances holding the microphone), and took `model = "~/..."` for root's home: the check
    that the model loads was skipped, and the service restarted into a damaged bundle (a
    review). `~` is the service user's home, as the daemon reads it."""
    unit = installed / "etc/systemd/system/soundsentry.service"
    conf = installed / "etc/soundsentry/config.toml"
    model = installed / "var/lib/soundsentry/models/fan.bundle"
    written, edited = unit.read_text(), conf.read_text()
    unit.unlink()
    unit.symlink_to("/dev/null")
    conf.write_text(edited.replace('model = "/var/lib/soundsentry/', 'model = "~/', 1))
    shutil.copytree(tiny_bundle, model)
    try:
        masked = run_installer(installed)
        assert unit.is_symlink() and os.readlink(unit) == "/dev/null", "still masked"
        assert "soundsentry.service is masked: left masked" in masked.stdout
        (model / "arrays.npz").write_bytes(b"garbage")
        bad = run_installer(installed, check=False)
    finally:
        shutil.rmtree(model)
        conf.write_text(edited)
        unit.unlink()
        unit.write_text(written)
    said = _refusal(installed, bad)
    assert said.startswith("/var/lib/soundsentry/models/fan.bundle/"), said  # ~ as the service's
    assert "checksum mismatch" in said, said


@pytest.mark.slow
def test_an_upgrade_loads_the_site_version_the_device_runs_before_it_restarts(
    installed: Path, tiny_bundle: Path
) -> None:
    """The device runs a version the site made (a commissioning period, calibrate) instead of
    the configured model: an upgrade checked only the configured one, and a release that could
    not read the site's restarted into the factory model, the daemon then forgetting the
    site's version for good (in a review). Now it is loaded first, and named if it fails."""
    # without `configured` (a history.json of an older release): the daemon still runs it
    bad = _upgrade_over_site_version(installed, tiny_bundle, reason="calibrate")
    said = _refusal(installed, bad)
    assert said.startswith(
        "the site version in use, 1 (/var/lib/soundsentry/models/v1), does not load"
    ), said
    assert "format 99" in said and str(installed) not in said  # paths as the device has them


@pytest.mark.slow
def test_an_upgrade_finds_a_version_the_device_wrote_where_it_wrote_it(
    installed: Path, tiny_bundle: Path
) -> None:
    """A version the device wrote (`<model>-vN.bundle`, `made`) is named in the history by the
    path the device gave it, which the history's reader moves under the folder it reads (a data
    folder moved): with `--root` the installer put its root before that path a second time, and
    refused every upgrade over such a version as "no such model bundle" (an upgrade review)."""
    bad = _upgrade_over_site_version(
        installed, tiny_bundle, name="fan-v1.bundle", reason="mark_normal", made=True
    )
    said = _refusal(installed, bad)
    where = "/var/lib/soundsentry/models/fan-v1.bundle"
    assert said.startswith(f"the site version in use, 1 ({where}), does not load"), said
    assert "format 99" in said and str(installed) not in said


@pytest.mark.slow
def test_an_upgrade_passes_a_site_version_whose_folder_was_written_over(
    installed: Path, tiny_bundle: Path
) -> None:
    """The history's active version names a folder that holds another bundle since (its
    checksum differs from the one recorded): the daemon runs the configured model, not it, so a
    bundle there that the new release cannot read is no reason to refuse the upgrade."""
    proc = _upgrade_over_site_version(installed, tiny_bundle, reason="reload", checksum="0" * 64)
    assert proc.returncode == 0 and RESTART in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_venv_of_another_python_is_rebuilt(installed: Path) -> None:
    """After an OS upgrade the venv's python link reports the new version, so the installer
    reads the venv's own (pyvenv.cfg) to know its site-packages are for another one."""
    pyvenv = installed / "opt/soundsentry/venv/pyvenv.cfg"
    pyvenv.write_text(pyvenv.read_text().replace("version = 3.", "version = 2."))
    # the [report] extra installed on site (the rebuild dropped it: evaluate --report failed)
    (site,) = (installed / "opt/soundsentry/venv/lib").glob("python*/site-packages")
    (site / "matplotlib").mkdir(exist_ok=True)
    proc = run_installer(installed)
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert f"rebuilding {installed}/opt/soundsentry/venv (Python 2." in proc.stdout
    assert f"-> {want})" in proc.stdout
    assert "[web,report] into" in proc.stdout, proc.stdout
    assert "version = 3." in pyvenv.read_text()
    exe = installed / "opt/soundsentry/venv/bin/soundsentry"
    assert subprocess.run([exe, "--version"], capture_output=True, text=True).returncode == 0
    python = installed / "opt/soundsentry/venv/bin/python"
    drawn = subprocess.run([python, "-c", "import matplotlib"], capture_output=True, text=True)
    assert drawn.returncode == 0, drawn.stderr


@pytest.mark.slow
def test_a_venv_made_by_another_interpreter_of_the_same_version_is_rebuilt(
    installed: Path,
) -> None:
    """The fix check_service_python names, a rerun with --python /usr/bin/python3, kept the
    venv made by the Python it refused whenever their versions matched (pyenv's 3.11 and
    Bookworm's), and was refused again (a diff review): a venv made by another interpreter than
    the one asked for is rebuilt."""
    python = installed / "opt/soundsentry/venv/bin/python"
    python.unlink()
    python.symlink_to("/bin/true")  # as if made by another interpreter of this version
    proc = run_installer(installed)
    said = f"rebuilding {installed}/opt/soundsentry/venv (made by {os.path.realpath('/bin/true')}"
    assert said in proc.stdout, proc.stdout
    assert os.path.realpath(python) == os.path.realpath(sys._base_executable)
    again = run_installer(installed)
    assert "rebuilding" not in again.stdout, again.stdout
    # without --python the venv stays, whichever python3 comes first on PATH: an upgrade whose
    # python3 was pyenv's rebuilt the venv a rerun with --python had mended (a review)
    other = Path("/usr/bin/python3")
    version = "import sys; print(sys.version_info[:2])"
    if not other.exists() or os.path.realpath(other) == os.path.realpath(sys._base_executable):
        pytest.skip("no other interpreter than this one at /usr/bin/python3")
    theirs = subprocess.run([other, "-c", version], capture_output=True, text=True).stdout
    if theirs.strip() != str(sys.version_info[:2]):
        pytest.skip(f"/usr/bin/python3 is another version ({theirs.strip()})")
    shims = installed.parent / "other-python"
    shims.mkdir(exist_ok=True)
    (shims / "python3").unlink(missing_ok=True)
    (shims / "python3").symlink_to(other)
    plain = subprocess.run(
        ["bash", str(INSTALL_SH), "--root", str(installed)], capture_output=True, text=True,
        timeout=INSTALL_TIMEOUT_S, env={**os.environ, "PATH": f"{shims}:{os.environ['PATH']}"},
    )  # fmt: skip
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "rebuilding" not in plain.stdout, plain.stdout
    assert os.path.realpath(python) == os.path.realpath(sys._base_executable)


@pytest.mark.slow
def test_a_venv_an_install_left_unfinished_is_rebuilt(installed: Path) -> None:
    """A power cut while the venv was made (or while a rebuild removed it) left pyvenv.cfg
    without pip: every later run of the installer failed with 'No module named pip'."""
    venv = installed / "opt/soundsentry/venv"
    for pip in venv.glob("lib/python3*/site-packages/pip"):
        shutil.rmtree(pip)
    proc = run_installer(installed)
    assert f"rebuilding {venv} (it has no working pip" in proc.stdout, proc.stdout
    exe = venv / "bin/soundsentry"
    assert subprocess.run([exe, "--version"], capture_output=True, text=True).returncode == 0


@pytest.mark.slow
def test_an_upgrade_from_a_wheel_installs_its_code(installed: Path, tmp_path: Path) -> None:
    """pip skips a wheel whose version is installed already, so `--source X.whl` kept the old
    code, restarted the service on it and said "done". A wheel of a changed tree must land."""
    tree = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    for name in files.stdout.splitlines():
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    marker = "# upgraded by test_an_upgrade_from_a_wheel_installs_its_code"
    with open(tree / "edge/__init__.py", "a") as fh:
        fh.write(marker + "\n")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp_path, tree],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("soundsentry-*.whl")
    run_installer(installed, "--source", str(wheel))
    site = next((installed / "opt/soundsentry/venv/lib").glob("python*/site-packages"))
    assert marker in (site / "edge/__init__.py").read_text()


@pytest.mark.slow
def test_uninstall_keeps_config_and_state_unless_purge(installed: Path) -> None:
    system = installed / "etc/systemd/system"
    instance = system / "multi-user.target.wants/soundsentry@mic2.service"
    instance.symlink_to("/etc/systemd/system/soundsentry@.service")
    model = installed / "var/lib/soundsentry/models/pump.bundle"
    model.mkdir()

    dropin = system / "soundsentry.service.d/override.conf"
    dropin.parent.mkdir()
    dropin.write_text("[Service]\nEnvironment=SOUNDSENTRY_MQTT__PASSWORD=secret\n")

    proc = run_installer(installed, "--uninstall")

    assert "userdel" not in proc.stdout, "the user stays while files of its UID stay"
    kept = next(x for x in proc.stdout.splitlines() if " kept " in x)
    assert "var/log/soundsentry" in kept and "soundsentry.service.d (systemctl edit" in kept, kept
    assert "would run: systemctl reset-failed soundsentry*" in proc.stdout
    assert not (installed / "opt/soundsentry").exists()
    assert not (installed / "usr/local/bin/soundsentry").is_symlink()
    assert [p.name for p in system.rglob("soundsentry*")] == ["soundsentry.service.d"]
    assert (installed / "etc/soundsentry/config.toml").is_file()
    assert model.is_dir()

    # what was enabled is kept with the config: a reinstall enables it again (it enabled the
    # single unit alone, and not the instances an admin ran; a review)
    remembered = installed / "etc/soundsentry/.enabled-before-uninstall"
    assert remembered.read_text().split() == ["soundsentry.service", "soundsentry@mic2.service"]
    run_installer(installed, "--uninstall")  # a second one keeps the first's record
    assert remembered.read_text().split() == ["soundsentry.service", "soundsentry@mic2.service"]
    back = run_installer(installed)
    assert "enabled again what was enabled before --uninstall: soundsentry.service " in back.stdout
    wants = sorted(p.name for p in system.glob("*.wants/soundsentry*"))
    assert wants == ["soundsentry.service", "soundsentry@mic2.service"], wants
    assert not remembered.exists()
    run_installer(installed, "--uninstall")
    # installed again over the kept config, which a hand edit broke: one line, not a traceback
    config = installed / "etc/soundsentry/config.toml"
    config.write_text('model = "/var/lib/soundsentry/models/pump.bundle\n')  # unterminated
    again = run_installer(installed)
    assert "not valid TOML" in again.stderr and "Traceback" not in again.stderr, again.stderr
    assert "not starting: fix the config above" in again.stdout, again.stdout
    run_installer(installed, "--uninstall")
    # valid TOML with a key this version does not know: named before a start that would wait
    # its minute and fail with systemd's "Job failed"
    config.write_text('devise_id = "pump-3"\nmodel = "/var/lib/soundsentry/models/pump.bundle"\n')
    renamed = run_installer(installed)
    assert "invalid setting devise_id: unknown key" in renamed.stderr, renamed.stderr
    assert "not starting: fix the config above" in renamed.stdout, renamed.stdout
    assert "systemctl start soundsentry.service" not in renamed.stdout
    run_installer(installed, "--uninstall")
    # a relative model path, read as the service reads it: from its working folder, the state
    # folder (the installer read it from wherever it was run, and refused to start)
    from conftest import DEMO_BUNDLE

    shutil.copytree(DEMO_BUNDLE, installed / "var/lib/soundsentry/models/demo.bundle")
    config.write_text('model = "models/demo.bundle"\n')
    relative = run_installer(installed)
    assert "would run: systemctl start soundsentry.service" in relative.stdout, relative.stdout
    run_installer(installed, "--uninstall")
    shutil.rmtree(installed / "var/lib/soundsentry/models/demo.bundle")
    missing = run_installer(installed)  # and one that is not there is named where it is sought
    assert "model /var/lib/soundsentry/models/demo.bundle not found" in missing.stdout
    run_installer(installed, "--uninstall")

    proc = run_installer(installed, "--purge")
    assert not (installed / "etc/soundsentry").exists()
    assert not (installed / "var/lib/soundsentry").exists()
    assert not [p.name for p in system.rglob("soundsentry*")], "drop-ins hold secrets"
    assert "would run: userdel soundsentry" in proc.stdout


def test_installer_refuses_an_old_python_with_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "python3.9"
    fake.write_text('#!/bin/sh\ncase "$2" in *platform*) echo 3.9.2 ;; *) exit 1 ;; esac\n')
    fake.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(INSTALL_SH), "--root", str(tmp_path / "root"), "--python", str(fake)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"soundsentry-install: error: needs Python >= 3.11, found 3.9.2 ({fake})"
    ]
    assert not (tmp_path / "root/opt").exists()


@pytest.mark.slow
def test_edge_install_resolves_for_aarch64_on_python_3_11_and_3_13() -> None:
    proc = subprocess.run(
        [sys.executable, str(DEPLOY / "check_aarch64.py")],
        capture_output=True,
        text=True,
        timeout=check_aarch64.PIP_TIMEOUT_S * 2,
        check=False,
    )
    if proc.returncode == check_aarch64.EXIT_OFFLINE:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for version in check_aarch64.PYTHON_VERSIONS:
        line = next(x for x in proc.stdout.splitlines() if x.startswith(f"cp{version} aarch64"))
        tag = f"cp{version.replace('.', '')}"
        assert re.search(rf"ai_edge_litert-\S+-{tag}-{tag}-manylinux\S+_aarch64\.whl", line), line


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv changes user as root only")
def test_the_installer_s_model_checks_run_as_the_service_user_on_the_host(tmp_path: Path) -> None:
    """configs_load ran as root and loaded the bundles and models/history.json of the service's
    state folder, which the service user can write: root parsed what a compromised service
    account left there, and waited for ever on a FIFO in a manifest's place (the security
    review). `as_service` (the function itself, from install.sh) runs them as that user, from
    /, with no input, under a timeout of root's that it cannot stop (its own could be: the
    diff review), with the variables assigned before it; under --root, as is."""
    import pwd

    text = INSTALL_SH.read_text()
    function = re.search(r"^as_service\(\) \{.*?^\}$", text, re.M | re.S)
    assert function is not None
    user = pwd.getpwnam("nobody")
    said = "echo $(id -u) $(pwd) $WHO"
    stop = "; kill -STOP $PPID 2>/dev/null || echo cannot-stop"  # its timeout, root's

    def run(root: str, check: str) -> subprocess.CompletedProcess[str]:
        call = f"SERVICE_USER=nobody ROOT='{root}' WHO=kept as_service sh -c '{check}'"
        script = f'say() {{ echo "$*"; }}\n{function.group(0)}\n{call}'
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                              cwd=tmp_path, timeout=60)  # fmt: skip

    on_host = run("", said + stop)
    assert on_host.returncode == 0, on_host.stderr
    assert on_host.stdout.split() == [str(user.pw_uid), "/", "kept", "cannot-stop"]
    under_root = run(str(tmp_path / "root"), said)
    assert under_root.stdout.split() == [str(os.getuid()), str(tmp_path), "kept"]


def test_the_installer_stops_at_a_python_the_service_user_cannot_run(tmp_path: Path) -> None:
    """A venv made by a Python under a home folder (pyenv's under /root, mode 700): the
    service's user cannot run it, the install said "done" and the service could never start
    (a walk-through on a machine whose python3 was pyenv's). `check_service_python` (from
    install.sh, with `as_service`) stops the install in one line with the fix."""
    text = INSTALL_SH.read_text()
    functions = [
        re.search(rf"^{name}\(\) \{{.*?^\}}$", text, re.M | re.S)
        for name in ("as_service", "check_service_python")
    ]
    assert all(functions)
    body = "\n".join(f.group(0) for f in functions if f)

    def run(python: Path) -> subprocess.CompletedProcess[str]:
        venv = Path(tempfile.mkdtemp(prefix="ss-venv-", dir="/tmp"))
        venv.chmod(0o755)
        (venv / "bin").mkdir(mode=0o755)
        (venv / "bin" / "python").symlink_to(python)
        script = (
            'say() { echo "$*"; }\ndie() { echo "error: $*" >&2; exit 1; }\n'
            f"{body}\nSERVICE_USER=nobody ROOT= VENV={venv} check_service_python\necho passed"
        )
        try:
            return subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                                  timeout=60)  # fmt: skip
        finally:
            shutil.rmtree(venv)

    home = tmp_path / "home"  # a home folder of mode 700, as root's
    home.mkdir(mode=0o700)
    hidden = home / "python3"
    hidden.write_text("#!/bin/sh\nexit 0\n")
    hidden.chmod(0o755)
    out_of_reach = run(hidden)
    assert out_of_reach.returncode == 1, out_of_reach.stdout
    assert "cannot run" in out_of_reach.stderr and f"(it is {hidden})" in out_of_reach.stderr
    assert "--python /usr/bin/python3" in out_of_reach.stderr
    reachable = run(Path("/bin/true"))  # any program the user may run
    assert reachable.returncode == 0 and "passed" in reachable.stdout, reachable.stderr
