"""The plug-in's own tests; vlp-bench's test suite runs them too. Once the package is installed,
vlp-bench's registry-parametrised tests cover the rest (building, gradients, generation, FLOPs,
shape_key) without anyone listing it."""

import pytest
import torch

from vlp_bench import costmodel
from vlp_bench.experiment import load_config
from vlp_bench.registry import METHODS
from vlp_bench_stride import Stride, StrideConfig


@pytest.fixture(scope="module")
def backbones():
    # the default tiny backbones with random weights on the CPU: shapes are all these tests need
    return costmodel.tiny_scale(load_config(None), "cpu").backbones


def test_found_through_its_entry_point():
    assert METHODS.get("stride") is Stride and METHODS.origin("stride").startswith("vlp-bench-stride")


@pytest.mark.parametrize("stride, tokens", [(1, 65), (2, 33), (3, 23), (64, 2)])
def test_keeps_the_cls_token_and_every_sth_patch(backbones, stride, tokens):
    method = Stride(StrideConfig(stride), backbones)
    prefix = method.visual_prefix(torch.randn(2, 3, 64, 64))
    assert prefix.shape == (2, tokens, backbones.llm_dim)
    assert method.info()["tokens_to_llm"] == tokens


def test_a_stride_longer_than_the_patches_is_refused(backbones):
    with pytest.raises(ValueError, match="larger than the encoder's 64 patch tokens"):
        Stride.check(StrideConfig(stride=65), backbones)
