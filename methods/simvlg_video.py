"""SimVLG for video (docs/methods.md, SimVLG on video): a temporal attention module inside every
block of the frozen ViT attends across the clip's frames at each token position (q and k
projected, v the residual stream itself), added through a scalar gate that starts at 0, so at
initialisation the model is the image model applied to each frame. The tokens are then averaged
over the frames and go through SimVLG's merging bridge to the frozen LLM. The modules (and the
bridge) are all that trains; the gradient reaches them through the frozen ViT blocks above them.

Where it sits, as EVLGen (yiren-jian/EVLGen, lavis/models/eva_vit_g.py, Block.forward): between
a block's attention sub-layer, with its residual, and its MLP. The module reads the residual
stream after attention, x + attn_branch, its gated output is added to that stream, and the MLP
reads the result:  h = x + b;  h = h + gate * temporal(h);  out = h + mlp_branch(h).

How it gets there: hooks, not a forward of our own. A forward pre-hook on each block keeps the
block's input x; a forward hook on `drop_path1`, the module that ends the attention branch in
timm's ViT `Block` and `EvaBlock` (after layer scale `ls1` / `gamma_1`), hands the block
b + gate * temporal(x + b) instead of b, so the block's own `x + drop_path1(...)` is the stream
above and its MLP (with `ls2` / `gamma_2`) reads it. So the encoder's own forward keeps running
(forward_features, forward_intermediates with Eva's `rope=`, vit_blocks.forward_blocks)
and no block's code is copied for each timm block kind. An explicit split forward would have
to mirror every block kind's sub-layers (layer scale as a module or a parameter, rope, masks)
and the encoder's loop around them, and drift from timm's code when it changes. The price: the
gated output is added to b before x (x + (b + g t) rather than (x + b) + g t), equal up to
rounding and exact at gate 0; and the blocks must be ones whose `drop_path1` ends the attention
branch (check() lists them).

Frame order: attention across frames is blind to it (it permutes with the frames, and the
average after it does not see the permutation at all), so without help a clip and its time
reversal ("moves left" / "moves right") would give the same features. q and k therefore add a
learned embedding of the frame's position (`frame_positions`; off = the order-blind module,
as EVLGen's, which tests/test_video.py shows is blind). The image model ignores order too:
`simvlg` on clips is the frame-average baseline (vlp_bench.method.frame_average).

An image is a clip of one frame (the same as a still clip of any length): attention over one
frame returns the frame, so each block's MLP reads (1 + gate) times the stream after attention."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from vlp_bench.method import Stage, VisionSide
from vlp_bench.methods.simvlg import PAPER, SimVLG, SimVLGConfig
from vlp_bench.registry import METHODS


class TemporalAttention(nn.Module):
    """x (B*T, N, D) -> gate * attention over the T frames at each of the N positions: the update
    the residual stream gets (the caller adds it)."""

    def __init__(self, dim: int, qk_dim: int, heads: int, max_frames: int, frame_positions: bool):
        super().__init__()
        self.heads = heads
        self.q, self.k = nn.Linear(dim, qk_dim), nn.Linear(dim, qk_dim)
        for layer in (self.q, self.k):  # EVLGen's init (its ViT's _init_weights): N(0, 0.02) truncated, bias 0
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        # the logits' scale is the whole q/k width's, as EVLGen (hidden_dim ** -0.5: 256 -> 1/16), not a head's
        self.scale = qk_dim ** -0.5
        self.pos = nn.Parameter(torch.randn(max_frames, qk_dim) * 0.02) if frame_positions else None
        self.gate = nn.Parameter(torch.zeros(()))  # 0: the stream is exactly what the image model has

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        BT, N, D = x.shape
        h = self.heads
        B = BT // frames
        seqs = x.unflatten(0, (B, frames)).transpose(1, 2).flatten(0, 1)  # (B*N, T, D): one per position
        inp = seqs.to(self.q.weight.dtype)  # the frozen ViT may run in bf16 (on a GPU, outside autocast)
        q, k = self.q(inp), self.k(inp)
        if self.pos is not None:
            q, k = q + self.pos[:frames], k + self.pos[:frames]
        q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, inp))  # (B*N, h, T, d); v = the input
        # written out rather than SDPA: v is wider than q and k, which fused kernels do not all take,
        # and over a few frames there is nothing to fuse; the two products are counted as they run
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        out = attn @ v
        out = out.transpose(1, 2).flatten(2).unflatten(0, (B, N)).transpose(1, 2).flatten(0, 1)  # (B*T, N, D)
        return (self.gate * out).to(x.dtype)


def temporal_blocks() -> tuple[type, ...]:
    """timm's block kinds whose `drop_path1` ends the attention branch, the branch's output added to
    the block's input right after it (pre-norm and post-norm ViT and EVA blocks)."""
    from timm.models.eva import EvaBlock, EvaBlockPostNorm
    from timm.models.vision_transformer import Block, ResPostBlock

    return Block, ResPostBlock, EvaBlock, EvaBlockPostNorm


def _place(block: nn.Module, module: TemporalAttention, frames: int) -> list:
    """Hooks that run `module` on `block`'s residual stream after its attention sub-layer, its gated
    output added to that stream before the MLP reads it (the module docstring); their handles."""
    inputs = []  # the block's input, from its pre-hook to its drop_path1 (a stack: calls may nest)

    def keep_input(blk, args, kwargs):
        inputs.append(args[0] if args else kwargs["x"])

    def after_attention(drop_path, args, branch):
        stream = inputs.pop() + branch  # the stream the block's residual add makes: x + attention
        return branch + module(stream, frames)  # the block then adds x: x + b + gate * temporal(x + b)

    return [block.register_forward_pre_hook(keep_input, with_kwargs=True),
            block.drop_path1.register_forward_hook(after_attention)]


@dataclass
class TemporalOptions:
    # q/k width and heads: the paper's 256 in 8 heads at ViT-g's 1408-wide tokens; 64 in 4 at the tiny 128
    temporal_dim: int = 64
    temporal_heads: int = 4  # v = the input, split into as many heads: the encoder's width must divide
    frame_positions: bool = True  # learned frame embeddings in q and k; off = blind to frame order
    max_frames: int = 16  # frame embeddings learned; clips may have up to this many frames (paper: 4)

    def validate(self) -> None:
        getattr(super(), "validate", lambda: None)()
        if self.temporal_dim % self.temporal_heads:
            raise ValueError(f"temporal_dim {self.temporal_dim} is not divisible by temporal_heads {self.temporal_heads}")
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")


class TemporalSide(VisionSide):
    """Gated temporal attention inside the frozen ViT, tokens averaged over frames (docs/methods.md, SimVLG on video)."""

    Options = TemporalOptions
    trains_encoder = True

    @classmethod
    def check(cls, cfg, backbones) -> None:
        vision = backbones.vision
        blocks = getattr(vision.model, "blocks", None)
        if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
            raise ValueError(f"temporal modules go inside the encoder's transformer blocks, and "
                             f"{type(vision.model).__name__} has no `blocks`")
        kinds = temporal_blocks()
        other = sorted({type(b).__name__ for b in blocks if type(b) not in kinds})
        if other:
            raise ValueError(f"temporal modules go between the attention and the MLP of timm's "
                             f"{', '.join(k.__name__ for k in kinds)}, not of {', '.join(other)}")
        if vision.dim % cfg.temporal_heads:
            raise ValueError(f"the encoder's width {vision.dim} is not divisible by temporal_heads {cfg.temporal_heads}")
        super().check(cfg, backbones)

    def __init__(self, cfg, backbones):
        super().__init__(cfg, backbones)  # the bridge first: its weights equal the image method's for a seed
        vision = backbones.vision
        used = len(vision.model.blocks) + 1 + vision.feature_layer  # the blocks whose output is read
        self.temporal = nn.ModuleList(
            TemporalAttention(vision.dim, cfg.temporal_dim, cfg.temporal_heads, cfg.max_frames, cfg.frame_positions)
            for _ in range(used))

    @contextlib.contextmanager
    def _in_blocks(self, frames: int):
        """The temporal modules run inside the ViT's blocks, after attention, while the context is open."""
        handles = []
        for block, module in zip(self.vision.model.blocks, self.temporal):
            handles += _place(block, module, frames)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def encode(self, images: torch.Tensor, stage: Stage | None = None) -> torch.Tensor:
        clips = images if images.ndim == 5 else images[:, None]  # an image: a clip of one frame
        B, T = clips.shape[:2]
        if T > self.cfg.max_frames:
            raise ValueError(f"clips of {T} frames, but the temporal modules learn at most max_frames = "
                             f"{self.cfg.max_frames} frame positions")
        with self._in_blocks(T):  # with gradients: they reach the modules through the frozen blocks
            return self.vision(clips.flatten(0, 1)).unflatten(0, (B, T)).mean(dim=1)

    def flop_parts(self):
        parts, rest = super().flop_parts()
        return {**parts, rest: list(self.temporal)}, rest  # trained, so counted with the bridge

    def info(self) -> dict:
        return {**super().info(), "temporal_gates": [round(m.gate.item(), 6) for m in self.temporal]}


@dataclass
class SimVLGVideoConfig(TemporalOptions, SimVLGConfig):
    pass


@METHODS.register("simvlg-video")
class SimVLGVideo(TemporalSide, SimVLG):
    """SimVLG with gated temporal attention in the frozen ViT, for clips (docs/methods.md, SimVLG on video)."""

    Config = SimVLGVideoConfig
    # the paper's video model: its SimVLG bridge, q/k of 256 in 8 heads (1408 = 8 x 176 for v)
    paper_config = SimVLGVideoConfig(**{**asdict(PAPER), "temporal_dim": 256, "temporal_heads": 8})
