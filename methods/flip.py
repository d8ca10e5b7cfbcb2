"""FLIP-style random masking (METHODS.md 2.5): during training, a random share of the visual
tokens is dropped, either after the frozen ViT (the bridge and the LLM see fewer tokens) or at the
ViT's input patches (its forward shrinks too). The bridge is the baseline's. An optional last
stage trains without masking (FLIP's unmasked tuning); evaluation never masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vlp_bench.method import Stage, StepOutput, prefix_lm_loss
from vlp_bench.methods.baseline import Baseline, BaselineConfig
from vlp_bench.registry import METHODS


@dataclass
class FLIPConfig(BaselineConfig):
    mask_ratio: float = 0.5  # share of patch tokens dropped per image; FLIP's 50% (its other setting: 75%)
    where: Literal["bridge", "vit"] = "bridge"  # drop after the frozen ViT, or its input patches (saves the ViT too)
    unmasked_fraction: float = 0.0  # last share of train.steps without masking; FLIP tunes briefly unmasked

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.unmasked_fraction < 1.0:
            raise ValueError(f"unmasked_fraction must be in [0, 1), got {self.unmasked_fraction}")


@METHODS.register("flip")
class FLIP(Baseline):
    """Random masking of visual tokens during training, after or inside the ViT (METHODS.md 2.5)."""

    Config = FLIPConfig
    paper_config = FLIPConfig(width=768, depth=12, heads=12, mask_ratio=0.5)

    @classmethod
    def check(cls, cfg: FLIPConfig, backbones) -> None:
        if cfg.where == "vit" and not backbones.vision.can_drop_patches():
            raise ValueError("where = 'vit' needs a ViT-style encoder (timm VisionTransformer or similar)")

    def stages(self, total_steps: int) -> list[Stage]:
        unmasked = int(round(total_steps * self.cfg.unmasked_fraction))
        return [Stage("masked", total_steps - unmasked)] + ([Stage("unmasked", unmasked)] if unmasked else [])

    def kept_patches(self) -> int:
        patches = self.vision.num_tokens - self.vision.num_prefix_tokens
        return max(1, round(patches * (1 - self.cfg.mask_ratio)))

    def masked_visual(self, images: torch.Tensor) -> torch.Tensor:
        """Prefix tokens + a random subset of kept_patches() patch tokens per image (in their order)."""
        p, n = self.vision.num_prefix_tokens, self.vision.num_tokens
        keep = torch.rand(len(images), n - p, device=images.device).argsort(dim=1)[:, : self.kept_patches()]
        keep = keep.sort(dim=1).values
        with torch.no_grad():
            if self.cfg.where == "vit":
                return self.vision(images, keep)
            visual = self.vision(images)
        kept = visual[:, p:].gather(1, keep[..., None].expand(-1, -1, visual.shape[-1]))
        return torch.cat([visual[:, :p], kept], dim=1)

    def training_loss(self, batch: dict, stage: Stage) -> StepOutput:
        if stage.name == "unmasked":
            return super().training_loss(batch, stage)
        prefix = self.bridge(self.masked_visual(batch["images"]))
        loss = prefix_lm_loss(self.llm, self.tokenizer, prefix, batch["prompt"], batch["captions"])
        return StepOutput(loss, prefix.shape[1])

    def info(self) -> dict:
        return {"mask_ratio": self.cfg.mask_ratio, "where": self.cfg.where,
                "tokens_to_llm_masked": self.vision.num_prefix_tokens + self.kept_patches(),
                "tokens_to_llm": self.vision.num_tokens}
