"""The bridge layers' old address, kept for plug-ins written before the layout by roles
(docs/ARCHITECTURE.md): they live in `vlp_bench.nn.layers`."""

from vlp_bench.nn.layers import Attention, Block, CrossAttention, mlp, projector  # noqa: F401
