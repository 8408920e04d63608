"""Detection across machine types, judged at the operating point, with the DCASE 2020 baseline
beside every detector in the same run.

    python bench/machines.py [--data ../shared/data] [--kinds fluctuation levels ...]
                             [--baseline-epochs 100] [--sets mimii mimii8 ids lite]
                             [--out bench/machines.json]

Test sets (../shared/data/README.md):
- MIMII fan id_00, channel 0 (a mono microphone): train normal 0-9; test normal 10-19 vs
  anomalous 0-19.
- `mimii8`: the same, trained with all 8 channels of the training clips as views (numpy kinds
  and the embedding; tested on channel 0; no baseline row: its reference is the channel-0 one).
- dcase2020_ids (pump, valve, slider) and dcase2020_lite (six types): leave-one-normal-out
  within each machine id (fit on the other normals, score the left-out normal and every
  anomalous clip), pooled per machine type over ids and folds.

Per machine type: clip AUC, 1-s AUC, clip pAUC (max FPR 0.1), and the operating point: each
test clip replayed as its own stream through the real pipeline (`edge.daemon.Detector`) at
the bundle's calibrated default budget, counting fault clips with a `start` and normal clips
with one. The default detector is then chosen by the rule in bench/SELECTION.md, which this
script applies and prints. Writes bench/machines.md and the raw figures as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchmark import channel_copies, dcase_baseline, dcase_scores  # noqa: E402

from edge.audio_io import read_audio  # noqa: E402
from edge.bundle import load_bundle  # noqa: E402
from edge.daemon import Detector, Sink  # noqa: E402
from edge.features import windows_of  # noqa: E402
from edge.messages import EventMessage  # noqa: E402
from edge.scoring import Scorer  # noqa: E402
from edge.settings import DetectorSettings, Settings  # noqa: E402
from edge.sources import FileSource  # noqa: E402
from edge.threshold import k_of_n_peak  # noqa: E402
from train.evaluate import clip_and_segments_of  # noqa: E402
from train.metrics import partial_auc, roc_auc  # noqa: E402
from train.statistics import Trainer  # noqa: E402

RATE = 16000
SELECTION_TYPES = ("fan", "pump", "valve", "slider")
FALSE_ALARM_WEIGHT = 2.0
"""bench/SELECTION.md: a normal clip with an event costs twice a missed fault clip."""
BASELINE_TOLERANCE = 0.02
CORPUS_KINDS = ("embedding", "ensemble")
"""Kinds that train against the bundled corpus of other machines' normal sound."""
# kind -> (module, function): each trainer is called as fn(files, out) with its defaults.
TRAINERS = {
    "fluctuation": ("train.fluctuation", "train_fluctuation"),
    "levels": ("train.levels", "train_levels"),
    "knn": ("train.knn", "train_knn"),
    "subspace": ("train.subspace", "train_subspace"),
    "embedding": ("train.embedding", "train_embedding"),
    "ensemble": ("train.ensemble", "train_ensemble"),
    "autoencoder": ("train.trainer", "train_bundle"),
}


@dataclass
class Task:
    """One fit-and-test split of one machine."""

    machine: str
    """Machine type (fan, pump, ...)."""
    machine_id: str
    train: list[Path]
    normal: list[Path]
    anomalous: list[Path]
    corpus_key: str = ""
    """How the bundled corpus of other machines names this one (kept out of its training)."""
    all_channels: bool = False
    """Train on every channel of the (multichannel) training files as a view."""


@dataclass
class Pooled:
    """Scores and operating-point counts of one detector on one machine type, over its tasks."""

    clip_labels: list[int] = field(default_factory=list)
    clip_scores: list[float] = field(default_factory=list)
    seg_labels: list[int] = field(default_factory=list)
    seg_scores: list[float] = field(default_factory=list)
    faults_with_event: int = 0
    normals_with_event: int = 0
    n_faults: int = 0
    n_normals: int = 0
    seconds: float = 0.0
    score_seconds: float = 0.0
    """Time the scorer took over the test windows (features to score), for rule 3."""
    score_windows: int = 0
    clip_ids: list[str] = field(default_factory=list)
    """The machine id of each clip score: AUC within one machine, beside the pooled one."""
    seg_ids: list[str] = field(default_factory=list)
    clear: dict[str, list[int]] = field(default_factory=dict)
    """[fault clips above the normal audio, of them with an event] under `clear_k_of_n` and
    `clear_window` (above all normal audio of the split, test and held-out, by the K-of-N
    statistic and by one window: `above_normals`), and `above_test_normals_k_of_n` and
    `above_test_normals_window` (above the normal test clips alone)."""

    def add_scores(self, label: int, clip: float, segments: list[float], machine_id: str) -> None:
        self.clip_labels.append(label)
        self.clip_scores.append(clip)
        self.clip_ids.append(machine_id)
        self.seg_labels += [label] * len(segments)
        self.seg_scores += list(segments)
        self.seg_ids += [machine_id] * len(segments)

    def per_id_auc(self) -> dict[str, float]:
        """Clip AUC among one machine's clips, for each machine id with both labels."""
        per = auc_per_id(self.clip_labels, self.clip_scores, self.clip_ids)
        return {i: round(auc, 4) for i, (auc, _) in per.items()}

    def pairs_per_id(self) -> dict[str, int]:
        """(fault, normal) clip pairs of each machine id: how much its AUC can be trusted."""
        y, m = np.array(self.clip_labels), np.array(self.clip_ids)
        return {i: int((y[m == i] == 1).sum() * (y[m == i] == 0).sum()) for i in dict.fromkeys(m)}

    def within_id_auc(self) -> float:
        """Mean over machine ids of the clip AUC within one id: what a user who runs one machine
        sees. The pooled AUC also ranks one machine's normal clips against another's faults, so
        it depends on how the machines' score scales line up as well."""
        aucs = list(self.per_id_auc().values())
        return float(np.mean(aucs)) if aucs else float("nan")

    def figures(self) -> dict:
        """AUCs and the operating point; None where this detector has no operating point."""
        y, s = np.array(self.clip_labels), np.array(self.clip_scores)
        ys, ss = np.array(self.seg_labels), np.array(self.seg_scores)
        out = {
            "clip_auc": round(roc_auc(y, s), 4),
            "clip_pauc": round(partial_auc(y, s), 4),
            "auc_1s": round(roc_auc(ys, ss), 4),
            "clip_auc_within_id": round(self.within_id_auc(), 4),
            "clip_auc_id_pairs": round(
                id_pairs_auc(self.clip_labels, self.clip_scores, self.clip_ids), 4
            ),
            "auc_1s_id_pairs": round(
                id_pairs_auc(self.seg_labels, self.seg_scores, self.seg_ids), 4
            ),
            "clip_auc_per_id": self.per_id_auc(),
            "clip_pairs_per_id": self.pairs_per_id(),
            "train_test_seconds": round(self.seconds, 1),
        }
        if self.score_windows:  # detectors, not the baseline: rule 3's edge cost
            out["ms_per_window"] = round(1000 * self.score_seconds / self.score_windows, 4)
        if self.n_faults:
            tpr = self.faults_with_event / self.n_faults
            fpr = self.normals_with_event / max(self.n_normals, 1)
            out |= {
                "faults_with_event": f"{self.faults_with_event}/{self.n_faults}",
                "normals_with_event": f"{self.normals_with_event}/{self.n_normals}",
                "operating_point": round(tpr - FALSE_ALARM_WEIGHT * fpr, 4),
            } | {f"{key}_with_event": f"{e}/{a}" for key, (a, e) in self.clear.items()}
            out["merit"] = round((out["clip_auc"] + out["auc_1s"]) / 2 + out["operating_point"], 4)
        else:
            out["merit"] = round((out["clip_auc"] + out["auc_1s"]) / 2, 4)
        return out


def auc_per_id(
    labels: list[int], scores: list[float], ids: list[str]
) -> dict[str, tuple[float, int]]:
    """Each machine id's AUC among its own items and its (fault, normal) pair count, for the
    ids with both labels."""
    y, s, m = np.array(labels), np.array(scores), np.array(ids)
    return {
        i: (roc_auc(y[m == i], s[m == i]), int((y[m == i] == 1).sum() * (y[m == i] == 0).sum()))
        for i in dict.fromkeys(ids)
        if len(set(y[m == i])) == 2
    }


def id_pairs_auc(labels: list[int], scores: list[float], ids: list[str]) -> float:
    """AUC over the (fault, normal) pairs of the same machine id only, all ids' pairs pooled:
    each id's AUC weighted by its pairs. No pair ranks one machine's normal clip against another
    machine's fault, so it does not depend on how the machines' score scales line up, and an id
    weighs by its pairs (the mean over ids gives pump id02's 4 pairs the weight of id04's 245)."""
    per = auc_per_id(labels, scores, ids).values()
    total = sum(pairs for _, pairs in per)
    return float(sum(auc * pairs for auc, pairs in per) / total) if total else float("nan")


# --- test sets -------------------------------------------------------------------------------


def mimii_fan_tasks(data: Path, work: Path, all_channels: bool = False) -> list[Task]:
    """The shared MIMII protocol, tested on mono copies of channel 0. Trained on channel 0 too,
    or with `all_channels` on all 8 channels of the training clips as views (the numpy kinds
    and the embedding; the autoencoder reads one channel)."""
    folder = data / "mimii_fan_id00"
    pick = lambda kind, ids: [folder / kind / f"{i:08d}.wav" for i in ids]  # noqa: E731
    mono = lambda files: channel_copies(files, 0, work / "mimii-ch0")  # noqa: E731
    train = pick("normal", range(10))
    return [
        Task(
            "fan-8ch" if all_channels else "fan",
            "id_00",
            train if all_channels else mono(train),
            mono(pick("normal", range(10, 20))),
            mono(pick("anomalous", range(20))),
            "fan_id00",
            all_channels=all_channels,
        )
    ]


def leave_one_normal_out(
    machine: str, machine_id: str, normal: list[Path], anomalous: list[Path], key: str
) -> list[Task]:
    """Fit on all normals but one; test that one and every anomalous clip."""
    return [
        Task(machine, machine_id, normal[:i] + normal[i + 1 :], [held], anomalous, key)
        for i, held in enumerate(normal)
        if len(normal) >= 2
    ]


def dcase_ids_tasks(data: Path) -> list[Task]:
    tasks = []
    for folder in sorted((data / "dcase2020_ids").glob("*_id*")):
        machine, mid = folder.name.split("_", 1)
        normal = sorted((folder / "normal").glob("*.wav"))
        anomalous = sorted((folder / "anomalous").glob("*.wav"))
        tasks += leave_one_normal_out(machine, mid, normal, anomalous, folder.name)
    return tasks


def dcase_lite_tasks(data: Path) -> list[Task]:
    tasks = []
    for folder in sorted(p for p in (data / "dcase2020_lite").iterdir() if p.is_dir()):
        normal = sorted(folder.glob("normal_*.wav"))
        anomalous = sorted(folder.glob("anomaly_*.wav"))
        key = f"{folder.name}_id{normal[0].stem.split('_')[2]}" if normal else ""
        tasks += leave_one_normal_out(f"lite-{folder.name}", "lite", normal, anomalous, key)
    return tasks


# --- scoring ---------------------------------------------------------------------------------


class _Starts(Sink):
    def __init__(self) -> None:
        self.starts = 0

    def event(self, message: EventMessage) -> None:
        self.starts += message.type == "start"


def raises_event(bundle_path: Path, clip: Path, data_dir: Path) -> bool:
    """Replay one clip as its own stream through the real daemon loop at the default budget."""
    sink = _Starts()
    settings = Settings(
        device_id="bench", model=bundle_path, data_dir=data_dir, clips={"enabled": False}
    )
    bundle = load_bundle(bundle_path)
    Detector(settings, bundle, [sink]).run(FileSource([clip], bundle.features.samplerate))
    return sink.starts > 0


def above_normals(
    normal: list[np.ndarray],
    faults: list[np.ndarray],
    events: list[bool],
    k: int,
    n: int,
    held: tuple[float, float] = (-np.inf, -np.inf),
) -> dict[str, list[int]]:
    """[above, of them with event] by the K-of-N statistic (`k_of_n`) and by one window: fault
    clips whose statistic exceeds its highest value on every normal test clip of the split and
    `held`, its highest on the held-out normal audio the threshold was set on (the manifest's
    `holdout_k_of_n_peak` and `holdout_max`; scored by a model that did not see it). What "a
    fault that clearly stands above all normal audio" is counted as; the one-window count is
    the weaker sense."""
    out = {}
    stats = {
        "k_of_n": lambda s: k_of_n_peak(s, k, n),
        "window": lambda s: float(s.max(initial=-np.inf)),
    }
    for (name, stat), floor in zip(stats.items(), held, strict=True):
        top = max([floor] + [stat(s) for s in normal])
        above = [stat(s) > top for s in faults]
        out[name] = [sum(above), sum(a and e for a, e in zip(above, events, strict=True))]
    return out


def takes_views(trainer: Callable) -> bool:
    """Whether a trainer can take every channel of a recording as a view (`all_channels`)."""
    fn = trainer.func if isinstance(trainer, partial) else trainer
    params = inspect.signature(fn.__call__ if isinstance(fn, Trainer) else fn).parameters
    return "all_channels" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def run_detector(kind: str, trainer: Callable, task: Task, work: Path, pooled: Pooled) -> None:
    t0 = time.perf_counter()
    out = work / f"{kind}-{task.machine}-{task.machine_id}-{task.normal[0].stem}.bundle"
    files = [str(f) for f in task.train]
    views = {"all_channels": True} if task.all_channels else {}
    if kind in CORPUS_KINDS:
        try:  # the machine under test never trains as "another machine"
            trainer(files, out, exclude=[task.corpus_key], **views)
        except ValueError:  # the corpus does not hold this machine
            trainer(files, out, **views)
    else:
        trainer(files, out, **views)
    bundle = load_bundle(out)
    scorer = Scorer.from_bundle(bundle)
    p = bundle.features
    window_scores: dict[int, list[np.ndarray]] = {0: [], 1: []}
    fault_events = []
    for label, files in ((0, task.normal), (1, task.anomalous)):
        for f in files:
            windows = windows_of(read_audio(f, p.samplerate), p)
            t_score = time.perf_counter()
            scores = scorer.score_many(windows)
            pooled.score_seconds += time.perf_counter() - t_score
            pooled.score_windows += len(windows)
            window_scores[label].append(scores)
            clip, segments = clip_and_segments_of(scores, p.window_seconds, p.hop_seconds, 1.0)
            pooled.add_scores(label, clip, segments, task.machine_id)
            event = raises_event(out, f, work / "data")
            if label:
                pooled.n_faults += 1
                pooled.faults_with_event += event
                fault_events.append(event)
            else:
                pooled.n_normals += 1
                pooled.normals_with_event += event
    params = bundle.manifest.threshold.params
    k, n = DetectorSettings().k_of_n(params)
    held = tuple(
        -np.inf if params.get(key) is None else params[key]
        for key in ("holdout_k_of_n_peak", "holdout_max")
    )
    normal, faults = window_scores[0], window_scores[1]
    for prefix, reference in (("clear", held), ("above_test_normals", (-np.inf, -np.inf))):
        counts = above_normals(normal, faults, fault_events, k, n, reference)
        for stat, (above, with_event) in counts.items():
            total = pooled.clear.setdefault(f"{prefix}_{stat}", [0, 0])
            total[0], total[1] = total[0] + above, total[1] + with_event
    pooled.seconds += time.perf_counter() - t0


def run_baseline(task: Task, epochs: int, pooled: Pooled) -> None:
    t0 = time.perf_counter()
    model = dcase_baseline(task.train, epochs)
    for label, files in ((0, task.normal), (1, task.anomalous)):
        clips, segments = dcase_scores(model, files)
        for c, seg in zip(clips, segments, strict=True):
            pooled.add_scores(label, c, list(seg), task.machine_id)
    pooled.seconds += time.perf_counter() - t0


# --- selection (bench/SELECTION.md) ----------------------------------------------------------


def select_default(figures: dict[str, dict[str, dict]]) -> dict:
    """Leave one machine type out: rank candidates by mean merit over the other types."""
    kinds = [k for k in figures if k != "baseline"]
    types = [t for t in SELECTION_TYPES if all(t in figures[k] for k in kinds)]
    if not types:  # a run of other sets only (mimii8, lite): nothing to choose by
        return {"types": [], "default": None}
    firsts: dict[str, int] = defaultdict(int)
    per_fold = {}
    for left_out in types:
        others = [t for t in types if t != left_out] or [left_out]
        ranking = sorted(kinds, key=lambda k: -np.mean([figures[k][t]["merit"] for t in others]))
        per_fold[left_out] = ranking
        firsts[ranking[0]] += 1
    worst = {k: min(figures[k][t]["merit"] for t in types) for k in kinds}
    # rule 3: the edge cost breaks remaining ties (runs from before it was measured: no tie break)
    cost = {k: np.mean([figures[k][t].get("ms_per_window", 0.0) for t in types]) for k in kinds}
    order = sorted(kinds, key=lambda k: (-firsts[k], -worst[k], cost[k]))
    chosen, skipped = None, []
    base = figures.get("baseline", {})
    unchecked = [t for t in types if t not in base]  # --no-baseline: rule 2 cannot be applied
    for k in order:
        short = [  # rule 2 as written: the candidate's merit against the baseline's AUC mean
            t
            for t in types
            if t in base
            and figures[k][t]["merit"]
            < (base[t]["clip_auc"] + base[t]["auc_1s"]) / 2 - BASELINE_TOLERANCE
        ]
        if not short:
            chosen = k
            break
        skipped.append({"kind": k, "below_baseline_on": short})
    return {
        "types": types,
        "ranking_per_left_out_type": per_fold,
        "first_places": {k: firsts[k] for k in kinds},
        "worst_type_merit": worst,
        "ms_per_window": {k: round(float(v), 4) for k, v in cost.items()},
        "skipped": skipped,
        "rule_2_not_applied_on": unchecked,
        "default": chosen,
    }


# --- report ----------------------------------------------------------------------------------


def clear_cell(f: dict) -> str:
    """'5/5 (10/14)': fault clips whose K-of-N statistic stands above all normal audio, with an
    event / all of them, then the same above the normal test clips alone (`above_normals`); a
    dash for rows without an operating point."""
    if "clear_k_of_n_with_event" not in f:
        return "–"
    return f"{f['clear_k_of_n_with_event']} ({f['above_test_normals_k_of_n_with_event']})"


def markdown(res: dict) -> str:
    lines = [f"Measured {res['when']} on {res['machine']}; `{res['command']}`.", ""]
    head = (
        "| detector | clip AUC | 1-s AUC | clip pAUC | within one id: clip / 1-s AUC (id pairs) "
        "| clip AUC, mean of ids | faults with event | normals with event "
        "| faults above all normal audio (above the test normals): with event / above, K of N "
        "| merit |"
    )
    for machine, rows in res["by_type"].items():
        lines += [
            f"**{machine}** ({rows['_tasks']} fit/test splits)",
            "",
            head,
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        kinds = {k: f for k, f in rows.items() if not k.startswith("_")}
        for kind, f in kinds.items():
            lines.append(
                f"| {kind} | {f['clip_auc']:.3f} | {f['auc_1s']:.3f} | {f['clip_pauc']:.3f} | "
                f"{f.get('clip_auc_id_pairs', float('nan')):.3f} / "
                f"{f.get('auc_1s_id_pairs', float('nan')):.3f} | "
                f"{f.get('clip_auc_within_id', float('nan')):.3f} | "
                f"{f.get('faults_with_event', '–')} | {f.get('normals_with_event', '–')} | "
                f"{clear_cell(f)} | {f['merit']:.3f} |"
            )
        ids = list(dict.fromkeys(i for f in kinds.values() for i in f.get("clip_auc_per_id", {})))
        if len(ids) > 1:
            pairs = next(iter(kinds.values())).get("clip_pairs_per_id", {})
            named = [f"{i} ({pairs.get(i, '?')} pairs)" for i in ids]
            lines += ["", "Clip AUC per machine id:", ""]
            lines += ["| detector | " + " | ".join(named) + " |", "|---" * (len(ids) + 1) + "|"]
            for kind, f in kinds.items():
                per = f.get("clip_auc_per_id", {})
                cells = " | ".join(f"{per[i]:.2f}" if i in per else "–" for i in ids)
                lines.append(f"| {kind} | {cells} |")
        lines.append("")
    sel = res["selection"]
    if not sel["types"]:
        return "\n".join(lines) + "\n"
    lines += [
        "Selection (bench/SELECTION.md): first places when each type is left out: "
        + ", ".join(f"{k} {v}" for k, v in sel["first_places"].items())
        + f"; default: **{sel['default']}**"
        + (
            f" (rule 2 not applied on {', '.join(sel['rule_2_not_applied_on'])}: no baseline in "
            "this run)."
            if sel.get("rule_2_not_applied_on")
            else "."
        ),
    ]
    return "\n".join(lines) + "\n"


def measured(script: str) -> dict[str, str]:
    """When, on what and by which command a bench's figures were measured."""
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        ),
        "command": f"python bench/{script} " + " ".join(sys.argv[1:]),
    }


def write_results(res: dict, out: Path, markdown: Callable[[dict], str]) -> None:
    """The figures as JSON at `out`, their markdown beside it (.md) and on stdout."""
    out.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)


def main() -> None:
    args = parse_args()
    if not args.data.is_dir():
        sys.exit(f"no data at {args.data}: this benchmark needs ../shared/data")
    trainers = load_trainers(args.kinds, args.members)
    work = Path(tempfile.mkdtemp(prefix="ss-machines-"))
    tasks = gather_tasks(args.sets, args.data, work)
    pooled, n_tasks = run_tasks(tasks, trainers, work, args)
    by_type = {
        m: {"_tasks": n_tasks[m], **{k: p.figures() for k, p in rows.items()}}
        for m, rows in pooled.items()
    }
    figures = defaultdict(dict)
    for m, rows in by_type.items():
        for k, f in rows.items():
            if not k.startswith("_"):
                figures[k][m] = f
    res = measured("machines.py") | {
        "by_type": by_type,
        "selection": select_default(dict(figures)),
    }
    write_results(res, args.out, markdown)


def parse_args() -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument(
        "--kinds",
        nargs="+",
        default=list(TRAINERS),  # every kind `train --detector` offers without labels
    )
    ap.add_argument(
        "--members", nargs="+", help="the ensemble's members (default: its trainer's default)"
    )
    ap.add_argument("--baseline-epochs", type=int, default=100)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--sets", nargs="+", default=["mimii", "mimii8", "ids", "lite"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "machines.json")
    return ap.parse_args()


def load_trainers(kinds: list[str], members: list[str] | None) -> dict[str, Callable]:
    """The trainer of each kind that can be imported here; the others skipped with a word."""
    trainers = {}
    for kind in kinds:
        module, name = TRAINERS[kind]
        try:
            trainers[kind] = getattr(importlib.import_module(module), name)
            if kind == "ensemble" and members:
                trainers[kind] = partial(trainers[kind], members=members)
        except (ImportError, AttributeError):
            print(f"skipping {kind}: {module}.{name} is not available", file=sys.stderr)
    return trainers


def gather_tasks(sets: list[str], data: Path, work: Path) -> list[Task]:
    """The tasks of the test sets asked for, in the order mimii, mimii8, ids, lite."""
    tasks: list[Task] = []
    if "mimii" in sets:
        tasks += mimii_fan_tasks(data, work)
    if "mimii8" in sets:
        tasks += mimii_fan_tasks(data, work, all_channels=True)
    if "ids" in sets:
        tasks += dcase_ids_tasks(data)
    if "lite" in sets:
        tasks += dcase_lite_tasks(data)
    return tasks


def run_tasks(
    tasks: list[Task], trainers: dict[str, Callable], work: Path, args: argparse.Namespace
) -> tuple[dict[str, dict[str, Pooled]], dict[str, int]]:
    """Every detector (and the baseline) on every task, pooled per machine type and kind; and
    the number of tasks per machine type."""
    pooled: dict[str, dict[str, Pooled]] = defaultdict(lambda: defaultdict(Pooled))
    n_tasks: dict[str, int] = defaultdict(int)
    for i, task in enumerate(tasks, 1):
        n_tasks[task.machine] += 1
        print(
            f"[{i}/{len(tasks)}] {task.machine} {task.machine_id} held {task.normal[0].name}",
            file=sys.stderr,
        )
        for kind, trainer in trainers.items():
            if task.all_channels and not takes_views(trainer):
                continue  # a kind that trains on one channel has no row of all channels
            run_detector(kind, trainer, task, work, pooled[task.machine][kind])
        if not args.no_baseline and not task.all_channels:  # its reference is the ch 0 row
            run_baseline(task, args.baseline_epochs, pooled[task.machine]["baseline"])
    return pooled, n_tasks


if __name__ == "__main__":
    main()
