"""Quick detection figures of the numpy detector kinds side by side: clip and 1-s ROC AUC (and
pAUC, max FPR 0.1) on MIMII fan id_00 and on dcase2020_ids, leave one normal out, pooled per
machine type and per machine.

    python bench/kinds_quick.py [--data ../shared/data] [--kinds fluctuation levels knn]
                                [--sets mimii ids] [--baseline-epochs 0]
                                [--out bench/kinds_quick.json]

The test sets and folds are bench/machines.py's (imported, not rewritten); this script skips
its operating-point replays, so it runs in a minute or two. Every kind trains with its
defaults, fixed before measuring: nothing here is tuned on these clips. Window scores come
from the edge scorer (`score_many`), a clip's score is the mean of its windows' and a 1-s
segment's the mean of the windows inside it (`train.evaluate.clip_and_segments`).
`--baseline-epochs N` adds the DCASE 2020 baseline autoencoder on the same folds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machines import (  # noqa: E402
    CORPUS_KINDS,
    TRAINERS,
    Pooled,
    Task,
    dcase_ids_tasks,
    mimii_fan_tasks,
    run_baseline,
)

from edge.audio_io import read_audio  # noqa: E402
from edge.bundle import load_bundle  # noqa: E402
from edge.features import windows_of  # noqa: E402
from edge.scoring import Scorer  # noqa: E402
from train.evaluate import clip_and_segments  # noqa: E402

KINDS = ("fluctuation", "levels", "knn")
SEGMENT_S = 1.0


def score_task(
    trainer: object, task: Task, out: Path, pooled: Pooled, exclude: bool = False
) -> None:
    """Train on the task's normals, then score its test clips as clips and as 1-s segments.
    `exclude`: the kind trains against the bundled corpus, which must not hold this machine."""
    t0 = time.perf_counter()
    extra = {"exclude": [task.corpus_key]} if exclude and task.corpus_key else {}
    trainer([str(f) for f in task.train], out, **extra)  # type: ignore[operator]
    bundle = load_bundle(out)
    scorer, p = Scorer.from_bundle(bundle), bundle.features
    for label, files in ((0, task.normal), (1, task.anomalous)):
        for f in files:
            windows = windows_of(read_audio(f, p.samplerate), p)
            clip, segments = clip_and_segments(
                scorer, windows, p.window_seconds, p.hop_seconds, SEGMENT_S
            )
            pooled.add_scores(label, clip, segments, task.machine_id)
    pooled.seconds += time.perf_counter() - t0


def table(title: str, rows: dict[str, dict]) -> list[str]:
    """A markdown table of one machine type (or machine)."""
    lines = [f"**{title}**", "", "| detector | clip AUC | clip pAUC | 1-s AUC | 1-s pAUC |"]
    lines.append("|---|---|---|---|---|")
    for kind, f in rows.items():
        lines.append(
            f"| {kind} | {f['clip_auc']:.3f} | {f['clip_pauc']:.3f} | {f['auc_1s']:.3f} "
            f"| {f['pauc_1s']:.3f} |"
        )
    return [*lines, ""]


def figures(pooled: Pooled) -> dict:
    """AUCs of pooled scores (the 1-s pAUC beside machines.py's figures)."""
    from train.metrics import partial_auc

    out = pooled.figures()
    out.pop("merit", None)
    out["pauc_1s"] = round(partial_auc(np.array(pooled.seg_labels), np.array(pooled.seg_scores)), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=sorted(TRAINERS))
    ap.add_argument("--sets", nargs="+", default=["mimii", "ids"], choices=["mimii", "ids"])
    ap.add_argument("--baseline-epochs", type=int, default=0, help="0: no DCASE baseline")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "kinds_quick.json")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no data at {args.data}: this benchmark needs ../shared/data")
    logging.basicConfig(level=logging.WARNING)
    trainers = {
        k: getattr(importlib.import_module(TRAINERS[k][0]), TRAINERS[k][1]) for k in args.kinds
    }
    work = Path(tempfile.mkdtemp(prefix="ss-kinds-"))
    tasks = (mimii_fan_tasks(args.data, work) if "mimii" in args.sets else []) + (
        dcase_ids_tasks(args.data) if "ids" in args.sets else []
    )
    by_type: dict[str, dict[str, Pooled]] = defaultdict(lambda: defaultdict(Pooled))
    by_id: dict[str, dict[str, Pooled]] = defaultdict(lambda: defaultdict(Pooled))
    for i, task in enumerate(tasks, 1):
        name = f"{task.machine}_{task.machine_id}"
        print(f"[{i}/{len(tasks)}] {name} held {task.normal[0].name}", file=sys.stderr)
        for kind, trainer in trainers.items():
            pooled = Pooled()
            score_task(
                trainer, task, work / f"{kind}-{name}-{i}.bundle", pooled, kind in CORPUS_KINDS
            )
            for target in (by_type[task.machine][kind], by_id[name][kind]):
                _merge(target, pooled)
        if args.baseline_epochs:
            pooled = Pooled()
            run_baseline(task, args.baseline_epochs, pooled)
            for target in (by_type[task.machine]["dcase baseline"], by_id[name]["dcase baseline"]):
                _merge(target, pooled)
    res = {
        "command": "python bench/kinds_quick.py " + " ".join(sys.argv[1:]),
        "by_type": {m: {k: figures(p) for k, p in rows.items()} for m, rows in by_type.items()},
        "by_machine": {m: {k: figures(p) for k, p in rows.items()} for m, rows in by_id.items()},
    }
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"`{res['command']}`", ""]
    for machine, rows in res["by_type"].items():
        lines += table(f"{machine} (pooled)", rows)
    print("\n".join([*lines, *per_machine(res["by_machine"])]))


def per_machine(by_machine: dict[str, dict[str, dict]]) -> list[str]:
    """One row per machine: clip / 1-s AUC of each detector, pooled over that machine's folds
    (no score scales of different machines mixed)."""
    kinds = list(next(iter(by_machine.values())))
    lines = ["**per machine** (clip AUC / 1-s AUC)", "", "| machine | " + " | ".join(kinds) + " |"]
    lines.append("|---" * (len(kinds) + 1) + "|")
    for machine, rows in by_machine.items():
        cells = [f"{rows[k]['clip_auc']:.2f} / {rows[k]['auc_1s']:.2f}" for k in kinds]
        lines.append(f"| {machine} | " + " | ".join(cells) + " |")
    return lines


def _merge(target: Pooled, part: Pooled) -> None:
    target.clip_labels += part.clip_labels
    target.clip_scores += part.clip_scores
    target.clip_ids += part.clip_ids
    target.seg_labels += part.seg_labels
    target.seg_scores += part.seg_scores
    target.seconds += part.seconds


if __name__ == "__main__":
    main()
