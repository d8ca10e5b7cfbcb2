"""train.parallel = "fsdp": the frozen LLM sharded over the job's ranks by PyTorch's FSDP2
(`fully_shard`), so a model larger than one device's memory trains; every rank holds 1/N of its
weights and gathers one decoder layer at a time as it runs.

What is sharded, and why only that: the frozen LLM dominates memory (OPT-2.7B is 5.4 GB in bf16,
a 13B model 26 GB) and has no gradients or optimizer state, so sharding it changes nothing but
memory and communication. The trainable parts (a bridge of a few hundred MB with its AdamW state)
stay whole on every rank and are averaged by DDP (vlp_bench.train.dist.Replicas), as under
"ddp": each stage trains a subset of them, a parameter may go unused on one rank, and a whole copy
is what checkpoints, kept weights and evaluation phases read; FSDP2 would need collectives in each
of those (docs/scale.md lists what a 2-process spike found). The frozen ViT is not sharded: its
blocks are run one by one outside its forward (FLIP, ToMe inside the ViT) and it is ~1 GB at paper
scale.

Units: each decoder layer, then the LLM itself (its final norm and what else lies outside the
layers). The input and output embeddings stay whole on every rank: the input embedding runs
outside the LLM's forward (prefix_lm_loss embeds the prompt itself, to put the soft prompt before
it), where a sharded weight cannot be read, and the output embedding is tied to it in most LLMs
(the cost: vocabulary x width per rank, 0.26 GB for OPT-2.7B in bf16). A sharded module must run
on every rank in step: the job's evaluations, validation losses and FLOP replays then run on every
rank (`dist.sharded()`), and Hugging Face's generate keeps the ranks in step itself (`synced_gpus`,
on for FSDP modules).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vlp_bench.errors import UserError
from vlp_bench.nn.text_model import layer_list
from vlp_bench.train import dist

def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_frozen_llm(llm: nn.Module, device: torch.device, fingerprint) -> None:
    """Shard `llm` (frozen, the same weights on every rank) in place over the job's ranks; a no-op
    for an LLM already sharded (one experiment's backbones serve all its runs). `fingerprint()`:
    the backbones' fingerprint, taken while the weights are whole (weights.backbone_fingerprint
    reads it back from the module: reading shards would need every rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    group = dist.job()
    if not group.active or is_sharded(llm):
        return
    if any(p.requires_grad for p in llm.parameters()):
        raise UserError("train.parallel = 'fsdp' shards the frozen LLM, but some of its parameters train")
    llm.vlp_bench_fingerprint = fingerprint()
    mesh = init_device_mesh(device.type, (group.world,))
    for layer in layer_list(llm):
        fully_shard(layer, mesh=mesh)
    embeddings = [m for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None]
    fully_shard(llm, mesh=mesh, ignored_params={p for m in embeddings for p in m.parameters()})
    dist.set_sharded(True)


def memory(llm: nn.Module) -> dict:
    """The LLM's weights in bytes: whole, and on this rank (its shards)."""
    whole = local = 0
    for p in llm.parameters():
        whole += p.numel() * p.element_size()
        part = p.to_local() if hasattr(p, "to_local") else p
        local += part.numel() * part.element_size()
    return {"llm_bytes": whole, "llm_bytes_per_rank": local}
