"""BERT's encoder layer, written once for the bridges that the papers start from BERT-base: SimVLG's
connector (EVLGen: a BERT encoder over the projected ViT tokens) and BLIP-2's Q-Former (LAVIS).

What makes it BERT (docs/fidelity.md, SimVLG and the no-merge baseline; BLIP-2):
- post-LN: attention -> dense -> dropout -> LayerNorm(x + .); the FFN the same way, GELU inside;
- dropout 0.1 on the attention probabilities and on each sub-layer's output;
- embeddings: learned absolute positions (+ token types where the model has them) added to the
  input, then LayerNorm and dropout;
- parameter names are Hugging Face's `BertModel` names (`attention.self.query`, `intermediate.dense`,
  `output.LayerNorm`, ...), so `load_bert` can initialise from any local BERT-style checkpoint.

Token merging sits where EVLGen puts it: `between(a, keys)` runs on the attention sub-layer's
output (after its LayerNorm), before the FFN. Attention goes through `scaled_dot_product_attention`.
"""

from __future__ import annotations

import contextlib

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp_bench.errors import UserError

LAYER_NORM_EPS = 1e-12  # BERT's


class SelfAttention(nn.Module):
    """BERT's `attention.self`: q from x; k and v from x, or from a context of another width (cross)."""

    def __init__(self, dim: int, heads: int, dropout: float, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(context_dim or dim, dim)
        self.value = nn.Linear(context_dim or dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, hd)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.key(x)), self.split(self.value(x))

    def forward(self, x, mask=None, context=None, past=None):
        """-> (B, T, D) attended values, and (k, v) of x (or the context), each (B, H, T, hd).
        past: (k, v) of earlier tokens (e.g. BLIP-2's queries for its ITG text) put before x's own."""
        k, v = self.keys_values(x if context is None else context)
        kv = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(self.split(self.query(x)), k, v, attn_mask=mask, dropout_p=p)
        return out.transpose(1, 2).flatten(2), kv


class Residual(nn.Module):
    """BERT's `*.output`: dense -> dropout -> LayerNorm(. + residual)."""

    def __init__(self, in_dim: int, dim: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    """BERT's `attention` (or LAVIS's `crossattention`): self-attention and its residual output."""

    def __init__(self, dim: int, heads: int, dropout: float, context_dim: int | None = None):
        super().__init__()
        self.self = SelfAttention(dim, heads, dropout, context_dim)
        self.output = Residual(dim, dim, dropout)

    def forward(self, x, mask=None, context=None, past=None):
        a, kv = self.self(x, mask, context, past)
        return self.output(a, x), kv


class Intermediate(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """One BERT layer. `cross_dim`: the queries also cross-attend to a context of that width after
    self-attention (the Q-Former's cross layers). `query_ffn`: the first `n_query` tokens go through
    their own FFN (`intermediate_query`, `output_query`), as the Q-Former's learned queries do."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.1, mlp_ratio: float = 4.0,
                 cross_dim: int | None = None, query_ffn: bool = False):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.attention = Attention(dim, heads, dropout)
        self.crossattention = Attention(dim, heads, dropout, cross_dim) if cross_dim else None
        self.intermediate, self.output = Intermediate(dim, hidden), Residual(hidden, dim, dropout)
        if query_ffn:
            self.intermediate_query, self.output_query = Intermediate(dim, hidden), Residual(hidden, dim, dropout)
        else:
            self.intermediate_query = self.output_query = None

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(x), x)

    def query_ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_query(self.intermediate_query(x), x)

    def forward(self, x, mask=None, between=None, context=None, n_query: int = 0, past=None):
        """x: (B, T, D) -> (B, T', D), and the self-attention's (k, v) of x (for a later pass's `past`).

        between(a, keys) -> a: runs on the attention output, before the FFN (token merging);
        keys: (B, H, T, hd). context: what the first n_query tokens cross-attend to."""
        a, kv = self.attention(x, mask, past=past)
        if between is not None:
            a = between(a, kv[0])
        if not n_query:
            return self.ffn(a), kv
        q, t = a[:, :n_query], a[:, n_query:]
        if self.crossattention is not None:
            q = self.crossattention(q, context=context)[0]
        q = self.query_ffn(q) if self.output_query is not None else self.ffn(q)
        return (torch.cat([q, self.ffn(t)], dim=1) if t.shape[1] else q), kv


class Embeddings(nn.Module):
    """BERT's `embeddings`: word (optional), position and token-type (optional) embeddings summed,
    then LayerNorm and dropout. `forward` takes ids or ready vectors (EVLGen feeds the projected
    ViT tokens as `inputs_embeds`); `prefix` vectors (the Q-Former's queries) are put first, without
    positions, and go through the same LayerNorm."""

    def __init__(self, dim: int, positions: int, dropout: float = 0.1, vocab: int = 0, token_types: int = 0):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim) if vocab else None
        self.position_embeddings = nn.Embedding(positions, dim)
        self.token_type_embeddings = nn.Embedding(token_types, dim) if token_types else None
        self.LayerNorm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor | None = None, vectors: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """start: the position of the first token (its index in a longer sequence)."""
        x = self.word_embeddings(ids) if ids is not None else vectors
        if x is not None:
            if x.shape[1] + start > self.position_embeddings.num_embeddings:
                raise ValueError(f"{x.shape[1] + start} tokens, but {self.position_embeddings.num_embeddings} "
                                 f"positions are learned")
            x = x + self.position_embeddings(torch.arange(start, start + x.shape[1], device=x.device))
            if self.token_type_embeddings is not None:
                x = x + self.token_type_embeddings.weight[0]  # one segment: type 0 everywhere
            x = x if prefix is None else torch.cat([prefix, x], dim=1)
        else:
            x = prefix
        return self.dropout(self.LayerNorm(x))


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: N(0, 0.02) weights and embeddings, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# A bridge's `init`: this value means "the experiment's BERT backbone" ([bert]: the tiny world's
# pre-trained one, or a local checkpoint such as bert-base-uncased; none = random init)
EXPERIMENT_BERT = "bert"


def init_source(init: str, experiment_bert: str) -> str:
    """The checkpoint directory a bridge starts from ("" = BERT's random init): `init` itself, or,
    for init = "bert", the experiment's BERT backbone (Backbones.bert, "" when it loads none)."""
    path = experiment_bert if init == EXPERIMENT_BERT else init
    return str(Path(path).expanduser()) if path else ""


def bert_config(path: str):
    """The Hugging Face config of the BERT-style checkpoint in directory `path` (UserError if none)."""
    from transformers import AutoConfig

    if not Path(path).is_dir():
        raise UserError(f"init: no checkpoint directory '{path}' (a local Hugging Face BERT-style directory: "
                        f"config.json, weights and tokenizer files; \"\" = random init)")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"init: cannot read a BERT-style config from '{path}': {str(e).splitlines()[0]}") from None


def check_bert(path: str, width: int, heads: int, depth: int) -> None:
    """UserError unless the checkpoint has this bridge's width and heads and at least its depth."""
    cfg = bert_config(path)
    have = (cfg.hidden_size, cfg.num_attention_heads)
    if have != (width, heads):
        raise UserError(f"init: '{path}' is {have[0]} wide with {have[1]} heads, the bridge {width} with {heads} "
                        f"(give the bridge the checkpoint's width and heads; [bert] names the checkpoint of "
                        f"init = \"bert\"; init = \"\" is random weights)")
    if cfg.num_hidden_layers < depth:
        raise UserError(f"init: '{path}' has {cfg.num_hidden_layers} layers, the bridge {depth}")


@contextlib.contextmanager
def quiet_loading():
    """Hugging Face's loading at error level only: its load report lists the pooler a bare encoder
    lacks, noise here."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_bert(module: nn.Module, path: str, rename=lambda name: name) -> list[str]:
    """Initialise `module` from a local BERT-style Hugging Face checkpoint (a directory that
    `transformers.AutoModel.from_pretrained` reads), as the papers start from bert-base-uncased.

    Each parameter of `module` is looked up under its name with `rename` applied (mapping the
    module's layout onto the checkpoint's `embeddings.*` / `encoder.layer.{i}.*`); a module with
    fewer layers than the checkpoint takes its first ones, as Hugging Face does. Parameters named
    `*_query*` that the checkpoint lacks copy their text twin (LAVIS's Q-Former starts its query
    FFN from BERT's FFN). Returns the names left at their random initialisation (cross-attention,
    new heads). A shape mismatch is a UserError: the bridge's width and heads must be the checkpoint's."""
    from transformers import AutoModel

    if not Path(path).exists():
        raise UserError(f"init: no checkpoint directory '{path}'")
    with quiet_loading():
        try:
            weights = AutoModel.from_pretrained(path, local_files_only=True).state_dict()
        except (OSError, ValueError) as e:
            raise UserError(f"init: cannot read a BERT-style checkpoint from '{path}': {str(e).splitlines()[0]}") from None
    weights = {k.removeprefix("bert."): v for k, v in weights.items()}
    fresh = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            key = rename(name)
            if key not in weights and "_query" in key:
                key = key.replace("_query", "")
            if key not in weights:
                fresh.append(name)
                continue
            w = weights[key]
            if name.endswith("word_embeddings.weight") and w.shape[0] != p.shape[0]:
                raise UserError(f"init: the checkpoint's vocabulary has {w.shape[0]} tokens, "
                                f"the bridge's tokenizer {p.shape[0]}")
            if w.shape != p.shape:
                raise UserError(f"init: {name} is {tuple(p.shape)} here and {tuple(w.shape)} in '{path}' "
                                f"(set the bridge's width and heads to the checkpoint's)")
            p.copy_(w)
    return fresh
