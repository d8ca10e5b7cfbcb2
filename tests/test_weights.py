"""The kept-weights file (vlp_bench/train/weights.py): what it refuses, and the backbone fingerprint
that keeps weights off backbones they were not trained on."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import random_backbones
from vlp_bench.errors import UserError
from vlp_bench.registry import METHODS
from vlp_bench.train.weights import backbone_fingerprint, load_weights, read_meta, save_weights


def _baseline(backbones=None):
    torch.manual_seed(0)
    cls = METHODS.get("baseline")
    return cls(cls.Config(width=32, depth=1, heads=2), backbones or random_backbones())


def test_weights_on_other_backbones_are_refused(tmp_path):
    method = _baseline()
    save_weights(tmp_path / "w.safetensors", method, {})
    other = random_backbones()
    with torch.no_grad():
        next(other.llm.parameters()).view(-1)[0] += 1.0  # one frozen number changed
    with pytest.raises(UserError, match="other frozen backbones"):
        load_weights(tmp_path / "w.safetensors", _baseline(other))
    load_weights(tmp_path / "w.safetensors", _baseline())  # the same backbones, rebuilt: accepted


def test_the_fingerprint_is_the_same_for_the_bf16_backbones_a_gpu_runs():
    method = _baseline()
    half = copy.deepcopy(method)
    half.vision.to(torch.bfloat16), half.llm.to(torch.bfloat16)
    assert backbone_fingerprint(half) == backbone_fingerprint(method)


def test_weights_of_another_config_are_refused(tmp_path):
    save_weights(tmp_path / "w.safetensors", _baseline(), {})
    cls = METHODS.get("baseline")
    torch.manual_seed(0)
    wider = cls(cls.Config(width=64, depth=1, heads=2), random_backbones())
    with pytest.raises(UserError, match="does not match method 'baseline'.*another shape"):
        load_weights(tmp_path / "w.safetensors", wider)


def test_files_that_are_not_kept_weights_are_refused(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable weights file"):
        read_meta(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="not a vlp-bench weights file"):
        load_weights(tmp_path / "plain.safetensors", _baseline())
