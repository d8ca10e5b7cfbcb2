"""No-merge baseline (docs/methods.md, Baseline): frozen ViT -> Linear -> self-attention encoder
over *all* visual tokens -> Linear -> frozen LLM, trained with the LLM's LM loss on caption tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from vlp_bench.nn.layers import Block
from vlp_bench.method import FrozenLLMMethod
from vlp_bench.registry import METHODS


@dataclass
class BaselineConfig:
    width: int = 128  # paper scale is 768; 128 matches the tiny backbones
    depth: int = 2  # paper scale is 12 BERT layers; 2 trains in minutes on a CPU
    heads: int = 4

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


@METHODS.register("baseline")
class Baseline(FrozenLLMMethod):
    """No merging: every visual token goes through the bridge to the LLM (docs/methods.md, Baseline)."""

    Config = BaselineConfig
    paper_config = BaselineConfig(width=768, depth=12, heads=12)  # SimVLG's 12-layer BERT-base-sized bridge

    def __init__(self, cfg: BaselineConfig, backbones):
        super().__init__(cfg, backbones)
        self.inp = nn.Linear(backbones.vision.dim, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, backbones.llm_dim)

    def bridge(self, visual: torch.Tensor) -> torch.Tensor:
        x = self.inp(visual)  # (B, N, width)
        for blk in self.blocks:
            x = blk(x)
        return self.out(self.norm(x))  # (B, N, llm_dim): every visual token reaches the LLM
