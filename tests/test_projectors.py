"""The projector baselines: `mlp` keeps every token, `pool` averages k x k cells of the patch grid."""

from __future__ import annotations

import pytest
import torch

from conftest import random_backbones
from vlp_bench.registry import METHODS


def test_mlp_keeps_every_visual_token():
    bb = random_backbones()
    method = METHODS.get("mlp")(METHODS.get("mlp").Config(), bb)
    visual = torch.randn(2, bb.vision.num_tokens, bb.vision.dim)
    assert method.bridge(visual).shape == (2, 65, bb.llm_dim)


@pytest.mark.parametrize("grid, keep_prefix", [(4, False), (2, True), (8, False)])
def test_pool_averages_cells_of_the_patch_grid(grid, keep_prefix):
    cls = METHODS.get("pool")
    bb = random_backbones()
    method = cls(cls.Config(grid=grid, keep_prefix=keep_prefix), bb)
    method.proj = torch.nn.Identity()  # look at the pooled tokens themselves
    visual = torch.randn(2, 65, bb.vision.dim)  # CLS + an 8 x 8 patch grid, row-major
    out = method.bridge(visual)
    assert out.shape[1] == grid * grid + keep_prefix == method.info()["tokens_to_llm"]
    cell = 8 // grid
    patches = visual[:, 1:].reshape(2, 8, 8, -1)
    first = out[:, 1 if keep_prefix else 0]
    assert torch.allclose(first, patches[:, :cell, :cell].mean(dim=(1, 2)), atol=1e-6)  # top-left cell
    last = out[:, -1]
    assert torch.allclose(last, patches[:, -cell:, -cell:].mean(dim=(1, 2)), atol=1e-6)  # bottom-right cell
    if keep_prefix:
        assert torch.equal(out[:, 0], visual[:, 0])


def test_pool_rejects_a_grid_larger_than_the_patches():
    cls = METHODS.get("pool")
    with pytest.raises(ValueError, match="larger than the 8 x 8 patch grid"):
        cls.check(cls.Config(grid=9), random_backbones())
