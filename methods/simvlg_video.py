"""SimVLG for video (docs/methods.md, SimVLG on video): a temporal attention module in front of every
block of the frozen ViT attends across the clip's frames at each token position (q and k
projected, v the block's input itself), added through a scalar gate that starts at 0, so at
initialisation the model is the image model applied to each frame. The tokens are then averaged
over the frames and go through SimVLG's merging bridge to the frozen LLM. The modules (and the
bridge) are all that trains; the gradient reaches them through the frozen ViT blocks above them.

Frame order: attention across frames is blind to it (it permutes with the frames, and the
average after it does not see the permutation at all), so without help a clip and its time
reversal ("moves left" / "moves right") would give the same features. q and k therefore add a
learned embedding of the frame's position (`frame_positions`; off = the order-blind module,
which tests/test_video.py shows is blind). The image model ignores order too: `simvlg` on clips
is the frame-average baseline (vlp_bench.method.frame_average).

An image is a clip of one frame (the same as a still clip of any length): attention over one
frame returns the frame, so each block reads (1 + gate) times its input."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from vlp_bench.method import Stage, VisionSide
from vlp_bench.methods.simvlg import PAPER, SimVLG, SimVLGConfig
from vlp_bench.registry import METHODS


class TemporalAttention(nn.Module):
    """x (B*T, N, D) -> x + gate * attention over the T frames at each of the N positions."""

    def __init__(self, dim: int, qk_dim: int, heads: int, max_frames: int, frame_positions: bool):
        super().__init__()
        self.heads = heads
        self.q, self.k = nn.Linear(dim, qk_dim), nn.Linear(dim, qk_dim)
        self.pos = nn.Parameter(torch.randn(max_frames, qk_dim) * 0.02) if frame_positions else None
        self.gate = nn.Parameter(torch.zeros(()))  # 0: the block reads exactly what the image model reads

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
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        out = attn @ v
        out = out.transpose(1, 2).flatten(2).unflatten(0, (B, N)).transpose(1, 2).flatten(0, 1)  # (B*T, N, D)
        return x + (self.gate * out).to(x.dtype)


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
        if not isinstance(getattr(vision.model, "blocks", None), (nn.Sequential, nn.ModuleList)):
            raise ValueError(f"temporal modules go in front of the encoder's transformer blocks, and "
                             f"{type(vision.model).__name__} has no `blocks`")
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
        """The temporal modules run in front of the ViT's blocks while the context is open."""
        def hook(module):
            return lambda block, args: (module(args[0], frames), *args[1:])
        handles = [blk.register_forward_pre_hook(hook(m)) for blk, m in zip(self.vision.model.blocks, self.temporal)]
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
