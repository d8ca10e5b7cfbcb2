"""data.feature_cache against the encoder on every step, in one process: train() of a method on the
default config's backbones (bench.toml), N steps over 8 real training batches that come back (so
every step after the 8th is served from the cache), plain and cached in turn, REPEATS times each;
prints the median step time of each run. Data loading and evaluation are left out: the step alone.

    .venv/bin/python scripts/feature_cache_bench.py simvlg 60 3
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from vlp_bench.experiment import load_config, prepare
from vlp_bench.registry import METHODS
from vlp_bench.results import MetricsLog
from vlp_bench.train.features import FeatureCache
from vlp_bench.train.trainer import train


def main(name: str, steps: int, repeats: int) -> None:
    cfg = load_config("bench.toml", [])
    exp = prepare(cfg)
    draw = exp.batches(0, 0, 1)
    batches = [next(draw) for _ in range(8)]

    def cycle():
        while True:
            yield from (dict(b) for b in batches)

    tc = dataclasses.replace(cfg.train, steps=steps, eval_every=0, checkpoint_every=0, val_loss_images=0)
    for _ in range(repeats):
        for cached in (False, True):
            torch.manual_seed(0)
            method = METHODS.get(name)(cfg.methods[name], exp.backbones)
            features = FeatureCache(method, exp.device) if cached else None
            cost = train(method, cycle(), tc, exp.device, MetricsLog(None), progress=False, features=features)
            print(f"{name} {'cached' if cached else 'plain '} median step {cost['median_step_s'] * 1000:.1f} ms, "
                  f"{cost['train_flops'] / steps / 1e9:.1f} GFLOP per step", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
