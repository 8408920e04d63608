"""Decision thresholds from a false-alarm budget, in numpy only (it runs on the Pi for
on-site calibration).

A gamma distribution is fitted to held-out normal window scores (as the DCASE 2023 baseline
does). With the event logic "K of the last N windows above the threshold", a false event
starts at a window with probability ~ C(N-1, K-1) p^K, where p is the per-window exceedance
probability of the fitted distribution (windows treated as independent). The threshold is
the score whose p meets the budget of false alarms per hour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge.events import DEFAULT_K, DEFAULT_M, DEFAULT_N, EventDetector

RULE = "false-alarm-budget/gamma"
SECONDS_PER_HOUR = 3600.0
DEFAULT_FALSE_ALARMS_PER_DAY = 1.0
_MAX_ITER = 200
_EPS = 1e-12


def digamma(x: float) -> float:
    """psi(x) for x > 0 (recurrence + asymptotic series)."""
    r = 0.0
    while x < 6:
        r -= 1 / x
        x += 1
    f = 1 / (x * x)
    return r + math.log(x) - 0.5 / x - f * (1 / 12 - f * (1 / 120 - f * (1 / 252)))


def trigamma(x: float) -> float:
    """psi'(x) for x > 0."""
    r = 0.0
    while x < 6:
        r += 1 / (x * x)
        x += 1
    f = 1 / (x * x)
    return r + 1 / x + f / 2 + f / x * (1 / 6 - f * (1 / 30 - f / 42))


@dataclass(frozen=True)
class Gamma:
    """A gamma distribution with shape k and scale theta."""

    shape: float
    scale: float

    @classmethod
    def fit(cls, x: np.ndarray) -> Gamma:
        """Maximum-likelihood fit (location 0) to positive samples."""
        x = np.asarray(x, np.float64)
        x = x[x > 0]
        if len(x) < 2 or np.ptp(x) == 0:
            raise ValueError("need at least two distinct positive scores")
        s = math.log(x.mean()) - float(np.log(x).mean())
        k = (3 - s + math.sqrt((s - 3) ** 2 + 24 * s)) / (12 * s)
        for _ in range(50):  # Newton on log(k) - psi(k) = s
            step = (math.log(k) - digamma(k) - s) / (1 / k - trigamma(k))
            k = max(k - step, k / 10)
            if abs(step) < 1e-10 * k:
                break
        return cls(k, float(x.mean()) / k)

    def sf(self, value: float) -> float:
        """P(X > value)."""
        if value <= 0:
            return 1.0
        return _upper_regularized(self.shape, value / self.scale)

    def isf(self, p: float) -> float:
        """The value exceeded with probability p."""
        lo, hi = 0.0, self.scale * max(self.shape, 1.0)
        while self.sf(hi) > p:
            hi *= 2
        for _ in range(_MAX_ITER):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.sf(mid) > p else (lo, mid)
            if hi - lo < 1e-12 * hi:
                break
        return hi


def _upper_regularized(a: float, x: float) -> float:
    """Q(a, x) = Gamma(a, x) / Gamma(a) (series below a + 1, continued fraction above)."""
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1 / a
        n = a
        for _ in range(_MAX_ITER * 5):
            n += 1
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1 - total * math.exp(log_front))
    b = x + 1 - a
    c, d = 1 / 1e-300, 1 / b
    h = d
    for i in range(1, _MAX_ITER * 5):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1 / (d if abs(d) > 1e-300 else 1e-300)
        c = b + an / c
        c = c if abs(c) > 1e-300 else 1e-300
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(log_front) * h


def window_rate_for_budget(false_alarms_per_hour: float, k: int, n: int, hop_s: float) -> float:
    """Per-window exceedance probability p giving the budget under K-of-N (independent windows)."""
    windows_per_hour = SECONDS_PER_HOUR / hop_s
    combos = math.comb(n - 1, k - 1)
    return min(1.0, (false_alarms_per_hour / (windows_per_hour * combos)) ** (1 / k))


def false_alarms_per_hour(
    scores: np.ndarray, threshold: float, k: int, n: int, m: int, hop_s: float
) -> float:
    """Starts per hour when the real event logic runs over a sequence of normal scores."""
    detector = EventDetector(threshold, k, n, m, update_s=float("inf"))
    starts = 0
    for i, score in enumerate(np.asarray(scores, np.float64)):
        t = detector.feed(float(score), i * hop_s, i * hop_s + hop_s)
        starts += t is not None and t.kind == "start"
    hours = len(scores) * hop_s / SECONDS_PER_HOUR
    return starts / hours if hours > 0 else 0.0


def threshold_for_budget(
    scores: np.ndarray,
    false_alarms_per_day: float = DEFAULT_FALSE_ALARMS_PER_DAY,
    k: int = DEFAULT_K,
    n: int = DEFAULT_N,
    m: int = DEFAULT_M,
    hop_s: float = 0.5,
) -> tuple[float, dict]:
    """Threshold meeting the budget on these normal scores, and the parameters of the rule."""
    budget_h = false_alarms_per_day / 24
    p = window_rate_for_budget(budget_h, k, n, hop_s)
    scores = np.asarray(scores, np.float64)
    try:
        dist = Gamma.fit(scores)
        value = dist.isf(max(p, _EPS))
        fit = {"gamma_shape": dist.shape, "gamma_scale": dist.scale}
    except ValueError:
        value = float(scores.max() * 1.5) if len(scores) else 1.0
        fit = {"fallback": "too few distinct scores: 1.5 x max"}
    return value, {
        "false_alarms_per_day": false_alarms_per_day,
        "k": k,
        "n": n,
        "m": m,
        "hop_s": hop_s,
        "window_exceedance": p,
        **fit,
        "n_windows": len(scores),
        "holdout_hours": round(len(scores) * hop_s / SECONDS_PER_HOUR, 4),
        "holdout_window_rate": float(np.mean(scores > value)) if len(scores) else 0.0,
        "holdout_false_alarms_per_hour": false_alarms_per_hour(scores, value, k, n, m, hop_s),
    }


def score_stats(scores: np.ndarray, source: str) -> dict:
    """Summary of a score distribution for the manifest."""
    s = np.asarray(scores, dtype=np.float64)
    return {
        "source": source,
        "n_windows": len(s),
        "mean": float(s.mean()),
        "std": float(s.std()),
        "p50": float(np.percentile(s, 50)),
        "p90": float(np.percentile(s, 90)),
        "p99": float(np.percentile(s, 99)),
        "max": float(s.max()),
    }
