"""Build train/corpus/: log-mel frames of other machines' normal sound, for the `embedding`
detector's outlier-exposure tasks.

    python scripts/build_corpus.py [--data ../shared/data]

Only MIMII-derived normal clips (CC BY-SA 4.0): fan id_00 channel 0 and the DCASE 2020 MIMII
machines in dcase2020_ids/{pump,valve,slider}_id*/normal. Never dcase2020_lite (partly
ToyADMOS, non-commercial) and never the mimii_8ch clips (machine id unknown: they could be a
machine the benchmarks test, and `exclude=` could not keep them out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge.audio_io import read_audio  # noqa: E402
from edge.features import FeatureParams, LogMel  # noqa: E402
from train.embedding import CORPUS_FILE  # noqa: E402

FAN_CHANNEL = 0
MACHINE_FOLDERS = ("pump_id*", "valve_id*", "slider_id*")


def clips(data: Path) -> list[tuple[str, Path, int]]:
    """(machine, file, channel) of every clip that goes into the corpus, in a fixed order."""
    out = [
        ("fan_id00", f, FAN_CHANNEL)
        for f in sorted((data / "mimii_fan_id00" / "normal").glob("*.wav"))
    ]
    for pattern in MACHINE_FOLDERS:
        for folder in sorted((data / "dcase2020_ids").glob(pattern)):
            out += [(folder.name, f, 0) for f in sorted((folder / "normal").glob("*.wav"))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=CORPUS_FILE)
    args = ap.parse_args()
    params = FeatureParams()
    logmel = LogMel(params)
    frames, starts, machines, sources = [], [0], [], []
    for machine, path, channel in clips(args.data):
        f = logmel(read_audio(path, params.samplerate, channel))
        frames.append(f.astype(np.float16))
        starts.append(starts[-1] + len(f))
        machines.append(machine)
        sources.append(f"{path.relative_to(args.data)} ch{channel}")
    np.savez_compressed(
        args.out,
        frames=np.concatenate(frames),
        starts=np.asarray(starts, np.int64),
        machines=np.asarray(machines),
        sources=np.asarray(sources),
        features=np.asarray(json.dumps(params.to_dict(), sort_keys=True)),
    )
    kb = args.out.stat().st_size / 1024
    print(f"{args.out}: {len(machines)} clips, {len(set(machines))} machines, {kb:.0f} KB")


if __name__ == "__main__":
    main()
