"""Should the tiny world start its bridges from a pre-trained tiny BERT, as the papers start theirs
from bert-base-uncased? This study measures it (docs/decisions.md, "Bridges start from random BERT
weights on the tiny world"):

1. pre-train a BERT-style encoder of the default bridge's size (width 128, 4 heads, 2 layers) with
   BERT's masked-LM objective (15% of tokens; 80% [MASK], 10% random, 10% kept) on the tiny world's
   training captions, tokenised with the tiny LM's tokenizer, and save it as a Hugging Face directory;
2. run the default experiment's `baseline` and `simvlg` (bench.toml, seeds 0 and 1) twice: from
   BERT's random init, and from that checkpoint (`methods.<name>.init`);
3. print each run's test CIDEr, VQA accuracy and training time.

    python scripts/bert_init_study.py --out runs/bert-init          # about 25 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F


def pretrain_bert(captions: list[str], tokenizer, out: Path, steps: int, width=128, heads=4, depth=2, seed=0) -> float:
    """Masked-LM pre-training on the captions; returns the last 50 steps' mean loss."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    mask_id = tokenizer.pad_token_id  # the tiny tokenizer has no [MASK]: its pad token plays it (never a target)
    rows = [tokenizer(c, add_special_tokens=False).input_ids for c in captions]
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=depth,
                                       num_attention_heads=heads, intermediate_size=4 * width,
                                       max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    losses = []
    for step in range(steps):
        batch = rng.sample(rows, 64)
        L = max(map(len, batch))
        ids = torch.full((64, L), tokenizer.pad_token_id)
        for i, r in enumerate(batch):
            ids[i, : len(r)] = torch.tensor(r)
        valid = ids != tokenizer.pad_token_id
        chosen = (torch.rand(ids.shape) < 0.15) & valid
        labels = ids.masked_fill(~chosen, -100)
        roll = torch.rand(ids.shape)
        inputs = ids.clone()
        inputs[chosen & (roll < 0.8)] = mask_id
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        inputs[swap] = torch.randint(len(tokenizer), (int(swap.sum()),))
        for g in opt.param_groups:
            g["lr"] = 5e-4 * min(1.0, (step + 1) / 100)
        logits = model(input_ids=inputs, attention_mask=valid.long()).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 200 == 0:
            print(f"  MLM step {step}: loss {loss.item():.3f}", flush=True)
    model.bert.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(losses[-50:]) / 50


def main() -> None:
    from vlp_bench.experiment import load_config, prepare, run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bert-init")
    ap.add_argument("--mlm-steps", type=int, default=1500)
    ap.add_argument("--methods", default="baseline,simvlg")
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(Path("bench.toml"))
    ckpt = out / "tiny-bert"
    if not (ckpt / "config.json").is_file():
        exp = prepare(cfg)
        captions = [c for caps in exp.train_split.refs.values() for c in caps]
        print(f"pre-training a tiny BERT on {len(captions)} captions", flush=True)
        print(f"  final MLM loss {pretrain_bert(captions, exp.backbones.tokenizer, ckpt, args.mlm_steps):.3f}")
    methods = args.methods.split(",")
    results = {}
    for arm, init in (("random", ""), ("bert", str(ckpt))):
        experiment = dataclasses.replace(cfg.experiment, methods=methods, seeds=list(range(args.seeds)), out=str(out / arm))
        arm_cfg = dataclasses.replace(cfg, experiment=experiment,
                                      methods={**cfg.methods, **{m: dataclasses.replace(cfg.methods[m], init=init) for m in methods}})
        if not (out / arm / "report.html").is_file():
            run(arm_cfg)
        for m in methods:
            for seed in range(args.seeds):
                r = json.loads((out / arm / f"{m}-seed{seed}" / "results.json").read_text())
                results[f"{m} seed {seed} ({arm})"] = {"caption.CIDEr": r["metrics"]["caption"]["CIDEr"],
                                                       "vqa.overall": r["metrics"]["vqa"]["overall"],
                                                       "train_s": r["cost"].get("train_wall_s")}
    print(json.dumps(results, indent=1))
    (out / "study.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
