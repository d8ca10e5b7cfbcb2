"""Shared pieces for the FSDP2-on-CPU/gloo spike (throwaway)."""
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import datetime
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

D, FEAT, P, VOCAB, B, T = 64, 16, 4, 256, 8, 12


def build_llm():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=D, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                      max_position_embeddings=64, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    llm = LlamaForCausalLM(cfg)
    llm.requires_grad_(False)
    return llm


class Bridge(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.inp = nn.Linear(FEAT, D)
        self.layer = nn.TransformerEncoderLayer(D, 4, 128, dropout=0.0, batch_first=True)
        self.out = nn.Linear(D, D)
        self.head2 = nn.Linear(D, D)  # optional extra head (point 3)

    def forward(self, feats, use_head2=False):
        """use_head2: a bool for the whole batch, or a tensor of 0/1 per row (a head some rows skip)."""
        h = self.out(self.layer(self.inp(feats)))
        if isinstance(use_head2, torch.Tensor):
            h = h + use_head2[:, None, None] * self.head2(h)
        elif use_head2:
            h = h + self.head2(h)
        return h


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.llm = build_llm()
        self.bridge = Bridge()

    def forward(self, feats, ids, labels, use_head2=False):
        soft = self.bridge(feats, use_head2)                          # (b,P,D)
        tok = self.llm.get_input_embeddings()(ids)                    # (b,T,D)
        emb = torch.cat([soft, tok], 1)
        logits = self.llm(inputs_embeds=emb).logits                   # (b,P+T,V)
        full_lab = torch.cat([torch.full((ids.shape[0], P), -100), labels], 1)
        lg = logits[:, :-1].reshape(-1, VOCAB)
        lb = full_lab[:, 1:].reshape(-1)
        return F.cross_entropy(lg.float(), lb, ignore_index=-100, reduction="sum")


def make_data(step):
    """Fixed-seed batch of B with variable lengths (right padding -> -100 labels)."""
    g = torch.Generator().manual_seed(1000 + step)
    feats = torch.randn(B, P, FEAT, generator=g)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    lens = torch.randint(4, T + 1, (B,), generator=g)
    labels = ids.clone()
    for i, L in enumerate(lens.tolist()):
        labels[i, L:] = -100
        ids[i, L:] = 0
    return feats, ids, labels


def n_tokens(labels):
    # tokens that are predicted: all labels != -100 (position P-1 predicts label[0])
    return int((labels != -100).sum())


def init_dist():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    return dist.get_rank(), dist.get_world_size()


def local_bytes(model):
    from torch.distributed.tensor import DTensor
    tot = 0
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        tot += t.numel() * t.element_size()
    return tot


def reference_losses(steps, lr=1e-3, head2_pattern=None, clip=None):
    """One-process unsharded run over the full batch."""
    m = Model()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, foreach=True)
    out = []
    for s in range(steps):
        f, i, l = make_data(s)
        uh = head2_pattern(s, None) if head2_pattern else False
        loss = m(f, i, l, uh) / n_tokens(l)
        loss.backward()
        if clip is not None:
            gn = torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], clip)
        opt.step(); opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out, m


def shard(model, mesh, **kw):
    from torch.distributed.fsdp import fully_shard
    for layer in model.llm.model.layers:
        fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model.llm.model.embed_tokens, mesh=mesh, **kw)  # called outside llm.forward
    fully_shard(model.llm, mesh=mesh, **kw)
    fully_shard(model.bridge, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


def train_steps(model, opt, steps, rank, world, start=0):
    out = []
    h = B // world
    for s in range(start, start + steps):
        f, i, l = make_data(s)
        sl = slice(rank * h, (rank + 1) * h)
        ls = model(f[sl], i[sl], l[sl])
        (ls * world / n_tokens(l)).backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        gl = ls.detach() / n_tokens(l); dist.all_reduce(gl); out.append(gl.item())
    return out
