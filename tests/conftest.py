"""Shared fixtures: fixture audio, a tiny trained bundle, a real mosquitto, a real PulseAudio."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
MODELS = ROOT / "models"
DEMO_BUNDLE = MODELS / "fan-demo.bundle"
"""The default detector (band-fluctuation statistics, no network)."""
AE_BUNDLE = MODELS / "fan-autoencoder.bundle"
"""The int8 convolutional autoencoder, trained on the same audio."""
DEMO_CLIP = MODELS / "demo-fan-normal-then-fault.flac"
NORMAL_FILES = sorted(DATA.glob("fan-normal-*.flac"))
ANOMALOUS_FILE = DATA / "fan-anomalous-14.flac"
TINY_EPOCHS = "25"
SOUNDSENTRY = [sys.executable, "-m", "soundsentry"]
"""The real `soundsentry` command, run from the source tree."""

# Spools and evidence clips of commands run by the tests stay out of the user's home.
os.environ.setdefault("SOUNDSENTRY_DATA_DIR", tempfile.mkdtemp(prefix="soundsentry-tests-"))

# The suite's PulseAudio servers live in a runtime folder of their own, which every client the
# tests start finds (libpulse reads PULSE_RUNTIME_PATH before XDG_RUNTIME_DIR): the tests that
# take the sound server away stopped every PulseAudio of the user, a desktop's own and another
# run's too (a new user's walk-through lost theirs twice while the suite ran), and their
# captures could have heard the desktop's microphone. A short path: a socket's is limited.
PULSE_RUNTIME = Path(tempfile.mkdtemp(prefix="ss-pulse-", dir="/tmp"))
os.environ["PULSE_RUNTIME_PATH"] = str(PULSE_RUNTIME)
os.environ.pop("PULSE_SERVER", None)  # it would send every client to another server
# and so would a `default-server` in the user's ~/.config/pulse/client.conf (a diff review)
os.environ["PULSE_CLIENTCONFIG"] = os.devnull


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the real `soundsentry` command (as a user would) and capture its output."""
    proc = subprocess.run(
        [*SOUNDSENTRY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"soundsentry {' '.join(args)} failed:\n{proc.stderr}")
    return proc


T = TypeVar("T")


@contextmanager
def full_disk(room: int = 0) -> Iterator[None]:
    """No file of this process may grow past `room` bytes, as on a full disk: SQLite gets EFBIG
    and says `disk I/O error`. Nothing may print meanwhile (pytest's capture files are files
    too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    before = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (room, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, before)


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    detail: Callable[[], object] | None = None,
    interval: float = 0.05,
) -> T:
    """Poll `predicate` until it returns something truthy and return that; after `timeout`
    seconds fail the test naming `what` was awaited (and `detail()`, the state seen last)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            extra = f"\nlast seen: {detail()}" if detail else ""
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def synced_clock(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A wall clock NTP has set, as systemd-timesyncd says it (edge.clock): retention judges
    clips by their age only then, and this machine's kernel may not say so itself."""
    import edge.clock

    folder = tmp_path_factory.mktemp("timesync")
    (folder / "synchronized").touch()
    monkeypatch.setattr(edge.clock, "TIMESYNCD", folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model trained on the fixture audio with the real `train` command."""
    return train_tiny(tmp_path_factory.mktemp("models") / "nested" / "tiny.bundle")


def train_tiny(out: Path) -> Path:
    """Train the tiny autoencoder (seed 1) on the fixture audio into `out`, with `train`."""
    cli(
        "train",
        "--detector",
        "autoencoder",
        "--normal",
        *map(str, NORMAL_FILES),
        "--out",
        str(out),
        "--epochs",
        TINY_EPOCHS,
        "--seed",
        "1",
    )
    return out


class Broker:
    """A real mosquitto on loopback, stoppable and restartable on the same port."""

    def __init__(self, workdir: Path, port: int, extra_conf: str = "") -> None:
        self.workdir = workdir
        self.port = port
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n"
            f"persistence true\npersistence_location {workdir}/\n{extra_conf}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait until the port accepts connections."""
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen(
            [exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        """Stop the broker."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def broker_with_example_acl(
    tmp_path: Path, passwords: dict[str, str], acl: Path = ROOT / "deploy" / "mosquitto" / "acl"
) -> Broker:
    """A started mosquitto with these users and passwords and `acl` (the example's)."""
    passwd = tmp_path / "passwd"
    for n, (user, password) in enumerate(passwords.items()):
        subprocess.run(
            ["mosquitto_passwd", "-b", *(["-c"] if n == 0 else []), str(passwd), user, password],
            check=True,
            capture_output=True,
        )
    broker = Broker(tmp_path, free_port())
    broker.conf.write_text(
        f"listener {broker.port} 127.0.0.1\nuser root\nallow_anonymous false\n"
        f"password_file {passwd}\nacl_file {acl}\n"
    )
    broker.start()
    return broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A running mosquitto on a free loopback port."""
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.fail("mosquitto is not installed (apt-get install mosquitto)")
    b = Broker(tmp_path, free_port())
    b.start()
    yield b
    b.stop()


def ensure_pulse() -> bool:
    """PulseAudio running with the null sink 'machine', started (True) when it is not: tests
    that unplug the microphone take the daemon away and bring it back, and a module that
    loads its own sink later must not find it gone."""
    if not shutil.which("pulseaudio"):
        pytest.fail("pulseaudio is not installed (apt-get install pulseaudio pulseaudio-utils)")
    if subprocess.run(["pactl", "info"], capture_output=True).returncode != 0:
        subprocess.run(
            [
                "pulseaudio",
                "--daemonize=yes",
                "--exit-idle-time=-1",
                "-n",
                "--load=module-null-sink sink_name=machine rate=16000 channels=1",
                "--load=module-native-protocol-unix",
            ],
            check=True,
            capture_output=True,
        )
        wait_for(
            lambda: subprocess.run(["pactl", "info"], capture_output=True).returncode == 0,
            10,
            "PulseAudio to answer",
        )
        return True
    sinks = subprocess.run(["pactl", "list", "short", "sinks"], capture_output=True, text=True)
    if "machine" not in sinks.stdout:
        subprocess.run(
            ["pactl", "load-module", "module-null-sink", "sink_name=machine", "rate=16000",
             "channels=1"],
            check=True,
            capture_output=True,
        )  # fmt: skip
    return False


def pulse_servers(runtime: Path | None = PULSE_RUNTIME) -> list[int]:
    """The PIDs of the running PulseAudio servers of this run (started with its
    PULSE_RUNTIME_PATH, whether by a test or spawned by a client), whichever socket each listens
    on; `runtime` None: every one of this user's. Zombies left unreaped are not running; other
    users' servers are theirs, and so are the user's own."""
    mark = f"PULSE_RUNTIME_PATH={runtime}".encode()
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            if stat.parent.stat().st_uid != os.getuid():
                continue
            name, _, rest = text.partition(" (")[2].rpartition(") ")
            if name != "pulseaudio" or rest.startswith("Z"):
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
            if runtime is not None and mark not in environ:
                continue
        except OSError:  # it exited while we looked
            continue
        pids.append(int(stat.parent.name))
    return pids


def describe_pulse() -> str:
    """Which PulseAudio servers run, who started them and what answers: the state a capture
    test that failed on the sound server saw (a server nobody started once answered after
    `pulseaudio --kill`, with none of the test's sinks)."""
    lines = []
    for pid in pulse_servers():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2].split()
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        lines.append(f"pid {pid}, parent {stat[1]}, started at tick {stat[19]}: {args}")
    info = subprocess.run(["pactl", "info"], capture_output=True, text=True)
    answer = [line for line in info.stdout.splitlines() if line.startswith("Server String")]
    sinks = subprocess.run(["pactl", "list", "short", "sinks"], capture_output=True, text=True)
    sink_names = [line.split("\t")[1] for line in sinks.stdout.splitlines() if "\t" in line]
    lines.append(f"pactl: {answer or info.stderr.strip()}; sinks {sink_names}")
    return "\n".join(lines)


def stop_pulse() -> None:
    """Every PulseAudio server of this run stopped, and gone before this returns (no other's:
    `pulse_servers`): `pulseaudio --kill` stops only the one its runtime directory's pid file
    names, and returns before it exits."""
    for pid in pulse_servers():
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    wait_for(
        lambda: (
            not pulse_servers()
            and subprocess.run(["pactl", "info"], capture_output=True).returncode != 0
        ),
        10,
        "every PulseAudio server to exit",
        describe_pulse,
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """This run's sound servers and their runtime folder go with it, whatever the tests left
    (each run has a folder of its own: a server left behind would run on with no one to stop
    it)."""
    for pid in pulse_servers():
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    shutil.rmtree(PULSE_RUNTIME, ignore_errors=True)


@pytest.fixture(scope="session")
def pulse() -> Iterator[str]:
    """A PulseAudio daemon with a null sink 'machine'; yields the monitor source name."""
    started = ensure_pulse()
    yield "machine.monitor"
    if started:
        stop_pulse()
