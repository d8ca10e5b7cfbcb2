"""Paired speed-ups: the t distribution without scipy, the interval's coverage on synthetic runs with
a known speed-up (3 and 10 seeds, through the same first-crossing rule the report uses), the
verdicts and the seeds a decision needs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlp_bench.metrics.targets import first_reach
from vlp_bench.metrics.verdicts import (FASTER, POINT, SLOWER, TIE, corrected_level, paired_speedup,
                                        seeds_needed, t_cdf, t_quantile)


@pytest.mark.parametrize("df, p, expected", [(1, 0.975, 12.7062), (2, 0.975, 4.3027), (3, 0.975, 3.1824),
                                             (9, 0.975, 2.2622), (30, 0.975, 2.0423), (2, 0.8, 1.0607),
                                             (4, 0.025, -2.7764), (7, 0.5, 0.0), (31, 0.975, 2.0395),
                                             (100, 0.975, 1.9840), (100, 0.8, 0.8452)])
def test_t_quantiles_match_the_tables(df, p, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-3)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-6)


def _cost_to_target(tau: float, rng: np.random.Generator, target: float = 0.6) -> float:
    """A learning curve 1 - exp(-t / tau) read at 60 points with a little noise on each value, and
    its cost to `target` by the report's rule (monotone fit, first crossing, interpolation)."""
    t = np.linspace(0.0, 6.0, 60)
    values = 1 - np.exp(-t / tau) + rng.normal(0, 0.003, t.shape)
    return first_reach([(float(a), float(a), float(v)) for a, v in zip(t, values)], target, "wall_s")


@pytest.mark.parametrize("seeds, at_least", [(3, 0.90), (10, 0.93)])
def test_paired_intervals_cover_the_true_speed_up(seeds, at_least):
    """Seed i of both methods shares a data-order effect; each run adds its own. The method's curve
    runs `true` times faster in expectation: its 95% interval must hold `true` >= 90% of the time,
    and at 10 seeds >= 93% (a normal interval, 91% there, would fail), yet not always (<= 99%: an
    interval too wide to decide anything)."""
    rng = np.random.default_rng(seeds)
    true, trials, covered = 2.0, 300, 0
    for _ in range(trials):
        shared = rng.normal(0, 0.2, seeds)
        ref = [_cost_to_target(math.exp(s + rng.normal(0, 0.15)), rng) for s in shared]
        other = [_cost_to_target(math.exp(s + rng.normal(0, 0.15)) / true, rng) for s in shared]
        result = paired_speedup(ref, other)
        covered += result["ci_low"] <= true <= result["ci_high"]
    assert at_least <= covered / trials <= 0.99


def test_pairing_is_what_narrows_the_interval():
    # the same costs, seed order scrambled in one method: the pairs no longer share the seed's effect
    ref = [10.0, 20.0, 40.0, 15.0]
    other = [5.2, 9.8, 20.5, 7.4]
    paired = paired_speedup(ref, other)
    scrambled = paired_speedup(ref, [other[2], other[0], other[3], other[1]])
    assert paired["verdict"] == FASTER and scrambled["verdict"] == TIE
    assert paired["ci_high"] / paired["ci_low"] < scrambled["ci_high"] / scrambled["ci_low"]


def test_verdicts_read_the_interval():
    assert paired_speedup([10, 12, 9], [5, 6.2, 4.4])["verdict"] == FASTER
    assert paired_speedup([5, 6.2, 4.4], [10, 12, 9])["verdict"] == SLOWER
    tie = paired_speedup([10, 12, 9], [9, 13, 8])
    assert tie["verdict"] == TIE and tie["ci_low"] < 1 < tie["ci_high"]
    assert tie["seeds_needed"] is not None and tie["seeds_needed"] > 3
    one = paired_speedup([10.0], [4.0])
    assert one["verdict"] == POINT and one["value"] == pytest.approx(2.5) and one["ci_low"] is None
    assert one["seeds_needed"] is None


def test_value_is_the_geometric_mean_of_the_paired_ratios():
    result = paired_speedup([8.0, 2.0], [2.0, 2.0])
    assert result["per_seed"] == pytest.approx([4.0, 1.0]) and result["value"] == pytest.approx(2.0)


def test_seeds_needed_matches_the_paired_t_test_power_table():
    # effect size 1 (mean = sd) at 5% two-sided and 80% power: 10 pairs; 0.5: 34 pairs
    assert seeds_needed(0.3, 0.3) == 10
    assert seeds_needed(-0.15, 0.3) == 34
    assert seeds_needed(0.0, 0.3) is None and seeds_needed(0.3, 0.0) is None
    assert seeds_needed(1e-4, 1.0) is None  # beyond any practical number of seeds


def test_more_comparisons_ask_more_of_each():
    assert corrected_level(1) == pytest.approx(0.95) and corrected_level(2) == pytest.approx(0.975)
    wide = paired_speedup([10, 12, 9], [5, 6.2, 4.4], level=corrected_level(4))
    narrow = paired_speedup([10, 12, 9], [5, 6.2, 4.4])
    assert wide["ci_low"] < narrow["ci_low"] and wide["ci_high"] > narrow["ci_high"]


def test_bad_costs_are_refused():
    with pytest.raises(ValueError, match="equal"):
        paired_speedup([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        paired_speedup([1.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="level"):
        paired_speedup([1.0], [1.0], level=1.0)
