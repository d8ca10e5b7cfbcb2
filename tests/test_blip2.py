"""BLIP-2 as LAVIS trains it: the attention masks of each objective, hard negatives, what each stage
touches, one query pass shared by ITC and ITG, label smoothing, the fixed text length, and the
Q-Former's start from a BERT checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import random_backbones
from vlp_bench.errors import UserError
from vlp_bench.methods.blip2 import Blip2, Blip2OneStage, hard_negatives
from vlp_bench.nn.qformer import attention_mask, itg_text_mask
from vlp_bench.train import dist
from vlp_bench.train.flops import count_step
from vlp_bench.typed import from_dict


def small(cls=Blip2, backbones=None, **kw):
    torch.manual_seed(0)
    return cls(cls.Config(**{"width": 32, "heads": 2, "depth": 2, "num_queries": 2, "embed_dim": 16, **kw}),
               backbones or random_backbones())


CAPTIONS = ["a red circle", "two green stars left of a blue square", "a square"]


def batch():
    g = torch.Generator().manual_seed(1)
    return {"images": torch.randn(3, 3, 64, 64, generator=g), "prompt": "a photo of", "captions": list(CAPTIONS)}


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
    assert itg_text_mask(2, VALID)[0, 0].tolist() == m[2:].tolist()  # the text-only pass's rows
    assert attention_mask(2, VALID, "queries") is None


def test_hard_negatives_come_from_other_pairs_in_proportion_to_similarity():
    torch.manual_seed(0)
    sim = torch.tensor([[9.0, 5.0, 0.0], [5.0, 9.0, 0.0], [0.0, 3.0, 9.0]])
    draws = [hard_negatives(sim, sim.t()) for _ in range(300)]
    neg_text = torch.stack([d[0] for d in draws])  # (300, 3): a text for each image
    neg_image = torch.stack([d[1] for d in draws])
    for i in range(3):
        assert (neg_text[:, i] != i).all() and (neg_image[:, i] != i).all()
    assert (neg_text[:, 0] == 1).float().mean() > 0.95  # text 1 is by far image 0's most similar other text
    assert (neg_image[:, 1] == 0).float().mean() > 0.85  # image 0 (5.0) beats image 2 (3.0) for text 1
    torch.manual_seed(5)
    again = hard_negatives(sim, sim.t())
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(again, hard_negatives(sim, sim.t())))  # deterministic


def test_hard_negatives_over_the_gathered_batch_skip_this_ranks_positives(monkeypatch):
    """Rank 1 of 2 with 2 pairs: its positives are columns 2 and 3 of the gathered batch."""
    monkeypatch.setattr(dist, "_GROUP", dist.Group(1, 2))
    torch.manual_seed(0)
    sim = torch.tensor([[0.0, 0.0, 30.0, 29.0], [0.0, 0.0, 29.0, 30.0]])  # the positives dominate
    for _ in range(50):
        neg_text, neg_image = hard_negatives(sim, sim)
        assert neg_text.tolist() == [3, 2] and neg_image.tolist() == [3, 2]  # the other rank-1 pair


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
    assert not llm and not proj and all(heads) and out.tokens_to_llm == 0 and out.weight is None
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


# ---------------------------------------------------------------------------- the Q-Former as BERT


def test_qformer_is_bert_with_queries_cross_attention_every_other_layer_and_no_final_norm():
    m = small(depth=4, cross_every=2)
    qf = m.qformer
    assert [layer.crossattention is not None for layer in qf.layer] == [True, False, True, False]
    assert all(layer.output_query is not None for layer in qf.layer)  # the queries' own FFN
    assert not hasattr(qf, "norm")  # post-LN: the last layer's LayerNorm is the output's
    assert qf.query_tokens.std().item() == pytest.approx(0.02, rel=0.5)
    w = qf.layer[0].attention.self.query.weight
    assert w.std().item() == pytest.approx(0.02, rel=0.2) and not qf.layer[0].attention.self.query.bias.any()
    assert qf.embeddings.position_embeddings.num_embeddings == m.cfg.max_text_len  # positions of the text only


class TwoQueryPasses(Blip2):
    """What ITG cost before: its own joint pass of queries and text (the "itg" mask), re-running the
    query stream (and its cross-attention) instead of reusing the ITC pass's keys and values."""

    def itm(self, image, *args, **kwargs):
        self._image = image
        return super().itm(image, *args, **kwargs)

    def itg(self, ids, valid, query_kv):
        dec = ids.clone()
        dec[:, 0] = self.text.dec_id
        Q = self.cfg.num_queries
        out, _ = self.qformer(context=self._image, ids=dec, mask=attention_mask(Q, valid, "itg"))
        return self.lm_loss(out[:, Q:], ids, valid)


def test_a_stage1_step_runs_the_query_stream_once_for_itc_and_itg():
    m = small(depth=4, cross_every=2)
    m.train()
    cross = [_calls(layer.crossattention) for layer in m.qformer.layer if layer.crossattention is not None]
    m.training_loss(batch(), m.stages(8)[0]).loss.backward()
    # ITC's query pass and ITM's joint pass; ITG runs the text alone, no cross-attention
    assert [len(c) for c in cross] == [2, 2]


def test_the_shared_query_pass_saves_one_query_stream_of_flops():
    """Running ITG with its own query pass costs exactly the query stream more, derived from the
    sizes: per layer, the queries' projections (q, k, v, out: 4 D x D), their rows of self-attention
    over Q + L keys, their FFN (D x 4D twice), and in cross layers the cross-attention (q and out
    projections of the queries, k and v of the N image tokens, the Q x N attention)."""
    bb = random_backbones()
    shared, twice = small(backbones=bb), small(TwoQueryPasses, backbones=bb)
    B, Q, D, L, depth = 3, 2, 32, shared.cfg.max_text_len, 2
    N, Dv = bb.vision.num_tokens, bb.vision.dim
    cross_layers = 1  # layer 0 of 2 (cross_every = 2)
    linear = depth * (4 * 2 * B * Q * D * D + 2 * 2 * B * Q * D * 4 * D) \
        + cross_layers * (2 * 2 * B * Q * D * D + 2 * 2 * B * N * Dv * D)
    attention = depth * 2 * 2 * B * Q * (Q + L) * D + cross_layers * 2 * 2 * B * Q * N * D
    got = {}
    for m in (shared, twice):
        m.eval()  # no dropout: both run the same attention kernels
        got[type(m)] = count_step(m, batch(), m.stages(8)[0], contextlib.nullcontext())[0].by_part["bridge"]
    saved = {p: got[TwoQueryPasses][p] - got[Blip2][p] for p in ("forward", "backward")}
    assert saved["forward"] == linear + attention
    # backward: 2x the products of every linear layer (weights and inputs); attention 2x unfused,
    # 2.5x as a fused kernel (the scores recomputed), whichever the CPU runs
    assert saved["backward"] in (2 * linear + 2 * attention, 2 * linear + 5 * attention // 2)
    assert saved["forward"] > 0.04 * got[Blip2]["forward"]  # not a rounding error


def test_itg_text_pass_equals_the_joint_pass_on_the_text_positions():
    m = small(depth=3, cross_every=2).double().eval()
    b = batch()
    ids, valid = m.text(b["captions"], m.cfg.max_text_len)
    image = m.qformer.ln_vision(m.encode(b["images"].double()).double())
    _, kv = m.qformer(context=image)
    dec = ids.clone()
    dec[:, 0] = m.text.dec_id
    Q = m.cfg.num_queries
    alone, _ = m.qformer(ids=dec, mask=itg_text_mask(Q, valid), past=kv)
    joint, _ = m.qformer(context=image, ids=dec, mask=attention_mask(Q, valid, "itg"))
    assert (alone - joint[:, Q:]).abs().max().item() < 1e-12


def test_itg_gradient_reaches_the_query_pass_through_the_reused_keys_and_values():
    m = small().train()
    b = batch()
    ids, valid = m.text(b["captions"], m.cfg.max_text_len)
    _, kv = m.qformer(context=m.qformer.ln_vision(m.encode(b["images"])))
    m.itg(ids, valid, kv).backward()
    assert m.qformer.query_tokens.grad.abs().sum() > 0
    assert m.qformer.layer[0].crossattention.self.key.weight.grad.abs().sum() > 0


def _smoothed(logits: torch.Tensor, target: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Cross-entropy with label smoothing, written out: (1 - eps) NLL + eps x mean over classes of -log p."""
    logp = logits.double().log_softmax(-1)
    keep = target != -100
    logp, target = logp[keep], target[keep]
    return (-(1 - eps) * logp.gather(1, target[:, None]).squeeze(1) - eps * logp.mean(-1)).mean()


def test_itc_and_itg_use_label_smoothing_01():
    m = small().eval()
    b = batch()
    ids, valid = m.text(b["captions"], m.cfg.max_text_len)
    image = m.qformer.ln_vision(m.encode(b["images"]))
    queries, kv = m.qformer(context=image)
    img = F.normalize(m.vision_proj(queries), dim=-1)
    txt = F.normalize(m.text_proj(m.qformer(ids=ids, mask=attention_mask(0, valid, "text"))[0][:, 0]), dim=-1)
    loss, sim_i2t, sim_t2i = m.itc(img, txt)
    target = torch.arange(3)
    assert loss.item() == pytest.approx(((_smoothed(sim_i2t, target) + _smoothed(sim_t2i, target)) / 2).item(), rel=1e-5)
    logits = []
    m.itg_head.register_forward_hook(lambda mod, args, out: logits.append(out))
    itg = m.itg(ids, valid, kv)
    target = ids[:, 1:].masked_fill(~valid[:, 1:], -100)
    assert itg.item() == pytest.approx(_smoothed(logits[0].flatten(0, 1), target.flatten()).item(), rel=1e-5)


def test_stage1_text_is_padded_to_max_text_len_and_truncation_keeps_the_end_token():
    m = small(max_text_len=6)
    ids, valid = m.text(["a", "two green stars left of a blue square and a red circle"], 6)
    assert ids.shape == valid.shape == (2, 6)
    assert ids[:, 0].tolist() == [m.text.cls_id] * 2
    eos = m.tokenizer.eos_token_id
    assert valid[0].tolist() == [True] * 3 + [False] * 3 and ids[0, 2] == eos  # [CLS] a [EOS] padding
    assert valid[1].all() and ids[1, -1] == eos  # cut before the end token, which stays
    keys = {m.shape_key({"captions": c, "prompt": "", "images": None}, m.stages(8)[0]) for c in (["a"], CAPTIONS)}
    assert keys == {6}


# ---------------------------------------------------------------------------- starting from BERT


WORDS = ["a", "red", "green", "blue", "circle", "square", "star", "stars", "two", "left", "of"]


def _bert_dir(tmp_path, width=32, heads=2, layers=3):
    """A tiny BERT (BertModel and a BertTokenizer on a word list) saved as a Hugging Face directory."""
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizer(str(vocab))
    torch.manual_seed(7)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=width, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=4 * width, max_position_embeddings=40))
    out = tmp_path / f"bert-{width}-{heads}"
    bert.save_pretrained(out)
    tok.save_pretrained(out)
    return out, {k: v.clone() for k, v in bert.state_dict().items()}, tok


def test_qformer_starts_from_a_bert_checkpoint_as_lavis(tmp_path):
    path, weights, tok = _bert_dir(tmp_path)
    m = small(init=str(path))
    qf = m.qformer
    for i, layer in enumerate(qf.layer):  # the first `depth` of the checkpoint's 3 layers
        for name, p in layer.named_parameters():
            key = f"encoder.layer.{i}.{name.replace('_query', '')}"
            if "crossattention" in name:
                assert key not in weights  # new: BERT has no cross-attention
                if name.endswith(("dense.weight", "query.weight")):  # not BERT's self-attention's
                    twin = weights[f"encoder.layer.{i}.{name.replace('crossattention', 'attention')}"]
                    assert not torch.equal(p, twin) and p.std().item() == pytest.approx(0.02, rel=0.3)
            else:  # the query FFN copies the text FFN
                assert torch.equal(p, weights[key]), name
    for name in ("word_embeddings.weight", "position_embeddings.weight", "LayerNorm.weight"):
        assert torch.equal(qf.embeddings.get_parameter(name), weights[f"embeddings.{name}"])
    assert qf.embeddings.position_embeddings.num_embeddings == 40  # the checkpoint's positions
    # its tokenizer reads the text: [CLS] ... [SEP], [DEC] the row after its vocabulary
    ids, valid = m.text(["two red stars"], m.cfg.max_text_len)
    assert ids[0, : valid[0].sum()].tolist() == tok.convert_tokens_to_ids(["[CLS]", "two", "red", "stars", "[SEP]"])
    assert m.text.dec_id == len(tok) and qf.word_weight().shape[0] == len(tok) + 1
    m.train()
    m.training_loss({**batch(), "captions": ["a red circle", "two green stars", "a square"]}, m.stages(8)[0]).loss.backward()


def test_bert_init_with_another_width_or_heads_or_no_directory_is_a_user_error(tmp_path):
    wide, _, _ = _bert_dir(tmp_path, width=48, heads=2)
    with pytest.raises(UserError, match="48 wide"):
        small(init=str(wide))
    four_heads, _, _ = _bert_dir(tmp_path, width=32, heads=4)
    with pytest.raises(UserError, match="4 heads"):
        small(init=str(four_heads))
    # a missing directory: read as a config (recipes name weights only the training machine has),
    # refused before any training (check) and when built
    cfg = from_dict(Blip2.Config, {"init": str(tmp_path / "nowhere"), "width": 32, "heads": 2}, "methods.blip2")
    with pytest.raises(UserError, match="init: no checkpoint directory"):
        Blip2.check(cfg, random_backbones())
    with pytest.raises(UserError, match="init: no checkpoint directory"):
        small(init=str(tmp_path / "nowhere"))
    Blip2.check(dataclasses.replace(cfg, init=str(four_heads), heads=4, depth=2), random_backbones())  # fits: no error
