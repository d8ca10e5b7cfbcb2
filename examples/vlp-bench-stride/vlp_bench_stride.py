"""Stride: keep every s-th patch token of the frozen ViT (and its CLS token), then LLaVA's MLP
projector to the frozen LLM. The simplest token reduction there is; stride 1 is vlp-bench's `mlp`.

A complete vlp-bench method in one file (docs/adding-a-method.md builds it step by step)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlp_bench.nn.layers import projector
from vlp_bench.method import FrozenLLMMethod


@dataclass
class StrideConfig:
    stride: int = 2  # keep every 2nd patch: the tiny ViT's 64 patches -> 32, + CLS = 33 tokens to the LLM

    def validate(self) -> None:  # called when bench.toml's [methods.stride] is read: one-line errors
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")


class Stride(FrozenLLMMethod):
    """Keep every s-th patch token (and the CLS token), then the 2-layer MLP projector (example plug-in)."""

    Config = StrideConfig
    paper_config = StrideConfig(stride=8)  # ViT-g/14's 256 patches -> 32 (+ CLS): BLIP-2's 32 queries
    search_space = {"stride": [1, 2, 4, 8]}  # `vlp-bench search --method stride`: 65 .. 9 tokens on the tiny ViT

    @classmethod
    def check(cls, cfg: StrideConfig, backbones) -> None:
        patches = cls.input_tokens(cfg, backbones.vision) - backbones.vision.num_prefix_tokens
        if cfg.stride > patches:
            raise ValueError(f"stride {cfg.stride} is larger than the encoder's {patches} patch tokens")

    def __init__(self, cfg: StrideConfig, backbones):
        super().__init__(cfg, backbones)
        self.proj = projector(backbones.vision.dim, backbones.llm_dim)  # the only trainable part

    def bridge(self, visual: torch.Tensor) -> torch.Tensor:
        p = self.vision.num_prefix_tokens  # CLS (and register) tokens come first: always kept
        kept = torch.cat([visual[:, :p], visual[:, p :: self.cfg.stride]], dim=1)
        return self.proj(kept)  # (B, p + ceil(patches / stride), llm_dim)

    def info(self) -> dict:
        """Facts for results.json; `vlp-bench validate` checks tokens_to_llm against what runs."""
        p = self.vision.num_prefix_tokens
        patches = self.input_tokens(self.cfg, self.vision) - p
        return {**super().info(), "tokens_to_llm": p + -(-patches // self.cfg.stride)}
