"""Training augmentation on log-mel windows (cheap, and the same front end as the edge).

Each option makes extra copies of the training windows:
- shift: circular time shift of the frames;
- stretch: time stretch by resampling the frame axis (x0.9 .. x1.1);
- pitch: shift along the mel axis by up to two bands (a pitch/speed change of the machine);
- mixup: power-domain mix of two windows (labels: the dominant window's);
- noise: background noise mixed in the power domain at 10 .. 30 dB SNR (white, pink, brown);
- specaugment: one time mask and one frequency mask (input only: a denoising target).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OPTIONS = ("shift", "stretch", "pitch", "mixup", "noise", "specaugment")
STRETCH = (0.9, 1.1)
PITCH_BANDS = 2
SNR_DB = (10.0, 30.0)
MASK_FRAMES = 6
MASK_BANDS = 8
MIX_WEIGHT = (0.6, 0.9)
Pair = tuple[np.ndarray, np.ndarray | None]


def _db_to_power(x: np.ndarray) -> np.ndarray:
    return np.power(10.0, x / 10.0)


def _power_to_db(p: np.ndarray) -> np.ndarray:
    return 10.0 * np.log10(np.maximum(p, 1e-10))


@dataclass(frozen=True)
class Augmenter:
    """Makes `factor` augmented copies of every window with the chosen options."""

    options: tuple[str, ...]
    factor: int = 1

    def __post_init__(self) -> None:
        unknown = set(self.options) - set(OPTIONS)
        if unknown:
            raise ValueError(f"unknown augmentation {sorted(unknown)}; choose from {OPTIONS}")

    def record(self) -> dict:
        """What the manifest's `training` records of it."""
        return {"augment": list(self.options), "augment_factor": self.factor}

    def expand(
        self, x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Originals followed by augmented copies (and their labels)."""
        xs, ys = [x], [y]
        for _ in range(self.factor):
            xa, ya = x.copy(), None if y is None else y.copy()
            for option in self.options:
                if option != "specaugment":
                    xa, ya = getattr(self, f"_{option}")(xa, ya, rng)
            xs.append(xa)
            ys.append(ya)
        return np.concatenate(xs).astype(np.float32), None if y is None else np.concatenate(ys)

    def labelled_copies(
        self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """For a classifier: the originals followed by augmented copies with their labels, the
        copies (not the originals) masked by SpecAugment when it is asked for."""
        xs, ys = self.expand(x, y, rng)
        xs[len(x) :] = self.mask(xs[len(x) :], rng)
        return xs, ys  # type: ignore[return-value]

    def mask(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """SpecAugment masks (applied to the input only), set to each window's mean level."""
        if "specaugment" not in self.options:
            return x
        out = x.copy()
        n, frames, bands = x.shape
        for i in range(n):
            t0 = rng.integers(0, max(1, frames - MASK_FRAMES))
            f0 = rng.integers(0, max(1, bands - MASK_BANDS))
            fill = out[i].mean()
            out[i, t0 : t0 + rng.integers(1, MASK_FRAMES + 1)] = fill
            out[i, :, f0 : f0 + rng.integers(1, MASK_BANDS + 1)] = fill
        return out

    @staticmethod
    def _shift(x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator) -> Pair:
        shifts = rng.integers(0, x.shape[1], len(x))
        return np.stack([np.roll(w, s, axis=0) for w, s in zip(x, shifts, strict=True)]), y

    @staticmethod
    def _stretch(x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator) -> Pair:
        frames = x.shape[1]
        out = np.empty_like(x)
        for i, rate in enumerate(rng.uniform(*STRETCH, len(x))):
            src = np.clip(np.arange(frames) * rate, 0, frames - 1)
            lo = np.floor(src).astype(int)
            hi = np.minimum(lo + 1, frames - 1)
            frac = (src - lo)[:, None]
            out[i] = x[i, lo] * (1 - frac) + x[i, hi] * frac
        return out, y

    @staticmethod
    def _pitch(x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator) -> Pair:
        out = np.empty_like(x)
        for i, s in enumerate(rng.integers(-PITCH_BANDS, PITCH_BANDS + 1, len(x))):
            out[i] = np.roll(x[i], s, axis=1)
            if s > 0:
                out[i, :, :s] = x[i, :, :1]
            elif s < 0:
                out[i, :, s:] = x[i, :, -1:]
        return out, y

    @staticmethod
    def _mixup(x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator) -> Pair:
        partner = rng.permutation(len(x))
        lam = rng.uniform(*MIX_WEIGHT, len(x))[:, None, None]
        mixed = _power_to_db(lam * _db_to_power(x) + (1 - lam) * _db_to_power(x[partner]))
        return mixed.astype(np.float32), y

    @staticmethod
    def _noise(x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator) -> Pair:
        bands = x.shape[2]
        tilt = {0: 0.0, 1: -3.0, 2: -6.0}  # white, pink, brown: dB per octave-ish across bands
        out = np.empty_like(x)
        for i in range(len(x)):
            slope = tilt[int(rng.integers(0, 3))] * np.log2(1 + np.arange(bands))
            level = _db_to_power(x[i]).mean()
            snr = rng.uniform(*SNR_DB)
            shape = _db_to_power(slope)
            noise = shape / shape.mean() * level / _db_to_power(snr)
            noise = noise * rng.chisquare(2, x[i].shape) / 2
            out[i] = _power_to_db(_db_to_power(x[i]) + noise)
        return out, y
