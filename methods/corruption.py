"""The masking and corruption sampling of the FLM reference code (TencentARC/FLM) as pure, vectorised
torch functions on CPU tensors, deterministic under torch.manual_seed. Rows are (B, L) token grids;
`targets` (B, L) marks the tokens an objective may hide and predict (vlp-bench: a caption and its EOS).

Masked LM: the reference's configs `mlm` and `flm` set whole_word_masking=True, which selects its
DataCollatorForWholeWordMask (flm/datamodules/datamodule_base.py:173-182; the class is in
flm/utils/whole_word_masking.py, "wwm.py" below).

- word_ids: wwm.py:66-73 groups a token with the previous candidate (any token but the strings
  "[CLS]" and "[SEP]") iff its string starts with "##", WordPiece's continuation mark; otherwise it
  starts a word. BPE tokenizers (RoBERTa, which FLM's released pre-training used, README.md:34;
  GPT-2; the tiny world's byte-level BPE) mark word *starts* ("Ġ") and produce no "##" pieces, so
  there every token is its own word and the reference's "whole-word" masking is token-level masking
  (flm/config.py:97 says it does not work for RoBERTa). That rule is what ran, so it is the rule here.
- whole_word_mask: wwm.py:75-96 shuffles the words and takes each one that still fits the budget,
  skipping one that would overshoot it. Its budget, max(1, round(0.15 * len)), counts the row padded
  to max_text_len = 50 (flm/datasets/base_dataset.py:150-156, flm/config.py:94), [PAD]s included
  among the candidates; mask_tokens then drops the specials and padding it drew (wwm.py:118-125):
  8 of 48 candidates (BERT) or 8 of 50 (RoBERTa: "<s>", "</s>" are candidates too), i.e. up to 17%
  or 16% of a caption rather than 15% (less where multi-piece words are skipped), and never its
  [SEP]/"</s>" (to match, leave EOS out of `targets`). Here the budget is
  random_round(rate * n) of each row's n targets, so the expected rate is exactly `rate` (for
  single-token words; skipped words can leave a row short, as in the reference).
- replace_80_10_10: wwm.py:130-141: of the masked tokens 80% become [MASK], half of the rest (10%)
  a uniformly random id of the whole vocabulary (it may draw the token itself), the last 10% stay.

FLM span corruption: get_corr_bi_attention_mask (flm/modules/flm_tools.py:5-34), used when
span_corruption_rate > 0 (flm/modules/flm_module.py:569-571); see span_extents.
"""

from __future__ import annotations

import torch

from vlp_bench.textside import random_round


def word_ids(tokenizer, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, L) long: the index, within its row, of the word each target token belongs to (-1 outside
    the targets). A token whose string starts with "##" joins the previous target's word, any other
    token (and a row's first target) starts one: the reference's rule (wwm.py:66-73)."""
    uniq, inverse = ids.unique(return_inverse=True)  # look each distinct id up once
    pieces = tokenizer.convert_ids_to_tokens(uniq.tolist())
    continues = torch.tensor([p.startswith("##") for p in pieces], dtype=torch.bool)[inverse]
    starts = targets & (~continues | (targets.cumsum(1) == 1))
    return torch.where(targets, starts.cumsum(1) - 1, -1)


def whole_word_mask(words: torch.Tensor, targets: torch.Tensor, rate: float) -> torch.Tensor:
    """(B, L) bool, whole words masked: per row, its words (`words` from word_ids) in random order,
    each taken while it fits the row's budget of random_round(rate * n) tokens (n = its targets) and
    skipped if it would exceed it, as the reference does (wwm.py:75-96). If nothing in the batch is
    masked, the first word of the first row with targets is, so the loss is defined."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    B = words.shape[0]
    slot = words.clamp(min=0)
    sizes = torch.zeros(B, int(words.max().clamp(min=0)) + 1, dtype=torch.long).scatter_add_(1, slot, targets.long())
    budget = random_round(rate * targets.sum(1))  # (B,)
    order = torch.rand(sizes.shape).argsort(1)  # each row's words shuffled (absent words have size 0)
    shuffled = sizes.gather(1, order)
    take = torch.zeros(sizes.shape, dtype=torch.bool)
    used = torch.zeros(B, dtype=torch.long)
    for k in range(shuffled.shape[1]):  # words in turn, all rows at once: the greedy fill is sequential
        take[:, k] = used + shuffled[:, k] <= budget
        used += take[:, k] * shuffled[:, k]
    masked = torch.zeros_like(take).scatter_(1, order, take).gather(1, slot) & targets
    if targets.any() and not masked.any():
        row = int(targets.any(1).nonzero()[0])
        masked[row] = targets[row] & (words[row] == 0)
    return masked


def replace_80_10_10(ids: torch.Tensor, masked: torch.Tensor, mask_id: int | None,
                     vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERT's replacement of the masked tokens, as the reference's mask_tokens draws it (wwm.py:130-141):
    80% -> mask_id, 10% -> a uniform id in [0, vocab), 10% kept. Returns (ids, by_mask, kept), (B, L)
    masks of the 80% and of the 10% left visible; with mask_id None the 80%'s ids are left as they
    were, for the caller to put a learned mask embedding there instead."""
    u = torch.rand(ids.shape)
    by_mask = masked & (u < 0.8)
    by_random = masked & (u >= 0.8) & (u < 0.9)
    out = torch.where(by_random, torch.randint(vocab, ids.shape, dtype=ids.dtype), ids)
    if mask_id is not None:
        out = out.masked_fill(by_mask, mask_id)
    return out, by_mask, masked & (u >= 0.9)


def span_extents(pos: torch.Tensor, n: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive (start, end) (B, L) of the span hidden from the target at `pos`, sampled as the
    reference's get_corr_bi_attention_mask does (flm/modules/flm_tools.py); n (the caption's token
    count), lo, hi (its first and last token) broadcast against pos (B, L). Positions outside
    [lo, hi] get (pos, pos).

    n: the reference's text_len (flm_tools.py:13) is the number of keys query i may read, plus one.
    Its mask (flm_module.py:538-563, causal config) lets i read the forward keys 1..i-1 and the
    reverse keys i+1..T, never [CLS] at 0, where T is the row's last real token ([SEP]/"</s>"); so
    text_len = T: the row's tokens after [CLS], i.e. the caption and its [SEP], which are also the
    tokens FLM predicts (labels input_ids[:, 1:], flm/datasets/base_dataset.py:285). vlp-bench's
    targets are exactly that, a caption and its EOS, so n = their count.

    Sampling (flm_tools.py:16-24): extra = Binomial(n - 1, max(0, (rate * n - 1) / (n - 1))) tokens
    hidden besides the target, mean rate * n - 1 when rate * n >= 1 (the reference's n - 1 + 1e-5,
    a guard against n = 1, is a clamp here); left = extra // 2, plus one with probability 1/2 if extra
    is odd; s = max(pos - left, lo - 1); end = min(s + extra, hi); start = max(s, lo). The reference
    clamps the start at 0, the [CLS] slot just before the caption that no query reads, and ends the
    span at start + extra (l. 23-24): a span reaching past the caption's left end is moved right to
    begin on that slot, so it keeps `extra` of its 1 + extra tokens; past the right end it is cut.
    The draws are made as the reference makes them (a binomial, then a Bernoulli, per position), so
    given its per-query text_len as n and the same seed they give its spans exactly."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    pos, n, lo, hi = torch.broadcast_tensors(pos, n, lo, hi)
    others = (n - 1).clamp(min=0).float()
    extra = torch.binomial(others, ((rate * n - 1) / others.clamp(min=1)).clamp(min=0)).long()
    left = extra // 2 + torch.bernoulli((extra % 2) / 2).long()
    s = torch.maximum(pos - left, lo - 1)
    inside = (pos >= lo) & (pos <= hi)
    return torch.where(inside, s.maximum(lo), pos), torch.where(inside, torch.minimum(s + extra, hi), pos)
