"""The one trainer every method shares. It never names a method: it asks the method for its
stages, the parameters of each stage and the loss of a batch (see vlp_bench/method.py).

AdamW with linear warm-up and cosine decay per stage, gradient clipping and accumulation, bf16
autocast on CUDA, periodic evaluation (excluded from the training clock), seeded and deterministic
on CPU. Wall-clock is read after synchronising the device; the first steps are excluded from the
median step time (warm-up: allocator, kernel selection).

FLOPs (vlp_bench.train.flops) are counted on the real batches as they ran: a step's forward and backward
is replayed once under the counter for each new shape (Method.shape_key), outside the clock, with
the RNG restored and no gradient written, so counting changes neither the result nor the timing.

The loop calls its components from their own modules: checkpoint (save and resume), measure
(device sync, peak memory, peak FLOP/s), flops (the step replay and the results' FLOP fields),
compile (train.compile), dist (data parallel: DDP per stage), features (data.feature_cache). Its
counters are one TrainState.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from vlp_bench.data.images import TrainBatches
from vlp_bench.method import Method, Stage
from vlp_bench.log import progress_bar
from vlp_bench.results import MetricsLog
from vlp_bench.train import dist
from vlp_bench.train.checkpoint import load_checkpoint, rng_state, save_checkpoint
from vlp_bench.train.compile import compile_blocks, eager
from vlp_bench.train.features import FeatureCache
from vlp_bench.train.flops import PASSES, FlopCount, count_step, flop_summary, stage_summary
from vlp_bench.train.measure import peak_flops_per_s, peak_memory_bytes, reset_peak_memory, sync
from vlp_bench.train.optim import set_lr, stage_optimizer
from vlp_bench.train.state import NonFiniteLoss, TrainConfig, TrainState, lr_at
from vlp_bench.train.validation import ValidationLoss


@dataclass
class _Run:
    """What the steps of one train() call share, so that its helpers take one argument, not eight."""

    method: Method
    batches: TrainBatches
    cfg: TrainConfig
    device: torch.device
    group: dist.Group
    autocast: contextlib.AbstractContextManager  # bf16 on CUDA, nothing elsewhere
    parts: list[str]  # the FLOP parts a job-wide sum adds up (_reduce_step)
    replicas: dist.Replicas | None = None  # the current stage's gradient averaging (DDP under torchrun)
    features: FeatureCache | None = None  # data.feature_cache: the encoder's tokens, computed once per image
    # (stage, image shape, method.shape_key) -> FlopCount of one micro-batch
    flop_cache: dict = field(default_factory=dict)


def train(method: Method, batches: TrainBatches, cfg: TrainConfig, device: torch.device, log: MetricsLog,
          evaluate: Evaluation | Callable[[int], dict] | None = None, progress: bool = True,
          checkpoint: Path | None = None, stages: list[Stage] | None = None,
          decoder_batches: Callable[[], TrainBatches] | None = None, validation_batches: list[dict] = (),
          features: FeatureCache | None = None) -> dict:
    """Train `method` for cfg.steps optimizer steps; returns the cost summary for results.json.

    With `checkpoint`, the state (trainable weights, optimizer, data position, RNG, cost counters,
    metrics rows) is saved there every cfg.checkpoint_every steps, and training resumes from it when
    the file exists: the resumed run ends exactly as an uninterrupted one, counting each step once.
    With `stages`, those are trained instead of method.stages(cfg.steps): a phase inside another
    run (finetune), which leaves that run's peak-memory window alone. `evaluate`: an Evaluation
    (its phases, each fine-tuning on a copy of the weights before its tasks), or `evaluate(step)` ->
    {task: metrics}, run after the method's decoder stage on `decoder_batches` (finetune).
    With `validation_batches`, their validation loss joins the log rows (or, for a method with a decoder
    stage, the evaluation rows: vlp_bench.train.validation). With `features`, each image's encoder
    tokens are computed once (vlp_bench.train.features) and the rows carry the uncached costs too.

    Under torchrun (vlp_bench.train.dist) every rank calls this with its slice of each batch; the
    returned costs are the job's (samples and FLOPs of all ranks); every rank evaluates its share of
    each evaluation's batches and rank zero scores them."""
    group = dist.group()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    nested = stages is not None
    if cfg.compile:
        compile_blocks(method, cfg.compile)
    schedule = [(stage, s) for stage in (stages if nested else method.stages(cfg.steps)) for s in range(stage.steps)]
    total = len(schedule)
    memory_kind = "within_run" if nested else reset_peak_memory(device)
    st, opt_state, opt_stage = TrainState(), None, None
    if checkpoint is not None and checkpoint.is_file():
        saved, opt_state, opt_stage = load_checkpoint(checkpoint, method, batches, log, device, group.rank)
        st = TrainState(**saved)
    evaluation = None if evaluate is None else functools.partial(  # (step, read_loss) -> an evaluation row's fields
        _as_evaluation(evaluate, method, decoder_batches), method, cfg, device)
    validation = ValidationLoss(list(validation_batches), device, autocast)
    # at log rows; at evaluations only where no log row reads it (step 0, a method with a decoder stage)
    read_loss = validation if validation and method.decoder_stage() is None else None
    run = _Run(method, batches, cfg, device, group, autocast, [*method.flop_parts()[0], method.flop_parts()[1]],
               features=features)
    if features is not None:
        features.resume(st.feature_cache)
    if evaluate is not None and cfg.eval_every and st.step == 0:  # the learning curve starts untrained
        _evaluate(method, evaluation, log, st, group, (validation, schedule[0][0]) if schedule else None, _uncached(run, st))
    current = None
    for i, (stage, s) in enumerate(progress_bar(schedule, f"train {method.name}", progress and group.is_main)):
        if i < st.step:
            continue  # done before the checkpoint this run resumed from
        if stage is not current:  # a new stage: its own parameters, optimizer and schedule
            current = stage
            params, opt = _start_stage(run, st, stage, opt_state if opt_stage == stage.name else None)
            opt_state = None
        if not nested:  # a phase inside a run (finetune) trains the model at the run's point of its curricula
            method.set_progress(st.step / total)
        lr = lr_at(s, stage.steps, cfg)
        loss, step_flops, dt = _optimizer_step(run, st, stage, params, opt, lr)
        st.record(loss, step_flops, dt, timed=s >= cfg.warmup_exclude)
        if st.step % cfg.log_every == 0 or st.step == total:
            reads = read_loss and (group.is_main or dist.sharded())  # a sharded LLM runs on every rank
            val = {"val_loss": read_loss(method, stage)} if reads else {}
            log.append({**st.row(stage.name, step_flops, lr), **_uncached(run, st), **val})
        if evaluate is not None and cfg.eval_every and (st.step % cfg.eval_every == 0 or st.step == total):
            _evaluate(method, evaluation, log, st, group, None if read_loss else (validation, stage), _uncached(run, st))
        if checkpoint is not None and cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 and st.step < total:
            _save(run, checkpoint, opt, stage, log, st)
    method.eval()
    return _cost_summary(run, st, memory_kind)


def _start_stage(run: _Run, st: TrainState, stage: Stage, opt_state: dict | None) -> tuple[list, torch.optim.AdamW]:
    """The parameters and a fresh optimizer of a stage the loop enters (or resumes in: then
    `opt_state` is its optimizer's state from the checkpoint; one saved at the end of an earlier
    stage does not belong here, and the caller passes None)."""
    if not st.per_stage or st.per_stage[-1]["name"] != stage.name:
        st.per_stage.append({"name": stage.name, "steps": 0, "samples": 0, "train_wall_s": 0.0, "flops": {}})
    params, opt = stage_optimizer(run.method, stage, run.cfg)
    run.replicas = None  # the previous stage's DDP lets go of its parameters' hooks first
    run.replicas = dist.Replicas(run.method, params)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    run.method.train()
    return params, opt


def _optimizer_step(run: _Run, st: TrainState, stage: Stage, params: list, opt: torch.optim.Optimizer,
                    lr: float) -> tuple[float, FlopCount, float]:
    """One optimizer step over cfg.grad_accum micro-batches; returns the step's loss (the job's
    mean), its FLOPs (the job's) and its seconds on the clock, the FLOP replay left out."""
    cfg, group = run.cfg, run.group
    set_lr(opt, lr)
    sync(run.device)
    t0 = time.perf_counter()
    loss_sum, paused, step_flops = 0.0, 0.0, FlopCount()
    for k in range(cfg.grad_accum):
        batch = next(run.batches)
        batch["images"] = batch["images"].to(run.device, non_blocking=True)
        if run.features is not None:  # on the clock, as it runs: the encoder for images not seen before
            paused += run.features.fill(batch, stage, run.autocast, step_flops if cfg.count_flops else None)
        if cfg.count_flops:  # off the clock
            paused += _count_flops(run, st, batch, stage, step_flops)
        loss_sum += _micro_batch(run, st, batch, stage, last=k == cfg.grad_accum - 1)
    if group.active:  # the job's loss (the mean of the weighted losses) and FLOPs
        loss_sum, step_flops = _reduce_step(group, loss_sum, step_flops, run.parts)
    if not math.isfinite(loss_sum):
        raise NonFiniteLoss(f"loss is {loss_sum} at step {st.step} (stage {stage.name})")
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    run.method.zero_grad(set_to_none=True)  # all of them: a later stage must not inherit stale gradients
    sync(run.device)
    return loss_sum, step_flops, time.perf_counter() - t0 - paused


def _count_flops(run: _Run, st: TrainState, batch: dict, stage: Stage, step_flops: FlopCount) -> float:
    """Add a micro-batch's FLOPs to step_flops: replayed under the counter the first time its
    shape key is seen (every time when the method gives none), from the cache after that. Returns
    the seconds it took, which the caller takes off the clock."""
    sync(run.device)
    c0 = time.perf_counter()
    key = run.method.shape_key(batch, stage)
    key = None if key is None else (stage.name, tuple(batch["images"].shape), key)
    replay = key is None or key not in run.flop_cache
    if run.group.active:  # every rank replays when one does: a replay may run collectives (a sharded LLM)
        replay = run.group.sum([float(replay)])[0] > 0
    if replay:
        devices = [torch.cuda.current_device()] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the replay draws no dropout mask training will see
            run.flop_cache[key] = count_step(run.method, batch, stage, run.autocast)[0]
        st.flop_counts += 1
    step_flops.update(run.flop_cache[key])
    sync(run.device)
    return time.perf_counter() - c0


def _micro_batch(run: _Run, st: TrainState, batch: dict, stage: Stage, last: bool) -> float:
    """Forward and backward of one micro-batch (gradients accumulate); returns its share of the
    step's loss. Under torchrun each rank's loss is weighted by its share of the micro-batch's
    targets, so the ranks' gradients average (DDP, on the step's `last` micro-batch) to the
    one-process gradient."""
    group = run.group
    with run.autocast:
        out = run.replicas.loss(batch, stage, sync=last)
    n = len(batch["images"])
    weight = float(n if out.weight is None else out.weight)
    total_weight, n = group.sum([weight, n])  # this rank's share of the whole micro-batch
    loss = out.loss * (weight * group.world / total_weight) if group.active else out.loss
    (loss / run.cfg.grad_accum).backward()
    st.samples += int(n)
    st.per_stage[-1]["samples"] += int(n)
    st.tokens_to_llm = out.tokens_to_llm
    return loss.detach().float().item() / run.cfg.grad_accum


def _save(run: _Run, path: Path, opt: torch.optim.Optimizer, stage: Stage, log: MetricsLog, st: TrainState) -> None:
    """A checkpoint, written by rank zero with every rank's RNG; the other ranks wait for it."""
    rng = run.group.gather(rng_state())  # every rank's: each resumes its own random stream
    if run.group.is_main:
        save_checkpoint(path, run.method, opt, stage.name, run.batches, log, dataclasses.asdict(st), rng)
    run.group.barrier()


def _cost_summary(run: _Run, st: TrainState, memory_kind: str) -> dict:
    """results.json's cost fields of a finished run: steps, samples, time, memory, FLOPs, MFU."""
    cfg, device = run.cfg, run.device
    times = st.step_times
    median = statistics.median(times) if times else (st.wall / max(st.step, 1))
    batch_per_step = cfg.batch_size * cfg.grad_accum
    achieved = st.timed_flops / sum(times) if cfg.count_flops and times and sum(times) > 0 else None
    peak = peak_flops_per_s(device, cfg)
    peak = peak * run.group.world if peak else peak  # the job's: its FLOPs are every rank's
    return {
        "steps": st.step, "samples_seen": st.samples, "train_wall_s": st.wall, "median_step_s": median,
        "samples_per_s": batch_per_step / median if median > 0 else None, "tokens_to_llm": st.tokens_to_llm,
        "trainable_params": sum(p.numel() for p in run.method.parameters() if p.requires_grad),
        "peak_memory_bytes": peak_memory_bytes(device), "peak_memory_kind": memory_kind,
        **(flop_summary(st.flops, st.samples) if cfg.count_flops else {}),
        "flop_counts": st.flop_counts,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak,
        "mfu": achieved / peak if achieved is not None and peak else None,
        "stages": [stage_summary(stage, cfg.count_flops) for stage in st.per_stage],
        **({} if run.features is None else {"feature_cache": run.features.summary(run.group),
                                            **_uncached(run, st, "train_")}),
    }


def _uncached(run: _Run, st: TrainState, prefix: str = "") -> dict:
    """The cost so far as a run without the feature cache would have spent it (none without one):
    {wall_s, flops}_without_cache, the names prefixed. Every rank calls it (a collective)."""
    if run.features is None:
        return {}
    flops = FlopCount(st.flops).total if run.cfg.count_flops else None
    return {prefix + k: v for k, v in run.features.without(st.wall, flops, run.group).items()}


@contextlib.contextmanager
def finetune(method: Method, stage: Stage | None, make_batches: Callable[[], Iterator[dict]] | None,
             cfg: TrainConfig, device: torch.device, seed: int | None = None):
    """Train `stage` on make_batches() from the current weights, yield its cost summary, then put
    the weights back: evaluation sees the fine-tuned model, training goes on from where it was. The
    same batches every time (make_batches) and its own RNG stream (forked; from `seed` when given),
    so the phase neither changes the run nor differs between evaluations except by the weights it
    starts from, and a re-evaluation from saved weights repeats it exactly. The run's lr with a
    warm-up of a tenth of the steps (at most cfg.warmup_steps), and the method's lr_scale. Yields
    None, training nothing, without a stage, batches or steps."""
    if stage is None or make_batches is None or stage.steps < 1:
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
            if seed is not None:
                torch.manual_seed(seed)
            cost = train(method, make_batches(), sub, device, log, progress=False, stages=[stage])
        keep = ("steps", "samples_seen", "train_wall_s", "median_step_s", "flops_unit", "train_flops",
                "train_flops_per_sample")
        yield {**{k: cost[k] for k in keep if k in cost}, "final_loss": log.rows[-1]["loss"]}
    finally:
        with torch.no_grad():
            for name, p in method.named_parameters():
                if name in saved:
                    p.copy_(saved[name])


@dataclass
class Phase:
    """One part of an evaluation: `stage` trained on `batches()` on a copy of the weights (finetune;
    nothing trained when either is None), `tasks` evaluated on the result, the weights put back.
    `task`: the task whose fine-tuning it is (its cost: task_finetune[task]); None for the decoder
    phase (its cost: decoder), after whose tasks the validation loss is read. `seed`: the phase's
    random stream (dropout, masks); None: forked from the caller's."""

    tasks: list[str] | None = None  # None: whatever the evaluation's callback evaluates
    stage: Stage | None = None
    batches: Callable[[], Iterator[dict]] | None = None
    task: str | None = None
    seed: int | None = None

    @property
    def trains(self) -> bool:
        """Whether the phase trains anything (else its tasks see the weights as they are)."""
        return self.stage is not None and self.batches is not None and self.stage.steps > 0


@dataclass
class Evaluation:
    """What each evaluation runs, during training (train's `evaluate`) and at the end: the phases in
    turn, each from the same weights, with evaluate(step, tasks) -> {task: metrics} after each;
    on_eval(step, metrics) then sees them all (and may raise to stop the run)."""

    evaluate: Callable[[int, list[str] | None], dict]
    phases: list[Phase]
    on_eval: Callable[[int, dict], None] | None = None

    def __call__(self, method: Method, cfg: TrainConfig, device: torch.device, step: int,
                 read_loss: Callable[[], float | None] | None = None) -> dict:
        """An evaluation row's fields: eval ({task: metrics}); val_loss (read_loss(), in the decoder
        phase); decoder and task_finetune ({task: cost}): what the fine-tunings that ran cost,
        apart from the training cost. A phase with no tasks runs only to read the loss."""
        row: dict = {"eval": {}}
        for phase in self.phases:
            reads = read_loss is not None and phase.task is None
            if phase.tasks == [] and not reads:
                continue  # nothing to evaluate after it, so nothing to fine-tune
            with finetune(method, phase.stage, phase.batches, cfg, device, phase.seed) as cost:
                self._tasks(row, step, phase.tasks, device)
                if reads and (loss := read_loss()) is not None:
                    row["val_loss"] = loss
            if cost and phase.task is None:
                row["decoder"] = cost
            elif cost:
                row.setdefault("task_finetune", {})[phase.task] = cost
        row["eval"] = dist.job().share(row["eval"])  # rank zero scored them: every rank sees its scores
        if self.on_eval is not None:
            self.on_eval(step, row["eval"])
        return row

    def _tasks(self, row: dict, step: int, tasks: list[str] | None, device: torch.device) -> None:
        """Evaluate `tasks` one by one into row["eval"], each one's wall-clock (device synchronised,
        decoding and scoring) into row["eval_wall_s_by_task"]; None: the callback's, as one call."""
        for names in ([tasks] if tasks is None else [[name] for name in tasks]):
            t0 = time.perf_counter()
            metrics = self.evaluate(step, names)
            sync(device)
            row["eval"].update(metrics)
            if names is not None:
                row.setdefault("eval_wall_s_by_task", {})[names[0]] = round(time.perf_counter() - t0, 4)


def _as_evaluation(evaluate: Evaluation | Callable[[int], dict], method: Method,
                   decoder_batches: Callable[[], Iterator[dict]] | None) -> Evaluation:
    """A plain evaluate(step) callable as an Evaluation: one phase, the method's decoder stage."""
    if isinstance(evaluate, Evaluation):
        return evaluate
    return Evaluation(lambda step, tasks: evaluate(step), [Phase(None, method.decoder_stage(), decoder_batches)])


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


def _evaluate(method: Method, evaluation: Callable[[int, Callable | None], dict], log: MetricsLog, st: TrainState,
              group: dist.Group, validation: tuple[ValidationLoss | None, Stage] | None, uncached: dict) -> None:
    """One point of the learning curve (validation subset), at the training cost spent so far; the
    fine-tuning phases before its tasks (a decoder phase, a task's fine-tuning) are recorded in the
    row, apart from that cost, and so is the validation loss read after the decoder phase
    (`validation`: the reader and the current stage). Every rank runs it, training collectives off:
    the phases alike on each rank, the decoding shared (Task.decode); rank zero scores and logs."""
    method.eval()
    row = {"step": st.step, "samples": st.samples, "wall_s": round(st.wall, 4),
           "flops": FlopCount(st.flops).total, **uncached, "split": "val"}
    read_loss = ((lambda: validation[0](method, validation[1]))  # a sharded LLM runs on every rank
                 if validation and validation[0] and (group.is_main or dist.sharded()) else None)
    with dist.local(), eager():
        row.update(evaluation(st.step, read_loss))
    if group.is_main:
        log.append(row)
    method.train()
