"""Transformer building blocks shared by the bridges. Attention goes through
`scaled_dot_product_attention` (fused kernels on GPU; the FLOP counter handles it on CPU)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                past=None) -> tuple[torch.Tensor, torch.Tensor]:
        """past: incremental decoding (vlp_bench.nn.kv_cache), where x holds only the new positions:
        past(k, v) keeps their keys and values and returns those of every position so far, so the
        earlier ones are not projected again; bias is then (B, 1, new, all)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        if past is not None:
            k, v = past(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(B, T, D)), k  # keys returned: token merging's metric


class CrossAttention(nn.Module):
    """Queries from x attend to a context (e.g. the frozen ViT's tokens, of another width)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context's keys and values, each (B, H, N, hd)."""
        B, N, _ = context.shape
        return self.kv(context).view(B, N, 2, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """kv: the context's keys_values, computed once by the caller (incremental decoding reads the
        same image at every step); the context is then not read."""
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, H, T, hd)
        k, v = self.keys_values(context) if kv is None else kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


def projector(in_dim: int, out_dim: int) -> nn.Sequential:
    """LLaVA-1.5's vision-to-LLM projector: Linear -> GELU -> Linear, at the LLM's width."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def mlp(dim: int, ratio: float = 4.0) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block. Token reduction (merging) belongs between attention and MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, between=None) -> torch.Tensor:
        """bias: additive attention bias (e.g. proportional attention); between(x, keys) -> x runs
        after attention and before the MLP, where token merging sits."""
        a, keys = self.attn(self.norm1(x), bias)
        x = x + a
        if between is not None:
            x = between(x, keys)
        return x + self.mlp(self.norm2(x))
