"""The trainer's settings and running counters: TrainConfig (the `[train]` table, validated and
saved with every run), the learning-rate schedule, and TrainState, what a checkpoint carries."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vlp_bench.train.flops import FlopCount


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps over all stages; the tiny baseline's validation loss flattens after ~200 (docs/decisions.md, "The default budget")
    batch_size: int = 32  # samples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    lr: float = 1e-3  # a small bridge from scratch tolerates a high rate; paper-scale recipes use 1e-4
    weight_decay: float = 0.05  # BLIP-2's value
    warmup_steps: int = 30  # linear warm-up (a tenth of the steps), then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    log_every: int = 20  # steps between metrics.jsonl rows (and validation-loss readings: 15 a run)
    eval_every: int = 100  # steps between validation evaluations (0 = final only): a learning curve of a few points
    eval_images: int = 100  # validation images per periodic evaluation (the final one uses the whole test split)
    # validation captions whose teacher-forced loss is read at every log row (0 = none): the cheap,
    # frequent signal of docs/costs.md; the first N validation images, one caption each
    val_loss_images: int = 64
    warmup_exclude: int = 5  # first steps of each stage left out of the median step time
    checkpoint_every: int = 100  # steps between checkpoints (0 = none): a killed run loses at most this many
    # keep the trained weights with the finished run (weights.safetensors, and weights-<task>.safetensors for a
    # task a phase fine-tuned for): `vlp-bench evaluate run` and `predict` start from them; only what trained,
    # so a few MB on the tiny world and a few hundred at paper scale
    keep_weights: bool = True
    count_flops: bool = True  # count each step's FLOPs (once per new shape, outside the clock); false = no FLOPs
    peak_tflops: float = 0.0  # device peak for MFU; 0 = look the CUDA device up (bf16 dense), none on CPU
    # torch.compile backend for the backbones' transformer blocks in training ("inductor": fused kernels on
    # a GPU); "" = eager: compiling costs a minute or so per run and pays only at GPU scale. Evaluation
    # and FLOP counting stay eager.
    compile: str = ""
    # how a torchrun job splits the work (docs/scale.md): "ddp" = every rank holds the whole model, DDP
    # averages the gradients; "fsdp" = the same, but the frozen LLM is sharded over the ranks by FSDP2
    # (1/N of its weights per rank), for an LLM too large for one device. One process: no difference.
    parallel: str = "ddp"

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        counts = (self.warmup_steps, self.eval_every, self.checkpoint_every, self.val_loss_images)
        if min(counts) < 0 or self.eval_images < 1:
            raise ValueError("warmup_steps, eval_every, checkpoint_every and val_loss_images must be >= 0, "
                             "eval_images >= 1")
        if self.peak_tflops < 0:
            raise ValueError(f"peak_tflops must be >= 0, got {self.peak_tflops}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.compile and self.compile not in torch.compiler.list_backends(exclude_tags=()):
            raise ValueError(f"compile: unknown torch.compile backend '{self.compile}' "
                             f"(use one of {', '.join(torch.compiler.list_backends())}, or \"\" for eager)")


class NonFiniteLoss(RuntimeError):
    pass


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = min(cfg.warmup_steps, max(total - 1, 0))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainState:
    """The trainer's running counters: what a checkpoint carries besides the weights, optimizer,
    data position and RNG, so that a resumed run ends exactly as an uninterrupted one, counting
    each step once. Stored in the checkpoint as a plain dict (dataclasses.asdict, and
    TrainState(**d) back): plain containers load with torch.load(weights_only=True)."""

    step: int = 0  # optimizer steps done, over all stages
    samples: int = 0  # samples trained on (the job's: all ranks)
    wall: float = 0.0  # seconds of training on the clock (FLOP replay, evaluation, checkpoints excluded)
    step_times: list[float] = field(default_factory=list)  # seconds of each step past its stage's warm-up
    window: list[float] = field(default_factory=list)  # losses since the last metrics row (its mean)
    # one dict per stage so far: name, steps, samples, train_wall_s and flops (by part and pass); a
    # plain dict updated in place, which is also what results.json's cost.stages is built from
    per_stage: list[dict] = field(default_factory=list)
    tokens_to_llm: int | None = None  # visual tokens per sample the LLM received, last micro-batch
    flops: dict = field(default_factory=dict)  # FLOPs so far, by part and pass (a FlopCount's by_part)
    timed_flops: int = 0  # FLOPs of the steps in step_times: achieved FLOP/s = timed_flops / sum(step_times)
    flop_counts: int = 0  # step replays under the FLOP counter (one per new shape key)
    feature_cache: dict = field(default_factory=dict)  # data.feature_cache's counters (FeatureCache.counts)

    def record(self, loss: float, step_flops: FlopCount, dt: float, timed: bool) -> None:
        """Add a finished step to the counters; `timed`: past its stage's warm-up, so it counts in
        the median step time and the achieved FLOP/s."""
        self.wall += dt
        self.per_stage[-1]["steps"] += 1
        self.per_stage[-1]["train_wall_s"] += dt
        FlopCount(self.flops).update(step_flops)  # plain dicts (they go into checkpoints), updated in place
        FlopCount(self.per_stage[-1]["flops"]).update(step_flops)
        if timed:
            self.step_times.append(dt)
            self.timed_flops += step_flops.total
        self.step += 1
        self.window.append(loss)

    def row(self, stage: str, step_flops: FlopCount, lr: float) -> dict:
        """A metrics.jsonl training row: the counters so far and the mean loss since the previous
        row (whose window it empties)."""
        row = {"step": self.step, "stage": stage, "samples": self.samples, "wall_s": round(self.wall, 4),
               "flops": FlopCount(self.flops).total, "step_flops": step_flops.total,
               "loss": sum(self.window) / len(self.window), "lr": lr, "tokens_to_llm": self.tokens_to_llm}
        self.window = []
        return row
