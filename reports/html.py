"""The HTML speed-up report: one self-contained file (plots and pictures embedded as data: URIs, no
script, no fetch), a pure function of result files, so it can be regenerated, or re-scored with
another target, without re-training. `vlp-bench report` writes it; `vlp-bench run` writes one into
its experiment directory.

Inputs per run directory: results.json, metrics.jsonl (the learning curves), samples_caption.jsonl
(the captions shown) and token_groups.json (what merging did, methods that merge only). Per
experiment directory: flops-paper.json (`vlp-bench flops --preset paper --json`), when present.
Everything a user can name (methods, config values, captions) reaches the page through Jinja2's
autoescaping or pandas' HTML escaping, so it is shown as text, never run as markup."""

from __future__ import annotations

import base64
import io
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vlp_bench.errors import UserError
from vlp_bench.files import read_jsonl
from vlp_bench.reports.summary import captioning, compute_speedups, format_ratio, load_results, run_metric

TEMPLATES = Path(__file__).parent / "templates"
CURVE_POINTS = 60  # the common grid that seeds are interpolated onto, to draw their mean and band


@dataclass
class Run:
    dir: Path
    rec: dict  # results.json
    rows: list[dict]  # metrics.jsonl

    @property
    def method(self) -> str:
        return self.rec["method"]

    @property
    def finished(self) -> bool:
        return self.rec.get("status") == "finished"

    def file(self, name: str):
        path = self.dir / name
        return path if path.is_file() else None


def load_runs(dirs: list[Path]) -> list[Run]:
    return [Run(Path(d), rec, read_jsonl(Path(d) / "metrics.jsonl") if (Path(d) / "metrics.jsonl").is_file() else [])
            for d, rec in zip(dirs, load_results(dirs))]


# ----------------------------------------------------------------------------- numbers


def _metric(rec: dict, metric: str, floor: bool = False):
    """A run's final value of task.key (or of its floor); None when absent."""
    task, _, key = metric.partition(".")
    values = rec.get("metrics", {}).get(task, {})
    value = (values.get("floor", {}) if floor else values).get(key)
    return value if isinstance(value, (int, float)) else None


def _mean_sd(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _pm(values: list, spec: str) -> str:
    mean, sd = _mean_sd(values)
    if mean is None:
        return "-"
    return format(mean, spec) + ("" if sd is None else f" ± {format(sd, spec)}")


def _flop_scale(value: float) -> tuple[float, str]:
    for scale, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP")):
        if value >= scale:
            return scale, unit
    return 1e6, "MFLOP"


def _by_method(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.method, []).append(r)
    return out


def method_table(runs: list[Run], sp: dict | None, metric: str) -> pd.DataFrame:
    """One row per method: quality with its spread over seeds, time- and FLOPs-to-target, costs."""
    task, _, key = metric.partition(".")
    rows = []
    for method, all_runs in _by_method(runs).items():
        done = [r for r in all_runs if r.finished]
        cost = [r.rec.get("cost", {}) for r in done]
        s = (sp or {}).get("methods", {}).get(method)
        t = s and s["time_to_target_s"]["mean"]
        f = s and s["flops_to_target"]["mean"]
        peak = _mean_sd([c.get("peak_memory_bytes") for c in cost])[0]
        per_sample = _mean_sd([c.get("train_flops_per_sample") for c in cost])[0]
        tokens = sorted({c.get("tokens_to_llm") for c in cost} - {None})
        rows.append({
            "method": method,
            "runs finished": f"{len(done)}/{len(all_runs)}",
            f"{key} ({task}, test)": _pm([_metric(r.rec, metric) for r in done], ".3f"),
            "VQA acc. % (test)": _pm([_metric(r.rec, "vqa.overall") for r in done], ".2f"),
            "reached target": "-" if s is None else f"{s['reached']}/{s['seeds']}",
            "time to target (s)": "-" if s is None else ("not reached" if t is None else f"{t:.1f}"),
            "time speed-up [95% CI]": "-" if s is None else format_ratio(s["time_speedup"]),
            "FLOPs to target (TFLOP)": "-" if s is None else ("not reached" if f is None else f"{f / 1e12:.3f}"),
            "FLOPs speed-up [95% CI]": "-" if s is None else format_ratio(s["flops_speedup"]),
            "tokens to LLM": "/".join(map(str, tokens)) or "-",
            "GFLOP / train sample": "-" if per_sample is None else f"{per_sample / 1e9:.3f}",
            "train time (s)": _pm([c.get("train_wall_s") for c in cost], ".1f"),
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
    for method, all_runs in _by_method(runs).items():
        done = [r for r in all_runs if r.finished]
        row = {"method": method, f"{key} (all)": _pm([_metric(r.rec, metric) for r in done], ".3f")}
        for name in order:
            values = [r.rec["metrics"][task].get("subsets", {}).get(name, {}).get(key) for r in done]
            row[f"{name} ({names[name]})"] = _pm(values, ".3f")
        said = [r.rec["metrics"][task].get("order", {}).get("temporal") for r in done]
        if any(v is not None for v in said):  # the tiny world: captions that state the event the right way round
            row["order right (temporal)"] = _pm(said, ".2f")
        rows.append(row)
    return pd.DataFrame(rows)


def floors(runs: list[Run]) -> dict:
    """The trivial floors of the test sets: the best constant caption and its CIDEr; VQA accuracy
    of the best constant answer per question type (None where the task did not run)."""
    for r in runs:
        m = r.rec.get("metrics", {})
        if r.finished and m:
            cap, vqa = captioning(m).get("floor", {}), m.get("vqa", {}).get("floor", {})
            return {"caption": cap.get("caption"), "CIDEr": cap.get("CIDEr"), "vqa": vqa.get("overall")}
    return {"caption": None, "CIDEr": None, "vqa": None}


def headline(runs: list[Run], sp: dict | None, metric: str) -> dict:
    """What was compared, who won, by how much: the facts the top of the page states."""
    groups = _by_method(runs)
    finished = {m: [r for r in rs if r.finished] for m, rs in groups.items()}
    quality = {m: _mean_sd([_metric(r.rec, metric) for r in rs])[0] for m, rs in finished.items()}
    quality = {m: q for m, q in quality.items() if q is not None}
    seeds = sorted({len(rs) for rs in groups.values()})
    out = {"methods": list(groups), "seeds": "/".join(map(str, seeds)), "metric": metric,
           "failed": [r.dir.name for r in runs if not r.finished],
           "best_quality": max(quality, key=quality.get) if quality else None,
           "best_quality_value": max(quality.values()) if quality else None,
           "floor": next((_metric(r.rec, metric, floor=True) for rs in finished.values() for r in rs), None)}
    if sp:
        ref = sp["reference"]
        faster = {m: s for m, s in sp["methods"].items()
                  if m != ref and s["time_speedup"] is not None and s["reached"] == s["seeds"]}
        out.update(reference=ref, target=sp["target"], target_source=sp["target_source"],
                   not_reached=[m for m, s in sp["methods"].items() if s["reached"] < s["seeds"]])
        if faster:
            win = max(faster, key=lambda m: faster[m]["time_speedup"]["value"])
            out.update(winner=win, time=format_ratio(faster[win]["time_speedup"]),
                       flops=format_ratio(faster[win]["flops_speedup"]),
                       winner_faster=faster[win]["time_speedup"]["value"] > 1,
                       has_ci=faster[win]["time_speedup"]["ci_low"] is not None)
    return out


# ----------------------------------------------------------------------------- figures


def _data_uri(fig, fmt: str = "svg") -> str:
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():  # long method names: tight_layout gives up, bbox_inches="tight" copes
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, bbox_inches="tight", dpi=110, metadata={"Date": None} if fmt == "svg" else None)
    plt.close(fig)
    mime = "image/svg+xml" if fmt == "svg" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _setup_plots():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.85)
    matplotlib.rcParams["svg.hashsalt"] = "vlp-bench"  # the same results give the same SVG
    return sns


def _palette(methods: list[str]) -> dict:
    import seaborn as sns

    return dict(zip(methods, sns.color_palette("colorblind", max(len(methods), 1))))


def _band_frame(series: list[tuple[str, str, np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Seeds of each (method, stage) interpolated onto a common grid over the range all of them
    cover; seaborn then draws their mean and, with errorbar=("pi", 100), the min-max band."""
    frames = []
    groups: dict[tuple, list] = {}
    for method, stage, x, y in series:
        if len(x):
            groups.setdefault((method, stage), []).append((x, y))
    for (method, stage), seeds in groups.items():
        lo, hi = max(x[0] for x, _ in seeds), min(x[-1] for x, _ in seeds)
        grid = np.linspace(lo, hi, CURVE_POINTS) if hi > lo else np.array([lo])
        for k, (x, y) in enumerate(seeds):
            frames.append(pd.DataFrame({"method": method, "stage": stage, "seed": k, "x": grid,
                                        "y": np.interp(grid, x, y)}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


DECODER_LOSS = "decoder.final_loss"  # the text-side family's loss after its shared decoder phase


def _val_value(row: dict, metric: str):
    if metric == DECODER_LOSS:
        return (row.get("decoder") or {}).get("final_loss")
    task, _, key = metric.partition(".")
    return row["eval"].get(task, {}).get(key)


def _curve_series(runs: list[Run], metric: str | None, axis: str, scale: float):
    """(method, stage, x, y) per run: validation `metric` (or training loss when metric is None)."""
    out, raw = [], []
    for r in runs:
        if metric is None:
            rows = [x for x in r.rows if "loss" in x and x.get(axis) is not None]
            by_stage: dict[str, list] = {}
            for x in rows:
                by_stage.setdefault(x.get("stage", "train"), []).append(x)
            for stage, rs in by_stage.items():
                xs = np.array([x[axis] / scale for x in rs], float)
                out.append((r.method, stage, xs, np.array([x["loss"] for x in rs], float)))
        else:
            rows = [x for x in r.rows if x.get("split") == "val" and "eval" in x and x.get(axis) is not None
                    and isinstance(_val_value(x, metric), (int, float))]
            xs = np.array([x[axis] / scale for x in rows], float)
            ys = np.array([_val_value(x, metric) for x in rows], float)
            out.append((r.method, "val", xs, ys))
            raw.extend({"method": r.method, "x": a, "y": b} for a, b in zip(xs, ys))
    return out, pd.DataFrame(raw)


def curve_figures(runs: list[Run], metric: str, target: float | None, colors: dict) -> list[dict]:
    """Quality and training loss (and, for runs with a decoder phase, the loss after it) against
    wall-clock and against FLOPs, one line per method."""
    sns = _setup_plots()
    import matplotlib.pyplot as plt

    done = [r for r in runs if r.finished]
    max_flops = max((r.rec.get("cost", {}).get("train_flops") or 0 for r in done), default=0)
    fscale, funit = _flop_scale(max_flops or 1)
    axes_spec = [("wall_s", 1.0, "training wall-clock (s)"), ("flops", fscale, f"training compute ({funit})")]
    figures = []
    for what in (metric, None, DECODER_LOSS):  # the last only for runs with a decoder phase
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.4), sharey=True)
        drawn = False
        for ax, (axis, scale, label) in zip(axes, axes_spec):
            series, raw = _curve_series(done, what, axis, scale)
            frame = _band_frame(series)
            if frame.empty:
                continue
            drawn = True
            style = "stage" if what is None and frame["stage"].nunique() > 1 else None
            sns.lineplot(frame, x="x", y="y", hue="method", style=style, units=None, errorbar=("pi", 100),
                         palette=colors, ax=ax, legend=ax is axes[-1])
            if not raw.empty:
                sns.scatterplot(raw, x="x", y="y", hue="method", palette=colors, ax=ax, s=14, legend=False)
            if what == metric and target is not None:
                ax.axhline(target, color="0.3", lw=1, ls=":")
            ax.set_xlabel(label)
            ax.set_ylabel({metric: f"{metric} (validation)", None: "training loss",
                           DECODER_LOSS: "loss after the decoder phase"}[what])
            if what is None:
                ax.set_yscale("log")
        if not drawn:
            plt.close(fig)
            continue
        if axes[-1].get_legend():
            sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        if what == DECODER_LOSS:
            caption = ("The caption (AR) loss at the end of the decoder phase that precedes each evaluation "
                       "(mean over its last tenth of steps), against the pre-training clock: the same "
                       "fine-tuning for every method of the text-side family, so unlike their training "
                       "losses these are comparable across methods; lower is better.")
        elif what:
            caption = (f"Validation {metric} during training, against wall-clock (left) and training FLOPs "
                       f"(right): a line further left reaches a quality sooner. Dots are the evaluations; "
                       f"with several seeds the line is their mean and the band their range"
                       f"{'; the dotted line is the target' if target is not None else ''}.")
        else:
            caption = ("Training loss (log scale) against wall-clock and FLOPs. Line styles mark training "
                       "stages: losses of different stages (e.g. BLIP-2's stage 1) are different objectives "
                       "and are not comparable across them, nor are FLM's, MLM's and AR's.")
        title = {metric: f"{metric} learning curves", None: "Loss curves", DECODER_LOSS: "Loss after the decoder phase"}
        figures.append({"title": title[what], "uri": _data_uri(fig),
                        "caption": caption})
    return figures


def pareto_figure(runs: list[Run], metric: str, colors: dict) -> dict | None:
    """Final test quality against training cost: each seed, each method's mean, the Pareto front."""
    sns = _setup_plots()
    import matplotlib.pyplot as plt

    pts = []
    for r in runs:
        cost, q = r.rec.get("cost", {}), _metric(r.rec, metric)
        if r.finished and q is not None and cost.get("train_flops") and cost.get("train_wall_s"):
            pts.append({"method": r.method, "flops": cost["train_flops"], "wall_s": cost["train_wall_s"], "q": q})
    if not pts:
        return None
    frame = pd.DataFrame(pts)
    fscale, funit = _flop_scale(frame["flops"].max())
    frame["flops"] /= fscale
    means = frame.groupby("method", sort=False).mean(numeric_only=True).reset_index()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.4), sharey=True)
    for ax, (axis, label) in zip(axes, [("flops", f"training compute ({funit})"),
                                        ("wall_s", "training wall-clock (s)")]):
        sns.scatterplot(frame, x=axis, y="q", hue="method", palette=colors, ax=ax, s=18, alpha=0.5, legend=False)
        sns.scatterplot(means, x=axis, y="q", hue="method", palette=colors, ax=ax, s=90, marker="D",
                        legend=ax is axes[-1], edgecolor="black")
        front = means.sort_values([axis, "q"], ascending=[True, False])
        best, keep = -math.inf, []
        for _, row in front.iterrows():  # cheaper first: a method is on the front if it beats all cheaper ones
            if row["q"] > best:
                keep.append(row)
                best = row["q"]
        if len(keep) > 1:
            fx, fy = [k[axis] for k in keep], [k["q"] for k in keep]
            ax.step(fx, fy, where="post", color="0.5", lw=1, zorder=0)
        for _, row in means.iterrows():
            ax.annotate(row["method"], (row[axis], row["q"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} (test)")
    if axes[-1].get_legend():
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return {"title": "Quality against cost", "uri": _data_uri(fig),
            "caption": f"Final test {metric} against the training cost of each run (small dots: seeds; diamonds: "
                       f"method means). Up and to the left is better; the grey steps join the methods that no "
                       f"cheaper method beats."}


def _merge_picture(image_path: Path, groups: np.ndarray, cell: int = 168) -> str:
    """The image as the encoder saw it, beside it every token's patches filled with their mean
    colour and outlined (ToMe's visualisation), as a PNG data URI."""
    from PIL import Image

    with Image.open(image_path) as im:
        img = np.asarray(im.convert("RGB"), dtype=np.float32)
    gh, gw = groups.shape
    zoom = max(1, math.ceil(cell / img.shape[0]))
    big = np.kron(img, np.ones((zoom, zoom, 1), np.float32))
    ph, pw = big.shape[0] // gh, big.shape[1] // gw
    label = np.kron(groups, np.ones((ph, pw), groups.dtype))
    big, label = big[: label.shape[0], : label.shape[1]], label[: big.shape[0], : big.shape[1]]
    merged = np.zeros_like(big)
    for g in np.unique(label):
        mask = label == g
        merged[mask] = big[mask].mean(axis=0)
    edge = np.zeros(label.shape, bool)  # outline the tokens: pixels whose right or lower neighbour differs
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    edge[:-1, :] |= label[:-1, :] != label[1:, :]
    merged[edge] = 255.0
    gap = np.full((big.shape[0], 6, 3), 255.0, np.float32)
    out = Image.fromarray(np.concatenate([big, gap, merged], axis=1).clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def merge_pictures(runs: list[Run]) -> list[dict]:
    """For each method that merges (first finished seed), its token groups on a few test images and
    the caption it generated for each."""
    out, seen = [], set()
    for r in runs:
        path = r.file("token_groups.json")
        if not r.finished or r.method in seen or path is None:
            continue
        seen.add(r.method)
        captions = {}
        if (samples := r.file("samples_caption.jsonl")) is not None:
            captions = {s["image_id"]: s["caption"] for s in read_jsonl(samples)}
        items = []
        try:
            tg = json.loads(path.read_text())
            for im in tg["images"]:
                groups = np.array(im["groups"], dtype=np.int64)
                items.append({"uri": _merge_picture(r.dir / im["file"], groups), "image_id": im["image_id"],
                              "caption": captions.get(im["image_id"], "(no caption recorded)"),
                              "tokens": len(np.unique(groups))})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: unreadable token groups ({type(e).__name__}: {e})") from None
        out.append({"method": r.method, "run": r.dir.name, "tokens_to_llm": tg["tokens_to_llm"],
                    "prefix_tokens": tg["prefix_tokens"], "grid": tg["grid"], "items": items})
    return out


def search_section(path: Path, uid: str = "search") -> dict:
    """A `vlp-bench search` study (its search.json): the trials against their cost with the Pareto
    front (or the best trial), the front's settings, parameter importances."""
    sns = _setup_plots()
    import matplotlib.pyplot as plt

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
    figure = None
    if done:
        frame = pd.DataFrame({"cost": [t["user_attrs"].get("train_flops", 0) / 1e12 for t in done],
                              "q": [t["values"][0] for t in done], "front": [t["number"] in best for t in done],
                              "trial": [t["number"] for t in done]})
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        sns.scatterplot(frame, x="cost", y="q", hue="front", palette={True: "#d55e00", False: "#999999"}, ax=ax, s=40)
        front = frame[frame["front"]].sort_values("cost")
        if mode == "pareto" and len(front) > 1:
            ax.step(front["cost"], front["q"], where="post", color="#d55e00", lw=1)
        for _, row in frame.iterrows():
            ax.annotate(str(int(row["trial"])), (row["cost"], row["q"]), textcoords="offset points", xytext=(4, 3),
                        fontsize=7)
        ax.set_xlabel("training compute (TFLOP)")
        ax.set_ylabel(f"{metric} (validation)")
        figure = _data_uri(fig)
    states: dict[str, int] = {}
    for t in trials:
        states[t["state"]] = states.get(t["state"], 0) + 1
    return {"file": str(path), "study": summary.get("study"), "mode": mode, "metric": metric, "states": states,
            "figure": figure, "table": styled(pd.DataFrame(rows), uid) if rows else "",
            "importances": sorted(summary.get("importances", {}).items(), key=lambda kv: -kv[1]),
            "wall_s": summary.get("wall_s_this_worker")}


# ----------------------------------------------------------------------------- tables


def styled(frame: pd.DataFrame, uid: str, highlight: str | None = None) -> str:
    """A pandas-styled table with every value and header HTML-escaped (user names stay text)."""
    def row_style(row):
        bold = highlight is not None and row.iloc[0] == highlight
        return ["font-weight:600;background:#eef6ee" if bold else ""] * len(row)

    def cell_style(v):
        return "color:#a33" if isinstance(v, str) and v.startswith("not reached") else ""

    style = (frame.style.hide(axis="index").format(escape="html").format_index(escape="html", axis=1)
             .apply(row_style, axis=1).map(cell_style).set_uuid(uid).set_table_attributes('class="table"'))
    return style.to_html()


def paper_table(table: dict) -> pd.DataFrame:
    rows = []
    for name, m in table["methods"].items():
        part = lambda p, d: m["per_sample"].get(p, {}).get(d, 0.0) / 1e9  # noqa: E731
        rows.append({"method": name, "tokens to LLM": m["tokens_to_llm"], "vision fwd": f"{part('vision', 'forward'):.4g}",
                     "bridge fwd": f"{part('bridge', 'forward'):.4g}", "bridge bwd": f"{part('bridge', 'backward'):.4g}",
                     "LLM fwd": f"{part('llm', 'forward'):.4g}", "LLM bwd": f"{part('llm', 'backward'):.4g}",
                     "total": f"{m['total'] / 1e9:.4g}", "baseline / method": f"{m['ratio_to_baseline']:.2f}x"})
    return pd.DataFrame(rows)


def environment(runs: list[Run]) -> list[tuple[str, str]]:
    """Device, library versions and git commit; a field that differs across runs lists each value."""
    def values(get):
        return ", ".join(dict.fromkeys(str(get(r.rec.get("env", {}))) for r in runs))

    rows = [(k, values(lambda e, k=k: e.get(k))) for k in
            ("device", "device_name", "torch_threads", "python", "platform", "git_commit")]
    names = dict.fromkeys(k for r in runs for k in r.rec.get("env", {}).get("versions", {}))
    rows += [(k, values(lambda e, k=k: e.get("versions", {}).get(k))) for k in names]
    return rows


# ----------------------------------------------------------------------------- the page


def render(dirs: list[Path], metric: str = "", target: float | None = None,
           reference: str | None = None, flops_files: list[Path] = (), strict: bool = False,
           searches: list[Path] = ()) -> str:
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
    methods = list(_by_method(runs))
    colors = _palette(methods)
    head = headline(runs, sp, metric)
    paper = []
    for path in flops_files:
        try:
            table = json.loads(Path(path).read_text())
            paper.append({"file": Path(path).name, "table": styled(paper_table(table), f"paper{len(paper)}"),
                          "skipped": table.get("skipped", {}), "meta": table})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # ValueError: JSON, UTF-8
            raise UserError(f"{path}: not a `vlp-bench flops --json` table ({type(e).__name__}: {e})") from None
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(
        title="vlp-bench report", generated=time.strftime("%Y-%m-%d %H:%M %Z"), head=head, sp=sp,
        sp_error=sp_error, metric=metric, floors=floors(runs),
        speedups=styled(method_table(runs, sp, metric), "speedups", head.get("winner")),
        subsets=None if (subsets := subset_table(runs, metric)) is None else styled(subsets, "subsets"),
        curves=curve_figures(runs, metric, sp["target"] if sp else None, colors),
        pareto=pareto_figure(runs, metric, colors), merges=merge_pictures(runs), paper=paper,
        searches=[search_section(p, f"search{k}") for k, p in enumerate(searches)],
        failed=[{"run": r.dir.name, "status": r.rec.get("status"), "error": r.rec.get("error", "")}
                for r in runs if not r.finished],
        env=environment(runs),
        runs=[{"name": r.dir.name, "dir": str(r.dir), "config": json.dumps(r.rec.get("config", {}), indent=2),
               "info": json.dumps(r.rec.get("method_info", {}))} for r in runs])


def write(dirs: list[Path], out: Path, **kwargs) -> Path:
    html = render(dirs, **kwargs)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(html, encoding="utf-8")
        tmp.replace(out)
    except OSError as e:
        raise UserError(f"cannot write the report to {out}: {e.strerror or e}") from None
    return out
