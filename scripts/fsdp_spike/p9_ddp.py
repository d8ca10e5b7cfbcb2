"""Point 9: DDP on gloo CPU, find_unused_parameters=True, frozen params ignored, head2 unused
globally on odd steps and on rank 1 always (used on rank 0 only on even steps)."""
import sys
from common import *
from torch.nn.parallel import DistributedDataParallel as DDP

MODE = dict(a.split("=") for a in sys.argv[1:]).get("mode", "rank_skip")
rank, world = init_dist()
h = B // world


def mk():
    return Model()


def use(step, r):
    if step % 2 == 1:
        return False
    if MODE == "all_use":
        return True
    return torch.tensor([1.0] * h + [0.0] * h) if r is None else (r == 0)


STEPS = 4
if rank == 0:
    ref_m = mk(); ro = torch.optim.AdamW([p for p in ref_m.parameters() if p.requires_grad], lr=1e-3)
    ref = []
    for s in range(STEPS):
        f, i, l = make_data(s)
        loss = ref_m(f, i, l, use(s, None)) / n_tokens(l); loss.backward()
        ro.step(); ro.zero_grad(set_to_none=True); ref.append(loss.item())

m = mk()
frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
DDP._set_params_and_buffers_to_ignore_for_model(m, frozen)
dm = DDP(m, find_unused_parameters=True)
print(f"[r{rank}] DDP params in reducer: {sum(1 for _ in dm.parameters() if _.requires_grad)} trainable, ignored {len(frozen)}", flush=True)
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
for s in range(STEPS):
    f, i, l = make_data(s)
    sl = slice(rank * h, (rank + 1) * h)
    ls = dm(f[sl], i[sl], l[sl], use(s, rank))
    (ls * world / n_tokens(l)).backward()   # DDP averages grads over ranks
    g = m.bridge.head2.weight.grad
    gi = None if g is None else f"{g.abs().sum().item():.3e}"
    fz = sum(p.grad is not None for p in m.llm.parameters())
    opt.step(); opt.zero_grad(set_to_none=True)
    gl = ls.detach() / n_tokens(l); dist.all_reduce(gl)
    print(f"[r{rank}] step {s} use_head2={use(s, rank)} head2.grad={gi} frozen grads={fz}"
          + (f" loss {gl.item():.8f} ref {ref[s]:.8f} rel {abs(gl.item()-ref[s])/ref[s]:.2e}" if rank == 0 else ""), flush=True)
dist.destroy_process_group()
