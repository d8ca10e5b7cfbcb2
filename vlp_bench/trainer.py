"""The one trainer every method shares. It never names a method: it asks the method for its
stages, the parameters of each stage and the loss of a batch (see vlp_bench/method.py).

AdamW with linear warm-up and cosine decay per stage, gradient clipping and accumulation, bf16
autocast on CUDA, periodic evaluation (excluded from the training clock), seeded and deterministic
on CPU. Wall-clock is read after synchronising the device; the first steps are excluded from the
median step time (warm-up: allocator, kernel selection).
"""

from __future__ import annotations

import contextlib
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from vlp_bench.method import Method
from vlp_bench.progress import progress_bar
from vlp_bench.results import MetricsLog


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps over all stages; the tiny baseline's loss flattens after a few hundred
    batch_size: int = 32  # samples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    lr: float = 1e-3  # a small bridge from scratch tolerates a high rate; paper-scale recipes use 1e-4
    weight_decay: float = 0.05  # BLIP-2's value
    warmup_steps: int = 100  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    log_every: int = 25  # steps between metrics.jsonl rows
    eval_every: int = 250  # steps between validation evaluations (0 = final only): a learning curve of a few points
    eval_images: int = 100  # validation images per periodic evaluation (the final one uses the whole test split)
    warmup_exclude: int = 5  # first steps of each stage left out of the median step time

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.eval_images < 1:
            raise ValueError("warmup_steps and eval_every must be >= 0, eval_images >= 1")


class NonFiniteLoss(RuntimeError):
    pass


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = min(cfg.warmup_steps, max(total - 1, 0))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024)


def train(method: Method, batches: Iterator[dict], cfg: TrainConfig, device: torch.device, log: MetricsLog,
          evaluate: Callable[[int], dict] | None = None, progress: bool = True) -> dict:
    """Train `method` for cfg.steps optimizer steps; returns the cost summary for results.json."""
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    schedule = [(stage, s) for stage in method.stages(cfg.steps) for s in range(stage.steps)]
    total = len(schedule)
    step = samples = 0
    wall = 0.0
    step_times: list[float] = []
    tokens_to_llm = None
    window: list[float] = []
    current = None
    per_stage: list[dict] = []  # cost of each stage, so that e.g. BLIP-2's stage 1 is counted
    for stage, s in progress_bar(schedule, f"train {method.name}", progress):
        if stage is not current:  # a new stage: its own parameters, optimizer and schedule
            current = stage
            per_stage.append({"name": stage.name, "steps": 0, "samples": 0, "train_wall_s": 0.0})
            params = method.trainable_parameters(stage)
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            method.train()
        method.set_progress(step / total)
        lr = lr_at(s, stage.steps, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        _sync(device)
        t0 = time.perf_counter()
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            batch["images"] = batch["images"].to(device, non_blocking=True)
            with autocast:
                out = method.training_loss(batch, stage)
            (out.loss / cfg.grad_accum).backward()
            loss_sum += out.loss.detach().float().item() / cfg.grad_accum
            samples += len(batch["images"])
            per_stage[-1]["samples"] += len(batch["images"])
            tokens_to_llm = out.tokens_to_llm
        if not math.isfinite(loss_sum):
            raise NonFiniteLoss(f"loss is {loss_sum} at step {step} (stage {stage.name})")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        dt = time.perf_counter() - t0
        wall += dt
        per_stage[-1]["steps"] += 1
        per_stage[-1]["train_wall_s"] += dt
        if s >= cfg.warmup_exclude:
            step_times.append(dt)
        step += 1
        window.append(loss_sum)
        if step % cfg.log_every == 0 or step == total:
            log.append({"step": step, "stage": stage.name, "samples": samples, "wall_s": round(wall, 4),
                        "loss": sum(window) / len(window), "lr": lr, "tokens_to_llm": tokens_to_llm})
            window = []
        if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            method.eval()
            log.append({"step": step, "samples": samples, "wall_s": round(wall, 4), "eval": evaluate(step)})
            method.train()
    method.eval()
    median = statistics.median(step_times) if step_times else (wall / max(step, 1))
    batch_per_step = cfg.batch_size * cfg.grad_accum
    return {
        "steps": step,
        "samples_seen": samples,
        "train_wall_s": wall,
        "median_step_s": median,
        "samples_per_s": batch_per_step / median if median > 0 else None,
        "tokens_to_llm": tokens_to_llm,
        "trainable_params": sum(p.numel() for p in method.parameters() if p.requires_grad),
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        "stages": per_stage,
    }
