"""Decision thresholds from a false-alarm budget, in numpy only (it runs on the Pi for
on-site calibration).

The budget (false alarms per day) is shared by the two paths of the event logic
(edge.events.EventDetector): CUSUM_SHARE of it for the CUSUM that integrates evidence over time,
the rest for K-of-N on single windows (all of it when integration is off, or with fewer than
MIN_CUSUM_WINDOWS held-out windows).

Window threshold (K-of-N path). A gamma distribution is fitted to held-out normal window scores
(as the DCASE 2023 baseline does), by maximum likelihood with the windows above the held-out
K-of-N peak censored there: no K of any N consecutive held-out windows lie above it, so those
windows (an isolated transient: a click, a door) cannot start the path, and all they say about
the sustained scores its rate depends on is that they lie above the peak. Fitted as they came,
one loud click dragged the gamma's tail up and set the threshold far above its budget. Under "K
of the last N windows above", a false event starts where the condition starts to hold. Windows
that overlap by half are not independent (with independent windows that would happen with
probability ~ C(N-1, K-1) p^K, ten times too seldom at a lag-1 correlation of 0.25): the rate is
computed for a Gaussian copula, a stationary AR(1) sequence whose lag-1 correlation r is the one
measured on the held-out log scores (as for the CUSUM, below), exactly on a grid
(k_of_n_start_rate). The gamma quantile g exceeded with the per-window p whose start rate meets
the path's budget is the candidate. The held-out scores bound it:

- cap = x_max + s ln(1 / ((n + 1) p)), or x_max once (n + 1) p >= 1. The highest of n held-out
  windows, x_max, sits near exceedance 1 / (n + 1); reaching p takes a further factor
  1 / ((n + 1) p), which an exponential tail of scale s covers in s ln(1 / ((n + 1) p)). s is
  the spread of the held-out scores (1.4826 MAD), wider than a gamma's tail scale (theta, against
  theta sqrt(shape) for the spread), so the cap only removes extrapolation that the held-out
  audio cannot back, and it shrinks towards x_max as more audio is held out.
- floor = the lowest threshold at which the real event logic, run over the held-out sequence,
  raises no more events than a Poisson count with the budget's mean reaches at 97.5 % (none
  for held-out audio shorter than a few hours at 1 per day): the threshold never contradicts the
  held-out normal audio. Isolated held-out spikes may lie above it; K of N ignores them (K = 3 on
  windows overlapping by half: one instantaneous sound touches two).
- threshold = max(floor, min(g, cap)).

Integrated evidence (CUSUM path). z = (ln score - center) / scale with the median and the
1.4826 MAD of the held-out log scores; scale is widened by sqrt((1 + r) / (1 - r)) with r the
lag-1 autocorrelation of held-out z (at least 0, at most 0.8), so overlapping windows do not
count as independent evidence. Windows overlapping by half always correlate (about 0.2 to 0.3
on a fan's normal audio): the widening is not gated on r being significant (r > 2 / sqrt(n)),
which on half a minute of held-out audio skipped it below 0.26 and let the CUSUM raise many
times its share. drift and cap are the defaults of edge.events. h is the
value whose average run length on normal audio (z ~ N(0, 1): the log of a chi-square-like
score is close to normal) equals the windows per day over the path's budget, computed on a
Markov chain (Brook & Evans 1972) rather than by simulating days of windows (the same number,
exact for that model, in milliseconds on the Pi); like the threshold it is floored so that the
CUSUM raises no more alarms on the held-out sequence than the Poisson bound.

The parameters report the held-out seconds, how far the threshold sits above the highest
held-out score, the predicted false alarms per day of both paths (gamma tail under K-of-N plus
the CUSUM's run length) with a 95 % interval from a seeded bootstrap of the held-out windows
(each resample refitted and evaluated at the chosen threshold and h; it reflects how little the
held-out audio pins down, not errors of the models' shape), and the events the real event logic
raises on the held-out sequence itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.errors import AudioError
from edge.events import (
    DEFAULT_CAP,
    DEFAULT_DRIFT,
    DEFAULT_K,
    DEFAULT_M,
    DEFAULT_N,
    Cusum,
    EventDetector,
)

RULE = "false-alarm-budget/gamma"
SECONDS_PER_HOUR = 3600.0
SECONDS_PER_DAY = 86400.0
DEFAULT_FALSE_ALARMS_PER_DAY = 1.0
MAX_FALSE_ALARMS_PER_DAY = 10000.0
"""The largest budget taken (one every 8.6 s): beyond it a threshold means nothing, and a typo
such as 1e9 would set one below every normal window."""
CUSUM_SHARE = 0.5
"""Share of the false-alarm budget given to the CUSUM path; the rest goes to K-of-N."""
MIN_CUSUM_WINDOWS = 10
"""Fewer held-out windows than this: no CUSUM (a median and spread of fewer mean little)."""
MAD_TO_SD = 1.4826
"""Median absolute deviation -> standard deviation of a normal distribution."""
POISSON_QUANTILE = 0.975
"""The floors allow as many held-out events as a Poisson count with the budget's mean reaches
with this probability."""
MAX_AUTOCORRELATION = 0.8
"""Largest lag-1 autocorrelation the CUSUM's scale is widened for."""
INTERVAL = 0.95
"""Coverage of the reported false-alarm interval."""
BOOTSTRAP_RESAMPLES = 200
"""Resamples of the forecast's interval. Its upper end, the 97.5th percentile of them, moves by
a factor of two or so with the seed (40 to 165 a day in a field review; the seed is fixed, so a
bundle's figure does not): within an interval that spans four orders of magnitude where little
held-out audio backs it, which is its message. 1000 resamples narrow that to a fifth, and
tripled the time of the tests that set thresholds on simulated sites."""
CENSORED_FIT_STEPS = 500
"""EM steps of the censored gamma fit at most (a few dozen suffice when few are censored)."""
BOOTSTRAP_SEED = 0
COPULA_STEP = 0.1
"""Cell width (in standard deviations) of the grid k_of_n_start_rate carries the AR(1) density
on: within 2 % of a grid twice as fine at the rates of a daily budget, about a millisecond."""
COPULA_REACH = 8.0
"""The grid spans +-this many standard deviations (further when the threshold lies beyond)."""
ARL_STATES = 80
"""Levels of the Markov chain that gives the CUSUM's average run length: within 1 % of 800
levels at the run lengths of a daily budget, and a matrix small enough to solve in a
millisecond on one core."""
_H_MAX = 40.0
"""Upper end of the search for h: at drift 0.5 the run length grows about as e^h."""
_Z_975 = 1.959964
_MAX_ITER = 200
_EPS = 1e-12
_erfc = np.vectorize(math.erfc, otypes=[float])


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
    def fit(cls, x: np.ndarray, censor_at: float | None = None) -> Gamma:
        """Maximum-likelihood fit (location 0) to positive samples; with `censor_at`, the
        samples above it count as known only to lie above it (censored), by EM."""
        x = np.asarray(x, np.float64)
        x = x[x > 0]
        if len(x) < 2 or np.ptp(x) == 0:
            raise ValueError("need at least two distinct positive scores")
        plain = cls._from_moments(float(x.mean()), float(np.log(x).mean()))
        if censor_at is None or not math.isfinite(censor_at) or censor_at <= 0:
            return plain
        seen = x[x <= censor_at]
        above = len(x) - len(seen)
        if above == 0 or len(seen) < 2 or np.ptp(seen) == 0:
            return plain
        dist, total, logs = plain, float(seen.sum()), float(np.log(seen).sum())
        for _ in range(CENSORED_FIT_STEPS):
            mean, log_mean = dist._above(censor_at)
            new = cls._from_moments(
                (total + above * mean) / len(x), (logs + above * log_mean) / len(x)
            )
            if abs(new.shape - dist.shape) < 1e-9 * dist.shape:
                return new
            dist = new
        return dist

    @classmethod
    def _from_moments(cls, mean: float, log_mean: float) -> Gamma:
        """The gamma whose maximum-likelihood equations these sufficient statistics solve."""
        s = max(math.log(mean) - log_mean, 1e-12)
        k = (3 - s + math.sqrt((s - 3) ** 2 + 24 * s)) / (12 * s)
        for _ in range(50):  # Newton on log(k) - psi(k) = s
            step = (math.log(k) - digamma(k) - s) / (1 / k - trigamma(k))
            k = max(k - step, k / 10)
            if abs(step) < 1e-10 * k:
                break
        return cls(k, mean / k)

    def _above(self, c: float) -> tuple[float, float]:
        """E[X | X > c] and E[ln X | X > c], on a grid of the density beyond c (the E step of
        the censored fit)."""
        k, t = self.shape, c / self.scale
        end = max(t, k) + 40.0 * math.sqrt(k) + 40.0
        y = np.linspace(t, end, 4001)
        logs = np.log(y)
        w = np.exp((k - 1) * (logs - math.log(max(t, 1e-300))) - (y - t))  # density / f(t)
        w[0] *= 0.5
        w[-1] *= 0.5
        mass = float(w.sum())
        mean = self.scale * float((w * y).sum()) / mass
        return mean, math.log(self.scale) + float((w * logs).sum()) / mass

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


def k_of_n_start_rate(p: float, r: float, k: int, n: int) -> float:
    """Probability that "K of the last N windows above" holds at a window and did not at the one
    before, for windows each above with probability p whose normal scores form a stationary
    AR(1) sequence with lag-1 correlation r (a Gaussian copula; r = 0: independent windows).
    Exact up to the grid: the N + 1 windows involved are walked forward through every pattern
    of above and below, the density carried on cells of COPULA_STEP with the threshold on a
    cell boundary."""
    if p <= 0:
        return 0.0
    if p >= 1:
        return 0.0  # always holding, it never starts
    z = normal_isf(p)
    reach = max(COPULA_REACH, abs(z) + 5.0)
    below, above = math.ceil((z + reach) / COPULA_STEP), math.ceil((reach - z) / COPULA_STEP)
    mid = z + COPULA_STEP * (np.arange(-below, above) + 0.5)
    high = mid > z
    sd = math.sqrt(1 - r * r)
    kernel = np.exp(-0.5 * ((mid[None, :] - r * mid[:, None]) / sd) ** 2)
    kernel *= COPULA_STEP / (sd * math.sqrt(2 * math.pi))
    first = np.exp(-0.5 * mid**2) * COPULA_STEP / math.sqrt(2 * math.pi)
    total = 0.0
    stack: list[tuple[np.ndarray, tuple[int, ...]]] = [(first, ())]
    while stack:
        density, bits = stack.pop()
        if len(bits) == n + 1:
            if sum(bits[1:]) >= k and sum(bits[:-1]) < k:
                total += float(density.sum())
            continue
        ahead = density @ kernel if bits else density
        for bit in (0, 1):
            stack.append((np.where(high == bool(bit), ahead, 0.0), (*bits, bit)))
    return total


def window_rate_for_budget(
    false_alarms_per_hour: float, k: int, n: int, hop_s: float, r: float = 0.0
) -> float:
    """Per-window exceedance probability p at which K-of-N starts as many events as the budget,
    windows correlated at lag 1 by r (k_of_n_start_rate). The start rate rises with p up to
    about the median and falls beyond (a condition that always holds never starts): a budget
    beyond what p = 0.5 starts gets 0.5."""
    target = false_alarms_per_hour * hop_s / SECONDS_PER_HOUR
    lo, hi = 1e-15, 0.5
    if k_of_n_start_rate(hi, r, k, n) <= target:
        return hi
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if k_of_n_start_rate(mid, r, k, n) < target else (lo, mid)
        if hi / lo < 1 + 1e-6:
            break
    return hi


Pieces = Sequence[int] | None
"""How many of the held-out windows, in order, each recording (or channel view) gave: each is a
stream of its own, as the device hears it; None, one stream. The pieces of separate recordings
were joined into one sequence: K-of-N runs and lag-1 pairs spanned two recordings, which the
device never hears, and the same files named in another order gave another threshold (13 % on
four valve recordings, in a review)."""


def streams(scores: np.ndarray, pieces: Pieces = None) -> list[np.ndarray]:
    """The scores as the streams they came from (`pieces`), empty ones left out."""
    scores = np.asarray(scores, np.float64)
    if pieces is None:
        return [scores]
    if sum(pieces) != len(scores) or any(size < 0 for size in pieces):
        raise ValueError(f"pieces of {sum(pieces)} windows for {len(scores)} scores")
    return [part for part in np.split(scores, np.cumsum(pieces)[:-1]) if len(part)]


def count_events(
    scores: np.ndarray,
    threshold: float,
    k: int,
    n: int,
    m: int,
    hop_s: float,
    cusum: Cusum | None = None,
    pieces: Pieces = None,
) -> int:
    """Starts the real event logic raises over a sequence of normal scores (over each of its
    `pieces` as a stream of its own)."""
    starts = 0
    for part in streams(scores, pieces):
        detector = EventDetector(threshold, k, n, m, update_s=float("inf"), cusum=cusum)
        for i, score in enumerate(part):
            t = detector.feed(float(score), i * hop_s, i * hop_s + hop_s)
            starts += t is not None and t.kind == "start"
    return starts


def false_alarms_per_hour(
    scores: np.ndarray,
    threshold: float,
    k: int,
    n: int,
    m: int,
    hop_s: float,
    cusum: Cusum | None = None,
) -> float:
    """Starts per hour when the real event logic runs over a sequence of normal scores."""
    hours = len(scores) * hop_s / SECONDS_PER_HOUR
    starts = count_events(scores, threshold, k, n, m, hop_s, cusum)
    return starts / hours if hours > 0 else 0.0


def poisson_allowance(mean: float, q: float = POISSON_QUANTILE) -> int:
    """Smallest count a with P(X <= a) >= q for X ~ Poisson(mean)."""
    if mean > 50:  # normal approximation; the sum below would underflow
        return math.ceil(mean + _Z_975 * math.sqrt(mean))
    term = total = math.exp(-mean)
    count = 0
    while total < q:
        count += 1
        term *= mean / count
        total += term
    return count


def robust_spread(x: np.ndarray) -> float:
    """1.4826 MAD (the standard deviation for normal data), or the std when the MAD is 0."""
    spread = MAD_TO_SD * float(np.median(np.abs(x - np.median(x))))
    return spread if spread > 0 else float(np.std(x))


def tail_cap(scores: np.ndarray, p: float) -> float:
    """Highest held-out score plus what an exponential tail of the scores' spread needs to
    reach exceedance p from there (module docstring)."""
    gap = math.log(1 / ((len(scores) + 1) * p)) if (len(scores) + 1) * p < 1 else 0.0
    return float(scores.max()) + robust_spread(scores) * gap


def k_of_n_peak(scores: np.ndarray, k: int, n: int, pieces: Pieces = None) -> float:
    """The highest K-th highest score over every N consecutive windows of a stream (over all of
    one shorter than N), over each of `pieces`: the K-of-N path starts an event on `scores`
    exactly when the threshold is below it. -inf where no stream has K windows."""
    peak = -math.inf
    for part in streams(scores, pieces):
        if len(part) >= k:
            runs = np.lib.stride_tricks.sliding_window_view(part, min(n, len(part)))
            peak = max(peak, float(np.sort(runs, axis=1)[:, -k].max()))
    return peak


def window_floor(
    scores: np.ndarray, allowed: int, k: int, n: int, m: int, hop_s: float, pieces: Pieces = None
) -> float:
    """Lowest held-out score that, as the threshold, lets the event logic raise at most
    `allowed` events on the held-out sequence (bisection; more events at lower thresholds).
    With none allowed it is the K-of-N peak itself, without replaying the sequence."""
    peak = k_of_n_peak(scores, k, n, pieces)
    if allowed == 0 and math.isfinite(peak):
        return peak
    candidates = np.unique(scores)
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if count_events(scores, float(candidates[mid]), k, n, m, hop_s, None, pieces) <= allowed:
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[hi])


def bounded_threshold(
    scores: np.ndarray,
    gamma_value: float,
    p: float,
    per_day: float,
    k: int,
    n: int,
    m: int,
    hop_s: float,
    seconds: float | None = None,
    pieces: Pieces = None,
) -> tuple[float, dict[str, Any]]:
    """max(floor, min(gamma quantile, cap)) and what decided it; `seconds` of audio behind the
    scores (several channels of one recording: fewer than the windows say)."""
    cap = tail_cap(scores, p)
    seconds = len(scores) * hop_s if seconds is None else seconds
    allowed = poisson_allowance(per_day * seconds / SECONDS_PER_DAY)
    floor = window_floor(scores, allowed, k, n, m, hop_s, pieces)
    value = max(floor, min(gamma_value, cap))
    decided = (
        "floor"
        if value == floor and floor > min(gamma_value, cap)
        else ("cap" if cap < gamma_value else "gamma")
    )
    top, peak = float(scores.max()), k_of_n_peak(scores, k, n, pieces)
    return value, {
        "gamma_threshold": gamma_value,
        "cap": cap,
        "floor": floor,
        "decided_by": decided,
        "holdout_max": top,
        "above_holdout_max": value / top - 1 if top > 0 else None,
        "holdout_k_of_n_peak": peak if math.isfinite(peak) else None,
        "above_holdout_k_of_n_peak": value / peak - 1 if math.isfinite(peak) and peak > 0 else None,
    }


def normal_cdf(x: np.ndarray) -> np.ndarray:
    """Phi(x), elementwise."""
    return 0.5 * _erfc(-np.asarray(x, np.float64) / math.sqrt(2))


def normal_isf(p: float) -> float:
    """The z with 1 - Phi(z) = p (bisection on erfc: scalar, and exact far into the tail)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if 0.5 * math.erfc(mid / math.sqrt(2)) > p else (lo, mid)
        if hi - lo < 1e-10:
            break
    return 0.5 * (lo + hi)


def cusum_arl(
    h: float,
    drift: float = DEFAULT_DRIFT,
    cap: float = DEFAULT_CAP,
    mean: float = 0.0,
    sd: float = 1.0,
    states: int = ARL_STATES,
) -> float:
    """Average run length (windows) of S = max(0, S + min(z, cap) - drift) to S > h from 0,
    for independent z ~ N(mean, sd^2): the Markov chain of Brook & Evans (1972), S rounded to
    `states` levels on [0, h]."""
    width = 2 * h / (2 * states - 1)
    offsets = np.arange(1 - states, states) * width  # level j - level i, as an index j - i

    def cdf(x: np.ndarray) -> np.ndarray:  # of one increment min(z, cap) - drift
        return np.where(x >= cap - drift, 1.0, normal_cdf((x + drift - mean) / sd))

    upper = cdf(offsets + width / 2)
    index = np.arange(states)[None, :] - np.arange(states)[:, None] + states - 1
    moves = (upper - cdf(offsets - width / 2))[index]
    moves[:, 0] = upper[index[:, 0]]  # everything at or below zero restarts from zero
    try:
        runs = np.linalg.solve(np.eye(states) - moves, np.ones(states))
    except np.linalg.LinAlgError:
        return math.inf
    arl = float(runs[0])
    return arl if math.isfinite(arl) and arl > 0 else math.inf


def cusum_h(run_length: float, drift: float = DEFAULT_DRIFT, cap: float = DEFAULT_CAP) -> float:
    """The h whose average run length on N(0, 1) scores is `run_length` windows."""
    lo, hi = 0.0, _H_MAX
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cusum_arl(mid, drift, cap) < run_length else (lo, mid)
    return hi


def cusum_path(
    z: np.ndarray, drift: float, cap: float, h: float = math.inf
) -> tuple[np.ndarray, int]:
    """The CUSUM over z (restarted at 0 after each alarm, S > h) and how many alarms it raised."""
    path = np.empty(len(z))
    total, alarms = 0.0, 0
    for i, step in enumerate(np.minimum(z, cap) - drift):
        total = max(0.0, total + float(step))
        path[i] = total
        if total > h:
            alarms, total = alarms + 1, 0.0
    return path, alarms


def cusum_floor(
    z: np.ndarray, allowed: int, drift: float, cap: float, pieces: Pieces = None
) -> float:
    """Lowest h at which the CUSUM raises at most `allowed` alarms over the held-out z (over
    each of its `pieces` from zero)."""
    parts = streams(z, pieces)
    tops = (float(cusum_path(part, drift, cap)[0].max(initial=0.0)) for part in parts)
    top = max(tops, default=0.0)
    if allowed == 0:
        return top

    def alarms(h: float) -> int:
        return sum(cusum_path(part, drift, cap, h)[1] for part in parts)

    lo, hi = 0.0, top
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if alarms(mid) > allowed else (lo, mid)
    return hi


def lag1_autocorrelation(x: np.ndarray, pieces: Pieces = None) -> float:
    """Lag-1 autocorrelation of a sequence, its pairs taken within each of `pieces` (0 for
    fewer than 3 values, no pair or no variation)."""
    if len(x) < 3 or np.std(x) == 0:
        return 0.0
    d = x - x.mean()
    parts = streams(d, pieces)
    pairs = sum(float(np.dot(part[:-1], part[1:])) for part in parts)
    count = sum(max(len(part) - 1, 0) for part in parts)
    if count == 0:
        return 0.0
    # as for one stream (its n - 1 pairs over the whole sum of squares), for the pairs there are
    return pairs / float(np.dot(d, d)) * (len(d) - 1) / count


def score_autocorrelation(scores: np.ndarray, pieces: Pieces = None) -> float:
    """Lag-1 autocorrelation of the held-out log scores on the CUSUM's robust scale (capped at
    +-its cap), held to [0, MAX_AUTOCORRELATION]: the r both paths' budgets allow for."""
    logs = np.log(np.maximum(np.asarray(scores, np.float64), _EPS))
    spread = robust_spread(logs)
    if spread <= 0:
        return 0.0
    z = (logs - float(np.median(logs))) / spread
    # capped below as above: three windows scored 0 among 2,400 took r from 0.27 to 0.03, and
    # both paths' budgets were then set for independent windows (in a review)
    r = lag1_autocorrelation(np.clip(z, -DEFAULT_CAP, DEFAULT_CAP), pieces)
    return min(max(r, 0.0), MAX_AUTOCORRELATION)


def design_cusum(
    scores: np.ndarray,
    per_day: float,
    hop_s: float,
    r: float,
    seconds: float | None = None,
    pieces: Pieces = None,
) -> tuple[Cusum, dict[str, Any]] | None:
    """The CUSUM for this budget share on held-out normal scores (module docstring), whose
    lag-1 correlation is r (score_autocorrelation), `seconds` of audio behind them (as for
    bounded_threshold); None when the scores do not vary."""
    logs = np.log(np.maximum(scores, _EPS))
    center, spread = float(np.median(logs)), robust_spread(logs)
    if spread <= 0:
        return None
    widen = math.sqrt((1 + r) / (1 - r))
    scale = spread * widen
    design = cusum_h(SECONDS_PER_DAY / hop_s / per_day)
    z = (logs - center) / scale
    seconds = len(scores) * hop_s if seconds is None else seconds
    allowed = poisson_allowance(per_day * seconds / SECONDS_PER_DAY)
    floor = cusum_floor(z, allowed, DEFAULT_DRIFT, DEFAULT_CAP, pieces)
    cusum = Cusum(max(design, floor), center, scale)
    return cusum, {
        "false_alarms_per_day": per_day,
        "h_design": design,
        "h_floor": floor,
        "autocorrelation": r,
        "widen": widen,
    }


def forecast(
    scores: np.ndarray,
    threshold: float,
    cusum: Cusum | None,
    widen: float,
    k: int,
    n: int,
    hop_s: float,
    r: float = 0.0,
    censor: float | None = None,
    draws: int | None = None,
) -> dict[str, Any]:
    """Predicted false alarms per day of both paths and a seeded bootstrap interval (windows
    correlated at lag 1 by r); each gamma fitted censored at `censor`, as the threshold's.
    `draws`: windows per resample when the scores hold more than their time (the channels of
    one recording as views: 8 channels are not 8 times the evidence)."""
    per_day = SECONDS_PER_DAY / hop_s

    def rate(x: np.ndarray) -> float:
        fitted = Gamma.fit(x, censor_at=censor)
        window = per_day * k_of_n_start_rate(fitted.sf(threshold), r, k, n)
        if cusum is None:
            return window
        z = (np.log(np.maximum(x, _EPS)) - cusum.center) / cusum.scale
        sd = robust_spread(z) * widen
        arl = cusum_arl(cusum.h, cusum.drift, cusum.cap, float(np.median(z)), max(sd, _EPS))
        return window + SECONDS_PER_DAY / hop_s / arl

    rng = np.random.default_rng(BOOTSTRAP_SEED)
    rates = []
    # resampled windows have no order: sorted first, the interval does not move with the order
    # the recordings were read in (a state folder renamed moved it 40 to 113, a field review)
    ordered = np.sort(scores)
    for _ in range(BOOTSTRAP_RESAMPLES):
        try:
            rates.append(rate(ordered[rng.integers(0, len(scores), draws or len(scores))]))
        except ValueError:  # a resample without two distinct scores
            continue
    tail = 100 * (1 - INTERVAL) / 2
    low, high = np.percentile(rates, [tail, 100 - tail]) if rates else (math.nan, math.nan)
    return {
        "predicted_false_alarms_per_day": rate(scores),
        "predicted_interval_per_day": [float(low), float(high)],
        "interval": f"{INTERVAL:.0%} bootstrap of the held-out windows "
        f"({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED})",
    }


STEADY_SPREAD = 1e-9
"""Held-out scores whose spread is below this (relative to their size, or absolutely below 1)
vary by float rounding alone: a steady signal, not a machine heard by a microphone."""


NOT_A_MICROPHONE = (
    "is it silent, a dead channel or a steady electrical signal rather than a microphone?"
)
"""The question both steady refusals end with."""

STEADY_RATIO = 1e-3
"""Site audio whose held-out windows score this far below the training's is no machine heard by
a microphone: a tone 3 Hz off a bin (997 Hz) scored 6e-9 against the trained fan's 0.9 and set
a threshold every window of the fan passed (in a review)."""


def check_site_varies(site_median: float, trained_median: float) -> None:
    """Refuse (AudioError, one line) site audio whose held-out normal windows score
    STEADY_RATIO below the training's: it does not vary as a machine does."""
    if trained_median <= 0 or site_median >= STEADY_RATIO * trained_median:
        return
    raise AudioError(
        f"the site's normal audio scores {site_median:.3g} against {trained_median:.3g} in "
        f"training: it hardly varies, so no threshold can be set from it; {NOT_A_MICROPHONE}"
    )


def threshold_for_budget(
    scores: np.ndarray,
    false_alarms_per_day: float = DEFAULT_FALSE_ALARMS_PER_DAY,
    k: int = DEFAULT_K,
    n: int = DEFAULT_N,
    m: int = DEFAULT_M,
    hop_s: float = 0.5,
    integrate: bool = True,
    seconds: float | None = None,
    pieces: Pieces = None,
) -> tuple[float, dict]:
    """Threshold meeting the budget on these normal scores, and the parameters of the rule
    (with `integrate`, params['cusum'] holds the CUSUM that shares the budget). `seconds`: the
    audio behind the scores when it is less than their windows span (the channels of one
    recording as views are one recording's time, not several). `pieces`: the windows of each
    recording, in order (each a stream of its own; None: one stream)."""
    scores = np.asarray(scores, np.float64)
    _refuse_unusable(scores, pieces)
    seconds = len(scores) * hop_s if seconds is None else seconds
    draws = min(len(scores), max(2, round(seconds / hop_s)))  # the windows of distinct time
    designed = None
    r = score_autocorrelation(scores, pieces)
    if integrate and len(scores) >= MIN_CUSUM_WINDOWS:
        designed = design_cusum(
            scores, false_alarms_per_day * CUSUM_SHARE, hop_s, r, seconds, pieces
        )
    window_budget = false_alarms_per_day * (1 - CUSUM_SHARE if designed else 1.0)
    p = window_rate_for_budget(window_budget / 24, k, n, hop_s, r)
    common = {"false_alarms_per_day": false_alarms_per_day, "k": k, "n": n, "m": m, "hop_s": hop_s}
    censor = k_of_n_peak(scores, k, n, pieces)  # windows above it cannot start the path
    try:
        dist = Gamma.fit(scores, censor_at=censor)
    except ValueError:
        return _fallback_threshold(scores, seconds, p, common, pieces)
    value, bounds = bounded_threshold(
        scores, dist.isf(max(p, _EPS)), p, window_budget, k, n, m, hop_s, seconds, pieces
    )
    cusum, info = designed if designed else (None, {"widen": 1.0})
    params = {
        **common,
        "window_exceedance": p,
        "window_autocorrelation": r,
        "window_false_alarms_per_day": window_budget,
        "gamma_shape": dist.shape,
        "gamma_scale": dist.scale,
        **bounds,
        **forecast(scores, value, cusum, info["widen"], k, n, hop_s, r, censor, draws),
        **_holdout(scores, seconds, value, common, cusum, pieces),
    }
    if cusum is not None:
        params["cusum"] = {**cusum.to_params(), **info}
    return value, params


def _refuse_unusable(scores: np.ndarray, pieces: Pieces) -> None:
    """Refuse (AudioError) held-out scores no threshold can be set from: NaN or infinite
    ones, or all the same; pieces that do not fit the scores are a ValueError."""
    streams(scores, pieces)  # pieces that do not fit the scores: a ValueError now
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if bad:  # a NaN gamma would fall silently to the floor, and the manifest still promise it
        raise AudioError(
            f"{bad} of {len(scores)} held-out normal windows scored NaN or infinite: the model "
            "or the audio is broken, so no threshold can be set from them"
        )
    if len(scores) >= 2 and np.ptp(scores) <= STEADY_SPREAD * max(1.0, np.abs(scores).max()):
        raise AudioError(  # the fallback 1.5 x max set 1e-28 on a tone: every window above it
            f"the {len(scores)} held-out normal windows all scored the same "
            f"({scores.max():.3g}): the audio does not vary, so no threshold can be set from it; "
            f"{NOT_A_MICROPHONE}"
        )


def _fallback_threshold(
    scores: np.ndarray, seconds: float, p: float, common: dict[str, Any], pieces: Pieces
) -> tuple[float, dict]:
    """1.5 x the highest score, when no gamma fits the scores (too few distinct ones);
    AudioError when none is above 0."""
    if len(scores) and scores.max() <= 0:  # 1.5 x a negative max lies below it
        raise AudioError(
            "the held-out normal windows scored 0 or less: this rule needs positive scores "
            "(a distance or an error), so no threshold can be set from them"
        ) from None
    value = float(scores.max() * 1.5) if len(scores) else 1.0
    fallback = {"fallback": "too few distinct scores: 1.5 x max", "window_exceedance": p}
    holdout = _holdout(scores, seconds, value, common, None, pieces)
    return value, {**common, **fallback, **holdout}


def _holdout(
    scores: np.ndarray,
    seconds: float,
    value: float,
    common: dict[str, Any],
    cusum: Cusum | None,
    pieces: Pieces = None,
) -> dict[str, Any]:
    """What backs the threshold (`seconds` of held-out audio), and what the real event logic
    does on it."""
    k, n, m, hop_s = common["k"], common["n"], common["m"], common["hop_s"]
    starts = count_events(scores, value, k, n, m, hop_s, cusum, pieces)
    window_hours = len(scores) * hop_s / SECONDS_PER_HOUR  # channels as views: each one's time
    return {
        "n_windows": len(scores),
        "holdout_seconds": round(seconds, 3),
        "holdout_hours": round(seconds / SECONDS_PER_HOUR, 4),
        "holdout_window_rate": float(np.mean(scores > value)) if len(scores) else 0.0,
        "holdout_events": starts,  # the summary's count: the rate's hours need not be `seconds`
        "holdout_false_alarms_per_hour": starts / window_hours if window_hours > 0 else 0.0,
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


def describe(value: float, params: Mapping[str, Any]) -> str:
    """What backs a budget threshold, in a few lines for `train` and `calibrate` to print;
    empty for rules without held-out statistics (a classifier's confidence)."""
    if "n_windows" not in params:
        return ""
    budget = params.get("false_alarms_per_day", 0)
    predicted = params.get("predicted_false_alarms_per_day")
    capped = params.get("decided_by") == "cap"
    missed = capped and predicted is not None and budget and predicted > budget * 1.05
    # a capped threshold is not the budget's: its headline said "for 1 false alarm per day"
    # above a prediction of 144 (a review)
    held = f"{params['n_windows']} windows of held-out normal audio"
    lines = [  # the held-out audio's seconds are the summary's first line (edge.advice)
        f"threshold {value:.4g}, short of the budget of {budget:g} false alarm(s) per day: "
        f"{held} cannot back a higher one (below)"
        if missed
        else f"threshold {value:.4g}, for {budget:g} false alarm(s) per day, backed by {held}"
    ]
    if "holdout_max" in params:
        lines.append(_above_holdout(value, params))
    if "predicted_false_alarms_per_day" in params:
        lines += _predicted(params)
    lines += _raised_caution(params)
    if missed:
        lines.append(
            f"  caution: {rate_text(predicted)} false alarms per day are predicted, more than the "
            f"budget of {budget:g}: the threshold is capped at what the held-out audio backs "
            "(a gamma fitted to so little reaches too far to trust); give more normal audio "
            "(several recordings, other days)"
        )
    lines += _integrated(params)
    return "\n".join(lines)


def _predicted(params: Mapping[str, Any]) -> list[str]:
    """The predicted false alarms per day, their interval and how the windows correlate."""
    low, high = params["predicted_interval_per_day"]
    lines = [
        f"  predicted false alarms per day: "
        f"{rate_text(params['predicted_false_alarms_per_day'])} ({INTERVAL:.0%} interval "
        f"{interval_text(low, high)}); {_heard(params)}"
    ]
    if "window_autocorrelation" in params:  # not in older bundles
        r = params["window_autocorrelation"]
        allowed = (
            "both paths allow for it"
            if r < MAX_AUTOCORRELATION
            else f"both paths allow for {MAX_AUTOCORRELATION:g} at most, so false alarms may "
            "exceed the budget: the held-out audio drifts slowly (give audio of other days)"
        )
        lines.append(f"  neighbouring windows correlate (lag-1 r = {r:.2f}): {allowed}")
    return lines


def _raised_caution(params: Mapping[str, Any]) -> list[str]:
    """A caution when a path's fitted threshold was raised to clear the held-out audio."""
    cusum = params.get("cusum")
    raised = [
        path
        for path, floored in (
            ("K of N", params.get("decided_by") == "floor"),
            ("CUSUM", bool(cusum) and cusum.get("h_floor", 0.0) > cusum.get("h_design", math.inf)),
        )
        if floored
    ]
    if raised and "predicted_false_alarms_per_day" in params:
        return [
            f"  caution: the held-out audio would itself have raised events at the fitted "
            f"{' and '.join(raised)} threshold, which was raised to clear it; the prediction rests "
            "on the fit that audio contradicts and may understate false alarms: give more normal "
            "audio (several recordings, other days)"
        ]
    return []


def _integrated(params: Mapping[str, Any]) -> list[str]:
    """Whether integrated evidence (the CUSUM) is on, and its parameters."""
    cusum = params.get("cusum")
    if not cusum and params["n_windows"] < MIN_CUSUM_WINDOWS:  # off without a word (a review)
        return [
            f"  integrated evidence: off ({params['n_windows']} held-out windows; it needs "
            f"{MIN_CUSUM_WINDOWS}): only K of N raises events, so a subtle fault that lasts is "
            "not caught over time; give more normal audio"
        ]
    if cusum:
        return [
            f"  integrated evidence: CUSUM on log scores, h {cusum['h']:.3g} (budget "
            f"{cusum['h_design']:.3g}, held-out {cusum['h_floor']:.3g}), drift {cusum['drift']:g}, "
            f"cap {cusum['cap']:g}"
        ]
    return []


def _heard(params: Mapping[str, Any]) -> str:
    """What the event logic raised on the held-out audio itself: a count in its windows (as a
    rate, "0 per day" from a few seconds read as evidence of a quiet day)."""
    per_hour, seconds = params["holdout_false_alarms_per_hour"], params.get("holdout_seconds")
    if not seconds:  # older bundles
        return f"on the held-out audio: {rate_text(per_hour * 24)} per day"
    streamed = params["n_windows"] * params.get("hop_s", 0.5)  # the time the rate is over
    events = params.get("holdout_events")
    if events is None:  # bundles before it was recorded
        events = round(per_hour * (streamed or seconds) / SECONDS_PER_HOUR)
    if streamed > 1.5 * seconds:  # every channel replayed as a stream of its own
        return (
            f"the held-out audio itself raised {events} event(s) in its {seconds:.3g} s (its "
            f"channels replayed as {streamed:.3g} s of streams)"
        )
    # in windows: their starts span less than the audio (a window less a hop of each recording
    # or piece held out), and "in its 6 s" under "scored the other 8 s" read as a contradiction
    windows = params["n_windows"]
    return f"the held-out audio itself raised {events} event(s) in its {windows} windows"


def _above_holdout(value: float, params: Mapping[str, Any]) -> str:
    """How far the threshold sits above the held-out normal audio, as the event logic sees it:
    its highest run of K of N windows, then its highest single window (a threshold below that
    one is no contradiction: an isolated sound lifts one or two windows, and K of N needs K)."""
    k, n = params.get("k", DEFAULT_K), params.get("n", DEFAULT_N)
    lines = []
    if params.get("above_holdout_k_of_n_peak") is not None:  # not in older bundles
        lines.append(
            f"  held-out normal audio: {k} of {n} windows reach {params['holdout_k_of_n_peak']:.4g}"
            f" at most; the threshold is {_relative(params['above_holdout_k_of_n_peak'])} that"
        )
    single = (
        f"  its single highest window scores {params['holdout_max']:.4g}; the threshold is "
        f"{_relative(params['above_holdout_max'])} it"
    )
    if value < params["holdout_max"]:
        single += f" (one window may pass it: an event needs {k} of {n})"
    lines.append(single)
    decided = params["decided_by"]
    lines.append(
        f"  set by {_DECIDED_BY.get(decided, decided)} (gamma quantile "
        f"{params['gamma_threshold']:.4g}, cap {params['cap']:.4g}, floor {params['floor']:.4g})"
    )
    return "\n".join(lines)


_DECIDED_BY = {
    "gamma": "the budget on a gamma fitted to the held-out scores",
    "cap": "the cap over the highest held-out score (the gamma reached further)",
    "floor": "the held-out audio, which would raise events below it",
    "marked": "windows marked normal on site",
}


def _relative(fraction: float) -> str:
    """'97 % above' / '27 % below' for a threshold relative to a score."""
    return f"{abs(100 * fraction):.0f} % {'above' if fraction >= 0 else 'below'}"


def rate_text(per_day: float) -> str:
    """A rate for people: three digits, '<0.001' for a vanishing one (0 is 0), and no powers
    of ten ("1.02e+03" in the training summary, in a new user's walk-through) nor thousands
    separators (a comma reads as a decimal point in much of Europe)."""
    if 0 < per_day < 1e-3:
        return "<0.001"
    rounded = float(f"{per_day:.3g}")
    return f"{rounded:.0f}" if rounded >= 1000 else f"{per_day:.3g}"


def interval_text(low: float, high: float) -> str:
    """A predicted interval of false alarms per day, `LOW to HIGH`: a lower end of 0 is
    '<0.001', as near it (an interval does not reach nothing)."""
    return f"{'<0.001' if low < 1e-3 else rate_text(low)} to {rate_text(high)}"
