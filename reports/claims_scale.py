"""What the paper scale says of a claim (reports/claims.py): per-sample FLOPs from the studies'
cost tables (flops-paper.json, flops-vitl-1b.json), per-sample step times from `vlp-bench bench
--json` files, and GPU-days of the papers' released training budgets at a stated utilisation."""

from __future__ import annotations

import json
from pathlib import Path

# GPU-days = samples x FLOPs per sample / (MFU x peak): an A100's dense bf16 peak, the GPU the papers
# trained on, at 40% of it, what well-tuned large-model training reaches (docs/claims.md)
A100_PEAK = 312e12
PAPER_MFU = 0.4
DAY_S = 86_400


def per_sample_flops(runs: list, methods: tuple[str, str], part: str = "") -> tuple[float, float, str] | None:
    """Two methods' FLOPs per training sample at the largest scale the cost tables of their
    experiments (flops-paper.json, then flops-vitl-1b.json; each method from any table of the
    preset) cost both at, and the preset; `part` counts one part ("vision": the encoder's forward
    and backward) instead of the whole sample."""
    for preset, entries in by_preset(runs).items():
        if all(m in entries for m in methods):
            found = [entries[m] for m in methods]
            value = [sum(e["per_sample"][part].values()) if part else e["total"] for e in found]
            return float(value[0]), float(value[1]), preset
    return None


def by_preset(runs: list) -> dict[str, dict[str, dict]]:
    """{preset: {method: its entry}} of the runs' experiments' cost tables, the paper scale first."""
    out: dict[str, dict[str, dict]] = {}
    for name in ("flops-paper.json", "flops-vitl-1b.json"):
        for f in dict.fromkeys(r.dir.parent / name for r in runs):
            if f.is_file():
                table = read_json(f, "a `vlp-bench flops --json` table")
                out.setdefault(table.get("preset", name), {}).update(table.get("methods", {}))
    return out


def read_json(path, what: str):
    """A JSON file, or a one-line error naming it and what it should be."""
    from vlp_bench.errors import UserError

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # ValueError: JSON, UTF-8
        raise UserError(f"{path}: not {what} ({type(e).__name__}: {e})") from None


def stage_shares(runs: list, method: str) -> dict[str, float]:
    """{stage: its share of training steps} of `method`, from its experiment's cost tables."""
    for entries in by_preset(runs).values():
        if method in entries:
            return {st["name"]: float(st["share"]) for st in entries[method].get("stages", [])}
    return {}


def bench_seconds(table: dict, method: str, shares: dict[str, float]) -> float | None:
    """Seconds per training sample of `method` in a `vlp-bench bench --json` table, its stages
    weighted by their `shares` of training (a stage not in them: equally)."""
    rows = [r for r in table.get("rows", []) if isinstance(r, dict) and r.get("method") == method
            and r.get("samples_per_s")]
    if not rows:
        return None
    weights = [shares.get(r.get("stage"), 1.0 / len(rows)) for r in rows]
    return sum(w / r["samples_per_s"] for w, r in zip(weights, rows)) / sum(weights)


def bench_ratio(bench: list[dict], a: list, b: list, methods: tuple[str, str]) -> tuple[float, str] | None:
    """The reference's seconds per sample over the method's, from the first bench table that
    measured both (never two tables mixed), and its preset."""
    for table in bench:
        ta, tb = (bench_seconds(table, m, stage_shares(runs, m)) for m, runs in zip(methods, (a, b)))
        if ta and tb:
            return tb / ta, str(table.get("preset", ""))
    return None


def paper_bound(claim, a: list, b: list, bench: list[dict]) -> dict:
    """What the paper scale says of the claim: the per-sample FLOPs ratio (reference over method)
    and, from `vlp-bench bench` files, the per-sample step-time ratio; a speed-up claim of k x then
    needs the method to reach the target on k / ratio fewer samples."""
    part = "vision" if claim.kind == "throughput" else ""  # ToMe's claim is the encoder's own throughput
    flops = per_sample_flops(a + b, (claim.method[1], claim.reference[1]), part)
    out: dict = {"flops_ratio": flops[1] / flops[0] if flops else None, "flops_preset": flops[2] if flops else None,
                 "flops_part": part or "whole sample"}
    timed = None if part else bench_ratio(bench, a, b, (claim.method[1], claim.reference[1]))
    out["time_ratio"], out["bench_preset"] = timed if timed else (None, None)
    per_sample = out["time_ratio"] or out["flops_ratio"]
    if claim.kind == "speedup" and per_sample:
        out["fewer_samples_needed"] = claim.factor / per_sample
    if claim.paper_samples and flops and flops[2] == "paper":
        out["gpu_days"] = gpu_days(claim, flops[0], flops[1])
    return out


def gpu_days(claim, method_flops: float, reference_flops: float) -> dict:
    """A100-days of each arm's released training budget (samples) at PAPER_MFU, their ratio, and the
    compute the paper states where it states one."""
    days = [n * f / (PAPER_MFU * A100_PEAK * DAY_S) for n, f in zip(claim.paper_samples, (method_flops, reference_flops))]
    return {"method": days[0], "reference": days[1], "ratio": days[1] / days[0], "mfu": PAPER_MFU,
            "samples": list(claim.paper_samples), "stated": claim.stated_compute}


def throughput_of(claim, bound: dict) -> dict | None:
    """A throughput claim's ratio: its part's FLOPs per sample (a bench file's whole-step times do
    not isolate the encoder, so they are not used for it)."""
    if bound.get("flops_ratio"):
        return {"value": bound["flops_ratio"],
                "source": f"{bound['flops_part']} FLOPs per sample, {bound['flops_preset']} preset"}
    return None
