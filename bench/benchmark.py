"""SoundSentry benchmark: detection quality, on-site calibration, supervised mode and speed,
in one run on the same splits, against a re-implementation of the DCASE 2020 Task 2 baseline.

    python bench/benchmark.py [--data ../shared/data] [--quick] [--out bench/benchmark.json]

Protocols (../shared/data/README.md):
- MIMII fan id_00: train on normal 0-9 (channel 0, or all 8 channels as views where noted);
  test normal 10-19 vs anomalous 0-19; ROC AUC and pAUC (max FPR 0.1) on whole clips and on
  1-s segments.
- Channel shift: train on channel 0, test on channel 4, before and after `calibrate` with
  normal clips 8 and 9 of channel 4 (training clips: no test audio is used).
- Supervised: MIMII fan normal vs anomalous, file split (train clips 0-9 of both, test 10-19),
  balanced accuracy on 1-s segments; dcase2020_lite machine type (6 classes), file split.
- Speed: 300 s of audio scored by the edge path vs the baseline path (librosa + the Keras
  model called on each window), start-up included. `--speed-only` re-measures just that, with
  the shipped bundles (models/fan-demo.bundle, models/fan-autoencoder.bundle), into the JSON
  of the last full run.
Prints a markdown table; writes the raw figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge.audio_io import read_audio  # noqa: E402
from edge.calibrate import calibrate_bundle  # noqa: E402
from train.evaluate import evaluate  # noqa: E402
from train.metrics import classification_report, partial_auc, roc_auc  # noqa: E402

RATE = 16000
SPEED_SECONDS = 300


def mimii(data: Path, kind: str, ids: range) -> list[Path]:
    return [data / "mimii_fan_id00" / kind / f"{i:08d}.wav" for i in ids]


def channel_copies(files: list[Path], channel: int, folder: Path) -> list[Path]:
    """Mono copies of one channel (the CLI-level tools take a channel too; copies keep the
    DCASE baseline, which reads mono files, on the very same audio)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        dst = folder / f"{f.parent.name}-{f.stem}.wav"
        if not dst.exists():
            sf.write(dst, read_audio(f, RATE, channel), RATE, subtype="PCM_16")
        out.append(dst)
    return out


def quality(
    bundle: Path, normal: list[Path], anomalous: list[Path], variant: str = "int8", channel: int = 0
) -> dict:
    clip = evaluate(bundle, normal, anomalous, None, variant, channel)
    seg = evaluate(bundle, normal, anomalous, 1.0, variant, channel)
    return {
        "auc": clip.auc,
        "pauc": clip.pauc,
        "auc_1s": seg.auc,
        "pauc_1s": seg.pauc,
        "variant": clip.variant,
    }


# --- the DCASE 2020 Task 2 baseline, from its published parameters --------------------------


def dcase_vectors(path: Path, frames: int = 5) -> np.ndarray:
    import librosa

    y, _ = librosa.load(str(path), sr=RATE, mono=True)
    mel = librosa.feature.melspectrogram(
        y=y, sr=RATE, n_fft=1024, hop_length=512, n_mels=64, power=2.0
    )
    logmel = 20.0 / 2.0 * np.log10(mel + np.finfo(float).eps)
    n = logmel.shape[1] - frames + 1
    return np.concatenate([logmel[:, t : t + n] for t in range(frames)], axis=0).T


def dcase_baseline(train: list[Path], epochs: int) -> object:
    import keras

    keras.utils.set_random_seed(0)
    x = np.concatenate([dcase_vectors(f) for f in train])
    inp = keras.Input((x.shape[1],))
    h = inp
    for units in (64, 64, 8, 64, 64):
        h = keras.layers.Dense(units, activation="relu")(h)
    out = keras.layers.Dense(x.shape[1])(h)
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="mean_squared_error")
    model.fit(x, x, epochs=epochs, batch_size=512, shuffle=True, validation_split=0.1, verbose=0)
    return model


def dcase_scores(model: object, files: list[Path]) -> tuple[list[float], list[np.ndarray]]:
    clip, segments = [], []
    hop_s = 512 / RATE
    for f in files:
        v = dcase_vectors(f)
        err = np.mean((v - model.predict(v, verbose=0)) ** 2, axis=1)  # type: ignore[attr-defined]
        clip.append(float(err.mean()))
        per_s = round(1 / hop_s)
        segments.append(
            np.array([err[i : i + per_s].mean() for i in range(0, len(err) - per_s + 1, per_s)])
        )
    return clip, segments


def dcase_quality(model: object, normal: list[Path], anomalous: list[Path]) -> dict:
    cn, sn = dcase_scores(model, normal)
    ca, sa = dcase_scores(model, anomalous)
    y = np.r_[np.zeros(len(cn)), np.ones(len(ca))]
    s = np.r_[cn, ca]
    sn_all, sa_all = np.concatenate(sn), np.concatenate(sa)
    ys = np.r_[np.zeros(len(sn_all)), np.ones(len(sa_all))]
    ss = np.r_[sn_all, sa_all]
    return {
        "auc": round(roc_auc(y, s), 4),
        "pauc": round(partial_auc(y, s), 4),
        "auc_1s": round(roc_auc(ys, ss), 4),
        "pauc_1s": round(partial_auc(ys, ss), 4),
        "variant": "float",
    }


# --- speed -----------------------------------------------------------------------------------


def edge_speed(bundle: Path, wav: Path) -> float:
    """Wall time of `soundsentry replay` (a fresh process: start-up included)."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "soundsentry", "replay", str(bundle), str(wav)],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "SOUNDSENTRY_DATA_DIR": tempfile.mkdtemp()},
    )
    return time.perf_counter() - t0


BASELINE_SPEED = r"""
import sys, time, numpy as np, soundfile as sf, librosa, keras
t0 = time.perf_counter()
x, sr = sf.read(sys.argv[1], dtype="float32")
inp = keras.Input((320,)); h = inp
for u in (64, 64, 8, 64, 64): h = keras.layers.Dense(u, activation="relu")(h)
model = keras.Model(inp, keras.layers.Dense(320)(h))
for start in range(0, len(x) - 16000 + 1, 8000):
    mel = librosa.feature.melspectrogram(y=x[start:start + 16000], sr=16000, n_fft=1024,
                                         hop_length=512, n_mels=64)
    lm = 10 * np.log10(mel + 1e-12)
    v = np.concatenate([lm[:, t:t + lm.shape[1] - 4] for t in range(5)], axis=0).T
    model(v, training=False)  # predict() per window cost ~8 times more: Keras's own overhead
print(time.perf_counter() - t0)
"""


def speed(fluctuation: Path, autoencoder: Path, clips: list[Path], work: Path) -> dict:
    """Seconds to score SPEED_SECONDS of the clips (tiled) on each path, and the ratios."""
    print("speed", file=sys.stderr)
    long_wav = work / "speed.wav"
    clip = np.concatenate([read_audio(f, RATE) for f in clips])
    sf.write(
        long_wav,
        np.tile(clip, int(np.ceil(SPEED_SECONDS * RATE / len(clip))))[: SPEED_SECONDS * RATE],
        RATE,
        subtype="PCM_16",
    )
    e_fl, e_ae = edge_speed(fluctuation, long_wav), edge_speed(autoencoder, long_wav)
    b_s = baseline_speed(long_wav)
    return {
        "audio_s": SPEED_SECONDS,
        "edge_fluctuation_s": round(e_fl, 2),
        "edge_autoencoder_int8_s": round(e_ae, 2),
        "baseline_s": round(b_s, 2),
        "ratio_fluctuation": round(b_s / e_fl, 1),
        "ratio_autoencoder": round(b_s / e_ae, 1),
        "measured": time.strftime("%Y-%m-%d"),
    }


def speed_only(args: argparse.Namespace) -> None:
    """Re-measure the speed alone, with the shipped bundles, into the last full run's JSON."""
    res = json.loads(args.out.read_text())
    models = ROOT / "models"
    work = Path(tempfile.mkdtemp(prefix="ssbench-"))
    os.environ["SOUNDSENTRY_DATA_DIR"] = str(work / "state")
    clips = mimii(args.data, "normal", range(10))
    res["speed"] = speed(
        models / "fan-demo.bundle", models / "fan-autoencoder.bundle", clips, work
    ) | {"bundles": "models/fan-demo.bundle, models/fan-autoencoder.bundle (--speed-only)"}
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    table = markdown(res)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


def baseline_speed(wav: Path) -> float:
    out = subprocess.run(
        [sys.executable, "-c", BASELINE_SPEED, str(wav)], check=True, capture_output=True, text=True
    )
    return float(out.stdout.strip().splitlines()[-1])


# --- supervised ------------------------------------------------------------------------------


def supervised(
    work: Path,
    train_dirs: dict[str, list[Path]],
    test_dirs: dict[str, list[Path]],
    epochs: int,
    augment: tuple[str, ...] = (),
) -> dict:
    from train.augment import Augmenter
    from train.classifier import train_classifier
    from train.evaluate import classify_items

    def link(split: str, groups: dict[str, list[Path]]) -> Path:
        root = work / split
        for name, files in groups.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            for f in files:
                dst = root / name / f"{f.parent.name}-{f.name}"
                if not dst.exists():
                    os.symlink(f, dst)
        return root

    bundle = train_classifier(
        link("train", train_dirs),
        work / "classifier.bundle",
        epochs=epochs,
        augment=Augmenter(augment) if augment else None,
    )
    labels, rows, _ = classify_items(bundle, link("test", test_dirs), 1.0, "int8", 0)
    rep = classification_report(
        np.array([r[2] for r in rows]), np.array([r[3] for r in rows]), labels
    )
    return {
        k: rep[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "confusion", "labels", "n")
    }


# --- the run ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "benchmark.json")
    ap.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run)")
    ap.add_argument("--speed-only", action="store_true", help="re-measure the speed alone")
    args = ap.parse_args()
    if not (args.data / "mimii_fan_id00").is_dir():
        sys.exit(f"benchmark data not found at {args.data} (shared/data): nothing measured")
    if args.speed_only:
        speed_only(args)
        return
    from train.augment import Augmenter
    from train.fluctuation import train_fluctuation
    from train.trainer import train_bundle

    ae_epochs, base_epochs, cls_epochs = (5, 5, 5) if args.quick else (40, 100, 30)
    work = Path(tempfile.mkdtemp(prefix="ssbench-"))
    os.environ["SOUNDSENTRY_DATA_DIR"] = str(work / "state")
    d = args.data
    train_n, test_n, test_a = (
        mimii(d, "normal", range(10)),
        mimii(d, "normal", range(10, 20)),
        mimii(d, "anomalous", range(20)),
    )
    ch0 = {
        k: channel_copies(v, 0, work / "ch0")
        for k, v in (("train", train_n), ("normal", test_n), ("anomalous", test_a))
    }
    res: dict = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "rows": {},
    }
    rows = res["rows"]

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        return out, round(time.perf_counter() - t0, 1)

    print("MIMII fan protocol", file=sys.stderr)
    base, t = timed("DCASE baseline", lambda: dcase_baseline(ch0["train"], base_epochs))
    rows["DCASE 2020 baseline (re-implemented, float)"] = dcase_quality(
        base, ch0["normal"], ch0["anomalous"]
    ) | {"train_s": t}
    fl8, t = timed(
        "fluctuation 8 ch",
        lambda: train_fluctuation(train_n, work / "fl8.bundle", all_channels=True),
    )
    rows["fluctuation + Mahalanobis, 8 channels as views (`--all-channels`)"] = quality(
        fl8, ch0["normal"], ch0["anomalous"]
    ) | {"train_s": t}
    fl0, t = timed("fluctuation ch0", lambda: train_fluctuation(ch0["train"], work / "fl0.bundle"))
    rows["fluctuation + Mahalanobis, channel 0 (the default)"] = quality(
        fl0, ch0["normal"], ch0["anomalous"]
    ) | {"train_s": t}
    ae, t = timed(
        "autoencoder", lambda: train_bundle(ch0["train"], work / "ae.bundle", epochs=ae_epochs)
    )
    for variant in ("float", "int8"):
        rows[f"conv autoencoder ({variant})"] = quality(
            ae, ch0["normal"], ch0["anomalous"], variant
        ) | {"train_s": t}
    for option in ("shift", "stretch", "pitch", "mixup", "noise", "specaugment"):
        b, t = timed(
            f"autoencoder + {option}",
            lambda o=option: train_bundle(
                ch0["train"], work / f"ae-{o}.bundle", epochs=ae_epochs, augment=Augmenter((o,))
            ),
        )
        rows[f"conv autoencoder + {option} (int8)"] = quality(
            b, ch0["normal"], ch0["anomalous"]
        ) | {"train_s": t}

    print("channel shift", file=sys.stderr)
    ch4 = {
        k: channel_copies(v, 4, work / "ch4")
        for k, v in (
            ("normal", test_n),
            ("anomalous", test_a),
            ("cal", mimii(d, "normal", range(8, 10))),
        )
    }
    shift = res["channel_shift"] = {}
    for name, bundle in (("fluctuation", fl0), ("autoencoder int8", ae)):
        cal = calibrate_bundle(bundle, ch4["cal"], work / f"{name.split()[0]}-cal4.bundle")
        shift[name] = {
            "channel 0": quality(bundle, ch0["normal"], ch0["anomalous"]),
            "channel 4 before": quality(bundle, ch4["normal"], ch4["anomalous"]),
            "channel 4 after calibrate": quality(cal, ch4["normal"], ch4["anomalous"]),
        }

    print("supervised", file=sys.stderr)
    sup = res["supervised"] = {}
    fan_train = {
        "normal": ch0["train"],
        "anomalous": channel_copies(mimii(d, "anomalous", range(10)), 0, work / "ch0"),
    }
    fan_test = {
        "normal": ch0["normal"],
        "anomalous": channel_copies(mimii(d, "anomalous", range(10, 20)), 0, work / "ch0"),
    }
    sup["MIMII fan normal vs anomalous"] = supervised(
        work / "sup-fan", fan_train, fan_test, cls_epochs
    )
    sup["MIMII fan normal vs anomalous + shift, noise"] = supervised(
        work / "sup-fan-aug", fan_train, fan_test, cls_epochs, ("shift", "noise")
    )
    lite = d / "dcase2020_lite"
    if lite.is_dir():
        types = sorted(p.name for p in lite.iterdir() if p.is_dir())
        files = {t: sorted((lite / t).glob("*.wav")) for t in types}
        sup["dcase2020_lite machine type (6 classes)"] = supervised(
            work / "sup-types",
            {t: f[:4] for t, f in files.items()},
            {t: f[4:] for t, f in files.items()},
            cls_epochs,
        )

    res["speed"] = speed(fl8, ae, ch0["normal"], work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    table = markdown(res)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


BASELINE_PATH = {
    False: "librosa + Keras predict() per window",
    True: "librosa + the Keras model called on each window",
}
"""How the baseline path was timed: predict() per window, before 2026-12-03, spent most of its
time in Keras's own overhead (a review measured ~8 times the model's cost)."""


def markdown(res: dict) -> str:
    lines = [
        f"Measured {res['when']} on {res['machine']}.",
        "",
        "| MIMII fan id_00, test normal 10-19 vs anomalous 0-19 | clip AUC | clip pAUC "
        "| 1-s AUC | 1-s pAUC |",
        "|---|---|---|---|---|",
    ]
    for name, r in res["rows"].items():
        lines.append(
            f"| {name} | {r['auc']:.3f} | {r['pauc']:.3f} | {r['auc_1s']:.3f} "
            f"| {r['pauc_1s']:.3f} |"
        )
    lines += [
        "",
        "| channel shift (train ch 0) | test ch 0 clip AUC | ch 4 before | "
        "ch 4 after calibrate (2 clips) | 1-s AUC ch 4 before / after |",
        "|---|---|---|---|---|",
    ]
    for name, r in res["channel_shift"].items():
        lines.append(
            f"| {name} | {r['channel 0']['auc']:.3f} | {r['channel 4 before']['auc']:.3f}"
            f" | {r['channel 4 after calibrate']['auc']:.3f} | "
            f"{r['channel 4 before']['auc_1s']:.3f} / "
            f"{r['channel 4 after calibrate']['auc_1s']:.3f} |"
        )
    lines += [
        "",
        "| supervised (int8 CNN, unseen files, 1-s segments) | accuracy | balanced "
        "accuracy | macro F1 |",
        "|---|---|---|---|",
    ]
    for name, r in res["supervised"].items():
        lines.append(
            f"| {name} | {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | {r['macro_f1']:.3f} |"
        )
    s = res["speed"]
    lines += [
        "",
        f"Speed, {s['audio_s']} s of audio, start-up included: edge (fluctuation) "
        f"{s['edge_fluctuation_s']} s ({100 * s['edge_fluctuation_s'] / s['audio_s']:.2f} "
        f"% of real time), edge (int8 autoencoder) {s['edge_autoencoder_int8_s']} s, "
        f"baseline path ({BASELINE_PATH.get(s.get('measured') is not None)}) "
        f"{s['baseline_s']} s: {s['ratio_fluctuation']}x and {s['ratio_autoencoder']}x faster"
        + (f" (measured {s['measured']}; bundles {s['bundles']})." if "bundles" in s else "."),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
