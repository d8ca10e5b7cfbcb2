"""Shared fixtures: tiny random backbones (instant) and a tiny world + pre-trained backbones cache
(built once per session), so every test runs on CPU in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlp_bench.backbones import Backbones, VisionEncoder, tiny_vit, train_tokenizer, freeze, VisionConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # `pytest -n N`: each worker its share of the cores
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# A tiny experiment: the same code path as the default one, sized to finish in seconds.
TINY = [
    "experiment.methods=['baseline']",  # one method unless a test names others
    "world.n_train=96", "world.n_val=16", "world.n_test=16",
    "world.n_clips_train=32", "world.n_clips_val=8", "world.n_clips_test=8",
    "vision.pretrain_steps=20", "vision.width=32", "vision.depth=1", "vision.heads=2",
    "llm.pretrain_steps=20", "llm.width=32", "llm.depth=1", "llm.heads=2", "llm.vocab_size=400",
    "bert.name=''",  # bridges from random init (test_e2e runs the tiny BERT the default pre-trains)
    "train.steps=6", "train.batch_size=8", "train.warmup_steps=2", "train.log_every=2",
    "train.eval_every=4", "train.eval_images=4", "train.warmup_exclude=1", "train.val_loss_images=8",
    "methods.baseline.width=32", "methods.baseline.depth=1", "methods.baseline.heads=2",
    "methods.simvlg.width=32", "methods.simvlg.depth=2", "methods.simvlg.heads=2",
    "methods.blip2.width=32", "methods.blip2.depth=2", "methods.blip2.heads=2", "methods.blip2.num_queries=4",
    "tasks.caption.num_beams=2", "tasks.caption.max_new_tokens=6", "tasks.caption.min_new_tokens=2",
    "tasks.vqa.num_beams=2", "tasks.vqa.max_new_tokens=3",
    "methods.simvlg-video.width=32", "methods.simvlg-video.depth=2", "methods.simvlg-video.heads=2",
    "methods.simvlg-video.temporal_dim=16", "methods.simvlg-video.temporal_heads=2",
    "tasks.video_caption.num_beams=2", "tasks.video_caption.max_new_tokens=6", "tasks.video_caption.min_new_tokens=2",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vlp-cache")


@pytest.fixture(scope="session")
def tiny_overrides(cache_dir) -> list[str]:
    return [*TINY, f"experiment.cache='{cache_dir}'", "experiment.threads=1"]


@pytest.fixture(scope="session")
def shared_experiment(tmp_path_factory, tiny_overrides):
    """One tiny experiment through the CLI, read (never changed) by the end-to-end and report tests:
    baseline and simvlg (which merges, so it draws its token groups), two seeds each."""
    out = tmp_path_factory.mktemp("exp")
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "vlp_bench", "run", *sets, "--methods", "baseline,simvlg",
                           "--seeds", "2", "--out", str(out)], capture_output=True, text=True, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def random_backbones(vision_dim: int = 32, llm_dim: int = 32, bert: bool = False) -> Backbones:
    """Untrained tiny backbones: enough to test shapes, gradients and generation of any method;
    `bert`: with an untrained BERT-style checkpoint of the LM's width (random_bert), as [bert] gives."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = train_tokenizer(TEXTS * 10, 300)
    vit = tiny_vit(VisionConfig(width=vision_dim, depth=1, heads=2), 0)
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=llm_dim, intermediate_size=2 * llm_dim, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, initializer_range=0.3,  # large enough that a soft prompt can steer it
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return Backbones(freeze(VisionEncoder(vit, 64, (0.5,) * 3, (0.5,) * 3)), freeze(llm), tokenizer,
                     random_bert(llm_dim) if bert else "")


TEXTS = ["a red circle left of a blue square", "two green stars", "Question: what color? Short answer: red"]
_BERT: dict[int, str] = {}


def random_bert(dim: int = 32, layers: int = 4) -> str:
    """A directory holding an untrained BERT (2 heads) with the random LM's tokenizer plus [CLS],
    [SEP] and [MASK], as the tiny world's BERT is saved; built once per session and width."""
    import copy
    import tempfile

    from transformers import BertConfig, BertModel

    if dim not in _BERT:
        torch.manual_seed(0)
        tokenizer = copy.deepcopy(train_tokenizer(TEXTS * 10, 300))
        tokenizer.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"})
        out = Path(tempfile.mkdtemp(prefix="random-bert-"))
        BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=dim, num_hidden_layers=layers, num_attention_heads=2,
                             intermediate_size=4 * dim, pad_token_id=tokenizer.pad_token_id),
                  add_pooling_layer=False).save_pretrained(out)
        tokenizer.save_pretrained(out)
        _BERT[dim] = str(out)
    return _BERT[dim]
