"""The tiny backbones' recipes, pre-trained here on the data's training split (vlp_bench.backbones.load
caches them, keyed by their config and data root; `vlp-bench prepare` does it ahead of time):
- tiny ViT (timm): pre-trained to predict the bag of words of an image's captions, so its patch
  tokens carry colours, shapes, counts and positions.
- tiny BERT (Hugging Face BertModel), where the bridges start (as the papers' start from
  bert-base-uncased): masked-LM pre-training on the training captions (and clips' references),
  BERT's recipe (15% of tokens; 80% [MASK], 10% random, 10% kept), read with the tiny LM's
  tokenizer plus [CLS], [SEP] and [MASK].
- tiny LM (Hugging Face Llama with rotary positions, tokenizer trained with `tokenizers`):
  pre-trained on *pairs* of references of one image ("<refs A> a photo of <ref B>", and
  "<refs A> Question: q Short answer: a"), so it learns to carry content from its context into
  what it writes, i.e. to read a soft visual prefix the way a real LLM reads its context.
  Rotary positions matter: learned absolute positions never see caption tokens after a long
  prefix (docs/methods.md, The tiny world).
The tiny LM is saved with `save_pretrained`, so loading it *is* the Hugging Face path.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp_bench.backbones.encoders import BertBackboneConfig, LLMConfig, VisionConfig
from vlp_bench.data.images import CaptionSplit, ImageLoader, TrainBatches
from vlp_bench.data.video import SPLIT_NAMES, annotation_files
from vlp_bench.errors import UserError
from vlp_bench.log import progress_bar
from vlp_bench.nn.generation import CAPTION_PROMPT

# the LM's pre-training pairs use the captioning prompt (CAPTION_PROMPT, as experiment.prompt)
VQA_PROMPT = "Question: {} Short answer:"


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


HELD_OUT = 512  # validation rows each tiny backbone's held-out loss is read on (its recipe records it)


def _val_split(root: Path) -> CaptionSplit | None:
    """The data root's validation captions, or None when it has none (no held-out loss then)."""
    try:
        return CaptionSplit(root, "val")
    except UserError:
        return None


def _held_out(model: nn.Module, batches, loss_of) -> float:
    """The mean of `loss_of(model, batch)` -> (loss, weight) over `batches`, in eval mode without
    gradients: the quality a tiny backbone's recipe records (and a cheaper recipe must keep)."""
    model.eval()
    total = weight = 0.0
    with torch.no_grad():
        for batch in batches:
            loss, w = loss_of(model, batch)
            total, weight = total + float(loss) * w, weight + w
    model.train()
    return round(total / weight, 6)


# ----------------------------------------------------------------------------- vision


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def tiny_vit(cfg: VisionConfig, num_classes: int) -> nn.Module:
    """The tiny ViT's architecture (untrained); num_classes = 0 for the encoder without its head."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
        num_heads=cfg.heads, num_classes=num_classes, global_pool="avg",
    )


def _caption_words(train: CaptionSplit) -> dict[str, int]:
    """The ViT's targets: words seen on at least 5 training images -> their class index."""
    counts = Counter(w for i in train.image_ids for w in set(_words(" ".join(train.refs[i]))))
    vocab = sorted(w for w, c in counts.items() if c >= 5)
    return {w: k for k, w in enumerate(vocab)}


def _bag_of_words(train: CaptionSplit, image_ids, index: dict[str, int]) -> torch.Tensor:
    """(B, vocabulary) multi-hot targets: the words of each image's references."""
    target = torch.zeros(len(image_ids), len(index))
    for row, image_id in enumerate(image_ids):
        for w in set(_words(" ".join(train.refs[image_id]))):
            if w in index:
                target[row, index[w]] = 1.0
    return target


def pretrain_tiny_vit(cfg: VisionConfig, train: CaptionSplit, out: Path) -> None:
    """Pre-train the tiny ViT on `train` (bag of words of the captions); write its encoder (head
    removed) to out/model.safetensors and its recipe to out/config.json."""
    index = _caption_words(train)
    torch.manual_seed(cfg.seed)
    model = tiny_vit(cfg, len(index))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.05)
    loader = ImageLoader(cfg.image_size, (0.5,) * 3, (0.5,) * 3)
    batches = TrainBatches(train, loader, min(cfg.pretrain_batch, len(train)), cfg.seed)
    bar = progress_bar(range(cfg.pretrain_steps), "pre-train tiny ViT")
    for step in bar:
        batch = next(batches)
        target = _bag_of_words(train, batch["image_ids"], index)
        _set_lr(opt, _cosine_lr(step, cfg.pretrain_steps, cfg.pretrain_lr, 50))
        loss = F.binary_cross_entropy_with_logits(model(batch["images"]), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    val = _val_split(train.root)
    held_out = None if val is None else _held_out(model, _vit_batches(val, loader, index), lambda m, b: (
        F.binary_cross_entropy_with_logits(m(b[0]), b[1]), len(b[0])))
    model.reset_classifier(0)
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({**asdict(cfg), "final_loss": loss.item(),
                                                 "held_out_loss": held_out}, indent=1))


def _vit_batches(val: CaptionSplit, loader: ImageLoader, index: dict[str, int]):
    """(images, bag-of-words targets) of the first HELD_OUT validation images, 64 at a time."""
    ids = val.image_ids[:HELD_OUT]
    for i in range(0, len(ids), 64):
        chunk = ids[i : i + 64]
        yield loader.batch([val.image_path(k) for k in chunk]), _bag_of_words(val, chunk, index)


# ----------------------------------------------------------------------------- language


def _lm_documents(root: Path, rng: random.Random, n: int, split: str = "train") -> list[str]:
    """Pre-training documents: context references of one image (or clip), then another in a prompt
    form. Clips (the root's msrvtt/ train split, when it has one) are drawn in proportion to their
    number, so the LM also knows how clips are described. Another `split` gives its images' alone."""
    train = CaptionSplit(root, split)
    clips = _clip_refs(root) if split == "train" and annotation_files(root) else []
    p_clip = len(clips) / (len(clips) + len(train))
    vqa = _vqa_pairs(root, split)
    docs = []
    for _ in range(n):
        clip = rng.random() < p_clip
        image_id = None if clip else rng.choice(train.image_ids)
        refs = (rng.choice(clips) if clip else train.refs[image_id])[:]
        rng.shuffle(refs)
        k = rng.randint(1, max(1, min(3, len(refs) - 1)))
        context = " ".join(refs[:k])
        if vqa.get(image_id) and rng.random() < 0.3:
            q, a = rng.choice(vqa[image_id])
            docs.append(f"{context} {VQA_PROMPT.format(q)} {a}")
        else:
            docs.append(f"{context} {CAPTION_PROMPT} {refs[k % len(refs)]}")
    return docs


def _clip_refs(root: Path) -> list[list[str]]:
    """The references of every training clip (no video is read)."""
    clips: dict[str, list[str]] = {}
    for path in annotation_files(root):
        data = json.loads(path.read_text())
        train = {v["video_id"] for v in data["videos"] if v["split"] in SPLIT_NAMES["train"]}
        for s in data["sentences"]:
            if s["video_id"] in train:
                clips.setdefault(s["video_id"], []).append(s["caption"])
    return [clips[k] for k in sorted(clips)]


def _vqa_pairs(root: Path, split: str = "train") -> dict[int, list[tuple[str, str]]]:
    """(question, answer) pairs of each image of `split`, from the root's vqa/ files (none without them)."""
    qs, anns = root / "vqa" / f"questions_{split}.json", root / "vqa" / f"annotations_{split}.json"
    if not (qs.is_file() and anns.is_file()):
        return {}
    questions = {q["question_id"]: q for q in json.loads(qs.read_text())["questions"]}
    pairs: dict[int, list[tuple[str, str]]] = {}
    for a in json.loads(anns.read_text())["annotations"]:
        q = questions.get(a["question_id"])
        if q is not None:
            pairs.setdefault(q["image_id"], []).append((q["question"], a["multiple_choice_answer"]))
    return pairs


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, as a PreTrainedTokenizerFast whose BOS, EOS
    and padding token is <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos)


def tiny_llama(cfg: LLMConfig, vocab: int, eos_id: int = 0, pad_id: int = 0) -> nn.Module:
    """The tiny LM's architecture (untrained), also built on the meta device by `vlp-bench flops`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
        num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=eos_id,
        eos_token_id=eos_id, pad_token_id=pad_id,
    ))


def lm_tokenizer(cfg: LLMConfig, root: Path, docs: list[str] | None = None):
    """The tiny LM's tokenizer: BPE trained on the first 20,000 of its pre-training documents (`docs`
    when given, else drawn again: the same ones, from the same seed)."""
    n = min(20000, cfg.pretrain_steps * cfg.pretrain_batch)
    return train_tokenizer(docs[:n] if docs is not None else _lm_documents(root, random.Random(cfg.seed), n),
                           cfg.vocab_size)


def pretrain_tiny_lm(cfg: LLMConfig, root: Path, out: Path) -> None:
    """Train the tiny LM's tokenizer and pre-train the LM on pairs of references from the data
    root's training split; save both to `out` (save_pretrained) with the recipe in out/recipe.json."""
    docs = _lm_documents(root, random.Random(cfg.seed), cfg.pretrain_steps * cfg.pretrain_batch)
    tokenizer = lm_tokenizer(cfg, root, docs)
    torch.manual_seed(cfg.seed)
    model = tiny_llama(cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    bar = progress_bar(range(cfg.pretrain_steps), "pre-train tiny LM")
    for step in bar:
        chunk = docs[step * cfg.pretrain_batch : (step + 1) * cfg.pretrain_batch]
        _set_lr(opt, _cosine_lr(step, cfg.pretrain_steps, cfg.pretrain_lr, 100))
        loss = _lm_loss(model, tokenizer, chunk)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    held_out = None
    if _val_split(root) is not None:  # documents of validation images: how well it reads its context
        val = _lm_documents(root, random.Random(f"held-out:{cfg.seed}"), HELD_OUT, "val")
        held_out = _held_out(model, (val[i : i + 64] for i in range(0, len(val), 64)),
                             lambda m, chunk: _lm_loss(m, tokenizer, chunk))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "recipe.json").write_text(json.dumps({**asdict(cfg), "final_loss": loss.item(),
                                                 "held_out_loss": held_out}, indent=1))


def _lm_loss(model: nn.Module, tokenizer, docs: list[str]) -> tuple[torch.Tensor, int]:
    """The LM's mean loss over the tokens of `docs` (each ended by EOS), and their number."""
    enc = tokenizer([d + tokenizer.eos_token for d in docs], return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return model(**enc, labels=labels).loss, int((labels[:, 1:] != -100).sum())


# ----------------------------------------------------------------------------- BERT


def _bert_captions(root: Path, split: str = "train") -> list[str]:
    """The captions of the root's images of `split` (and of its training clips, when it has some)."""
    train = CaptionSplit(root, split)
    clips = _clip_refs(root) if split == "train" and annotation_files(root) else []
    return [c for i in train.image_ids for c in train.refs[i]] + [c for refs in clips for c in refs]


def _bert_rows(captions: list[str], tokenizer) -> list[list[int]]:
    """[CLS] caption tokens (at most 62) [SEP], one row per caption."""
    return [[tokenizer.cls_token_id, *tokenizer(c, add_special_tokens=False).input_ids[:62], tokenizer.sep_token_id]
            for c in captions]


def _mlm_batch(rows: list[list[int]], tokenizer, gen: torch.Generator | None = None):
    """(inputs, valid, targets) of BERT's masked LM over token rows: 15% of the tokens between
    [CLS] and [SEP] chosen (at least one per batch), then 80% [MASK], 10% a random token, 10%
    unchanged; targets are -100 where nothing is predicted. `gen`: the random stream (global: None)."""
    ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id)
    valid = torch.zeros(ids.shape, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], valid[i, : len(r)] = torch.tensor(r), True
    inner = valid.clone()
    inner[:, 0] = False  # [CLS] and [SEP] are never predicted
    inner[torch.arange(len(rows)), valid.sum(1) - 1] = False
    chosen = (torch.rand(ids.shape, generator=gen) < 0.15) & inner
    chosen[0, 1] |= not chosen.any()  # at least one target, so the loss is defined
    roll = torch.rand(ids.shape, generator=gen)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = torch.randint(len(tokenizer), (int(swap.sum()),), generator=gen)
    return inputs, valid, ids.masked_fill(~chosen, -100)


def _mlm_loss(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
    """The masked-LM loss of an `_mlm_batch` and the number of tokens it predicts."""
    inputs, valid, targets = batch
    logits = model(input_ids=inputs, attention_mask=valid.long()).logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), int((targets != -100).sum())


def pretrain_tiny_bert(cfg: BertBackboneConfig, root: Path, llm_tokenizer, out: Path) -> None:
    """Pre-train a BERT-style encoder with masked LM on the root's training captions, read with the
    LLM's tokenizer plus [CLS], [SEP] and [MASK]; save model and tokenizer to `out` (save_pretrained),
    the recipe in out/recipe.json. docs/decisions.md has the measurement behind it."""
    import copy

    from transformers import BertConfig, BertForMaskedLM

    tokenizer = copy.deepcopy(llm_tokenizer)
    tokenizer.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"})
    rows = _bert_rows(_bert_captions(root), tokenizer)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=cfg.width, num_hidden_layers=cfg.depth,
                                       num_attention_heads=cfg.heads, intermediate_size=4 * cfg.width,
                                       pad_token_id=tokenizer.pad_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    bar = progress_bar(range(cfg.pretrain_steps), "pre-train tiny BERT")
    for step in bar:
        batch = _mlm_batch(rng.sample(rows, min(cfg.pretrain_batch, len(rows))), tokenizer)
        _set_lr(opt, _cosine_lr(step, cfg.pretrain_steps, cfg.pretrain_lr, 100))
        loss = _mlm_loss(model, batch)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    held_out = None
    if _val_split(root) is not None:  # validation captions under fixed masks
        gen = torch.Generator().manual_seed(cfg.seed)
        val = _bert_rows(_bert_captions(root, "val")[:HELD_OUT], tokenizer)
        held_out = _held_out(model, [_mlm_batch(val[i : i + 64], tokenizer, gen) for i in range(0, len(val), 64)],
                             _mlm_loss)
    model.bert.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "recipe.json").write_text(json.dumps({**asdict(cfg), "final_loss": loss.item(),
                                                 "held_out_loss": held_out}, indent=1))
