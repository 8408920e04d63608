"""Probe, not a shipped kind: the int8 CNN's own "which machine" head as the anomaly score.

    python bench/id_head.py [--data ../shared/data] [--out bench/id_head.json]

`train_embedding` trains its network to tell the user's machine from a corpus of other
machines' normal sound, then scores the embedding with a Mahalanobis head. The strongest DCASE
2020 systems score with the classifier itself instead: -log p(own machine), high when a window
no longer sounds like this machine. This trains the task network exactly as `train_embedding`
does (same sampler, corpus without the machine under test, epochs, seed) on the folds of
bench/machines.py (MIMII fan id_00 channel 0; dcase2020_ids leave-one-normal-out), scores every
test clip with the float network's own-machine probability, and prints the pooled clip / 1-s
AUC and the AUC over same-id pairs per machine type (bench/machines.md explains the two). No
operating point: there is no bundle to replay. About 7 min on 2 cores.
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
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machines import Pooled, Task, dcase_ids_tasks, mimii_fan_tasks  # noqa: E402

from edge.audio_io import read_audio  # noqa: E402
from edge.detectors.embedding import network_input  # noqa: E402
from edge.features import FeatureParams, windows_of  # noqa: E402
from train import embedding  # noqa: E402
from train.dataset import training_audio  # noqa: E402
from train.evaluate import clip_and_segments  # noqa: E402

PROBABILITY_FLOOR = 1e-7


class OwnMachineScorer:
    """-log p(own machine) per window from the task network (state classes count as own)."""

    def __init__(self, tasks, mean: np.ndarray, std: np.ndarray, n_states: int) -> None:
        self.tasks, self.mean, self.std, self.n_states = tasks, mean, std, n_states

    def score_many(self, windows: np.ndarray) -> np.ndarray:
        machine, _ = self.tasks.predict(
            network_input(windows, self.mean, self.std)[..., None], verbose=0
        )
        own = machine[:, : self.n_states].sum(axis=1)
        return -np.log(np.maximum(own, PROBABILITY_FLOOR))


def fit(task: Task, params: FeatureParams, seed: int = 0) -> OwnMachineScorer:
    """The task network of `train_embedding`, trained on the task's normal clips."""
    embedding.keras.utils.set_random_seed(seed)
    embedding.tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(seed)
    own = embedding.read_own({"normal": training_audio([str(f) for f in task.train])}, params, 0)
    corpus = embedding.load_corpus(params, [task.corpus_key], embedding.CORPUS_FILE)
    windows = embedding.epoch_size(own.seconds)
    t = embedding.fit_tasks(own, corpus, params, embedding.DEFAULT_EPOCHS, windows, rng)
    return OwnMachineScorer(t.tasks, t.mean, t.std, len(own.states))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "id_head.json")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no data at {args.data}: this probe needs ../shared/data")
    params = FeatureParams()
    work = Path(tempfile.mkdtemp(prefix="ss-id-head-"))
    pooled: dict[str, Pooled] = defaultdict(Pooled)
    tasks = mimii_fan_tasks(args.data, work) + dcase_ids_tasks(args.data)
    for i, task in enumerate(tasks, 1):
        print(f"[{i}/{len(tasks)}] {task.machine} {task.machine_id}", file=sys.stderr)
        t0 = time.perf_counter()
        scorer = fit(task, params)
        for label, files in ((0, task.normal), (1, task.anomalous)):
            for f in files:
                windows = windows_of(read_audio(f, params.samplerate), params)
                clip, segments = clip_and_segments(
                    scorer, windows, params.window_seconds, params.hop_seconds, 1.0
                )
                pooled[task.machine].add_scores(label, clip, segments, task.machine_id)
        pooled[task.machine].seconds += time.perf_counter() - t0
    figures = {m: p.figures() for m, p in pooled.items()}
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print("| machine | clip / 1-s AUC, pooled | clip / 1-s AUC, same-id pairs | per id |")
    print("|---|---|---|---|")
    for m, f in figures.items():
        per = ", ".join(f"{i} {a:.2f}" for i, a in f["clip_auc_per_id"].items())
        print(
            f"| {m} | {f['clip_auc']:.3f} / {f['auc_1s']:.3f} | "
            f"{f['clip_auc_id_pairs']:.3f} / {f['auc_1s_id_pairs']:.3f} | {per} |"
        )


if __name__ == "__main__":
    main()
