"""Data-parallel training across processes, launched by `torchrun` (one node or several):

    torchrun --nproc-per-node 8 --no-python vlp-bench run --methods simvlg ...

Every process holds the whole model; `train.batch_size` stays the *global* micro-batch, so a run
on N GPUs trains exactly what a run on one would (same batches, same updates): each rank loads
its slice of every batch, gradients are averaged after backward, and each rank's loss is weighted
by the share of the batch's targets (StepOutput.weight) it holds, so the average is the one-process
mean. (Dropout is the exception: each rank draws its own masks, so with dropout on, N processes
train the same model in distribution rather than bit for bit.) Rank zero alone writes files, shows
progress and evaluates (the others wait); costs are for the whole job (samples and FLOPs summed
over ranks, wall-clock is the job's).

Why not torch's DistributedDataParallel: a method's stages change which parameters train and
which run (BLIP-2's stage 1 never touches its LLM projection), and DDP's reducer needs every
trainable parameter of the wrapped module used in every forward. One bucketed all-reduce after
backward is exact for all of them; what it gives up is DDP's overlap of communication with the
backward pass, which matters little for bridge-sized gradients.

A method whose loss compares a sample with the rest of the batch (BLIP-2's ITC and ITM negatives)
reads the other ranks' rows through `all_gather` (no gradient) and `all_gather_with_grad`, as LAVIS
does under DDP; both are the identity in one process.

Without torchrun (no WORLD_SIZE, or 1) nothing here does anything: `Group()` is one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

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

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """grad <- mean over ranks, one flat all-reduce per dtype (every rank passes the same
        parameters). A parameter without a gradient on every rank keeps none (the optimizer skips
        it, as in one process); one with a gradient on some ranks only gets zeros on the others."""
        if not self.active:
            return
        used = self.sum([float(p.grad is not None) for p in params])
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p, u in zip(params, used):
            if u:
                by_dtype.setdefault(p.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p in group:
                mean = flat[offset: offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)
                offset += p.numel()

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


_GROUP = Group()


def group() -> Group:
    """The group collectives run in now: the job's, or one process inside local()."""
    return _GROUP


@contextlib.contextmanager
def local():
    """Run collectives-free code on one rank (rank zero's evaluations and their decoder phase):
    inside, group() is a one-process group."""
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
    (`Group.average_gradients`) then makes it the gradient of the mean, as DDP does in LAVIS. Every
    rank passes the same shape and runs the backward. The identity when group() is one process."""
    return _GatherWithGrad.apply(x) if group().active else x


def finish() -> bool:
    """Leave the torchrun job (every rank waits for the others first); True on rank zero and
    outside torchrun: the process that writes what comes after."""
    global _GROUP
    main = _GROUP.is_main
    if _GROUP.active:
        dist.barrier()
        dist.destroy_process_group()
        _GROUP = Group()
    return main


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init(device: torch.device) -> tuple[Group, torch.device]:
    """Join the torchrun job described by the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*):
    NCCL when `device` is a GPU (each process then takes GPU LOCAL_RANK), gloo on CPUs. Returns
    the group and this process's device. Outside torchrun: one process, `device` unchanged."""
    global _GROUP
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _GROUP, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    _GROUP = Group(dist.get_rank(), dist.get_world_size())
    return _GROUP, device
