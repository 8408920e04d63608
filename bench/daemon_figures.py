"""Field-daemon figures with real parts: steady CPU, peak RSS, start to READY=1, fault onset
to `start` at an MQTT subscriber, and RSS growth over 2 hours of audio replayed fast.

    python bench/daemon_figures.py [--python BARE_VENV/bin/python] [--hours 2]

Run it with the bare edge install's interpreter (`pip install .`, no TensorFlow) for the
Pi-like figures. Needs mosquitto. Uses the bundled demo model and clip.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "fan-demo.bundle"
CLIP = ROOT / "models" / "demo-fan-normal-then-fault.flac"
FAULT_ONSET_S = 5.0
"""Where the fault begins in the demo clip."""
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def soundsentry(
    python: str, *args: str, env: dict | None = None, stdout: int = subprocess.DEVNULL
) -> subprocess.Popen:
    return subprocess.Popen(
        [python, "-m", "soundsentry", *args],
        cwd=ROOT,
        stdout=stdout,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def steady_cpu_and_ready(python: str, work: Path, seconds: float) -> dict:
    """Real-time replay of normal audio: CPU share of one core and start to READY=1."""
    long = work / "normal-long.wav"
    notify = work / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(30)
    t0 = time.monotonic()
    p = soundsentry(
        python,
        "replay",
        str(MODEL),
        str(long),
        "--realtime",
        env={"NOTIFY_SOCKET": str(notify), "SOUNDSENTRY_DATA_DIR": str(work / "a")},
    )
    while not sock.recv(256).startswith(b"READY=1"):
        pass
    ready = time.monotonic() - t0
    time.sleep(5)
    c0, w0 = proc_cpu_s(p.pid), time.monotonic()
    time.sleep(seconds)
    cpu = (proc_cpu_s(p.pid) - c0) / (time.monotonic() - w0)
    peak = proc_kb(p.pid, "VmHWM")
    p.terminate()
    p.wait(20)
    sock.close()
    return {
        "start_to_ready_s": round(ready, 2),
        "steady_cpu_pct_one_core": round(100 * cpu, 2),
        "peak_rss_mb": round(peak / 1024, 1),
    }


def onset_latency(python: str, work: Path, runs: int) -> dict:
    """Seconds from the fault's onset in the audio to the `start` event at a subscriber."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n")
    broker = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    got: list[tuple[float, dict]] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2)
    sub.on_message = lambda _c, _u, m: got.append((time.time(), json.loads(m.payload)))
    sub.connect("127.0.0.1", port)
    sub.subscribe("soundsentry/+/events", qos=1)
    sub.loop_start()
    latencies = []
    try:
        for i in range(runs):
            cfg = work / f"lat{i}.toml"
            cfg.write_text(
                f'device_id = "lat{i}"\ndata_dir = "{work / "b"}"\n[mqtt]\n'
                f'host = "127.0.0.1"\nport = {port}\n'
            )
            p = soundsentry(
                python, "replay", str(MODEL), str(CLIP), "--realtime", "--config", str(cfg)
            )
            p.wait(60)
            starts = [
                (t, e) for t, e in got if e["type"] == "start" and e["device_id"] == f"lat{i}"
            ]
            if starts:
                t, e = starts[0]
                started = datetime.fromisoformat(e["started_at"].replace("Z", "+00:00"))
                origin = started.timestamp() - e["stream_offset_s"]
                latencies.append(t - (origin + FAULT_ONSET_S))
    finally:
        sub.loop_stop()
        broker.terminate()
    return {
        "onset_to_start_s": [round(x, 2) for x in latencies],
        "onset_to_start_median_s": round(float(np.median(latencies)), 2) if latencies else None,
    }


def memory_growth(python: str, work: Path, hours: float) -> dict:
    """RSS after the first 10 minutes of audio and at the end of `hours` of fast replay."""
    clip = sf.read(str(ROOT / "tests" / "data" / "fan-normal-0.flac"), dtype="float32")[0]
    ten = np.tile(clip, int(600 / (len(clip) / 16000)))
    files = []
    for i in range(int(hours * 6)):  # distinct files: replay reads a copy of a file only once
        chunk = work / f"ten-minutes-{i:02d}.wav"
        sf.write(chunk, np.roll(ten, 1601 * (i + 1)), 16000, subtype="PCM_16")
        files.append(str(chunk))
    p = soundsentry(
        python, "replay", str(MODEL), *files, env={"SOUNDSENTRY_DATA_DIR": str(work / "c")}
    )
    samples = []
    t0 = time.monotonic()
    while p.poll() is None:
        try:
            samples.append((time.monotonic() - t0, proc_kb(p.pid, "VmRSS")))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.5)
    wall = time.monotonic() - t0
    rss = [kb for _, kb in samples if kb]
    early = rss[min(len(rss) - 1, max(1, len(rss) // (hours * 6)))] if rss else 0
    return {
        "audio_hours": hours,
        "wall_s": round(wall, 1),
        "rss_after_10_min_audio_mb": round(early / 1024, 1),
        "rss_end_mb": round(rss[-1] / 1024, 1) if rss else None,
        "rss_growth_mb": round((rss[-1] - early) / 1024, 1) if rss else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable, help="interpreter of a bare install")
    ap.add_argument("--hours", type=int, default=2)
    ap.add_argument("--cpu-seconds", type=float, default=60.0)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ssdaemon-"))
    normal = np.concatenate(
        [
            sf.read(str(f), dtype="float32")[0]
            for f in sorted((ROOT / "tests" / "data").glob("fan-normal-*"))
        ]
    )
    sf.write(work / "normal-long.wav", np.tile(normal, 10), 16000, subtype="PCM_16")
    out = {"python": args.python}
    out |= steady_cpu_and_ready(args.python, work, args.cpu_seconds)
    out |= onset_latency(args.python, work, args.runs)
    out |= memory_growth(args.python, work, args.hours)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
