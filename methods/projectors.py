"""Projector baselines (docs/methods.md, Projectors): no trained transformer between the frozen ViT
and the frozen LLM, only LLaVA-1.5's 2-layer MLP projector. `mlp` keeps every visual token; `pool`
average-pools the patch grid to k x k tokens first, so the pair isolates what pooling costs and buys."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlp_bench.nn.layers import projector
from vlp_bench.method import FrozenLLMMethod
from vlp_bench.registry import METHODS


@dataclass
class MLPConfig:
    pass  # LLaVA-1.5's projector has no knobs: Linear(vision, llm) -> GELU -> Linear(llm, llm)


@METHODS.register("mlp")
class MLPProjector(FrozenLLMMethod):
    """LLaVA-style 2-layer MLP projector: every visual token reaches the LLM (docs/methods.md, Projectors)."""

    Config = MLPConfig
    paper_config = MLPConfig()

    def __init__(self, cfg, backbones):
        super().__init__(cfg, backbones)
        self.proj = projector(backbones.vision.dim, backbones.llm_dim)

    def bridge(self, visual: torch.Tensor) -> torch.Tensor:
        return self.proj(visual)  # (B, N, llm_dim)


@dataclass
class PoolConfig:
    grid: int = 4  # pool the patch grid to grid x grid tokens: 4 x 4 = 16 of the tiny ViT's 8 x 8 patches
    keep_prefix: bool = False  # also pass the CLS (and register) tokens; LLaVA drops CLS

    def validate(self) -> None:
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")


@METHODS.register("pool")
class Pool(FrozenLLMMethod):
    """Average pooling of the patch grid to k x k tokens, then the MLP projector (docs/methods.md, Projectors)."""

    Config = PoolConfig
    paper_config = PoolConfig(grid=6)  # 36 tokens from ViT-g's 16 x 16 patches, near BLIP-2's 32 queries
    needs_patch_grid = True  # vision sides that drop patches (FLIP) cannot feed it

    @classmethod
    def check(cls, cfg: PoolConfig, backbones) -> None:
        patches = cls.input_tokens(cfg, backbones.vision) - backbones.vision.num_prefix_tokens
        side = math.isqrt(patches)
        if side * side != patches:
            raise ValueError(f"pool needs a square patch grid; the vision encoder gives {patches} patch tokens")
        if cfg.grid > side:
            raise ValueError(f"grid {cfg.grid} is larger than the {side} x {side} patch grid")

    def __init__(self, cfg: PoolConfig, backbones):
        super().__init__(cfg, backbones)
        self.proj = projector(backbones.vision.dim, backbones.llm_dim)

    def bridge(self, visual: torch.Tensor) -> torch.Tensor:
        p = self.vision.num_prefix_tokens
        prefix, patches = visual[:, :p], visual[:, p:]
        B, P, D = patches.shape
        side = math.isqrt(P)
        grid = patches.transpose(1, 2).reshape(B, D, side, side)  # row-major patches, as ViTs flatten them
        pooled = F.adaptive_avg_pool2d(grid, self.cfg.grid).flatten(2).transpose(1, 2)  # (B, grid^2, D)
        tokens = torch.cat([prefix, pooled], dim=1) if self.cfg.keep_prefix else pooled
        return self.proj(tokens)

    def info(self) -> dict:
        return {"tokens_to_llm": self.cfg.grid ** 2 + self.cfg.keep_prefix * self.vision.num_prefix_tokens}
