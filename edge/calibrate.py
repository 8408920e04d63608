"""`soundsentry calibrate`: adapt a trained bundle to where it is installed, from a few minutes
(or less) of normal audio recorded there, without retraining the network and with numpy only.

It refits what the score depends on besides the network: the per-band normalisation of the
features (a microphone moved, another gain, another room), the held-out score statistics,
the per-band error reference, and the threshold from the false-alarm budget.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from edge.audio_io import find_audio, read_audio
from edge.bundle import (
    MODEL_FLOAT,
    MODEL_INT8,
    Bundle,
    load_bundle,
    sha256_bytes,
    write_bundle,
)
from edge.errors import AudioError, BundleError
from edge.features import windows_of
from edge.scoring import FluctuationScorer, Scorer, fluctuation_features
from edge.threshold import RULE, score_stats, threshold_for_budget

log = logging.getLogger(__name__)

STD_FLOOR_DB = 0.1
MIN_WINDOWS = 10


def calibrate_bundle(
    model: str | Path,
    normal: list[str | Path],
    out: str | Path,
    false_alarms_per_day: float | None = None,
    channel: int = 0,
) -> Path:
    """Write a calibrated copy of `model` to `out`; return its path."""
    bundle = load_bundle(model)
    m = bundle.manifest
    p = bundle.features
    files = find_audio(normal)
    if not files:
        raise AudioError("no audio files found in " + " ".join(str(x) for x in normal))
    audio = [read_audio(f, p.samplerate, channel) for f in files]
    per_file = [windows_of(a, p) for a in audio]
    windows = np.concatenate(per_file)
    if len(windows) < MIN_WINDOWS:
        raise AudioError(
            f"calibration needs at least {MIN_WINDOWS} windows "
            f"({(MIN_WINDOWS - 1) * p.hop_seconds + p.window_seconds:g} s) of normal audio"
        )
    seconds = sum(len(a) for a in audio) / p.samplerate
    if m.kind == "fluctuation":
        manifest = _calibrate_fluctuation(bundle, per_file, false_alarms_per_day)
        return _write(bundle, manifest, files, seconds, out, b"")
    if m.kind != "autoencoder":
        raise BundleError(f"calibrate works on anomaly detectors, not on a {m.kind}")
    mean = windows.mean(axis=(0, 1))
    std = np.maximum(windows.std(axis=(0, 1)), STD_FLOOR_DB)
    scorer = Scorer(bundle.model, mean, std)
    scored = [scorer.score(w) for w in windows]
    scores = np.array([s.score for s in scored])
    band_error = np.stack([s.band_error for s in scored])
    value, params = _threshold(bundle, scores, false_alarms_per_day)
    manifest = m.model_dump(exclude={"files", "checksum"})
    manifest |= {
        "normalization": {"mean": mean.tolist(), "std": std.tolist()},
        "threshold": {"value": value, "rule": RULE, "params": params},
        "normal_scores": score_stats(scores, "on-site calibration audio"),
        "normal_band_error": {
            "mean": band_error.mean(axis=0).tolist(),
            "std": band_error.std(axis=0).tolist(),
        },
    }
    return _write(
        bundle,
        manifest,
        files,
        seconds,
        out,
        mean.tobytes() + std.tobytes() + np.float64(value).tobytes(),
    )


def _calibrate_fluctuation(
    bundle: Bundle, per_file: list[np.ndarray], false_alarms_per_day: float | None
) -> dict:
    """Refit the centre of the normal statistics (the precision stays); the threshold comes
    from scores of each calibration file against a centre fitted without it."""
    m = bundle.manifest
    scorer = FluctuationScorer.from_bundle(bundle)
    z = [scorer.standardize(fluctuation_features(w)) for w in per_file if len(w)]
    center = np.concatenate(z).mean(axis=0)
    if len(z) >= 2:
        held = [
            _maha(scorer.precision, zi - np.concatenate(z[:i] + z[i + 1 :]).mean(axis=0))
            for i, zi in enumerate(z)
        ]
    else:  # one file: its first half centres, its second half scores
        half = len(z[0]) // 2
        held = [_maha(scorer.precision, z[0][half:] - z[0][:half].mean(axis=0))]
    scores = np.concatenate(held)
    full = np.concatenate(z) - center
    shares = full * (full @ scorer.precision.T) / scorer.dim
    value, params = _threshold(bundle, scores, false_alarms_per_day)
    manifest = m.model_dump(exclude={"files", "checksum"})
    manifest["statistics"]["center"] = center.tolist()
    manifest |= {
        "threshold": {"value": value, "rule": RULE, "params": params},
        "normal_scores": score_stats(scores, "on-site calibration audio (leave one file out)"),
        "normal_band_error": {
            "mean": shares.mean(axis=0).tolist(),
            "std": shares.std(axis=0).tolist(),
        },
    }
    return manifest


def _threshold(
    bundle: Bundle, scores: np.ndarray, false_alarms_per_day: float | None
) -> tuple[float, dict]:
    """The budget rule with the bundle's event logic (and budget, unless one is given)."""
    old = bundle.manifest.threshold.params
    budget = false_alarms_per_day or float(old.get("false_alarms_per_day", 1.0))
    return threshold_for_budget(
        scores,
        budget,
        int(old.get("k", 2)),
        int(old.get("n", 3)),
        int(old.get("m", 4)),
        bundle.features.hop_seconds,
    )


def _maha(precision: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.einsum("ij,jk,ik->i", d, precision, d) / len(precision)


def _write(
    bundle: Bundle, manifest: dict, files: list[Path], seconds: float, out: str | Path, salt: bytes
) -> Path:
    """Write the calibrated bundle with provenance and a new model id."""
    m = bundle.manifest
    manifest |= {
        "calibration": {
            "from_model": m.model_id,
            "files": [str(f) for f in files],
            "seconds": round(seconds, 3),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        },
    }
    contents = {
        n: (bundle.path / n).read_bytes() for n in (MODEL_INT8, MODEL_FLOAT) if n in m.files
    }
    base = m.model_id.split("-cal-")[0]
    salt += json.dumps(manifest, sort_keys=True, default=str).encode()
    manifest["model_id"] = f"{base}-cal-{sha256_bytes(salt)[:8]}"
    out = Path(out)
    if out.resolve() == bundle.path.resolve():
        raise BundleError("--out must differ from the model being calibrated")
    write_bundle(out, manifest, contents)
    log.info(
        "calibrated %s on %.0f s of audio: threshold %.4g -> %.4g",
        m.model_id,
        seconds,
        m.threshold.value,
        manifest["threshold"]["value"],
    )
    return out
