"""BLIP-2: the attention masks of each objective, hard negatives, and what each stage touches."""

from __future__ import annotations

import torch

from conftest import random_backbones
from vlp_bench.methods.blip2 import Blip2, Blip2OneStage, hard_negatives
from vlp_bench.nn.qformer import attention_mask


def small(cls=Blip2, **kw):
    torch.manual_seed(0)
    return cls(cls.Config(width=32, heads=2, depth=2, num_queries=2, embed_dim=16, **kw), random_backbones())


def batch():
    g = torch.Generator().manual_seed(1)
    return {"images": torch.randn(3, 3, 64, 64, generator=g), "prompt": "a photo of",
            "captions": ["a red circle", "two green stars left of a blue square", "a square"]}


VALID = torch.tensor([[True, True, False]])  # 3 text positions, the last one padding
T, F_ = True, False


def test_itc_text_pass_sees_only_valid_text():
    m = attention_mask(0, VALID, "text")[0, 0]
    assert m.tolist() == [[T, T, F_]] * 3


def test_itm_mask_is_full_attention_over_queries_and_valid_text():
    m = attention_mask(2, VALID, "itm")[0, 0]
    assert m.tolist() == [[T, T, T, T, F_]] * 5


def test_itg_mask_queries_see_queries_text_sees_queries_and_earlier_text():
    m = attention_mask(2, VALID, "itg")[0, 0]
    assert m.tolist() == [
        [T, T, F_, F_, F_],  # query 0: queries only
        [T, T, F_, F_, F_],  # query 1
        [T, T, T, F_, F_],  # text 0 ([DEC]): queries + itself
        [T, T, T, T, F_],  # text 1: queries + text 0..1
        [T, T, T, T, F_],  # text 2 (padding): never attended to
    ]
    assert attention_mask(2, VALID, "queries") is None


def test_hard_negatives_come_from_other_pairs_in_proportion_to_similarity():
    torch.manual_seed(0)
    sim = torch.tensor([[9.0, 5.0, 0.0], [5.0, 9.0, 0.0], [0.0, 3.0, 9.0]])
    draws = [hard_negatives(sim) for _ in range(300)]
    neg_text = torch.stack([d[0] for d in draws])  # (300, 3): a text for each image
    neg_image = torch.stack([d[1] for d in draws])
    for i in range(3):
        assert (neg_text[:, i] != i).all() and (neg_image[:, i] != i).all()
    assert (neg_text[:, 0] == 1).float().mean() > 0.95  # text 1 is by far image 0's most similar other text
    assert (neg_image[:, 1] == 0).float().mean() > 0.85  # image 0 (5.0) beats image 2 (3.0) for text 1


def _calls(module):
    count = []
    module.register_forward_hook(lambda *a: count.append(1))
    return count


def test_stage1_touches_no_llm_and_stage2_no_stage1_heads():
    m = small()
    m.train()
    llm, proj = _calls(m.llm), _calls(m.llm_proj)
    heads = [_calls(h) for h in (m.vision_proj, m.text_proj, m.itm_head, m.itg_head)]
    s1, s2 = m.stages(8)
    assert (s1.name, s1.steps, s2.name, s2.steps) == ("stage1", 6, "stage2", 2)
    out = m.training_loss(batch(), s1)
    out.loss.backward()
    assert not llm and not proj and all(heads) and out.tokens_to_llm == 0
    assert m.llm_proj.weight.grad is None and m.temp.grad is not None
    for h in heads:
        h.clear()
    m.zero_grad(set_to_none=True)
    out = m.training_loss(batch(), s2)
    out.loss.backward()
    assert llm and proj and not any(heads) and out.tokens_to_llm == 2
    assert m.itm_head.weight.grad is None and m.temp.grad is None
    stage1_params = {id(p) for p in m.trainable_parameters(s1)}
    assert id(m.llm_proj.weight) not in stage1_params
    assert id(m.itm_head.weight) not in {id(p) for p in m.trainable_parameters(s2)}


def test_one_stage_ablation_has_only_stage2():
    stages = small(Blip2OneStage).stages(10)
    assert [(s.name, s.steps) for s in stages] == [("stage2", 10)]
