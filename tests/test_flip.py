"""FLIP masking: fewer tokens in training (after or inside the ViT), none at evaluation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import random_backbones
from test_methods import _batch
from vlp_bench.method import Stage
from vlp_bench.registry import METHODS
from vlp_bench.train.flops import count_step

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def flip(**changes):
    torch.manual_seed(0)
    cls = METHODS.get("flip")
    return cls(dataclasses.replace(cls.Config(), width=32, heads=2, depth=1, **changes), random_backbones())


@pytest.mark.parametrize("where", ["bridge", "vit"])
@pytest.mark.parametrize("ratio, kept", [(0.5, 32), (0.75, 16)])
def test_training_masks_and_evaluation_does_not(where, ratio, kept):
    method = flip(mask_ratio=ratio, where=where).train()
    out = method.training_loss(_batch(), Stage("train", 1))
    assert out.tokens_to_llm == 1 + kept  # CLS + the kept patches of the 8 x 8 grid
    method.eval()
    assert method.visual_prefix(_batch()["images"]).shape[1] == 65  # evaluation sees every token


def test_masking_at_the_vit_input_saves_its_forward():
    costs = {}
    for where in ("bridge", "vit"):
        method = flip(where=where).train()
        costs[where] = count_step(method, _batch(), Stage("train", 1), NO_AUTOCAST)[0].by_part
    assert costs["vit"]["vision"]["forward"] < costs["bridge"]["vision"]["forward"]
    assert costs["vit"]["llm"] == costs["bridge"]["llm"]  # the same number of tokens reaches the LLM


def test_kept_patches_with_everything_kept_equal_the_full_encoder():
    vision = random_backbones().vision
    images = _batch()["images"]
    every = torch.arange(64).expand(len(images), -1)
    with torch.no_grad():
        assert torch.allclose(vision(images, every), vision(images), atol=1e-5)


def test_each_image_gets_its_own_random_subset_in_patch_order():
    method = flip().train()
    images = _batch()["images"][:1].expand(3, -1, -1, -1)  # three copies of one image
    with torch.no_grad():
        visual = method.encode(images, Stage("train", 1))
        full = method.vision(images[:1])[0]
    picked = [[int((full[1:] - t).abs().sum(-1).argmin()) for t in visual[i, 1:]] for i in range(3)]
    assert all(p == sorted(p) and len(set(p)) == 32 for p in picked)  # distinct patches, in grid order
    assert len({tuple(p) for p in picked}) == 3  # a fresh draw per image


def test_unmasked_tuning_is_a_last_stage_without_masking():
    method = flip(unmasked_fraction=0.2).train()
    assert [(s.name, s.steps) for s in method.stages(10)] == [("train", 8), ("unmasked", 2)]
    assert method.training_loss(_batch(), Stage("unmasked", 2)).tokens_to_llm == 65
