"""SimVLG (docs/methods.md, SimVLG): the baseline's bridge with ToMe token merging after the
attention of every layer, so the visual sequence shrinks layer by layer before it reaches the frozen
LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vlp_bench.methods.baseline import Baseline, BaselineConfig
from vlp_bench.nn.merging import TokenMerger, curriculum_scale, layer_schedule, token_counts
from vlp_bench.registry import METHODS


@dataclass
class SimVLGConfig(BaselineConfig):
    # merged per layer: int | [r, inflection] | per-layer list. The paper's 19 x 12 layers takes
    # 257 -> 29 tokens; on the tiny world 20 x 2 layers takes 65 -> 25, close to the paper's 29.
    r: int | list = 20
    variant: Literal["tome", "evlgen"] = "tome"  # tome = faithful ToMe; evlgen = the released SimVLG code
    curriculum_start: float = 1.0  # schedule scale at step 0 (1.0 = no step curriculum, as the paper)
    curriculum_ramp: float = 0.0  # fraction of training over which the scale reaches 1.0

    def validate(self) -> None:
        super().validate()
        layer_schedule(self.r, self.depth)  # raises ValueError with the reason
        if self.curriculum_start < 0 or not 0 <= self.curriculum_ramp <= 1:
            raise ValueError("curriculum_start must be >= 0 and curriculum_ramp in [0, 1]")


# The paper's bridge (EVA ViT-g/14 at 224 px: 257 tokens; 12 BERT-base layers; r = 19): 29 tokens.
PAPER = SimVLGConfig(width=768, depth=12, heads=12, r=19)
PAPER_INPUT_TOKENS = 257


@METHODS.register("simvlg")
class SimVLG(Baseline):
    """ToMe token merging in every bridge layer (docs/methods.md, SimVLG)."""

    Config = SimVLGConfig
    paper_config = PAPER
    # `vlp-bench search`'s space (vlp_bench/search.py reads the schedule grammar): a list is a
    # categorical choice, {low, high} a range. "inflection" turns r into a ramp [r, inflection] (0 =
    # the same r in every layer); "r_layer_0", ... or "tokens" can replace r ([search.space]).
    search_space = {
        "r": {"low": 0, "high": 31},  # 0 = no merging; 31 x 2 layers takes the tiny ViT's 65 tokens to 3
        "inflection": {"low": -1.0, "high": 1.0},
        "variant": ["tome", "evlgen"],
        "curriculum_start": {"low": 0.0, "high": 1.0},
        "curriculum_ramp": [0.0, 0.25, 0.5],
    }

    @classmethod
    def check(cls, cfg: SimVLGConfig, backbones) -> None:
        n, schedule = cls.input_tokens(cfg, backbones.vision), layer_schedule(cfg.r, cfg.depth)
        if sum(schedule) >= n - 1:  # per layer, r is clamped to half the mergeable tokens, as in ToMe
            raise ValueError(f"merge schedule {schedule} removes {sum(schedule)} tokens but the vision "
                             f"encoder gives {n} (CLS + {n - 1} mergeable)")

    def __init__(self, cfg: SimVLGConfig, backbones):
        super().__init__(cfg, backbones)
        self.schedule = layer_schedule(cfg.r, cfg.depth)
        self.scale = 1.0  # the step curriculum's current scale (1.0 in evaluation)

    def set_progress(self, fraction: float) -> None:
        self.scale = curriculum_scale(fraction, self.cfg.curriculum_start, self.cfg.curriculum_ramp)

    def shape_key(self, batch, stage):
        return super().shape_key(batch, stage), tuple(self.current_schedule())

    def current_schedule(self) -> list[int]:
        scale = self.scale if self.training else 1.0  # inference always uses the full schedule
        return [int(round(r * scale)) for r in self.schedule]

    def bridge(self, visual: torch.Tensor) -> torch.Tensor:
        x = self.inp(visual)  # (B, N, width)
        merger = TokenMerger(x, self.cfg.variant)
        for blk, r in zip(self.blocks, self.current_schedule()):
            x = blk(x, merger.attn_bias(), lambda x, keys, r=r: merger(x, keys, r))
        return self.out(self.norm(x))  # (B, N', llm_dim), N' after merging

    def info(self) -> dict:
        counts = token_counts(self.input_tokens(self.cfg, self.vision), self.schedule)
        return {**super().info(), "merge_schedule": self.schedule, "variant": self.cfg.variant,
                "tokens_per_layer": counts, "tokens_to_llm": counts[-1]}
