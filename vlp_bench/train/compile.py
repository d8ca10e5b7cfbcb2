"""train.compile: the backbones' transformer blocks through torch.compile for training, and the
switch back to their eager code for what must not run compiled (evaluation, FLOP counting)."""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

# Methods compiled so far -> the number of blocks compiled in each. Kept here rather than as an
# attribute on the method (nn.Module would take any), and weakly, so that a method dropped after
# its run is not kept alive by having been compiled.
_COMPILED: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def compile_blocks(method: nn.Module, backend: str) -> int:
    """torch.compile, in place, the backbones' transformer blocks: timm's ViT blocks and Hugging
    Face decoder layers (the text side's LM copy included). They are where most of a step's time
    goes and they repeat, so one compiled graph serves each kind. A frozen-LLM method's bridge
    (`FrozenLLMMethod.bridge`: BERT layers, token merging, a Q-Former, a projector) is compiled
    whole with fullgraph=True: ToMe's merging keeps every layer's shapes static for a given
    schedule, so a constant schedule compiles once (a step curriculum recompiles for each new r;
    tests/test_trainer.py holds the compiled loss to the eager one). Returns the number of modules
    compiled; a method is compiled once (a later call, e.g. a decoder phase inside the run, returns
    the first call's count)."""
    from timm.models.vision_transformer import Block as ViTBlock

    from vlp_bench.method import FrozenLLMMethod

    try:
        from transformers.modeling_layers import GradientCheckpointingLayer as DecoderLayer
    except ImportError:  # older transformers
        DecoderLayer = ()
    if method in _COMPILED:
        return _COMPILED[method]
    n = 0
    for module in method.modules():
        if isinstance(module, (ViTBlock, DecoderLayer)) or type(module).__name__ == "EvaBlock":
            module.compile(backend=backend)
            n += 1
    if isinstance(method, FrozenLLMMethod):
        method.bridge = torch.compile(method.bridge, backend=backend, fullgraph=True)
        n += 1
    _COMPILED[method] = n
    return n


def eager():
    """Evaluation (generation: growing lengths, KV caches) runs the compiled blocks' eager code;
    so does the FLOP counter, which must see every operation."""
    return torch.compiler.set_stance("force_eager")
