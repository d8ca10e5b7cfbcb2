"""The text-side family's text model (vlp_bench.textside): a pre-trained Hugging Face body cut to
its first layers, as FLM keeps RoBERTa's first 6, and its prediction head: a causal LM's copy with
its own tied head (`init = "llm"`), or a BERT/RoBERTa encoder from a directory (or in memory, for
the cost model) with a new BERT-style head."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from vlp_bench.errors import UserError
from vlp_bench.nn.bert import EXPERIMENT_BERT, init_source, quiet_loading

LLM = "llm"  # init: a copy of the frozen causal LM


class PredictionHead(nn.Module):
    """A new BERT-style head (dense, GELU, LayerNorm, decoder to the vocabulary), as FLM's MLMHead."""

    def __init__(self, dim: int, vocab: int, eps: float = 1e-12):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=eps))
        self.decoder = nn.Linear(dim, vocab)
        for m in (self.transform[0], self.decoder):  # BERT's initialisation
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


def layer_list(body: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers of a Hugging Face body (BERT's encoder.layer, Llama's layers,
    GPT-2's h): its ModuleList of config.num_hidden_layers modules."""
    n = body.config.num_hidden_layers
    found = [(name, m) for name, m in body.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise ValueError(f"cannot find the {n} layers of {type(body).__name__}")
    return min(found, key=lambda nm: nm[0].count("."))[1]


def keep_first_layers(body: nn.Module, n: int) -> None:
    """Cut a Hugging Face body to its first n layers, as FLM keeps RoBERTa's first 6."""
    layers = layer_list(body)
    if n > len(layers):
        raise UserError(f"text_layers = {n}, but the text model has {len(layers)} layers")
    del layers[n:]
    body.config.num_hidden_layers = n


def load_text_model(init: str, backbones) -> tuple[nn.Module, nn.Module, object]:
    """(body, head, tokenizer) of the family's text model, trainable and in fp32 (master weights
    even where the frozen LM is bf16): the causal LM's copy with its own (tied) head, or a
    BERT/RoBERTa encoder from a directory with a new prediction head."""
    if init == LLM:
        if any(hasattr(p, "to_local") for p in backbones.llm.parameters()):
            raise UserError("init = \"llm\" copies the frozen LLM, which train.parallel = \"fsdp\" shards over "
                            "the processes: use train.parallel = \"ddp\" (or init = a BERT-style model)")
        lm = copy.deepcopy(backbones.llm).float().requires_grad_(True)  # tied embeddings stay tied
        return lm.base_model, lm.get_output_embeddings(), backbones.tokenizer
    if init == EXPERIMENT_BERT and backbones.text is not None:  # shapes only (vlp-bench flops)
        body, tokenizer = copy.deepcopy(backbones.text[0]), backbones.text[1]
    else:
        from transformers import AutoModel, AutoTokenizer

        path = text_model_path(init, backbones)
        with quiet_loading():
            try:
                body = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError) as e:
                raise UserError(f"init: cannot read a BERT-style text model from '{path}': "
                                f"{str(e).splitlines()[0]}") from None
        body = body.float().requires_grad_(True)
    return body, PredictionHead(body.config.hidden_size, len(tokenizer), body.config.layer_norm_eps), tokenizer


def text_model_path(init: str, backbones) -> str:
    path = init_source(init, backbones.bert)
    if not path:
        raise UserError(f"init = {init!r}: the experiment loads no BERT-style text model ([bert] name is \"\"); "
                        f"set bert.name, or init = \"llm\" for a copy of the causal LM")
    return path
