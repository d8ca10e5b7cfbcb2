"""Token merging, written once: ToMe's bipartite soft matching, the schedule grammar, and the state
that carries token sizes across layers. SimVLG's bridge calls it; ToMe inside a frozen ViT and the
video extension are meant to call the same code.

One merge step on t tokens (ToMe, Bolya et al. 2023; docs/methods.md, ToMe's merge step):
1. Protect the first `protected` tokens (CLS); r is clamped to (t - protected) // 2.
2. Metric: the attention keys averaged over heads, L2-normalised.
3. Alternate split: A = even positions, B = odd positions; scores = cosine(A, B); a protected
   token is never a source.
4. Each A token picks its most similar B token; the r A tokens with the highest scores are merged
   into their partners; output = the kept A tokens (in their original order, CLS first) then B.
Variants (an ablation switch):
- "tome"   (faithful): size-weighted average (x <- sum(s x) / sum(s), s <- sum(s)) and
           proportional attention: softmax(QK^T / sqrt(d) + log s) over the keys.
- "evlgen" (as the released SimVLG code): plain unweighted mean, no log-size bias. Sizes are still
           tracked, for reporting only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal, Sequence

import torch

Variant = Literal["tome", "evlgen"]
VARIANTS = ("tome", "evlgen")


# ----------------------------------------------------------------------------- schedule grammar


def layer_schedule(spec: int | Sequence, depth: int) -> list[int]:
    """The number of tokens each of `depth` layers merges away.

    spec: an int r (r in every layer); [r, inflection] with inflection in [-1, 1], a linear ramp
    across layers from r * (1 - inflection) to r * (1 + inflection) as in ToMe ([r, -1] is the
    "decreasing" schedule: 2r first, 0 last); or an explicit list of `depth` ints. For a 2-layer
    bridge, write the inflection as a float ([4, 1.0]) to mean a ramp, not a list.
    """
    if isinstance(spec, bool):
        raise ValueError(f"merge schedule must be an int or a list, got {spec!r}")
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"merge schedule: r must be >= 0, got {spec}")
        return [spec] * depth
    spec = list(spec)
    is_ramp = (len(spec) == 2 and isinstance(spec[0], int) and not isinstance(spec[1], bool)
               and isinstance(spec[1], (int, float)) and -1 <= spec[1] <= 1
               and (len(spec) != depth or isinstance(spec[1], float) or spec[1] < 0))
    if is_ramp:
        r, inflection = spec
        if r < 0:
            raise ValueError(f"merge schedule: r must be >= 0, got {r}")
        lo = r * (1.0 - inflection)
        hi = 2 * r - lo
        step = (hi - lo) / (depth - 1) if depth > 1 else 0.0
        return [int(round(lo + step * i)) for i in range(depth)]
    if len(spec) != depth:
        raise ValueError(f"merge schedule lists {len(spec)} values for {depth} layers: {spec}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in spec):
        raise ValueError(f"merge schedule: per-layer values must be ints >= 0, got {spec}")
    return spec


def token_counts(n_tokens: int, schedule: Sequence[int], protected: int = 1) -> list[int]:
    """Token counts after each layer, with ToMe's clamp: [n_tokens, after layer 1, ...]."""
    counts = [n_tokens]
    for r in schedule:
        t = counts[-1]
        counts.append(t - min(r, (t - protected) // 2))
    return counts


def curriculum_scale(progress: float, start: float, ramp: float) -> float:
    """Scale of the merge schedule at training progress in [0, 1]: `start` at step 0, linear to 1.0
    at `ramp` (fraction of training), 1.0 after. start=1 or ramp=0: no curriculum."""
    if ramp <= 0 or progress >= ramp:
        return 1.0
    return start + (1.0 - start) * progress / ramp


# ----------------------------------------------------------------------------- one merge


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 1):
    """Plan a merge of r token pairs. metric: (B, T, C). Returns (kept A index, source A index,
    destination B index), each (B, n, 1), or None when nothing is merged."""
    T = metric.shape[1]
    r = min(r, (T - protected) // 2)
    if r <= 0:
        return None
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # (B, |A|, |B|) cosine similarities
    if protected:  # protected tokens sit at the front of A (positions 0, 2, ...): never sources
        scores[:, : (protected + 1) // 2] = -torch.inf
        if protected > 1:  # an odd position (a second protected token) is in B: never a destination
            scores[:, :, : protected // 2] = -torch.inf
    best, partner = scores.max(dim=-1)  # each A token's most similar B token
    order = best.argsort(dim=-1, descending=True, stable=True)[..., None]  # stable: ties are deterministic
    kept = order[:, r:].sort(dim=1).values  # unmerged A tokens, back in their original order
    src = order[:, :r]
    dst = partner[..., None].gather(1, src)
    return kept, src, dst


def apply_merge(x: torch.Tensor, plan, reduce: str) -> torch.Tensor:
    """Apply a plan to x (B, T, D): reduce = "sum" or "mean" (over a destination and its sources)."""
    kept, src, dst = plan
    D = x.shape[-1]
    a, b = x[:, ::2], x[:, 1::2]
    unmerged = a.gather(1, kept.expand(-1, -1, D))
    sources = a.gather(1, src.expand(-1, -1, D))
    b = b.scatter_reduce(1, dst.expand(-1, -1, D), sources, reduce=reduce, include_self=True)
    return torch.cat([unmerged, b], dim=1)


class TokenMerger:
    """Carries token sizes across the layers of one forward pass.

        merger = TokenMerger(x, variant)
        for block, r in zip(blocks, schedule):
            x = block(x, merger.attn_bias(), lambda x, keys: merger(x, keys, r))
    """

    def __init__(self, x: torch.Tensor, variant: Variant = "tome", protected: int = 1):
        if variant not in VARIANTS:
            raise ValueError(f"unknown merge variant '{variant}' (use one of {VARIANTS})")
        self.variant, self.protected = variant, protected
        self.size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=x.dtype)
        self.merged = False
        self.counts = [x.shape[1]]
        self.source = None  # (B, T, T_in) 0/1: which input tokens each token holds, under track_sources()
        if _TRACKING:
            self.source = torch.eye(x.shape[1], device=x.device).expand(x.shape[0], -1, -1)
            for found in _TRACKING:
                found.append(self)

    def attn_bias(self) -> torch.Tensor | None:
        """Proportional attention: + log(size) on each key's logit (tome only; None until a merge)."""
        if self.variant != "tome" or not self.merged:
            return None
        return self.size.log()[:, None, None, :, 0]  # (B, 1, 1, T): broadcast over heads and queries

    def __call__(self, x: torch.Tensor, keys: torch.Tensor, r: int) -> torch.Tensor:
        """x: (B, T, D); keys: (B, H, T, hd) from the block's attention."""
        plan = bipartite_soft_matching(keys.mean(dim=1), r, self.protected)
        if plan is not None:
            if self.variant == "tome":
                weighted = apply_merge(x * self.size, plan, "sum")
                self.size = apply_merge(self.size, plan, "sum")
                x = weighted / self.size
            else:
                x = apply_merge(x, plan, "mean")
                self.size = apply_merge(self.size, plan, "sum")
            if self.source is not None:
                self.source = apply_merge(self.source, plan, "amax")
            self.merged = True
        self.counts.append(x.shape[1])
        return x


# ----------------------------------------------------------------------------- source tracking

_TRACKING: list[list] = []  # the lists of the open track_sources() contexts


@contextmanager
def track_sources():
    """ToMe's source tracking: every TokenMerger made inside records, in its `source`, which of its
    input tokens each of its output tokens holds. Yields the mergers in the order they were made.

        with torch.no_grad(), track_sources() as mergers:
            method.visual_prefix(images)
        groups = token_groups(mergers)
    """
    found: list[TokenMerger] = []
    _TRACKING.append(found)
    try:
        yield found
    finally:
        _TRACKING.remove(found)


def token_groups(mergers: Sequence[TokenMerger]) -> torch.Tensor:
    """(B, T_in) long: for each input token of the first merger, the output token of the last one
    that holds it. Mergers run one after the other (ToMe in the ViT, then in the bridge), each on the
    tokens the previous one output."""
    source = mergers[0].source
    for m in mergers[1:]:
        if m.source.shape[-1] != source.shape[1]:
            raise ValueError(f"a merger over {m.source.shape[-1]} tokens follows one that output {source.shape[1]}")
        source = m.source @ source
    return source.argmax(dim=1)


def merged_block(block, x: torch.Tensor, merger: TokenMerger, r: int) -> torch.Tensor:
    """A timm ViT block with ToMe between its attention and its MLP: timm's own attention runs
    (with proportional attention as its mask) and its keys, caught from the qkv projection, are the
    matching metric. This is how ToMe runs inside a frozen pre-trained ViT."""
    caught = {}
    handle = block.attn.qkv.register_forward_hook(lambda mod, inp, out: caught.setdefault("qkv", out))
    try:
        a = block.attn(block.norm1(x), attn_mask=merger.attn_bias())
    finally:
        handle.remove()
    B, T, _ = x.shape
    heads = block.attn.num_heads
    keys = caught["qkv"].reshape(B, T, 3, heads, -1)[:, :, 1].transpose(1, 2)  # (B, H, T, hd)
    x = x + block.drop_path1(block.ls1(a))
    x = merger(x, block.attn.k_norm(keys), r)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
