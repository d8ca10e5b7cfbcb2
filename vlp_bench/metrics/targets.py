"""Time-to-target and FLOPs-to-target: how much training a method needs to reach a fixed quality.

A run's learning curve is the sequence of its evaluations on the validation subset, each with the
cumulative training wall-clock and FLOPs spent so far. The cost to reach a target value is taken
at the first crossing: the first evaluation whose value is at or above the target. Between that
evaluation and the one before it, the cost is linearly interpolated on the value, so a run that
crosses the target a third of the way from one evaluation to the next gets a third of the cost
between them. If the very first evaluation already meets the target, its cost is the answer. A
curve that later falls back below the target still counts from its first crossing, and a run that
never reaches the target has no cost at all: it is reported as not reached, never as a number.

The target is fixed before anything is compared: either given, or the mean over the reference
method's seeds of their final validation value. Every method is then measured against that same
number.

A method's speed-up over the reference is the ratio of means, mean reference cost divided by
mean method cost, so a value above 1 means the method gets there faster. Its uncertainty is a
percentile bootstrap over seeds: the seeds of the two methods are resampled independently with
replacement, the ratio of means is recomputed for each resample, and the interval is the central
percentiles at the requested level. One seed cannot give an interval, so a group with a single
seed gets none. A mean cost and a speed-up are given only when every seed of the method (and,
for the speed-up, of the reference) reached the target; otherwise the report says how many did.
A speed-up is also left out when the method's mean cost is zero (it met the target before any
training), since the ratio is then undefined.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import numpy as np

AXES = {"wall_s": 0, "flops": 1}

Point = tuple[float, float, float]


def split_metric(metric: str) -> tuple[str, str]:
    """"caption.CIDEr" -> ("caption", "CIDEr"); anything else is a ValueError (configs call it too)."""
    task, dot, key = metric.partition(".")
    if not dot or not task or not key:
        raise ValueError(f"metric must be task.key (e.g. caption.CIDEr), got '{metric}'")
    return task, key


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _is_val_eval(row: dict) -> bool:
    return "eval" in row and row.get("split") == "val"


def _cost(row: dict, name: str) -> float:
    value = _finite_number(row.get(name))
    if value is None:
        raise ValueError(f"val evaluation row at step {row.get('step')!r} has no finite {name!r}")
    return value


def curve(rows: list[dict], metric: str) -> list[Point]:
    """(wall_s, flops, value) of the val evaluation rows, in order; rows lacking the metric are skipped."""
    task, key = split_metric(metric)
    points: list[Point] = []
    for row in rows:
        if not _is_val_eval(row):
            continue
        scores = row["eval"].get(task) if isinstance(row["eval"], dict) else None
        value = _finite_number(scores.get(key)) if isinstance(scores, dict) else None
        if value is None:
            continue
        points.append((_cost(row, "wall_s"), _cost(row, "flops"), value))
    return points


def first_reach(points: list[Point], target: float, axis: str) -> float | None:
    """Cost on `axis` at which the curve first reaches `target`, interpolated; None if it never does."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {sorted(AXES)}, got {axis!r}")
    i = AXES[axis]
    previous: Point | None = None
    for point in points:
        if point[2] >= target:
            if previous is None:
                return float(point[i])
            # previous is below the target, so the value difference is positive
            c0, v0, c1, v1 = previous[i], previous[2], point[i], point[2]
            return float(c0 + (target - v0) / (v1 - v0) * (c1 - c0))
        previous = point
    return None


def _as_costs(values: list[float], name: str) -> np.ndarray:
    if len(values) == 0:
        raise ValueError(f"{name} has no values")
    array = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has non-finite values: {list(values)}")
    return array


def _resampled_means(values: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    idx = rng.integers(0, len(values), size=(n, len(values)))
    return values[idx].mean(axis=1)


def bootstrap_ratio(ref: list[float], other: list[float], n: int = 2000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """Speed-up mean(ref) / mean(other) with a percentile bootstrap CI over seeds (None for a single seed)."""
    ref_a, other_a = _as_costs(ref, "ref"), _as_costs(other, "other")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if other_a.mean() == 0:
        raise ValueError("ratio undefined: mean cost of 'other' is zero")
    result: dict = {"value": float(ref_a.mean() / other_a.mean()), "ci_low": None, "ci_high": None,
                    "n_boot": n}
    if len(ref_a) < 2 or len(other_a) < 2:
        return result
    rng = np.random.default_rng(seed)
    ref_means = _resampled_means(ref_a, n, rng)
    other_means = _resampled_means(other_a, n, rng)
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample of only zero costs
        ratios = ref_means / other_means
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    result["ci_low"], result["ci_high"] = float(low), float(high)
    return result


def _runs_by_method(records: list[dict]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for record in records:
        if record.get("status") == "finished":
            runs.setdefault(record["method"], []).append(record)
    return runs


def _curves(runs: list[dict], rows_by_run: dict[str, list[dict]], metric: str) -> list[list[Point]]:
    missing = [r["run_id"] for r in runs if r["run_id"] not in rows_by_run]
    if missing:
        raise ValueError(f"no metrics rows for finished run(s): {', '.join(map(str, missing))}")
    return [curve(rows_by_run[r["run_id"]], metric) for r in runs]


def _reference_final(curves: list[list[Point]], runs: list[dict], metric: str) -> float:
    empty = [str(r["run_id"]) for r, points in zip(runs, curves) if not points]
    if empty:
        raise ValueError(f"cannot set the target: reference run(s) {', '.join(empty)} "
                         f"have no val evaluation of {metric!r}")
    return float(np.mean([points[-1][2] for points in curves]))


def _cost_summary(per_seed: list[float | None]) -> dict:
    complete = bool(per_seed) and all(c is not None for c in per_seed)
    return {"mean": float(np.mean(per_seed)) if complete else None, "per_seed": per_seed}


def _speedup(ref: dict, other: dict, n_boot: int, seed: int) -> dict | None:
    if ref["mean"] is None or other["mean"] is None or other["mean"] == 0:
        return None
    return bootstrap_ratio(ref["per_seed"], other["per_seed"], n=n_boot, seed=seed)


def speedups(records: list[dict], rows_by_run: dict[str, list[dict]], metric: str,
             target: float | None = None, reference: str | None = None, n_boot: int = 2000,
             seed: int = 0) -> dict:
    """Time- and FLOPs-to-target of every method's finished runs, and speed-ups over the reference."""
    split_metric(metric)
    if reference is None:
        if not records:
            raise ValueError("no run records")
        reference = records[0]["method"]
    runs = _runs_by_method(records)
    if reference not in runs:
        raise ValueError(f"reference method {reference!r} has no finished run "
                         f"(methods with finished runs: {', '.join(runs) or 'none'})")
    curves = {method: _curves(method_runs, rows_by_run, metric) for method, method_runs in runs.items()}
    if target is None:
        target_value, source = _reference_final(curves[reference], runs[reference], metric), "reference final"
    elif _finite_number(target) is None:
        raise ValueError(f"target must be a finite number, got {target!r}")
    else:
        target_value, source = float(target), "given"

    costs = {method: {axis: _cost_summary([first_reach(p, target_value, axis) for p in method_curves])
                      for axis in AXES}
             for method, method_curves in curves.items()}
    methods = {}
    for method, cost in costs.items():
        methods[method] = {
            "seeds": len(runs[method]),
            "reached": sum(c is not None for c in cost["wall_s"]["per_seed"]),
            "time_to_target_s": cost["wall_s"],
            "flops_to_target": cost["flops"],
            "time_speedup": _speedup(costs[reference]["wall_s"], cost["wall_s"], n_boot, seed),
            "flops_speedup": _speedup(costs[reference]["flops"], cost["flops"], n_boot, seed),
        }
    return {"metric": metric, "target": target_value, "target_source": source, "reference": reference,
            "methods": methods}
