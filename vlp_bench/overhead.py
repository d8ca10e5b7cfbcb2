"""`vlp-bench bench --overhead`: what the harness costs. The trainer (vlp_bench.train.trainer.train:
data loading, its timing and synchronisation, FLOP accounting, metrics rows written to a file, a
checkpoint halfway) against a bare loop of the same method, batches, optimizer and learning-rate
schedule, on the experiment's real training batches. Evaluation is left out of both (no
evaluations, no validation loss).

The two run in interleaved rounds, alternating which goes first, each from the same seed and the
same first batch; each round's cost is its whole wall-clock over its steps (the mean step, so that
everything the harness adds is counted, not only what falls inside its own clock). The overhead is
the median over rounds of trainer / bare - 1, with the rounds' spread beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlp_bench.errors import UserError
from vlp_bench.log import say, text_table
from vlp_bench.registry import METHODS
from vlp_bench.results import MetricsLog
from vlp_bench.train.measure import sync
from vlp_bench.train.state import lr_at
from vlp_bench.train.optim import set_lr, stage_optimizer
from vlp_bench.train.trainer import train


def bare_loop(method, batches, cfg, device: torch.device) -> None:
    """The training steps and nothing else: each stage's AdamW (the trainer's parameter groups and
    schedule), forward, backward, clipping, step; the loss read once a step, as any loop does."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    method.train()
    stages, done = method.stages(cfg.steps), 0
    total = sum(stage.steps for stage in stages)
    for stage in stages:
        params, opt = stage_optimizer(method, stage, cfg)
        for s in range(stage.steps):
            method.set_progress(done / total)  # the method's curriculum: part of what it computes
            set_lr(opt, lr_at(s, stage.steps, cfg))
            for _ in range(cfg.grad_accum):
                batch = next(batches)
                batch["images"] = batch["images"].to(device, non_blocking=True)
                with autocast:
                    loss = method.training_loss(batch, stage).loss / cfg.grad_accum
                loss.backward()
                loss.item()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            method.zero_grad(set_to_none=True)
            done += 1
    method.eval()


def _round(exp, name: str, cfg, harness: bool) -> float:
    """Seconds per step of one round: a fresh method and batches from seed 0, timed end to end."""
    torch.manual_seed(0)
    method = METHODS.get(name)(exp.cfg.methods[name], exp.backbones).to(exp.device)
    batches = exp.batches(0)
    with tempfile.TemporaryDirectory(prefix="vlp-overhead-") as tmp:
        sync(exp.device)
        t0 = time.perf_counter()
        if harness:
            train(method, batches, cfg, exp.device, MetricsLog(Path(tmp) / "metrics.jsonl"), progress=False,
                  checkpoint=Path(tmp) / "checkpoint.pt")
        else:
            bare_loop(method, iter(batches), cfg, exp.device)
        sync(exp.device)
        return (time.perf_counter() - t0) / cfg.steps


def measure(exp, names: list[str], steps: int, rounds: int) -> dict:
    """{steps, rounds, settings, rows: one per method (trainer and bare s/step per round, overhead)}."""
    if steps < 2 or rounds < 1:
        raise UserError(f"--overhead needs --steps >= 2 and --rounds >= 1, got {steps} and {rounds}")
    cfg = dataclasses.replace(exp.cfg.train, steps=steps, eval_every=0, val_loss_images=0,
                              checkpoint_every=steps // 2)  # one checkpoint, halfway, is part of the harness
    rows = []
    for name in names:
        per_round = []
        for r in range(rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            times = {}
            for harness in order:
                say(f"{name}: round {r + 1}/{rounds}, {'trainer' if harness else 'bare loop'}, {steps} steps")
                times[harness] = _round(exp, name, cfg, harness)
            per_round.append({"trainer_s": times[True], "bare_s": times[False],
                              "overhead": times[True] / times[False] - 1})
        overheads = [p["overhead"] for p in per_round]
        rows.append({"method": name, "rounds": per_round, "overhead": statistics.median(overheads),
                     "overhead_min": min(overheads), "overhead_max": max(overheads),
                     "trainer_s": statistics.median(p["trainer_s"] for p in per_round),
                     "bare_s": statistics.median(p["bare_s"] for p in per_round)})
    return {"steps": steps, "rounds": rounds, "batch_size": cfg.batch_size, "log_every": cfg.log_every,
            "checkpoint_every": cfg.checkpoint_every, "count_flops": cfg.count_flops,
            "device": str(exp.device), "threads": torch.get_num_threads(), "rows": rows}


def format_table(table: dict) -> str:
    rows = [[r["method"], f"{r['trainer_s'] * 1e3:.1f}", f"{r['bare_s'] * 1e3:.1f}", f"{100 * r['overhead']:+.2f}%",
             f"{100 * r['overhead_min']:+.2f}% .. {100 * r['overhead_max']:+.2f}%"] for r in table["rows"]]
    title = (f"harness overhead on {table['device']} ({table['threads']} threads): {table['rounds']} interleaved rounds "
             f"of {table['steps']} steps, batch {table['batch_size']}; the trainer logs every {table['log_every']} "
             f"steps, checkpoints at step {table['checkpoint_every']}, counts FLOPs: {table['count_flops']}")
    return "\n".join([title, text_table(["method", "trainer ms/step", "bare ms/step", "overhead (median)",
                                         "rounds' spread"], rows)])
