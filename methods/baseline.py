"""No-merge baseline (docs/methods.md, Baseline): SimVLG's bridge with r = 0. As EVLGen's connector:
frozen ViT -> trainable LayerNorm (`ln_vision`) -> Linear to the bridge's width -> BERT embeddings
(positions, token type 0, LayerNorm, dropout) -> BERT encoder layers over *all* visual tokens ->
Linear -> frozen LLM, trained with the LLM's LM loss on caption tokens (docs/fidelity.md, SimVLG)."""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn as nn

from vlp_bench.method import FrozenLLMMethod
from vlp_bench.nn.bert import EXPERIMENT_BERT, BertLayer, Embeddings, check_bert, init_normal, init_source, load_bert
from vlp_bench.registry import METHODS


@dataclass
class BaselineConfig:
    width: int = 128  # paper scale is 768 (BERT-base); 128 matches the tiny backbones
    depth: int = 2  # paper scale is 12 BERT layers; 2 trains in minutes on a CPU
    heads: int = 4
    dropout: float = 0.1  # BERT's, on attention probabilities and every sub-layer's output (EVLGen keeps it)
    positions: int = 512  # learned positions (BERT's 512); the visual tokens must fit
    # what the bridge starts from, as EVLGen from bert-base-uncased: "bert" = the experiment's BERT
    # backbone ([bert]: the tiny world pre-trains one on its captions; the tiny-world measurement is
    # in docs/decisions.md), a local Hugging Face BERT-style directory, or "" = BERT's random init
    # (N(0, 0.02)); a checkpoint's width and heads must be this bridge's
    init: str = EXPERIMENT_BERT

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@METHODS.register("baseline")
class Baseline(FrozenLLMMethod):
    """No merging: every visual token goes through the bridge to the LLM (docs/methods.md, Baseline)."""

    Config = BaselineConfig
    paper_config = BaselineConfig(width=768, depth=12, heads=12)  # SimVLG's 12-layer BERT-base bridge

    @classmethod
    def check(cls, cfg: BaselineConfig, backbones) -> None:
        super().check(cfg, backbones)
        init = init_source(cfg.init, backbones.bert)
        if init:  # before any training, not when a recipe is read
            check_bert(init, cfg.width, cfg.heads, cfg.depth)
        n = cls.input_tokens(cfg, backbones.vision)
        if n > cfg.positions:
            raise ValueError(f"the bridge learns {cfg.positions} positions but gets {n} visual tokens")

    def __init__(self, cfg: BaselineConfig, backbones):
        super().__init__(cfg, backbones)
        self.ln_vision = nn.LayerNorm(backbones.vision.dim)
        self.inp = nn.Linear(backbones.vision.dim, cfg.width)
        self.embeddings = Embeddings(cfg.width, cfg.positions, cfg.dropout, token_types=2)
        self.layers = nn.ModuleList(BertLayer(cfg.width, cfg.heads, cfg.dropout) for _ in range(cfg.depth))
        self.out = nn.Linear(cfg.width, backbones.llm_dim)
        for part in (self.embeddings, self.layers):  # BERT's init; the two projections keep torch's, as EVLGen
            init_normal(part)
        self.init = init = init_source(cfg.init, backbones.bert)
        if init:  # BERT's embeddings and first `depth` layers; the projections stay new
            load_bert(nn.ModuleDict({"embeddings": self.embeddings, "layers": self.layers}), init,
                      rename=lambda name: name.replace("layers.", "encoder.layer.", 1))

    def info(self) -> dict:
        return {**super().info(), "init": self.init}  # the checkpoint the bridge started from ("" = random)

    def bridge(self, visual: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(vectors=self.inp(self.ln_vision(visual)))  # (B, N, width)
        for layer in self.layers:
            x, _ = layer(x)
        return self.out(x)  # (B, N, llm_dim): every visual token reaches the LLM; post-LN, no final norm
