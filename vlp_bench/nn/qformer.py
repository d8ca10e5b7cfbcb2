"""BLIP-2's Q-Former: learned query tokens and text tokens share self-attention layers; the queries
also cross-attend to the frozen vision tokens in every `cross_every`-th layer. Which token may
attend to which is set per objective by `attention_mask` (ITC, ITM, ITG, and queries only).

Pre-norm blocks (as the other bridges here) with separate feed-forward layers for queries and text,
as in BLIP-2. Text uses the LLM's tokenizer (the tiny world has no BERT); position 0 of the text is
a learned [CLS] (ITC, ITM) or [DEC] (ITG) token.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from vlp_bench.nn.layers import Attention, CrossAttention, mlp

MaskMode = Literal["queries", "text", "itm", "itg"]


def attention_mask(n_query: int, text_valid: torch.Tensor | None, mode: MaskMode) -> torch.Tensor | None:
    """Boolean (B, 1, L, L) mask, True = may attend, over [queries; text] (text_valid: (B, Lt)).

    queries: queries see queries (no text).     text: text sees valid text (ITC's text pass).
    itm: everything sees all queries and valid text.
    itg: queries see only queries; text sees all queries and valid earlier text (and itself).
    """
    if mode == "queries":
        return None
    B, Lt = text_valid.shape
    if mode == "text":
        return text_valid[:, None, None, :].expand(B, 1, Lt, Lt)
    L = n_query + Lt
    keys = torch.cat([torch.ones(B, n_query, dtype=torch.bool, device=text_valid.device), text_valid], dim=1)
    mask = keys[:, None, None, :].expand(B, 1, L, L).clone()
    if mode == "itg":
        mask[:, :, :n_query, n_query:] = False  # queries never see the text they are to generate
        causal = torch.ones(Lt, Lt, dtype=torch.bool, device=text_valid.device).tril()
        mask[:, :, n_query:, n_query:] &= causal
    return mask


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, vision_dim: int, cross: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim) if cross else None
        self.cross = CrossAttention(dim, vision_dim, heads) if cross else None
        self.norm_q, self.mlp_q = nn.LayerNorm(dim), mlp(dim)
        self.norm_t, self.mlp_t = nn.LayerNorm(dim), mlp(dim)

    def forward(self, x: torch.Tensor, n_query: int, mask, image: torch.Tensor | None) -> torch.Tensor:
        a, _ = self.attn(self.norm1(x), mask)
        x = x + a
        q, t = x[:, :n_query], x[:, n_query:]
        if self.cross is not None and n_query:
            q = q + self.cross(self.norm_cross(q), image)
        q = q + self.mlp_q(self.norm_q(q))
        t = t + self.mlp_t(self.norm_t(t))
        return torch.cat([q, t], dim=1)


class QFormer(nn.Module):
    CLS, DEC = 0, 1  # rows of `special`

    def __init__(self, width: int, depth: int, heads: int, num_queries: int, cross_every: int,
                 vision_dim: int, vocab_size: int, max_text_len: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        self.ln_vision = nn.LayerNorm(vision_dim)
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(max_text_len + 1, width)
        self.special = nn.Parameter(torch.randn(2, width) * 0.02)
        self.layers = nn.ModuleList(QFormerLayer(width, heads, vision_dim, cross=(i % cross_every == 0))
                                    for i in range(depth))
        self.norm = nn.LayerNorm(width)

    def embed_text(self, ids: torch.Tensor, special: int) -> torch.Tensor:
        """(B, L) token ids -> (B, 1 + L, width) with [CLS] or [DEC] first."""
        first = self.special[special].expand(ids.shape[0], 1, -1)
        x = torch.cat([first, self.tok(ids)], dim=1)
        return x + self.pos(torch.arange(x.shape[1], device=ids.device))

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """image: (B, N, vision_dim) or None (no queries); text: embedded (B, Lt, width) or None."""
        parts = []
        if image is not None:
            image = self.ln_vision(image)
            parts.append(self.queries.expand(image.shape[0], -1, -1))
        if text is not None:
            parts.append(text)
        x = torch.cat(parts, dim=1)
        n_query = self.queries.shape[1] if image is not None else 0
        for layer in self.layers:
            x = layer(x, n_query, mask, image)
        return self.norm(x)  # (B, n_query + Lt, width)
