"""A plain-text summary table of finished runs, printed at the end of `vlp-bench run`."""

from __future__ import annotations

import json
from pathlib import Path

from vlp_bench.errors import UserError
from vlp_bench.results import SCHEMA_VERSION


def load_results(run_dirs) -> list[dict]:
    out = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise UserError(f"no results.json in {d} (run not finished, or not a run directory)")
        rec = json.loads(path.read_text())
        if rec.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{path}: schema_version {rec.get('schema_version')} is not {SCHEMA_VERSION}")
        out.append(rec)
    return out


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(results: list[dict]) -> str:
    header = ["run", "status", "CIDEr", "floor", "x floor", "BLEU-4", "VQA %", "VQA floor", "tokens->LLM",
              "train s", "samples/s"]
    rows = []
    for r in results:
        cap = r.get("metrics", {}).get("caption", {})
        floor = cap.get("floor", {}).get("CIDEr")
        cider = cap.get("CIDEr")
        vqa = r.get("metrics", {}).get("vqa", {})
        cost = r.get("cost", {})
        rows.append([
            r["run_id"], r["status"], _fmt(cider, ".3f"), _fmt(floor, ".3f"),
            _fmt(cider / floor if cider is not None and floor else None, ".2f"), _fmt(cap.get("Bleu_4"), ".3f"),
            _fmt(vqa.get("overall"), ".2f"), _fmt(vqa.get("floor", {}).get("overall"), ".2f"),
            _fmt(cost.get("tokens_to_llm"), "d"), _fmt(cost.get("train_wall_s"), ".1f"),
            _fmt(cost.get("samples_per_s"), ".1f"),
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *rows]]
    return "\n".join(lines)
