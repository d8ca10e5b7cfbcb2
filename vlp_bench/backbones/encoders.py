"""The backbones' configs and wrappers: VisionConfig, LLMConfig and BertBackboneConfig (name
"tiny": pre-trained by vlp_bench.backbones.tiny; any other name is a real backbone; all loaded by
vlp_bench.backbones.load), the frozen VisionEncoder around a timm model, Backbones (encoder, causal
LLM, tokenizer, and the BERT checkpoint the bridges start from), freeze and frozen_dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from vlp_bench.nn.vit_blocks import forward_blocks, is_eva


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
    pretrain_steps: int = 1000  # enough to copy content from its context: held-out loss 1.037, 1.025 at 1500 (docs/decisions.md)
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3


@dataclass
class BertBackboneConfig:
    """The BERT-style encoder the bridges start from (methods' `init = "bert"`), as SimVLG's and
    BLIP-2's start from bert-base-uncased. Not frozen: it is only where the trained bridges begin."""

    # "tiny" = pre-trained here (masked LM on the data's training captions, with the LLM's tokenizer);
    # else a local Hugging Face BERT-style directory; "" = none (bridges start from random init)
    name: str = "tiny"
    seed: int = 0
    # tiny recipe (ignored for a directory): the default bridges' width and heads; 4 layers, the
    # deepest tiny bridge's (BLIP-2's Q-Former); a bridge of fewer layers takes the first ones
    width: int = 128
    depth: int = 4
    heads: int = 4
    pretrain_steps: int = 1000  # at 2e-3 a lower held-out loss than 1500 at 5e-4 (docs/decisions.md, "The default budget")
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
        """A timm VisionTransformer of plain blocks, which vlp-bench runs itself for ToMe inside the
        encoder (vlp_bench.nn.vit_blocks; EVA, parallel or post-norm blocks: not yet)."""
        from timm.models.vision_transformer import Block, VisionTransformer

        return isinstance(self.model, VisionTransformer) and all(type(b) is Block for b in self.model.blocks)

    def can_drop_patches(self) -> bool:
        """The encoder can run on a subset of its patches, as FLIP feeds it (forward(keep=...)): a
        timm VisionTransformer (any of its block kinds: each reads the token sequence alone) or a
        timm Eva (EVA-CLIP, the paper preset's ViT-g; the rotary embedding, where it has one, is
        gathered for the kept patches as timm's own patch dropout does)."""
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(self.model, VisionTransformer) or is_eva(self.model)

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None, merge=None) -> torch.Tensor:
        """(B, N, D) tokens. With `keep` (B, K) patch indices the encoder runs on the prefix tokens
        and those patches only, as FLIP feeds a ViT (dropped patches cost nothing; needs
        can_drop_patches()); with `merge` = (per-block r, variant) its blocks merge tokens as ToMe
        does (needs is_plain_vit())."""
        weight = next(self.model.parameters())
        images = images.to(weight.dtype)  # frozen weights are bf16 on a GPU (load_backbones)
        if keep is not None or merge is not None:
            return self._float(forward_blocks(self.model, images, keep, merge, self.feature_layer))
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
    bert: str = ""  # the BERT-style checkpoint directory bridges start from ("" = none: random init)
    # an in-memory BERT-style text model (body, tokenizer) in place of `bert`'s directory for the
    # text-side family (init "bert"): the cost model's shapes on the meta device
    text: tuple | None = None

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
