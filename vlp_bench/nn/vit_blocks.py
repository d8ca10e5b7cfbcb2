"""A timm VisionTransformer's blocks run by vlp-bench itself, so that FLIP can drop patches before
the first block and ToMe can merge tokens inside each block (VisionEncoder.forward calls it with
`keep` or `merge`; VisionEncoder.is_plain_vit() says which models it fits: plain timm blocks)."""

from __future__ import annotations

import torch
import torch.nn as nn

from vlp_bench.nn.merging import TokenMerger, merged_block


def forward_blocks(vit: nn.Module, images: torch.Tensor, keep: torch.Tensor | None, merge,
                   feature_layer: int = -1) -> torch.Tensor:
    """(B, N, D) tokens of a plain timm ViT, read after block `feature_layer` (-1 = last, with the
    final norm; -2 = penultimate, without it), as forward_features and forward_intermediates do.

    keep: (B, K) patch indices: the blocks see the prefix tokens (CLS, registers) and those patches
    only, as FLIP feeds a ViT. merge: (per-block r, variant): each block merges tokens as ToMe does;
    the prefix tokens are never merged."""
    x = vit._pos_embed(vit.patch_embed(images))  # (B, prefix + patches, D), positions added
    p = getattr(vit, "num_prefix_tokens", 0)
    if keep is not None:
        kept = x[:, p:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :p], kept], dim=1)
    x = vit.norm_pre(x)
    blocks = vit.blocks[: len(vit.blocks) + 1 + feature_layer]
    if merge is None:
        for blk in blocks:
            x = blk(x)
    else:
        schedule, variant = merge
        merger = TokenMerger(x, variant, protected=p)  # CLS and registers are never merged
        for blk, r in zip(blocks, schedule):
            x = merged_block(blk, x, merger, r)
    return vit.norm(x) if feature_layer == -1 else x
