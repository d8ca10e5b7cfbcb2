"""Training step time of methods on one machine, in one run: median seconds per optimizer step and
the ratio to a reference method (default: baseline).

    python benchmarks/step_time.py                                   # baseline vs simvlg, CPU or GPU
    python benchmarks/step_time.py --methods baseline,simvlg --steps 40 --set methods.simvlg.r=30

It uses the experiment's backbones (the tiny world's by default; built and cached on first use) and
its training batches. Methods are timed in interleaved rounds (A B A B ...) so that a change in
machine load hits all of them alike; the first `--warmup` rounds are discarded; the device is
synchronised around each step. A benchmark, not a test: figures vary with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vlp_bench.data.images import CaptionSplit, ImageLoader, TrainBatches
from vlp_bench.experiment import load_config, prepare
from vlp_bench.registry import METHODS
from vlp_bench.train.measure import sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="baseline,simvlg", help="comma-separated; the first is the reference")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per method first")
    ap.add_argument("--config", default=None, help="experiment file (default: built-in defaults)")
    ap.add_argument("--set", action="append", default=[], help="config override section.key=value")
    args = ap.parse_args()
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    cfg = load_config(args.config, args.set)
    experiment = prepare(cfg)
    root, backbones, device = experiment.root, experiment.backbones, experiment.device
    images = ImageLoader(backbones.vision.image_size, backbones.vision.mean, backbones.vision.std)
    batches = TrainBatches(CaptionSplit(root, "train"), images, cfg.train.batch_size, seed=0)
    fixed = [{**next(batches), "prompt": cfg.experiment.prompt} for _ in range(4)]  # same data for all
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    runners = {}
    for name in names:
        torch.manual_seed(0)
        method = METHODS.get(name)(cfg.methods[name], backbones).to(device)
        method.train()
        stage = method.stages(cfg.train.steps)[-1]
        opt = torch.optim.AdamW(method.trainable_parameters(stage), lr=1e-4)
        runners[name] = (method, stage, opt)

    def step(name: str, i: int) -> tuple[float, int]:
        method, stage, opt = runners[name]
        batch = dict(fixed[i % len(fixed)])
        batch["images"] = batch["images"].to(device)
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            out = method.training_loss(batch, stage)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0, out.tokens_to_llm

    times = {n: [] for n in names}
    tokens = {}
    for i in range(args.warmup + args.steps):
        for name in names:
            dt, tokens[name] = step(name, i)
            if i >= args.warmup:
                times[name].append(dt)
    ref = statistics.median(times[names[0]])
    rows = [{"method": n, "median_step_s": statistics.median(times[n]), "tokens_to_llm": tokens[n],
             "ratio_to_" + names[0]: statistics.median(times[n]) / ref} for n in names]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {name}; batch {cfg.train.batch_size}; {args.steps} timed steps after {args.warmup} warm-up")
    for r in rows:
        print(f"  {r['method']:<12} {r['median_step_s'] * 1000:8.1f} ms/step  {r['tokens_to_llm']:4d} tokens to LLM"
              f"  x{r['ratio_to_' + names[0]]:.3f} of {names[0]}")
    print(json.dumps({"device": name, "batch_size": cfg.train.batch_size, "results": rows}))


if __name__ == "__main__":
    main()
