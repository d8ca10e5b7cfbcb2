"""BLIP-2 (docs/methods.md, BLIP-2; LAVIS's blip2_qformer.py): a Q-Former bridge trained in two
stages. Stage 1, without the LLM: image-text contrastive (ITC), matching with hard negatives (ITM)
and grounded generation (ITG), equally weighted. Stage 2: the query outputs, linearly projected, are
the LLM's soft prompt; LM loss only. `blip2-1stage` skips stage 1 (the ablation where OPT's
zero-shot VQA collapses).

Stage 1 as LAVIS runs it (docs/fidelity.md holds the remaining differences):
- one query pass per step: its outputs are ITC's image features, and its self-attention keys and
  values are ITG's `past`, so ITG runs only the text through the layers (text sees all queries and
  the earlier text, queries never see text); the gradient of ITG reaches the query pass through them;
- label smoothing 0.1 on ITC (both directions) and on ITG's LM loss; none on ITM;
- the text padded to a fixed `max_text_len` ([CLS]/[DEC] and the end token included);
- across ranks (data parallel, vlp_bench.train.dist): ITC compares this rank's images with every
  rank's texts and this rank's texts with every rank's images (gathered without gradient), the
  targets offset by rank x local batch; ITM draws its negatives from the gathered batch, the
  negative images' embeddings gathered *with* gradient.

Rank weighting: training_loss returns StepOutput.weight None, so the trainer weights every rank's
loss equally (equal local batches) and averages the gradients: the job optimises the mean over
ranks of each rank's loss, which is what DDP's averaging makes of LAVIS's per-rank loss. The loss
*value* is then the one-process loss of the whole batch (every term is a mean over the local rows,
each row's softmax over the whole batch); the ITC gradient is not quite the one-process one, as in
LAVIS: a rank's loss reaches only its own features (the gathered ones carry no gradient).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp_bench.method import FrozenLLMMethod, Stage, StepOutput
from vlp_bench.nn.bert import EXPERIMENT_BERT, bert_config, check_bert, init_source
from vlp_bench.nn.qformer import LMHead, QFormer, QFormerText, attention_mask, itg_text_mask
from vlp_bench.registry import METHODS
from vlp_bench.train import dist

SMOOTHING = 0.1  # LAVIS's label smoothing on ITC and on ITG's LM loss


@dataclass
class Blip2Config:
    width: int = 128  # paper: 768 (BERT-base)
    depth: int = 4  # paper: 12; twice the tiny baseline's depth, as 188M vs ~89M parameters at paper scale
    heads: int = 4
    num_queries: int = 8  # paper: 32 of 257 ViT tokens; 8 of the tiny ViT's 65 keeps that share
    cross_every: int = 2  # cross-attention to the image in every second layer, as BLIP-2
    embed_dim: int = 64  # ITC projection; paper: 256
    dropout: float = 0.1  # BERT's, kept by LAVIS's Q-Former
    # Stage-1 text, padded (and truncated) to this many Q-Former tokens, [CLS]/[DEC] and the end token
    # included: LAVIS pads to 32 BERT tokens, 2.4 x COCO's mean caption (10.5 words, ~13.5 BERT tokens
    # with [CLS], [SEP] and the period; 32 / 13.5 = 2.37). The default tiny world's captions are 9.92
    # Q-Former tokens on average (7.92 of the tiny LLM's tokenizer + [CLS] + EOS; 20,000 training
    # captions, max 27): round(2.4 x 9.92) = round(23.8) = 24 (0.15% of the captions get truncated).
    max_text_len: int = 24
    stage1_fraction: float = 0.75  # of the step budget; paper: 250k + 80k steps
    # what the Q-Former starts from, as LAVIS from bert-base-uncased: "bert" = the experiment's BERT
    # backbone ([bert]: the tiny world pre-trains one on its captions), a local Hugging Face BERT-style
    # directory, or "" = BERT's random init. A checkpoint's tokenizer then reads the text (random init:
    # the LLM's, with learned [CLS] and [DEC] rows); its width and heads must be the Q-Former's.
    # Checked before any training (`check`), not when the config is read: a recipe may name weights
    # that only the machine that trains has
    init: str = EXPERIMENT_BERT

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not 0.0 <= self.stage1_fraction < 1.0:
            raise ValueError(f"stage1_fraction must be in [0, 1), got {self.stage1_fraction}")
        if self.num_queries < 1 or self.cross_every < 1:
            raise ValueError("num_queries and cross_every must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_text_len < 3:
            raise ValueError(f"max_text_len must be >= 3 ([CLS], a token, the end token), got {self.max_text_len}")


@METHODS.register("blip2")
class Blip2(FrozenLLMMethod):
    """Q-Former, stage 1 (ITC + ITM + ITG, no LLM) then stage 2 (LM loss) (docs/methods.md, BLIP-2)."""

    Config = Blip2Config
    # BLIP-2's Q-Former (BERT-base, 32 queries, ITC dim 256, text of 32); stage 1 is 250k of its 330k steps
    paper_config = Blip2Config(width=768, depth=12, heads=12, num_queries=32, cross_every=2, embed_dim=256,
                               max_text_len=32, stage1_fraction=250 / 330)

    @classmethod
    def check(cls, cfg: Blip2Config, backbones) -> None:
        super().check(cfg, backbones)
        init = init_source(cfg.init, backbones.bert)
        if init:
            check_bert(init, cfg.width, cfg.heads, cfg.depth)
            positions = bert_config(init).max_position_embeddings
            if positions < cfg.max_text_len:
                raise ValueError(f"max_text_len {cfg.max_text_len} is more than the {positions} positions of '{init}'")

    def __init__(self, cfg: Blip2Config, backbones):
        super().__init__(cfg, backbones)
        init = init_source(cfg.init, backbones.bert)
        positions = bert_config(init).max_position_embeddings if init else cfg.max_text_len  # first: a missing directory is named
        self.init = init
        self.text = QFormerText.of_bert(init) if init else QFormerText.of_llm(self.tokenizer)
        self.qformer = QFormer(cfg.width, cfg.depth, cfg.heads, cfg.num_queries, cfg.cross_every,
                               backbones.vision.dim, self.text, positions, cfg.dropout)
        if init:
            self.qformer.load_bert(init)
        # stage-1 heads: the projections and ITM's keep torch's init, as LAVIS's (built outside its BERT)
        self.vision_proj = nn.Linear(cfg.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))  # ITC temperature, BLIP-2's initial value
        self.itm_head = nn.Linear(cfg.width, 2)
        self.itg_head = LMHead(cfg.width, self.text.rows)  # its output layer: the Q-Former's word embeddings
        # stage-2 head
        self.llm_proj = nn.Linear(cfg.width, backbones.llm_dim)

    def info(self) -> dict:
        return {**super().info(), "init": self.init}  # the checkpoint the Q-Former started from ("" = random)

    def stages(self, total_steps: int) -> list[Stage]:
        first = int(round(total_steps * self.cfg.stage1_fraction))
        return ([Stage("stage1", first)] if first else []) + [Stage("stage2", total_steps - first)]

    def trainable_parameters(self, stage: Stage) -> list[nn.Parameter]:
        heads = ([self.vision_proj, self.text_proj, self.itm_head, self.itg_head] if stage.name == "stage1"
                 else [self.llm_proj])
        params = [*self.qformer.parameters(), *(p for h in heads for p in h.parameters())]
        return params + ([self.temp] if stage.name == "stage1" else [])

    def bridge(self, visual: torch.Tensor) -> torch.Tensor:
        queries, _ = self.qformer(context=self.qformer.ln_vision(visual))  # (B, Q, width): queries only
        return self.llm_proj(queries)  # (B, Q, llm_dim)

    def shape_key(self, batch: dict, stage: Stage):
        if stage.name != "stage1":
            return super().shape_key(batch, stage)
        return self.cfg.max_text_len  # stage 1's text is always padded to it

    def training_loss(self, batch: dict, stage: Stage) -> StepOutput:
        if stage.name != "stage1":
            return super().training_loss(batch, stage)
        visual = self.visual_tokens(batch, stage)
        ids, valid = self.text(batch["captions"], self.cfg.max_text_len)
        loss = self.stage1_loss(visual, ids.to(visual.device), valid.to(visual.device))
        # weight None: every rank's loss counts the same, as DDP averages LAVIS's (module docstring)
        return StepOutput(loss, 0)  # stage 1 sends nothing to the LLM

    def generation_loss(self, batch: dict, stage: Stage) -> StepOutput | None:
        if stage.name == "stage1":  # the LLM projection trains only in stage 2: no generation path yet
            return None
        return super().generation_loss(batch, stage)

    def stage1_loss(self, visual: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ITC + ITM + ITG of this rank's pairs: visual (B, N, vision_dim) frozen ViT tokens, ids and
        valid (B, max_text_len) from `self.text`, [CLS] first."""
        qf = self.qformer
        image = qf.ln_vision(visual)
        queries, query_kv = qf(context=image)  # the one query pass: ITC's features, ITG's past
        img = F.normalize(self.vision_proj(queries), dim=-1)  # (B, Q, E)
        cls = qf(ids=ids, mask=attention_mask(0, valid, "text"))[0][:, 0]
        txt = F.normalize(self.text_proj(cls), dim=-1)  # (B, E)
        itc, sim_i2t, sim_t2i = self.itc(img, txt)
        itm = self.itm(image, ids, valid, sim_i2t, sim_t2i)
        return itc + itm + self.itg(ids, valid, query_kv)

    def itc(self, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Contrastive loss of this rank's images against every rank's texts and of its texts against
        every rank's images; similarity = the max over the query embeddings. -> (loss, sim_i2t,
        sim_t2i), the similarities (B, world x B) for ITM's negatives."""
        img_all, txt_all = dist.all_gather(img), dist.all_gather(txt)
        temp = self.temp.clamp(0.001, 0.5)
        sim_i2t = torch.einsum("iqe,te->itq", img, txt_all).amax(dim=-1) / temp
        sim_t2i = torch.einsum("te,iqe->tiq", txt, img_all).amax(dim=-1) / temp
        target = _positives(img.shape[0], img.device)
        loss = (F.cross_entropy(sim_i2t, target, label_smoothing=SMOOTHING)
                + F.cross_entropy(sim_t2i, target, label_smoothing=SMOOTHING)) / 2
        return loss, sim_i2t, sim_t2i

    def itm(self, image: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, sim_i2t: torch.Tensor,
            sim_t2i: torch.Tensor, negatives: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Matching over (image, text), (negative image, text), (image, negative text) in one joint
        pass. negatives: (a text for each image, an image for each text), indices into the gathered
        batch; None = drawn by `hard_negatives`. image: the ViT tokens after ln_vision."""
        B, Q = image.shape[0], self.cfg.num_queries
        ids_all, valid_all = dist.all_gather(ids), dist.all_gather(valid)
        image_all = dist.all_gather_with_grad(image)  # a negative image's rank gets its gradient
        neg_text, neg_image = negatives if negatives is not None else hard_negatives(sim_i2t, sim_t2i)
        image3 = torch.cat([image, image_all[neg_image], image])
        ids3 = torch.cat([ids, ids, ids_all[neg_text]])
        valid3 = torch.cat([valid, valid, valid_all[neg_text]])
        out, _ = self.qformer(context=image3, ids=ids3, mask=attention_mask(Q, valid3, "itm"))
        logits = self.itm_head(out[:, :Q]).mean(dim=1)  # (3B, 2), averaged over the queries
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(image.device)
        return F.cross_entropy(logits, labels)

    def itg(self, ids: torch.Tensor, valid: torch.Tensor, query_kv: list) -> torch.Tensor:
        """Grounded generation: [DEC] replaces [CLS], the text alone runs through the layers with the
        queries' (k, v) as past; position j predicts token j + 1 (the end token included)."""
        dec = ids.clone()
        dec[:, 0] = self.text.dec_id
        out, _ = self.qformer(ids=dec, mask=itg_text_mask(self.cfg.num_queries, valid), past=query_kv)
        return self.lm_loss(out, ids, valid)

    def lm_loss(self, out: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ITG's loss from the text positions' outputs (B, L, width): next-token cross-entropy over
        the valid targets, label smoothing 0.1 (LAVIS's BertLMHeadModel)."""
        logits = self.itg_head(out[:, :-1], self.qformer.word_weight())  # the last position predicts nothing
        target = ids[:, 1:].masked_fill(~valid[:, 1:], -100)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, label_smoothing=SMOOTHING)


def _positives(batch: int, device) -> torch.Tensor:
    """Each local pair's column in the gathered batch: rank x local batch + its index."""
    return dist.group().rank * batch + torch.arange(batch, device=device)


def hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each local image a negative text, for each local text a negative image, as indices into
    the gathered batch, drawn in proportion to softmax(ITC similarity) over every pair of the
    gathered batch but the positive (LAVIS). sim_*: (B, world x B). Deterministic given torch's RNG."""
    B, total = sim_i2t.shape
    if total < 2:
        raise ValueError("ITM needs at least 2 image-text pairs per batch (over all ranks) for its negatives")
    off = torch.ones(B, total, dtype=torch.bool, device=sim_i2t.device)
    off[torch.arange(B, device=sim_i2t.device), _positives(B, sim_i2t.device)] = False
    draws = []
    for sim in (sim_i2t, sim_t2i):
        weights = F.softmax(sim.detach().float(), dim=1) * off + off * 1e-12  # floor: no all-zero row on underflow
        draws.append(torch.multinomial(weights, 1).squeeze(1))
    return draws[0], draws[1]


@dataclass
class Blip2OneStageConfig(Blip2Config):
    stage1_fraction: float = 0.0  # the ablation: stage 2 only, the Q-Former trained by the LLM's loss alone


@METHODS.register("blip2-1stage")
class Blip2OneStage(Blip2):
    """BLIP-2's Q-Former without stage 1: the ablation (docs/methods.md, BLIP-2)."""

    Config = Blip2OneStageConfig
    paper_config = Blip2OneStageConfig(**{**dataclasses.asdict(Blip2.paper_config), "stage1_fraction": 0.0})
