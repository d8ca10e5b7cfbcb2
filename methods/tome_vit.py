"""ToMe inside the frozen ViT (docs/methods.md, ToMe in the ViT): the encoder's own blocks merge
tokens (the library's bipartite matching and proportional attention, on the ViT's keys), which saves
the encoder's forward and hands every bridge fewer tokens. `tome-vit` puts it in front of the
baseline's bridge; as a vision side it stacks onto any bridge method (`simvlg+tome-vit`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vlp_bench.nn.merging import layer_schedule, token_counts
from vlp_bench.method import Stage, VisionSide
from vlp_bench.methods.baseline import Baseline, BaselineConfig
from vlp_bench.registry import METHODS


@dataclass
class ToMeViTOptions:
    # merged per ViT block: int | [r, inflection] | per-block list. 8 x 4 tiny blocks take 65 -> 33
    # tokens; ToMe's ViT-L/16 setting is r = 8 over 24 blocks (197 -> 5 at most, clamped per block)
    vit_r: int | list = 8
    vit_variant: Literal["tome", "evlgen"] = "tome"  # tome = size-weighted mean + proportional attention


class ToMeViTSide(VisionSide):
    """ToMe token merging inside the frozen ViT (docs/methods.md, ToMe in the ViT)."""

    Options = ToMeViTOptions
    video = False  # each frame merges its own patches: their average would mix unrelated tokens

    @classmethod
    def vit_schedule(cls, cfg, vision) -> list[int]:
        return layer_schedule(cfg.vit_r, len(vision.model.blocks) + 1 + vision.feature_layer)

    @classmethod
    def input_tokens(cls, cfg, vision) -> int:
        return token_counts(vision.num_tokens, cls.vit_schedule(cfg, vision), vision.num_prefix_tokens)[-1]

    @classmethod
    def check(cls, cfg, backbones) -> None:
        vision = backbones.vision
        if not vision.is_plain_vit():
            raise ValueError(f"ToMe inside the encoder needs a timm VisionTransformer, not {type(vision.model).__name__}")
        schedule = cls.vit_schedule(cfg, vision)  # a malformed schedule raises ValueError with the reason
        if sum(schedule) >= vision.num_tokens - vision.num_prefix_tokens:
            raise ValueError(f"ViT merge schedule {schedule} removes {sum(schedule)} tokens but the encoder "
                             f"has {vision.num_tokens - vision.num_prefix_tokens} patch tokens")
        super().check(cfg, backbones)  # the bridge's own check, which sees input_tokens() above

    def encode(self, images: torch.Tensor, stage: Stage | None = None) -> torch.Tensor:
        with torch.no_grad():  # the same merging in training and evaluation, as ToMe
            return self.vision(images, merge=(self.vit_schedule(self.cfg, self.vision), self.cfg.vit_variant))

    def info(self) -> dict:
        counts = token_counts(self.vision.num_tokens, self.vit_schedule(self.cfg, self.vision),
                              self.vision.num_prefix_tokens)
        info = {"vit_merge_schedule": self.vit_schedule(self.cfg, self.vision), "vit_tokens_per_layer": counts}
        return {"tokens_to_llm": counts[-1], **super().info(), **info}


@dataclass
class ToMeViTConfig(ToMeViTOptions, BaselineConfig):
    pass


@METHODS.register("tome-vit")
class ToMeViT(ToMeViTSide, Baseline):
    """ToMe merging inside the frozen ViT, then the baseline's bridge (docs/methods.md, ToMe in the ViT)."""

    Config = ToMeViTConfig
    # ToMe's "2x throughput" point for ViT-L: r = 8 per block over 24 blocks of ViT-L/16's 196 patches.
    # The scale that costs it is vitl-1b's ViT-L/14 with 256 patches, so r keeps ToMe's share per
    # block: 8 / 196 x 256 = 10 (257 -> 27 tokens; vision FLOPs 1.85x fewer). EVA's ViT-g blocks are
    # not supported inside the encoder yet: `vlp-bench flops --preset paper` says so
    paper_config = ToMeViTConfig(width=768, depth=12, heads=12, vit_r=10)
