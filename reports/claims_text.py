"""The claims ledger (reports/claims.py) in words: the plain-text table `vlp-bench claims` prints
and the rows of the HTML report's ledger section. Reads claims.json's dicts only."""

from __future__ import annotations

from vlp_bench.reports.summary import format_ratio, ratio


def measured_text(entry: dict) -> str:
    """One world's measurement of a claim in a few words."""
    m = entry["measured"]
    parts = []
    if m.get("time"):
        parts.append(f"time {format_ratio(m['time'])}")
    if m.get("flops"):
        parts.append(f"FLOPs {format_ratio(m['flops'])}")
    if m.get("quality"):
        parts.append(f"{entry['metric']} ratio {format_ratio(m['quality'])}")
    if m.get("throughput"):
        parts.append(f"throughput {ratio(m['throughput']['value'])}x ({m['throughput']['source']})")
    if entry.get("why_no_number") and not (m.get("time") or m.get("quality")):
        parts.append(entry["why_no_number"])
    elif entry.get("target_fraction", 0.8) != 0.8:
        parts.append(f"at {entry['target_fraction']:.2f} of the gap ({entry.get('why_no_number')} at 0.8)")
    return "; ".join(parts) or "-"


def paper_text(bound: dict) -> str:
    """A world's paper-scale bound in a few words."""
    text = f"{ratio(bound['flops_ratio'])}x {bound['flops_part']} FLOPs ({bound['flops_preset']})" if bound.get(
        "flops_ratio") else ""
    if bound.get("time_ratio"):
        text += f"; {ratio(bound['time_ratio'])}x step time ({bound['bench_preset']} bench)"
    if bound.get("fewer_samples_needed"):
        text += f"; the claim needs {bound['fewer_samples_needed']:.2g}x fewer samples"
    if days := bound.get("gpu_days"):
        text += (f"; released budgets at {days['mfu']:.0%} MFU: {days['method']:.0f} against {days['reference']:.0f}"
                 f" A100-days ({ratio(days['ratio'])}x)" + (f"; stated: {days['stated']}" if days["stated"] else ""))
    return text or "-"


def curve_text(entry: dict) -> str:
    """A world's validation curves, as "step: method / reference" means."""
    curves = entry.get("curves")
    if not curves:
        return ""
    ref = {p["step"]: p["value"] for p in curves["reference"]}
    return ", ".join(f"{p['step']}: {p['value']:.3g} / {ref[p['step']]:.3g}" for p in curves["method"] if p["step"] in ref)


def page_rows(result: dict) -> list[dict]:
    """The ledger as the HTML report's section shows it: one entry per claim, one row per world."""
    out = []
    for c in result["claims"]:
        worlds = [{"world": w, "seeds": len(e["seeds"]), "tuning": e["tuning"], "verdict": e["verdict"],
                   "needed": e.get("seeds_needed"), "measured": measured_text(e), "paper": paper_text(e["paper_scale"]),
                   "curve": curve_text(e)} for w, e in c["worlds"].items()]
        out.append({"id": c["id"], "source": c["source"], "statement": c["statement"], "method": c["method"],
                    "reference": c["reference"], "verdict": c["verdict"] or "not measured",
                    "robustness": c["robustness"] or "", "worlds": worlds})
    return out


def format_ledger(result: dict) -> str:
    """The ledger as plain text: per claim, its statement, then one line per world."""
    from vlp_bench.log import text_table

    rows = []
    for c in result["claims"]:
        head = c["verdict"] or "not measured"
        if c["robustness"]:
            head += f" ({c['robustness']})"
        rows.append([c["id"], c["source"], head, "", ""])
        for world, e in c["worlds"].items():
            extra = f", {e['seeds_needed']} seeds to decide" if e.get("seeds_needed") else ""
            rows.append([f"  {world}", f"{len(e['seeds'])} seeds, {e['tuning']}", e["verdict"] + extra,
                         measured_text(e), paper_text(e["paper_scale"])])
            if curve_text(e):
                rows.append(["", "", "", f"validation {c['metric']}, step: {c['method']} / {c['reference']}: "
                             + curve_text(e), ""])
    lines = [text_table(["claim", "", "verdict", "measured (95% paired intervals)", "paper scale"], rows, left=5)]
    lines += [f"{c['id']}: {c['statement']}" for c in result["claims"]]
    return "\n".join(lines)
