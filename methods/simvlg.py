"""SimVLG (docs/methods.md, SimVLG): the baseline's bridge with ToMe token merging after the
attention of every layer, so the visual sequence shrinks layer by layer before it reaches the frozen
LLM."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from vlp_bench.errors import UserError
from vlp_bench.methods.baseline import Baseline, BaselineConfig
from vlp_bench.nn.merging import TokenMerger, curriculum_scale, layer_schedule, token_counts
from vlp_bench.registry import METHODS


@dataclass
class SimVLGConfig(BaselineConfig):
    # merged per layer: int | [r, inflection] | per-layer list. The paper's 19 x 12 layers takes
    # 257 -> 29 tokens; on the tiny world 20 x 2 layers takes 65 -> 25, close to the paper's 29.
    r: int | list = 20
    # evlgen = the released SimVLG code: plain mean, no size bias (ToMe's own advice for training);
    # tome = ToMe's size-weighted mean with proportional attention (the ablation)
    variant: Literal["tome", "evlgen"] = "evlgen"
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
PAPER_TOKENS_TO_LLM = 29


def schedule_for_tokens(n_tokens: int, depth: int, tokens: int, protected: int = 1) -> list[int]:
    """Per-layer r that takes n_tokens to `tokens` (or as close as ToMe's per-layer clamp allows),
    merging as evenly as possible across the layers."""
    def fewest(t: int, layers: int) -> int:  # the fewest tokens `layers` more layers can leave
        for _ in range(layers):
            t -= (t - protected) // 2
        return t

    schedule, t = [], n_tokens
    for i in range(depth):
        cap = (t - protected) // 2
        r = min(max(math.ceil((t - tokens) / (depth - i)), 0), cap)
        while r < cap and fewest(t - r, depth - i - 1) > tokens:  # merge more now if later layers cannot
            r += 1
        schedule.append(r)
        t -= r
    return schedule


def schedule_values(params: dict, n_tokens: int = 2, depth: int = 1) -> dict:
    """Sampled parameters -> [methods.simvlg] values, reading the schedule grammar's three forms:
    - "r" with "inflection": the ramp [r, inflection] (inflection 0: the same r in every layer);
    - "r_layer_0", "r_layer_1", ...: a per-layer list (one per bridge layer);
    - "tokens": the final token count, reached by merging evenly across the layers
      (n_tokens: tokens into the bridge; depth: its layers)."""
    values = dict(params)
    inflection = values.pop("inflection", None)
    if inflection is not None and "r" in values and round(inflection, 6) != 0:
        values["r"] = [values["r"], float(inflection)]
    layers = sorted((k for k in values if k.startswith("r_layer_")), key=lambda k: int(k.rpartition("_")[2]))
    if layers:
        if len(layers) != depth:
            raise UserError(f"search.space: {len(layers)} r_layer_* parameters for a bridge of {depth} layers")
        values["r"] = [int(values.pop(k)) for k in layers]
    if "tokens" in values:
        values["r"] = schedule_for_tokens(n_tokens, depth, int(values.pop("tokens")))
    return values


@METHODS.register("simvlg")
class SimVLG(Baseline):
    """ToMe token merging in every bridge layer (docs/methods.md, SimVLG)."""

    Config = SimVLGConfig
    paper_config = PAPER
    # `vlp-bench search`'s space (read by search_values below, the schedule grammar): a list is a
    # categorical choice, {low, high} a range. "inflection" turns r into a ramp [r, inflection] (0 =
    # the same r in every layer); "r_layer_0", ... or "tokens" can replace r ([search.space]).
    search_derived = ("inflection", "tokens", "r_layer_")  # the schedule grammar (schedule_values)
    search_space = {
        "r": {"low": 0, "high": 31},  # 0 = no merging; 31 x 2 layers takes the tiny ViT's 65 tokens to 3
        "inflection": {"low": -1.0, "high": 1.0},
        "variant": ["tome", "evlgen"],
        "curriculum_start": {"low": 0.0, "high": 1.0},
        "curriculum_ramp": [0.0, 0.25, 0.5],
    }

    @classmethod
    def search_values(cls, params: dict, cfg: SimVLGConfig, backbones) -> dict:
        return schedule_values(params, cls.input_tokens(cfg, backbones.vision), cfg.depth)

    @classmethod
    def search_start_points(cls, cfg: SimVLGConfig, backbones, space: dict) -> list[dict]:
        """Trials every study starts from: no merging, and the paper's schedule scaled to this encoder:
        SimVLG keeps 29 of ViT-g's 257 tokens (r = 19 in 12 layers); here, with "r", the constant r
        within the space's range whose final count (ToMe clamps each layer to half) comes closest to
        that share, or with "tokens", that share itself."""
        n = cls.input_tokens(cfg, backbones.vision)
        goal = n * PAPER_TOKENS_TO_LLM / PAPER_INPUT_TOKENS
        form = next((k for k in ("r", "tokens") if isinstance(space.get(k), dict)), None)
        if form is None:
            return []
        lo, hi = space[form]["low"], space[form]["high"]
        if form == "r":
            ends = (lo, min(range(lo, hi + 1), key=lambda r: abs(token_counts(n, [r] * cfg.depth)[-1] - goal)))
        else:
            ends = (min(max(n, lo), hi), min(max(round(goal), lo), hi))
        fixed = {"inflection": 0.0, "curriculum_start": 1.0, "curriculum_ramp": 0.0, "variant": "evlgen"}
        points = []
        for value in dict.fromkeys(ends):
            p = {k: value if k == form else fixed.get(k, v[0] if isinstance(v, list) else None) for k, v in space.items()}
            if all(v is not None for v in p.values()):  # a parameter with no known value: no known point
                points.append(p)
        return points

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
        x = self.embeddings(vectors=self.inp(self.ln_vision(visual)))  # (B, N, width)
        merger = TokenMerger(x, self.cfg.variant)
        for layer, r in zip(self.layers, self.current_schedule()):  # merging after each attention, as EVLGen
            x, _ = layer(x, merger.attn_bias(), lambda a, keys, r=r: merger(a, keys, r))
        return self.out(x)  # (B, N', llm_dim), N' after merging

    def info(self) -> dict:
        counts = token_counts(self.input_tokens(self.cfg, self.vision), self.schedule)
        return {**super().info(), "merge_schedule": self.schedule, "variant": self.cfg.variant,
                "tokens_per_layer": counts, "tokens_to_llm": counts[-1]}
