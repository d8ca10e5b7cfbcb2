"""Should the bridges start from a pre-trained BERT on the tiny world, as the papers start theirs
from bert-base-uncased? This study measures it (docs/decisions.md, "Bridges start from a tiny BERT
pre-trained on the tiny world's captions"): the default experiment's `baseline` and `simvlg`
(bench.toml, seeds 0 and 1) run twice, once with `bert.name = ""` (every bridge from BERT's random
init) and once as configured (the tiny BERT that `[bert]` pre-trains and caches), and their test
CIDEr, VQA accuracy and training time are printed and written to OUT/study.json.

    python scripts/bert_init_study.py --out runs/bert-init          # about 25 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def main() -> None:
    from vlp_bench.experiment import load_config, run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bert-init")
    ap.add_argument("--methods", default="baseline,simvlg")
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    out, methods = Path(args.out), args.methods.split(",")
    cfg = load_config(Path("bench.toml"))
    results = {}
    for arm, bert in (("random", ""), ("bert", cfg.bert.name)):
        experiment = dataclasses.replace(cfg.experiment, methods=methods, seeds=list(range(args.seeds)),
                                         out=str(out / arm))
        if not (out / arm / "report.html").is_file():
            run(dataclasses.replace(cfg, experiment=experiment, bert=dataclasses.replace(cfg.bert, name=bert)))
        for m in methods:
            for seed in range(args.seeds):
                r = json.loads((out / arm / f"{m}-seed{seed}" / "results.json").read_text())
                results[f"{m} seed {seed} ({arm})"] = {"caption.CIDEr": r["metrics"]["caption"]["CIDEr"],
                                                       "vqa.overall": r["metrics"]["vqa"]["overall"],
                                                       "train_s": r["cost"].get("train_wall_s")}
    print(json.dumps(results, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
