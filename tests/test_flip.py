"""FLIP masking: fewer tokens in training (at the ViT's input patches by default, or after the
ViT), none at evaluation; the masked encoder on a plain timm ViT and on a timm Eva (rotary
embedding gathered for the kept patches) equals the encoder with only the kept patches there."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import random_backbones
from test_methods import _batch
from vlp_bench.backbones import Backbones, VisionConfig, VisionEncoder, freeze, tiny_vit
from vlp_bench.method import Stage
from vlp_bench.registry import METHODS
from vlp_bench.train.flops import count_step

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def tiny_eva(feature_layer: int = -1, depth: int = 2, rope_type: str = "cat", width: int = 32) -> VisionEncoder:
    """A frozen timm Eva on the tiny world's 64 px images (8 x 8 patches of 8 px + CLS), shaped as
    EVA-CLIP's EVA-02: rotary positions (`rope_type`; "mixed": one per block), SwiGLU MLP with its
    norm, layer scale (gamma_1 / gamma_2, drawn at random so that they matter); attention's weights
    drawn wide enough that it is sharp and weighs in the stream, so that rotary positions change
    the tokens (at timm's init a wrong rotary embedding would hide under a tolerance)."""
    from timm.models.eva import Eva

    torch.manual_seed(1)
    eva = Eva(img_size=64, patch_size=8, embed_dim=width, depth=depth, num_heads=2, mlp_ratio=2.0, num_classes=0,
              use_rot_pos_emb=True, rope_type=rope_type, ref_feat_shape=(8, 8), swiglu_mlp=True, scale_mlp=True,
              init_values=0.1)
    with torch.no_grad():
        for blk in eva.blocks:
            blk.gamma_1.uniform_(0.5, 1.5)
            blk.gamma_2.uniform_(0.5, 1.5)
            blk.attn.qkv.weight.normal_(0.0, 0.2)
            blk.attn.proj.weight.normal_(0.0, 0.2)
    return freeze(VisionEncoder(eva, 64, (0.5,) * 3, (0.5,) * 3, feature_layer))


def with_vision(vision: VisionEncoder) -> Backbones:
    bb = random_backbones()
    return Backbones(vision, bb.llm, bb.tokenizer)


def flip(backbones=None, **changes):
    torch.manual_seed(0)
    cls = METHODS.get("flip")
    cfg = dataclasses.replace(cls.Config(), width=32, heads=2, depth=1, **changes)
    backbones = backbones or random_backbones()
    cls.check(cfg, backbones)
    return cls(cfg, backbones)


def test_flip_masks_the_encoders_input_patches_by_default():
    from vlp_bench.methods.flip import FLIPOptions

    assert FLIPOptions().where == "vit"
    for name in ("flip", "simvlg+flip"):
        cls = METHODS.get(name)
        assert cls.Config().where == "vit" and cls.paper_config.where == "vit", name
    method = flip().train()
    assert method.info()["where"] == "vit"


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


def _with_only(vision: VisionEncoder, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The reference: the encoder's own forward (timm's forward_features, or forward_intermediates
    for the penultimate block) on every patch, the dropped ones hidden from every attention by a
    mask over the keys; the rows of the prefix tokens and the kept patches. Norms and MLPs act per
    token and rotary positions per position, so these rows are the encoder on the kept patches alone."""
    m, p, n = vision.model, vision.num_prefix_tokens, vision.num_tokens
    B = len(images)
    rows = torch.cat([torch.arange(p).expand(B, -1), keep + p], dim=1)
    visible = torch.zeros(B, n, dtype=torch.bool).scatter_(1, rows, True)
    mask = visible[:, None, None, :].expand(B, 1, n, n)
    if vision.feature_layer == -1:
        x = m.forward_features(images, attn_mask=mask)
    else:
        (spatial, prefix), = m.forward_intermediates(
            images, indices=[len(m.blocks) + vision.feature_layer], return_prefix_tokens=True, norm=False,
            stop_early=True, output_fmt="NLC", intermediates_only=True, attn_mask=mask)
        x = torch.cat([prefix, spatial], dim=1)
    return x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))


def _plain_vit(feature_layer: int) -> VisionEncoder:
    torch.manual_seed(2)
    return freeze(VisionEncoder(tiny_vit(VisionConfig(width=32, depth=2, heads=2), 0), 64, (0.5,) * 3, (0.5,) * 3,
                                feature_layer))


@pytest.mark.parametrize("encoder", ["vit", "eva", "eva-mixed-rope"])
@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_masked_encoder_input_equals_the_encoder_on_the_kept_patches_only(encoder, feature_layer):
    vision = (_plain_vit(feature_layer) if encoder == "vit"
              else tiny_eva(feature_layer, rope_type="mixed" if "mixed" in encoder else "cat"))
    assert vision.can_drop_patches()
    images = _batch()["images"]
    keep = torch.rand(len(images), 64, generator=torch.Generator().manual_seed(3)).argsort(dim=1)[:, :24]
    with torch.no_grad():
        got = vision(images, keep=keep)
        want = _with_only(vision, images, keep)
        unmasked = _with_only(vision, images, torch.arange(64).expand(len(images), -1))
    assert got.shape == (len(images), 1 + 24, 32)
    assert torch.allclose(got, want, atol=1e-5)
    # the reference sees which patches are gone: the kept tokens differ from the unmasked encoder's
    assert not torch.allclose(got[:, 1:], unmasked[:, 1:].gather(1, keep[..., None].expand(-1, -1, 32)), atol=1e-3)


def test_an_eva_masked_without_gathering_its_rotary_positions_would_differ():
    """The kept patches keep their own rotary positions: an Eva's blocks given the first K
    positions instead (the embedding not gathered) give other tokens."""
    vision = tiny_eva()
    eva = vision.model
    images = _batch()["images"]
    keep = torch.arange(64).flip(0)[:32].expand(len(images), -1)  # the last 32 patches, reversed
    with torch.no_grad():
        got = vision(images, keep=keep)
        x, rope = eva._pos_embed(eva.patch_embed(images))
        x = torch.cat([x[:, :1], x[:, 1:].gather(1, keep[..., None].expand(-1, -1, 32))], dim=1)
        for blk in eva.blocks:
            x = blk(x, rope=rope[:32])
        assert not torch.allclose(got, eva.norm(x), atol=1e-3)


def test_flip_masks_an_evas_input_and_saves_its_forward_and_tome_inside_stays_plain_vit_only():
    bb = with_vision(tiny_eva())
    assert bb.vision.can_drop_patches() and not bb.vision.is_plain_vit()
    costs = {}
    for where in ("bridge", "vit"):
        method = flip(bb, where=where).train()
        assert method.training_loss(_batch(), Stage("train", 1)).tokens_to_llm == 1 + 32
        costs[where] = count_step(method, _batch(), Stage("train", 1), NO_AUTOCAST)[0].by_part
    assert costs["vit"]["vision"]["forward"] < 0.6 * costs["bridge"]["vision"]["forward"]
    assert costs["vit"]["llm"] == costs["bridge"]["llm"]
    tome = METHODS.get("tome-vit")
    with pytest.raises(ValueError, match="needs a timm VisionTransformer"):
        tome.check(dataclasses.replace(tome.Config(), width=32, heads=2), bb)


def test_an_encoder_that_cannot_drop_patches_needs_where_bridge():
    class Conv(torch.nn.Module):  # a patch grid, but no patch tokens to drop before the blocks
        num_features = 32

        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 32, 8, 8)

        def forward_features(self, x):
            return self.stem(x)

    bb = with_vision(freeze(VisionEncoder(Conv(), 64, (0.5,) * 3, (0.5,) * 3)))
    assert not bb.vision.can_drop_patches()
    with pytest.raises(ValueError, match="where = 'bridge' drops the tokens after the encoder"):
        flip(bb)
    assert flip(bb, where="bridge").train().training_loss(_batch(), Stage("train", 1)).tokens_to_llm == 32


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
