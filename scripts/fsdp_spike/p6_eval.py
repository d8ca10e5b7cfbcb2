"""Point 6: eval / greedy generate on sharded model. mode=both | rank0_only | unshard | gather_copy"""
import sys
from common import *
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions

A = dict(a.split("=") for a in sys.argv[1:]); MODE = A["mode"]
SYNC = {"none": None, "0": False, "1": True}[A.get("synced", "none")]
rank, world = init_dist()
mesh = init_device_mesh("cpu", (world,))
model = shard(Model(), mesh)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
train_steps(model, opt, 1, rank, world)


def gen(m, feats, ids, n=4, eos=None, synced=None):
    with torch.no_grad():
        emb = torch.cat([m.bridge(feats), m.llm.get_input_embeddings()(ids)], 1)
        am = torch.ones(emb.shape[:2], dtype=torch.long)
        return m.llm.generate(inputs_embeds=emb, attention_mask=am, max_new_tokens=n, do_sample=False,
                              eos_token_id=eos, pad_token_id=0, synced_gpus=synced)


f, i, _ = make_data(99)
# reference: unsharded copy with identical weights
sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    plain = Model(); plain.load_state_dict(sd); plain.eval()
    ref = gen(plain, f[:2], i[:2])

if MODE == "both":   # every rank calls generate the same number of times (own inputs)
    sl = slice(rank * 2, rank * 2 + 2)
    out = gen(model, f[sl], i[sl])
    print(f"[r{rank}] both-ranks generate OK: {out.tolist()}", flush=True)
    if rank == 0:
        print(f"[r0] equals unsharded: {torch.equal(out, ref)}", flush=True)
elif MODE == "both_eos":
    calls = []
    _ag = dist.all_gather_single
    def _count(out, inp, *a, **k):
        calls.append(inp.numel()); return _ag(out, inp, *a, **k)
    dist.all_gather_single = _count  # different stopping -> different #forwards per rank
    sl = slice(rank * 2, rank * 2 + 2)
    out = gen(model, f[sl], i[sl], n=6 if rank == 0 else 2)
    print(f"[r{rank}] uneven-length generate returned {out.shape}", flush=True)
    print(f"[r{rank}] all_gather_single calls during generate: {len(calls)} numels {calls}", flush=True)
    dist.barrier(); print(f"[r{rank}] barrier passed", flush=True)
    chk = torch.tensor([float(rank)]); outs = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(outs, chk); print(f"[r{rank}] sanity all_gather {outs}", flush=True)
    l2 = train_steps(model, opt, 1, rank, world, start=1)
    if rank == 0:
        pl = Model(); pl.load_state_dict(sd); o = torch.optim.AdamW([p for p in pl.parameters() if p.requires_grad], lr=1e-3)
        print(f"[r0] train after uneven gen: {l2}; unsharded {train_steps.__name__} ref:", flush=True)
elif MODE == "rank0_only":
    if rank == 0:
        out = gen(model, f[:2], i[:2], synced=SYNC); print("[r0] rank0-only generate returned", flush=True)
    dist.barrier(); print(f"[r{rank}] barrier passed", flush=True)
elif MODE == "unshard":
    fsdp_mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_mods:           # collective: all ranks
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    print(f"[r{rank}] unsharded; param type now {type(model.bridge.inp.weight).__name__}", flush=True)
    if rank == 0:
        out = gen(model, f[:2], i[:2], synced=SYNC)
        print(f"[r0] rank0-only generate after unshard OK, equals unsharded: {torch.equal(out, ref)}", flush=True)
    dist.barrier()
    for m in fsdp_mods:
        m.reshard(); m.set_reshard_after_forward(True, recurse=False)
    if A.get("reset", "0") == "1":
        model.reset_iter_state()   # clears post-forward order polluted by rank-0-only forwards
    l2 = train_steps(model, opt, 1, rank, world, start=1)
    print(f"[r{rank}] back to training OK, loss {l2}", flush=True)
elif MODE == "gather_copy":
    if rank == 0:
        out = gen(plain, f[:2], i[:2])
        print(f"[r0] generate on gathered plain copy OK: {out.tolist()}", flush=True)
    dist.barrier(); print(f"[r{rank}] barrier passed", flush=True)
dist.destroy_process_group()
