"""Time- and FLOPs-to-target, by one rule for every method, and the speed-up over a grid of targets.

A run's learning curve is its sequence of validation points, each with the training wall-clock and
FLOPs spent so far: the generation metrics at the evaluation points (`caption.CIDEr`, ...) or the
teacher-forced validation loss (`val_loss`, lower is better) logged every `train.log_every` steps.

**Noise.** A validation point is a noisy reading of how good the model is, and a first crossing of
the raw points credits a lucky spike. The rule reads each curve through its monotone fit instead:
the isotonic regression of the values on the step (pool-adjacent-violators; non-decreasing for a
metric to maximise, non-increasing for a loss). A spike above later values is pooled with them,
so a curve counts as reaching a level only when the points after it hold it on average. On a
curve that is already monotone the fit is the curve itself, so an explicit target keeps plain
first-crossing semantics there and can be checked by hand.

**Cost to target.** The first crossing of the fitted curve, linearly interpolated on the value
between the two points around it; the first point's cost if it already meets it (0 at step 0:
"reached untrained", no ratio; later, an upper bound); a run that never gets there has no cost:
"not reached", never a number.

**Targets are not drawn from the runs they judge.** A given `target` is used as it is. Otherwise
seed i's target is TARGET_LEVEL of the way from the floor to the best fitted value of the
*other* reference seeds (cross-fitted), so the reference's seed i is judged by the same number as
the method's seed i and neither helped set it. With a single reference seed there are no other
seeds: the target then comes from the run it judges, and says so (`target_source`).

**Speed-up curve.** The same rule at GRID_POINTS fractions of the gap, GRID_START to GRID_END,
each cross-fitted per seed like the default target (the constants' comment says why the grid stops
short of the best). Each point has
the paired speed-up, interval and verdict of vlp_bench.metrics.verdicts. The intervals are
pointwise; over the methods compared they are Bonferroni-corrected, so at each target the
verdicts of all methods hold jointly at 95%. Neighbouring targets are read off the same curves,
so their verdicts are strongly dependent: a range of targets where a method is faster is a run of
pointwise verdicts, not a simultaneous band.

The floor is the metric's floor as the runs' results give it (the task's answer-the-most-common
baseline, e.g. metrics.caption.floor.CIDEr), else (no floor, or a reference that never beat it) the
other reference seeds' first fitted value.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import numpy as np

from vlp_bench.metrics.verdicts import LEVEL, corrected_level, paired_speedup

AXES = {"wall_s": 0, "flops": 1}
AXIS_NAMES = {"wall_s": "time", "flops": "flops"}
VAL_LOSS = "val_loss"  # the teacher-forced validation loss rows (lower is better)
# The default target's share of the gap from the start to the other reference seeds' best, and the
# grid's end. Near the best, the judged reference seed often misses a target set by its peers, and
# the pairs that do complete are a biased selection (the reference's seeds that reach are those
# that plateau late): in tests/test_targets.py's no_difference_study (two methods that do not
# differ, 400 experiments) the pairs complete in 99.5% of them at 0.8 with no bias, in 76% at 0.9
# (+0.015 in log speed-up), in 25% at 0.95 (+0.095). docs/costs.md.
TARGET_LEVEL = 0.8
GRID_END = 0.9
GRID_POINTS = 20
GRID_START = 0.1  # the grid starts 10% of the gap above the start: below it every method is there at once

Point = tuple[float, float, float]


def split_metric(metric: str) -> tuple[str, str]:
    """"caption.CIDEr" -> ("caption", "CIDEr"); anything else is a ValueError (configs call it too)."""
    if metric == VAL_LOSS:
        return VAL_LOSS, "loss"
    task, dot, key = metric.partition(".")
    if not dot or not task or not key:
        raise ValueError(f"metric must be task.key (e.g. caption.CIDEr) or {VAL_LOSS}, got '{metric}'")
    return task, key


def direction(metric: str) -> float:
    """+1 for a metric to maximise, -1 for a loss: values times this are always 'higher is better'."""
    return -1.0 if metric == VAL_LOSS else 1.0


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _cost(row: dict, name: str) -> float:
    value = _finite_number(row.get(name))
    if value is None:
        raise ValueError(f"validation row at step {row.get('step')!r} has no finite {name!r}")
    return value


def _value(row: dict, metric: str) -> float | None:
    if metric == VAL_LOSS:
        return _finite_number(row.get(VAL_LOSS))
    if "eval" not in row or row.get("split") != "val" or not isinstance(row["eval"], dict):
        return None
    task, key = split_metric(metric)
    scores = row["eval"].get(task)
    return _finite_number(scores.get(key)) if isinstance(scores, dict) else None


def curve(rows: list[dict], metric: str) -> list[Point]:
    """(wall_s, flops, value) of the rows that measured `metric` on validation data, one per step
    (the first row of a step), in order."""
    split_metric(metric)
    points: list[Point] = []
    steps = set()
    for row in rows:
        value = _value(row, metric)
        if value is None or row.get("step") in steps:
            continue
        steps.add(row.get("step"))
        points.append((_cost(row, "wall_s"), _cost(row, "flops"), value))
    return points


def monotone(values: list[float]) -> list[float]:
    """The non-decreasing least-squares fit of `values` (isotonic regression, pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks.pop(-2), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]


def fitted(points: list[Point], sign: float = 1.0) -> list[Point]:
    """The curve with its values replaced by their monotone fit, oriented so higher is better."""
    values = monotone([sign * p[2] for p in points])
    return [(p[0], p[1], v) for p, v in zip(points, values)]


def first_reach(points: list[Point], target: float, axis: str, sign: float = 1.0) -> float | None:
    """Cost on `axis` at which the curve's monotone fit first reaches `target` (interpolated on the
    value); None if it never does. `sign` -1: a loss, reached when at or below the target."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {sorted(AXES)}, got {axis!r}")
    return _crossing(fitted(points, sign), sign * target, AXES[axis])


def _crossing(fit: list[Point], goal: float, i: int) -> float | None:
    """first_reach on a curve already fitted and oriented (its values higher-is-better)."""
    previous: Point | None = None
    for point in fit:
        if point[2] >= goal:
            if previous is None:
                return float(point[i])
            c0, v0, c1, v1 = previous[i], previous[2], point[i], point[2]  # v0 < goal <= v1
            return float(c0 + (goal - v0) / (v1 - v0) * (c1 - c0))
        previous = point
    return None


# ----------------------------------------------------------------------------- runs and targets


def _runs_by_method(records: list[dict]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for record in records:
        if record.get("status") == "finished":
            runs.setdefault(record["method"], []).append(record)
    return runs


def _curves(runs: list[dict], rows_by_run: dict[str, list[dict]], metric: str) -> dict[int, list[Point]]:
    """{seed: curve} of one method's finished runs."""
    missing = [r["run_id"] for r in runs if r["run_id"] not in rows_by_run]
    if missing:
        raise ValueError(f"no metrics rows for finished run(s): {', '.join(map(str, missing))}")
    out: dict[int, list[Point]] = {}
    first: dict[int, str] = {}
    for i, r in enumerate(runs):
        seed = r.get("seed", i)
        if seed in out:
            raise ValueError(f"two finished runs of {r['method']!r} with seed {seed} ({first[seed]} and "
                             f"{r['run_id']}): seeds pair the methods' runs, so pass one of them")
        out[seed], first[seed] = curve(rows_by_run[r["run_id"]], metric), str(r["run_id"])
    return out


def _floor(runs: list[dict], metric: str) -> float | None:
    if metric == VAL_LOSS:
        return None
    task, key = split_metric(metric)
    floors = [_finite_number(r.get("metrics", {}).get(task, {}).get("floor", {}).get(key)) for r in runs]
    floors = [f for f in floors if f is not None]
    return float(np.mean(floors)) if floors else None


def _levels(ref_curves: dict[int, list[Point]], runs: list[dict], metric: str) -> dict[int, tuple[float, float]]:
    """{reference seed: (start, best)}, oriented so higher is better: the best fitted value, and
    the task's floor (or, without one or when the reference never beat it, the seed's first fitted
    value)."""
    sign = direction(metric)
    empty = [str(s) for s, p in ref_curves.items() if not p]
    if empty:
        raise ValueError(f"cannot set targets: reference seed(s) {', '.join(empty)} have no validation "
                         f"points of {metric!r}")
    fits = {s: fitted(p, sign) for s, p in ref_curves.items()}
    floor = _floor(runs, metric)
    use_floor = floor is not None and sign * floor < min(f[-1][2] for f in fits.values())
    return {s: (sign * floor if use_floor else f[0][2], f[-1][2]) for s, f in fits.items()}


def seed_levels(levels: dict[int, tuple[float, float]],
                seeds: set[int]) -> tuple[dict[int, tuple[float, float]], str]:
    """Each judged seed's (start, best), cross-fitted: the mean over the *other* reference seeds
    (all of them for a seed the reference lacks); the one reference seed's own when it is alone."""
    def mean(ref_seeds) -> tuple[float, float]:
        return (float(np.mean([levels[r][0] for r in ref_seeds])), float(np.mean([levels[r][1] for r in ref_seeds])))

    if len(levels) == 1:
        return {s: mean(levels) for s in seeds}, "own run (one reference seed)"
    return ({s: mean([r for r in levels if r != s]) for s in seeds},
            "cross-fitted from the other reference seeds")


def at_fraction(levels: dict[int, tuple[float, float]], fraction: float, sign: float) -> dict[int, float]:
    """{seed: the target (real units) `fraction` of the way from its start to its best}."""
    return {s: sign * (lo + fraction * (hi - lo)) for s, (lo, hi) in levels.items()}


def grid_fractions(levels: dict[int, tuple[float, float]], points: int = GRID_POINTS) -> list[float]:
    """The grid's fractions of the start-to-best gap: GRID_START to GRID_END; none when the
    reference's best is not above its start."""
    if np.mean([hi - lo for lo, hi in levels.values()]) <= 0:
        return []
    return [float(f) for f in np.linspace(GRID_START, GRID_END, points)]


# ----------------------------------------------------------------------------- speed-ups


def _compare(ref: dict[int, float | None], other: dict[int, float | None], level: float) -> dict:
    """The paired speed-up of `other` over `ref` at one target, from {seed: cost or None}."""
    pairs = sorted(set(ref) & set(other))
    out = {"reached": sum(other[s] is not None for s in other), "seeds": len(other),
           "ref_reached": sum(ref[s] is not None for s in pairs)}
    if not pairs:
        return {**out, "verdict": "no paired seeds"}
    if out["reached"] == 0 and out["ref_reached"] == len(pairs):
        return {**out, "verdict": "not reached"}
    if any(ref[s] is None or other[s] is None for s in pairs):
        return {**out, "verdict": "incomplete"}
    if any(ref[s] == 0 or other[s] == 0 for s in pairs):
        return {**out, "verdict": "reached untrained"}
    return {**out, **paired_speedup([ref[s] for s in pairs], [other[s] for s in pairs], level)}


def _costs(fits: dict[int, list[Point]], targets: dict[int, float], axis: str,
           sign: float) -> dict[int, float | None]:
    """{seed: cost to its target} from the seeds' fitted curves (`fitted(points, sign)`)."""
    return {s: _crossing(fit, sign * targets[s], AXES[axis]) for s, fit in fits.items()}


def _cost_summary(per_seed: dict[int, float | None]) -> dict:
    values = list(per_seed.values())
    complete = bool(values) and all(c is not None for c in values)
    return {"mean": float(np.mean(values)) if complete else None, "per_seed": values, "seeds": list(per_seed)}


def speedup_curve(curves: dict[str, dict[int, list[Point]]], reference: str, levels: dict[int, tuple[float, float]],
                  fractions: list[float], sign: float, level: float, axes: tuple[str, ...]) -> dict:
    """{method: {"time": [...], "flops": [...]}}: the paired comparison at each grid fraction, each
    seed at its own cross-fitted target there."""
    out = {method: {"time": [], "flops": []} for method in curves if method != reference}
    for axis in axes:
        for f in fractions:
            targets = at_fraction(levels, f, sign)
            ref = _costs(curves[reference], targets, axis, sign)  # once per target, for every method
            for method, entries in out.items():
                entry = _compare(ref, _costs(curves[method], targets, axis, sign), level)
                entries[AXIS_NAMES[axis]].append({"target": _mean_target(targets), "fraction": f, **entry})
    return out


def _mean_target(targets: dict[int, float]) -> float:
    return float(np.mean(list(targets.values())))


def _method_entry(curves: dict[int, list[Point]], targets: dict[int, float], ref: dict[str, dict], sign: float,
                  level: float, axes: tuple[str, ...]) -> dict:
    """One method at the headline targets: its costs per seed and its paired speed-ups (`ref`: the
    reference's costs per axis); an axis not counted (FLOPs with train.count_flops off) is None."""
    costs = {axis: _costs(curves, targets, axis, sign) for axis in axes}
    out = {"seeds": len(curves), "reached": sum(c is not None for c in costs["wall_s"].values())}
    for axis, (cost_key, speed_key) in {"wall_s": ("time_to_target_s", "time_speedup"),
                                        "flops": ("flops_to_target", "flops_speedup")}.items():
        counted = axis in costs
        out[cost_key] = _cost_summary(costs[axis]) if counted else None
        out[speed_key] = _speedup(ref[axis], costs[axis], level) if counted else None
    return out


def _speedup(ref: dict, other: dict, level: float) -> dict | None:
    """The headline speed-up entry, or None where it has no number (not reached, reached untrained,
    no paired seeds)."""
    result = _compare(ref, other, level)
    return result if "value" in result else None


def speedups(records: list[dict], rows_by_run: dict[str, list[dict]], metric: str,
             target: float | None = None, reference: str | None = None) -> dict:
    """Time- and FLOPs-to-target of every method's finished runs, the paired speed-ups over the
    reference with their verdicts, and the speed-up curve over the target grid. Methods with no
    validation point of `metric` at all (none logged) are listed under `no_points`, not judged."""
    split_metric(metric)
    if reference is None:
        if not records:
            raise ValueError("no run records")
        reference = records[0]["method"]
    runs = _runs_by_method(records)
    if reference not in runs:
        raise ValueError(f"reference method {reference!r} has no finished run "
                         f"(methods with finished runs: {', '.join(runs) or 'none'})")
    sign = direction(metric)
    curves = {method: _curves(method_runs, rows_by_run, metric) for method, method_runs in runs.items()}
    levels = _levels(curves[reference], runs[reference], metric)
    no_points = [m for m, c in curves.items() if m != reference and not any(c.values())]
    curves = {m: c for m, c in curves.items() if m not in no_points}
    seed_level, source = seed_levels(levels, {s for c in curves.values() for s in c})
    if target is None:
        targets = at_fraction(seed_level, TARGET_LEVEL, sign)
    elif _finite_number(target) is None:
        raise ValueError(f"target must be a finite number, got {target!r}")
    else:
        targets, source = {s: float(target) for s in seed_level}, "given"
    # FLOPs all zero: not counted (train.count_flops off), never "reached untrained"
    flops_counted = any(p[1] > 0 for c in curves.values() for points in c.values() for p in points)
    curves = {m: {s: fitted(points, sign) for s, points in c.items()} for m, c in curves.items()}  # fitted once
    axes = ("wall_s", "flops") if flops_counted else ("wall_s",)
    level = corrected_level(len(curves) - 1)
    ref = {axis: _costs(curves[reference], targets, axis, sign) for axis in axes}
    methods = {m: _method_entry(c, targets, ref, sign, level, axes) for m, c in curves.items()}
    fractions = grid_fractions(seed_level)
    return {"metric": metric, "higher_is_better": sign > 0,
            "target": float(target) if source == "given" else _mean_target(targets),
            "targets_per_seed": {str(s): t for s, t in sorted(targets.items())}, "target_source": source,
            "reference": reference, "level": LEVEL, "pair_level": level, "flops_counted": flops_counted,
            "floor": sign * float(np.mean([lo for lo, _ in seed_level.values()])),
            "methods": methods, "no_points": no_points,
            "curve": {"fractions": fractions,
                      "targets": [_mean_target(at_fraction(seed_level, f, sign)) for f in fractions],
                      "methods": speedup_curve(curves, reference, seed_level, fractions, sign, level, axes)}}
