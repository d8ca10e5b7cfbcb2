"""The SimVLG/baseline bridge is EVLGen's connector: a BERT encoder (post-LN, positions and token type
0 with LayerNorm on the projected ViT tokens, dropout 0.1) behind a trainable LayerNorm on the ViT
tokens, optionally initialised from a local BERT-style checkpoint. Checked against Hugging Face's
own BertModel, which the tests build and save themselves."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from conftest import random_backbones
from vlp_bench.errors import UserError
from vlp_bench.methods.baseline import Baseline
from vlp_bench.methods.simvlg import SimVLG
from vlp_bench.nn.merging import token_counts


def tiny_bert(path, width=32, heads=2, layers=3, seed=0):
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=4 * width, max_position_embeddings=128))
    bert.save_pretrained(path)
    return bert.eval()


def make(cls, **kw):
    torch.manual_seed(1)
    return cls(cls.Config(width=32, heads=2, positions=128, **kw), random_backbones())


@pytest.mark.parametrize("depth", [1, 3])
def test_bridge_initialised_from_bert_computes_what_bert_computes(tmp_path, depth):
    """EVLGen feeds the projected ViT tokens to bert-base as inputs_embeds and reads last_hidden_state:
    with the same weights (first `depth` layers) our bridge's BERT part is the same function."""
    bert = tiny_bert(tmp_path, layers=3)
    if depth < 3:
        bert.encoder.layer = bert.encoder.layer[:depth]  # Hugging Face's num_hidden_layers < the checkpoint's
    base = make(Baseline, depth=depth, init=str(tmp_path)).eval()
    x = torch.randn(2, 65, 32)
    with torch.no_grad():
        ours = base.embeddings(vectors=x)
        for layer in base.layers:
            ours, _ = layer(ours)
        theirs = bert(inputs_embeds=x).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_without_init_the_bridge_is_bert_randomly_initialised():
    base = make(Baseline)
    w = base.layers[0].attention.self.query.weight
    assert abs(w.std().item() - 0.02) < 0.005 and base.layers[0].output.LayerNorm.weight.eq(1).all()
    assert base.ln_vision.weight.requires_grad  # EVLGen's trainable LayerNorm on the ViT tokens
    # BertModel's pooler (a dense layer on CLS) runs in EVLGen but its output is never read: not built here
    assert not any("pooler" in name for name, _ in base.named_parameters())


def test_init_mismatch_and_missing_checkpoint_are_user_errors(tmp_path):
    tiny_bert(tmp_path, width=48, heads=2)
    with pytest.raises(UserError, match="width and heads"):
        make(Baseline, init=str(tmp_path))
    with pytest.raises(UserError, match="no checkpoint directory"):
        make(Baseline, init=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no checkpoint directory"):  # found before any training
        Baseline.check(Baseline.Config(init=str(tmp_path / "missing")), random_backbones())


def test_dropout_is_bert_s_and_only_in_training():
    base = make(Baseline)
    x = torch.randn(1, 65, 32)
    assert base.cfg.dropout == 0.1
    base.train()
    assert not torch.equal(base.bridge(x), base.bridge(x))  # dropout on
    base.eval()
    assert torch.equal(base.bridge(x), base.bridge(x))


def test_simvlg_merges_the_attention_output_with_a_plain_mean_by_default():
    """EVLGen: merge(attention_output, mode="mean") between the attention sub-layer (after its
    LayerNorm) and the FFN; r = 0 is the baseline exactly."""
    assert SimVLG.Config().variant == "evlgen"
    sim = make(SimVLG, r=8, depth=2).eval()
    x = torch.randn(2, 65, 32)
    seen = []
    sim.layers[0].intermediate.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    out = sim.bridge(x)
    assert seen == [65 - 8] and out.shape[1] == token_counts(65, [8, 8])[-1] == 49
    base, plain = make(Baseline, depth=2).eval(), make(SimVLG, r=0, depth=2).eval()
    plain.load_state_dict(base.state_dict())
    assert torch.equal(base.bridge(x), plain.bridge(x))


def test_init_bert_means_the_experiment_s_bert_backbone(tmp_path):
    """init = "bert" (the default) starts from Backbones.bert (the tiny world's pre-trained BERT, or
    bert-base-uncased); an experiment without one ([bert] name = "") starts from random init."""
    bert = tiny_bert(tmp_path, layers=2)
    torch.manual_seed(1)
    backbones = random_backbones()
    assert Baseline.Config().init == "bert" and make(Baseline).info()["init"] == ""  # random_backbones: no BERT
    backbones.bert = str(tmp_path)
    base = Baseline(Baseline.Config(width=32, heads=2, positions=128), backbones)
    assert base.info()["init"] == str(tmp_path)
    assert torch.equal(base.layers[1].output.dense.weight, bert.encoder.layer[1].output.dense.weight)
