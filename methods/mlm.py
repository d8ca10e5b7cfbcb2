"""MLM, FLM's masked-LM baseline (docs/methods.md, MLM and AR baselines): on the shared text-side
model, 15% of each caption's tokens are chosen by whole words and predicted by the bidirectional
stream; of the chosen tokens 80% are replaced by [MASK], 10% by a random token and 10% kept (BERT's
recipe, as the reference's collator). The corruption rate is also the prediction rate: the tie FLM
removes. A text model without a [MASK] token (a causal LM's copy) gets a learned [MASK] embedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from vlp_bench.methods.corruption import replace_80_10_10, whole_word_mask, word_ids
from vlp_bench.registry import METHODS
from vlp_bench.textside import Predictions, TextSideConfig, TextSideMethod


@dataclass
class MLMConfig(TextSideConfig):
    corruption_rate: float = 0.15  # BERT's masking rate, the MLM baseline of the FLM paper

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.corruption_rate <= 1.0:
            raise ValueError(f"corruption_rate must be in (0, 1], got {self.corruption_rate}")


@METHODS.register("mlm")
class MLM(TextSideMethod):
    """Masked language modeling (15% of caption tokens by whole words, 80/10/10) on the bidirectional text side."""

    Config = MLMConfig
    # the FLM paper's text side: RoBERTa-base's first 6 layers and 6 new cross-modal layers, 12 heads
    paper_config = MLMConfig(text_layers=6, fusion_depth=6, heads=12)

    def __init__(self, cfg: MLMConfig, backbones):
        super().__init__(cfg, backbones)
        if self.tokenizer.mask_token_id is None:
            self.mask_embedding = nn.Parameter(0.02 * torch.randn(self.text.dim))

    def draw(self, text) -> torch.Tensor:
        """(B, L) masked positions: whole words, rate * n of each row's n caption tokens (rounded at
        random); never the end token, a special token the reference's collator does not mask."""
        words = text.targets & (torch.arange(text.ids.shape[1])[None, :] < text.last)
        return whole_word_mask(word_ids(self.tokenizer, text.ids, words), words, self.cfg.corruption_rate)

    def predictions(self, text, visual):
        masked = self.draw(text)
        ids, to_mask, kept = replace_80_10_10(text.ids, masked, self.tokenizer.mask_token_id, len(self.tokenizer))
        embeds = self.text.embed(ids.to(visual.device))
        if self.tokenizer.mask_token_id is None:
            embeds = torch.where(to_mask.to(visual.device)[..., None], self.mask_embedding.to(embeds.dtype), embeds)
        logits = self.text.logits(self.text.features(embeds, text.valid, visual, "bi"))
        L = text.ids.shape[1]  # a kept token (10%) is predicted but not hidden
        return Predictions(logits, masked, (masked & ~kept)[:, None, :].expand(-1, L, L))
