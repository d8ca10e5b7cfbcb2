"""Points 1,2,4,7: shard frozen LLM layers + root, bridge, model root; train; compare with 1 process.
args: divide={default,1}  clip={none,1.0}  foreach={1,0}"""
import sys, time
from common import *
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, FSDPModule
from torch.distributed.tensor import DTensor

args = dict(a.split("=") for a in sys.argv[1:])
DIV = args.get("divide", "default")
CLIP = None if args.get("clip", "none") == "none" else float(args["clip"])
FOREACH = args.get("foreach", "1") == "1"
STEPS = 5

rank, world = init_dist()
ref = None
if rank == 0:
    ref, ref_model = reference_losses(STEPS, clip=CLIP)
    ref_params = {k: v.detach().clone() for k, v in ref_model.state_dict().items()}

model = Model()
full_bytes = local_bytes(model)
mesh = init_device_mesh("cpu", (world,))
LAYOUT = args.get("layout", "embed_unit")
for layer in model.llm.model.layers:
    fully_shard(layer, mesh=mesh)
if LAYOUT == "embed_unit":   # embedding called outside llm.forward -> must be its own unit
    fully_shard(model.llm.model.embed_tokens, mesh=mesh)
if LAYOUT != "no_llm_root":
    fully_shard(model.llm, mesh=mesh)
fully_shard(model.bridge, mesh=mesh)
fully_shard(model, mesh=mesh)
if DIV == "1":
    model.set_gradient_divide_factor(1.0)   # NOT recursive: only root's own params
if DIV == "1rec" or DIV == "1recsum":
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            if DIV == "1recsum":
                m.set_force_sum_reduction_for_comms(True)
print(f"[r{rank}] param types: {set(type(p).__name__ for p in model.parameters())}; "
      f"local bytes {local_bytes(model)} vs unsharded {full_bytes}", flush=True)

opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=FOREACH)
losses = []
for s in range(STEPS):
    f, i, l = make_data(s)
    ntok = n_tokens(l)  # global token count (every rank sees whole batch metadata)
    h = B // world
    sl = slice(rank * h, (rank + 1) * h)
    loss_sum = model(f[sl], i[sl], l[sl])
    # FSDP averages grads over ranks (divide by world) -> scale by world so avg == global mean
    scale = 1 if DIV.startswith("1rec") else world
    loss = loss_sum * scale / ntok
    loss.backward()
    if CLIP is not None:
        gn = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
        if rank == 0 and s == 0:
            print(f"[r0] clip_grad_norm_ returned {type(gn).__name__} {gn}", flush=True)
    if s == 0:
        fg = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        if rank == 0:
            m0 = Model(); f0, i0, l0 = make_data(0)
            (m0(f0, i0, l0) / n_tokens(l0)).backward()
            rg = {n: p.grad for n, p in m0.named_parameters() if p.grad is not None}
            gd = max(((fg[n] - rg[n]).abs().max() / rg[n].abs().max()).item() for n in rg)
            print(f"step0 grads: same keys {set(fg)==set(rg)} ({len(rg)}), max rel grad diff {gd:.2e}", flush=True)
    # frozen params: grads must be None
    frozen_grads = sum(p.grad is not None for p in model.llm.parameters())
    opt.step(); opt.zero_grad(set_to_none=True)
    gl = loss_sum.detach() / ntok
    dist.all_reduce(gl)  # sum of per-rank partial means == global mean
    losses.append(gl.item())
    if rank == 0:
        rel = abs(gl.item() - ref[s]) / abs(ref[s])
        print(f"step {s}: fsdp {gl.item():.8f} ref {ref[s]:.8f} rel {rel:.2e} frozen_grads_not_None={frozen_grads}", flush=True)

# compare final bridge params (gather full)
from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    md = max((sd[k] - ref_params[k]).abs().max().item() for k in ref_params)
    print(f"final max |param diff| vs 1-proc: {md:.3e}; keys equal: {set(sd) == set(ref_params)}", flush=True)
dist.destroy_process_group()
