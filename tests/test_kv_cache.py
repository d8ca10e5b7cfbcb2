"""The text-side family's key/value cache (vlp_bench.nn.kv_cache), for every registered member and
both kinds of text model (a BERT-style encoder and a copy of the causal LM): beam search with it
picks the very tokens it picks without, and every cached step gives the logits of the whole prefix
run again, after beams are reordered too. Prompts of different lengths, so left padding is in play."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_textside import TEXT_SIDE, build
from vlp_bench.data.images import ImageLoader
from vlp_bench.data.world.scenes import WorldConfig, render
from vlp_bench.data.world.stills import sample_scene
from vlp_bench.method import DecodingConfig
from vlp_bench.nn import kv_cache
from vlp_bench.nn.generation import beam_search, pad_rows
from vlp_bench.nn.kv_cache import StreamDecoder
from vlp_bench.textside import end_id, prefix_ids

BODIES = {"bert": {}, "llm": {"init": "llm", "text_layers": 1}}  # build(): the random BERT keeps 2 of its 4 layers
PROMPTS = ["a photo of", "Question: what color is the circle? Short answer:", "", "two"]  # "": the anchor alone


def world_images(n: int) -> torch.Tensor:
    """n tiny-world scenes, read as the random backbones' ViT reads its 64-pixel input."""
    cfg, rng = WorldConfig(), np.random.default_rng(7)
    loader = ImageLoader(64, (0.5,) * 3, (0.5,) * 3)
    return torch.stack([loader.from_image(render(sample_scene(cfg, rng), rng)) for _ in range(n)])


def prompt_rows(method, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_rows([prefix_ids(method.tokenizer, p) for p in prompts], method.tokenizer.pad_token_id, left=True)


def lengths_run(method) -> tuple[list[int], object]:
    """The number of positions the text model's body runs at each call, recorded until the handle's
    remove()."""
    seen = []
    handle = method.text.body.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("name", TEXT_SIDE)
def test_cached_beam_search_picks_the_same_tokens(name, body):
    method = build(name, **BODIES[body])
    visual = method.encode(world_images(len(PROMPTS)))
    ids, valid = prompt_rows(method, PROMPTS)
    assert not valid.all()  # left padding exercised
    eos, pad = end_id(method.tokenizer), method.tokenizer.pad_token_id
    for dec in (DecodingConfig(num_beams=3, max_new_tokens=10, min_new_tokens=2),
                DecodingConfig(num_beams=1, max_new_tokens=6, min_new_tokens=0)):
        decoder, moves = StreamDecoder(method.text, visual), []
        ran, recording = lengths_run(method)

        def reorder(src):
            moves.append(not torch.equal(src, torch.arange(len(src))))
            decoder.reorder(src)

        with torch.no_grad():
            cached = beam_search(decoder, ids, valid, dec, eos, pad, reorder=reorder)
            recording.remove()
            plain = beam_search(StreamDecoder(method.text, visual, cached=False), ids, valid, dec, eos, pad)
        assert cached == plain
        assert len(ran) > 2 and ran == [ids.shape[1]] + [1] * (len(ran) - 1)  # the prompt once, then a token a step
        assert decoder.cache is not None and decoder.cache.seen == ids.shape[1] + len(ran) - 1
        assert dec.num_beams == 1 or any(moves)  # beams did move: the cache followed them
    dec = DecodingConfig(num_beams=2, max_new_tokens=5, min_new_tokens=1)
    images = world_images(2)
    assert method.generate(images, PROMPTS[:2], dec) == method.generate(images, PROMPTS[:2], dec, cache=False)


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("name", TEXT_SIDE)
def test_each_cached_step_gives_the_logits_of_the_whole_prefix(name, body):
    """Rows are reordered between steps as beam search does (row r continues row src[r]), here
    even across images and with rows copied, then gain a random token."""
    method = build(name, **BODIES[body])
    visual = method.encode(world_images(3))
    ids, valid = prompt_rows(method, PROMPTS[:3])
    K = 2
    rows = torch.arange(3).repeat_interleave(K)
    ids, valid = ids.repeat_interleave(K, 0), valid.repeat_interleave(K, 0)
    cached, full = StreamDecoder(method.text, visual), StreamDecoder(method.text, visual, cached=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for step in range(6):
            got, want = cached.logits(ids, valid, rows), full.logits(ids, valid, rows)
            assert want.abs().amax() > 0.1  # logits worth comparing
            assert (got - want).abs().amax() < 1e-5, f"step {step}"
            src = torch.randperm(len(rows), generator=g)
            src[0] = src[-1]  # one row continued twice, another dropped
            cached.reorder(src)
            tok = torch.randint(len(method.tokenizer), (len(rows), 1), generator=g)
            ids, valid = torch.cat([ids[src], tok], 1), torch.cat([valid[src], torch.ones_like(tok, dtype=torch.bool)], 1)
            rows = rows[src]


def test_a_body_that_ignores_the_cache_is_decoded_without_one(monkeypatch, capsys):
    """A body that does not fill a Hugging Face cache (another architecture, an older transformers)
    is found at the first step: decoding goes on without the cache, the same tokens, one warning."""
    method = build("ar")
    images, dec = world_images(2), DecodingConfig(num_beams=2, max_new_tokens=5, min_new_tokens=1)
    want = method.generate(images, PROMPTS[:2], dec, cache=False)
    monkeypatch.setattr(kv_cache.StreamCache, "body_kwargs", lambda self: {})
    kv_cache._warn_once.cache_clear()
    assert method.generate(images, PROMPTS[:2], dec) == want
    assert method.generate(images, PROMPTS[:2], dec) == want
    assert capsys.readouterr().err.count("decoding without a key/value cache") == 1


def test_only_the_causal_stream_is_cached():
    method = build("ar")
    visual = method.encode(world_images(1))
    ids, valid = prompt_rows(method, PROMPTS[:1])
    cache = kv_cache.StreamCache(method.text.body, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="causal stream"):
        method.text.features(method.text.embed(ids), valid, visual, "r2l", cache=cache)
