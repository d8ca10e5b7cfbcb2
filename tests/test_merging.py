"""Token merging (vlp_bench/nn/merging.py) and the simvlg method built on it."""

from __future__ import annotations


import pytest
import torch

from conftest import random_backbones
from vlp_bench.typed import from_dict
from vlp_bench.errors import UserError
from vlp_bench.nn.layers import Attention
from vlp_bench.nn.merging import (TokenMerger, apply_merge, bipartite_soft_matching, curriculum_scale,
                               layer_schedule, token_counts)
from vlp_bench.methods.baseline import Baseline
from vlp_bench.methods.simvlg import PAPER, PAPER_INPUT_TOKENS, SimVLG, SimVLGConfig


def tokens(B=2, T=9, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g)


# ----------------------------------------------------------------------------- one merge


@pytest.mark.parametrize("variant", ["tome", "evlgen"])
def test_merge_conserves_total_size_and_tome_conserves_the_weighted_mean(variant):
    x = tokens(T=11)
    merger = TokenMerger(x, variant)
    keys = tokens(B=2, T=11, D=4, seed=1).view(2, 1, 11, 4).expand(2, 2, 11, 4)
    for r in (3, 2):
        before_mean = (x * merger.size).sum(1) / merger.size.sum(1)
        x = merger(x, keys[:, :, : x.shape[1]], r)
        assert merger.size.sum(1).flatten().tolist() == [11.0, 11.0]  # every patch is still counted once
        if variant == "tome":
            assert torch.allclose((x * merger.size).sum(1) / merger.size.sum(1), before_mean, atol=1e-6)
    assert merger.counts == [11, 8, 6]


def test_cls_stays_first_and_is_never_merged():
    x = tokens(T=9)
    x[:, 0] = x[:, 2]  # CLS identical to another token: the best possible match, still protected
    metric = x.clone()
    plan = bipartite_soft_matching(metric, r=4)
    kept, src, dst = plan
    assert (src != 0).all()  # A index 0 = position 0 = CLS is never a source
    out = apply_merge(x, plan, "mean")
    assert out.shape == (2, 5, 8)
    assert torch.equal(out[:, 0], x[:, 0])  # CLS first and untouched


def test_r_is_clamped_to_half_the_mergeable_tokens():
    assert token_counts(9, [10, 10, 10]) == [9, 5, 3, 2]
    x = tokens(T=9)
    kept, src, dst = bipartite_soft_matching(x, r=100)
    assert src.shape[1] == 4 and apply_merge(x, (kept, src, dst), "sum").shape[1] == 5
    assert bipartite_soft_matching(x[:, :2], r=1) is None  # CLS + 1 token: nothing to merge


def test_merging_the_most_similar_pair():
    x = torch.eye(7).unsqueeze(0)  # orthogonal tokens ...
    x[0, 4] = x[0, 3]  # ... except positions 4 (in A, even) and 3 (in B, odd), identical
    kept, src, dst = bipartite_soft_matching(x, r=1)
    assert src.flatten().tolist() == [2] and dst.flatten().tolist() == [1]  # A[2] = pos 4 -> B[1] = pos 3


def test_batch_elements_do_not_interact():
    x = tokens(B=3, T=13)
    keys = tokens(B=3, T=13, D=4, seed=2).unsqueeze(1)
    together = TokenMerger(x)(x, keys, 4)
    for i in range(3):
        alone = TokenMerger(x[i : i + 1])(x[i : i + 1], keys[i : i + 1], 4)
        assert torch.allclose(together[i : i + 1], alone, atol=1e-6)


def test_proportional_attention_equals_attention_over_duplicated_tokens():
    """A token of size s behaves like s copies of itself."""
    torch.manual_seed(0)
    attn = Attention(8, 2)
    x = tokens(B=1, T=4)
    sizes = torch.tensor([1.0, 3.0, 1.0, 2.0])
    bias = sizes.log().view(1, 1, 1, 4)
    out, _ = attn(x, bias)
    dup = x.repeat_interleave(sizes.long(), dim=1)  # (1, 7, 8)
    out_dup, _ = attn(dup, None)
    first = torch.tensor([0, 1, 4, 5])  # position of each original token among the copies
    assert torch.allclose(out, out_dup[:, first], atol=1e-6)


# ----------------------------------------------------------------------------- schedule grammar


@pytest.mark.parametrize("spec, depth, expected", [
    (3, 4, [3, 3, 3, 3]),
    ([4, -1], 5, [8, 6, 4, 2, 0]),  # decreasing: 2r first, 0 last
    ([4, 1], 5, [0, 2, 4, 6, 8]),
    ([4, 0.0], 3, [4, 4, 4]),
    ([4, 1.0], 2, [0, 8]),  # a float inflection is a ramp even for 2 layers
    ([3, 5], 2, [3, 5]),  # ... and two ints for 2 layers are a per-layer list
    ([1, 2, 3], 3, [1, 2, 3]),
])
def test_layer_schedule(spec, depth, expected):
    assert layer_schedule(spec, depth) == expected


@pytest.mark.parametrize("spec, message", [
    (-1, "r must be >= 0"), ([1, 2, 3], "lists 3 values for 2 layers"), ([1, -2], "ints >= 0"),
    ([-3, 0.5], "r must be >= 0"), (True, "an int or a list"),
])
def test_bad_schedules_are_config_errors(spec, message):
    with pytest.raises(UserError, match=message):
        from_dict(SimVLGConfig, {"r": spec, "depth": 2}, "methods.simvlg")


def test_schedule_removing_more_tokens_than_exist_fails_before_training():
    with pytest.raises(ValueError, match="removes 64 tokens but the vision encoder gives 65"):
        SimVLG.check(SimVLGConfig(r=32, depth=2), random_backbones())


def test_curriculum_scale():
    assert curriculum_scale(0.0, 0.0, 0.5) == 0.0
    assert curriculum_scale(0.25, 0.0, 0.5) == 0.5
    assert curriculum_scale(0.7, 0.0, 0.5) == 1.0
    assert curriculum_scale(0.0, 2.0, 0.5) == 2.0  # the reverse: merge more early
    assert curriculum_scale(0.3, 1.0, 0.0) == 1.0


def test_paper_configuration_sends_29_tokens():
    counts = token_counts(PAPER_INPUT_TOKENS, layer_schedule(PAPER.r, PAPER.depth))
    assert counts[-1] == 29 and len(counts) == 13 and counts[1] == 238


# ----------------------------------------------------------------------------- the method


def small(cls, **kw):
    torch.manual_seed(0)
    cfg_cls = cls.Config
    return cls(cfg_cls(width=32, heads=2, **kw), random_backbones())


def test_r_zero_equals_the_baseline():
    base, sim = small(Baseline), small(SimVLG, r=0)
    sim.load_state_dict(base.state_dict())
    v = tokens(B=2, T=65, D=32)
    assert torch.equal(base.bridge(v), sim.bridge(v))


@pytest.mark.parametrize("variant", ["tome", "evlgen"])
def test_token_counts_follow_the_schedule_and_gradients_reach_the_bridge(variant):
    sim = small(SimVLG, r=[10, 0.5], depth=3, variant=variant)
    assert sim.schedule == [5, 10, 15]
    v = tokens(B=2, T=65, D=32)
    out = sim.bridge(v)
    assert out.shape[1] == 65 - 30 and sim.info()["tokens_per_layer"] == [65, 60, 50, 35]
    out.sum().backward()
    assert all(p.grad is not None for p in sim.blocks.parameters())
    assert sim.inp.weight.grad.abs().sum() > 0


def test_variants_differ_only_after_a_merge():
    tome, evl = small(SimVLG, r=8, variant="tome"), small(SimVLG, r=8, variant="evlgen")
    evl.load_state_dict(tome.state_dict())
    v = tokens(B=1, T=65, D=32)
    assert not torch.allclose(tome.bridge(v), evl.bridge(v))


def test_curriculum_applies_in_training_only():
    sim = small(SimVLG, r=10, curriculum_start=0.0, curriculum_ramp=0.5)
    v = tokens(B=1, T=65, D=32)
    sim.train()
    sim.set_progress(0.0)
    assert sim.bridge(v).shape[1] == 65  # no merging at the start
    sim.set_progress(0.25)
    assert sim.bridge(v).shape[1] == 65 - 10
    sim.eval()
    assert sim.bridge(v).shape[1] == 65 - 20  # inference always uses the full schedule


@pytest.mark.parametrize("name", ["simvlg", "tome-vit", "simvlg+tome-vit"])
def test_source_tracking_partitions_the_patches_and_changes_nothing(name):
    """ToMe's source tracking (the report's picture): each token reaching the LLM holds a disjoint
    set of input tokens, their number is the token's size, and tracking leaves the output unchanged."""
    from vlp_bench.nn.merging import token_groups, track_sources
    from vlp_bench.registry import METHODS

    cls = METHODS.get(name)
    method = cls(from_dict(cls.Config, {"width": 32, "heads": 2}), random_backbones()).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = method.visual_prefix(images)
        with track_sources() as mergers:
            tracked = method.visual_prefix(images)
    assert torch.equal(plain, tracked) and mergers
    for m in mergers:  # every input token sits in exactly one output token, whose size counts them
        assert torch.equal(m.source.sum(dim=1), torch.ones(2, m.source.shape[-1]))
        assert torch.equal(m.source.sum(dim=-1), m.size[..., 0])
    groups = token_groups(mergers)
    assert groups.shape == (2, 65) and (groups[:, 0] == 0).all()  # CLS alone, first
    for b in range(2):  # every token that reaches the LLM holds at least one patch
        assert groups[b].unique().tolist() == list(range(plain.shape[1]))
    baseline = Baseline(from_dict(Baseline.Config, {"width": 32, "heads": 2}), random_backbones()).eval()
    with torch.no_grad(), track_sources() as none:
        baseline.visual_prefix(images)
    assert none == []  # nothing merged, nothing tracked
