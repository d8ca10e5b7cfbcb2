"""Token merging, written once: ToMe's bipartite soft matching, the schedule grammar, and the state
that carries token sizes across layers. SimVLG's bridge calls it; ToMe inside a frozen ViT and the
video extension are meant to call the same code.

One merge step on t tokens (ToMe, Bolya et al. 2023, facebookresearch/ToMe tome/merge.py;
docs/methods.md, ToMe's merge step), with p = `protected` tokens at the front (CLS, a distillation
token, registers):
1. r is clamped to (t - p) // 2.
2. Metric: the attention keys averaged over heads, L2-normalised (a zero vector stays zero here;
   ToMe would divide by zero).
3. Alternate split over all t tokens: A = even positions, B = odd positions; scores = cosine(A, B).
   The p protected tokens are A's first ceil(p/2) and B's first floor(p/2) tokens: a protected A
   token is never a source, a protected B token never a destination (ToMe's class_token is p = 1,
   class_token + distill_token is p = 2; this is the same rule for any p).
4. Each A token picks its most similar B token; the r unprotected A tokens with the highest scores
   are merged into their partners (a stable sort: equal scores go in position order).
5. Output = the p protected tokens, unchanged and in their original order; then the other kept A
   tokens; then the other B tokens. The kept A tokens are in position order when p > 0 and in
   descending score order when p = 0, as ToMe (which sorts them only when there is a class token).
   For p = 2 this is ToMe's [cls, dist, other kept A, other B].
Variants (an ablation switch):
- "tome"   (faithful): size-weighted average (x <- sum(s x) / sum(s), s <- sum(s)) and
           proportional attention: softmax(QK^T / sqrt(d) + log s) over the keys.
- "evlgen" (as the released SimVLG code): plain unweighted mean, no log-size bias. Sizes are still
           tracked, for reporting only.
The schedule grammar follows ToMe's parse_r (tome/utils.py): see layer_schedule.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal, NamedTuple, Sequence

import torch

Variant = Literal["tome", "evlgen"]
VARIANTS = ("tome", "evlgen")


# ----------------------------------------------------------------------------- schedule grammar


def layer_schedule(spec: int | Sequence, depth: int) -> list[int]:
    """The number of tokens each of `depth` layers merges away, with ToMe's numbers (parse_r).

    spec: an int r (r in every layer); [r, inflection] with inflection in [-1, 1], a linear ramp
    across layers from r * (1 - inflection) to r * (1 + inflection) as in ToMe ([r, -1] is the
    "decreasing" schedule: 2r first, 0 last); or an explicit list of `depth` ints. For a 2-layer
    bridge, write the inflection as a float ([4, 1.0]) to mean a ramp, not a list.

    The ramp's numbers are ToMe's: the first value is int(r * (1 - inflection)) (truncated), the
    last is 2r minus it, and layer i merges int(first + step * i), truncated toward zero in the same
    floating-point order as ToMe (so a decreasing ramp whose last value lands a hair below 0 gives 0,
    and one landing a hair below an integer gives the integer below). [19, -1] over 12 layers:
    38, 34, 31, 27, 24, 20, 17, 13, 10, 6, 3, 0 (223 tokens). Differences from parse_r: a list must
    give exactly `depth` values (ToMe pads a short list with zeros and ignores extra values), and a
    1-layer ramp gives [int(r * (1 - inflection))] (ToMe divides by zero).
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
        first = int(r * (1.0 - inflection))  # truncated, as ToMe's min_val
        last = 2 * r - first  # an int: the ramp is symmetric about r up to the truncation
        step = (last - first) / (depth - 1) if depth > 1 else 0.0
        return [int(first + step * i) for i in range(depth)]  # int(): toward zero, as ToMe
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


class MergePlan(NamedTuple):
    """One merge step's choice (bipartite_soft_matching), applied by apply_merge to any per-token
    tensor (the tokens, their sizes, their sources). Indices are into A (even positions) or B (odd
    positions), each (B, n, 1)."""
    kept: torch.Tensor  # unprotected A tokens left unmerged, in output order
    src: torch.Tensor  # the r A tokens merged away ...
    dst: torch.Tensor  # ... and the B token each one joins
    protected: int  # p: the first p tokens, copied to the front of the output unchanged


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 1) -> MergePlan | None:
    """Plan a merge of r token pairs (the module docstring's steps 1-5). metric: (B, T, C).
    Returns a MergePlan, or None when nothing is merged."""
    T = metric.shape[1]
    r = min(r, (T - protected) // 2)
    if r <= 0:
        return None
    in_a, in_b = (protected + 1) // 2, protected // 2  # protected tokens: A's first, B's first
    with torch.no_grad():  # the plan is indices: nothing to differentiate
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # (B, |A|, |B|) cosines
        scores[:, :, :in_b] = -torch.inf  # a protected B token is never a destination
        best, partner = scores.max(dim=-1)  # each A token's most similar B token
        # the unprotected A tokens by descending score (a protected A token is never a source);
        # stable, so equal scores keep position order and the plan is deterministic
        order = best[:, in_a:].argsort(dim=-1, descending=True, stable=True)[..., None] + in_a
        src, kept = order[:, :r], order[:, r:]
        if protected:  # ToMe re-sorts the kept A tokens only when there is a class token
            kept = kept.sort(dim=1).values
        dst = partner[..., None].gather(1, src)
    return MergePlan(kept, src, dst, protected)


def apply_merge(x: torch.Tensor, plan: MergePlan, reduce: str) -> torch.Tensor:
    """Apply a plan to x (B, T, D): reduce = "sum", "mean" or "amax" (over a destination and its
    sources). Output: the protected tokens, the kept A tokens, then the unprotected B tokens."""
    D, p = x.shape[-1], plan.protected
    a, b = x[:, ::2], x[:, 1::2]
    unmerged = a.gather(1, plan.kept.expand(-1, -1, D))
    sources = a.gather(1, plan.src.expand(-1, -1, D))
    b = b.scatter_reduce(1, plan.dst.expand(-1, -1, D), sources, reduce=reduce, include_self=True)
    # protected tokens are neither sources nor destinations: positions 0..p-1 as they came in
    return torch.cat([x[:, :p], unmerged, b[:, p // 2:]], dim=1)


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
