"""The text-side family (docs/methods.md, FLM): FLM and its MLM and AR baselines, three objectives
over one shared model, so they differ only in what they predict from what.

The model: a *trainable copy* of the backbone LM (the tiny world's, or any Hugging Face causal LM)
runs over [anchor] prompt caption [EOS] under one of three attention patterns on the same weights:
left-to-right (causal), right-to-left (the mirrored causal mask) and bidirectional. Above it,
`fusion_depth` new blocks add cross-attention to the frozen ViT's tokens under the same pattern;
their output projections start at zero, so before training the left-to-right stream *is* the
pre-trained LM. The LM's own head predicts tokens for every objective.

Evaluation decodes captions (and VQA answers) left to right from that stream by beam search, so the
family is scored by the same tasks as the frozen-LLM methods. MLM's pre-training leaves no decoder,
so every method of the family gets the same short AR fine-tuning (`decoder_steps`) on a copy of its
weights before each evaluation (vlp_bench.train.trainer.decoder_finetune): its cost is recorded apart from
the pre-training cost, and the weights go back afterwards.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp_bench.nn.layers import Attention, CrossAttention, mlp
from vlp_bench.method import Method, Stage, StepOutput
from vlp_bench.nn.generation import DecodingConfig, beam_search, lm_rows, pad_rows

MODES = ("l2r", "r2l", "bi")


@dataclass
class TextSideConfig:
    fusion_depth: int = 2  # cross-modal layers over the LM copy (FLM/METER use 6 over RoBERTa; 2 fits the tiny LM)
    heads: int = 4  # of the fusion layers; the LM copy keeps its own
    decoder_steps: int = 100  # AR fine-tuning before every evaluation (0 = none): the tiny LM re-learns to caption in ~100

    def validate(self) -> None:
        if self.fusion_depth < 0 or self.decoder_steps < 0:
            raise ValueError("fusion_depth and decoder_steps must be >= 0")
        if self.heads < 1:
            raise ValueError(f"heads must be >= 1, got {self.heads}")


def allowed(mode: str, valid: torch.Tensor) -> torch.Tensor:
    """(B, L) valid tokens -> (B, 1, L, L) bool, True where query i may attend key j: causal (l2r),
    mirrored (r2l) or full (bi), never to padding; every query sees itself, so no row is empty."""
    L = valid.shape[1]
    i = torch.arange(L, device=valid.device)
    pattern = {"l2r": i[None, :] <= i[:, None], "r2l": i[None, :] >= i[:, None],
               "bi": torch.ones(L, L, dtype=torch.bool, device=valid.device)}[mode]
    return ((pattern & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=valid.device))[:, None]


class FusionBlock(nn.Module):
    """Pre-norm self-attention (under the stream's pattern), cross-attention to the image, MLP; the
    three output projections start at zero, so a new block is the identity."""

    def __init__(self, dim: int, vision_dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.cross = CrossAttention(dim, vision_dim, heads)
        self.mlp = mlp(dim)
        for out in (self.attn.proj, self.cross.proj, self.mlp[-1]):
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)

    def forward(self, x: torch.Tensor, visual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)[0]
        x = x + self.cross(self.norm2(x), visual)
        return x + self.mlp(self.norm3(x))


class TextSide(nn.Module):
    """A trainable copy of the LM plus fusion layers: features(ids, valid, visual, mode) -> (B, L, D)."""

    def __init__(self, llm: nn.Module, vision_dim: int, fusion_depth: int, heads: int):
        super().__init__()
        # trainable, so fp32 master weights even where the frozen LM is bf16 (GPU); tied embeddings stay tied
        self.lm = copy.deepcopy(llm).float().requires_grad_(True)
        self.dim = self.lm.get_input_embeddings().embedding_dim
        self.fusion = nn.ModuleList(FusionBlock(self.dim, vision_dim, heads) for _ in range(fusion_depth))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def features(self, embeds: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor, mode: str) -> torch.Tensor:
        """embeds (B, L, D) on the model's device; valid (B, L) on the CPU (masks are built there, so
        the meta device of `vlp-bench flops` runs this too)."""
        mask = allowed(mode, valid.cpu())
        bias = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(embeds.dtype).min)  # 4D: used as given
        positions = (valid.cpu().long().cumsum(1) - 1).clamp(min=0)  # left padding does not move positions
        mask, bias, positions = (t.to(embeds.device) for t in (mask, bias.to(embeds.dtype), positions))
        x = self.lm.base_model(inputs_embeds=embeds, attention_mask=bias, position_ids=positions,
                               use_cache=False).last_hidden_state
        for block in self.fusion:
            x = block(x, visual, mask)
        return x

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.lm.get_output_embeddings()(features)


def text_rows(tokenizer, prompt: str, captions: list[str]) -> tuple[int, list[list[int]]]:
    """(index of the first caption token, rows of [anchor] prompt caption [EOS]): the frozen-LLM
    methods' rows (lm_rows) behind an anchor (BOS, else EOS) that is never predicted nor hidden,
    so every prediction sees at least one token."""
    prefix = _prefix(tokenizer, prompt)
    return len(prefix), [prefix + row for row in lm_rows(tokenizer, "", captions)[1]]


def _prefix(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids as lm_rows makes them, starting with the anchor."""
    anchor = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = lm_rows(tokenizer, prompt, [])[0]
    return ids if ids[:1] == [anchor] else [anchor] + ids


@dataclass
class Text:
    """A batch of token rows, on the CPU (masks are drawn there): ids and valid (B, L); targets
    (B, L): the caption tokens and EOS, the tokens an objective may predict (never the prompt)."""
    ids: torch.Tensor
    valid: torch.Tensor
    targets: torch.Tensor
    first: int  # index of the first target (all rows share the prompt)


@dataclass
class Predictions:
    """What an objective predicts. logits (B, L, V): for the token *at* each position; predicted
    (B, L): the tokens it scores; hidden (B, L, L): hidden[b, i, j] = token j is kept from the
    prediction of token i (itself included). Masks are on the CPU; the leakage tests check `hidden`
    against what the logits really depend on. streams: features an objective's loss reuses."""
    logits: torch.Tensor
    predicted: torch.Tensor
    hidden: torch.Tensor
    streams: tuple = ()


class TextSideMethod(Method):
    """Shared mechanics of the text-side objectives. A subclass defines `predictions(text, visual)`;
    its loss is the cross-entropy of the predicted tokens unless it overrides `objective_loss`."""

    Config = TextSideConfig

    def __init__(self, cfg: TextSideConfig, backbones):
        super().__init__(cfg, backbones)  # self.llm stays the frozen original, unused: the copy trains
        self.text = TextSide(backbones.llm, backbones.vision.dim, cfg.fusion_depth, cfg.heads)
        self.counts = {"targets": 0, "predicted": 0, "rows": 0, "hidden_share": 0.0}  # behind info()'s rates

    @classmethod
    def check(cls, cfg, backbones) -> None:
        base = getattr(backbones.llm, "base_model", None)
        if base is None or base is backbones.llm:
            raise ValueError("the text side needs a Hugging Face causal LM with a base model (e.g. Llama, OPT)")
        width = backbones.llm.get_input_embeddings().embedding_dim
        if width % cfg.heads:
            raise ValueError(f"the LM's width {width} is not divisible by heads {cfg.heads}")

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)  # the LM copy trains; the frozen originals stay in eval mode
        self.vision.eval()
        self.llm.eval()
        return self

    def decoder_stage(self) -> Stage | None:
        return Stage("decoder", self.cfg.decoder_steps) if self.cfg.decoder_steps else None

    def trainable_parameters(self, stage: Stage) -> list[nn.Parameter]:
        if stage.name == "decoder":  # the stream that decodes; the objective's own heads rest
            return list(self.text.parameters())
        return super().trainable_parameters(stage)

    def flop_parts(self) -> tuple[dict[str, nn.Module], str]:
        lm = self.text.lm  # the LM copy's body and head (they are called apart); fusion and heads are the rest
        return {"vision": self.vision, "llm": [lm.base_model, lm.get_output_embeddings()]}, "bridge"

    def batch_text(self, prompt: str, captions: list[str]) -> Text:
        first, rows = text_rows(self.tokenizer, prompt, captions)
        ids, valid = pad_rows(rows, self.tokenizer.pad_token_id)
        targets = valid.clone()
        targets[:, :first] = False
        return Text(ids, valid, targets, first)

    def shape_key(self, batch: dict, stage: Stage):
        return max(map(len, text_rows(self.tokenizer, batch["prompt"], batch["captions"])[1]))

    def training_loss(self, batch: dict, stage: Stage) -> StepOutput:
        visual = self.encode(batch["images"])
        text = self.batch_text(batch["prompt"], batch["captions"])
        if stage.name == "decoder":
            return StepOutput(self.ar_loss(text, visual), visual.shape[1])
        out = self.predictions(text, visual)
        n = text.targets.sum(1, keepdim=True).clamp(min=1)
        share = (out.hidden & text.targets[:, None, :]).sum(2) / n  # (B, L): caption share hidden from each prediction
        per_row = out.predicted.sum(1)
        self.counts["targets"] += int(text.targets.sum())
        self.counts["predicted"] += int(per_row.sum())
        self.counts["rows"] += int((text.targets.sum(1) > 0).sum())  # a caption with nothing predicted hid nothing
        self.counts["hidden_share"] += float(((share * out.predicted).sum(1) / per_row.clamp(min=1)).sum())
        return StepOutput(self.objective_loss(text, out), visual.shape[1])  # the visual tokens the text side reads

    def generation_loss(self, batch: dict, stage: Stage) -> StepOutput | None:
        """The decoding stream's AR loss; the trainer reads it after the decoder stage (evaluations)."""
        visual = self.encode(batch["images"])
        text = self.batch_text(batch["prompt"], batch["captions"])
        return StepOutput(self.ar_loss(text, visual), visual.shape[1], weight=float(text.targets.sum()))

    def predictions(self, text: Text, visual: torch.Tensor) -> Predictions:
        raise NotImplementedError

    def objective_loss(self, text: Text, out: Predictions) -> torch.Tensor:
        return token_loss(out.logits, text.ids, out.predicted)

    def stream(self, text: Text, visual: torch.Tensor, mode: str) -> torch.Tensor:
        """Features (B, L, D) of one stream ("l2r", "r2l" or "bi") over the text."""
        return self.text.features(self.text.embed(text.ids.to(visual.device)), text.valid, visual, mode)

    def ar_logits(self, feats: torch.Tensor, mode: str = "l2r") -> torch.Tensor:
        """Logits for the token at each position from a causal stream's features: l2r predicts
        token i from the features at i - 1, r2l from those at i + 1 (rows with no such feature: 0)."""
        logits = self.text.logits(feats)
        out = torch.zeros_like(logits)
        if mode == "l2r":
            out[:, 1:] = logits[:, :-1]
        else:
            out[:, :-1] = logits[:, 1:]
        return out

    def stream_loss(self, text: Text, feats: torch.Tensor, mode: str = "l2r") -> torch.Tensor:
        """The AR loss of a causal stream on the caption tokens (r2l: those with a token to their right)."""
        targets = text.targets.clone()
        if mode == "r2l":
            targets &= torch.cat([text.valid[:, 1:], torch.zeros_like(text.valid[:, :1])], dim=1)
        return token_loss(self.ar_logits(feats, mode), text.ids, targets)

    def ar_loss(self, text: Text, visual: torch.Tensor) -> torch.Tensor:
        return self.stream_loss(text, self.stream(text, visual, "l2r"))

    def info(self) -> dict:
        """The rates measured over the pre-training steps this process ran: prediction rate =
        predicted / caption tokens; corruption rate = the share of a caption hidden from one of its
        predictions (itself included), averaged over a caption's predictions (0 when it has none:
        MLM masked nothing there), then over captions; its expectation is the configured rate."""
        c = self.counts
        out = {"text_lm_params": sum(p.numel() for p in self.text.lm.parameters())}
        if c["targets"]:
            out["prediction_rate"] = c["predicted"] / c["targets"]
        if c["rows"]:
            out["corruption_rate"] = c["hidden_share"] / c["rows"]
        return out

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompts: list[str], dec: DecodingConfig) -> list[str]:
        visual = self.encode(images)
        rows = [_prefix(self.tokenizer, p) for p in prompts]
        ids, valid = pad_rows(rows, self.tokenizer.pad_token_id, left=True)

        def next_logprobs(ids: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            feats = self.text.features(self.text.embed(ids.to(visual.device)), valid, visual[rows], "l2r")
            return F.log_softmax(self.text.logits(feats[:, -1]).float(), dim=-1)

        out = beam_search(next_logprobs, ids, valid, dec,
                          self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]


def token_loss(logits: torch.Tensor, ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the tokens `ids` (B, L) where `where` is True (no boolean indexing:
    shapes stay data-independent)."""
    labels = ids.masked_fill(~where, -100).to(logits.device)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def random_round(x: torch.Tensor) -> torch.Tensor:
    """floor(x), plus one with probability frac(x): an integer whose expectation is exactly x."""
    x = x.float()
    return (x.floor() + (torch.rand(x.shape) < x - x.floor())).long()
