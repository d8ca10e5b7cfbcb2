"""Every registered method, tested without anyone remembering to: it builds from its default
config, trains only its own parameters, and generates text through the frozen LLM."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import random_backbones
from vlp_bench.method import DecodingConfig, Method
from vlp_bench.registry import METHODS

DEC = DecodingConfig(num_beams=2, max_new_tokens=5, min_new_tokens=2)


def _small(cfg):
    """Shrink width-like fields so every method is instant with 32-wide backbones."""
    changes = {f.name: 32 for f in dataclasses.fields(cfg) if f.name == "width"}
    changes.update({f.name: 2 for f in dataclasses.fields(cfg) if f.name == "heads"})
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(params=METHODS.names())
def method(request) -> Method:
    torch.manual_seed(0)
    cls = METHODS.get(request.param)
    return cls(_small(cls.Config()), random_backbones(bert=True))


def _batch(n=3):
    g = torch.Generator().manual_seed(1)
    return {"images": torch.randn(n, 3, 64, 64, generator=g), "prompt": "a photo of",
            "captions": ["a red circle", "two green stars left of a blue square", "a square"][:n]}


def test_registry_entries_are_complete(method):
    assert dataclasses.is_dataclass(method.Config)
    assert type(method).__dict__.get("__doc__"), "`vlp-bench list` shows the class docstring"
    assert type(method).name in METHODS.names()
    assert method.stages(10) and sum(s.steps for s in method.stages(10)) == 10


def test_each_stage_trains_only_its_own_parameters(method):
    method.train()
    frozen = [*method.vision.parameters(), *method.llm.parameters()]
    stages = method.stages(8)
    for stage in stages:
        method.zero_grad(set_to_none=True)
        params = method.trainable_parameters(stage)
        assert params and not {id(p) for p in params} & {id(p) for p in frozen}
        out = method.training_loss(_batch(), stage)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        out.loss.backward()
        assert all(p.grad is None for p in frozen)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        mine = {id(p) for p in params}
        assert all(p.grad is None for p in method.parameters() if id(p) not in mine)
    assert out.tokens_to_llm >= 1  # the last stage feeds the LLM
    assert not method.vision.training and not method.llm.training  # frozen parts stay in eval mode


def test_generation_returns_one_string_per_image(method):
    method.eval()
    texts = method.generate(_batch()["images"], ["a photo of"] * 3, DEC)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    again = method.generate(_batch()["images"], ["a photo of"] * 3, DEC)
    assert texts == again  # beam search is deterministic


def test_batched_generation_with_prompts_of_different_lengths_matches_one_by_one(method):
    """Left padding must not change what a row generates (VQA batches mix question lengths)."""
    method.eval()
    images = _batch()["images"]
    prompts = ["a photo of", "Question: what color is the big square? Short answer:", ""]
    together = method.generate(images, prompts, DEC)
    alone = [method.generate(images[i : i + 1], [p], DEC)[0] for i, p in enumerate(prompts)]
    assert together == alone


def test_pad_rows_right_and_left():
    from vlp_bench.nn.generation import pad_rows

    ids, valid = pad_rows([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert valid.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    ids, valid = pad_rows([[5, 6, 7], [8]], pad_id=0, left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and valid.tolist() == [[True] * 3, [False, False, True]]


def test_generation_loss_is_the_teacher_forced_loss_of_the_generation_path_or_none(method):
    """Every stage either has a generation path, whose loss on the captions is finite and
    deterministic in eval mode, or says it has none (None: BLIP-2's stage 1 alone)."""
    method.eval()
    batch = _batch()
    with torch.no_grad():
        for stage in method.stages(8):
            out = method.generation_loss(batch, stage)
            if out is None:
                assert type(method).name.startswith("blip2") and stage.name == "stage1"
                continue
            assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.weight and out.weight > 0
            again = method.generation_loss(batch, stage)
            assert float(again.loss) == float(out.loss)  # eval mode: deterministic
    assert method.generation_loss(batch, method.stages(8)[-1]) is not None  # the last stage generates


def test_kept_weights_reload_bit_exactly_onto_the_method_rebuilt_from_its_seed(method, tmp_path):
    """What `vlp-bench evaluate run` relies on: the trainable tensors written and read back exactly,
    every other tensor rebuilt identically from the run's seed, so the rebuilt method is the trained one."""
    from vlp_bench.train.weights import load_weights, save_weights

    cls, cfg = type(method), method.cfg
    with torch.no_grad():  # "training": every trainable tensor moved off its initial value
        for p in method.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    kept = save_weights(tmp_path / "w.safetensors", method, {"method": cls.name})
    assert kept["parameters"] == sum(p.numel() for p in method.parameters() if p.requires_grad) > 0
    torch.manual_seed(0)  # the seed the fixture built the method from
    rebuilt = cls(cfg, random_backbones(bert=True))
    assert load_weights(tmp_path / "w.safetensors", rebuilt)["method"] == cls.name
    trained, again = dict(method.named_parameters()), dict(rebuilt.named_parameters())
    assert trained.keys() == again.keys()
    assert all(torch.equal(trained[n], again[n]) for n in trained), [n for n in trained if not torch.equal(trained[n], again[n])]
    method.eval(), rebuilt.eval()
    images = _batch()["images"]
    assert rebuilt.generate(images, ["a photo of"] * 3, DEC) == method.generate(images, ["a photo of"] * 3, DEC)
