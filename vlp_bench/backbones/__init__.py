"""Backbones: a frozen vision encoder, a frozen causal LLM with its tokenizer, and the BERT-style
checkpoint the trained bridges start from.

- encoders: VisionConfig, LLMConfig, the frozen VisionEncoder wrapper, Backbones, freeze, frozen_dtype
- tiny: the tiny ViT's and tiny LM's recipes and pre-training (tiny_vit, tiny_llama, train_tokenizer)
- load: load_vision, load_llm, load_backbones (tiny ones pre-trained once and cached, keyed by
  their recipe and BACKBONE_VERSION; any other name is a timm model or a Hugging Face causal LM)
"""

from vlp_bench.backbones.encoders import (Backbones, BertBackboneConfig, LLMConfig, VisionConfig, VisionEncoder, freeze,
                                         frozen_dtype)
from vlp_bench.backbones.load import BACKBONE_VERSION, load_backbones, load_llm, load_vision
from vlp_bench.backbones.tiny import (CAPTION_PROMPT, VQA_PROMPT, pretrain_tiny_lm, pretrain_tiny_vit, tiny_llama,
                                      tiny_vit, train_tokenizer)

__all__ = [
    "BACKBONE_VERSION", "CAPTION_PROMPT", "VQA_PROMPT", "Backbones", "BertBackboneConfig", "LLMConfig", "VisionConfig",
    "VisionEncoder", "freeze", "frozen_dtype", "load_backbones", "load_llm", "load_vision", "pretrain_tiny_lm",
    "pretrain_tiny_vit",
    "tiny_llama", "tiny_vit", "train_tokenizer",
]
