"""Edge cost of scoring: time per 1-s window (features + int8 inference) on one core, and the
peak RSS of `soundsentry replay` over the given audio.

    python bench/edge_speed.py [MODEL] [--audio FILE...] [--seconds N]

Without --audio it synthesises nothing: it needs real audio, by default the bundled demo clip
looped to --seconds.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, as the daemon (soundsentry/cli.py): numpy reads it at import

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def time_per_window(model: Path, audio: np.ndarray) -> dict:
    """Median and p95 milliseconds for features + inference of one window, single thread."""
    from edge.bundle import load_bundle
    from edge.features import LogMel
    from edge.scoring import Scorer

    bundle = load_bundle(model, num_threads=1)
    p = bundle.features
    logmel, scorer = LogMel(p), Scorer.from_bundle(bundle)
    starts = range(0, len(audio) - p.window_samples, p.hop_samples)
    for s in list(starts)[:20]:  # warm up
        scorer.score(logmel(audio[s : s + p.window_samples]))
    feat_t, total_t, cpu_t = [], [], []
    for s in starts:
        c0, t0 = time.thread_time(), time.perf_counter()
        f = logmel(audio[s : s + p.window_samples])
        t1 = time.perf_counter()
        scorer.score(f)
        t2, c2 = time.perf_counter(), time.thread_time()
        feat_t.append(t1 - t0)
        total_t.append(t2 - t0)
        cpu_t.append(c2 - c0)
    ms = 1000 * np.asarray(total_t)
    return {
        "windows": len(ms),
        "cpu_ms_median": round(1000 * float(np.median(cpu_t)), 3),  # this thread's CPU time
        "features_ms_median": round(1000 * float(np.median(feat_t)), 3),
        "total_ms_median": round(float(np.median(ms)), 3),
        "total_ms_p95": round(float(np.percentile(ms, 95)), 3),
        "model_kb": round(
            sum(f.stat().st_size for f in bundle.path.glob("*_int8.tflite")) / 1024, 1
        ),
        "bundle_kb": round(sum(f.stat().st_size for f in bundle.path.iterdir()) / 1024, 1),
    }


def replay_rss(model: Path, wav: Path) -> dict:
    """Wall time and peak RSS of a `soundsentry replay` child process (as fast as possible)."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "soundsentry", "replay", str(model), str(wav)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"replay_wall_s": round(wall, 2), "replay_peak_rss_mb": round(peak_kb / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", type=Path, default=ROOT / "models" / "fan-demo.bundle")
    ap.add_argument(
        "--audio",
        nargs="+",
        type=Path,
        default=[ROOT / "models" / "demo-fan-normal-then-fault.flac"],
    )
    ap.add_argument("--seconds", type=float, default=300.0)
    args = ap.parse_args()
    import soundfile as sf

    from edge.audio_io import read_audio

    clip = np.concatenate([read_audio(a, 16000) for a in args.audio])
    reps = int(np.ceil(args.seconds * 16000 / len(clip)))
    audio = np.tile(clip, reps)[: int(args.seconds * 16000)]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, audio {args.seconds:.0f} s")
    print(time_per_window(args.model, audio))
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "long.wav"
        sf.write(wav, audio, 16000, subtype="PCM_16")
        print(replay_rss(args.model, wav))


if __name__ == "__main__":
    main()
