"""BLIP-2's Q-Former as LAVIS builds it (lavis/models/blip2_models/Qformer.py): BERT's architecture
(vlp_bench.nn.bert: post-LN layers, dropout, BERT's embeddings and N(0, 0.02) initialisation,
Hugging Face parameter names, so it can start from a BERT checkpoint) with
- learned query tokens, N(0, 0.02), put before the text as the embeddings' `prefix` (LayerNorm and
  dropout, no positions; the text's positions start at 0 either way);
- cross-attention from the queries to the frozen ViT's tokens in layers 0, cross_every, 2 cross_every,
  ..., after self-attention (the text never cross-attends);
- the queries' own FFN (`intermediate_query`, `output_query`) beside the text's;
- a trainable LayerNorm (`ln_vision`) on the ViT's tokens, applied once by the caller (`ln_vision`),
  so that what a rank gathers for ITM's negatives is what the layers read;
- no final norm (post-LN).

Which token may attend to which is set per objective by `attention_mask` (ITC, ITM, ITG, queries
only). `forward` returns each layer's self-attention (k, v): BLIP-2's ITG runs only the text through
the layers, with the (k, v) of the queries' ITC pass as `past` (LAVIS's past_key_values).

The text side (`QFormerText`): LAVIS tokenizes with BERT's tokenizer: [CLS] first (ITC, ITM),
[DEC] (a token it adds) first for ITG, [SEP] last, padded to a fixed length. Here either the LLM's
tokenizer (no BERT needed; [CLS] and [DEC] are two embedding rows added after its vocabulary, its
EOS ends the text) or, when the Q-Former starts from a BERT checkpoint, that checkpoint's tokenizer
([CLS] and [SEP] its own, [DEC] added).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp_bench.errors import UserError
from vlp_bench.nn.bert import LAYER_NORM_EPS, BertLayer, Embeddings, check_bert, init_normal, load_bert

MaskMode = Literal["queries", "text", "itm", "itg"]


def attention_mask(n_query: int, text_valid: torch.Tensor | None, mode: MaskMode) -> torch.Tensor | None:
    """Boolean (B, 1, L, L) mask, True = may attend, over [queries; text] (text_valid: (B, Lt)).

    queries: queries see queries (no text).     text: text sees valid text (ITC's text pass).
    itm: everything sees all queries and valid text.
    itg: queries see only queries; text sees all queries and valid earlier text (and itself).
    """
    if mode == "queries":
        return None
    B, Lt = text_valid.shape
    if mode == "text":
        return text_valid[:, None, None, :].expand(B, 1, Lt, Lt)
    L = n_query + Lt
    keys = torch.cat([torch.ones(B, n_query, dtype=torch.bool, device=text_valid.device), text_valid], dim=1)
    mask = keys[:, None, None, :].expand(B, 1, L, L).clone()
    if mode == "itg":
        mask[:, :, :n_query, n_query:] = False  # queries never see the text they are to generate
        causal = torch.ones(Lt, Lt, dtype=torch.bool, device=text_valid.device).tril()
        mask[:, :, n_query:, n_query:] &= causal
    return mask


def itg_text_mask(n_query: int, text_valid: torch.Tensor) -> torch.Tensor:
    """The text rows of the "itg" mask, (B, 1, Lt, n_query + Lt): the ITG pass that runs the text
    alone, the queries' keys and values coming from `past`."""
    return attention_mask(n_query, text_valid, "itg")[:, :, n_query:]


class QFormerText:
    """The Q-Former's text ids: [CLS] caption [end], truncated and padded to a fixed length.

    Truncation keeps the end token, as BERT's tokenizer (LAVIS: truncation=True, max_length=32)
    cuts the caption's word pieces and then appends [SEP]. Special tokens the tokenizer lacks get
    ids after its vocabulary (`added`): the Q-Former's extra embedding rows."""

    def __init__(self, tokenizer, cls_id: int | None, end_id: int):
        self.tokenizer = tokenizer
        self.vocab = len(tokenizer)
        self.cls_id = self.vocab if cls_id is None else cls_id
        self.dec_id = self.vocab + (cls_id is None)  # [DEC]: added in both cases, as LAVIS adds it
        self.added = 1 + (cls_id is None)
        self.end_id = end_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id

    @classmethod
    def of_llm(cls, tokenizer) -> QFormerText:
        """The LLM's tokenizer: learned [CLS] and [DEC] rows, its EOS as the end token."""
        return cls(tokenizer, None, tokenizer.eos_token_id)

    @classmethod
    def of_bert(cls, path: str) -> QFormerText:
        """A BERT checkpoint's own tokenizer (AutoTokenizer): its [CLS] and [SEP], [DEC] added."""
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"init: cannot read a tokenizer from '{path}': {str(e).splitlines()[0]}") from None
        if tok.cls_token_id is None or tok.sep_token_id is None:
            raise UserError(f"init: the tokenizer in '{path}' has no [CLS] or [SEP] token (not BERT-style)")
        return cls(tok, tok.cls_token_id, tok.sep_token_id)

    @property
    def rows(self) -> int:
        """Embedding rows the Q-Former needs: the vocabulary and the added tokens."""
        return self.vocab + self.added

    def __call__(self, captions: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, length) with [CLS] first, valid (B, length) bool (False on padding)."""
        ids = torch.full((len(captions), length), self.pad_id, dtype=torch.long)
        valid = torch.zeros((len(captions), length), dtype=torch.bool)
        for r, caption in enumerate(captions):
            words = self.tokenizer(caption, add_special_tokens=False).input_ids[: length - 2]
            row = [self.cls_id, *words, self.end_id]
            ids[r, : len(row)] = torch.tensor(row)
            valid[r, : len(row)] = True
        return ids, valid


class QFormer(nn.Module):
    """Learned queries and text in shared BERT layers; see the module docstring."""

    def __init__(self, width: int, depth: int, heads: int, num_queries: int, cross_every: int,
                 vision_dim: int, text: QFormerText, positions: int, dropout: float = 0.1):
        super().__init__()
        self.width, self.depth, self.heads = width, depth, heads
        self.ln_vision = nn.LayerNorm(vision_dim)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, width))
        self.embeddings = Embeddings(width, positions, dropout, vocab=text.vocab)
        self.added_embeddings = nn.Embedding(text.added, width)  # [DEC] (and [CLS]): after the vocabulary
        self.layer = nn.ModuleList(
            BertLayer(width, heads, dropout, cross_dim=vision_dim if i % cross_every == 0 else None, query_ffn=True)
            for i in range(depth))
        init_normal(self)  # BERT's: N(0, 0.02) weights and embeddings, zero biases, unit LayerNorms
        nn.init.normal_(self.query_tokens, std=0.02)  # LAVIS's init_Qformer

    @property
    def num_queries(self) -> int:
        return self.query_tokens.shape[1]

    def word_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, width): the vocabulary's rows, or the added ones for ids past it."""
        vocab = self.embeddings.word_embeddings.num_embeddings
        own = self.embeddings.word_embeddings(ids.clamp(max=vocab - 1))
        added = self.added_embeddings((ids - vocab).clamp(min=0))
        return torch.where((ids >= vocab).unsqueeze(-1), added, own)

    def word_weight(self) -> torch.Tensor:
        """(rows, width): every token's embedding, the tied output layer of the ITG head."""
        return torch.cat([self.embeddings.word_embeddings.weight, self.added_embeddings.weight])

    def forward(self, context: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, past: list | None = None) -> tuple[torch.Tensor, list]:
        """The queries (when `context`, the ViT's tokens after ln_vision, (B, N, vision_dim), is
        given) and the text `ids` (B, Lt) through the layers -> ((B, [Q +] Lt, width), each layer's
        self-attention (k, v) of its input). past: per layer, (k, v) put before this pass's own
        (the queries' for ITG's text-only pass)."""
        prefix = self.query_tokens.expand(context.shape[0], -1, -1) if context is not None else None
        x = self.embeddings(vectors=None if ids is None else self.word_vectors(ids), prefix=prefix)
        n_query = 0 if prefix is None else prefix.shape[1]
        kvs = []
        for i, layer in enumerate(self.layer):
            x, kv = layer(x, mask, context=context, n_query=n_query, past=None if past is None else past[i])
            kvs.append(kv)
        return x, kvs

    def load_bert(self, path: str) -> list[str]:
        """Start from a local BERT-style checkpoint, as LAVIS starts from bert-base-uncased: the
        embeddings and the first `depth` layers; the query FFN copies the text FFN; cross-attention,
        queries, ln_vision and [DEC] stay new. Returns the parameters left new."""
        check_bert(path, self.width, self.heads, self.depth)
        return load_bert(self, path, rename=lambda name: "encoder." + name if name.startswith("layer.") else name)


class LMHead(nn.Module):
    """BERT's LM prediction head (LAVIS's `cls.predictions`), ITG's: dense, GELU, LayerNorm, then
    the product with the Q-Former's word embeddings (tied, as BERT's) plus a bias per token."""

    def __init__(self, width: int, rows: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.bias = nn.Parameter(torch.zeros(rows))
        init_normal(self)

    def forward(self, x: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """x: (..., width); words: (rows, width) -> logits (..., rows)."""
        return F.linear(self.LayerNorm(F.gelu(self.dense(x))), words, self.bias)
