"""The FLM reference's masking and corruption sampling (methods/corruption.py): word grouping,
whole-word masking, BERT's 80/10/10 replacement and FLM's span extents, by their rules and rates."""

from __future__ import annotations

import pytest
import torch
from transformers import BertTokenizer

from vlp_bench.methods.corruption import replace_80_10_10, span_extents, whole_word_mask, word_ids

PIECES = ["a", "the", "of", "two", "big", "small", "blue", "green", "left", "above", "star", "square",
          "red", "##dish", "cir", "##cle", "tri", "##ang", "##le"]
WORDS = ["a", "the", "of", "two", "big", "small", "blue", "green", "left", "above", "star", "square",
         "red", "reddish", "circle", "triangle"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> BertTokenizer:
    """An offline WordPiece tokenizer that splits some words into two or three pieces."""
    path = tmp_path_factory.mktemp("wordpiece") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *PIECES]) + "\n")
    return BertTokenizer(str(path))


def rows(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, targets): [CLS] caption [SEP] [PAD]..., targets = the caption and its [SEP] (vlp-bench's)."""
    enc = tokenizer(captions, padding=True, return_tensors="pt")
    targets = enc["attention_mask"].bool()
    targets[:, 0] = False
    return enc["input_ids"], targets


def random_captions(tokenizer, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` rows drawn from 64 random captions of 4 to 12 words."""
    g = torch.Generator().manual_seed(0)
    captions = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (int(k),), generator=g))
                for k in torch.randint(4, 13, (64,), generator=g)]
    ids, targets = rows(tokenizer, captions)
    pick = torch.randint(len(captions), (count,), generator=g)
    return ids[pick], targets[pick]


def test_word_ids_groups_wordpiece_continuations_with_their_word(tokenizer):
    ids, targets = rows(tokenizer, ["a reddish circle", "triangle of two"])
    assert tokenizer.convert_ids_to_tokens(ids[0].tolist())[:6] == ["[CLS]", "a", "red", "##dish", "cir", "##cle"]
    assert word_ids(tokenizer, ids, targets).tolist() == [[-1, 0, 1, 1, 2, 2, 3],
                                                          [-1, 0, 0, 0, 1, 2, 3]]
    ids = torch.tensor([[2, tokenizer.convert_tokens_to_ids("##dish"), 3]])  # a row's first target starts a word
    assert word_ids(tokenizer, ids, torch.tensor([[False, True, True]])).tolist() == [[-1, 0, 1]]


def test_whole_word_mask_masks_whole_words_at_the_configured_rate(tokenizer):
    torch.manual_seed(0)
    ids, targets = random_captions(tokenizer, 2000)
    words = word_ids(tokenizer, ids, targets)
    masked = whole_word_mask(words, targets, 0.15)
    assert not (masked & ~targets).any()
    slot = words.clamp(min=0)
    size = torch.zeros(ids.shape, dtype=torch.long).scatter_add_(1, slot, targets.long())
    hit = torch.zeros(ids.shape, dtype=torch.long).scatter_add_(1, slot, masked.long())
    assert ((hit == 0) | (hit == size)).all()  # every word fully masked or not at all
    assert (size > 1).any() and (hit[size > 1] > 0).any()  # multi-piece words are masked too
    assert targets.sum() > 20_000
    assert abs(masked.sum() / targets.sum() - 0.15) < 0.01


def test_whole_word_mask_edges(tokenizer):
    ids, targets = rows(tokenizer, ["a small star", "reddish circle"])
    words = word_ids(tokenizer, ids, targets)
    assert torch.equal(whole_word_mask(words, targets, 1.0), targets)
    targets[0] = False  # nothing drawn at rate 0: the first row with targets gets its first word, whole
    assert whole_word_mask(words, targets, 0.0).tolist() == [[False] * 6, [False, True, True, False, False, False]]


def test_whole_word_mask_is_deterministic_under_a_seed(tokenizer):
    ids, targets = random_captions(tokenizer, 64)
    words = word_ids(tokenizer, ids, targets)
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(whole_word_mask(words, targets, 0.3))
    assert torch.equal(*draws)


def test_replace_80_10_10_shares():
    vocab, mask_id = 1_000_000, 7  # a random draw hits the token itself once in a million
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, vocab, (200, 500), generator=g)
    masked = torch.rand(ids.shape, generator=g) < 0.5

    def share(where: torch.Tensor) -> float:
        return float(where[masked].float().mean())

    torch.manual_seed(0)
    out, by_mask, kept = replace_80_10_10(ids, masked, mask_id, vocab)
    assert torch.equal(out[~masked], ids[~masked]) and not (by_mask & ~masked).any()
    assert (out[by_mask] == mask_id).all()
    assert abs(share(by_mask) - 0.8) < 0.01
    assert abs(share((out != ids) & ~by_mask) - 0.1) < 0.01
    assert abs(share(out == ids) - 0.1) < 0.01 and torch.equal((out == ids) & masked, kept)
    torch.manual_seed(0)
    same, by_mask_none, _ = replace_80_10_10(ids, masked, None, vocab)  # a learned embedding goes there instead
    assert torch.equal(by_mask_none, by_mask) and torch.equal(same[by_mask], ids[by_mask])


def spans(rate: float, n: int, B: int = 8000, lo: int = 3) -> tuple[torch.Tensor, ...]:
    """(pos, start, end) for every position of B rows whose caption is lo .. lo + n - 1."""
    pos = torch.arange(lo + n + 2)[None].expand(B, -1)
    return (pos, *span_extents(pos, torch.tensor(n), torch.tensor(lo), torch.tensor(lo + n - 1), rate))


def test_span_length_is_the_rate_times_the_caption_and_centred_on_the_target():
    torch.manual_seed(0)
    rate, n, lo = 0.2, 41, 3
    pos, start, end = spans(rate, n, lo=lo)
    middle = (pos >= lo + 15) & (pos <= lo + n - 16)  # far from both ends: no truncation
    assert abs(float((end - start + 1)[middle].float().mean()) - rate * n) < 0.05
    assert abs(float(((start + end) / 2 - pos)[middle].mean())) < 0.03


def test_spans_are_truncated_at_the_caption_ends():
    """At the right end the span is cut; at the left it is moved to begin on the slot before the
    caption (the reference's [CLS]), so it loses one token: means rate * n - 1 there, vs 1 + E[extra/2]."""
    torch.manual_seed(0)
    rate, n, lo = 0.2, 41, 3
    pos, start, end = spans(rate, n, lo=lo)
    length = (end - start + 1).float()
    at_lo, at_hi = pos == lo, pos == lo + n - 1
    assert (start[at_lo] == lo).all() and (end[at_hi] == lo + n - 1).all()
    assert abs(float(length[at_lo].mean()) - (rate * n - 1)) < 0.1
    assert abs(float(length[at_hi].mean()) - (1 + (rate * n - 1) / 2)) < 0.1


def test_span_rule_at_full_rate():
    """rate 1: extra = n - 1, left = (n - 1) / 2 for odd n: the exact spans of the reference's rule."""
    _, start, end = spans(1.0, 5, B=1, lo=1)
    caption = slice(1, 6)
    assert start[0, caption].tolist() == [1, 1, 1, 2, 3]
    assert end[0, caption].tolist() == [4, 4, 5, 5, 5]


@pytest.mark.parametrize("rate", [0.0, 0.15, 0.5, 1.0])
def test_spans_hold_their_target_and_stay_in_the_caption(rate):
    torch.manual_seed(1)
    B, L = 500, 40
    lo = torch.randint(1, 6, (B, 1))
    n = torch.randint(1, 30, (B, 1))
    hi = lo + n - 1
    pos = torch.arange(L)[None].expand(B, L)
    start, end = span_extents(pos, n, lo, hi, rate)
    inside = (pos >= lo) & (pos <= hi)
    assert (start <= pos).all() and (pos <= end).all()
    assert (start[inside] >= lo.expand(B, L)[inside]).all() and (end[inside] <= hi.expand(B, L)[inside]).all()
    assert torch.equal(start[~inside], pos[~inside]) and torch.equal(end[~inside], pos[~inside])
    if rate == 0.0:
        assert torch.equal(start, pos) and torch.equal(end, pos)
