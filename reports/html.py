"""The HTML speed-up report: one self-contained file (plots and pictures embedded as data: URIs, no
script, no fetch), a pure function of result files, so it can be regenerated, or re-scored with
another target, without re-training. `vlp-bench report` writes it; `vlp-bench run` writes one into
its experiment directory; `vlp-bench search` writes one of its study.

This module is the page: it assembles the sections (the headline, the tables, the figures, the
runs' settings) and renders templates/report.html.j2. Runs are loaded and their numbers read and
formatted in summary.py; the plots and pictures are drawn in figures.py.

Inputs per run directory: results.json, metrics.jsonl (the learning curves), samples_caption.jsonl
(the captions shown) and token_groups.json (what merging did, methods that merge only). Per
experiment directory: flops-paper.json (`vlp-bench flops --preset paper --json`), when present.
Everything a user can name (methods, config values, captions) reaches the page through Jinja2's
autoescaping or pandas' HTML escaping, so it is shown as text, never run as markup."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from vlp_bench.errors import UserError
from vlp_bench.files import atomic_write_text
from vlp_bench.metrics.targets import VAL_LOSS
from vlp_bench.metrics.verdicts import FASTER, POINT, SLOWER
from vlp_bench.reports.figures import (curve_figures, merge_pictures, palette, pareto_figure, search_figure,
                                       speedup_figure)
from vlp_bench.reports.summary import (Run, by_method, captioning, compute_speedups, cost_text, describe_curve,
                                       extra_evaluations, flops_units, format_mean_sd, format_ratio, load_runs,
                                       loss_speedups, mean_sd, metric_label, metric_text, metric_value, protocol,
                                       run_metric, used_feature_cache, verdict)

TEMPLATES = Path(__file__).parent / "templates"


# ----------------------------------------------------------------------------- the top of the page


def headline(runs: list[Run], sp: dict | None, metric: str, lsp: dict | None = None) -> dict:
    """What was compared and, for each method against the reference, the verdict at the headline
    target and where over the target grid it is faster, slower or not distinguishable (`lsp`: the
    same on the validation loss, when the runs logged it)."""
    groups = by_method(runs)
    finished = {m: [r for r in rs if r.finished] for m, rs in groups.items()}
    quality = {m: mean_sd([metric_value(r.rec, metric) for r in rs])[0] for m, rs in finished.items()}
    quality = {m: q for m, q in quality.items() if q is not None}
    seeds = sorted({len(rs) for rs in groups.values()})
    out = {"methods": list(groups), "seeds": "/".join(map(str, seeds)), "metric": metric,
           "failed": [r.dir.name for r in runs if not r.finished],
           "best_quality": max(quality, key=quality.get) if quality else None,
           "best_quality_value": max(quality.values()) if quality else None,
           "floor": next((metric_value(r.rec, metric, floor=True) for rs in finished.values() for r in rs), None)}
    if sp:
        ref = sp["reference"]
        per_seed = sp["targets_per_seed"]
        source = sp["target_source"] if len(set(per_seed.values())) < 2 else (
            f"the mean of the per-seed targets, {sp['target_source']}: "
            + ", ".join(f"seed {seed} {t:.4g}" for seed, t in per_seed.items()))
        out.update(reference=ref, target=sp["target"], compare="≥" if sp["higher_is_better"] else "≤",
                   target_source=source, pair_level=f"{sp['pair_level'] * 100:.4g}%",
                   level=f"{sp['level']:.0%}", compared=len(sp["methods"]) - 1,
                   not_reached=[m for m, s in sp["methods"].items() if s["reached"] < s["seeds"]],
                   comparisons=[comparison(sp, m, lsp) for m in sp["methods"] if m != ref])
    return out


def no_ratio(sp: dict, method: str, cost: str = "time_to_target_s") -> str:
    """Why a method has no speed-up at the headline target (`cost`: the per-seed costs to look at)."""
    m, ref = sp["methods"][method], sp["methods"][sp["reference"]]
    if m[cost] is None:
        return "FLOPs not counted (train.count_flops off)"
    if m["reached"] == 0:
        return "not reached"
    if m["reached"] < m["seeds"]:
        return f"not reached in every seed ({m['reached']}/{m['seeds']})"
    if ref["reached"] < ref["seeds"]:
        return f"{sp['reference']} not reached in every seed"
    if 0 in m[cost]["per_seed"] or 0 in ref[cost]["per_seed"]:
        return "reached untrained (met at step 0)"
    return "no paired seeds"


def verdict_text(sp: dict, method: str, key: str = "time_speedup") -> str:
    """A method's verdict at the headline target: faster, slower, no detectable difference (with the
    seeds a decision needs), one seed's labelled point estimate, or why there is no speed-up."""
    s = sp["methods"][method][key]
    if method == sp["reference"]:
        return "-"
    if s is None:
        return no_ratio(sp, method, "time_to_target_s" if key == "time_speedup" else "flops_to_target")
    return "one seed: point estimate, no verdict" if s["verdict"] == POINT else verdict(s)


def comparison(sp: dict, method: str, lsp: dict | None = None) -> dict:
    """One method against the reference, for its card at the top of the page."""
    m = sp["methods"][method]
    time = m["time_speedup"]
    kind = "warn" if time is None else {FASTER: "win", SLOWER: "warn"}.get(time["verdict"], "")
    out = {"method": method, "time": None if time is None else format_ratio(time), "kind": kind,
           "verdict": verdict_text(sp, method) + (": no speed-up at this target" if time is None else ""),
           "flops": format_ratio(m["flops_speedup"]),
           "flops_verdict": verdict_text(sp, method, "flops_speedup"),
           "curve": describe_curve(sp["curve"]["methods"].get(method, {}).get("time", []), sp["metric"]),
           "loss_curve": None}
    if lsp and method in lsp["curve"]["methods"]:
        out["loss_curve"] = describe_curve(lsp["curve"]["methods"][method]["time"], "validation loss")
    return out


def floors(runs: list[Run]) -> dict:
    """The trivial floors of the test sets: the best constant caption and its CIDEr; VQA accuracy
    of the best constant answer per question type (None where the task did not run)."""
    for r in runs:
        m = r.rec.get("metrics", {})
        if r.finished and m:
            cap, vqa = captioning(m).get("floor", {}), m.get("vqa", {}).get("floor", {})
            return {"caption": cap.get("caption"), "CIDEr": cap.get("CIDEr"), "vqa": vqa.get("overall")}
    return {"caption": None, "CIDEr": None, "vqa": None}


# ----------------------------------------------------------------------------- tables


def styled(frame: pd.DataFrame, uid: str) -> str:
    """A pandas-styled table with every value and header HTML-escaped (user names stay text); "not
    reached" and the verdicts "slower" in red, "faster" in green."""
    def cell_style(v):
        if isinstance(v, str) and v.startswith(("not reached", SLOWER)):
            return "color:#a33"
        return "color:#276b27;font-weight:600" if v == FASTER else ""

    style = (frame.style.hide(axis="index").format(escape="html").format_index(escape="html", axis=1)
             .map(cell_style).set_uuid(uid).set_table_attributes('class="table"'))
    return style.to_html()


def method_table(runs: list[Run], sp: dict | None, metric: str) -> pd.DataFrame:
    """One row per method: quality with its spread over seeds, time- and FLOPs-to-target with the
    speed-ups and their verdicts, costs."""
    task, _, key = metric.partition(".")
    ci = f"{sp['pair_level'] * 100:.4g}% CI" if sp else "CI"
    rows = []
    for method, all_runs in by_method(runs).items():
        done = [r for r in all_runs if r.finished]
        cost = [r.rec.get("cost", {}) for r in done]
        s = (sp or {}).get("methods", {}).get(method)
        peak = mean_sd([c.get("peak_memory_bytes") for c in cost])[0]
        per_sample = mean_sd([c.get("train_flops_per_sample") for c in cost])[0]
        tokens = sorted({c.get("tokens_to_llm") for c in cost} - {None})
        rows.append({
            "method": method,
            "runs finished": f"{len(done)}/{len(all_runs)}",
            f"{key} ({task}, test)": format_mean_sd([metric_value(r.rec, metric) for r in done], ".3f"),
            "VQA acc. % (test)": format_mean_sd([metric_value(r.rec, "vqa.overall") for r in done], ".2f"),
            "VQA protocol": " / ".join(sorted({p for r in done if (p := protocol(r.rec))})) or "-",
            "reached target": "-" if s is None else f"{s['reached']}/{s['seeds']}",
            "time to target (s)": "-" if s is None else cost_text(s["time_to_target_s"], 1, ".1f"),
            f"time speed-up [{ci}]": "-" if s is None else format_ratio(s["time_speedup"]),
            "time verdict": "-" if s is None else verdict_text(sp, method),
            "FLOPs to target (TFLOP)": "-" if s is None else cost_text(s["flops_to_target"], 1e12, ".3f"),
            f"FLOPs speed-up [{ci}]": "-" if s is None else format_ratio(s["flops_speedup"]),
            "FLOPs verdict": "-" if s is None else verdict_text(sp, method, "flops_speedup"),
            "tokens to LLM": "/".join(map(str, tokens)) or "-",
            "GFLOP / train sample": "-" if per_sample is None else f"{per_sample / 1e9:.3f}",
            "train time (s)": format_mean_sd([c.get("train_wall_s") for c in cost], ".1f"),
            "peak memory (MiB)": "-" if peak is None else f"{peak / 2**20:.0f}",
        })
    return pd.DataFrame(rows)


def subset_table(runs: list[Run], metric: str) -> pd.DataFrame | None:
    """The metric on each scored subset of the metric's task (video captioning's categories, and
    its "temporal" and "static" clips), mean +- sd over seeds; None when the task scored none."""
    task, _, key = metric.partition(".")
    names: dict[str, int] = {}
    for r in runs:
        for name, s in r.rec.get("metrics", {}).get(task, {}).get("subsets", {}).items():
            names.setdefault(name, s.get("images"))
    if not names:
        return None
    order = sorted(names, key=lambda n: (n not in ("temporal", "static"), n))  # the two groups first
    rows = []
    for method, all_runs in by_method(runs).items():
        done = [r for r in all_runs if r.finished]
        row = {"method": method, f"{key} (all)": format_mean_sd([metric_value(r.rec, metric) for r in done], ".3f")}
        for name in order:
            values = [r.rec["metrics"][task].get("subsets", {}).get(name, {}).get(key) for r in done]
            row[f"{name} ({names[name]})"] = format_mean_sd(values, ".3f")
        said = [r.rec["metrics"][task].get("order", {}).get("temporal") for r in done]
        if any(v is not None for v in said):  # the tiny world: captions that state the event the right way round
            row["order right (temporal)"] = format_mean_sd(said, ".2f")
        rows.append(row)
    return pd.DataFrame(rows)


def paper_table(table: dict) -> pd.DataFrame:
    """A `vlp-bench flops --json` table as GFLOP per training sample by part and pass, and each method's
    cost ratio to the table's reference method (tables written before it was named: the baseline)."""
    reference = table.get("reference", "baseline")
    rows = []
    for name, m in table["methods"].items():
        part = lambda p, d: m["per_sample"].get(p, {}).get(d, 0.0) / 1e9  # noqa: E731
        rows.append({"method": name, "tokens to LLM": m["tokens_to_llm"], "vision fwd": f"{part('vision', 'forward'):.4g}",
                     "bridge fwd": f"{part('bridge', 'forward'):.4g}", "bridge bwd": f"{part('bridge', 'backward'):.4g}",
                     "LLM fwd": f"{part('llm', 'forward'):.4g}", "LLM bwd": f"{part('llm', 'backward'):.4g}",
                     "total": f"{m['total'] / 1e9:.4g}", f"{reference} / method": f"{m.get('ratio_to_reference', m.get('ratio_to_baseline')):.2f}x"})
    return pd.DataFrame(rows)


def paper_section(path: Path, uid: str) -> dict:
    """One `vlp-bench flops --json` file (flops-paper.json): its table, the methods it could not cost
    and its settings (preset, unit, sizes) for the note under it."""
    try:
        table = json.loads(Path(path).read_text())
        return {"file": Path(path).name, "table": styled(paper_table(table), uid),
                "skipped": table.get("skipped", {}), "meta": table}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # ValueError: JSON, UTF-8
        raise UserError(f"{path}: not a `vlp-bench flops --json` table ({type(e).__name__}: {e})") from None


def environment(runs: list[Run]) -> list[tuple[str, str]]:
    """Device, library versions and git commit; a field that differs across runs lists each value."""
    def values(get):
        return ", ".join(dict.fromkeys(str(get(r.rec.get("env", {}))) for r in runs))

    rows = [(k, values(lambda e, k=k: e.get(k))) for k in
            ("device", "device_name", "torch_threads", "python", "platform", "git_commit")]
    names = dict.fromkeys(k for r in runs for k in r.rec.get("env", {}).get("versions", {}))
    rows += [(k, values(lambda e, k=k: e.get("versions", {}).get(k))) for k in names]
    return rows


# ----------------------------------------------------------------------------- search


def ledger_section(path: Path) -> dict:
    """A claims ledger (claims.json of `vlp-bench claims`): its claims, one row per world."""
    from vlp_bench.reports.claims_text import page_rows

    try:
        result = json.loads(Path(path).read_text())
        return {"file": str(path), "level": result["level"], "settings": result["settings"],
                "claims": page_rows(result), "sweep": result.get("sweep", [])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a `vlp-bench claims` ledger ({type(e).__name__}: {e})") from None


def search_section(path: Path, uid: str = "search") -> dict:
    """A `vlp-bench search` study (its search.json): the trials against their cost with the Pareto
    front (or the best trial), the front's settings, parameter importances."""
    try:
        summary = json.loads(Path(path).read_text())
        trials, metric, mode = summary["trials"], summary["metric"], summary["mode"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a `vlp-bench search` summary ({type(e).__name__}: {e})") from None
    done = [t for t in trials if t["state"] == "COMPLETE"]
    best = set(summary.get("best", []))
    rows = []
    for t in sorted(done, key=lambda t: t["user_attrs"].get("train_flops", 0)):
        a = t["user_attrs"]
        rows.append({"trial": t["number"], "on front" if mode == "pareto" else "best": "yes" if t["number"] in best else "",
                     **{k: (f"{v:.3g}" if isinstance(v, float) else str(v)) for k, v in t["params"].items()},
                     "tokens to LLM": a.get("tokens_to_llm"), f"{metric} (val)": f"{t['values'][0]:.3f}",
                     f"{metric} (test)": f"{a.get('test_' + metric, float('nan')):.3f}",
                     "train TFLOP": f"{a.get('train_flops', 0) / 1e12:.3f}", "train s": f"{a.get('train_wall_s', 0):.1f}"})
    figure = search_figure(done, best, mode, metric) if done else None
    states: dict[str, int] = {}
    for t in trials:
        states[t["state"]] = states.get(t["state"], 0) + 1
    return {"file": str(path), "study": summary.get("study"), "mode": mode, "metric": metric, "states": states,
            "figure": figure, "table": styled(pd.DataFrame(rows), uid) if rows else "",
            "importances": sorted(summary.get("importances", {}).items(), key=lambda kv: -kv[1]),
            "wall_s": summary.get("wall_s_this_worker")}


# ----------------------------------------------------------------------------- the page


def quality_metric(runs: list[Run], metric: str) -> str:
    """The metric of the quality columns and plots: the target metric, or, when the target is the
    validation loss (no final test value), the task metric the runs' search maximises."""
    if metric != VAL_LOSS:
        return metric
    return next((m for r in runs if (m := r.rec.get("config", {}).get("search", {}).get("metric"))), "caption.CIDEr")


def render(dirs: list[Path], metric: str = "", target: float | None = None,
           reference: str | None = None, flops_files: list[Path] = (), strict: bool = False,
           searches: list[Path] = (), ledgers: list[Path] = ()) -> str:
    """The report's HTML for these run directories. Speed-ups that cannot be computed (no curve, no
    finished reference) are a note on the page, or with `strict` (a target the user asked for) an error."""
    import jinja2

    runs = load_runs(dirs)
    metric = metric or run_metric([r.rec for r in runs])  # "" = the metric the runs were configured with
    try:
        sp, sp_error = (compute_speedups([r.dir for r in runs], [r.rec for r in runs], metric, target, reference)
                        if runs else None), None
    except UserError as e:
        if strict:
            raise
        sp, sp_error = None, str(e)
    quality = quality_metric(runs, metric)
    qsp = None if metric == VAL_LOSS else sp  # the speed-ups on the quality metric
    lsp = sp if metric == VAL_LOSS else (  # and on the validation loss, when logged
        loss_speedups([r.dir for r in runs], [r.rec for r in runs], sp["reference"] if sp else reference)
        if runs else None)
    uncached = (compute_speedups([r.dir for r in runs], [r.rec for r in runs], sp["metric"], target, sp["reference"],
                                 uncached=True) if sp and used_feature_cache([r.rec for r in runs]) else None)
    colors = palette(list(by_method(runs)))
    head = headline(runs, sp, quality, None if lsp is sp else lsp)
    label = metric_label([r.rec for r in runs], quality)  # a VQA metric says zero-shot or fine-tuned
    speedup_figures = [f for f in (qsp and speedup_figure(qsp, colors, f"validation {label}"),
                                   lsp and speedup_figure(lsp, colors, "validation loss (lower is better)")) if f]
    paper = [paper_section(path, f"paper{k}") for k, path in enumerate(flops_files)]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(
        title="vlp-bench report", generated=time.strftime("%Y-%m-%d %H:%M %Z"), head=head, sp=sp,
        sp_error=sp_error, metric=label, floors=floors(runs), flops_units=flops_units([r.rec for r in runs]),
        speedups=styled(method_table(runs, sp, quality), "speedups"), speedup_figures=speedup_figures,
        uncached=uncached and styled(method_table(runs, uncached, quality), "uncached"),
        subsets=None if (subsets := subset_table(runs, quality)) is None else styled(subsets, "subsets"),
        curves=curve_figures(runs, quality, qsp and qsp["target"], colors, lsp and lsp["target"]),
        pareto=pareto_figure(runs, quality, colors), merges=merge_pictures(runs), paper=paper,
        searches=[search_section(p, f"search{k}") for k, p in enumerate(searches)],
        ledgers=[ledger_section(p) for p in ledgers],
        extra=[{**e, "settings": " ".join(e["overrides"]) or "as run", "values": metric_text(e["metrics"])}
               for e in extra_evaluations([r.dir for r in runs])],
        failed=[{"run": r.dir.name, "status": r.rec.get("status"), "error": r.rec.get("error", "")}
                for r in runs if not r.finished],
        env=environment(runs),
        runs=[{"name": r.dir.name, "dir": str(r.dir), "config": json.dumps(r.rec.get("config", {}), indent=2),
               "info": json.dumps(r.rec.get("method_info", {}))} for r in runs])


def write(dirs: list[Path], out: Path, **kwargs) -> Path:
    """render() into `out`, written to a temporary name and renamed: a reader never sees half a page."""
    html = render(dirs, **kwargs)
    out = Path(out)
    try:
        atomic_write_text(out, html)
    except OSError as e:
        raise UserError(f"cannot write the report to {out}: {e.strerror or e}") from None
    return out
