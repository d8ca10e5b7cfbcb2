"""Paired speed-ups and their verdicts: is a method faster than the reference, slower, or not
distinguishable from it with the seeds that ran?

Seed i of every method sees the same data order (the batch generator is seeded by the seed alone),
so seed i of a method and seed i of the reference form a pair, and what is compared is the pair's
log speed-up d_i = log(reference cost_i / method cost_i). The speed-up is exp(mean d_i), the
geometric mean of the paired ratios, and its interval is the Student-t interval on the mean of the
d_i, exp(mean ± t(n-1) · sd / sqrt(n)). Why t and not a bootstrap: with 3 seeds a paired bootstrap
has only 10 distinct resamples and its 95% percentile interval covers far less than 95%; the t
interval is exact when the log speed-ups are normal and close to it otherwise
(tests/test_verdicts.py checks the coverage on synthetic runs with a known speed-up, 3 and 10 seeds).

The verdict reads the interval: "faster" when its low end is above 1, "slower" when its high end
is below 1, else "no detectable difference". One pair has no spread, so it gives a point estimate
labelled "point estimate", never a verdict. `seeds_needed` is the number of seeds a paired t-test
at the same level would need for 80% power if the true effect were the observed mean with the
observed spread: what to run next when the answer is "no detectable difference".
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

import numpy as np

LEVEL = 0.95  # the confidence of every interval and verdict (before the correction over methods)
POWER = 0.8  # the power `seeds_needed` plans for
MAX_SEEDS = 1000  # `seeds_needed` beyond this is reported as None (no practical number of seeds decides it)
EXACT_DF = 30  # t quantiles from the exact CDF up to this many degrees of freedom

FASTER, SLOWER, TIE, POINT = "faster", "slower", "no detectable difference", "point estimate"


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with an integer `df` >= 1 (closed forms, no scipy)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        total, term = (1.0, 1.0) if df > 1 else (0.0, 0.0)
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inside = 2 / math.pi * (theta + s * math.cos(theta) * total)
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        total = term = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        inside = s * total
    return 0.5 + math.copysign(inside / 2, t)


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom: bisection on t_cdf up to
    EXACT_DF, the Cornish-Fisher expansion to 1/df^3 beyond (tested against the tables and the CDF)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df > EXACT_DF:
        z = NormalDist().inv_cdf(p)
        return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
                + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))
    lo, hi = -1e4, 1e4
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def seeds_needed(mean: float, sd: float, level: float = LEVEL, power: float = POWER) -> int | None:
    """Pairs a two-sided paired t-test at `level` needs to detect an effect `mean` (on the log
    scale) with spread `sd` at `power`: the smallest n with t(1-a/2, n-1) + t(power, n-1) <=
    |mean| / sd * sqrt(n). None when there is no effect to detect or no spread to size it."""
    if sd is None or not sd > 0 or mean == 0:
        return None
    effect = abs(mean) / sd
    normal = NormalDist()  # the z-test's n is a lower bound: t quantiles exceed z's
    start = ((normal.inv_cdf(1 - (1 - level) / 2) + normal.inv_cdf(power)) / effect) ** 2
    if start > MAX_SEEDS:
        return None
    for n in range(max(2, int(start)), MAX_SEEDS + 1):
        if t_quantile(1 - (1 - level) / 2, n - 1) + t_quantile(power, n - 1) <= effect * math.sqrt(n):
            return n
    return None


def paired_speedup(ref: list[float], other: list[float], level: float = LEVEL) -> dict:
    """The speed-up of `other` over `ref` from paired costs (same order, all > 0): value, interval,
    verdict and the seeds a decision needs (see the module docstring)."""
    if len(ref) != len(other) or not ref:
        raise ValueError(f"paired costs need equal, non-empty lists, got {len(ref)} and {len(other)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a, b = np.asarray(ref, dtype=float), np.asarray(other, dtype=float)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(a > 0) and np.all(b > 0)):
        raise ValueError(f"paired costs must be finite and positive, got {list(ref)} and {list(other)}")
    d = np.log(a / b)
    n, mean = len(d), float(d.mean())
    out = {"value": math.exp(mean), "ci_low": None, "ci_high": None, "pairs": n, "level": level,
           "per_seed": [float(x) for x in np.exp(d)], "verdict": POINT, "seeds_needed": None}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    half = t_quantile(1 - (1 - level) / 2, n - 1) * sd / math.sqrt(n)
    out.update(ci_low=math.exp(mean - half), ci_high=math.exp(mean + half),
               verdict=FASTER if mean - half > 0 else SLOWER if mean + half < 0 else TIE)
    if out["verdict"] == TIE:
        out["seeds_needed"] = seeds_needed(mean, sd, level)
    return out


def corrected_level(comparisons: int, level: float = LEVEL) -> float:
    """The per-comparison level that keeps `comparisons` verdicts jointly at `level` (Bonferroni)."""
    return 1 - (1 - level) / max(1, comparisons)

