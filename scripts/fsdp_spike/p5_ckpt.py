"""Point 5: full state dict get/set on gloo (+ optimizer state)."""
from common import *
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, set_model_state_dict,
    get_optimizer_state_dict, set_optimizer_state_dict, StateDictOptions)

rank, world = init_dist()
mesh = init_device_mesh("cpu", (world,))
model = shard(Model(), mesh)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
train_steps(model, opt, 2, rank, world)

full = StateDictOptions(full_state_dict=True, cpu_offload=True)
sd = get_model_state_dict(model, options=full)
osd = get_optimizer_state_dict(model, opt, options=full)
print(f"[r{rank}] full model sd: {len(sd)} keys, types {set(type(v).__name__ for v in sd.values())}; "
      f"optim sd state entries {len(osd.get('state', {}))}", flush=True)
if rank == 0:
    torch.save({"model": sd, "optim": osd}, "/tmp/fsdp_spike_ckpt.pt")
    plain = Model(); plain.load_state_dict(sd)  # unsharded copy loads strictly
    print("[r0] plain load_state_dict(strict) OK", flush=True)
# no-full (sharded) variant for size check
sd_sh = get_model_state_dict(model)
print(f"[r{rank}] sharded sd value type {type(next(iter(sd_sh.values()))).__name__}", flush=True)
# continue training 2 steps as the target
cont = train_steps(model, opt, 2, rank, world, start=2)

# fresh sharded model, load (rank0 has the file; broadcast to others)
dist.barrier()
model2 = shard(Model(), mesh)
for p in model2.bridge.parameters():   # perturb so load must matter
    p.data.add_(1.0)
opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=1e-3)
ck = torch.load("/tmp/fsdp_spike_ckpt.pt") if rank == 0 else {"model": {}, "optim": {}}
set_model_state_dict(model2, ck["model"], options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
# optimizer load: needs opt state initialised? try directly
try:
    set_optimizer_state_dict(model2, opt2, ck["optim"],
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))
    print(f"[r{rank}] set_optimizer_state_dict OK", flush=True)
except Exception as e:
    print(f"[r{rank}] set_optimizer_state_dict FAILED: {type(e).__name__}: {e}", flush=True)
cont2 = train_steps(model2, opt2, 2, rank, world, start=2)
if rank == 0:
    print("continued:", cont, "\nresumed:  ", cont2,
          "\nmax rel", max(abs(a - b) / a for a, b in zip(cont, cont2)), flush=True)
dist.destroy_process_group()
