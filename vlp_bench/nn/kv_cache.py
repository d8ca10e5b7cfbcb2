"""Incremental decoding of the text-side family (vlp_bench.textside): beam search through the
"l2r" stream keeps every layer's keys and values, so each step runs only the new token through the
text model instead of the whole prefix again (decoding cost linear in the caption's length, not
quadratic), and reads the image's keys and values, computed once, instead of projecting them anew.

The stream is exact under a cache because it is causal: a position reads only earlier positions, so
their keys and values do not change when tokens are appended. Beam search reorders its rows at
every step (`ids[src]`); the cache follows with the same `src` (`reorder`).

The pre-trained body (a BERT/RoBERTa encoder or a causal LM's base model) keeps its keys and values
in a Hugging Face `DynamicCache`, which its layers fill when given one; the fusion blocks keep
theirs in the same cache, after the body's layers. A body that ignores the cache (an older
transformers' encoder, another architecture) is detected at the first step (`check_body`) and
decoded without one: same tokens, more FLOPs.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from vlp_bench.log import warn


class CacheUnsupported(ValueError):
    """The text model's body did not keep its keys and values in the cache it was given."""


@functools.cache
def _cache_keyword(body_class: type) -> str:
    """The name a Hugging Face model's forward takes its cache by: `cache` since transformers 5
    (`past_key_values` is deprecated there), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(body_class.forward).parameters else "past_key_values"


@functools.cache
def _warn_once(body_class: type, msg: str) -> None:
    """Once per body class, not at every evaluation batch."""
    warn(msg)


class StreamCache:
    """Every layer's keys and values (R, H, T, hd) of the positions run so far (`seen`), one row per
    beam, and each fusion block's keys and values of the images (B, H, N, hd), computed once and
    read through `rows` (R,): the image of each beam row."""

    def __init__(self, body, rows: torch.Tensor):
        from transformers import DynamicCache

        self.states = DynamicCache()  # layers 0..n-1: the body's; n..: the fusion blocks'
        self.body_layers = body.config.num_hidden_layers
        self.keyword = _cache_keyword(type(body))
        self.rows = rows
        self.seen = 0
        self.images: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def body_kwargs(self) -> dict:
        """What the body's forward takes to read and extend the cache."""
        return {self.keyword: self.states, "use_cache": True}

    def check_body(self, length: int) -> None:
        """Every body layer holds `length` positions, else the body ignored the cache."""
        held = [self.states.get_seq_length(i) for i in range(self.body_layers)]
        if held != [length] * self.body_layers:
            raise CacheUnsupported(f"the text model's layers kept {held} positions of {length}: "
                                   "this body does not take a Hugging Face cache")

    def block(self, i: int, cross, visual: torch.Tensor):
        """For fusion block i: (past(k, v) -> the keys and values of every position so far, its
        cross-attention's keys and values of each row's image)."""
        if i not in self.images:
            self.images[i] = cross.keys_values(visual)
        k, v = self.images[i]
        rows = self.rows.to(k.device)
        layer = self.body_layers + i
        return (lambda k_new, v_new: self.states.update(k_new, v_new, layer)), (k[rows], v[rows])

    def advance(self, length: int) -> None:
        self.seen = length

    def reorder(self, src: torch.Tensor) -> None:
        """Row r continues row src[r] (beam search's reorder): its keys, values and image follow."""
        self.states.reorder_cache(src)
        self.rows = self.rows[src.to(self.rows.device)]


class StreamDecoder:
    """beam_search's next_logprobs over a TextSide's "l2r" stream reading `visual` (B, N, Dv):
    with `cached`, each call runs only the positions the cache has not seen (the whole prompt at
    the first call, then the token the previous step appended); without, the whole prefix, as
    `TextSide.features` runs it in training. Pass `reorder` to beam_search with it."""

    def __init__(self, text, visual: torch.Tensor, cached: bool = True):
        self.text, self.visual, self.cached = text, visual, cached
        self.cache: StreamCache | None = None

    def logits(self, ids: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(R, V) logits of the next token after ids (R, L), valid (R, L) (left-padded)."""
        device = self.visual.device
        if self.cached and self.cache is None:
            self.cache = StreamCache(self.text.body, rows)
        if self.cache is None:
            feats = self.text.features(self.text.embed(ids.to(device)), valid, self.visual[rows.to(device)], "l2r")
            return self.text.logits(feats[:, -1])
        new = ids[:, self.cache.seen:]
        try:
            feats = self.text.features(self.text.embed(new.to(device)), valid, self.visual, "l2r", cache=self.cache)
        except CacheUnsupported as e:
            if self.cache.seen:  # a body cannot stop keeping what it kept: a bug, not a kind of body
                raise
            _warn_once(type(self.text.body), f"decoding without a key/value cache: {e}")
            self.cached, self.cache = False, None
            return self.logits(ids, valid, rows)
        self.cache.advance(ids.shape[1])
        return self.text.logits(feats[:, -1])

    def __call__(self, ids: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.logits(ids, valid, rows).float(), dim=-1)

    def reorder(self, src: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(src)
