"""FLM, free language modeling (docs/methods.md, FLM): every caption token is predicted (100%
prediction rate) by a reconstructor that reads the left-to-right and right-to-left streams of the
shared text side, each target with its own hidden span, so the corruption rate is free of the
prediction rate.

Reconstructor, as the reference builds it: one cross-attention-only layer beside each layer of the
text side (the kept pre-trained layers, then the cross-modal ones), each reading *that* layer's
forward and reverse features. Query i starts as the [MASK] token at position i through the text
model's embeddings (a learned vector and positions where the text model has neither: a causal LM's
copy). Forward feature j has read tokens <= j and reverse feature j tokens >= j, so query i sees
forward keys before its span and reverse keys after it: every token but those of its span. Span
corruption (rate c): each target hides a span drawn as the reference draws it (methods.corruption:
Binomial length, centred on the target, truncated at the caption's ends), independently per target;
c = 0, FLM's released pre-training, hides the target alone. Loss: the mean of the FLM loss and the
two streams' AR losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from vlp_bench.methods.corruption import span_extents
from vlp_bench.nn.layers import CrossAttention, mlp
from vlp_bench.registry import METHODS
from vlp_bench.textside import Predictions, TextSideConfig, TextSideMethod, token_loss


@dataclass
class FLMConfig(TextSideConfig):
    corruption_rate: float = 0.0  # share of a caption hidden from each prediction; 0 = the target alone, as released
    # reconstructor layers: -1 = one beside every text-side layer (FLM's 6 + 6); k = beside the last k only
    reconstructor_layers: int = -1
    max_len: int = 128  # learned query positions (a causal LM's copy only): prompt + caption tokens

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.corruption_rate < 1.0:
            raise ValueError(f"corruption_rate must be in [0, 1), got {self.corruption_rate}")
        if self.reconstructor_layers == 0 or self.reconstructor_layers < -1:
            raise ValueError(f"reconstructor_layers must be -1 (every layer) or >= 1, got {self.reconstructor_layers}")
        if self.reconstructor_layers > self.text_layers + self.fusion_depth:
            raise ValueError(f"reconstructor_layers {self.reconstructor_layers} > the text side's "
                             f"{self.text_layers + self.fusion_depth} layers")
        if self.max_len < 2:
            raise ValueError("max_len must be >= 2")


class ReconstructorLayer(nn.Module):
    """Cross-attention from the queries to one layer's two streams, then an MLP (no self-attention)."""

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
    """Free language modeling: 100% of caption tokens predicted from both streams, layer by layer, each with its own corruption span."""

    Config = FLMConfig
    # the FLM paper's text side: RoBERTa-base's first 6 layers and 6 new cross-modal layers, 12 heads
    paper_config = FLMConfig(text_layers=6, fusion_depth=6, heads=12)

    def __init__(self, cfg: FLMConfig, backbones):
        super().__init__(cfg, backbones)
        dim, depth = self.text.dim, self.text.depth
        n = depth if cfg.reconstructor_layers == -1 else cfg.reconstructor_layers
        self.reconstructor = nn.ModuleList(ReconstructorLayer(dim, cfg.heads) for _ in range(n))
        self.norm = nn.LayerNorm(dim)
        self.embeds_queries = hasattr(self.text.body, "embeddings") and self.tokenizer.mask_token_id is not None
        if not self.embeds_queries:
            self.mask_embedding = nn.Parameter(0.02 * torch.randn(dim))
            self.positions = nn.Parameter(0.02 * torch.randn(cfg.max_len, dim))

    def queries(self, B: int, L: int, device) -> torch.Tensor:
        """(B, L, D): [MASK] at every position, through the text model's embeddings (word +
        position + LayerNorm, as the reference's queries) or the learned vector and positions."""
        if self.embeds_queries:
            ids = torch.full((1, L), self.tokenizer.mask_token_id, device=device)
            pos = self.text.positions(torch.ones(1, L, dtype=torch.bool)).to(device)
            return self.text.body.embeddings(input_ids=ids, position_ids=pos).expand(B, L, -1)
        if L > self.cfg.max_len:
            raise ValueError(f"a text of {L} tokens is longer than max_len {self.cfg.max_len} (methods.flm.max_len)")
        return (self.mask_embedding + self.positions[:L]).expand(B, L, -1)

    def spans(self, text) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, end) (B, L): the span hidden from each target, inclusive, within the caption."""
        B, L = text.ids.shape
        pos = torch.arange(L)[None, :].expand(B, L)
        n = text.targets.sum(1, keepdim=True)
        start, end = span_extents(pos, n, text.first, text.last, self.cfg.corruption_rate)
        return torch.where(text.targets, start, pos), torch.where(text.targets, end, pos)

    def predictions(self, text, visual):
        B, L = text.ids.shape
        start, end = self.spans(text)
        j = torch.arange(L)[None, None, :]
        keys = text.valid[:, None, :]
        forward = keys & (j < start[..., None])  # (B, L queries, L keys): read before the span
        reverse = keys & (j > end[..., None])  # read after the span
        forward[..., 0] |= ~text.targets  # queries that predict nothing read the anchor (no empty row)
        mask = torch.cat([forward, reverse], dim=2)[:, None].to(visual.device)
        embeds = self.text.embed(text.ids.to(visual.device))
        fwd = self.text.features(embeds, text.valid, visual, "l2r", per_layer=True)
        rev = self.text.features(embeds, text.valid, visual, "r2l", per_layer=True)
        q = self.queries(B, L, visual.device).to(embeds.dtype)
        for layer, f, r in zip(self.reconstructor, fwd[-len(self.reconstructor):], rev[-len(self.reconstructor):]):
            q = layer(q, torch.cat([f, r], dim=1), mask)  # that layer's forward keys, then its reverse keys
        hidden = (j >= start[..., None]) & (j <= end[..., None])
        return Predictions(self.text.logits(self.norm(q)), text.targets, hidden, (fwd[-1], rev[-1]))

    def objective_loss(self, text, out):
        """The mean of the FLM loss and the AR losses of the two streams it ran."""
        l2r, r2l = (self.stream_loss(text, feats, mode) for feats, mode in zip(out.streams, ("l2r", "r2l")))
        return (token_loss(out.logits, text.ids, out.predicted) + l2r + r2l) / 3
