"""How noisy is each validation signal, against the differences it must resolve? The measurement
behind the default evaluation budget (train.eval_images, train.eval_every, train.val_loss_images;
docs/costs.md). Reads a finished experiment's files; trains nothing.

    .venv/bin/python scripts/eval_noise.py runs/EXPERIMENT [--draws 40] [--json OUT.json]

1. CIDEr's sampling noise at n images: each run's final test captions (samples_caption.jsonl),
   tokenized once by the official PTB tokenizer, scored with pycocoevalcap's CIDEr-D on `draws`
   random subsets of n images (without replacement; document frequencies from the subset, as a
   file of those images alone would be scored). The SD over subsets is the noise of one reading of
   an n-image curve point; the SD of a difference between two methods is about sqrt(2) times it.
2. Point-to-point noise of each learning curve: the RMS residual of a run's validation points
   around their monotone fit (vlp_bench.metrics.targets.monotone), for the CIDEr curve (every
   eval_every steps on eval_images images) and the validation loss (every log_every steps on a
   fixed caption set).
3. The signal: the spread of the methods' final fitted values (max - min of the method means).
4. With --time METHOD: the wall-clock of one reading of each signal for that method as bench.toml
   builds it (untrained weights; the cost hardly depends on them): the validation loss on
   train.val_loss_images captions, and the evaluation of every task on train.eval_images images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vlp_bench.files import read_jsonl
from vlp_bench.metrics.targets import VAL_LOSS, curve, monotone


def subset_cider_sd(samples: list[dict], sizes: list[int], draws: int, seed: int) -> dict[int, float]:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {s["image_id"]: [{"caption": r} for r in s["references"]] for s in samples}
    res = {s["image_id"]: [{"caption": s["caption"]}] for s in samples}
    tok = PTBTokenizer()
    gts_tok, res_tok = tok.tokenize(gts), tok.tokenize(res)
    ids = list(res_tok)
    rng = np.random.default_rng(seed)
    out = {}
    for n in sizes:
        if n > len(ids):
            continue
        values = []
        for _ in range(draws):
            pick = rng.choice(ids, size=n, replace=False)
            values.append(Cider().compute_score({i: gts_tok[i] for i in pick}, {i: res_tok[i] for i in pick})[0])
        out[n] = float(np.std(values, ddof=1))
    return out


def residual_sd(values: list[float], sign: float = 1.0) -> float | None:
    if len(values) < 3:
        return None
    fit = monotone([sign * v for v in values])
    return float(np.sqrt(np.mean([(sign * v - f) ** 2 for v, f in zip(values, fit)])))


def measure(exp: Path, draws: int) -> dict:
    runs = sorted(d for d in exp.iterdir() if (d / "results.json").is_file())
    per_run = {}
    for d in runs:
        rec = json.loads((d / "results.json").read_text())
        if rec.get("status") != "finished":
            continue
        rows = read_jsonl(d / "metrics.jsonl")
        cider = [p[2] for p in curve(rows, "caption.CIDEr")]
        loss = [p[2] for p in curve(rows, VAL_LOSS)]
        samples = read_jsonl(d / "samples_caption.jsonl")
        per_run[d.name] = {
            "method": rec["method"], "seed": rec["seed"],
            "cider_points": len(cider), "loss_points": len(loss),
            "cider_residual_sd": residual_sd(cider), "loss_residual_sd": residual_sd(loss, -1.0),
            "final_fit_cider": monotone(cider)[-1] if cider else None,
            "final_fit_loss": -monotone([-v for v in loss])[-1] if loss else None,
            "cider_sd_at": subset_cider_sd(samples, [50, 100, 200], draws, rec["seed"]),
        }
        print(d.name, json.dumps(per_run[d.name]), flush=True)
    return {"runs": per_run, "summary": summarise(per_run)}


def summarise(per_run: dict) -> dict:
    def mean(key, sub=None):
        vals = [(r[key] if sub is None else r[key].get(sub)) for r in per_run.values()]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    methods = sorted({r["method"] for r in per_run.values()})
    finals = {m: {k: float(np.mean([r[k] for r in per_run.values() if r["method"] == m and r[k] is not None]))
                  for k in ("final_fit_cider", "final_fit_loss")
                  if any(r["method"] == m and r[k] is not None for r in per_run.values())}
              for m in methods}
    spread = {}
    for k in ("final_fit_cider", "final_fit_loss"):
        values = [f[k] for f in finals.values() if k in f]
        spread[k] = max(values) - min(values) if values else None
    return {"cider_sd_at_images": {n: mean("cider_sd_at", n) for n in (50, 100, 200)},
            "cider_curve_residual_sd": mean("cider_residual_sd"), "loss_curve_residual_sd": mean("loss_residual_sd"),
            "method_finals": finals, "method_spread": spread}


def time_readings(method_name: str, repeats: int = 3) -> dict:
    import time

    import torch

    from vlp_bench.experiment import load_config, prepare
    from vlp_bench.registry import METHODS
    from vlp_bench.train.validation import ValidationLoss

    cfg = load_config(None)
    exp = prepare(cfg)
    torch.manual_seed(0)
    method = METHODS.get(method_name)(cfg.methods[method_name], exp.backbones).to(exp.device)
    stage = method.stages(cfg.train.steps)[-1]
    loss = ValidationLoss(exp.validation_batches, exp.device, torch.autocast("cpu", enabled=False))

    def best_of(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    method.eval()
    return {"method": method_name, "val_loss_captions": cfg.train.val_loss_images,
            "val_loss_s": best_of(lambda: loss(method, stage)), "eval_images": cfg.train.eval_images,
            "evaluation_s": best_of(lambda: [t.evaluate(method, "val", cfg.train.eval_images)
                                             for t in exp.tasks.values()])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--time", metavar="METHOD", help="also time one reading of each signal for METHOD")
    args = parser.parse_args()
    result = measure(args.experiment, args.draws)
    if args.time:
        result["summary"]["reading_cost"] = time_readings(args.time)
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
