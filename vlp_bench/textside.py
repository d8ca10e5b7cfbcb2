"""The text-side family (docs/methods.md, FLM): FLM and its MLM and AR baselines, three objectives
over one shared model, so they differ only in what they predict from what.

The model, as FLM's reference builds it: the *first `text_layers` layers* of a pre-trained text
model, then `fusion_depth` new cross-modal layers (self-attention, cross-attention to the frozen
ViT's tokens, MLP), all trainable; the new layers and any new head train at `lr_scale` times the
learning rate. The text model is the experiment's masked-LM encoder (`init = "bert"`: the tiny
world's BERT, pre-trained with MLM on the world's text as RoBERTa was on real text; any local
BERT/RoBERTa directory at real scale) or a copy of the frozen causal LM (`init = "llm"`). It runs
over [anchor] prompt caption [EOS] under one of three attention patterns on the same weights:
left-to-right (causal), right-to-left (the mirrored causal mask) and bidirectional. The new
layers' output projections start at zero, so before training the text side *is* its pre-trained
body. Tokens are predicted by the causal LM's own head (`llm`) or by a new BERT-style prediction
head (an encoder: FLM's heads are new).

Evaluation decodes captions (and VQA answers) left to right from that stream by beam search, so the
family is scored by the same tasks as the frozen-LLM methods. MLM's pre-training leaves no decoder,
so every method of the family gets the same short AR fine-tuning (`decoder_steps`) on a copy of its
weights before each evaluation (vlp_bench.train.trainer.finetune): its cost is recorded apart from
the pre-training cost, and the weights go back afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp_bench.errors import UserError
from vlp_bench.nn.bert import EXPERIMENT_BERT, bert_config
from vlp_bench.nn.layers import Attention, CrossAttention, mlp
from vlp_bench.nn.text_model import LLM, keep_first_layers, load_text_model, text_model_path
from vlp_bench.method import Method, Stage, StepOutput
from vlp_bench.nn.generation import DecodingConfig, beam_search, pad_rows
from vlp_bench.nn.kv_cache import StreamDecoder

MODES = ("l2r", "r2l", "bi")


@dataclass
class TextSideConfig:
    # the text model: "bert" = the experiment's masked-LM encoder ([bert]), as FLM starts from RoBERTa;
    # "llm" = a copy of the frozen causal LM; else a local Hugging Face BERT/RoBERTa directory
    init: str = EXPERIMENT_BERT
    text_layers: int = 2  # its first layers kept (FLM: 6 of RoBERTa-base's 12; here 2 of the tiny BERT's 4)
    fusion_depth: int = 2  # new cross-modal layers above them (FLM: 6, as many as it keeps; so here)
    heads: int = 4  # of the new layers; the text model keeps its own
    lr_scale: float = 5.0  # learning-rate multiplier of the new layers and heads (FLM's lr_mult_cross_modal, lr_mult_head)
    decoder_steps: int = 100  # AR fine-tuning before every evaluation (0 = none): the tiny LM re-learns to caption in ~100

    def validate(self) -> None:
        if self.text_layers < 1:
            raise ValueError(f"text_layers must be >= 1, got {self.text_layers}")
        if self.fusion_depth < 0 or self.decoder_steps < 0:
            raise ValueError("fusion_depth and decoder_steps must be >= 0")
        if self.heads < 1:
            raise ValueError(f"heads must be >= 1, got {self.heads}")
        if self.lr_scale <= 0:
            raise ValueError(f"lr_scale must be > 0, got {self.lr_scale}")


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

    def forward(self, x: torch.Tensor, visual: torch.Tensor, mask: torch.Tensor, past=None,
                visual_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """past, visual_kv: incremental decoding (vlp_bench.nn.kv_cache's StreamCache.block)."""
        x = x + self.attn(self.norm1(x), mask, past)[0]
        x = x + self.cross(self.norm2(x), visual, kv=visual_kv)
        return x + self.mlp(self.norm3(x))


class TextSide(nn.Module):
    """The kept layers of the text model plus the new cross-modal layers:
    features(embeds, valid, visual, mode) -> (B, L, D), or every layer's output (per_layer)."""

    def __init__(self, body: nn.Module, head: nn.Module, vision_dim: int, text_layers: int, fusion_depth: int,
                 heads: int):
        super().__init__()
        keep_first_layers(body, text_layers)
        body.config.use_cache = False
        self.body, self.head = body, head
        self.dim = body.get_input_embeddings().embedding_dim
        self.fusion = nn.ModuleList(FusionBlock(self.dim, vision_dim, heads) for _ in range(fusion_depth))
        # RoBERTa counts positions from padding_idx + 1
        self.position_offset = body.config.pad_token_id + 1 if body.config.model_type == "roberta" else 0

    @property
    def depth(self) -> int:
        return self.body.config.num_hidden_layers + len(self.fusion)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body.get_input_embeddings()(ids)

    def positions(self, valid: torch.Tensor) -> torch.Tensor:
        """Position ids (B, L): left padding does not move them."""
        return (valid.long().cumsum(1) - 1).clamp(min=0) + self.position_offset

    def features(self, embeds: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor, mode: str,
                 per_layer: bool = False, cache=None):
        """embeds (B, L, D) on the model's device; valid (B, L) on the CPU (masks are built there, so
        the meta device of `vlp-bench flops` runs this too). per_layer: the output of every kept
        layer and every cross-modal layer, in order (FLM's reconstructor reads each).
        cache: incremental decoding of the causal stream (a vlp_bench.nn.kv_cache.StreamCache):
        embeds are then only the last positions of valid's, those the cache has not seen; they
        read the others' keys and values from it, and visual is one row per image, not per beam."""
        if cache is not None and mode != "l2r":
            raise ValueError(f"a key/value cache holds for the causal stream (l2r) only, not {mode!r}")
        seen = 0 if cache is None else cache.seen
        mask = allowed(mode, valid.cpu())[:, :, seen:]  # the new positions' rows: the same mask as in full
        bias = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(embeds.dtype).min)  # 4D: used as given
        positions = self.positions(valid.cpu())[:, seen:]
        mask, bias, positions = (t.to(embeds.device) for t in (mask, bias.to(embeds.dtype), positions))
        out = self.body(inputs_embeds=embeds, attention_mask=bias, position_ids=positions,
                        output_hidden_states=per_layer, **({} if cache is None else cache.body_kwargs()))
        if cache is not None:
            cache.check_body(valid.shape[1])
        layers = list(out.hidden_states[1:]) if per_layer else []
        x = out.last_hidden_state
        for i, block in enumerate(self.fusion):
            x = block(x, visual, mask) if cache is None else block(x, None, mask, *cache.block(i, block.cross, visual))
            layers.append(x)
        return layers if per_layer else x

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def anchor_id(tokenizer) -> int:
    """The token every row starts with, never predicted nor hidden (so every prediction sees one):
    an encoder's [CLS] (<s>), else BOS, else EOS."""
    for tid in (getattr(tokenizer, "cls_token_id", None), tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise ValueError("the text model's tokenizer has no CLS, BOS or EOS token to start rows with")


def end_id(tokenizer) -> int:
    """The token that ends a caption (predicted, and where decoding stops): EOS, else BERT's [SEP]."""
    tid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(tokenizer, "sep_token_id", None)
    if tid is None:
        raise ValueError("the text model's tokenizer has no EOS or SEP token to end captions with")
    return tid


def prefix_ids(tokenizer, prompt: str) -> list[int]:
    """[anchor] + the prompt's tokens."""
    return [anchor_id(tokenizer)] + (tokenizer(prompt, add_special_tokens=False).input_ids if prompt else [])


def text_rows(tokenizer, prompt: str | list[str], captions: list[str]) -> tuple[list[int], list[list[int]]]:
    """(index of each row's first caption token, rows of [anchor] prompt caption [end]); `prompt` is
    one for all rows or one per row (VQA fine-tuning: a question each)."""
    prompts = [prompt] * len(captions) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(captions):
        raise ValueError(f"{len(prompts)} prompts for {len(captions)} captions")
    prefixes = [prefix_ids(tokenizer, p) for p in prompts]
    rows = [pre + tokenizer(" " + c, add_special_tokens=False).input_ids + [end_id(tokenizer)]
            for pre, c in zip(prefixes, captions)]
    return [len(pre) for pre in prefixes], rows


@dataclass
class Text:
    """A batch of token rows, on the CPU (masks are drawn there): ids and valid (B, L); targets
    (B, L): the caption tokens and the end token, the tokens an objective may predict (never the
    anchor or the prompt); first (B, 1): each row's first target."""
    ids: torch.Tensor
    valid: torch.Tensor
    targets: torch.Tensor
    first: torch.Tensor

    @property
    def last(self) -> torch.Tensor:
        """(B, 1): each row's last target (its end token)."""
        return self.valid.sum(1, keepdim=True) - 1


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
    # VQA (a task with `finetune_steps`) is fine-tuned on its training split first, as the FLM paper
    # evaluates: zero-shot, the caption-trained text side answers with captions (docs/results.md);
    # 200 steps took AR from 0.00% to 53.5% (floor 29.4%) on the tiny world
    task_finetune_steps = 200

    def __init__(self, cfg: TextSideConfig, backbones):
        super().__init__(cfg, backbones)  # self.llm stays the frozen original, unused: the text side trains
        body, head, self.tokenizer = load_text_model(cfg.init, backbones)
        self.text = TextSide(body, head, backbones.vision.dim, cfg.text_layers, cfg.fusion_depth, cfg.heads)
        self.counts = {"targets": 0, "predicted": 0, "rows": 0, "hidden_share": 0.0}  # behind info()'s rates

    @classmethod
    def check(cls, cfg, backbones) -> None:
        if cfg.init == LLM:
            base = getattr(backbones.llm, "base_model", None)
            if base is None or base is backbones.llm:
                raise ValueError("init = \"llm\" needs a Hugging Face causal LM with a base model (e.g. Llama, OPT)")
            model = backbones.llm.config
        elif cfg.init == EXPERIMENT_BERT and backbones.text is not None:
            model = backbones.text[0].config
        else:
            model = bert_config(text_model_path(cfg.init, backbones))
        if cfg.text_layers > model.num_hidden_layers:
            raise UserError(f"text_layers = {cfg.text_layers}, but the text model has {model.num_hidden_layers} layers")
        if model.hidden_size % cfg.heads:
            raise ValueError(f"the text model's width {model.hidden_size} is not divisible by heads {cfg.heads}")

    def lr_scale(self, name: str) -> float:
        """The pre-trained layers (and a causal LM's tied head) at the learning rate; the new
        cross-modal layers, heads and objective parts at lr_scale times it, as FLM trains them."""
        return 1.0 if name.startswith("text.body.") else self.cfg.lr_scale

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)  # the text side trains; the frozen originals stay in eval mode
        self.vision.eval()
        self.llm.eval()
        return self

    def decoder_stage(self) -> Stage | None:
        return Stage("decoder", self.cfg.decoder_steps) if self.cfg.decoder_steps else None

    def task_stage(self, steps: int, total_steps: int) -> Stage:
        """A task's fine-tuning trains the decoding stream on its AR loss, decoder phase or not."""
        return Stage("decoder", steps)

    def trainable_parameters(self, stage: Stage) -> list[nn.Parameter]:
        if stage.name == "decoder":  # the stream that decodes; the objective's own heads rest
            return list(self.text.parameters())
        return super().trainable_parameters(stage)

    def flop_parts(self) -> tuple[dict[str, nn.Module], str]:
        # the text model's kept layers and its head (called apart) are "llm"; the new layers the rest
        return {"vision": self.vision, "llm": [self.text.body, self.text.head]}, "bridge"

    def batch_text(self, prompt: str | list[str], captions: list[str]) -> Text:
        first, rows = text_rows(self.tokenizer, prompt, captions)
        ids, valid = pad_rows(rows, self.tokenizer.pad_token_id)
        first = torch.tensor(first)[:, None]
        return Text(ids, valid, valid & (torch.arange(ids.shape[1])[None, :] >= first), first)

    def shape_key(self, batch: dict, stage: Stage):
        return max(map(len, text_rows(self.tokenizer, batch["prompt"], batch["captions"])[1]))

    def training_loss(self, batch: dict, stage: Stage) -> StepOutput:
        visual = self.visual_tokens(batch, stage)
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
        out = {"text_model_params": sum(p.numel() for p in self.text.body.parameters())}
        if c["targets"]:
            out["prediction_rate"] = c["predicted"] / c["targets"]
        if c["rows"]:
            out["corruption_rate"] = c["hidden_share"] / c["rows"]
        return out

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompts: list[str], dec: DecodingConfig, cache: bool = True) -> list[str]:
        """Beam search left to right; `cache`: each step runs only the new token, reading the earlier
        ones' keys and values (vlp_bench.nn.kv_cache); the same tokens as without, fewer FLOPs."""
        rows = [prefix_ids(self.tokenizer, p) for p in prompts]
        ids, valid = pad_rows(rows, self.tokenizer.pad_token_id, left=True)
        decoder = StreamDecoder(self.text, self.encode(images), cached=cache)
        out = beam_search(decoder, ids, valid, dec, end_id(self.tokenizer), self.tokenizer.pad_token_id,
                          reorder=decoder.reorder)
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
