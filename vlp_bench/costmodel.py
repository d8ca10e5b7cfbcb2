"""`vlp-bench flops`: the FLOPs of one training sample of each method at a named scale, counted
on the meta device (real module shapes, no weights, no memory), by part and pass.

This is where a claimed speed-up meets arithmetic: if a method's per-sample cost is not 5x lower
than another's, a 5x wall-clock gain has to come from somewhere else (fewer steps, a skipped
stage, a better kernel). Per-sample figures of a multi-stage method are the mean over its stages,
weighted by their share of the training steps.

Scales (also what `vlp-bench bench` times, there with random weights on the device):
- tiny: the tiny world's backbones and the methods as configured (bench.toml and --set).
- vitl-1b: a CLIP ViT-L/14 at 224 px (257 tokens, penultimate block read) and a Llama-3.2-1B-shaped
  LLM (1.2B parameters): the "ViT-L-sized vision tower and 1B-class LLM" of a single-GPU job;
  methods at their paper configs, captions as in paper.
- paper: EVA ViT-g/14 at 224 px (257 tokens, penultimate block read, as BLIP-2), OPT-2.7B, the
  12-layer 768-wide bridge, SimVLG's r = 19, BLIP-2's Q-Former with 32 queries; captions of 32
  tokens, no prompt (pre-training). Each method file gives its paper-scale config (`paper_config`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from vlp_bench.backbones import Backbones, VisionEncoder, freeze, frozen_dtype, tiny_llama, tiny_vit
from vlp_bench.config import on_clips
from vlp_bench.errors import UserError
from vlp_bench.train.flops import UNIT, FlopCount, count_step
from vlp_bench.log import text_table
from vlp_bench.registry import METHODS

BATCH = 8  # samples per counted step: costs are per sample; >= 2 for BLIP-2's in-batch negatives


class LengthTokenizer:
    """Stands in for a tokenizer where only lengths matter: one token per whitespace word (a BOS
    first when asked for special tokens), ids that are valid for a vocabulary of `vocab_size`."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text: str, add_special_tokens: bool = True):
        return SimpleNamespace(input_ids=[self.bos_token_id] * add_special_tokens + [3] * len(text.split()))


@dataclass
class Scale:
    """Everything a per-sample cost depends on besides the method."""

    name: str
    backbones: Backbones
    image_size: int
    caption_words: int  # + EOS = the caption's tokens
    prompt: str
    method_configs: dict  # method name -> its Config at this scale
    frames: int = 0  # a training sample is a clip of this many frames; 0 = an image
    costs: dict = field(default_factory=dict, repr=False)  # per_sample_costs' results, by method: each counted once


def _frozen(module, device) -> torch.nn.Module:
    """Frozen, in the dtype load_backbones gives frozen backbones on `device`."""
    return freeze(module).to(frozen_dtype(device))


def frames_of(bench) -> int:
    """data.frames when the experiment's tasks are on clips (its samples are clips), else 0."""
    return bench.data.frames if on_clips(bench) else 0


def tiny_scale(bench, device="meta") -> Scale:
    """The tiny world as configured; captions of the world's typical length."""
    with torch.device(device):
        vision = VisionEncoder(tiny_vit(bench.vision, 0), bench.vision.image_size, (0.5,) * 3, (0.5,) * 3,
                               bench.vision.feature_layer)
        llm = tiny_llama(bench.llm, bench.llm.vocab_size)
    tokenizer = LengthTokenizer(bench.llm.vocab_size)
    # 7 + EOS: the default tiny world's captions are 7.9 tokens long on average (median 7, max 25)
    return Scale("tiny", Backbones(_frozen(vision, device), _frozen(llm, device), tokenizer), bench.vision.image_size,
                 7, bench.experiment.prompt, dict(bench.methods), frames_of(bench))


def _paper_configs() -> dict:
    return {name: METHODS.get(name).paper_config for name in METHODS.names()
            if METHODS.get(name).paper_config is not None}


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def paper_scale(device="meta", frames: int = 0) -> Scale:
    import timm
    from transformers import OPTConfig, OPTForCausalLM

    with torch.device(device):
        vit = timm.create_model("eva_giant_patch14_clip_224", pretrained=False, num_classes=0)
        vision = VisionEncoder(vit, 224, CLIP_MEAN, CLIP_STD, feature_layer=-2)
        opt = OPTForCausalLM(OPTConfig(  # OPT-2.7B as published
            vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
            word_embed_proj_dim=2560, max_position_embeddings=2048, attn_implementation="sdpa"))
    return Scale("paper", Backbones(_frozen(vision, device), _frozen(opt, device), LengthTokenizer(50272)), 224, 31,
                 "", _paper_configs(), frames)


def vitl1b_scale(device="meta", frames: int = 0) -> Scale:
    import timm
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device(device):
        vit = timm.create_model("vit_large_patch14_clip_224", pretrained=False, num_classes=0)
        vision = VisionEncoder(vit, 224, CLIP_MEAN, CLIP_STD, feature_layer=-2)
        llm = LlamaForCausalLM(LlamaConfig(  # Llama-3.2-1B's published shape
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
            tie_word_embeddings=True, attn_implementation="sdpa"))
    return Scale("vitl-1b", Backbones(_frozen(vision, device), _frozen(llm, device), LengthTokenizer(128256)), 224,
                 31, "", _paper_configs(), frames)


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
    """The named scale's backbones on `device` (meta: shapes only; else random weights there)."""
    return SCALES[_known(name)](bench, device)


def per_sample_costs(scale: Scale, names: list[str], reference: str | None = None) -> dict:
    """{method: {tokens_to_llm, stages: [...], per_sample: by_part, total[, ratio_to_reference]}} at
    this scale; with a `reference` method, each one's ratio is the reference's cost over its own."""
    results = {}
    for name in dict.fromkeys([*([reference] if reference else []), *names]):  # the reference first
        if name in scale.costs:
            results[name] = dict(scale.costs[name])
            continue
        cls = METHODS.get(name)
        if name not in scale.method_configs:
            raise UserError(f"method '{name}' has no {scale.name}-scale config (set `paper_config` in its file)")
        cfg = scale.method_configs[name]
        try:
            cls.check(cfg, scale.backbones)
        except ValueError as e:
            raise UserError(f"methods.{name} at {scale.name} scale: {e}") from None
        with torch.device("meta"):
            method = cls(cfg, scale.backbones)
        method.train()
        clip = (scale.frames,) if scale.frames else ()
        batch = {"images": torch.empty(BATCH, *clip, 3, scale.image_size, scale.image_size, device="meta"),
                 "prompt": scale.prompt, "captions": [" ".join(["w"] * scale.caption_words)] * BATCH}
        stages, mean, total_steps = [], FlopCount(), 10_000
        for stage in method.stages(total_steps):
            count, out = count_step(method, batch, stage, contextlib.nullcontext())
            share = stage.steps / total_steps
            per = count.scaled(1 / BATCH)
            stages.append({"name": stage.name, "share": share, "tokens_to_llm": out.tokens_to_llm,
                           "per_sample": per, "total": count.total / BATCH})
            mean.update(FlopCount(FlopCount(per).scaled(share)))
        scale.costs[name] = {"tokens_to_llm": stages[-1]["tokens_to_llm"], "stages": stages,
                             "per_sample": mean.by_part, "forward": mean.forward, "backward": mean.backward,
                             "total": mean.total}
        results[name] = dict(scale.costs[name])
    if reference:
        for r in results.values():
            r["ratio_to_reference"] = results[reference]["total"] / r["total"]
    return {name: results[name] for name in dict.fromkeys([*names, *([reference] if reference else [])])}


def cost_table(scale: Scale, names: list[str], reference: str | None = None) -> dict:
    """`vlp-bench flops --json`: the methods' per-sample costs at this scale, with what they are per
    (and, with a `reference` method, each one's cost ratio to it)."""
    return {"preset": scale.name, "unit": UNIT, "per": "training sample", "batch": BATCH, "frames": scale.frames,
            "image_size": scale.image_size, "caption_tokens": scale.caption_words + 1, "prompt": scale.prompt,
            "vision_tokens": scale.backbones.vision.num_tokens, "reference": reference,
            "methods": per_sample_costs(scale, names, reference)}


def costable_table(scale: Scale, names: list[str], reference: str | None = None) -> dict:
    """cost_table of the methods this scale can cost; the others are listed under "skipped" with
    the reason (no config at this scale, or one its backbones cannot run), so a report can say so."""
    ok, skipped = [], {}
    for name in names:
        cfg = scale.method_configs.get(name)
        if cfg is None:
            skipped[name] = f"no {scale.name}-scale config (`paper_config` in its file)"
            continue
        if scale.frames and not METHODS.get(name).video:
            skipped[name] = "does not take video clips"
            continue
        try:
            METHODS.get(name).check(cfg, scale.backbones)
        except ValueError as e:
            skipped[name] = str(e)
            continue
        ok.append(name)
    if reference is not None and reference not in ok:  # the reference itself may be skipped
        reference = ok[0] if ok else None
    return {**cost_table(scale, ok, reference), "skipped": skipped}  # ok may be empty: a table of none


def format_table(table: dict) -> str:
    """A plain-text table in GFLOP per sample."""
    parts = ["vision", "bridge", "llm"]
    ratio = f"{table['reference']} / method" if table.get("reference") else None
    header = ["method", "tokens->LLM", *[f"{p} {d}" for p in parts for d in ("fwd", "bwd")], "total",
              *([ratio] if ratio else [])]
    rows = []
    for name, m in table["methods"].items():
        cells = [m["per_sample"].get(p, {}).get(d, 0.0) / 1e9 for p in parts for d in ("forward", "backward")]
        rows.append([name, str(m["tokens_to_llm"]), *[f"{c:.4g}" for c in cells], f"{m['total'] / 1e9:.4g}",
                     *([f"{m['ratio_to_reference']:.2f}x"] if ratio else [])])
    title = (f"{table['preset']} preset: GFLOP per training sample ({table['unit']}); "
             f"{table['vision_tokens']} vision tokens{' per frame of clips of %d frames' % table['frames'] if table.get('frames') else ''}, captions of {table['caption_tokens']} tokens (with EOS)"
             f"{' after the prompt ' + repr(table['prompt']) if table['prompt'] else ''}; "
             f"multi-stage methods are weighted by their share of steps")
    return "\n".join([title, text_table(header, rows)])
