"""AR, FLM's causal-LM baseline (docs/methods.md, MLM and AR baselines): on the shared text-side
model, every caption token is predicted from the image and the tokens before it (left-to-right
stream)."""

from __future__ import annotations

import torch

from vlp_bench.registry import METHODS
from vlp_bench.textside import Predictions, TextSideConfig, TextSideMethod


@METHODS.register("ar")
class AR(TextSideMethod):
    """Causal language modeling on a trainable text side cross-attending to the image (FLM's AR baseline)."""

    Config = TextSideConfig
    # the FLM paper's text side: RoBERTa-base's first 6 layers and 6 new cross-modal layers, 12 heads
    paper_config = TextSideConfig(text_layers=6, fusion_depth=6, heads=12)

    def predictions(self, text, visual):
        L = text.ids.shape[1]
        later = torch.arange(L)[None, :] >= torch.arange(L)[:, None]  # token i is predicted before it is read
        logits = self.ar_logits(self.stream(text, visual, "l2r"))
        return Predictions(logits, text.targets, later.expand(len(text.ids), L, L))
