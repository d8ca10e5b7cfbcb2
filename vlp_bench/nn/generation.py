"""Text generation and the language-model loss shared by every method: token rows and padding, the
prefix LM loss behind a soft prompt, beam search through a frozen Hugging Face LLM from a soft
prompt, and a beam search for models that are not Hugging Face generators (the text-side family's
decoder), whose scorer may keep state across steps (a key/value cache: vlp_bench.nn.kv_cache)."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# BLIP-2's captioning prompt: the text between the soft prompt and the caption, in training
# (experiment.prompt), in decoding (tasks.caption) and in the tiny LM's pre-training pairs
CAPTION_PROMPT = "a photo of"


@dataclass
class DecodingConfig:
    prompt: str = CAPTION_PROMPT
    num_beams: int = 5  # BLIP-2's decoding: beam 5, max 30, min 8 new tokens
    max_new_tokens: int = 30
    min_new_tokens: int = 8
    batch_size: int = 64  # images per generate() call; memory only, results do not depend on it


def _embed(llm: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return llm.get_input_embeddings()(ids)


def pad_rows(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows -> (ids (B, L), valid (B, L) bool), padded on the right (or the left)."""
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), L), dtype=torch.bool)
    for r, row in enumerate(rows):
        if row:
            span = slice(L - len(row), L) if left else slice(0, len(row))
            ids[r, span] = torch.tensor(row)
            valid[r, span] = True
    return ids, valid


def lm_rows(tokenizer, prompt: str | list[str], targets: list[str]) -> tuple[list, list[list[int]]]:
    """(prompt ids, one row per target: its prompt's ids + target ids + EOS). `prompt` is one for
    every row (its ids are returned once) or a list of one per row (each row's ids are returned, in a
    list: VQA fine-tuning, a question each)."""
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids if prompt else []
        return prompt_ids, [prompt_ids + _target_ids(tokenizer, t) for t in targets]
    if len(prompt) != len(targets):
        raise ValueError(f"{len(prompt)} prompts for {len(targets)} targets: give one prompt, or one per target")
    prompt_ids = [lm_rows(tokenizer, p, [])[0] for p in prompt]
    return prompt_ids, [p + _target_ids(tokenizer, t) for p, t in zip(prompt_ids, targets)]


def _target_ids(tokenizer, target: str) -> list[int]:
    return tokenizer(" " + target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def prefix_lm_loss(llm, tokenizer, prefix: torch.Tensor, prompt: str | list[str],
                   targets: list[str]) -> tuple[torch.Tensor, int]:
    """Causal LM loss of `targets` (+ EOS) after [soft prefix][prompt] (prefix and prompt get no
    loss; `prompt`: one for all rows or one per row, as lm_rows), and the number of target tokens
    it is the mean over."""
    device = prefix.device
    prompt_ids, rows = lm_rows(tokenizer, prompt, targets)
    ids, valid = pad_rows(rows, tokenizer.pad_token_id)  # right padding: pads come last and get no loss
    starts = [len(prompt_ids)] * len(rows) if isinstance(prompt, str) else [len(p) for p in prompt_ids]
    in_prompt = torch.arange(ids.shape[1])[None, :] < torch.tensor(starts, dtype=torch.long)[:, None]
    labels = ids.masked_fill(~valid | in_prompt, -100)  # nor does the prompt
    n_targets = int((labels != -100).sum())  # counted on the CPU (the device may be meta)
    ids, labels, mask = ids.to(device), labels.to(device), valid.long().to(device)
    B, P, _ = prefix.shape
    L = ids.shape[1]
    text = _embed(llm, ids)  # embedded once: `vlp-bench validate` counts the LLM's text positions here
    embeds = torch.cat([prefix.to(text.dtype), text], dim=1)
    attn = torch.cat([torch.ones(B, P, dtype=torch.long, device=device), mask], dim=1)
    if bool(valid.all()):  # no padding: the causal mask alone (same result; and no data-dependent
        attn = None  # mask check, so the meta device of `vlp-bench flops` can run it)
    # text token j sits at position P + j and is predicted by the logits at position P + j - 1, so only
    # the last L + 1 positions need the LM head (the prefix's would be a fifth of a tiny step's FLOPs)
    logits = _logits(llm, embeds, attn, keep=L + 1)[:, -L - 1 : -1]  # (B, L, V)
    loss = F.cross_entropy(logits.float().reshape(B * L, -1), labels.reshape(-1))
    return loss, n_targets


@functools.cache
def _keeps_logits(model_class: type) -> bool:
    """Whether a Hugging Face model class's forward takes `logits_to_keep` (read once per class,
    not on every training step)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _logits(llm, embeds: torch.Tensor, attn: torch.Tensor | None, keep: int) -> torch.Tensor:
    """The LM's logits at the last `keep` positions (all of them from a model without
    `logits_to_keep`: the same values, more FLOPs)."""
    if _keeps_logits(type(llm)):
        return llm(inputs_embeds=embeds, attention_mask=attn, use_cache=False, logits_to_keep=keep).logits
    return llm(inputs_embeds=embeds, attention_mask=attn, use_cache=False).logits[:, -keep:]


@torch.no_grad()
def generate_from_prefix(llm, tokenizer, prefix: torch.Tensor, prompts: list[str], dec: DecodingConfig) -> list[str]:
    """Beam search through the frozen LLM from [soft prefix][prompt]; prompts are left-padded."""
    device = prefix.device
    prompt_ids = [tokenizer(p, add_special_tokens=True).input_ids if p else [] for p in prompts]
    ids, valid = pad_rows(prompt_ids, tokenizer.pad_token_id, left=True)
    ids, text_mask = ids.to(device), valid.long().to(device)
    B, P, _ = prefix.shape
    # left padding: [pads][prefix][prompt] so every row ends where generation starts
    text = _embed(llm, ids)
    embeds = torch.cat([prefix.to(text.dtype), text], dim=1)
    attn = torch.cat([torch.ones(B, P, dtype=torch.long, device=device), text_mask], dim=1)
    if not bool(valid.all()):  # move each row's pads to the front
        order = torch.argsort(attn, dim=1, stable=True)
        embeds = torch.gather(embeds, 1, order.unsqueeze(-1).expand_as(embeds))
        attn = torch.gather(attn, 1, order)
    out = llm.generate(
        inputs_embeds=embeds, attention_mask=attn, num_beams=dec.num_beams, do_sample=False,
        max_new_tokens=dec.max_new_tokens, min_new_tokens=dec.min_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def beam_search(next_logprobs, ids: torch.Tensor, valid: torch.Tensor, dec: DecodingConfig, eos: int,
                pad: int, reorder=None) -> list[list[int]]:
    """Beam search over left-padded prompts (B, L) with the scoring of Hugging Face's default: a
    finished hypothesis scores its summed log-probability over its generated length; EOS is barred
    before min_new_tokens; a row stops once its best open beam cannot beat its worst finished one.
    next_logprobs(ids, valid, rows) -> (R, V) log-probabilities of the next token (rows: the image
    of each sequence). reorder(src), when given, is told how the rows were reordered before each
    step after the first (row r continues row src[r], then gains a token), so a scorer can keep
    per-row state (a key/value cache) in step. Returns the generated tokens of each row, without EOS."""
    B, K, device = ids.shape[0], dec.num_beams, ids.device
    rows = torch.arange(B, device=device).repeat_interleave(K)
    ids, valid = ids.repeat_interleave(K, 0), valid.repeat_interleave(K, 0)
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # the beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    new: list[list[int]] = [[] for _ in range(B * K)]
    for t in range(dec.max_new_tokens):
        logp = next_logprobs(ids, valid, rows).to(device)  # (B*K, V)
        if t < dec.min_new_tokens:
            logp[:, eos] = float("-inf")
        V = logp.shape[1]
        cand = (scores.view(-1, 1) + logp).view(B, K * V)
        top, idx = cand.topk(2 * K, dim=1)
        keep_src, keep_tok, keep_score = [], [], []
        for b in range(B):
            chosen = []
            for s, j in zip(top[b].tolist(), idx[b].tolist()):
                src, tok = b * K + j // V, j % V
                if s == float("-inf"):
                    break
                if tok == eos:
                    if not done[b]:
                        finished[b].append((s / (t + 1), new[src]))
                    continue
                chosen.append((src, tok, s))
                if len(chosen) == K:
                    break
            while len(chosen) < K:  # only when nearly everything is barred: pad with dead beams
                chosen.append((b * K, pad, float("-inf")))
            if len(finished[b]) >= K:
                finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
                best_open = chosen[0][2] / (t + 1)
                done[b] = done[b] or best_open <= finished[b][-1][0]
            for src, tok, s in chosen:
                keep_src.append(src)
                keep_tok.append(tok)
                keep_score.append(s if not done[b] else float("-inf"))
        if all(done):
            break
        src = torch.tensor(keep_src, device=device)
        tok = torch.tensor(keep_tok, device=device)
        new = [new[s] + [k] for s, k in zip(keep_src, keep_tok)]
        if reorder is not None:
            reorder(src)
        ids = torch.cat([ids[src], tok[:, None]], dim=1)
        valid = torch.cat([valid[src], torch.ones_like(valid[:, :1])], dim=1)
        scores = torch.tensor(keep_score, device=device).view(B, K)
    out = []
    for b in range(B):
        if not done[b]:  # out of steps: the open beams compete with the finished ones
            for k in range(K):
                s = float(scores[b, k])
                if s != float("-inf"):
                    finished[b].append((s / dec.max_new_tokens, new[b * K + k]))
        out.append(max(finished[b], key=lambda h: h[0])[1] if finished[b] else new[b * K])
    return out
