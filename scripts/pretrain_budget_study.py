"""How few pre-training steps do the tiny backbones need? Each tiny backbone records its held-out
loss in its recipe file (the ViT's bag-of-words loss on validation images, the LM's loss on
documents of validation images, which measures how well it carries its context into what it writes,
the BERT's masked-LM loss on validation captions under fixed masks). This study pre-trains each one
under several (steps, learning rate) recipes on the default tiny world, into a scratch cache, and
prints the held-out loss and the wall-clock of each (docs/decisions.md, "The default budget").

    python scripts/pretrain_budget_study.py --out runs/pretrain-budget   # about 20 minutes on 2 cores
    python scripts/pretrain_budget_study.py --only bert --recipes 600:2e-3,1500:5e-4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

RECIPES = {  # backbone -> (steps, peak lr) tried, the recipe before the study first (now: ViT 400, LM 1000, BERT 1000 at 2e-3)
    "vit": [(400, 1e-3), (250, 1e-3), (250, 2e-3)],
    "lm": [(1500, 2e-3), (1000, 2e-3), (800, 2e-3), (800, 3e-3)],
    "bert": [(1500, 5e-4), (1000, 2e-3), (600, 5e-4), (600, 2e-3)],
}


def _one(name: str, steps: int, lr: float, root: Path, out: Path, tokenizer_dir: Path) -> dict:
    from vlp_bench.backbones import tiny
    from vlp_bench.data.images import CaptionSplit
    from vlp_bench.experiment import load_config

    cfg = load_config(None)
    section = {"vit": cfg.vision, "lm": cfg.llm, "bert": cfg.bert}[name]
    recipe = dataclasses.replace(section, pretrain_steps=steps, pretrain_lr=lr)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if name == "vit":
        tiny.pretrain_tiny_vit(recipe, CaptionSplit(root, "train"), out)
    elif name == "lm":
        tiny.pretrain_tiny_lm(recipe, root, out)
    else:
        from transformers import AutoTokenizer

        tiny.pretrain_tiny_bert(recipe, root, AutoTokenizer.from_pretrained(tokenizer_dir), out)
    wall = time.perf_counter() - t0
    saved = json.loads((out / ("config.json" if name == "vit" else "recipe.json")).read_text())
    return {"backbone": name, "steps": steps, "lr": lr, "wall_s": round(wall, 1),
            "final_loss": round(saved["final_loss"], 4), "held_out_loss": saved["held_out_loss"]}


def main() -> None:
    import torch

    from vlp_bench.backbones.load import load_llm
    from vlp_bench.config import cache_dir
    from vlp_bench.data.world import build_world
    from vlp_bench.experiment import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/pretrain-budget")
    ap.add_argument("--only", default="vit,lm,bert")
    ap.add_argument("--recipes", default="", help="steps:lr,... for the one backbone of --only")
    args = ap.parse_args()
    out = Path(args.out)
    cfg = load_config(None)
    cache = cache_dir(cfg)
    root = build_world(cfg.world, cache)
    tokenizer_dir = Path(load_llm(cfg.llm, root, cache, torch.device("cpu"))[1].name_or_path)  # the cached tiny LM's
    rows = []
    for name in args.only.split(","):
        recipes = RECIPES[name]
        if args.recipes:
            recipes = [(int(s), float(lr)) for s, lr in (r.split(":") for r in args.recipes.split(","))]
        for steps, lr in recipes:
            rows.append(_one(name, steps, lr, root, out / f"{name}-{steps}-{lr:g}", tokenizer_dir))
            print(json.dumps(rows[-1]), flush=True)
    (out / "study.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
