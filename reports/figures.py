"""The report's pictures, each returned as a data: URI so the page stays one file that loads
nothing: learning curves (quality, validation loss, training loss, the loss after a decoder phase)
against wall-clock and FLOPs, the speed-up against the target quality, final quality against cost
with the Pareto front, a search's trials against their cost, and the token groups of the methods
that merge. Seaborn draws the plots; a method keeps its colour in every plot (palette()), and plots
are saved so that the same result files give the same bytes (no date, a fixed SVG hash salt)."""

from __future__ import annotations

import base64
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from vlp_bench.errors import UserError
from vlp_bench.files import read_jsonl
from vlp_bench.metrics.targets import AXES, GRID_END, GRID_START, VAL_LOSS, curve
from vlp_bench.metrics.verdicts import FASTER, SLOWER
from vlp_bench.reports.summary import Run, flop_scale, metric_label, metric_value

CURVE_POINTS = 60  # the common grid that seeds are interpolated onto, to draw their mean and band
DECODER_LOSS = "decoder.final_loss"  # the text-side family's loss after its shared decoder phase


# ----------------------------------------------------------------------------- plotting


def _data_uri(fig, fmt: str = "svg") -> str:
    """The figure as a data: URI (SVG by default: text, sharp at any zoom), closed once saved so that
    a long report does not hold every figure in memory."""
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
    """Matplotlib drawing to files only and seaborn's theme; returns seaborn. The imports are here, not
    at the top, because the backend must be chosen before pyplot is first imported."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.85)
    matplotlib.rcParams["svg.hashsalt"] = "vlp-bench"  # the same results give the same SVG
    return sns


def palette(methods: list[str]) -> dict:
    """A colour per method (colour-blind safe), shared by every plot so a method looks the same in each."""
    import seaborn as sns

    return dict(zip(methods, sns.color_palette("colorblind", max(len(methods), 1))))


# ----------------------------------------------------------------------------- learning curves


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
            continue
        if metric == VAL_LOSS:  # logged at training rows (stages without a caption loss log none)
            try:
                points = curve(r.rows, VAL_LOSS)
            except ValueError:  # a row without its cost: no curve to draw, as for a run that logged none
                points = []
            xs = np.array([p[AXES[axis]] / scale for p in points], float)
            ys = np.array([p[2] for p in points], float)
        else:
            rows = [x for x in r.rows if x.get("split") == "val" and "eval" in x and x.get(axis) is not None
                    and isinstance(_val_value(x, metric), (int, float))]
            xs = np.array([x[axis] / scale for x in rows], float)
            ys = np.array([_val_value(x, metric) for x in rows], float)
        out.append((r.method, "val", xs, ys))
        raw.extend({"method": r.method, "x": a, "y": b} for a, b in zip(xs, ys))
    return out, pd.DataFrame(raw)


def _curve_text(what: str | None, metric: str, target: float | None) -> tuple[str, str, str]:
    """(title, y label, caption) of one learning-curve figure."""
    where = "; the dotted line is the target" if target is not None else ""
    if what == DECODER_LOSS:
        caption = ("The caption (AR) loss at the end of the decoder phase that precedes each evaluation (mean "
                   "over its last tenth of steps), against the pre-training clock: the same fine-tuning for every "
                   "method of the text-side family, so unlike their training losses these are comparable across "
                   "methods; lower is better.")
        return "Loss after the decoder phase", "loss after the decoder phase", caption
    if what is None:
        caption = ("Training loss (log scale) against wall-clock and FLOPs. Line styles mark training stages: "
                   "losses of different stages (e.g. BLIP-2's stage 1) are different objectives and are not "
                   "comparable across them, nor are FLM's, MLM's and AR's.")
        return "Loss curves", "training loss", caption
    if what == VAL_LOSS:
        caption = ("Teacher-forced caption loss on held-out validation captions, read at the training log rows "
                   "(the text-side family: at the evaluations, after its decoder phase), against wall-clock "
                   "(left) and training FLOPs (right); lower is better, and the same objective "
                   "for every method. Stages that train no caption loss log none (BLIP-2's stage 1): their curve "
                   "starts later or has fewer points. With several seeds the line is their mean and the band "
                   f"their range{where}.")
        return "Validation loss curves", "validation loss", caption
    caption = (f"Validation {metric} during training, against wall-clock (left) and training FLOPs (right): a "
               f"line further left reaches a quality sooner. Dots are the evaluations; with several seeds the line "
               f"is their mean and the band their range{where}.")
    return f"{metric} learning curves", f"{metric} (validation)", caption


def curve_figures(runs: list[Run], metric: str, target: float | None, colors: dict,
                  loss_target: float | None = None) -> list[dict]:
    """Quality, validation loss (runs that logged it) and training loss (and, for runs with a decoder
    phase, the loss after it) against wall-clock and against FLOPs, one line per method."""
    sns = _setup_plots()
    import matplotlib.pyplot as plt

    done = [r for r in runs if r.finished]
    max_flops = max((r.rec.get("cost", {}).get("train_flops") or 0 for r in done), default=0)
    fscale, funit = flop_scale(max_flops or 1)
    axes_spec = [("wall_s", 1.0, "training wall-clock (s)"), ("flops", fscale, f"training compute ({funit})")]
    label = metric_label([r.rec for r in done], metric)
    figures = []
    for what in dict.fromkeys((metric, VAL_LOSS, None, DECODER_LOSS)):  # drawn where the runs logged them
        line = target if what == metric else loss_target if what == VAL_LOSS else None
        title, ylabel, caption = _curve_text(what, label, line)
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
            if line is not None:
                ax.axhline(line, color="0.3", lw=1, ls=":")
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            if what is None:
                ax.set_yscale("log")
        if not drawn:
            plt.close(fig)
            continue
        if axes[-1].get_legend():
            sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        figures.append({"title": title, "uri": _data_uri(fig), "caption": caption})
    return figures


# ----------------------------------------------------------------------------- speed-up against target


def _speedup_axis(ax, entries: list[dict], color) -> None:
    """One method's speed-ups over the target grid: the line, its interval band, a dot per target
    (filled: a verdict; hollow: none) and an x at the bottom where it did not reach the target."""
    from matplotlib.transforms import blended_transform_factory

    x = np.array([e["target"] for e in entries], float)
    value = np.array([e.get("value", np.nan) for e in entries], float)
    low = np.array([np.nan if e.get("ci_low") is None else e["ci_low"] for e in entries], float)
    high = np.array([np.nan if e.get("ci_high") is None else e["ci_high"] for e in entries], float)
    ax.plot(x, value, color=color, lw=1.5)
    band = ~np.isnan(low)
    if band.any():
        ax.fill_between(x, np.where(band, low, 1.0), np.where(band, high, 1.0), where=band, color=color,
                        alpha=0.2, lw=0)
    decided = np.array([e["verdict"] in (FASTER, SLOWER) for e in entries])
    for mask, face in ((decided, color), (~decided, "white")):
        ax.scatter(x[mask], value[mask], s=22, facecolor=face, edgecolor=color, zorder=3)
    bottom = blended_transform_factory(ax.transData, ax.transAxes)  # x in data units, y in axes units
    missed = np.array([e["verdict"] == "not reached" for e in entries])
    ax.scatter(x[missed], np.full(missed.sum(), 0.04), marker="x", s=30, color=color, transform=bottom, zorder=3)


def speedup_figure(sp: dict, colors: dict, quality: str) -> dict | None:
    """Each method's time and FLOPs speed-up over the reference against the target quality (the
    speed-up curve of vlp_bench.metrics.targets), with its pointwise intervals; None without a grid."""
    grid, methods = sp["curve"]["targets"], sp["curve"]["methods"]
    if not grid or not methods:
        return None
    _setup_plots()
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ref, pad = sp["reference"], 0.03 * (max(grid) - min(grid)) or 0.05 * abs(grid[0]) or 1.0
    values = [e["value"] for curves in methods.values() for entries in curves.values() for e in entries
              if "value" in e] or [1.0]
    ylim = (min(min(values), 1.0) / 4, max(max(values), 1.0) * 4)  # room for the x marks below
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.4), sharey=True)
    for ax, axis in zip(axes, ("time", "flops")):
        for method, curves in methods.items():
            _speedup_axis(ax, curves[axis], colors.get(method))
        ax.axhline(1.0, color="0.3", lw=1, ls=":")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(*ylim)  # a band far wider than the speed-ups (one noisy pair) is cut, not the scale
        ax.set_xlim(min(grid) - pad, max(grid) + pad)  # the x marks alone do not widen the axis
        ax.set_xlabel(f"target: {quality}")
        ax.set_ylabel(f"{'wall-clock' if axis == 'time' else 'FLOPs'} speed-up over {ref}")
        if not sp["higher_is_better"]:
            ax.invert_xaxis()  # quality grows to the right
    axes[-1].legend([Line2D([], [], color=colors.get(m)) for m in methods], list(methods), loc="upper left",
                    bbox_to_anchor=(1.01, 1), frameon=False)
    caption = (f"Speed-up over {ref} (its time, or FLOPs, to reach the target over the method's, paired by "
               f"seed) at {len(grid)} targets from {GRID_START:.0%} to {GRID_END:.0%} of the way from the floor to "
               f"{ref}'s best fitted value, each seed's set by {ref}'s other seeds (the x axis: their mean over "
               f"seeds). Bands: paired t intervals "
               f"at {sp['pair_level'] * 100:.4g}% per comparison, Bonferroni-corrected over the {len(methods)} "
               f"method(s) compared so that at each target their verdicts hold jointly at {sp['level']:.0%}; "
               f"pointwise over targets (neighbouring targets are read off the same curves), not one band for "
               f"the whole curve. Filled dots: a verdict (faster above the dotted 1x line, slower below); hollow: "
               f"no detectable difference, or one seed's point estimate (no band). x at the bottom: not reached "
               f"in any seed, where the method's advantage ends; a gap without an x: some seeds reached it and "
               f"others not.")
    return {"title": f"Speed-up against target quality: {quality}", "uri": _data_uri(fig), "caption": caption}


# ----------------------------------------------------------------------------- quality against cost


def pareto_figure(runs: list[Run], metric: str, colors: dict) -> dict | None:
    """Final test quality against training cost: each seed, each method's mean, the Pareto front."""
    sns = _setup_plots()
    import matplotlib.pyplot as plt

    pts = []
    for r in runs:
        cost, q = r.rec.get("cost", {}), metric_value(r.rec, metric)
        if r.finished and q is not None and cost.get("train_flops") and cost.get("train_wall_s"):
            pts.append({"method": r.method, "flops": cost["train_flops"], "wall_s": cost["train_wall_s"], "q": q})
    if not pts:
        return None
    frame = pd.DataFrame(pts)
    fscale, funit = flop_scale(frame["flops"].max())
    label = metric_label([r.rec for r in runs if r.finished], metric)
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
        ax.set_ylabel(f"{label} (test)")
    if axes[-1].get_legend():
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return {"title": "Quality against cost", "uri": _data_uri(fig),
            "caption": f"Final test {label} against the training cost of each run (small dots: seeds; diamonds: "
                       f"method means). Up and to the left is better; the grey steps join the methods that no "
                       f"cheaper method beats."}


def search_figure(done: list[dict], best: set, mode: str, metric: str) -> str:
    """A search's complete trials: validation `metric` against training compute, the Pareto front
    (mode "pareto") or the best trial in orange, each dot labelled with its trial number."""
    sns = _setup_plots()
    import matplotlib.pyplot as plt

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
    return _data_uri(fig)


# ----------------------------------------------------------------------------- token groups


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


