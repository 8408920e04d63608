"""Quick measure of the `embedding` detector kind alone, the corpus always without the machine
under test (no leakage).

    python bench/embedding_quick.py [--data ../shared/data] [--sets fan ids budget] [--baseline]
        [--epochs N] [--out bench/embedding_quick.json]

- budget: training time on 10 min of audio (fan normal clips 0-19, channels 0-2).
- fan: MIMII fan id_00 channel 0, train normal 0-9, test normal 10-19 vs anomalous 0-19;
  ROC AUC and pAUC (max FPR 0.1) on whole clips and 1-s segments. Corpus excludes fan_id00.
  Also the edge cost: log-mel + int8 embedding + Mahalanobis per 1-s window on one thread
  (bench/edge_speed.py's loop, with CPU time beside wall time), over the test clips.
- ids: dcase2020_ids pump/valve/slider, per machine leave-one-normal-out (train on the other
  normals, score the left-out normal and every anomalous clip), scores pooled per machine
  type; the corpus excludes the machine under test. With --baseline the DCASE 2020 Task 2
  baseline autoencoder (bench/benchmark.py) runs on the very same folds.
Prints a markdown table and writes the raw figures as JSON (after every fold, so a long run
can be read while it goes on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as the daemon runs (soundsentry/cli.py)
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from edge.audio_io import read_audio  # noqa: E402
from train.evaluate import evaluate  # noqa: E402
from train.metrics import partial_auc, roc_auc  # noqa: E402

TYPES = ("pump", "valve", "slider")
RATE = 16000


def figures(normal: list[float], anomalous: list[float]) -> dict:
    """AUC and pAUC with anomalous as positive."""
    y = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    s = np.r_[normal, anomalous]
    return {"auc": round(roc_auc(y, s), 4), "pauc": round(partial_auc(y, s), 4), "n": len(s)}


def scored(bundle: Path, normal: list[Path], anomalous: list[Path], channel: int) -> dict:
    """Clip and 1-s scores of the normal and anomalous files, split by label."""
    out = {}
    for unit, seg in (("clip", None), ("1s", 1.0)):
        rep = evaluate(bundle, normal, anomalous, seg, "int8", channel)
        out[unit] = (
            [i.score for i in rep.items if i.label == 0],
            [i.score for i in rep.items if i.label == 1],
        )
    return out


def fan(data: Path, work: Path, epochs: int) -> dict:
    """The MIMII fan id_00 protocol, channel 0."""
    from train.embedding import train_embedding

    folder = data / "mimii_fan_id00"
    train = [folder / "normal" / f"{i:08d}.wav" for i in range(10)]
    test_n = [folder / "normal" / f"{i:08d}.wav" for i in range(10, 20)]
    test_a = [folder / "anomalous" / f"{i:08d}.wav" for i in range(20)]
    t0 = time.perf_counter()
    bundle = train_embedding(train, work / "fan.bundle", epochs=epochs, exclude=["fan_id00"])
    seconds = time.perf_counter() - t0
    s = scored(bundle, test_n, test_a, 0)
    audio = np.concatenate([read_audio(f, RATE, 0) for f in test_n + test_a])
    return {
        "clip": figures(*s["clip"]),
        "1s": figures(*s["1s"]),
        "train_seconds": round(seconds, 1),
        "model_kb": round((bundle / "model_int8.tflite").stat().st_size / 1024, 1),
        "edge_cost": edge_cost(bundle, audio),
    }


def edge_cost(bundle: Path, audio: np.ndarray) -> dict:
    """Per 1-s window, features -> score on one thread (edge.features.LogMel and the kind's
    scorer): wall-clock and this thread's CPU time, medians and p95 in ms. The CPU time is
    what a core spends, unaffected by other processes on a shared machine."""
    from edge.bundle import load_bundle
    from edge.features import LogMel
    from edge.scoring import Scorer

    b = load_bundle(bundle, num_threads=1)
    p = b.features
    logmel, scorer = LogMel(p), Scorer.from_bundle(b)
    starts = range(0, len(audio) - p.window_samples, p.hop_samples)
    for s in list(starts)[:20]:  # warm up
        scorer.score(logmel(audio[s : s + p.window_samples]))
    wall, cpu, feat = [], [], []
    for s in starts:
        w0, c0 = time.perf_counter(), time.thread_time()
        f = logmel(audio[s : s + p.window_samples])
        c1 = time.thread_time()
        scorer.score(f)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.thread_time() - c0)
        feat.append(c1 - c0)

    def ms(x: list[float], q: float) -> float:
        return round(1000 * float(np.percentile(x, q)), 3)

    return {
        "windows": len(wall),
        "cpu_ms_median": ms(cpu, 50),
        "cpu_ms_p95": ms(cpu, 95),
        "cpu_features_ms_median": ms(feat, 50),
        "wall_ms_median": ms(wall, 50),
        "wall_ms_p95": ms(wall, 95),
    }


def budget(data: Path, work: Path, epochs: int) -> dict:
    """Training time on 10 min of audio (fan normal clips 0-19, channels 0-2 as mono files)."""
    import soundfile as sf

    from train.embedding import train_embedding

    folder = work / "ten-minutes"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(20):
        for ch in range(3):
            audio = read_audio(data / "mimii_fan_id00" / "normal" / f"{i:08d}.wav", RATE, ch)
            sf.write(folder / f"{i:02d}-ch{ch}.wav", audio, RATE, subtype="PCM_16")
    t0 = time.perf_counter()
    train_embedding([folder], work / "ten-minutes.bundle", epochs=epochs)
    return {"audio_seconds": 600, "train_seconds": round(time.perf_counter() - t0, 1)}


def folds(data: Path) -> list[tuple[str, str, Path, list[Path], list[Path]]]:
    """(type, machine, left-out normal, other normals, anomalous) of every leave-one-out fold."""
    out = []
    for kind in TYPES:
        for folder in sorted((data / "dcase2020_ids").glob(f"{kind}_id*")):
            normals = sorted((folder / "normal").glob("*.wav"))
            anomalous = sorted((folder / "anomalous").glob("*.wav"))
            for left in normals:
                rest = [f for f in normals if f != left]
                out.append((kind, folder.name, left, rest, anomalous))
    return out


def ids(data: Path, work: Path, epochs: int, baseline: bool, save) -> dict:
    """Leave-one-normal-out per machine, pooled per machine type."""
    from train.embedding import train_embedding

    pooled: dict = defaultdict(lambda: ([], []))
    res: dict = {"folds": 0, "train_seconds": []}
    for kind, machine, left, rest, anomalous in folds(data):
        t0 = time.perf_counter()
        bundle = train_embedding(
            rest, work / f"{machine}-{left.stem}.bundle", epochs=epochs, exclude=[machine]
        )
        res["train_seconds"].append(round(time.perf_counter() - t0, 1))
        s = scored(bundle, [left], anomalous, 0)
        methods = {"embedding": s}
        if baseline:
            methods["dcase_baseline"] = dcase_fold(rest, [left], anomalous)
        for method, by_unit in methods.items():
            for unit, (n, a) in by_unit.items():
                pooled[(method, kind, unit)][0].extend(n)
                pooled[(method, kind, unit)][1].extend(a)
        res["folds"] += 1
        res["table"] = {f"{m}/{k}/{u}": figures(*v) for (m, k, u), v in sorted(pooled.items())}
        save(res)
        print(f"  {machine} {left.name}: done", file=sys.stderr, flush=True)
    return res


def dcase_fold(train: list[Path], normal: list[Path], anomalous: list[Path]) -> dict:
    """The DCASE 2020 baseline (bench/benchmark.py, 100 epochs) on one fold."""
    from benchmark import dcase_baseline, dcase_scores

    model = dcase_baseline(train, 100)
    cn, sn = dcase_scores(model, normal)
    ca, sa = dcase_scores(model, anomalous)
    return {
        "clip": (cn, ca),
        "1s": (list(np.concatenate(sn)), list(np.concatenate(sa))),
    }


def main() -> None:
    from train.embedding import DEFAULT_EPOCHS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--sets", nargs="+", default=["fan", "ids"], choices=["fan", "ids", "budget"])
    ap.add_argument("--baseline", action="store_true", help="DCASE baseline on the ids folds")
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    ap.add_argument(
        "--speed", type=Path, default=None, metavar="BUNDLE", help="only time this bundle"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "embedding_quick.json")
    args = ap.parse_args()
    if not (args.data / "mimii_fan_id00").is_dir():
        sys.exit(f"benchmark data not found at {args.data}: nothing measured")
    if args.speed:
        clips = sorted((args.data / "mimii_fan_id00").glob("*/*.wav"))
        audio = np.concatenate([read_audio(f, RATE) for f in clips])
        print(json.dumps(edge_cost(args.speed, audio)))
        return
    work = Path(tempfile.mkdtemp(prefix="ssemb-"))
    os.environ["SOUNDSENTRY_DATA_DIR"] = str(work / "state")
    res: dict = {"epochs": args.epochs}

    def save(part: dict | None = None) -> None:
        if part is not None:
            res["ids"] = part
        args.out.write_text(json.dumps(res, indent=2) + "\n")

    if "fan" in args.sets:
        res["fan"] = fan(args.data, work, args.epochs)
        save()
        print(json.dumps(res["fan"]), flush=True)
    if "budget" in args.sets:
        res["budget"] = budget(args.data, work, args.epochs)
        save()
        print(json.dumps(res["budget"]), flush=True)
    if "ids" in args.sets:
        ids(args.data, work, args.epochs, args.baseline, save)
    print(markdown(res))


def markdown(res: dict) -> str:
    """The figures as a markdown table."""
    lines = [
        "| set | method | clip AUC | clip pAUC | 1-s AUC | 1-s pAUC |",
        "|---|---|---|---|---|---|",
    ]
    if "fan" in res:
        f = res["fan"]
        lines.append(
            f"| MIMII fan id_00 ch 0 | embedding (int8) | {f['clip']['auc']:.3f} | "
            f"{f['clip']['pauc']:.3f} | {f['1s']['auc']:.3f} | {f['1s']['pauc']:.3f} |"
        )
    table = res.get("ids", {}).get("table", {})
    for method in ("embedding", "dcase_baseline"):
        for kind in TYPES:
            c, s = table.get(f"{method}/{kind}/clip"), table.get(f"{method}/{kind}/1s")
            if c and s:
                lines.append(
                    f"| {kind} (LOO, pooled) | {method} | {c['auc']:.3f} | {c['pauc']:.3f} | "
                    f"{s['auc']:.3f} | {s['pauc']:.3f} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
