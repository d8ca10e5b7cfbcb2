"""Token merging (vlp_bench/nn/merging.py) and the simvlg method built on it."""

from __future__ import annotations


import pytest
import torch

from conftest import random_backbones
from vlp_bench.typed import from_dict
from vlp_bench.errors import UserError
from vlp_bench.nn.layers import Attention
from vlp_bench.nn.merging import (TokenMerger, apply_merge, bipartite_soft_matching, curriculum_scale,
                               layer_schedule, token_counts, track_sources)
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
    assert (plan.src != 0).all()  # A index 0 = position 0 = CLS is never a source
    out = apply_merge(x, plan, "mean")
    assert out.shape == (2, 5, 8)
    assert torch.equal(out[:, 0], x[:, 0])  # CLS first and untouched


def test_r_is_clamped_to_half_the_mergeable_tokens():
    assert token_counts(9, [10, 10, 10]) == [9, 5, 3, 2]
    x = tokens(T=9)
    plan = bipartite_soft_matching(x, r=100)
    assert plan.src.shape[1] == 4 and apply_merge(x, plan, "sum").shape[1] == 5
    assert bipartite_soft_matching(x[:, :2], r=1) is None  # CLS + 1 token: nothing to merge


def test_merging_the_most_similar_pair():
    x = torch.eye(7).unsqueeze(0)  # orthogonal tokens ...
    x[0, 4] = x[0, 3]  # ... except positions 4 (in A, even) and 3 (in B, odd), identical
    plan = bipartite_soft_matching(x, r=1)
    assert plan.src.flatten().tolist() == [2] and plan.dst.flatten().tolist() == [1]  # A[2] = pos 4 -> B[1] = pos 3


# ToMe's two token layouts generalised (tome/merge.py bipartite_soft_matching): the first p tokens are
# A's first ceil(p/2) and B's first floor(p/2); the output starts with them, in their input order.


@pytest.mark.parametrize("variant", ["tome", "evlgen"])
@pytest.mark.parametrize("p", [0, 1, 2, 5])
def test_protected_tokens_come_out_first_unchanged_over_several_layers(p, variant):
    T = 23
    x = tokens(B=2, T=T, D=6, seed=3)
    x[:, :p] = x[:, p : 2 * p]  # each protected token duplicates a mergeable one: its best possible match
    with track_sources() as found:
        merger = TokenMerger(x, variant, protected=p)
    out = x
    for r in (4, 4, 3, 100):  # the last one clamped to (t - p) // 2
        out = merger(out, out.unsqueeze(1), r)  # the tokens themselves as the keys (one head)
    # 23 -> 19 -> 15 -> 12 -> 12 - (12 - p) // 2: p=0: 6, p=1: 7 (11 // 2 = 5), p=2: 7, p=5: 9 (7 // 2 = 3)
    assert merger.counts == [23, 19, 15, 12, {0: 6, 1: 7, 2: 7, 5: 9}[p]]
    assert torch.equal(out[:, :p], x[:, :p])  # exactly the protected inputs, in their order
    assert torch.equal(merger.size[:, :p], torch.ones(2, p, 1))
    assert found == [merger] and torch.equal(merger.source[:, :p], torch.eye(T)[:p].expand(2, -1, -1))  # itself only
    assert merger.size.sum(1).flatten().tolist() == [float(T)] * 2  # the rest holds every other token
    assert torch.equal(merger.size[..., 0], merger.source.sum(-1))


def test_two_protected_tokens_in_tomes_order_on_a_hand_built_case():
    """p = 2 (ToMe's class + distillation token): [cls, dist, other kept A, other B]."""
    e = torch.eye(4)
    # positions 0..5: A = 0, 2, 4; B = 1, 3, 5. Position 2 is closest to position 1 (the protected
    # B token: cosine 1 / sqrt(1.25) = 0.89), then to 5 (0.5 / sqrt(1.25) = 0.45); 4 equals 3 (1.0)
    metric = torch.stack([e[0], e[1], e[1] + 0.5 * e[3], e[2], e[2], e[3]])[None]
    x = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 60.0]).view(1, 6, 1)
    one = bipartite_soft_matching(metric, r=1, protected=2)  # 4 -> 3 (score 1.0 beats 0.45)
    assert apply_merge(x, one, "mean").flatten().tolist() == [10, 20, 30, 45, 60]  # (40 + 50) / 2 = 45
    two = bipartite_soft_matching(metric, r=2, protected=2)  # and 2 -> 5, not into the protected 1
    assert apply_merge(x, two, "mean").flatten().tolist() == [10, 20, 45, 45]  # (60 + 30) / 2 = 45
    assert bipartite_soft_matching(metric, r=9, protected=2).src.shape[1] == 2  # (6 - 2) // 2


def score_metric(cosines):
    """A metric whose A token i (position 2i) has cosine cosines[i] with B token i (position 2i + 1),
    0 with every other B token: B token i = e_i, A token i = c e_i + sqrt(1 - c^2) e_n."""
    n = len(cosines)
    e = torch.eye(n + 1)
    rows = []
    for i, c in enumerate(cosines):
        rows += [c * e[i] + (1 - c * c) ** 0.5 * e[n], e[i]]
    return torch.stack(rows)[None]


def test_without_protected_tokens_the_kept_tokens_stay_in_score_order():
    """ToMe sorts the kept A tokens back into position order only when there is a class token."""
    metric = score_metric([0.2, 0.9, 0.5, 0.7])  # A = positions 0, 2, 4, 6; B = 1, 3, 5, 7
    x = torch.arange(8.0).mul(10).view(1, 8, 1)  # token at position i holds 10 i
    # r = 1: position 2 (0.9) merges into 3: (20 + 30) / 2 = 25
    # p = 0: kept A by descending score: 6 (0.7), 4 (0.5), 0 (0.2); then B: 1, 3 (merged), 5, 7
    plan = bipartite_soft_matching(metric, r=1, protected=0)
    assert apply_merge(x, plan, "mean").flatten().tolist() == [60, 40, 0, 10, 25, 50, 70]
    # p = 1: position 0 protected, the other kept A back in position order: 4, 6
    plan = bipartite_soft_matching(metric, r=1, protected=1)
    assert apply_merge(x, plan, "mean").flatten().tolist() == [0, 40, 60, 10, 25, 50, 70]
    # r = 2, p = 0: 2 (0.9) -> 3 and 6 (0.7) -> 7: (60 + 70) / 2 = 65; kept 4 (0.5), then 0 (0.2)
    plan = bipartite_soft_matching(metric, r=2, protected=0)
    assert apply_merge(x, plan, "mean").flatten().tolist() == [40, 0, 10, 25, 50, 65]


def test_equal_scores_go_in_position_order():
    """The score sort is stable: among equal scores the earlier A token merges first and the kept
    ones stay in position order, so the plan does not depend on the sort kernel."""
    metric = score_metric([0.5, 0.5, 0.5, 0.5])
    plan = bipartite_soft_matching(metric, r=1, protected=0)
    assert plan.src.flatten().tolist() == [0] and plan.kept.flatten().tolist() == [1, 2, 3]


@pytest.mark.parametrize("variant, expected", [
    ("evlgen", 6.75),  # plain mean of the two tokens merged in layer 2: (9 + 4.5) / 2
    ("tome", 6.0),  # size-weighted: (1 x 9 + 2 x 4.5) / 3 = 6 = (3 + 6 + 9) / 3, the three inputs' mean
])
def test_evlgen_merges_by_plain_mean_and_tome_by_size_weighted_mean(variant, expected):
    e = torch.eye(4)
    x = torch.tensor([0.0, 3.0, 6.0, 100.0, 9.0]).view(1, 5, 1)
    merger = TokenMerger(x, variant)  # CLS protected
    # layer 1, positions 0..4 (A = 0, 2, 4; B = 1, 3): 2 equals 1 (cosine 1), 4 is 0.6 from 3, r = 1:
    # 2 -> 1, giving [CLS 0, pos 4: 9, pos 1+2: (3 + 6) / 2 = 4.5 (size 2), pos 3: 100]
    keys = torch.stack([e[0], e[1], e[1], e[2], 0.6 * e[2] + 0.8 * e[3]]).view(1, 1, 5, 4)
    x = merger(x, keys, 1)
    assert x.flatten().tolist() == [0.0, 9.0, 4.5, 100.0] and merger.size.flatten().tolist() == [1, 1, 2, 1]
    # layer 2, positions 0..3 (A = 0, 2; B = 1, 3): 2 (the merged pair) equals 1 (the 9), r = 1
    keys = torch.stack([e[0], e[1], e[1], e[2]]).view(1, 1, 4, 4)
    x = merger(x, keys, 1)
    assert x.flatten().tolist() == [0.0, expected, 100.0] and merger.size.flatten().tolist() == [1, 3, 1]


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


# ToMe's parse_r (tome/utils.py): first = int(r (1 - inflection)), last = 2r - first, layer i merges
# int(first + i (last - first) / (depth - 1)). The old round() gave the numbers in brackets.
RAMP_19 = [38, 34, 31, 27, 24, 20, 17, 13, 10, 6, 3, 0]  # 38 - 3.4545 i, truncated (round: 38, 35, 31, 28, ...)
RAMP_8 = [16, 15, 14, 13, 13, 12, 11, 11, 10, 9, 9, 8, 7, 6, 6, 5, 4, 4, 3, 2, 2, 1, 0, 0]  # 16 - 0.69565 i


@pytest.mark.parametrize("spec, depth, expected", [
    ([19, -1], 12, RAMP_19),  # sum 223 (round: 228)
    ([8, -1], 24, RAMP_8),  # sum 181 (round: 192)
    ([10, 0.5], 4, [5, 8, 11, 15]),  # 5 + 3.333 i: 5, 8.33, 11.67, 15 (round: 5, 8, 12, 15)
    ([5, 0.3], 4, [3, 4, 5, 7]),  # first = int(5 x 0.7 = 3.5) = 3, last 7, 3 + 1.333 i (round: 4, 4, 6, 6)
    ([15, 1], 12, [0, 2, 5, 8, 10, 13, 16, 19, 21, 24, 27, 29]),  # 0 + 2.7273 x 11 = 29.999999999999996 -> 29, as ToMe
    ([21, -1], 20, [42, 39, 37, 35, 33, 30, 28, 26, 24, 22, 19, 17, 15, 13, 11, 8, 6, 4, 2, 0]),  # last: -7e-15 -> 0
    (7, 3, [7, 7, 7]),
    ([5, 0, 3], 3, [5, 0, 3]),  # an explicit list, as given
])
def test_layer_schedule_has_tomes_numbers(spec, depth, expected):
    assert layer_schedule(spec, depth) == expected


@pytest.mark.parametrize("spec, depth, n, expected", [
    ([19, -1], 12, 257, 34),  # 257 - 223 (round: 257 - 228 = 29); no layer reaches the clamp
    ([8, -1], 24, 257, 76),  # 257 - 181 (round: 257 - 192 = 65); the clamp never binds
    ([10, 0.5], 4, 65, 26),  # 65 - 5 - 8 - 11 - 15; the last layer's clamp (41 - 1) // 2 = 20 >= 15
    (19, 12, 257, 29),  # the paper's constant r: 257 - 12 x 19
    ([5, 0, 3], 3, 65, 57),  # 65 - 5 - 0 - 3
])
def test_token_counts_of_tomes_schedules(spec, depth, n, expected):
    assert token_counts(n, layer_schedule(spec, depth))[-1] == expected


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
    base, sim = small(Baseline).eval(), small(SimVLG, r=0).eval()  # eval: the bridge's dropout off
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
    assert all(p.grad is not None for p in sim.layers.parameters())
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
