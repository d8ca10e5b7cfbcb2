"""Runs' result files, read and reduced to numbers, and the plain-text tables printed at the end of
`vlp-bench run` and by `vlp-bench summary` (quality and cost per run, then time- and FLOPs-to-target
per method). The HTML report (html.py, figures.py) loads runs and reads, averages and formats their
numbers through the helpers here, so the page and the text tables read a metric, a speed-up or a
spread over seeds one way. A pure function of the result files (results.json and metrics.jsonl), so
it can be recomputed with another target without re-training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlp_bench.errors import UserError
from vlp_bench.log import text_table
from vlp_bench.results import READABLE_VERSIONS
from vlp_bench.files import read_jsonl
from vlp_bench.metrics.targets import VAL_LOSS, speedups


# ----------------------------------------------------------------------------- result files


def run_dirs(paths) -> list[Path]:
    """Run directories from run directories and/or experiment directories (which hold runs)."""
    out = []
    for p in map(Path, paths):
        if (p / "results.json").is_file():
            out.append(p)
        elif p.is_dir() and (inner := sorted(d for d in p.iterdir() if (d / "results.json").is_file())):
            out.extend(inner)
        else:
            raise UserError(f"{p}: not a run directory (no results.json) nor an experiment directory holding runs")
    return out


def load_results(run_dirs) -> list[dict]:
    out = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise UserError(f"no results.json in {d} (run not finished, or not a run directory)")
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON: {e}") from None
        if rec.get("schema_version") not in READABLE_VERSIONS:
            raise UserError(f"{path}: schema_version {rec.get('schema_version')} is not one this vlp-bench "
                            f"reads {READABLE_VERSIONS}")
        out.append(rec)
    return out


def metrics_rows(run_dir) -> list[dict]:
    """A run's metrics.jsonl (its learning curves); [] when it has none (e.g. a run that failed early)."""
    path = Path(run_dir) / "metrics.jsonl"
    return read_jsonl(path) if path.is_file() else []


@dataclass
class Run:
    """One run directory as the report reads it: its record and its logged rows."""

    dir: Path
    rec: dict  # results.json
    rows: list[dict]  # metrics.jsonl

    @property
    def method(self) -> str:
        return self.rec["method"]

    @property
    def finished(self) -> bool:
        return self.rec.get("status") == "finished"

    def file(self, name: str) -> Path | None:
        """A file of the run directory, or None when the run did not write it."""
        path = self.dir / name
        return path if path.is_file() else None


def extra_evaluations(run_dirs) -> list[dict]:
    """The evaluations made after the runs from their kept weights (`vlp-bench evaluate run`,
    RUN/evals/NAME/results.json), one entry per (evaluation, task): run, name, task, split, the
    settings it changed (`overrides`), its metrics."""
    out = []
    for d in map(Path, run_dirs):
        evals = d / "evals"
        for path in sorted(evals.glob("*/results.json")) if evals.is_dir() else []:
            rec = load_results([path.parent])[0]
            for task, metrics in rec.get("metrics", {}).items():
                out.append({"run": d.name, "dir": str(path.parent), "name": rec.get("name", path.parent.name),
                            "method": rec.get("method"), "seed": rec.get("seed"), "task": task,
                            "split": rec.get("splits", {}).get(task, metrics.get("split")),
                            "overrides": rec.get("overrides", []), "metrics": metrics})
    return out


def numeric(metrics: dict) -> dict:
    """A task's top-level numbers (its scores and counts; not its floor, subsets or labels)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def metric_text(metrics: dict) -> str:
    """A task's numeric metrics in one line ("CIDEr 0.8123, Bleu_4 0.2101, ..."), counts as integers."""
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in numeric(metrics).items())


def extra_table(extra: list[dict]) -> str:
    """The extra evaluations as a plain-text table."""
    rows = [[e["run"], e["name"], e["task"], e["split"] or "", " ".join(e["overrides"]) or "as run",
             metric_text(e["metrics"])] for e in extra]
    return text_table(["run", "evaluation", "task", "split", "settings", "metrics"], rows, left=6)


def load_runs(dirs: list[Path]) -> list[Run]:
    return [Run(Path(d), rec, metrics_rows(d)) for d, rec in zip(dirs, load_results(dirs))]


def by_method(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by method, methods in the order their first run came (the order of the page)."""
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.method, []).append(r)
    return out


# ----------------------------------------------------------------------------- numbers


def metric_value(rec: dict, metric: str, floor: bool = False):
    """A run's final value of task.key (or of its floor); None when absent."""
    task, _, key = metric.partition(".")
    values = rec.get("metrics", {}).get(task, {})
    value = (values.get("floor", {}) if floor else values).get(key)
    return value if isinstance(value, (int, float)) else None


def protocol(rec: dict, task: str = "vqa") -> str | None:
    """How a run met `task`: its metrics' "protocol", "zero-shot" or "fine-tuned (N steps)" (VQA
    records from before the label were zero-shot); None where the task has none."""
    values = rec.get("metrics", {}).get(task)
    if not isinstance(values, dict):
        return None
    return values.get("protocol", "zero-shot" if task == "vqa" else None)


def metric_label(recs: list[dict], metric: str) -> str:
    """`metric` as figures name it: with the protocols its runs met its task by, where it has them,
    e.g. "vqa.overall (fine-tuned (200 steps))"."""
    found = sorted({p for rec in recs if (p := protocol(rec, metric.partition(".")[0]))})
    return f"{metric} ({' / '.join(found)})" if found else metric


def mean_sd(values: list) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation over seeds, missing values left out; sd is None with one
    value (no spread to report) and both are None with none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def format_mean_sd(values: list, spec: str) -> str:
    """"0.512 ± 0.031" (mean ± sd over seeds), the mean alone for one seed, "-" for none."""
    mean, sd = mean_sd(values)
    if mean is None:
        return "-"
    return format(mean, spec) + ("" if sd is None else f" ± {format(sd, spec)}")


def flop_scale(value: float) -> tuple[float, str]:
    """The divisor and prefixed unit name (1e12, "TFLOP") that show `value` FLOPs in readable numbers."""
    for scale, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP")):
        if value >= scale:
            return scale, unit
    return 1e6, "MFLOP"


def flops_units(results: list[dict]) -> str:
    """The unit the runs' FLOPs are counted in, as their results.json say (cost.flops_unit, which the
    trainer writes from vlp_bench.train.flops.UNIT); runs that differ list each, "" when none counted
    FLOPs. Read from the files rather than spelt here, so the report states what the numbers were
    counted in (the report stays a pure function of the files, and needs no torch to import UNIT)."""
    return ", ".join(dict.fromkeys(u for r in results if (u := r.get("cost", {}).get("flops_unit"))))


def captioning(metrics: dict) -> dict:
    """The metrics of a run's captioning task: image captioning's, else the first other task
    scored with CIDEr (video captioning)."""
    return metrics.get("caption") or next((m for m in metrics.values() if isinstance(m, dict) and "CIDEr" in m), {})


def run_metric(results: list[dict]) -> str:
    """The target metric the runs were configured with (target.metric as resolved when they ran;
    caption.CIDEr for runs of older schemas without one)."""
    for r in results:
        if metric := r.get("config", {}).get("target", {}).get("metric"):
            return metric
    return "caption.CIDEr"


def compute_speedups(dirs: list[Path], results: list[dict], metric: str, target: float | None,
                     reference: str | None, uncached: bool = False) -> dict:
    """targets.speedups over these runs; runs are keyed by directory, so experiments can be mixed.
    `uncached`: on the costs a run without the feature cache would have spent (uncached_rows)."""
    records = [{**r, "run_id": str(d)} for d, r in zip(dirs, results)]
    metric = metric or run_metric(results)
    if reference is None and any(r["method"] == "baseline" for r in records):
        reference = "baseline"  # the method every acceleration claims to beat
    rows = {str(d): uncached_rows(metrics_rows(d)) if uncached else metrics_rows(d) for d in dirs}
    try:
        return speedups(records, rows, metric=metric, target=target, reference=reference)
    except ValueError as e:
        raise UserError(f"time-to-target: {e}") from None


def used_feature_cache(results: list[dict]) -> bool:
    """Whether a run kept its encoder tokens (data.feature_cache): its costs then differ both ways."""
    return any((r.get("cost", {}).get("feature_cache") or {}).get("used") for r in results)


def uncached_rows(rows: list[dict]) -> list[dict]:
    """A run's rows on the costs a run without the feature cache would have spent (every sample
    encoded: vlp_bench/train/features.py); rows of a run without a cache are as they are."""
    return [{**r, "wall_s": r["wall_s_without_cache"], "flops": r.get("flops_without_cache", r.get("flops"))}
            if "wall_s_without_cache" in r else r for r in rows]


def loss_speedups(dirs: list[Path], results: list[dict], reference: str | None) -> dict | None:
    """The same on the teacher-forced validation loss, when the reference logged it (else None)."""
    try:
        return compute_speedups(dirs, results, VAL_LOSS, None, reference)
    except UserError:
        return None  # the reference logged none (runs from before it, val_loss_images = 0, ...)


def format_ratio(s: dict | None) -> str:
    """A speed-up as 1.98x [1.06, 5.16] (its interval when there are seeds to have one)."""
    if s is None:
        return "-"
    ci = "" if s["ci_low"] is None else f" [{ratio(s['ci_low'])}, {ratio(s['ci_high'])}]"
    return f"{ratio(s['value'])}x{ci}"


def ratio(value: float) -> str:
    """A speed-up's number: 2 decimals, or 2 significant digits below 0.1 (0.017, never 0.00)."""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def verdict_ranges(entries: list[dict]) -> list[dict]:
    """Consecutive grid targets with the same verdict, as {verdict, from, to, low, high}: the range
    of targets and of the speed-ups there (None where there is no number)."""
    out: list[dict] = []
    for e in entries:
        if out and out[-1]["verdict"] == e["verdict"]:
            out[-1]["to"] = e["target"]
        else:
            out.append({"verdict": e["verdict"], "from": e["target"], "to": e["target"], "values": []})
        if "value" in e:
            out[-1]["values"].append(e["value"])
    for r in out:
        values = r.pop("values")
        r["low"], r["high"] = (min(values), max(values)) if values else (None, None)
    return out


def describe_curve(entries: list[dict], metric: str) -> str:
    """The speed-up curve in words: 'faster (1.6x-2.1x) at caption.CIDEr 0.29-0.61; not reached
    at 0.63-0.80' (one seed: point estimates, never a verdict)."""
    parts = []
    for r in verdict_ranges(entries):
        span = f"{r['from']:.4g}" if r["from"] == r["to"] else f"{r['from']:.4g}-{r['to']:.4g}"
        low, high = (None, None) if r["low"] is None else (ratio(r["low"]), ratio(r["high"]))
        values = "" if low is None else (f" ({low}x)" if low == high else f" ({low}x-{high}x)")
        parts.append(f"{r['verdict']}{values} at {span}")
    return f"{metric}: " + "; ".join(parts) if parts else f"{metric}: no targets (the reference never left its floor)"


# ----------------------------------------------------------------------------- text tables


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    return text_table(header, rows, left=len(header))


def summary_table(results: list[dict]) -> str:
    header = ["run", "status", "CIDEr", "floor", "x floor", "BLEU-4", "VQA %", "VQA as", "VQA floor", "tokens->LLM",
              "train s", "samples/s", "GFLOP/sample"]
    rows = []
    for r in results:
        cap = captioning(r.get("metrics", {}))
        floor = cap.get("floor", {}).get("CIDEr")
        cider = cap.get("CIDEr")
        vqa = r.get("metrics", {}).get("vqa", {})
        cost = r.get("cost", {})
        per_sample = cost.get("train_flops_per_sample")
        rows.append([
            r["run_id"], r["status"], _fmt(cider, ".3f"), _fmt(floor, ".3f"),
            _fmt(cider / floor if cider is not None and floor else None, ".2f"), _fmt(cap.get("Bleu_4"), ".3f"),
            _fmt(vqa.get("overall"), ".2f"), protocol(r) or "-", _fmt(vqa.get("floor", {}).get("overall"), ".2f"),
            _fmt(cost.get("tokens_to_llm"), "d"), _fmt(cost.get("train_wall_s"), ".1f"),
            _fmt(cost.get("samples_per_s"), ".1f"), _fmt(per_sample / 1e9 if per_sample else None, ".3f"),
        ])
    return _table(header, rows)


def speedup_table(sp: dict) -> str:
    """The headline target's table, then each method's speed-up curve over the target grid in words."""
    compare = ">=" if sp["higher_is_better"] else "<="
    one_seed = all(m["seeds"] <= 1 for m in sp["methods"].values())
    how = ("one seed: point estimates, no intervals or verdicts (--seeds 3 gives them)" if one_seed else
           f"paired over seeds, {sp['pair_level']:.1%} t intervals ({sp['level']:.0%} jointly over the methods)")
    lines = [f"target: {sp['metric']} {compare} {sp['target']:.4g} on the validation curve's monotone fit "
             f"({sp['target_source']}); speed-ups vs {sp['reference']}: {how}"]
    header = ["method", "reached", "time to target s", "time speed-up", "verdict", "TFLOP to target",
              "FLOPs speed-up", "verdict"]
    rows = []
    for name, m in sp["methods"].items():
        rows.append([name, f"{m['reached']}/{m['seeds']}", cost_text(m["time_to_target_s"], 1, ".1f"),
                     format_ratio(m["time_speedup"]), verdict(m["time_speedup"], name == sp["reference"]),
                     cost_text(m["flops_to_target"], 1e12, ".3f"), format_ratio(m["flops_speedup"]),
                     verdict(m["flops_speedup"], name == sp["reference"])])
    out = "\n".join(lines) + "\n" + _table(header, rows)
    if sp.get("no_points"):
        out += f"\nno validation points of {sp['metric']} (not judged): {', '.join(sp['no_points'])}"
    for name, axes in sp["curve"]["methods"].items():
        for axis, entries in axes.items():
            out += f"\n{name} vs {sp['reference']}, {axis} to target, {describe_curve(entries, sp['metric'])}"
    return out


def cost_text(cost: dict | None, scale: float, spec: str) -> str:
    """A method's mean cost to target in `scale` units, "not reached" (some seed did not), or "not
    counted" (None: FLOPs with train.count_flops off)."""
    if cost is None:
        return "not counted"
    return "not reached" if cost["mean"] is None else format(cost["mean"] / scale, spec)


def verdict(s: dict | None, reference: bool = False) -> str:
    """The verdict of one headline speed-up ("-" for the reference against itself or no number)."""
    if reference or s is None:
        return "-"
    needed = f" ({s['seeds_needed']} seeds to decide)" if s.get("seeds_needed") else ""
    return s["verdict"] + needed
