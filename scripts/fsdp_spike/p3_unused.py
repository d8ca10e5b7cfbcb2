"""Point 3: unused trainable params; requires_grad switching after fully_shard.
mode=all_skip | rank_skip | rank_skip_fix | own_unit_rank_skip | own_unit_rank_skip_fix | stages"""
import sys
from common import *
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, FSDPModule
from torch.distributed.tensor import DTensor

args = dict(a.split("=") for a in sys.argv[1:])
MODE = args["mode"]
STEPS = 6
rank, world = init_dist()
h = B // world


def head2_use(step, rank_or_none):
    """what each rank (or the reference, rank None) does at `step`"""
    if MODE == "stages":
        return False
    if MODE == "all_skip":
        return step % 2 == 0
    # rank_skip*: on even steps only rank 0 uses head2
    if step % 2 == 1:
        return False
    if rank_or_none is None:
        return torch.tensor([1.0] * h + [0.0] * h)  # reference: head2 applies to rank-0 half only
    return rank_or_none == 0


def stage_switch(m, step):
    """stage 1 (steps<3): train bridge; stage 2: freeze bridge, train llm.layers[1].mlp"""
    if MODE == "stages" and step == 3:
        m.bridge.requires_grad_(False)
        m.llm.model.layers[1].mlp.requires_grad_(True)
        return True
    return False


def mk():
    return Model()


def mkopt(m):
    return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, foreach=True)


ref = []
if rank == 0:
    m = mk(); opt = mkopt(m)
    for s in range(STEPS):
        if stage_switch(m, s):
            opt = mkopt(m)
        f, i, l = make_data(s)
        loss = m(f, i, l, head2_use(s, None)) / n_tokens(l)
        loss.backward()
        if MODE.endswith("_fix"):  # FSDP with reduce_scatter_unused_params gives zeros, not None
            for p in m.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        opt.step(); opt.zero_grad(set_to_none=True); ref.append(loss.item())

model = mk()
mesh = init_device_mesh("cpu", (world,))
for layer in model.llm.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model.llm.model.embed_tokens, mesh=mesh)
fully_shard(model.llm, mesh=mesh)
if MODE.startswith("own_unit"):
    fully_shard(model.bridge.head2, mesh=mesh)
fully_shard(model.bridge, mesh=mesh)
fully_shard(model, mesh=mesh)
if MODE.endswith("_fix"):
    model.set_reduce_scatter_unused_params(True)  # recurse=True by default
opt = mkopt(model)
for s in range(STEPS):
    if stage_switch(model, s):
        opt = mkopt(model)
    f, i, l = make_data(s)
    sl = slice(rank * h, (rank + 1) * h)
    ls = model(f[sl], i[sl], l[sl], head2_use(s, rank))
    (ls * world / n_tokens(l)).backward()
    g = model.bridge.head2.weight.grad
    ginfo = None if g is None else f"{g.full_tensor().abs().sum().item():.3e}"
    nb = sum(p.grad is not None for p in model.bridge.parameters())
    nm = sum(p.grad is not None for p in model.llm.model.layers[1].mlp.parameters())
    opt.step(); opt.zero_grad(set_to_none=True)
    gl = ls.detach() / n_tokens(l); dist.all_reduce(gl)
    if rank == 0:
        print(f"step {s}: use_head2(r0)={head2_use(s, 0)} loss {gl.item():.8f} ref {ref[s]:.8f} "
              f"rel {abs(gl.item()-ref[s])/ref[s]:.2e} head2.grad(|sum|)={ginfo} "
              f"bridge grads {nb}/{len(list(model.bridge.parameters()))} mlp1 grads {nm}", flush=True)
dist.destroy_process_group()
