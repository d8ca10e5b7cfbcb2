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
between the two points around it; 0 if the first point already meets it ("reached untrained"); a
run that never gets there has no cost: "not reached", never a number.

**Targets are not drawn from the runs they judge.** A given `target` is used as it is. Otherwise
seed i's target is TARGET_LEVEL of the way from the floor to the best fitted value of the
*other* reference seeds (cross-fitted), so the reference's seed i is judged by the same number as
the method's seed i and neither helped set it. With a single reference seed there are no other
seeds: the target then comes from the run it judges, and says so (`target_source`).

**Speed-up curve.** The same rule over GRID_POINTS targets from the floor plus GRID_START of the
gap up to the lowest best fitted value among the reference's seeds (so every reference seed
reaches every grid target; above it the reference itself is not reliably there). Each point has
the paired speed-up, interval and verdict of vlp_bench.metrics.verdicts. The intervals are
pointwise; over the methods compared they are Bonferroni-corrected, so at each target the
verdicts of all methods hold jointly at 95%. Neighbouring targets are read off the same curves,
so their verdicts are strongly dependent: a range of targets where a method is faster is a run of
pointwise verdicts, not a simultaneous band.

The floor is the metric's floor as the runs' results give it (the task's answer-the-most-common
baseline, e.g. metrics.caption.floor.CIDEr), else (no floor, or a reference that never beat it) the
reference's fitted value at step 0.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import numpy as np

from vlp_bench.metrics.verdicts import LEVEL, corrected_level, paired_speedup

AXES = {"wall_s": 0, "flops": 1}
VAL_LOSS = "val_loss"  # the teacher-forced validation loss rows (lower is better)
TARGET_LEVEL = 0.9  # the default target's share of the floor-to-best gap: below the best, so noise
# between reference seeds does not leave one of them short of it
GRID_POINTS = 20
GRID_START = 0.1  # the grid starts 10% of the gap above the floor: below it every method is there at once

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
    i, goal = AXES[axis], sign * target
    previous: Point | None = None
    for point in fitted(points, sign):
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
    for i, r in enumerate(runs):
        seed = r.get("seed", i)
        if seed in out:
            raise ValueError(f"two finished runs of {r['method']!r} with seed {seed}: pass one of them")
        out[seed] = curve(rows_by_run[r["run_id"]], metric)
    return out


def _floor(runs: list[dict], metric: str) -> float | None:
    if metric == VAL_LOSS:
        return None
    task, key = split_metric(metric)
    floors = [_finite_number(r.get("metrics", {}).get(task, {}).get("floor", {}).get(key)) for r in runs]
    floors = [f for f in floors if f is not None]
    return float(np.mean(floors)) if floors else None


def _levels(ref_curves: dict[int, list[Point]], runs: list[dict], metric: str) -> tuple[float, dict[int, float]]:
    """(floor, {reference seed: best fitted value}), oriented so higher is better."""
    sign = direction(metric)
    empty = [str(s) for s, p in ref_curves.items() if not p]
    if empty:
        raise ValueError(f"cannot set targets: reference seed(s) {', '.join(empty)} have no validation "
                         f"points of {metric!r}")
    best = {s: fitted(p, sign)[-1][2] for s, p in ref_curves.items()}
    floor = _floor(runs, metric)
    if floor is not None and sign * floor < min(best.values()):
        return sign * floor, best
    # no floor, or a reference that never beat it (then the floor says nothing of where it starts)
    return float(np.mean([fitted(p, sign)[0][2] for p in ref_curves.values()])), best


def seed_targets(floor: float, best: dict[int, float], seeds: set[int], sign: float) -> tuple[dict[int, float], str]:
    """Each seed's default target (real units) and where it came from: cross-fitted from the other
    reference seeds, or the run's own reference seed when it is the only one."""
    def level(values: list[float]) -> float:
        return sign * (floor + TARGET_LEVEL * (float(np.mean(values)) - floor))

    if len(best) == 1:
        return {s: level(list(best.values())) for s in seeds}, "own run (one reference seed)"
    return ({s: level([b for r, b in best.items() if r != s]) for s in seeds},
            "cross-fitted from the other reference seeds")


def target_grid(floor: float, best: dict[int, float], sign: float, points: int = GRID_POINTS) -> list[float]:
    """GRID_POINTS targets (real units) from GRID_START of the gap above the floor to the lowest
    best fitted value of the reference's seeds."""
    top = min(best.values())
    if top <= floor:
        return []
    return [sign * v for v in np.linspace(floor + GRID_START * (top - floor), top, points)]


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


def _costs(curves: dict[int, list[Point]], targets: dict[int, float], axis: str,
           sign: float) -> dict[int, float | None]:
    return {s: first_reach(p, targets[s], axis, sign) for s, p in curves.items()}


def _cost_summary(per_seed: dict[int, float | None]) -> dict:
    values = list(per_seed.values())
    complete = bool(values) and all(c is not None for c in values)
    return {"mean": float(np.mean(values)) if complete else None, "per_seed": values, "seeds": list(per_seed)}


def speedup_curve(curves: dict[str, dict[int, list[Point]]], reference: str, grid: list[float], sign: float,
                  level: float) -> dict:
    """{method: {"time": [...], "flops": [...]}}: the paired comparison at each grid target."""
    out = {}
    for method, method_curves in curves.items():
        if method == reference:
            continue
        out[method] = {}
        for axis, name in (("wall_s", "time"), ("flops", "flops")):
            entries = []
            for t in grid:
                every = {s: t for s in set(method_curves) | set(curves[reference])}
                ref = _costs(curves[reference], every, axis, sign)
                entries.append({"target": t, **_compare(ref, _costs(method_curves, every, axis, sign), level)})
            out[method][name] = entries
    return out


def _method_entry(name: str, seeds: int, time: dict, flops: dict, ref_time: dict, ref_flops: dict,
                  level: float) -> dict:
    reached = sum(c is not None for c in time.values())
    return {"seeds": seeds, "reached": reached,
            "time_to_target_s": _cost_summary(time), "flops_to_target": _cost_summary(flops),
            "time_speedup": _speedup(ref_time, time, level), "flops_speedup": _speedup(ref_flops, flops, level)}


def _speedup(ref: dict, other: dict, level: float) -> dict | None:
    """The headline speed-up entry, or None where it has no number (not reached, reached untrained)."""
    result = _compare(ref, other, level)
    return result if "value" in result else None


def speedups(records: list[dict], rows_by_run: dict[str, list[dict]], metric: str,
             target: float | None = None, reference: str | None = None) -> dict:
    """Time- and FLOPs-to-target of every method's finished runs, the paired speed-ups over the
    reference with their verdicts, and the speed-up curve over the target grid."""
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
    floor, best = _levels(curves[reference], runs[reference], metric)
    seeds = {s for c in curves.values() for s in c}
    if target is None:
        targets, source = seed_targets(floor, best, seeds, sign)
    elif _finite_number(target) is None:
        raise ValueError(f"target must be a finite number, got {target!r}")
    else:
        targets, source = {s: float(target) for s in seeds}, "given"
    level = corrected_level(len(runs) - 1)
    ref_time = _costs(curves[reference], targets, "wall_s", sign)
    ref_flops = _costs(curves[reference], targets, "flops", sign)
    methods = {m: _method_entry(m, len(c), _costs(c, targets, "wall_s", sign), _costs(c, targets, "flops", sign),
                                ref_time, ref_flops, level)
               for m, c in curves.items()}
    grid = target_grid(floor, best, sign)
    mean_target = float(target) if source == "given" else float(np.mean(list(targets.values())))
    return {"metric": metric, "higher_is_better": sign > 0, "target": mean_target,
            "targets_per_seed": {str(s): t for s, t in sorted(targets.items())}, "target_source": source,
            "reference": reference, "level": LEVEL, "pair_level": level, "floor": sign * floor,
            "methods": methods,
            "curve": {"targets": grid, "methods": speedup_curve(curves, reference, grid, sign, level)}}
