"""FLM, free language modeling (docs/methods.md, FLM): every caption token is predicted (100%
prediction rate) by a reconstructor that reads the left-to-right and right-to-left streams of the
shared text side, each target with its own hidden span, so the corruption rate is free of the
prediction rate.

Reconstructor: cross-attention-only layers; query i is a [MASK] embedding plus position i; keys and
values are the forward features and the reverse features. Forward feature j has read tokens <= j
and reverse feature j tokens >= j, so query i sees forward keys before its span and reverse keys
after it: every token but those of its span. Span corruption (rate c): each target hides a
contiguous span of round(c * n) of its caption's n tokens (at least itself) placed at random around
it, drawn independently per target in one pass; c = 0, FLM's released pre-training, hides the
target alone. Loss: the mean of the FLM loss and the two streams' AR losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from vlp_bench.nn.layers import CrossAttention, mlp
from vlp_bench.registry import METHODS
from vlp_bench.textside import Predictions, TextSideConfig, TextSideMethod, random_round, token_loss


@dataclass
class FLMConfig(TextSideConfig):
    corruption_rate: float = 0.0  # share of a caption hidden from each prediction; 0 = the target alone, as released
    reconstructor_depth: int = 1  # cross-attention-only layers; one reads both streams at once
    max_len: int = 128  # reconstructor positions: prompt + caption tokens (COCO captions stay under 64)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.corruption_rate < 1.0:
            raise ValueError(f"corruption_rate must be in [0, 1), got {self.corruption_rate}")
        if self.reconstructor_depth < 1 or self.max_len < 2:
            raise ValueError("reconstructor_depth must be >= 1 and max_len >= 2")


class ReconstructorLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, dim, heads)
        self.mlp = mlp(dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = q + self.cross(self.norm_q(q), self.norm_kv(kv), mask)
        return q + self.mlp(self.norm2(q))


@METHODS.register("flm")
class FLM(TextSideMethod):
    """Free language modeling: 100% of caption tokens predicted from both streams, each with its own corruption span."""

    Config = FLMConfig

    def __init__(self, cfg: FLMConfig, backbones):
        super().__init__(cfg, backbones)
        dim = self.text.dim
        self.mask_embedding = nn.Parameter(0.02 * torch.randn(dim))
        self.positions = nn.Parameter(0.02 * torch.randn(cfg.max_len, dim))
        self.reconstructor = nn.ModuleList(ReconstructorLayer(dim, cfg.heads) for _ in range(cfg.reconstructor_depth))
        self.norm = nn.LayerNorm(dim)

    def spans(self, text) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, end) (B, L): the span hidden from each target, inclusive, within the caption."""
        B, L = text.ids.shape
        pos = torch.arange(L)[None, :].expand(B, L)
        n = text.targets.sum(1, keepdim=True)
        lo, hi = text.first, text.first + n - 1
        extra = (random_round(self.cfg.corruption_rate * n.expand(B, L)) - 1).clamp(min=0)
        extra = torch.minimum(extra, n - 1)  # tokens hidden besides the target
        first = torch.maximum(pos - extra, torch.full_like(pos, lo))  # the span's possible starts
        last = torch.minimum(pos, hi - extra)
        start = first + (torch.rand(B, L) * (last - first + 1).clamp(min=1)).long()  # uniform over them
        start = torch.where(text.targets, start, pos)
        return start, torch.where(text.targets, start + extra, pos)

    def predictions(self, text, visual):
        B, L = text.ids.shape
        if L > self.cfg.max_len:
            raise ValueError(f"a text of {L} tokens is longer than max_len {self.cfg.max_len} (methods.flm.max_len)")
        start, end = self.spans(text)
        j = torch.arange(L)[None, None, :]
        keys = text.valid[:, None, :]
        forward = keys & (j < start[..., None])  # (B, L queries, L keys): read before the span
        reverse = keys & (j > end[..., None])  # read after the span
        forward[..., 0] |= ~text.targets  # queries that predict nothing read the anchor (no empty row)
        mask = torch.cat([forward, reverse], dim=2)[:, None].to(visual.device)
        streams = self.stream(text, visual, "l2r"), self.stream(text, visual, "r2l")
        kv = torch.cat(streams, dim=1)  # (B, 2L, D): forward keys, then reverse keys
        q = (self.mask_embedding + self.positions[:L]).to(kv.dtype).expand(B, L, -1)
        for layer in self.reconstructor:
            q = layer(q, kv, mask)
        hidden = (j >= start[..., None]) & (j <= end[..., None])
        return Predictions(self.text.logits(self.norm(q)), text.targets, hidden, streams)

    def objective_loss(self, text, out):
        """The mean of the FLM loss and the AR losses of the two streams it ran."""
        l2r, r2l = (self.stream_loss(text, feats, mode) for feats, mode in zip(out.streams, ("l2r", "r2l")))
        return (token_loss(out.logits, text.ids, out.predicted) + l2r + r2l) / 3
