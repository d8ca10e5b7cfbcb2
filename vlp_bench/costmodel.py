"""`vlp-bench flops`: the FLOPs of one training sample of each method at a named scale, counted
on the meta device (real module shapes, no weights, no memory), by part and pass.

This is where a claimed speed-up meets arithmetic: if a method's per-sample cost is not 5x lower
than another's, a 5x wall-clock gain has to come from somewhere else (fewer steps, a skipped
stage, a better kernel). Per-sample figures of a multi-stage method are the mean over its stages,
weighted by their share of the training steps.

Scales (also what `vlp-bench bench` times, there with random weights on the device):
- tiny: the tiny world's backbones and the methods as configured (bench.toml and --set); the
  text-side family reads a tiny-BERT-shaped text model ([bert]'s recipe).
- vitl-1b: a CLIP ViT-L/14 at 224 px (257 tokens, penultimate block read) and a Llama-3.2-1B-shaped
  LLM (1.2B parameters): the "ViT-L-sized vision tower and 1B-class LLM" of a single-GPU job;
  methods at their paper configs, captions as in paper; the text-side family reads RoBERTa-base.
- paper: each method on its own paper's backbones. The frozen-LLM methods: EVA ViT-g/14 at 224 px
  (257 tokens, penultimate block read, as BLIP-2), OPT-2.7B, the 12-layer 768-wide bridge, SimVLG's
  r = 19, BLIP-2's Q-Former with 32 queries; captions of 32 tokens, no prompt (pre-training). The
  text-side family (FLM, MLM, AR): the FLM paper's own setting (`flm_setting`): CLIP ViT-B/32 at
  288 px and RoBERTa-base, text rows padded to 50 tokens as its reference pre-trains; there the
  reference trains the ViT, which vlp-bench keeps frozen, so each cost is also given with the ViT
  trained (`trained_vision`). Each method file gives its paper-scale config (`paper_config`).

A table never mixes backbones silently: every method's entry names its backbones and input sizes,
and its cost ratio is to a reference costed on the same backbones (`references`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from vlp_bench.backbones import (
    Backbones,
    VisionEncoder,
    freeze,
    frozen_dtype,
    tiny_llama,
    tiny_vit,
)
from vlp_bench.config import on_clips
from vlp_bench.errors import UserError
from vlp_bench.log import text_table
from vlp_bench.nn.bert import bert_config
from vlp_bench.registry import METHODS
from vlp_bench.textside import TextSideMethod
from vlp_bench.train.flops import UNIT, FlopCount, count_step

BATCH = 8  # samples per counted step: costs are per sample; >= 2 for BLIP-2's in-batch negatives


class LengthTokenizer:
    """Stands in for a tokenizer where only lengths matter: one token per whitespace word (a BOS
    first when asked for special tokens), ids that are valid for a vocabulary of `vocab_size`.
    `special`: name -> id (pad, bos, eos, cls, sep, mask), as a text model's tokenizer has them for
    the text-side family; its pieces never start with "##", so whole-word masking masks tokens."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2
    cls_token_id = sep_token_id = mask_token_id = None

    def __init__(self, vocab_size: int, **special: int | None):
        self.vocab_size = vocab_size
        for name, tid in special.items():
            setattr(self, f"{name}_token_id", tid)
        ids = {self.pad_token_id, self.eos_token_id, self.bos_token_id, *special.values()}
        self.word_id = min(set(range(len(ids) + 1)) - ids)  # a word: the first id that is no special token

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text: str, add_special_tokens: bool = True):
        return SimpleNamespace(input_ids=[self.bos_token_id] * add_special_tokens + [self.word_id] * len(text.split()))

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [f"t{i}" for i in ids]


def text_model(config) -> tuple[nn.Module, LengthTokenizer]:
    """(body, tokenizer stand-in) of a BERT/RoBERTa-style text model of this Hugging Face config,
    on the current device, trainable (Backbones.text): ids from the config, else BERT-style extra
    tokens at the vocabulary's end ([CLS], [SEP], [MASK], as the tiny BERT adds them)."""
    from transformers import AutoModel

    body = AutoModel.from_config(config, add_pooling_layer=False)
    V = config.vocab_size
    bos, eos = config.bos_token_id, config.eos_token_id
    return body, LengthTokenizer(V, pad=config.pad_token_id, bos=V - 3 if bos is None else bos,
                                 cls=V - 3 if bos is None else bos, eos=V - 2 if eos is None else eos,
                                 sep=V - 2 if eos is None else eos, mask=V - 1)


def roberta_base():
    """RoBERTa-base as published: 12 layers 768 wide, 12 heads, FFN 3072, 50265 tokens, 514
    positions counted from padding_idx 1 + 1; <s> 0, <pad> 1, </s> 2, <mask> 50264."""
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, attn_implementation="sdpa")


@dataclass
class Scale:
    """Everything a per-sample cost depends on besides the method, for the methods costed on one
    set of backbones; `family`: the text-side family's own setting where the scale has one (paper)."""

    name: str
    build: Callable[[], Backbones]  # the backbones, built on first use (`backbones`)
    image_size: int
    caption_words: int  # + EOS = the caption's tokens
    prompt: str
    method_configs: dict  # method name -> its Config at this scale
    frames: int = 0  # a training sample is a clip of this many frames; 0 = an image
    vision_label: str = ""  # the backbones in words, named beside each method's cost
    llm_label: str = ""
    text_label: str = ""  # the text-side family's text model (Backbones.text)
    family: Scale | None = None  # where the text-side family is costed, if not here
    reference: str | None = None  # the cost reference here when the requested one runs elsewhere
    trains_vision: bool = False  # this setting's paper trains the vision encoder: costs also with it trained
    costs: dict = field(default_factory=dict, repr=False)  # per_sample_costs' results, by method: each counted once

    @functools.cached_property
    def backbones(self) -> Backbones:
        return self.build()

    def setting(self, name: str) -> Scale:
        """The Scale method `name` is costed in: the family's own for the text-side family, if any."""
        family = self.family is not None and issubclass(METHODS.get(name), TextSideMethod)
        return self.family if family else self

    def label(self, name: str) -> str:
        """Method `name`'s backbones in words: vision + the language model it runs."""
        s = self.setting(name)
        cfg = s.method_configs.get(name)
        text = issubclass(METHODS.get(name), TextSideMethod) and getattr(cfg, "init", "") == "bert"
        return f"{s.vision_label} + {s.text_label if text else s.llm_label}"


def _frozen(module, device) -> torch.nn.Module:
    """Frozen, in the dtype load_backbones gives frozen backbones on `device`."""
    return freeze(module).to(frozen_dtype(device))


def frames_of(bench) -> int:
    """data.frames when the experiment's tasks are on clips (its samples are clips), else 0."""
    return bench.data.frames if on_clips(bench) else 0


def tiny_scale(bench, device="meta") -> Scale:
    """The tiny world as configured; captions of the world's typical length. The text-side family's
    text model: [bert]'s, shaped from its tiny recipe or its directory's config (none without one)."""
    def build() -> Backbones:
        from transformers import BertConfig

        b = bench.bert  # the tiny BERT as vlp_bench.backbones.tiny pre-trains it: the LM's tokens + 3
        text = (BertConfig(vocab_size=bench.llm.vocab_size + 3, hidden_size=b.width, num_hidden_layers=b.depth,
                           num_attention_heads=b.heads, intermediate_size=4 * b.width, pad_token_id=0,
                           attn_implementation="sdpa") if b.name == "tiny" else bert_config(b.name) if b.name else None)
        with torch.device(device):
            vision = VisionEncoder(tiny_vit(bench.vision, 0), bench.vision.image_size, (0.5,) * 3, (0.5,) * 3,
                                   bench.vision.feature_layer)
            llm = tiny_llama(bench.llm, bench.llm.vocab_size)
            text = text_model(text) if text is not None else None
        tokenizer = LengthTokenizer(bench.llm.vocab_size)
        return Backbones(_frozen(vision, device), _frozen(llm, device), tokenizer, text=text)

    # 7 + EOS: the default tiny world's captions are 7.9 tokens long on average (median 7, max 25)
    return Scale("tiny", build, bench.vision.image_size, 7, bench.experiment.prompt, dict(bench.methods),
                 frames_of(bench), "tiny ViT", "tiny LM", "tiny BERT" if bench.bert.name == "tiny" else
                 Path(bench.bert.name).name or "no [bert]")


def _paper_configs() -> dict:
    return {name: METHODS.get(name).paper_config for name in METHODS.names()
            if METHODS.get(name).paper_config is not None}


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def flm_setting(device="meta", frames: int = 0, image_size: int = 288, text=None, **vit_shape) -> Scale:
    """The FLM paper's pre-training (TencentARC/FLM, README "Pretraining": `flm text_roberta
    image_size=288 clip32`): CLIP ViT-B/32 at 288 px, whose last block the reference drops
    (clip_model.py: `layers - 1` blocks, then ln_post), so 11 of 12 blocks run over 81 patches + CLS;
    RoBERTa-base, of which the family keeps the first 6 layers (its paper_config); text padded to
    max_text_len = 50 (config.py; base_dataset.py pads to max_length): <s>, 48 caption tokens, </s>.
    The reference trains the ViT (`trains_vision`). No causal LM: the family reads its text model.
    Tests shrink it: `image_size`, `text` (a Hugging Face config) and `vit_shape` (timm's depth, ...)."""
    def build() -> Backbones:
        import timm

        with torch.device(device):
            vit = timm.create_model("vit_base_patch32_clip_224", pretrained=False, num_classes=0, img_size=image_size,
                                    **vit_shape)
            vision = VisionEncoder(vit, image_size, CLIP_MEAN, CLIP_STD, feature_layer=-2)
            body, tokenizer = text_model(text or roberta_base())
        return Backbones(_frozen(vision, device), _frozen(nn.Identity(), device), tokenizer, text=(body, tokenizer))

    return Scale("paper", build, image_size, 48, "", _paper_configs(), frames, f"CLIP ViT-B/32 {image_size} px",
                 "no LLM", "RoBERTa-base", reference="mlm", trains_vision=True)  # MLM: what FLM's claims are against


def paper_scale(device="meta", frames: int = 0) -> Scale:
    def build() -> Backbones:
        import timm
        from transformers import OPTConfig, OPTForCausalLM

        with torch.device(device):
            vit = timm.create_model("eva_giant_patch14_clip_224", pretrained=False, num_classes=0)
            vision = VisionEncoder(vit, 224, CLIP_MEAN, CLIP_STD, feature_layer=-2)
            opt = OPTForCausalLM(OPTConfig(  # OPT-2.7B as published
                vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                word_embed_proj_dim=2560, max_position_embeddings=2048, attn_implementation="sdpa"))
        return Backbones(_frozen(vision, device), _frozen(opt, device), LengthTokenizer(50272))

    return Scale("paper", build, 224, 31, "", _paper_configs(), frames, "EVA ViT-g/14 224 px", "OPT-2.7B",
                 family=flm_setting(device, frames), reference="baseline")


def vitl1b_scale(device="meta", frames: int = 0) -> Scale:
    def build() -> Backbones:
        import timm
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device(device):
            vit = timm.create_model("vit_large_patch14_clip_224", pretrained=False, num_classes=0)
            vision = VisionEncoder(vit, 224, CLIP_MEAN, CLIP_STD, feature_layer=-2)
            llm = LlamaForCausalLM(LlamaConfig(  # Llama-3.2-1B's published shape
                vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                tie_word_embeddings=True, attn_implementation="sdpa"))
            text = text_model(roberta_base())
        return Backbones(_frozen(vision, device), _frozen(llm, device), LengthTokenizer(128256), text=text)

    return Scale("vitl-1b", build, 224, 31, "", _paper_configs(), frames, "CLIP ViT-L/14 224 px", "Llama-3.2-1B",
                 "RoBERTa-base")


# name -> builder(bench, device): the one list of scales (`vlp-bench flops --preset`, `bench --preset`)
SCALES = {
    "tiny": tiny_scale,
    "vitl-1b": lambda bench, device: vitl1b_scale(device, frames_of(bench)),
    "paper": lambda bench, device: paper_scale(device, frames_of(bench)),
}


def _known(name: str) -> str:
    if name not in SCALES:
        raise UserError(f"unknown preset '{name}' (use one of {', '.join(SCALES)})")
    return name


def method_configs(name: str, bench) -> dict:
    """The methods' configs at scale `name` (without building its backbones): as configured at the
    tiny scale, each method's paper config at the others."""
    return dict(bench.methods) if _known(name) == "tiny" else _paper_configs()


def scale(name: str, bench, device="meta") -> Scale:
    """The named scale on `device` (meta: shapes only; else random weights there), built on first use."""
    return SCALES[_known(name)](bench, device)


def sample_batch(s: Scale, batch: int, device="meta") -> dict:
    """A batch of `batch` samples of setting `s`: images (clips) of its size, captions of its length."""
    clip = (s.frames,) if s.frames else ()
    return {"images": torch.empty(batch, *clip, 3, s.image_size, s.image_size, device=device),
            "prompt": s.prompt, "captions": [" ".join(["w"] * s.caption_words)] * batch}


@contextlib.contextmanager
def trained_vision(vision: nn.Module):
    """The vision encoder trained, as the FLM reference trains CLIP: its weights take gradients and
    it runs with autograd even inside a method's no_grad encode(), so a counted step includes its
    backward and the input gradients the layers reading it then compute."""
    def forward(*args, **kwargs):
        with torch.enable_grad():
            return type(vision).forward(vision, *args, **kwargs)

    vision.forward = forward
    vision.requires_grad_(True)
    try:
        yield
    finally:
        del vision.forward
        vision.requires_grad_(False)


def step_costs(method, s: Scale) -> dict:
    """{tokens_to_llm, stages, per_sample, forward, backward, total} of one training step of each
    of the method's stages at setting `s`, per sample, weighted by the stages' share of steps."""
    batch = sample_batch(s, BATCH)
    stages, mean, total_steps = [], FlopCount(), 10_000
    for stage in method.stages(total_steps):
        count, out = count_step(method, batch, stage, contextlib.nullcontext())
        share = stage.steps / total_steps
        per = count.scaled(1 / BATCH)
        stages.append({"name": stage.name, "share": share, "tokens_to_llm": out.tokens_to_llm,
                       "per_sample": per, "total": count.total / BATCH})
        mean.update(FlopCount(FlopCount(per).scaled(share)))
    return {"tokens_to_llm": stages[-1]["tokens_to_llm"], "stages": stages, "per_sample": mean.by_part,
            "forward": mean.forward, "backward": mean.backward, "total": mean.total}


def _cost(scale: Scale, name: str) -> dict:
    s = scale.setting(name)
    if name in s.costs:
        return s.costs[name]
    cls = METHODS.get(name)
    if name not in s.method_configs:
        raise UserError(f"method '{name}' has no {scale.name}-scale config (set `paper_config` in its file)")
    cfg = s.method_configs[name]
    try:
        cls.check(cfg, s.backbones)
    except ValueError as e:
        raise UserError(f"methods.{name} at {scale.name} scale: {e}") from None
    with torch.device("meta"):
        method = cls(cfg, s.backbones)
    method.train()
    s.costs[name] = {"backbones": scale.label(name), "image_size": s.image_size,
                     "vision_tokens": s.backbones.vision.num_tokens, "caption_tokens": s.caption_words + 1,
                     **step_costs(method, s)}
    if s.trains_vision:
        with trained_vision(method.vision):
            s.costs[name]["trained_vision"] = {k: v for k, v in step_costs(method, s).items()
                                               if k in ("per_sample", "forward", "backward", "total")}
    return s.costs[name]


def references(scale: Scale, names: list[str], reference: str, costable=lambda name: True) -> dict:
    """method -> the method its cost ratio is to, always one costed on the same backbones:
    `reference` where it is; else that setting's own (the FLM setting: mlm); else the first of
    `names` costed there."""
    out = {}
    for name in names:
        s = scale.setting(name)
        here = [reference, s.reference, *[n for n in names if scale.setting(n) is s]]
        out[name] = next(c for c in here if c is not None and costable(c) and scale.setting(c) is s)
    return out


def per_sample_costs(scale: Scale, names: list[str], reference: str | None = None, costable=lambda name: True) -> dict:
    """{method: {backbones, image_size, vision_tokens, caption_tokens, tokens_to_llm, stages: [...],
    per_sample: by_part, forward, backward, total[, trained_vision][, reference, ratio_to_reference]}}
    at this scale; with a `reference` method, each one's ratio is its reference's cost over its own
    (`references`: never across backbones); references not among `names` are costed and listed too."""
    refs = references(scale, names, reference, costable) if reference else {}
    refs = {**{r: r for r in refs.values()}, **refs}  # a reference not among `names` is its own
    results = {}
    for name in dict.fromkeys([*names, *refs]):
        c = _cost(scale, name)
        results[name] = {**c, **({"trained_vision": dict(c["trained_vision"])} if "trained_vision" in c else {})}
    for name, ref in refs.items():
        results[name]["reference"] = ref
        m, base = results[name], results[ref]
        for r, b in ((m, base), (m.get("trained_vision"), base.get("trained_vision"))):
            if r is not None:
                r["ratio_to_reference"] = b["total"] / r["total"]
    return results


def cost_table(scale: Scale, names: list[str], reference: str | None = None, costable=lambda name: True) -> dict:
    """`vlp-bench flops --json`: the methods' per-sample costs at this scale, with what they are per
    (and, with a `reference` method, each one's cost ratio to it or, on other backbones, to theirs).
    The top-level sizes are the first method's; `backbones_differ` says whether all share them."""
    methods = per_sample_costs(scale, names, reference, costable)
    s = scale.setting(next(iter(methods))) if methods else scale
    used = [m["reference"] for m in methods.values() if "reference" in m]
    return {"preset": scale.name, "unit": UNIT, "per": "training sample", "batch": BATCH, "frames": scale.frames,
            "image_size": s.image_size, "caption_tokens": s.caption_words + 1, "prompt": s.prompt,
            "vision_tokens": s.backbones.vision.num_tokens,
            "reference": reference if reference in used else (used[0] if used else None),
            "backbones_differ": len({m["backbones"] for m in methods.values()}) > 1, "methods": methods}


def costable_table(scale: Scale, names: list[str], reference: str | None = None) -> dict:
    """cost_table of the methods this scale can cost; the others are listed under "skipped" with
    the reason (no config at this scale, or one its backbones cannot run), so a report can say so."""
    skipped = {}
    for name in names:
        cfg = scale.method_configs.get(name)
        if cfg is None:
            skipped[name] = f"no {scale.name}-scale config (`paper_config` in its file)"
        elif scale.frames and not METHODS.get(name).video:
            skipped[name] = "does not take video clips"
        else:
            try:
                METHODS.get(name).check(cfg, scale.setting(name).backbones)
            except (ValueError, UserError) as e:
                skipped[name] = str(e)
    ok = [n for n in names if n not in skipped]
    reference = reference if ok else None

    def costable(name: str) -> bool:
        return name not in skipped and name in scale.method_configs

    return {**cost_table(scale, ok, reference, costable), "skipped": skipped}  # ok may be empty: a table of none


def _gflop(x: float) -> str:
    return f"{x / 1e9:.4g}"


def format_table(table: dict) -> str:
    """A plain-text table in GFLOP per sample; the backbones beside each method where they differ,
    and with a trained vision encoder where a setting's paper trains it."""
    parts, methods = ["vision", "bridge", "llm"], table["methods"]
    refs = {m.get("reference") for m in methods.values()} - {None}
    mixed, trained = table.get("backbones_differ"), any("trained_vision" in m for m in methods.values())
    ratio = f"{next(iter(refs))} / method" if len(refs) == 1 else "ref / method"
    header = ["method", *(["backbones"] if mixed else []), "tokens->LLM",
              *[f"{p} {d}" for p in parts for d in ("fwd", "bwd")], "total", *([ratio] if refs else []),
              *(["total, ViT trained", ratio + ", ViT trained"] if trained else [])]

    def times(m: dict, name: str) -> str:
        return f"{m['ratio_to_reference']:.2f}x" + ("" if len(refs) == 1 else f" ({name})")

    rows = []
    for name, m in methods.items():
        cells = [m["per_sample"].get(p, {}).get(d, 0.0) for p in parts for d in ("forward", "backward")]
        tv = m.get("trained_vision")
        rows.append([name, *([m["backbones"]] if mixed else []), str(m["tokens_to_llm"]), *map(_gflop, cells),
                     _gflop(m["total"]), *([times(m, m["reference"])] if refs else []),
                     *([_gflop(tv["total"]) if tv else "-", times(tv, m["reference"]) if tv and refs else "-"]
                       if trained else [])])
    settings = {}
    for name, m in methods.items():
        key = (m["backbones"], m["vision_tokens"], m["image_size"], m["caption_tokens"])
        settings.setdefault(key, []).append(name)
    clips = f" per frame of clips of {table['frames']} frames" if table.get("frames") else ""
    lines = [f"{b}: {v} vision tokens at {px} px{clips}, captions of {c} tokens (with EOS)"
             + (f" ({', '.join(ns)})" if len(settings) > 1 else "") for (b, v, px, c), ns in settings.items()]
    title = (f"{table['preset']} preset: GFLOP per training sample ({table['unit']})"
             f"{'; after the prompt ' + repr(table['prompt']) if table['prompt'] else ''}; "
             f"multi-stage methods are weighted by their share of steps"
             + ("; each ratio is to a reference on the method's own backbones" if mixed else ""))
    note = ("'ViT trained': as the setting's paper trains it (vlp-bench keeps it frozen): its backward and the "
            "gradients into its tokens added")
    notes = [note] if trained else []
    return "\n".join([title, *lines, *notes, text_table(header, rows)])
