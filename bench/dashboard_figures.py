"""Dashboard figures with real parts: the page's bytes, the live stream's bytes per second, and
the daemon's resident memory and CPU on a real stream with the dashboard off, on with nobody
watching, and on with one headless browser connected. Saves a screenshot of the page.

    python bench/dashboard_figures.py [--seconds 60] [--rounds 3] [--screenshot docs/dashboard.png]

The daemon is the real `soundsentry run` on a PulseAudio null sink fed by `paplay` with the
bundled fan clip (a real fault 5 s in) followed by its normal start over and over, so every
phase hears the same audio and raises one event. CPU is the daemon's own CPU time (user +
system, from /proc) over the phase's wall time; memory is its resident set (VmRSS) sampled
every second. The three phases run in turn, `--rounds` times, since the CPU of other work
on shared cores moves a phase's figure by about as much as a browser does. Needs pulseaudio
and, for the browser, Debian's chromium and chromium-driver.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from edge.audio_io import read_audio  # noqa: E402

MODEL = ROOT / "models" / "fan-demo.bundle"
CLIP = ROOT / "models" / "demo-fan-normal-then-fault.flac"
RATE = 16000
NORMAL_UNTIL_S = 4.5
"""The demo clip is normal fan up to here (the fault starts at 5 s)."""
CROSSFADE_S = 0.05
WARMUP_S = 10.0
"""Start-up (model load, first windows, the browser's page load) before measuring."""
STREAM_SAMPLE_S = 10.0
SINK = "dashbench"
PHONE = (412, 1500)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mb(pid: int) -> float:
    """Resident set size of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def machine_audio(path: Path, seconds: float) -> Path:
    """The demo clip, then its normal start looped with crossfades, `seconds` long."""
    clip = read_audio(CLIP, RATE)
    normal = clip[: int(NORMAL_UNTIL_S * RATE)]
    fade = np.linspace(0.0, 1.0, int(CROSSFADE_S * RATE), dtype=np.float32)
    out, n = clip, len(fade)
    while len(out) < seconds * RATE:
        joint = out[-n:] * fade[::-1] + normal[:n] * fade
        out = np.concatenate([out[:-n], joint, normal[n:]])
    sf.write(path, out, RATE, subtype="PCM_16")
    return path


def own_pulse(work: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """A PulseAudio server of our own (own socket and runtime folder, so no other user of the
    machine's PulseAudio can stop it mid-run) with a null sink; its process and environment."""
    runtime = work / "pulse"
    runtime.mkdir()
    env = {**os.environ, "PULSE_RUNTIME_PATH": str(runtime), "PULSE_STATE_PATH": str(runtime)}
    env["PULSE_SERVER"] = f"unix:{runtime}/native"
    proc = subprocess.Popen(
        [
            "pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1",
            f"--load=module-native-protocol-unix socket={runtime}/native",
            f"--load=module-null-sink sink_name={SINK} rate=16000 channels=1",
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait(lambda: subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode == 0,
         10, "pulseaudio")  # fmt: skip
    env["PULSE_SOURCE"] = f"{SINK}.monitor"
    env.pop("SOUNDSENTRY_DATA_DIR", None)
    return proc, env


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()


def stream_bytes_per_s(port: int, seconds: float) -> float:
    """Bytes per second the live stream sends to one client."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/api/stream")
    resp = conn.getresponse()
    resp.readline()  # the first line of the snapshot: connected
    total, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        total += len(resp.readline())
    conn.close()
    return total / seconds


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    driver = webdriver.Chrome(service=Service(path), options=options)
    phone(driver, PHONE[1])
    return driver


def phone(driver: Any, height: int) -> None:
    """Lay the page out as a phone of PHONE's width shows it."""
    metrics = {"width": PHONE[0], "height": height, "deviceScaleFactor": 1, "mobile": True}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


class Phase:
    """One daemon run: start it and the audio, optionally a browser, measure, stop."""

    def __init__(
        self, python: str, work: Path, audio: Path, web: bool, env: dict[str, str]
    ) -> None:
        self.port = free_port()
        config = work / f"phase-{self.port}.toml"
        config.write_text(
            f'device_id = "bench"\ndata_dir = "{work / f"data-{self.port}"}"\n'
            f'[audio]\ndevice = "pulse"\n[web]\nenabled = {str(web).lower()}\n'
            f"port = {self.port}\n"
        )
        self.daemon = subprocess.Popen(
            [python, "-m", "soundsentry", "run", "--model", str(MODEL), "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.player = subprocess.Popen(["paplay", "-d", SINK, str(audio)], env=env)
        if web:
            wait(self._serving, 30, "the dashboard")

    def _serving(self) -> bool:
        try:
            return json.loads(get(f"http://127.0.0.1:{self.port}/api/state"))["window"] is not None
        except OSError:
            return False

    def measure(self, seconds: float) -> dict[str, float]:
        """CPU % of one core and RSS (mean, max) of the daemon over `seconds`."""
        pid = self.daemon.pid
        cpu0, t0, rss = proc_cpu_s(pid), time.monotonic(), []
        while time.monotonic() - t0 < seconds:
            rss.append(proc_rss_mb(pid))
            time.sleep(1.0)
        cpu = (proc_cpu_s(pid) - cpu0) / (time.monotonic() - t0) * 100
        return {
            "cpu_pct": round(cpu, 2),
            "rss_mb": round(float(np.mean(rss)), 1),
            "rss_max_mb": round(max(rss), 1),
        }

    def stop(self) -> None:
        self.player.kill()
        self.daemon.terminate()
        self.daemon.wait(20)


def run_phase(
    name: str, args: argparse.Namespace, work: Path, env: dict[str, str], web: bool, watch: bool
) -> dict[str, Any]:
    print(f"phase: {name}", file=sys.stderr)
    phase = Phase(args.python, work, work / "machine.wav", web, env)
    driver = None
    try:
        if watch:
            driver = browser()
            driver.get(f"http://127.0.0.1:{phase.port}/")
        time.sleep(WARMUP_S)
        result: dict[str, Any] = {"phase": name, **phase.measure(args.seconds)}
        if web and not watch:
            result["stream_bytes_per_s"] = round(stream_bytes_per_s(phase.port, STREAM_SAMPLE_S))
        if web:
            page = get(f"http://127.0.0.1:{phase.port}/")
            result["page_bytes"], result["page_gzip_bytes"] = len(page), len(gzip.compress(page))
        if driver is not None and args.screenshot:
            screenshot(driver, args.screenshot)
        return result
    finally:
        if driver is not None:
            driver.quit()
        phase.stop()


def screenshot(driver: Any, out: Path) -> None:
    """The page with the event card and its spectrogram loaded."""
    from selenium.webdriver.common.by import By

    img = wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".ev.ended img"), 60, "an event")
    wait(lambda: driver.execute_script("return arguments[0].naturalWidth", img[0]), 10, "image")
    phone(driver, int(driver.execute_script("return document.body.scrollHeight")))
    out.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out))
    print(f"screenshot: {out}", file=sys.stderr)


PHASES = (
    ("dashboard off", False, False),
    ("dashboard on, nobody looking", True, False),
    ("dashboard on, one browser", True, True),
)
"""(name, web enabled, a browser connected)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds per phase")
    parser.add_argument("--rounds", type=int, default=3, help="times each phase is run, in turn")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the daemon")
    parser.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "dashboard_figures.json")
    args = parser.parse_args()
    shot, args.screenshot = args.screenshot, None
    with tempfile.TemporaryDirectory(prefix="dashbench-") as tmp:
        work = Path(tmp)
        machine_audio(work / "machine.wav", args.seconds + WARMUP_S + 60)
        pulse, env = own_pulse(work)
        rounds = []
        try:
            for n in range(args.rounds):
                args.screenshot = shot if n == args.rounds - 1 else None
                rounds.append([run_phase(p, args, work, env, web, w) for p, web, w in PHASES])
        finally:
            pulse.terminate()
            pulse.wait(10)
    report(rounds, args)


def report(rounds: list[list[dict[str, Any]]], args: argparse.Namespace) -> None:
    """Print the table and the extras (mean over rounds), and write the JSON."""

    def mean(phase: int, key: str) -> float:
        return float(np.mean([r[phase][key] for r in rounds]))

    def extra(phase: int, key: str) -> list[float]:
        return [round(r[phase][key] - r[0][key], 2) for r in rounds]

    idle = rounds[-1][1]
    summary = {
        "measured_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{os.uname().machine}, {os.cpu_count()} cores (shared)",
        "seconds_per_phase": args.seconds,
        "page_bytes": idle["page_bytes"],
        "page_gzip_bytes": idle["page_gzip_bytes"],
        "stream_bytes_per_s": idle["stream_bytes_per_s"],
        "extra_rss_mb_one_browser": extra(2, "rss_mb"),
        "extra_cpu_pct_one_browser": extra(2, "cpu_pct"),
        "extra_rss_mb_nobody_looking": extra(1, "rss_mb"),
        "extra_cpu_pct_nobody_looking": extra(1, "cpu_pct"),
        "rounds": rounds,
    }
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"| phase ({args.seconds:g} s, {len(rounds)} rounds) | daemon CPU, % of a core, "
          "per round | RSS mean, MB |")  # fmt: skip
    print("|---|---|---|")
    for i, (name, _web, _watch) in enumerate(PHASES):
        cpus = " / ".join(f"{r[i]['cpu_pct']:.2f}" for r in rounds)
        print(f"| {name} | {cpus} | {mean(i, 'rss_mb'):.1f} |")
    print(
        f"\npage: {idle['page_bytes']} bytes ({idle['page_gzip_bytes']} gzipped); live stream: "
        f"{idle['stream_bytes_per_s']} bytes/s to one client\n"
        f"extra with one browser, per round: RSS {summary['extra_rss_mb_one_browser']} MB, "
        f"CPU {summary['extra_cpu_pct_one_browser']} % of a core; nobody looking: RSS "
        f"{summary['extra_rss_mb_nobody_looking']} MB, "
        f"CPU {summary['extra_cpu_pct_nobody_looking']} %"
    )


if __name__ == "__main__":
    main()
