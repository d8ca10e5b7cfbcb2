"""Time-to-target and FLOPs-to-target on synthetic curves (no training, no torch)."""

from __future__ import annotations

import pytest

from vlp_bench.metrics.targets import bootstrap_ratio, curve, first_reach, speedups


def val_row(step: int, wall_s: float, flops: float, cider: float | None, **extra) -> dict:
    caption = {"Bleu_4": 0.1} if cider is None else {"CIDEr": cider, "Bleu_4": 0.1}
    return {"step": step, "samples": 32 * step, "wall_s": wall_s, "flops": flops, "split": "val",
            "eval": {"caption": caption, "vqa": {"overall": 40.0 + step}}, **extra}


def rows_from(values: list[float], wall_per_step: float = 10.0, flops_per_step: float = 100.0) -> list[dict]:
    """One val evaluation per step, with training-loss rows in between that must be ignored."""
    rows: list[dict] = []
    for step, value in enumerate(values):
        rows.append(val_row(step, wall_per_step * step, flops_per_step * step, value))
        rows.append({"step": step, "loss": 3.0 - step, "wall_s": wall_per_step * step})
    return rows


def record(method: str, seed: int, status: str = "finished") -> dict:
    return {"run_id": f"{method}-s{seed}", "method": method, "seed": seed, "status": status,
            "metrics": {"caption": {"CIDEr": 99.0}}}  # final test numbers: must not be used


POINTS = [(0.0, 0.0, 0.1), (10.0, 100.0, 0.5), (20.0, 200.0, 0.9)]


# --- curve -------------------------------------------------------------------------------------

def test_curve_keeps_only_val_eval_rows_with_the_metric():
    rows = [
        val_row(0, 0.0, 0.0, 0.1),
        {"step": 1, "loss": 2.5, "wall_s": 5.0, "flops": 50.0},        # training row
        val_row(2, 10.0, 100.0, 0.4),
        {**val_row(2, 10.0, 100.0, 0.8), "split": "test"},            # test split
        val_row(3, 15.0, 150.0, None),                                 # metric missing
        val_row(4, 20.0, 200.0, float("nan")),                         # not finite
        {**val_row(5, 25.0, 250.0, 0.0), "eval": {"vqa": {"overall": 1.0}}},  # task missing
        val_row(6, 30.0, 300.0, 0.6),
    ]
    assert curve(rows, "caption.CIDEr") == [(0.0, 0.0, 0.1), (10.0, 100.0, 0.4), (30.0, 300.0, 0.6)]
    assert [p[2] for p in curve(rows, "vqa.overall")] == [40.0, 42.0, 43.0, 44.0, 1.0, 46.0]


def test_curve_rejects_a_metric_name_without_a_dot():
    with pytest.raises(ValueError, match="task.key"):
        curve(rows_from([0.1, 0.2]), "CIDEr")


# --- first_reach -------------------------------------------------------------------------------

def test_first_reach_interpolates_linearly_between_the_bracketing_points():
    # 0.7 is halfway from 0.5 to 0.9: halfway from 10 to 20 s and from 100 to 200 FLOPs
    assert first_reach(POINTS, 0.7, "wall_s") == pytest.approx(15.0)
    assert first_reach(POINTS, 0.7, "flops") == pytest.approx(150.0)
    # a quarter of the way from 0.1 to 0.5
    assert first_reach(POINTS, 0.2, "wall_s") == pytest.approx(2.5)


def test_first_reach_exactly_at_a_point_and_at_the_first_point():
    assert first_reach(POINTS, 0.5, "wall_s") == pytest.approx(10.0)
    assert first_reach(POINTS, 0.1, "flops") == 0.0
    assert first_reach([(3.0, 30.0, 0.8), (6.0, 60.0, 0.9)], 0.5, "wall_s") == 3.0


def test_first_reach_never_reached_or_empty_is_none():
    assert first_reach(POINTS, 0.95, "wall_s") is None
    assert first_reach([], 0.1, "flops") is None


def test_first_reach_takes_the_first_crossing_of_a_non_monotone_curve():
    points = [(0.0, 0.0, 0.2), (10.0, 100.0, 0.8), (20.0, 200.0, 0.3), (30.0, 300.0, 0.9)]
    # first crossing of 0.6: two thirds of the way from 0.2 to 0.8, not the later climb from 0.3
    assert first_reach(points, 0.6, "wall_s") == pytest.approx(10.0 * 0.4 / 0.6)
    assert first_reach(points, 0.6, "flops") == pytest.approx(100.0 * 0.4 / 0.6)


def test_first_reach_rejects_an_unknown_axis():
    with pytest.raises(ValueError, match="axis"):
        first_reach(POINTS, 0.5, "samples")


# --- bootstrap_ratio ---------------------------------------------------------------------------

def test_bootstrap_point_value_is_the_ratio_of_means_and_the_ci_contains_it():
    ref, other = [100.0, 130.0, 110.0], [50.0, 70.0, 40.0]  # skewed: mean differs from median
    result = bootstrap_ratio(ref, other, n=500, seed=1)
    assert result["value"] == pytest.approx((340.0 / 3) / (160.0 / 3))
    assert result["n_boot"] == 500
    assert result["ci_low"] <= result["value"] <= result["ci_high"]
    assert result["ci_low"] < result["ci_high"]  # the groups vary, so the interval is not a point
    # every resampled ratio lies between the extremes: min(ref)/max(other) and max(ref)/min(other)
    assert result["ci_low"] >= 100.0 / 70.0 and result["ci_high"] <= 130.0 / 40.0


def test_bootstrap_is_deterministic_for_a_seed_and_varies_with_it():
    ref, other = [100.0, 120.0, 110.0, 90.0], [50.0, 70.0, 40.0, 65.0]
    first = bootstrap_ratio(ref, other, n=300, seed=7)
    assert bootstrap_ratio(ref, other, n=300, seed=7) == first
    assert bootstrap_ratio(ref, other, n=300, seed=8) != first


def test_bootstrap_single_seed_gives_no_interval():
    result = bootstrap_ratio([100.0], [25.0, 30.0], n=100)
    assert result["value"] == pytest.approx(100.0 / 27.5)
    assert result["ci_low"] is None and result["ci_high"] is None
    assert bootstrap_ratio([100.0, 90.0], [25.0], n=100)["ci_low"] is None


def test_bootstrap_constant_groups_collapse_the_interval():
    same = bootstrap_ratio([4.0, 4.0, 4.0], [4.0, 4.0, 4.0], n=200)
    assert same["value"] == same["ci_low"] == same["ci_high"] == 1.0
    double = bootstrap_ratio([10.0, 10.0], [5.0, 5.0, 5.0], n=200)
    assert double["value"] == double["ci_low"] == double["ci_high"] == pytest.approx(2.0)


def test_bootstrap_rejects_empty_groups():
    with pytest.raises(ValueError):
        bootstrap_ratio([], [1.0, 2.0])
    with pytest.raises(ValueError):
        bootstrap_ratio([1.0, 2.0], [])


# --- speedups ----------------------------------------------------------------------------------

def test_speedups_with_a_given_target_and_partial_reach():
    # fast reaches 0.7 at 5 s on every seed (steps of 5 s); slow at 15 s; partial on 2 of 3 seeds
    rows_by_run = {
        "slow-s0": rows_from([0.1, 0.5, 0.9]), "slow-s1": rows_from([0.1, 0.5, 0.9]),
        "fast-s0": rows_from([0.1, 0.9], wall_per_step=5.0, flops_per_step=50.0),
        "fast-s1": rows_from([0.1, 0.9], wall_per_step=5.0, flops_per_step=50.0),
        "partial-s0": rows_from([0.1, 0.9]), "partial-s1": rows_from([0.1, 0.6, 0.8]),
        "partial-s2": rows_from([0.1, 0.3, 0.5]),
    }
    records = [record("slow", 0), record("slow", 1), record("fast", 0), record("fast", 1),
               record("partial", 0), record("partial", 1), record("partial", 2),
               record("fast", 2, status="failed")]
    report = speedups(records, rows_by_run, "caption.CIDEr", target=0.7, n_boot=200)

    assert report["target"] == 0.7 and report["target_source"] == "given"
    assert report["reference"] == "slow"
    assert list(report["methods"]) == ["slow", "fast", "partial"]

    slow, fast, partial = (report["methods"][m] for m in ("slow", "fast", "partial"))
    assert slow["time_to_target_s"] == {"mean": pytest.approx(15.0), "per_seed": [pytest.approx(15.0)] * 2}
    assert slow["time_speedup"]["value"] == 1.0
    assert fast["seeds"] == 2 and fast["reached"] == 2  # the failed run is not counted
    # 0.7 is three quarters of the way from 0.1 to 0.9 over one 5 s step
    assert fast["time_to_target_s"]["mean"] == pytest.approx(3.75)
    assert fast["flops_to_target"]["mean"] == pytest.approx(37.5)
    assert fast["time_speedup"]["value"] == pytest.approx(15.0 / 3.75)
    assert fast["flops_speedup"]["value"] == pytest.approx(150.0 / 37.5)

    assert partial["seeds"] == 3 and partial["reached"] == 2
    per_seed = partial["time_to_target_s"]["per_seed"]
    assert per_seed[0] == pytest.approx(7.5) and per_seed[1] == pytest.approx(15.0) and per_seed[2] is None
    assert partial["time_to_target_s"]["mean"] is None and partial["flops_to_target"]["mean"] is None
    assert partial["time_speedup"] is None and partial["flops_speedup"] is None


def test_speedups_never_reached_is_reported_as_such():
    rows_by_run = {"base-s0": rows_from([0.1, 0.5]), "stuck-s0": rows_from([0.1, 0.2]),
                   "stuck-s1": rows_from([0.1, 0.3])}
    records = [record("base", 0), record("stuck", 0), record("stuck", 1)]
    stuck = speedups(records, rows_by_run, "caption.CIDEr", target=0.4, n_boot=50)["methods"]["stuck"]
    assert stuck["seeds"] == 2 and stuck["reached"] == 0
    assert stuck["time_to_target_s"] == {"mean": None, "per_seed": [None, None]}
    assert stuck["flops_to_target"] == {"mean": None, "per_seed": [None, None]}
    assert stuck["time_speedup"] is None and stuck["flops_speedup"] is None


def test_speedups_need_the_reference_to_reach_on_every_seed():
    rows_by_run = {"base-s0": rows_from([0.1, 0.9]), "base-s1": rows_from([0.1, 0.3]),
                   "other-s0": rows_from([0.1, 0.9])}
    records = [record("base", 0), record("base", 1), record("other", 0)]
    other = speedups(records, rows_by_run, "caption.CIDEr", target=0.5, n_boot=50)["methods"]["other"]
    assert other["time_to_target_s"]["mean"] == pytest.approx(5.0)
    assert other["time_speedup"] is None and other["flops_speedup"] is None


def test_default_target_is_the_mean_of_the_reference_final_values():
    rows_by_run = {
        # the final *val* values are 0.6 and 0.8; a later test-split row must not count
        "base-s0": rows_from([0.1, 0.6]) + [{**val_row(2, 30.0, 300.0, 5.0), "split": "test"}],
        "base-s1": rows_from([0.2, 0.9, 0.8]),
        "other-s0": rows_from([0.3, 0.9]),
    }
    records = [record("base", 0), record("base", 1), record("other", 0)]
    report = speedups(records, rows_by_run, "caption.CIDEr", n_boot=50)
    assert report["target"] == pytest.approx(0.7)
    assert report["target_source"] == "reference final"
    assert report["reference"] == "base"
    # other crosses 0.7 two thirds of the way from 0.3 to 0.9 over one 10 s step
    assert report["methods"]["other"]["time_to_target_s"]["mean"] == pytest.approx(10.0 * 0.4 / 0.6)


def test_explicit_reference_and_metric():
    rows_by_run = {"a-s0": rows_from([0.1, 0.2]), "b-s0": rows_from([0.1, 0.2], wall_per_step=20.0)}
    records = [record("a", 0), record("b", 0)]
    # vqa.overall is 40 + step: 41 is reached after one step by both
    report = speedups(records, rows_by_run, metric="vqa.overall", target=41.0, reference="b", n_boot=50)
    assert report["reference"] == "b" and report["metric"] == "vqa.overall"
    assert report["methods"]["a"]["time_speedup"]["value"] == pytest.approx(2.0)


def test_speedups_rejects_an_unknown_or_unfinished_reference():
    rows_by_run = {"a-s0": rows_from([0.1, 0.9]), "b-s0": rows_from([0.1, 0.9])}
    records = [record("a", 0), record("b", 0, status="failed")]
    with pytest.raises(ValueError, match="nope"):
        speedups(records, rows_by_run, "caption.CIDEr", reference="nope")
    with pytest.raises(ValueError, match="no finished run"):
        speedups(records, rows_by_run, "caption.CIDEr", reference="b")


def test_default_target_needs_reference_curve_points():
    rows_by_run = {"a-s0": [{"step": 0, "loss": 1.0}], "b-s0": rows_from([0.1, 0.9])}
    with pytest.raises(ValueError, match="target"):
        speedups([record("a", 0), record("b", 0)], rows_by_run, "caption.CIDEr")
