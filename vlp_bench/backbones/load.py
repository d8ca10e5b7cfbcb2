"""Loading the frozen backbones. `name = "tiny"` pre-trains them (vlp_bench.backbones.tiny) on the
data's training split once and caches them under CACHE/backbones/, keyed by their config and data
root (`vlp-bench prepare` does it ahead of time). Any other name is a real backbone, loaded through
the same code path: a timm model name (with `checkpoint` for local weights) and a Hugging Face
causal LM name or local directory. The tiny LM is itself saved with `save_pretrained`, so loading
it *is* the Hugging Face path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from vlp_bench.backbones.encoders import (Backbones, BertBackboneConfig, LLMConfig, VisionConfig, VisionEncoder, freeze,
                                         frozen_dtype)
from vlp_bench.backbones.tiny import lm_tokenizer, pretrain_tiny_bert, pretrain_tiny_lm, pretrain_tiny_vit, tiny_vit
from vlp_bench.data.images import CaptionSplit
from vlp_bench.errors import UserError
from vlp_bench.files import atomic_dir
from vlp_bench.log import interactive, set_progress, shows_progress

BACKBONE_VERSION = 2  # bump when the tiny recipes change, so stale caches are not reused
VIT_DONE, RECIPE_DONE = "model.safetensors", "recipe.json"  # written last: the ViT's, the LM's and BERT's entries


def _key(*parts) -> str:
    """The cache key of a tiny backbone: its recipe, data root and BACKBONE_VERSION."""
    blob = json.dumps([BACKBONE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _cached(d: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """The cache entry `d`, built by `build(tmp)` into a private directory first when `d/marker`
    (written last by a complete entry) is missing."""
    if not (d / marker).is_file():
        with atomic_dir(d, complete=marker) as tmp:  # a concurrent winner's entry is kept
            build(tmp)
    return d


# ----------------------------------------------------------------------------- vision


def _vit_entry(cfg: VisionConfig, data_root: Path, cache: Path) -> Path:
    recipe = {k: v for k, v in asdict(cfg).items() if k != "feature_layer"}  # read-out, not training
    return cache / "backbones" / f"tiny-vit-{_key(recipe, str(data_root))}"


def _tiny_vit_dir(cfg: VisionConfig, data_root: Path, cache: Path) -> Path:
    """The tiny ViT's cache entry, pre-trained into it first when missing."""
    return _cached(_vit_entry(cfg, data_root, cache), VIT_DONE,
                   lambda tmp: pretrain_tiny_vit(cfg, CaptionSplit(data_root, "train"), tmp))


def _tiny_vision(cfg: VisionConfig, data_root: Path, cache: Path) -> VisionEncoder:
    d = _tiny_vit_dir(cfg, data_root, cache)
    from safetensors.torch import load_file

    model = tiny_vit(cfg, 0)
    model.load_state_dict(load_file(str(d / VIT_DONE)))
    return freeze(VisionEncoder(model, cfg.image_size, (0.5,) * 3, (0.5,) * 3, cfg.feature_layer))


def _timm_model(cfg: VisionConfig) -> nn.Module:
    """A timm model with its pre-trained weights (from cfg.checkpoint or the hub cache), no head."""
    import timm

    try:
        if cfg.checkpoint:
            if not Path(cfg.checkpoint).is_file():
                raise UserError(f"vision checkpoint not found: {cfg.checkpoint}")
            return timm.create_model(cfg.name, pretrained=True, num_classes=0,
                                     pretrained_cfg_overlay={"file": cfg.checkpoint})
        return timm.create_model(cfg.name, pretrained=True, num_classes=0)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"unknown timm vision model '{cfg.name}'") from None
        raise UserError(f"weights for timm model '{cfg.name}' are not available offline ({e}); "
                        f"set vision.checkpoint to a local file") from None
    except (OSError, ValueError) as e:
        raise UserError(f"weights for timm model '{cfg.name}' are not available offline; "
                        f"set vision.checkpoint to a local file ({type(e).__name__})") from None


def load_vision(cfg: VisionConfig, data_root: Path, cache: Path) -> VisionEncoder:
    """The frozen vision encoder (fp32, on the CPU): the tiny ViT (pre-trained and cached once)
    or a timm model, with its input size and normalisation."""
    if cfg.name == "tiny":
        return _tiny_vision(cfg, data_root, cache)
    model = _timm_model(cfg)
    pc = model.pretrained_cfg
    size = pc.get("input_size", (3, 224, 224))[-1]
    return freeze(VisionEncoder(model, size, pc.get("mean", (0.5,) * 3), pc.get("std", (0.5,) * 3), cfg.feature_layer))


# ----------------------------------------------------------------------------- language


def load_llm(cfg: LLMConfig, data_root: Path, cache: Path, device: torch.device):
    """(frozen causal LM in frozen_dtype(device), its tokenizer with a padding token): the tiny LM
    (pre-trained and cached once) or a Hugging Face name or local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not (shows_progress() and interactive()):
        hf_logging.disable_progress_bar()  # its weight-loading bar is noise in logs
    path = cfg.name
    if cfg.name == "tiny":
        path = str(_tiny_lm_dir(cfg, data_root, cache))
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


# ----------------------------------------------------------------------------- BERT


def bert_checkpoint(cfg: BertBackboneConfig, llm: LLMConfig, tokenizer, data_root: Path, cache: Path) -> str:
    """The directory of the BERT-style checkpoint the bridges start from: the tiny BERT (pre-trained
    once with the LLM's tokenizer, and cached), a local directory as given, or "" for none."""
    if cfg.name != "tiny":
        if cfg.name and not Path(cfg.name).expanduser().is_dir():
            raise UserError(f"bert.name: no checkpoint directory '{cfg.name}' (a local Hugging Face BERT-style "
                            f"directory, \"tiny\", or \"\" for none)")
        return cfg.name
    return str(_tiny_bert_dir(cfg, llm, data_root, cache, tokenizer))


def _lm_entry(cfg: LLMConfig, data_root: Path, cache: Path) -> Path:
    return cache / "backbones" / f"tiny-lm-{_key(asdict(cfg), str(data_root))}"


def _tiny_lm_dir(cfg: LLMConfig, data_root: Path, cache: Path) -> Path:
    """The tiny LM's cache entry (model and tokenizer), pre-trained into it first when missing."""
    return _cached(_lm_entry(cfg, data_root, cache), RECIPE_DONE, lambda tmp: pretrain_tiny_lm(cfg, data_root, tmp))


def _bert_entry(cfg: BertBackboneConfig, llm: LLMConfig, data_root: Path, cache: Path) -> Path:
    return cache / "backbones" / f"tiny-bert-{_key(asdict(cfg), asdict(llm), str(data_root))}"


def _tiny_bert_dir(cfg: BertBackboneConfig, llm: LLMConfig, data_root: Path, cache: Path, tokenizer=None) -> Path:
    """The tiny BERT's cache entry, pre-trained into it first when missing, reading with the tiny
    LM's `tokenizer` (None: trained again from the LM's documents, which gives the same one)."""
    return _cached(_bert_entry(cfg, llm, data_root, cache), RECIPE_DONE, lambda tmp: pretrain_tiny_bert(
        cfg, data_root, tokenizer if tokenizer is not None else lm_tokenizer(llm, data_root), tmp))


# ----------------------------------------------------------------------------- side by side


def _pretrain(jobs: list[tuple], threads: int) -> None:
    """A spawned process's share of `pretrain_side_by_side`: each job (kind, cfg, ...) cached in turn."""
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    set_progress(True, lines=True)  # two processes on one terminal: lines, not bars
    hf_logging.disable_progress_bar()  # nor Hugging Face's (saving a model draws one)
    for kind, cfg, llm, data_root, cache in jobs:
        if kind == "vit":
            _tiny_vit_dir(cfg, data_root, cache)
        elif kind == "lm":
            _tiny_lm_dir(cfg, data_root, cache)
        else:
            _tiny_bert_dir(cfg, llm, data_root, cache)


def pretrain_side_by_side(vision: VisionConfig, llm: LLMConfig, bert: BertBackboneConfig | None, data_root: Path,
                          cache: Path) -> None:
    """Pre-train the tiny backbones the cache lacks in two processes of half the threads each, the
    LM in one and the ViT then the BERT in the other, when two or more are missing and torch has two
    threads or more (else the loaders build them one after another). Models this small use one
    thread better than two: 1.3-1.5x faster with two (docs/decisions.md, "The default budget")."""
    missing = []
    if vision.name == "tiny" and not (_vit_entry(vision, data_root, cache) / VIT_DONE).is_file():
        missing.append(("vit", vision, llm, data_root, cache))
    if llm.name == "tiny" and not (_lm_entry(llm, data_root, cache) / RECIPE_DONE).is_file():
        missing.append(("lm", llm, llm, data_root, cache))
    if (bert is not None and bert.name == "tiny" and llm.name == "tiny"
            and not (_bert_entry(bert, llm, data_root, cache) / RECIPE_DONE).is_file()):
        missing.append(("bert", bert, llm, data_root, cache))
    threads = torch.get_num_threads()
    if len(missing) < 2 or threads < 2:
        return
    lm = [job for job in missing if job[0] == "lm"]
    groups = [lm, [job for job in missing if job[0] != "lm"]] if lm else [[job] for job in missing]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(len(groups), mp_context=multiprocessing.get_context("spawn")) as pool:
        for done in [pool.submit(_pretrain, group, threads // 2) for group in groups]:
            done.result()  # a failure is raised here, as it would be in this process


def load_backbones(vision: VisionConfig, llm: LLMConfig, data_root: Path, cache: Path,
                   device: torch.device, bert: BertBackboneConfig | None = None) -> Backbones:
    """The frozen vision encoder and LLM on `device` in frozen_dtype(device), with the tokenizer,
    and the BERT checkpoint the bridges start from (none when `bert` is None or names none)."""
    pretrain_side_by_side(vision, llm, bert, data_root, cache)
    enc = load_vision(vision, data_root, cache).to(device, frozen_dtype(device))
    model, tokenizer = load_llm(llm, data_root, cache, device)
    start = bert_checkpoint(bert, llm, tokenizer, data_root, cache) if bert is not None else ""
    return Backbones(enc, model.to(device), tokenizer, start)
