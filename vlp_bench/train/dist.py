"""Data-parallel training across processes, launched by `torchrun` (one node or several):

    torchrun --nproc-per-node 8 --no-python vlp-bench run --methods simvlg ...

Every process holds the whole model; `train.batch_size` stays the *global* micro-batch, so a run
on N GPUs trains exactly what a run on one would (same batches, same updates): each rank loads
its slice of every batch, gradients are averaged by torch's DistributedDataParallel (`Replicas`:
one DDP per stage, over that stage's parameters), and each rank's loss is weighted by the share of
the batch's targets (StepOutput.weight) it holds, so the average is the one-process mean. (Dropout
is the exception: each rank draws its own masks, so with dropout on, N processes train the same
model in distribution rather than bit for bit.) Rank zero alone writes files and shows progress;
every rank evaluates its share of each evaluation's batches (`decode_batches`), rank zero scores
them; costs are for the whole job (samples and FLOPs summed over ranks, wall-clock is the job's).

A method whose loss compares a sample with the rest of the batch (BLIP-2's ITC and ITM negatives)
reads the other ranks' rows through `all_gather` (no gradient) and `all_gather_with_grad`, as LAVIS
does under DDP; both are the identity in one process.

Without torchrun (no WORLD_SIZE, or 1) nothing here does anything: `Group()` is one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

# Long enough for rank zero's evaluations (beam search over a whole test split) while the other
# ranks wait at a barrier; a collective that waits longer than this is a hang, and fails.
TIMEOUT = datetime.timedelta(hours=3)


class Group:
    """The processes of this job (rank, world size) and the few collectives the trainer needs;
    with one process every collective is the identity."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a few numbers (in float64)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_to_main(self, obj) -> list | None:
        """Every rank's `obj` (picklable), in rank order, on rank zero; None on the others."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def share(self, obj):
        """Rank zero's `obj` (picklable) on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


_GROUP = Group()
_JOB = _GROUP  # the job's group, also inside local()
_SHARDED = False  # a module is sharded over the job's ranks (train.parallel = "fsdp")


def group() -> Group:
    """The group collectives run in now: the job's, or one process inside local()."""
    return _GROUP


def job() -> Group:
    """The job's processes, also inside local(): what an evaluation shares its decoding with."""
    return _JOB


def sharded() -> bool:
    """Whether a module is sharded over the job's ranks (vlp_bench.train.sharding): then whatever
    runs it (an evaluation, a validation loss, a FLOP replay) runs on every rank, in step."""
    return _SHARDED


def set_sharded(on: bool) -> None:
    global _SHARDED
    _SHARDED = on


@contextlib.contextmanager
def local():
    """Run code on each rank on its own, collectives off (an evaluation's fine-tuning phases, which
    every rank runs alike, the validation loss): inside, group() is a one-process group."""
    global _GROUP
    saved, _GROUP = _GROUP, Group()
    try:
        yield
    finally:
        _GROUP = saved


@contextlib.contextmanager
def main_first(g: Group):
    """Rank zero runs the block first (builds caches, writes files), then the others do."""
    if not g.is_main:
        g.barrier()
    try:
        yield
    finally:
        if g.is_main:
            g.barrier()


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0, in rank order, without gradient (LAVIS's
    `concat_all_gather`): what a rank only reads from the others (BLIP-2's ITC features of the
    whole batch, the texts ITM draws its negatives from). Every rank passes the same shape. The
    identity when group() is one process (no torchrun, or inside local())."""
    g = group()
    if not g.active:
        return x
    y = x.detach().to(torch.uint8) if x.dtype == torch.bool else x.detach()  # gloo has no bool
    parts = [torch.empty_like(y) for _ in range(g.world)]
    dist.all_gather(parts, y.contiguous())
    return torch.cat(parts).to(x.dtype)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward: the gradients of the gathered tensor summed over ranks, this
    rank's slice returned (LAVIS's GatherLayer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        g = group()
        ctx.rank, ctx.world = g.rank, g.world
        parts = [torch.empty_like(x) for _ in range(g.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # reduced in place: autograd's own stays
        dist.all_reduce(grad)
        return grad.chunk(ctx.world)[ctx.rank]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0, in rank order, *with* gradient (LAVIS's
    `all_gather_with_grad`): a rank's loss that uses another rank's rows (BLIP-2's ITM negative
    images) sends them their gradient. Backward sums the gathered tensor's gradients over ranks, so
    each rank's `x` gets the gradient of the summed loss (sum over ranks); the trainer's averaging
    (DDP, `Replicas`) then makes it the gradient of the mean, as DDP does in LAVIS. Every
    rank passes the same shape and runs the backward. The identity when group() is one process."""
    return _GatherWithGrad.apply(x) if group().active else x


def finish() -> bool:
    """Leave the torchrun job (every rank waits for the others first); True on rank zero and
    outside torchrun: the process that writes what comes after."""
    global _GROUP, _JOB
    main = _JOB.is_main
    if _JOB.active:
        dist.barrier()
        dist.destroy_process_group()
        _GROUP = _JOB = Group()
        set_sharded(False)
    return main


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init(device: torch.device) -> tuple[Group, torch.device]:
    """Join the torchrun job described by the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*):
    NCCL when `device` is a GPU (each process then takes GPU LOCAL_RANK), gloo on CPUs. Returns
    the group and this process's device. Outside torchrun: one process, `device` unchanged."""
    global _GROUP, _JOB
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _GROUP, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    _GROUP = _JOB = Group(dist.get_rank(), dist.get_world_size())
    return _GROUP, device


class _Loss(nn.Module):
    """The call DDP wraps: a method's training loss (DDP hooks the forward of a module)."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batch: dict, stage):
        return self.method.training_loss(batch, stage)


class Replicas:
    """How one stage's gradients reach every rank: torch's DistributedDataParallel over the
    parameters the stage trains, built at its first micro-batch. A stage may list parameters no
    step uses (BLIP-2's stage 2 never reads the Q-Former's text embeddings): that first batch is
    replayed once (RNG restored, gradients returned, not stored) to find the ones that get a
    gradient on some rank, and DDP takes only those. So DDP needs no search for unused parameters
    on every step (`find_unused_parameters`, an extra pass over the graph and a warning when there
    are none), and a parameter no rank uses keeps no gradient, as in one process (AdamW leaves it
    alone). The rest of the method (frozen backbones, other stages' heads, buffers) stays outside
    DDP, which then neither broadcasts a frozen LLM nor waits for it. DDP averages over ranks; the
    trainer weights each rank's loss by its share of the batch, so the average is the one-process
    gradient. With one process (or inside local()) it calls the method directly."""

    def __init__(self, method: nn.Module, params: list[nn.Parameter]):
        self.method, self.params, self.ddp = method, params, None

    def loss(self, batch: dict, stage, sync: bool = True):
        """method.training_loss(batch, stage); `sync` False: a micro-batch before the step's last,
        whose gradients accumulate locally (DDP's no_sync), to be averaged with the last one's."""
        if group().active and self.params:  # the first call: find what trains, then wrap it
            used, self.params = self._used(batch, stage), []
            self.ddp = self._wrap(used) if used else None  # nothing trains: nothing to average
        if self.ddp is None:
            return self.method.training_loss(batch, stage)
        with contextlib.nullcontext() if sync else self.ddp.no_sync():
            return self.ddp(batch, stage)

    def _used(self, batch: dict, stage) -> set[int]:
        """The ids of the stage's parameters that get a gradient from `batch` on some rank."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            out = self.method.training_loss(batch, stage)
            grads = torch.autograd.grad(out.loss, self.params, allow_unused=True)
        used = group().sum([float(g is not None) for g in grads])
        return {id(p) for p, u in zip(self.params, used) if u}

    def _wrap(self, used: set[int]) -> DDP:
        wrapper = _Loss(self.method)
        ignore = [n for n, p in wrapper.named_parameters() if id(p) not in used]
        DDP._set_params_and_buffers_to_ignore_for_model(wrapper, ignore + [n for n, _ in wrapper.named_buffers()])
        return DDP(wrapper, forward_sync_buffers=False)


def decode_batches(batches: list, decode: Callable[[list], list]) -> list | None:
    """decode(batch) for every batch, concatenated in order: an evaluation's decoding, shared by the
    job's ranks. Each rank decodes whole batches (rank r: batches r, r + N, ...), formed exactly as
    one process forms them, so padding and beams are unchanged; rank zero gets every output, in
    order, and the other ranks None (rank zero alone scores them). One process: decodes them all.
    Every rank of the job calls it with the same batches. With a sharded model (sharded()) every
    rank makes as many calls, the ranks with one batch fewer decoding a spare one."""
    g = _JOB
    mine = [decode(b) for b in batches[g.rank::g.world]]
    if _SHARDED and batches:  # a sharded model runs on every rank in step: as many calls as rank zero
        for _ in range(len(batches[::g.world]) - len(mine)):
            decode(batches[0])  # the output is thrown away
    parts = g.gather_to_main(mine)
    if parts is None:
        return None
    out: list = []
    for i in range(len(batches)):
        out.extend(parts[i % g.world][i // g.world])
    return out
