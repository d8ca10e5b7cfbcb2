"""A timm ViT's blocks run by vlp-bench itself, so that FLIP can drop patches before the first
block and ToMe can merge tokens inside each block (VisionEncoder.forward calls it with `keep` or
`merge`). Which encoders fit: VisionEncoder.can_drop_patches() for `keep` (a timm
VisionTransformer, or a timm Eva, whose rotary embedding is gathered for the kept patches too),
VisionEncoder.is_plain_vit() for `merge` (plain timm ViT blocks only)."""

from __future__ import annotations

import torch
import torch.nn as nn

from vlp_bench.nn.merging import TokenMerger, merged_block


def is_eva(vit: nn.Module) -> bool:
    """A timm Eva (EVA, EVA-02, EVA-CLIP): its _pos_embed returns the tokens and the rotary embedding."""
    from timm.models.eva import Eva

    return isinstance(vit, Eva)


def _gather_patches(x: torch.Tensor, keep: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, prefix + patches, D) -> (B, prefix + K, D): the prefix tokens, then patches `keep` (B, K)."""
    kept = x[:, prefix:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :prefix], kept], dim=1)


def _kept_rope(vit: nn.Module, rope: torch.Tensor, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Eva's rotary embedding (patches only, no batch dim) for the kept patches of each image, in
    the layout Eva's blocks take it after timm's own patch dropout: (B, 1, K, dim) (a head axis to
    broadcast over), or per block first, (depth, B, heads, K, dim), for "mixed" rope."""
    from timm.layers import apply_keep_indices_nlc

    rope = apply_keep_indices_nlc(x, rope, keep)  # timm's gather for its own patch dropout: (B, ..., K, dim)
    return rope.transpose(0, 1) if getattr(vit, "rope_mixed", False) else rope.unsqueeze(1)


def embed(vit: nn.Module, images: torch.Tensor, keep: torch.Tensor | None):
    """(tokens (B, prefix + patches or K, D) with positions added and norm_pre applied, rotary
    embedding or None): what the encoder's first block reads, for the kept patches only."""
    x = vit.patch_embed(images)
    x, rope = vit._pos_embed(x) if is_eva(vit) else (vit._pos_embed(x), None)
    if keep is not None:
        x = _gather_patches(x, keep, getattr(vit, "num_prefix_tokens", 0))
        if rope is not None:
            rope = _kept_rope(vit, rope, keep, x)
    return vit.norm_pre(x), rope


def forward_blocks(vit: nn.Module, images: torch.Tensor, keep: torch.Tensor | None, merge,
                   feature_layer: int = -1) -> torch.Tensor:
    """(B, N, D) tokens of a timm ViT or Eva, read after block `feature_layer` (-1 = last, with the
    final norm; -2 = penultimate, without it), as forward_features and forward_intermediates do.

    keep: (B, K) patch indices: the blocks see the prefix tokens (CLS, registers) and those patches
    only, as FLIP feeds a ViT (an Eva's blocks get the rotary embedding of those patches). merge:
    (per-block r, variant): each block merges tokens as ToMe does (plain ViT blocks only); the
    prefix tokens are never merged."""
    x, rope = embed(vit, images, keep)
    blocks = vit.blocks[: len(vit.blocks) + 1 + feature_layer]
    if merge is not None:
        if is_eva(vit):
            raise ValueError("ToMe inside the encoder runs plain timm ViT blocks, not Eva's")
        schedule, variant = merge
        merger = TokenMerger(x, variant, protected=getattr(vit, "num_prefix_tokens", 0))  # CLS, registers kept
        for blk, r in zip(blocks, schedule):
            x = merged_block(blk, x, merger, r)
    elif is_eva(vit):
        mixed = rope is not None and getattr(vit, "rope_mixed", False)  # one rotary embedding per block
        for i, blk in enumerate(blocks):
            x = blk(x, rope=rope[i] if mixed else rope)
    else:
        for blk in blocks:
            x = blk(x)
    return vit.norm(x) if feature_layer == -1 else x
