"""Cached against uncached beam search of the text-side family (vlp_bench.nn.kv_cache).

    .venv/bin/python scripts/kv_cache_bench.py flops            # paper shape on the meta device
    .venv/bin/python scripts/kv_cache_bench.py time [tiny|paper] [images] [beams] [new]

flops: FLOPs of the decoding calls (vision encoder excluded: the same for both) for one image,
5 beams, a 30-token caption after [<s>] "a photo of", at the FLM paper's shape (CLIP ViT-B/32 at
288 px: 82 visual tokens; RoBERTa-base cut to 6 layers + 6 fusion layers, 768 wide, 12 heads).
time: wall-clock of beam_search (random weights, so no early EOS: every step runs), cached and
uncached, the same tokens checked; min of 2 repeats, torch threads = 2."""

from __future__ import annotations

import sys
import time

import torch

from vlp_bench.costmodel import flm_setting
from vlp_bench.nn.generation import DecodingConfig, beam_search
from vlp_bench.nn.kv_cache import StreamDecoder
from vlp_bench.registry import METHODS
from vlp_bench.textside import TextSideConfig
from vlp_bench.train.flops import FlopCounter

PROMPT_TOKENS = 4  # [<s>] + "a photo of" (the stand-in tokenizer: a token a word)


def method_at(shape: str, device: str):
    """AR (the family decodes alike: the l2r stream) with random weights at `shape`."""
    if shape == "paper":
        setting, cfg = flm_setting(device=device), METHODS.get("ar").paper_config
    else:  # the default tiny world's shapes: ViT 128 wide, 4 blocks, 64 px, patches of 8; BERT 128 x 4
        from transformers import BertConfig

        text = BertConfig(vocab_size=1027, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=512, pad_token_id=0, attn_implementation="sdpa")
        setting = flm_setting(device=device, image_size=64, text=text, patch_size=8, embed_dim=128, depth=4,
                              num_heads=4)
        cfg = TextSideConfig()
    torch.manual_seed(0)
    with torch.device(device):
        method = METHODS.get("ar")(cfg, setting.backbones)
    return method.eval(), setting.image_size


def flops(new_tokens: int = 30, beams: int = 5) -> None:
    method, size = method_at("paper", "meta")
    with torch.no_grad():
        visual = method.encode(torch.empty(1, 3, size, size, device="meta"))
        rows = torch.zeros(beams, dtype=torch.long)
        for cached in (False, True):
            decoder = StreamDecoder(method.text, visual, cached=cached)
            ids = torch.full((beams, PROMPT_TOKENS), 5)
            parts, rest = method.flop_parts()
            with FlopCounter(parts, rest) as counter:
                for _ in range(new_tokens):
                    decoder.logits(ids, torch.ones_like(ids, dtype=torch.bool), rows)
                    decoder.reorder(torch.arange(beams))
                    ids = torch.cat([ids, ids[:, -1:]], 1)
            total = counter.result.forward
            per_token = total / (new_tokens * beams)
            parts = {p: f"{v['forward'] / (new_tokens * beams) / 1e9:.3f}" for p, v in counter.result.by_part.items()}
            print(f"{'cached' if cached else 'uncached':>8}: {total / 1e9:9.1f} GFLOP for {beams} beams x {new_tokens} "
                  f"tokens; {per_token / 1e9:.3f} GFLOP per generated token (by part: {parts})")


def timed(shape: str, images: int, beams: int, new: int) -> None:
    torch.set_num_threads(2)
    method, size = method_at(shape, "cpu")
    dec = DecodingConfig(num_beams=beams, max_new_tokens=new, min_new_tokens=min(8, new))
    tok = method.tokenizer
    with torch.no_grad():
        visual = method.encode(torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(1)))
        lengths = [PROMPT_TOKENS - (i % 3) for i in range(images)]  # prompts of 2-4 tokens: left padding
        ids = torch.full((images, PROMPT_TOKENS), tok.pad_token_id)
        valid = torch.zeros_like(ids, dtype=torch.bool)
        for i, n in enumerate(lengths):
            ids[i, -n:], valid[i, -n:] = 5, True
        out, secs = {}, {}
        for cached in (True, False, True, False):
            decoder = StreamDecoder(method.text, visual, cached=cached)
            t = time.perf_counter()
            out[cached] = beam_search(decoder, ids, valid, dec, tok.eos_token_id, tok.pad_token_id, reorder=decoder.reorder)
            secs[cached] = min(secs.get(cached, 1e9), time.perf_counter() - t)
    assert out[True] == out[False], "cached and uncached decoding differ"
    steps = max(map(len, out[True]))
    print(f"{shape}: {images} images x {beams} beams, {new} new tokens (ran {steps}), prompts {lengths[:3]}...: "
          f"uncached {secs[False]:.2f} s, cached {secs[True]:.2f} s, speed-up {secs[False] / secs[True]:.2f}x; "
          f"same tokens")


if __name__ == "__main__":
    if sys.argv[1] == "flops":
        flops()
    else:
        timed(sys.argv[2], *map(int, sys.argv[3:6]))
