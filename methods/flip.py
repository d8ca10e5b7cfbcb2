"""FLIP-style random masking (docs/methods.md, FLIP): during training, a random share of the image
encoder's input patches is dropped, so the frozen ViT runs on the rest only (FLIP's mechanism and
its speed-up: the encoder's forward shrinks with the mask, and the bridge and the LLM see fewer
tokens too). `where = "bridge"` is the cheaper-to-support variant kept for comparison: the full
ViT runs and its output tokens are dropped after it (only the bridge and the LLM save). An optional
last stage trains without masking (FLIP's unmasked tuning); evaluation never masks. `flip` puts it
in front of the baseline's bridge; as a vision side it stacks onto any bridge method (`simvlg+flip`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vlp_bench.method import Stage, VisionSide
from vlp_bench.methods.baseline import Baseline, BaselineConfig
from vlp_bench.registry import METHODS


@dataclass
class FLIPOptions:
    mask_ratio: float = 0.5  # share of patch tokens dropped per image; FLIP's 50% (its other setting: 75%)
    # "vit": drop the encoder's input patches, as FLIP (its forward shrinks too); "bridge": drop the
    # tokens after the full frozen ViT (for encoders that cannot run on a subset of their patches)
    where: Literal["bridge", "vit"] = "vit"
    unmasked_fraction: float = 0.0  # last share of train.steps without masking; FLIP tunes briefly unmasked

    def validate(self) -> None:
        getattr(super(), "validate", lambda: None)()
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.unmasked_fraction < 1.0:
            raise ValueError(f"unmasked_fraction must be in [0, 1), got {self.unmasked_fraction}")


class FLIPSide(VisionSide):
    """Random masking of the ViT's input patches during training, or of its output tokens (docs/methods.md, FLIP)."""

    Options = FLIPOptions
    video = False  # a random mask per image: averaged frames would mix tokens of different patches

    @classmethod
    def check(cls, cfg, backbones) -> None:
        super().check(cfg, backbones)
        if cfg.where == "vit" and not backbones.vision.can_drop_patches():
            raise ValueError(f"where = 'vit' (masking the encoder's input patches) needs a timm VisionTransformer "
                             f"or Eva, not {type(backbones.vision.model).__name__}; where = 'bridge' drops the "
                             f"tokens after the encoder instead")
        if cls.needs_patch_grid:
            raise ValueError("masking leaves no patch grid, and this bridge pools one")

    def stages(self, total_steps: int) -> list[Stage]:
        """The bridge's stages, masked, then the unmasked tuning stage (which a bridge treats as it
        treats any stage it does not name: with its last objective, e.g. BLIP-2's stage 2)."""
        unmasked = int(round(total_steps * self.cfg.unmasked_fraction))
        return super().stages(total_steps - unmasked) + ([Stage("unmasked", unmasked)] if unmasked else [])

    def kept_patches(self) -> int:
        patches = self.vision.num_tokens - self.vision.num_prefix_tokens
        return max(1, round(patches * (1 - self.cfg.mask_ratio)))

    def encode(self, images: torch.Tensor, stage: Stage | None = None) -> torch.Tensor:
        """Evaluation and the unmasked stage: every token. Training: the prefix tokens and a random
        subset of kept_patches() patches per image, in their original order."""
        if stage is None or stage.name == "unmasked":
            return super().encode(images, stage)
        p, n = self.vision.num_prefix_tokens, self.vision.num_tokens
        keep = torch.rand(len(images), n - p, device=images.device).argsort(dim=1)[:, : self.kept_patches()]
        keep = keep.sort(dim=1).values
        with torch.no_grad():
            if self.cfg.where == "vit":
                return self.vision(images, keep=keep)
            visual = self.vision(images)
        kept = visual[:, p:].gather(1, keep[..., None].expand(-1, -1, visual.shape[-1]))
        return torch.cat([visual[:, :p], kept], dim=1)

    def info(self) -> dict:
        return {**super().info(), "mask_ratio": self.cfg.mask_ratio, "where": self.cfg.where,
                "tokens_from_vision_masked": self.vision.num_prefix_tokens + self.kept_patches()}


@dataclass
class FLIPConfig(FLIPOptions, BaselineConfig):
    pass


@METHODS.register("flip")
class FLIP(FLIPSide, Baseline):
    """Random masking of the ViT's input patches in training (or of its output), baseline bridge (docs/methods.md, FLIP)."""

    Config = FLIPConfig
    # the EVA ViT-g runs on the kept half of its 256 patches (+ CLS), as FLIP's encoder does
    paper_config = FLIPConfig(width=768, depth=12, heads=12, mask_ratio=0.5, where="vit")
