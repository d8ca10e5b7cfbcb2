"""Backbone loading: real names and local checkpoints go through the same path as the tiny ones;
anything missing is a one-line UserError naming it."""

from __future__ import annotations


from pathlib import Path

import pytest
import torch

from conftest import random_backbones
from vlp_bench.backbones import LLMConfig, VisionConfig, load_llm, load_vision
from vlp_bench.errors import UserError


def test_llm_from_a_local_directory(tmp_path):
    bb = random_backbones()
    bb.llm.save_pretrained(tmp_path / "lm")
    bb.tokenizer.save_pretrained(tmp_path / "lm")
    model, tokenizer = load_llm(LLMConfig(name=str(tmp_path / "lm")), tmp_path, tmp_path, torch.device("cpu"))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(input_ids=ids).logits, bb.llm(input_ids=ids).logits)
    assert tokenizer("a red circle").input_ids == bb.tokenizer("a red circle").input_ids
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_llm_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="language model '.*no-such-model' is not available offline"):
        load_llm(LLMConfig(name=str(tmp_path / "no-such-model")), tmp_path, tmp_path, torch.device("cpu"))


def test_timm_model_from_a_local_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    enc = load_vision(VisionConfig(name="vit_tiny_patch16_224", checkpoint=str(tmp_path / "w.safetensors")),
                      tmp_path, tmp_path)
    x = torch.randn(1, 3, 224, 224)
    assert enc.image_size == 224 and enc.dim == 192
    assert torch.allclose(enc(x), ref.eval().forward_features(x))
    assert enc(x).shape == (1, 197, 192)  # CLS + 14x14 patches
    penultimate = load_vision(VisionConfig(name="vit_tiny_patch16_224", checkpoint=str(tmp_path / "w.safetensors"),
                                           feature_layer=-2), tmp_path, tmp_path)
    assert penultimate(x).shape == (1, 197, 192) and not torch.allclose(penultimate(x), enc(x))


@pytest.mark.parametrize("cfg, message", [
    (VisionConfig(name="vit_no_such_model"), "unknown timm vision model 'vit_no_such_model'"),
    (VisionConfig(name="vit_tiny_patch16_224", checkpoint="/nonexistent/w.safetensors"),
     "vision checkpoint not found: /nonexistent/w.safetensors"),
    (VisionConfig(name="vit_tiny_patch16_224"), "not available offline"),
])
def test_vision_errors(cfg, message, tmp_path):
    with pytest.raises(UserError, match=message):
        load_vision(cfg, tmp_path, tmp_path)


def test_feature_layer_reads_an_earlier_block_and_runs_no_later_one():
    from vlp_bench.train import flops
    from vlp_bench.backbones import VisionEncoder, tiny_vit

    torch.manual_seed(0)
    vit = tiny_vit(VisionConfig(width=32, depth=3, heads=2), 0).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for blk in vit.blocks[:2]:  # the penultimate block's output, no final norm
            x = blk(x)
        enc = VisionEncoder(vit, 64, (0.5,) * 3, (0.5,) * 3, feature_layer=-2)
        assert torch.allclose(enc(images), x, atol=1e-6)
        full = flops.count(VisionEncoder(vit, 64, (0.5,) * 3, (0.5,) * 3), images).total
        assert flops.count(enc, images).total < full  # the last block does not run


def test_bf16_frozen_backbones_meet_fp32_trainable_parts():
    """On a GPU the frozen backbones are bf16 (frozen_dtype): the encoder takes fp32 images, hands
    bf16 features on under autocast and fp32 ones outside it (evaluation, where the bridge's fp32
    weights meet them); the text side's trainable LM copy keeps fp32 master weights."""
    from vlp_bench.backbones import frozen_dtype
    from vlp_bench.registry import METHODS

    assert frozen_dtype("cuda") == torch.bfloat16 and frozen_dtype("cpu") == frozen_dtype("meta") == torch.float32
    bb = random_backbones()
    bb.vision.to(torch.bfloat16)
    bb.llm.to(torch.bfloat16)
    images = torch.randn(2, 3, 64, 64)
    assert bb.vision(images).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bb.vision(images).dtype == torch.bfloat16
    cls = METHODS.get("flm")
    method = cls(cls.Config(heads=2, init="llm", text_layers=1), bb)
    assert {p.dtype for p in method.text.body.parameters()} == {torch.float32}
    assert {p.dtype for p in bb.llm.parameters()} == {torch.bfloat16}  # the frozen original is untouched


def test_the_bert_backbone_is_a_directory_or_none(tmp_path):
    """[bert] name: a directory is used as given, "" is none (random init), a missing one is a one-line error."""
    from vlp_bench.backbones import BertBackboneConfig
    from vlp_bench.backbones.load import bert_checkpoint

    args = (LLMConfig(), None, tmp_path, tmp_path)  # no tiny BERT is built for these names
    assert bert_checkpoint(BertBackboneConfig(name=""), *args) == ""
    assert bert_checkpoint(BertBackboneConfig(name=str(tmp_path)), *args) == str(tmp_path)
    with pytest.raises(UserError, match="bert.name: no checkpoint directory"):
        bert_checkpoint(BertBackboneConfig(name=str(tmp_path / "missing")), *args)


@pytest.mark.slow
def test_side_by_side_pretraining_builds_what_one_process_builds(tmp_path):
    """Two spawned processes of one thread (the LM; the ViT then the BERT, with the LM's tokenizer
    trained again) write the same cache entries, tensor for tensor, as one process of one thread,
    and record each backbone's held-out loss."""
    import json

    from safetensors.torch import load_file

    from vlp_bench.backbones import BertBackboneConfig
    from vlp_bench.backbones.load import _bert_entry, _lm_entry, _vit_entry, bert_checkpoint, pretrain_side_by_side
    from vlp_bench.data.world import WorldConfig, build_world

    root = build_world(WorldConfig(n_train=96, n_val=16, n_test=8, n_clips_train=8, n_clips_val=2, n_clips_test=2),
                       tmp_path / "world")
    vision = VisionConfig(width=32, depth=1, heads=2, pretrain_steps=6)
    llm = LLMConfig(width=32, depth=1, heads=2, vocab_size=300, pretrain_steps=6)
    bert = BertBackboneConfig(width=32, depth=1, heads=2, pretrain_steps=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pretrain_side_by_side(vision, llm, bert, root, tmp_path / "two")
        torch.set_num_threads(1)
        load_vision(vision, root, tmp_path / "one")
        bert_checkpoint(bert, llm, load_llm(llm, root, tmp_path / "one", torch.device("cpu"))[1], root, tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    for entry, weights, recipe in ((_vit_entry(vision, root, Path()), "model.safetensors", "config.json"),
                                   (_lm_entry(llm, root, Path()), "model.safetensors", "recipe.json"),
                                   (_bert_entry(bert, llm, root, Path()), "model.safetensors", "recipe.json")):
        one, two = tmp_path / "one" / entry, tmp_path / "two" / entry
        a, b = load_file(str(one / weights)), load_file(str(two / weights))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), entry
        held_out = json.loads((one / recipe).read_text())["held_out_loss"]
        assert held_out == json.loads((two / recipe).read_text())["held_out_loss"] and held_out > 0
