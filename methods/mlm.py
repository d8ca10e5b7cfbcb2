"""MLM, FLM's masked-LM baseline (docs/methods.md, MLM and AR baselines): on the shared text-side
model, a random 15% of the caption tokens are replaced by a learned [MASK] embedding and predicted
by the bidirectional encoder: the corruption rate is also the prediction rate, the tie FLM removes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from vlp_bench.registry import METHODS
from vlp_bench.textside import Predictions, TextSideConfig, TextSideMethod, random_round


@dataclass
class MLMConfig(TextSideConfig):
    corruption_rate: float = 0.15  # BERT's masking rate, the MLM baseline of the FLM paper

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.corruption_rate <= 1.0:
            raise ValueError(f"corruption_rate must be in (0, 1], got {self.corruption_rate}")


@METHODS.register("mlm")
class MLM(TextSideMethod):
    """Masked language modeling (15% of caption tokens, [MASK] embedding) on the bidirectional text side."""

    Config = MLMConfig

    def __init__(self, cfg: MLMConfig, backbones):
        super().__init__(cfg, backbones)
        self.mask_embedding = nn.Parameter(0.02 * torch.randn(self.text.dim))

    def draw(self, text) -> torch.Tensor:
        """(B, L) masked positions: round(rate * n) of each row's n caption tokens, rounded at random
        so the expected rate is exact; at least one in the batch, so the loss is defined."""
        targets = text.targets
        k = random_round(self.cfg.corruption_rate * targets.sum(1))  # (B,)
        rank = torch.rand(targets.shape).masked_fill(~targets, 2.0).argsort(1).argsort(1)
        masked = (rank < k[:, None]) & targets
        if not masked.any():
            masked[0, text.first] = True
        return masked

    def predictions(self, text, visual):
        masked = self.draw(text)
        embeds = self.text.embed(text.ids.to(visual.device))
        embeds = torch.where(masked.to(visual.device)[..., None], self.mask_embedding.to(embeds.dtype), embeds)
        logits = self.text.logits(self.text.features(embeds, text.valid, visual, "bi"))
        L = text.ids.shape[1]
        return Predictions(logits, masked, masked[:, None, :].expand(-1, L, L))
