"""Frozen backbones: a vision encoder and a causal LLM with its tokenizer.

`name = "tiny"` builds them here, on the data's training split, and caches them keyed by their
config and seed (`vlp-bench prepare` does it ahead of time):
- tiny ViT (timm): pre-trained to predict the bag of words of an image's captions, so its patch
  tokens carry colours, shapes, counts and positions.
- tiny LM (Hugging Face Llama with rotary positions, tokenizer trained with `tokenizers`):
  pre-trained on *pairs* of references of one image ("<refs A> a photo of <ref B>", and
  "<refs A> Question: q Short answer: a"), so it learns to carry content from its context into
  what it writes, i.e. to read a soft visual prefix the way a real LLM reads its context.
  Rotary positions matter: learned absolute positions never see caption tokens after a long
  prefix (METHODS.md section 5).
Any other name is a real backbone, loaded through the same code path: a timm model name (with
`checkpoint` for local weights) and a Hugging Face causal LM name or local directory. The tiny LM is
itself saved with `save_pretrained`, so loading it *is* the Hugging Face path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp_bench.data.images import CaptionSplit, ImageLoader, TrainBatches
from vlp_bench.errors import UserError
from vlp_bench.log import interactive, progress_bar

BACKBONE_VERSION = 2  # bump when the tiny recipes change, so stale caches are not reused
CAPTION_PROMPT = "a photo of"  # the LM's pre-training pairs use the captioning prompt of bench.toml
VQA_PROMPT = "Question: {} Short answer:"


@dataclass
class VisionConfig:
    name: str = "tiny"  # "tiny" = pre-trained here; else a timm model name
    checkpoint: str = ""  # local weights for a timm model (the hub cache is used when empty)
    feature_layer: int = -1  # -1 = last block (+ final norm); -2 = penultimate block, as BLIP-2 uses
    seed: int = 0  # pre-training seed of the tiny encoder (shared by all runs, hence not the run seed)
    # tiny recipe (ignored for real models):
    image_size: int = 64  # the tiny world's image size: no resampling
    patch_size: int = 8  # 8x8 patches -> 64 tokens + CLS, enough to localise objects
    width: int = 128  # ~0.8M params: pre-trains in about a minute on 2 CPU cores
    depth: int = 4
    heads: int = 4
    pretrain_steps: int = 400  # its loss flattens by then; every second counts in the 10-minute default run
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3

    def validate(self) -> None:
        if self.feature_layer >= 0:
            raise ValueError("feature_layer must be negative (-1 = last block, -2 = penultimate)")


@dataclass
class LLMConfig:
    name: str = "tiny"  # "tiny" = pre-trained here; else a Hugging Face causal LM name or local dir
    seed: int = 0  # pre-training seed of the tiny LM
    # tiny recipe (ignored for real models):
    vocab_size: int = 1024  # byte-level BPE over the world's text; words end up whole tokens
    width: int = 128
    depth: int = 2
    heads: int = 4
    pretrain_steps: int = 1500  # enough for the LM to copy content from its context
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3


class VisionEncoder(nn.Module):
    """A frozen timm model returning its token sequence (B, N, D), CLS first where it has one."""

    def __init__(self, model: nn.Module, image_size: int, mean, std, feature_layer: int = -1):
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.feature_layer = feature_layer
        self.dim = model.num_features

    @property
    def num_tokens(self) -> int:
        """Tokens per image this encoder outputs: from the patch grid, else from one probe forward."""
        if not hasattr(self, "_num_tokens"):
            m = self.model
            if hasattr(m, "patch_embed") and hasattr(m, "num_prefix_tokens"):
                self._num_tokens = m.patch_embed.num_patches + m.num_prefix_tokens
            else:
                with torch.no_grad():
                    p = next(m.parameters())
                    probe = torch.zeros(1, 3, self.image_size, self.image_size, device=p.device, dtype=p.dtype)
                    self._num_tokens = self(probe).shape[1]
        return self._num_tokens

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (CLS, registers); 0 for models without them."""
        return getattr(self.model, "num_prefix_tokens", 0)

    def is_plain_vit(self) -> bool:
        """A timm VisionTransformer of plain blocks, which vlp-bench runs itself for FLIP's patch
        dropping and ToMe inside the encoder (EVA, parallel or post-norm blocks: not yet)."""
        from timm.models.vision_transformer import Block, VisionTransformer

        return isinstance(self.model, VisionTransformer) and all(type(b) is Block for b in self.model.blocks)

    def _forward_blocks(self, images: torch.Tensor, keep: torch.Tensor | None, merge) -> torch.Tensor:
        from vlp_bench.nn.merging import TokenMerger, merged_block

        m = self.model
        x = m._pos_embed(m.patch_embed(images))  # (B, prefix + patches, D), positions added
        p = self.num_prefix_tokens
        if keep is not None:
            kept = x[:, p:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :p], kept], dim=1)
        x = m.norm_pre(x)
        blocks = m.blocks[: len(m.blocks) + 1 + self.feature_layer]
        if merge is None:
            for blk in blocks:
                x = blk(x)
        else:
            schedule, variant = merge
            merger = TokenMerger(x, variant, protected=p)  # CLS and registers are never merged
            for blk, r in zip(blocks, schedule):
                x = merged_block(blk, x, merger, r)
        return m.norm(x) if self.feature_layer == -1 else x

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None, merge=None) -> torch.Tensor:
        """(B, N, D) tokens. With `keep` (B, K) patch indices the encoder runs on the prefix tokens
        and those patches only, as FLIP feeds a ViT (dropped patches cost nothing); with `merge`
        = (per-block r, variant) its blocks merge tokens as ToMe does. Both need is_plain_vit()."""
        weight = next(self.model.parameters())
        images = images.to(weight.dtype)  # frozen weights are bf16 on a GPU (load_backbones)
        if keep is not None or merge is not None:
            return self._float(self._forward_blocks(images, keep, merge))
        m = self.model
        if self.feature_layer == -1 or not hasattr(m, "forward_intermediates"):
            x = m.forward_features(images)
        else:  # run the blocks up to that one only, without the final norm (BLIP-2 reads the penultimate)
            (spatial, prefix), = m.forward_intermediates(
                images, indices=[len(m.blocks) + self.feature_layer], return_prefix_tokens=True, norm=False,
                stop_early=True, output_fmt="NLC", intermediates_only=True)
            x = torch.cat([prefix, spatial], dim=1)  # CLS (and registers) first, as forward_features
        if x.ndim == 4:  # convolutional models: (B, C, H, W) -> (B, HW, C)
            x = x.flatten(2).transpose(1, 2)
        return self._float(x)  # (B, N, D)

    @staticmethod
    def _float(x: torch.Tensor) -> torch.Tensor:
        """bf16 features go on in bf16 under autocast (training) and as fp32 outside it
        (evaluation), where the trainable bridge's fp32 weights meet them."""
        return x if x.dtype == torch.float32 or torch.is_autocast_enabled(x.device.type) else x.float()


@dataclass
class Backbones:
    vision: VisionEncoder
    llm: nn.Module  # a Hugging Face causal LM
    tokenizer: object  # its (fast) tokenizer

    @property
    def llm_dim(self) -> int:
        return self.llm.get_input_embeddings().embedding_dim


def frozen_dtype(device) -> torch.dtype:
    """Frozen backbones run in bf16 on a GPU (half the memory; autocast computes in bf16 anyway),
    in fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _key(*parts) -> str:
    blob = json.dumps([BACKBONE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _publish(tmp: Path, final: Path) -> None:
    """Move a fully written cache entry into place (atomic; a concurrent winner is kept)."""
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------- vision


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _tiny_vit(cfg: VisionConfig, num_classes: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
        num_heads=cfg.heads, num_classes=num_classes, global_pool="avg",
    )


def _pretrain_tiny_vit(cfg: VisionConfig, train: CaptionSplit, out: Path, progress: bool) -> None:
    counts = Counter(w for i in train.image_ids for w in set(_words(" ".join(train.refs[i]))))
    vocab = sorted(w for w, c in counts.items() if c >= 5)  # words seen on at least 5 images
    index = {w: k for k, w in enumerate(vocab)}
    torch.manual_seed(cfg.seed)
    model = _tiny_vit(cfg, len(vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.05)
    loader = ImageLoader(cfg.image_size, (0.5,) * 3, (0.5,) * 3)
    batches = TrainBatches(train, loader, min(cfg.pretrain_batch, len(train)), cfg.seed)
    bar = progress_bar(range(cfg.pretrain_steps), "pre-train tiny ViT", progress)
    for step in bar:
        batch = next(batches)
        target = torch.zeros(len(batch["image_ids"]), len(vocab))
        for row, image_id in enumerate(batch["image_ids"]):
            for w in set(_words(" ".join(train.refs[image_id]))):
                if w in index:
                    target[row, index[w]] = 1.0
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, cfg.pretrain_steps, cfg.pretrain_lr, 50)
        loss = F.binary_cross_entropy_with_logits(model(batch["images"]), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.reset_classifier(0)
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({**asdict(cfg), "final_loss": loss.item()}, indent=1))


def load_vision(cfg: VisionConfig, data_root: Path, cache: Path, progress: bool = False) -> VisionEncoder:
    if cfg.name == "tiny":
        recipe = {k: v for k, v in asdict(cfg).items() if k != "feature_layer"}  # read-out, not training
        d = cache / "backbones" / f"tiny-vit-{_key(recipe, str(data_root))}"
        if not (d / "model.safetensors").is_file():
            tmp = d.with_name(d.name + f".tmp-{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            _pretrain_tiny_vit(cfg, CaptionSplit(data_root, "train"), tmp, progress)
            _publish(tmp, d)
        from safetensors.torch import load_file

        model = _tiny_vit(cfg, 0)
        model.load_state_dict(load_file(str(d / "model.safetensors")))
        return freeze(VisionEncoder(model, cfg.image_size, (0.5,) * 3, (0.5,) * 3, cfg.feature_layer))
    import timm

    try:
        if cfg.checkpoint:
            if not Path(cfg.checkpoint).is_file():
                raise UserError(f"vision checkpoint not found: {cfg.checkpoint}")
            model = timm.create_model(cfg.name, pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay={"file": cfg.checkpoint})
        else:
            model = timm.create_model(cfg.name, pretrained=True, num_classes=0)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"unknown timm vision model '{cfg.name}'") from None
        raise UserError(f"weights for timm model '{cfg.name}' are not available offline ({e}); "
                        f"set vision.checkpoint to a local file") from None
    except (OSError, ValueError) as e:
        raise UserError(f"weights for timm model '{cfg.name}' are not available offline; "
                        f"set vision.checkpoint to a local file ({type(e).__name__})") from None
    pc = model.pretrained_cfg
    size = pc.get("input_size", (3, 224, 224))[-1]
    return freeze(VisionEncoder(model, size, pc.get("mean", (0.5,) * 3), pc.get("std", (0.5,) * 3), cfg.feature_layer))


# ----------------------------------------------------------------------------- language


def _lm_documents(root: Path, rng: random.Random, n: int) -> list[str]:
    """Pre-training documents: context references of one image (or clip), then another in a prompt
    form. Clips (the root's msrvtt/ train split, when it has one) are drawn in proportion to their
    number, so the LM also knows how clips are described."""
    from vlp_bench.data.video import annotation_files

    train = CaptionSplit(root, "train")
    clips = _clip_refs(root) if annotation_files(root) else []
    p_clip = len(clips) / (len(clips) + len(train))
    vqa = _vqa_pairs(root)
    docs = []
    for _ in range(n):
        clip = rng.random() < p_clip
        image_id = None if clip else rng.choice(train.image_ids)
        refs = (rng.choice(clips) if clip else train.refs[image_id])[:]
        rng.shuffle(refs)
        k = rng.randint(1, max(1, min(3, len(refs) - 1)))
        context = " ".join(refs[:k])
        if vqa.get(image_id) and rng.random() < 0.3:
            q, a = rng.choice(vqa[image_id])
            docs.append(f"{context} {VQA_PROMPT.format(q)} {a}")
        else:
            docs.append(f"{context} {CAPTION_PROMPT} {refs[k % len(refs)]}")
    return docs


def _clip_refs(root: Path) -> list[list[str]]:
    """The references of every training clip (no video is read)."""
    from vlp_bench.data.video import SPLIT_NAMES, annotation_files

    clips: dict[str, list[str]] = {}
    for path in annotation_files(root):
        data = json.loads(path.read_text())
        train = {v["video_id"] for v in data["videos"] if v["split"] in SPLIT_NAMES["train"]}
        for s in data["sentences"]:
            if s["video_id"] in train:
                clips.setdefault(s["video_id"], []).append(s["caption"])
    return [clips[k] for k in sorted(clips)]


def _vqa_pairs(root: Path) -> dict[int, list[tuple[str, str]]]:
    qs, anns = root / "vqa" / "questions_train.json", root / "vqa" / "annotations_train.json"
    if not (qs.is_file() and anns.is_file()):
        return {}
    questions = {q["question_id"]: q for q in json.loads(qs.read_text())["questions"]}
    pairs: dict[int, list[tuple[str, str]]] = {}
    for a in json.loads(anns.read_text())["annotations"]:
        q = questions.get(a["question_id"])
        if q is not None:
            pairs.setdefault(q["image_id"], []).append((q["question"], a["multiple_choice_answer"]))
    return pairs


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos)


def tiny_llama(cfg: LLMConfig, vocab: int, eos_id: int = 0, pad_id: int = 0) -> nn.Module:
    """The tiny LM's architecture (untrained), also built on the meta device by `vlp-bench flops`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
        num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=eos_id,
        eos_token_id=eos_id, pad_token_id=pad_id,
    ))


def _pretrain_tiny_lm(cfg: LLMConfig, root: Path, out: Path, progress: bool) -> None:
    rng = random.Random(cfg.seed)
    docs = _lm_documents(root, rng, cfg.pretrain_steps * cfg.pretrain_batch)
    tokenizer = _train_tokenizer(docs[:20000], cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    model = tiny_llama(cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    bar = progress_bar(range(cfg.pretrain_steps), "pre-train tiny LM", progress)
    for step in bar:
        chunk = docs[step * cfg.pretrain_batch : (step + 1) * cfg.pretrain_batch]
        enc = tokenizer([d + tokenizer.eos_token for d in chunk], return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, cfg.pretrain_steps, cfg.pretrain_lr, 100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "recipe.json").write_text(json.dumps({**asdict(cfg), "final_loss": loss.item()}, indent=1))


def load_llm(cfg: LLMConfig, data_root: Path, cache: Path, device: torch.device, progress: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not (progress and interactive()):
        hf_logging.disable_progress_bar()  # its weight-loading bar is noise in logs
    path = cfg.name
    if cfg.name == "tiny":
        d = cache / "backbones" / f"tiny-lm-{_key(asdict(cfg), str(data_root))}"
        if not (d / "recipe.json").is_file():
            tmp = d.with_name(d.name + f".tmp-{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            _pretrain_tiny_lm(cfg, data_root, tmp, progress)
            _publish(tmp, d)
        path = str(d)
    dtype = frozen_dtype(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise UserError(f"language model '{cfg.name}' is not available offline (no local directory or hub "
                        f"cache entry): {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return freeze(model), tokenizer


def load_backbones(vision: VisionConfig, llm: LLMConfig, data_root: Path, cache: Path,
                   device: torch.device, progress: bool = False) -> Backbones:
    enc = load_vision(vision, data_root, cache, progress).to(device, frozen_dtype(device))
    model, tokenizer = load_llm(llm, data_root, cache, device, progress)
    return Backbones(enc, model.to(device), tokenizer)
