"""ToMe inside the frozen ViT, and "bridge+side" compositions built from the registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import random_backbones
from test_e2e import cli
from test_methods import _batch
from vlp_bench.errors import UserError
from vlp_bench.experiment import load_config
from vlp_bench.nn.merging import layer_schedule, token_counts
from vlp_bench.method import Stage
from vlp_bench.registry import METHODS
from vlp_bench.train.flops import count_step

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def build(name, **changes):
    torch.manual_seed(0)
    cls = METHODS.get(name)
    cfg = dataclasses.replace(cls.Config(), width=32, heads=2, **changes)
    bb = random_backbones()
    cls.check(cfg, bb)
    return cls(cfg, bb)


def test_merging_nothing_inside_the_vit_reproduces_its_blocks():
    vision = random_backbones().vision
    images = _batch()["images"]
    with torch.no_grad():
        assert torch.allclose(vision(images, merge=([0], "tome")), vision(images), atol=1e-5)


@pytest.mark.parametrize("variant", ["tome", "evlgen"])
def test_tome_vit_hands_the_bridge_fewer_tokens_and_saves_the_encoder(variant):
    method = build("tome-vit", vit_r=20, vit_variant=variant).train()
    expected = token_counts(65, [20], 1)[-1]  # the random backbones' ViT has one block
    assert expected == 45 == method.input_tokens(method.cfg, method.vision)
    for stage in (Stage("train", 1), None):  # merged in training and in evaluation alike
        assert method.encode(_batch()["images"], stage).shape[1] == expected
    got = count_step(method, _batch(), Stage("train", 1), NO_AUTOCAST)[0].by_part
    base = count_step(build("baseline"), _batch(), Stage("train", 1), NO_AUTOCAST)[0].by_part
    assert got["vision"]["forward"] < base["vision"]["forward"] and got["llm"]["forward"] < base["llm"]["forward"]
    assert method.info()["tokens_to_llm"] == expected


def test_simvlg_plus_tome_vit_merges_in_both():
    method = build("simvlg+tome-vit", vit_r=10, r=5, depth=2)
    into_bridge = token_counts(65, [10], 1)[-1]
    to_llm = token_counts(into_bridge, layer_schedule(5, 2))[-1]
    assert method.training_loss(_batch(), Stage("train", 1)).tokens_to_llm == to_llm == 45
    info = method.info()
    assert info["tokens_per_layer"][0] == into_bridge and info["tokens_to_llm"] == to_llm
    assert info["vit_merge_schedule"] == [10]


def test_simvlg_plus_flip_masks_in_training_only():
    method = build("simvlg+flip", mask_ratio=0.5, r=4, depth=2).train()
    assert method.training_loss(_batch(), Stage("train", 1)).tokens_to_llm == 33 - 8  # 1 + 32 kept, 2 x 4 merged
    method.eval()
    assert method.visual_prefix(_batch()["images"]).shape[1] == 65 - 8


@pytest.mark.parametrize("name, message", [
    ("simvlg+blip2", "'blip2' is not a vision-side method"),
    ("tome-vit+simvlg", "the first part must be a frozen-LLM bridge method"),
    ("simvlg+tome-vit+flip", "exactly two parts"),
    ("simvlg+tomevit", "did you mean 'tome-vit'"),
])
def test_impossible_compositions_are_clear_errors(name, message):
    with pytest.raises(UserError, match=message):
        METHODS.get(name)


@pytest.mark.parametrize("name, message", [("pool+flip", "no patch grid"), ("pool+tome-vit", "square patch grid")])
def test_bridges_that_need_the_patch_grid_refuse_sides_that_break_it(name, message):
    cls = METHODS.get(name)
    with pytest.raises(ValueError, match=message):
        cls.check(cls.Config(), random_backbones())


def test_a_composition_starts_from_its_parts_as_configured():
    cfg = load_config(None, ["methods.baseline.depth=3", "methods.tome-vit.vit_r=4", "methods.tome-vit.depth=1",
                             "experiment.methods=['baseline+tome-vit', 'simvlg+tome-vit']",
                             "methods.simvlg+tome-vit.vit_r=2"])
    on_demand = cfg.methods["baseline+tome-vit"]
    assert (on_demand.depth, on_demand.vit_r) == (3, 4)  # the bridge's settings, the side's own ones
    assert cfg.methods["simvlg+tome-vit"].vit_r == 2  # its own table wins
    assert cfg.methods["simvlg+tome-vit"].r == 4 != cfg.methods["simvlg"].r  # the pair's own default
    assert cfg.methods["simvlg+tome-vit"].width == cfg.methods["simvlg"].width  # the rest from its parts


@pytest.mark.slow
def test_paper_scale_cost_of_a_composition():
    import json

    proc = cli("flops", "--preset", "paper", "--methods", "flip,simvlg+flip", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout)["methods"]
    # half of ViT-g's 256 patches dropped at the encoder's input: it, the bridge and the LLM see 1 + 128 tokens
    assert m["flip"]["per_sample"]["llm"]["forward"] < 0.6 * m["baseline"]["per_sample"]["llm"]["forward"]
    vision, full = m["flip"]["per_sample"]["vision"]["forward"], m["baseline"]["per_sample"]["vision"]["forward"]
    assert 0.45 * full < vision < 129 / 257 * full  # attention grows with the square of the tokens
    assert m["simvlg+flip"]["total"] < m["flip"]["total"]
    eva = cli("flops", "--preset", "paper", "--methods", "tome-vit")
    assert eva.returncode == 2 and "needs a timm VisionTransformer, not Eva" in eva.stderr


def test_compositions_built_on_demand_are_usable_but_not_listed():
    listed = METHODS.names()
    assert {"simvlg+tome-vit", "simvlg+flip"} <= set(listed)  # the registered ones
    cls = METHODS.get("mlp+tome-vit")
    assert cls.name == "mlp+tome-vit" and cls is METHODS.get("mlp+tome-vit") and "mlp+tome-vit" in METHODS
    assert METHODS.names() == listed
