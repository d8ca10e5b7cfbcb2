"""The one trainer every method shares. It never names a method: it asks the method for its
stages, the parameters of each stage and the loss of a batch (see vlp_bench/method.py).

AdamW with linear warm-up and cosine decay per stage, gradient clipping and accumulation, bf16
autocast on CUDA, periodic evaluation (excluded from the training clock), seeded and deterministic
on CPU. Wall-clock is read after synchronising the device; the first steps are excluded from the
median step time (warm-up: allocator, kernel selection).

FLOPs (vlp_bench.train.flops) are counted on the real batches as they ran: a step's forward and backward
is replayed once under the counter for each new shape (Method.shape_key), outside the clock, with
the RNG restored and no gradient written, so counting changes neither the result nor the timing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from vlp_bench.train import dist
from vlp_bench.data.images import TrainBatches
from vlp_bench.train.flops import PASSES, UNIT, FlopCount, FlopCounter
from vlp_bench.method import Method, Stage, StepOutput
from vlp_bench.log import progress_bar
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
    checkpoint_every: int = 250  # steps between checkpoints (0 = none): a killed run loses at most this many
    count_flops: bool = True  # count each step's FLOPs (once per new shape, outside the clock); false = no FLOPs
    peak_tflops: float = 0.0  # device peak for MFU; 0 = look the CUDA device up (bf16 dense), none on CPU
    # torch.compile backend for the backbones' transformer blocks in training ("inductor": fused kernels on
    # a GPU); "" = eager: compiling costs a minute or so per run and pays only at GPU scale. Evaluation
    # and FLOP counting stay eager.
    compile: str = ""

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.checkpoint_every < 0 or self.eval_images < 1:
            raise ValueError("warmup_steps, eval_every and checkpoint_every must be >= 0, eval_images >= 1")
        if self.peak_tflops < 0:
            raise ValueError(f"peak_tflops must be >= 0, got {self.peak_tflops}")
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets, matched
# in order against torch.cuda.get_device_name(); set train.peak_tflops for anything else.
PEAK_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H100", 989.4), ("A100", 312.0),
               ("L40S", 362.05), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.2)]


def peak_flops_per_s(device: torch.device, cfg: TrainConfig) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None  # no meaningful tensor-core peak for a CPU: MFU is reported on CUDA only
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in name), None)


def count_step(method: Method, batch: dict, stage: Stage, autocast) -> tuple[FlopCount, StepOutput]:
    """The FLOPs of one forward and backward of training_loss(batch, stage), by part and pass.
    The RNG is restored afterwards and gradients are returned rather than stored, so the real step
    that follows runs exactly as if this replay had not happened."""
    leaves = [p for p in method.parameters() if p.requires_grad]  # the leaves .backward() reaches
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    # eagerly: the counter must see every operation, and a compiled block first called under the
    # counter's dispatch mode would be marked "do not compile" for good
    with eager(), torch.random.fork_rng(devices=devices), FlopCounter(*method.flop_parts()) as counter:
        with autocast:
            out = method.training_loss(batch, stage)
        torch.autograd.grad(out.loss, leaves, allow_unused=True)
    return counter.result, out


def reset_peak_memory(device: torch.device) -> str:
    """Start a run's peak-memory window (the runs of an experiment share one process); returns the
    kind of peak that peak_memory_bytes() will then read."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak RSS (VmHWM) to the current RSS
        rss, hwm = _proc_status_bytes("VmRSS:"), _proc_status_bytes("VmHWM:")
    except (OSError, StopIteration, ValueError):
        return "process_max_rss"  # elsewhere: the peak since the process started, earlier runs included
    # A kernel or sandbox may accept the write and keep the old peak: then say so rather than report
    # an earlier run's peak as this run's (64 MiB of slack for memory freed since the reset).
    return "run_peak_rss" if hwm - rss < 64 * 2**20 else "process_max_rss"


def _proc_status_bytes(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field))) * 1024


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        return _proc_status_bytes("VmHWM:")
    except (OSError, StopIteration, ValueError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return int(rss if sys.platform == "darwin" else rss * 1024)


def train(method: Method, batches: TrainBatches, cfg: TrainConfig, device: torch.device, log: MetricsLog,
          evaluate: Callable[[int], dict] | None = None, progress: bool = True,
          checkpoint: Path | None = None, stages: list[Stage] | None = None,
          decoder_batches: Callable[[], TrainBatches] | None = None) -> dict:
    """Train `method` for cfg.steps optimizer steps; returns the cost summary for results.json.

    With `checkpoint`, the state (trainable weights, optimizer, data position, RNG, cost counters,
    metrics rows) is saved there every cfg.checkpoint_every steps, and training resumes from it when
    the file exists: the resumed run ends exactly as an uninterrupted one, counting each step once.
    With `stages`, those are trained instead of method.stages(cfg.steps): a phase inside another
    run (decoder_finetune), which leaves that run's peak-memory window alone. With
    `decoder_batches`, each evaluation is preceded by the method's decoder stage (decoder_finetune).

    Under torchrun (vlp_bench.train.dist) every rank calls this with its slice of each batch; the
    returned costs are the job's (samples and FLOPs of all ranks), evaluation is rank zero's."""
    group = dist.group()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    nested = stages is not None
    if cfg.compile:
        compile_blocks(method, cfg.compile)
    schedule = [(stage, s) for stage in (stages if nested else method.stages(cfg.steps)) for s in range(stage.steps)]
    total = len(schedule)
    memory_kind = "within_run" if nested else reset_peak_memory(device)
    st = {"step": 0, "samples": 0, "wall": 0.0, "step_times": [], "window": [], "per_stage": [],
          "tokens_to_llm": None, "flops": {}, "timed_flops": 0, "flop_counts": 0}
    flop_cache: dict = {}  # (stage, image shape, method.shape_key) -> FlopCount of one micro-batch
    opt_state = opt_stage = None
    if checkpoint is not None and checkpoint.is_file():
        st, opt_state, opt_stage = load_checkpoint(checkpoint, method, batches, log, device, group.rank)
    current = None
    decoder = lambda: decoder_finetune(method, decoder_batches, cfg, device)  # noqa: E731 (before each evaluation)
    if evaluate is not None and cfg.eval_every and st["step"] == 0:  # the learning curve starts untrained
        _evaluate(method, evaluate, log, st, decoder, group)
    parts = [*method.flop_parts()[0], method.flop_parts()[1]]  # the names a job-wide FLOP sum adds up
    for i, (stage, s) in enumerate(progress_bar(schedule, f"train {method.name}", progress and group.is_main)):
        if i < st["step"]:
            continue  # done before the checkpoint this run resumed from
        if stage is not current:  # a new stage: its own parameters, optimizer and schedule
            current = stage
            if not st["per_stage"] or st["per_stage"][-1]["name"] != stage.name:
                st["per_stage"].append({"name": stage.name, "steps": 0, "samples": 0, "train_wall_s": 0.0,
                                        "flops": {}})
            params = method.trainable_parameters(stage)
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            if opt_state is not None and opt_stage == stage.name:  # saved at the end of an earlier
                opt.load_state_dict(opt_state)  # stage, it does not belong here: this stage starts fresh
            opt_state = None
            method.train()
        method.set_progress(st["step"] / total)
        lr = lr_at(s, stage.steps, cfg)
        for param_group in opt.param_groups:
            param_group["lr"] = lr
        _sync(device)
        t0 = time.perf_counter()
        loss_sum, paused, step_flops = 0.0, 0.0, FlopCount()
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            batch["images"] = batch["images"].to(device, non_blocking=True)
            if cfg.count_flops:  # off the clock
                _sync(device)
                c0 = time.perf_counter()
                key = method.shape_key(batch, stage)
                key = None if key is None else (stage.name, tuple(batch["images"].shape), key)
                if key is None or key not in flop_cache:
                    flop_cache[key] = count_step(method, batch, stage, autocast)[0]
                    st["flop_counts"] += 1
                step_flops.update(flop_cache[key])
                _sync(device)
                paused += time.perf_counter() - c0
            with autocast:
                out = method.training_loss(batch, stage)
            n = len(batch["images"])
            weight = float(n if out.weight is None else out.weight)
            total_weight, n = group.sum([weight, n])  # this rank's share of the whole micro-batch
            loss = out.loss * (weight * group.world / total_weight) if group.active else out.loss
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float().item() / cfg.grad_accum
            st["samples"] += int(n)
            st["per_stage"][-1]["samples"] += int(n)
            st["tokens_to_llm"] = out.tokens_to_llm
        group.average_gradients(params)
        if group.active:  # the job's loss (the mean of the weighted losses) and FLOPs
            loss_sum, step_flops = _reduce_step(group, loss_sum, step_flops, parts)
        if not math.isfinite(loss_sum):
            raise NonFiniteLoss(f"loss is {loss_sum} at step {st['step']} (stage {stage.name})")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        method.zero_grad(set_to_none=True)  # all of them: a later stage must not inherit stale gradients
        _sync(device)
        dt = time.perf_counter() - t0 - paused
        st["wall"] += dt
        st["per_stage"][-1]["steps"] += 1
        st["per_stage"][-1]["train_wall_s"] += dt
        FlopCount(st["flops"]).update(step_flops)  # st holds plain dicts (they go into checkpoints),
        FlopCount(st["per_stage"][-1]["flops"]).update(step_flops)  # updated in place
        if s >= cfg.warmup_exclude:
            st["step_times"].append(dt)
            st["timed_flops"] += step_flops.total
        st["step"] += 1
        step = st["step"]
        st["window"].append(loss_sum)
        if step % cfg.log_every == 0 or step == total:
            log.append({"step": step, "stage": stage.name, "samples": st["samples"], "wall_s": round(st["wall"], 4),
                        "flops": FlopCount(st["flops"]).total, "step_flops": step_flops.total,
                        "loss": sum(st["window"]) / len(st["window"]), "lr": lr, "tokens_to_llm": st["tokens_to_llm"]})
            st["window"] = []
        if evaluate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
            _evaluate(method, evaluate, log, st, decoder, group)
        if checkpoint is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            rng = group.gather(_rng_state())  # every rank's: each resumes its own random stream
            if group.is_main:
                save_checkpoint(checkpoint, method, opt, stage.name, batches, log, st, rng)
            group.barrier()
    method.eval()
    times = st["step_times"]
    median = statistics.median(times) if times else (st["wall"] / max(st["step"], 1))
    batch_per_step = cfg.batch_size * cfg.grad_accum
    achieved = st["timed_flops"] / sum(times) if cfg.count_flops and times and sum(times) > 0 else None
    peak = peak_flops_per_s(device, cfg)
    peak = peak * group.world if peak else peak  # the job's: its FLOPs are every rank's
    return {
        "steps": st["step"],
        "samples_seen": st["samples"],
        "train_wall_s": st["wall"],
        "median_step_s": median,
        "samples_per_s": batch_per_step / median if median > 0 else None,
        "tokens_to_llm": st["tokens_to_llm"],
        "trainable_params": sum(p.numel() for p in method.parameters() if p.requires_grad),
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": memory_kind,
        **(flop_summary(st["flops"], st["samples"]) if cfg.count_flops else {}),
        "flop_counts": st["flop_counts"],
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak,
        "mfu": achieved / peak if achieved is not None and peak else None,
        "stages": [_stage_summary(stage, cfg.count_flops) for stage in st["per_stage"]],
    }


def compile_blocks(method: Method, backend: str) -> int:
    """torch.compile, in place, the backbones' transformer blocks: timm's ViT blocks and Hugging
    Face decoder layers (the text side's LM copy included). They are where most of a step's time
    goes and they repeat, so one compiled graph serves each kind. vlp-bench's own bridge layers
    stay eager: token merging changes shapes inside them, and inductor's dynamic shapes failed on
    that (torch 2.11, H100). Returns the number of blocks; a method is compiled once."""
    from timm.models.vision_transformer import Block as ViTBlock

    try:
        from transformers.modeling_layers import GradientCheckpointingLayer as DecoderLayer
    except ImportError:  # older transformers
        DecoderLayer = ()
    if getattr(method, "_compiled_blocks", None) is not None:
        return method._compiled_blocks
    n = 0
    for module in method.modules():
        if isinstance(module, (ViTBlock, DecoderLayer)) or type(module).__name__ == "EvaBlock":
            module.compile(backend=backend)
            n += 1
    method._compiled_blocks = n
    return n


def eager():
    """Evaluation (generation: growing lengths, KV caches) runs the compiled blocks' eager code."""
    return torch.compiler.set_stance("force_eager")


@contextlib.contextmanager
def decoder_finetune(method: Method, make_batches: Callable[[], TrainBatches] | None, cfg: TrainConfig,
                     device: torch.device):
    """Train method.decoder_stage() (if any) on the current weights, yield its cost summary, then
    put the weights back: evaluation sees the fine-tuned model, training goes on from where it
    was. The same batches every time (make_batches) and its own RNG stream, so the phase neither
    changes the run nor differs between evaluations except by the weights it starts from."""
    stage = method.decoder_stage()
    if stage is None or make_batches is None:
        yield None
        return
    saved = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    sub = dataclasses.replace(cfg, steps=stage.steps, warmup_steps=min(cfg.warmup_steps, stage.steps // 10),
                              eval_every=0, checkpoint_every=0, log_every=max(1, stage.steps // 10),
                              warmup_exclude=min(cfg.warmup_exclude, stage.steps - 1))
    log = MetricsLog(None)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            cost = train(method, make_batches(), sub, device, log, progress=False, stages=[stage])
        keep = ("steps", "samples_seen", "train_wall_s", "median_step_s", "flops_unit", "train_flops",
                "train_flops_per_sample")
        yield {**{k: cost[k] for k in keep if k in cost}, "final_loss": log.rows[-1]["loss"]}
    finally:
        with torch.no_grad():
            for name, p in method.named_parameters():
                if name in saved:
                    p.copy_(saved[name])


def _stage_summary(stage: dict, with_flops: bool) -> dict:
    out = {k: v for k, v in stage.items() if k != "flops"}
    return {**out, **flop_summary(stage["flops"], stage["samples"])} if with_flops else out


def flop_summary(by_part: dict, samples: int) -> dict:
    """results.json's FLOP fields from by_part[part][pass] totals over `samples` samples."""
    count = FlopCount(by_part)
    samples = max(samples, 1)
    return {"flops_unit": UNIT, "train_flops": count.total, "train_flops_forward": count.forward,
            "train_flops_backward": count.backward, "train_flops_per_sample": count.total / samples,
            "flops_by_part": count.by_part, "flops_per_sample_by_part": count.scaled(1 / samples)}


def _reduce_step(group: dist.Group, loss: float, flops: FlopCount, parts: list[str]) -> tuple[float, FlopCount]:
    """One all-reduce for a step's figures: the mean of the ranks' (weighted) losses, which is the
    one-process loss of the whole batch, and the sum of their FLOPs."""
    keys = [(part, p) for part in parts for p in PASSES]
    summed = group.sum([loss, *(flops.by_part.get(part, {}).get(p, 0) for part, p in keys)])
    job = FlopCount()
    for (part, p), n in zip(keys, summed[1:]):
        if part in flops.by_part or n:
            job.add(part, p, int(n))
    return summed[0] / group.world, job


def _evaluate(method: Method, evaluate: Callable[[int], dict], log: MetricsLog, st: dict, decoder,
              group: dist.Group) -> None:
    """One point of the learning curve (validation subset), at the training cost spent so far; a
    decoder phase before it (if the method has one) is recorded in the row, apart from that cost.
    Rank zero's alone, with collectives off; the other ranks wait for it."""
    if group.is_main:
        method.eval()
        row = {"step": st["step"], "samples": st["samples"], "wall_s": round(st["wall"], 4),
               "flops": FlopCount(st["flops"]).total, "split": "val"}
        with dist.local(), eager(), decoder() as cost:
            row["eval"] = evaluate(st["step"])
        log.append({**row, **({"decoder": cost} if cost else {})})
        method.train()
    group.barrier()


def _rng_state() -> dict:
    return {"rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_checkpoint(path: Path, method: Method, opt, stage: str, batches: TrainBatches, log: MetricsLog,
                    st: dict, rng: list[dict]) -> None:
    """One file, written to a temporary name and renamed: a kill never leaves half a checkpoint.
    `rng`: every rank's random state, in rank order (one entry without torchrun)."""
    state = {
        "weights": {n: p.detach().cpu() for n, p in method.named_parameters() if p.requires_grad},
        "optimizer": opt.state_dict(), "stage": stage, "batches": batches.state_dict(), "train": st,
        "rows": log.rows, "rng": rng,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, method: Method, batches: TrainBatches, log: MetricsLog,
                    device, rank: int = 0) -> tuple[dict, dict, str]:
    state = torch.load(path, map_location="cpu", weights_only=True)  # no pickle of arbitrary objects
    params = dict(method.named_parameters())
    with torch.no_grad():
        for name, value in state["weights"].items():
            params[name].copy_(value.to(device))
    batches.load_state_dict(state["batches"])
    rng = state["rng"]
    if isinstance(rng, torch.Tensor):  # a checkpoint of vlp-bench 0.1 (one process's state)
        rng = [{"rng": rng, "cuda_rng": state.get("cuda_rng", [])}]
    rng = rng[rank] if rank < len(rng) else rng[0]  # resumed with more ranks: rank zero's stream
    torch.set_rng_state(rng["rng"])
    if rng["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda_rng"])
    log.rows = list(state["rows"])
    return state["train"], state["optimizer"], state["stage"]
