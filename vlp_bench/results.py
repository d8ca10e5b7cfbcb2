"""Run records and their schema. Every file is written atomically (vlp_bench/files.py).

OUT/<run-id>/
    config.json            the resolved experiment config this run used
    metrics.jsonl          one row per logged step, plus evaluation rows
    samples_caption.jsonl  per image: generated caption and references (re-scorable)
    weights.safetensors    the trained weights (train.keep_weights), and weights-<task>.safetensors
                           those a phase fine-tuned before evaluating <task>
    evals/<name>/          `vlp-bench evaluate run`: results.json (kind "evaluation") and samples
    results.json           the summary below: written first with status "running", rewritten as
                           the run ends ("finished", "failed", "pruned" or "interrupted")

results.json, schema_version 7 (docs/results-schema.md describes every field):
    {schema_version, run_id, method, seed, status, config, metrics: {caption: {...}},
     cost: {...}, data: {...}, env: {...}}
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from vlp_bench.files import write_jsonl

# 2: FLOPs and the validation learning curve (step 0 .. last); 3: `data` (the training data's source and
# skipped samples) and `distributed`; 4: `env.plugins` (the plug-in package of each method and task that
# did not come with vlp-bench); 5: `metrics.vqa.protocol` (zero-shot or fine-tuned) and `cost.task_finetune`;
# 6: `weights` (the kept weights.safetensors) and evals/<name>/results.json (kind "evaluation": `vlp-bench
# evaluate run`); 7: `cost.eval_wall_s_by_task` (and in the validation rows), `cost.feature_cache` and the
# `*_without_cache` costs (data.feature_cache), `distributed.parallel`,
# `llm_bytes`, `llm_bytes_per_rank`; see docs/results-schema.md
SCHEMA_VERSION = 7
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7)  # older records read fine: the fields they lack are just absent


class MetricsLog:
    """metrics.jsonl, rewritten atomically on every append (rows are few and small)."""

    def __init__(self, path: Path | None, trackers=None):
        self.path = None if path is None else Path(path)  # None: kept in memory only
        self.rows: list[dict] = []
        self.trackers = trackers  # vlp_bench.trackers.Trackers mirroring every new row, or None

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is not None:
            write_jsonl(self.path, self.rows)
        if self.trackers is not None:
            self.trackers.log(row)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info(device) -> dict:
    import torch

    from vlp_bench.registry import METHODS, TASKS

    versions = {}
    for pkg in ("vlp-bench", "torch", "transformers", "timm", "tokenizers", "pycocoevalcap", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "plugins": {f"{r.kind}s": {n: r.origin(n) for n in r.names() if r.origin(n) != "built-in"}
                    for r in (METHODS, TASKS)},  # e.g. {"methods": {"stride": "vlp-bench-stride 0.1.0"}}
    }
