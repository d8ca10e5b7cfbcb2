"""BLIP-2 (docs/methods.md, BLIP-2): a Q-Former bridge trained in two stages. Stage 1, without the
LLM: image-text contrastive (ITC), matching with hard negatives (ITM) and grounded generation (ITG),
equally weighted. Stage 2: the query outputs, linearly projected, are the LLM's soft prompt; LM
loss only. `blip2-1stage` skips stage 1 (the ablation where OPT's zero-shot VQA collapses)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp_bench.method import FrozenLLMMethod, Stage, StepOutput
from vlp_bench.nn.generation import pad_rows
from vlp_bench.nn.qformer import QFormer, attention_mask
from vlp_bench.registry import METHODS


@dataclass
class Blip2Config:
    width: int = 128  # paper: 768 (BERT-base)
    depth: int = 4  # paper: 12; twice the tiny baseline's depth, as 188M vs ~89M parameters at paper scale
    heads: int = 4
    num_queries: int = 8  # paper: 32 of 257 ViT tokens; 8 of the tiny ViT's 65 keeps that share
    cross_every: int = 2  # cross-attention to the image in every second layer, as BLIP-2
    embed_dim: int = 64  # ITC projection; paper: 256
    max_text_len: int = 32  # caption tokens seen by the Q-Former's text side
    stage1_fraction: float = 0.75  # of the step budget; paper: 250k + 80k steps

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not 0.0 <= self.stage1_fraction < 1.0:
            raise ValueError(f"stage1_fraction must be in [0, 1), got {self.stage1_fraction}")
        if self.num_queries < 1 or self.cross_every < 1:
            raise ValueError("num_queries and cross_every must be >= 1")


@METHODS.register("blip2")
class Blip2(FrozenLLMMethod):
    """Q-Former, stage 1 (ITC + ITM + ITG, no LLM) then stage 2 (LM loss) (docs/methods.md, BLIP-2)."""

    Config = Blip2Config
    # BLIP-2's Q-Former (BERT-base, 32 queries, ITC dim 256); stage 1 is 250k of its 330k steps
    paper_config = Blip2Config(width=768, depth=12, heads=12, num_queries=32, cross_every=2, embed_dim=256,
                               max_text_len=32, stage1_fraction=250 / 330)

    def __init__(self, cfg: Blip2Config, backbones):
        super().__init__(cfg, backbones)
        vocab = len(self.tokenizer)
        self.qformer = QFormer(cfg.width, cfg.depth, cfg.heads, cfg.num_queries, cfg.cross_every,
                               backbones.vision.dim, vocab, cfg.max_text_len)
        # stage-1 heads
        self.vision_proj = nn.Linear(cfg.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))  # ITC temperature, BLIP-2's initial value
        self.itm_head = nn.Linear(cfg.width, 2)
        self.itg_head = nn.Linear(cfg.width, vocab)
        # stage-2 head
        self.llm_proj = nn.Linear(cfg.width, backbones.llm_dim)

    def stages(self, total_steps: int) -> list[Stage]:
        first = int(round(total_steps * self.cfg.stage1_fraction))
        return ([Stage("stage1", first)] if first else []) + [Stage("stage2", total_steps - first)]

    def trainable_parameters(self, stage: Stage) -> list[nn.Parameter]:
        heads = ([self.vision_proj, self.text_proj, self.itm_head, self.itg_head] if stage.name == "stage1"
                 else [self.llm_proj])
        params = [*self.qformer.parameters(), *(p for h in heads for p in h.parameters())]
        return params + ([self.temp] if stage.name == "stage1" else [])

    def bridge(self, visual: torch.Tensor) -> torch.Tensor:
        queries = self.qformer(image=visual)  # (B, Q, width): queries only
        return self.llm_proj(queries)  # (B, Q, llm_dim)

    def shape_key(self, batch: dict, stage: Stage):
        if stage.name != "stage1":
            return super().shape_key(batch, stage)
        return self._text(batch["captions"], "cpu")[0].shape[1]  # the Q-Former's text length

    def training_loss(self, batch: dict, stage: Stage) -> StepOutput:
        if stage.name != "stage1":
            return super().training_loss(batch, stage)
        visual = self.encode(batch["images"], stage)
        ids, valid = self._text(batch["captions"], visual.device)
        loss = self.itc_itm_itg(visual, ids, valid)
        return StepOutput(loss, 0)  # stage 1 sends nothing to the LLM

    def _text(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        eos, L = self.tokenizer.eos_token_id, self.cfg.max_text_len
        rows = [(self.tokenizer(c, add_special_tokens=False).input_ids + [eos])[:L] for c in captions]
        ids, valid = pad_rows(rows, self.tokenizer.pad_token_id)
        return ids.to(device), valid.to(device)

    def itc_itm_itg(self, visual: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, Q = visual.shape[0], self.cfg.num_queries
        with_first = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)  # [CLS]/[DEC] is valid
        qf = self.qformer

        # ITC: queries and text in separate passes; similarity = max over the query embeddings
        img = F.normalize(self.vision_proj(qf(image=visual)), dim=-1)  # (B, Q, E)
        cls = qf(text=qf.embed_text(ids, qf.CLS), mask=attention_mask(0, with_first, "text"))[:, 0]
        txt = F.normalize(self.text_proj(cls), dim=-1)  # (B, E)
        temp = self.temp.clamp(0.001, 0.5)
        sim = torch.einsum("iqe,te->itq", img, txt).max(dim=-1).values / temp  # (B images, B texts)
        target = torch.arange(B, device=visual.device)
        itc = (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2

        # ITM: one pass with full attention; hard negatives drawn in proportion to ITC similarity
        neg_text, neg_image = hard_negatives(sim.detach())
        v3 = torch.cat([visual, visual, visual[neg_image]], dim=0)
        ids3 = torch.cat([ids, ids[neg_text], ids], dim=0)
        valid3 = torch.cat([with_first, with_first[neg_text], with_first], dim=0)
        out = qf(image=v3, text=qf.embed_text(ids3, qf.CLS), mask=attention_mask(Q, valid3, "itm"))
        logits = self.itm_head(out[:, :Q]).mean(dim=1)  # (3B, 2), averaged over the queries
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(visual.device)
        itm = F.cross_entropy(logits, labels)

        # ITG: text sees all queries and the earlier text; [DEC] replaces the first text token
        out = qf(image=visual, text=qf.embed_text(ids, qf.DEC), mask=attention_mask(Q, with_first, "itg"))
        L = ids.shape[1]
        pred = self.itg_head(out[:, Q : Q + L])  # position j ([DEC], t1, ...) predicts token j
        itg = F.cross_entropy(pred.reshape(B * L, -1), ids.masked_fill(~valid, -100).reshape(-1))
        return itc + itm + itg


def hard_negatives(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a negative text, for each text a negative image, drawn in proportion to
    softmax(ITC similarity) over the *other* pairs of the batch (never the positive)."""
    B = sim.shape[0]
    if B < 2:
        raise ValueError("ITM needs at least 2 image-text pairs per batch for its negatives")
    off = ~torch.eye(B, dtype=torch.bool, device=sim.device)
    w_i2t = F.softmax(sim.float(), dim=1) * off + off * 1e-12  # tiny floor: no all-zero row on underflow
    w_t2i = F.softmax(sim.float().t(), dim=1) * off + off * 1e-12
    return torch.multinomial(w_i2t, 1).squeeze(1), torch.multinomial(w_t2i, 1).squeeze(1)


@dataclass
class Blip2OneStageConfig(Blip2Config):
    stage1_fraction: float = 0.0  # the ablation: stage 2 only, the Q-Former trained from scratch by the LLM


@METHODS.register("blip2-1stage")
class Blip2OneStage(Blip2):
    """BLIP-2's Q-Former without stage 1: the ablation (docs/methods.md, BLIP-2)."""

    Config = Blip2OneStageConfig
    paper_config = Blip2OneStageConfig(**{**dataclasses.asdict(Blip2.paper_config), "stage1_fraction": 0.0})
