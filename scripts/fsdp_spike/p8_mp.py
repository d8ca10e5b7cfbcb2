"""Point 8: MixedPrecisionPolicy on CPU. mode=mp | mp_bf16reduce | bf16params"""
import sys
from common import *
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

MODE = dict(a.split("=") for a in sys.argv[1:])["mode"]
rank, world = init_dist()
if rank == 0:
    ref, _ = reference_losses(4)
mesh = init_device_mesh("cpu", (world,))
m = Model()
kw = {}
if MODE == "mp":
    kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
elif MODE == "mp_bf16reduce":
    kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
elif MODE == "bf16params":
    m = m.to(torch.bfloat16)
shard(m, mesh, **kw)
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
print(f"[r{rank}] sharded param dtype {m.bridge.inp.weight.dtype}, local bytes {local_bytes(m)}", flush=True)
seen = []
def _hk(mod, inp, out):
    if not seen:
        seen.append(1); print(f"[r{rank}] in-forward: weight {mod.weight.dtype} {type(mod.weight).__name__}, input {inp[0].dtype}, out {out.dtype}", flush=True)
m.llm.model.layers[0].mlp.up_proj.register_forward_hook(_hk)
if MODE == "bf16params":
    m.register_forward_pre_hook(lambda mod, a: tuple(x.to(torch.bfloat16) if x.is_floating_point() else x for x in a))
losses = train_steps(m, opt, 4, rank, world)
g = None
if rank == 0:
    print("losses", [f"{x:.6f}" for x in losses], "\nref   ", [f"{x:.6f}" for x in ref],
          "\nmax rel", max(abs(a - b) / b for a, b in zip(losses, ref)), flush=True)
dist.destroy_process_group()
