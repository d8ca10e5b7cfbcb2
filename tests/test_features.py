"""data.feature_cache (vlp_bench/train/features.py), for every registered method: a method whose
encoder is the frozen default trains exactly what it trains without the cache, and its costs
"without the cache" are the uncached run's; any other is refused with its reason."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import random_backbones
from test_methods import _small
from vlp_bench.registry import METHODS
from vlp_bench.reports.summary import uncached_rows
from vlp_bench.results import MetricsLog
from vlp_bench.train.features import FeatureCache, reason
from vlp_bench.train.trainer import TrainConfig, train

CAPTIONS = ["a red circle", "two green stars", "a blue square above a red circle", "a yellow cross"]
CFG = TrainConfig(steps=5, batch_size=4, log_every=1, eval_every=0, checkpoint_every=0, warmup_steps=1,
                  warmup_exclude=1, val_loss_images=0)


def _batches():
    """Endless batches drawn from 4 images (ids 10..13), so that images come back."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(len(CAPTIONS), 3, 64, 64, generator=g)
    while True:
        idx = torch.randint(0, len(CAPTIONS), (4,), generator=g).tolist()
        yield {"images": images[idx], "captions": [CAPTIONS[i] for i in idx], "prompt": "a photo of",
               "image_ids": [10 + i for i in idx]}


def _train(name: str, cached: bool):
    torch.manual_seed(0)
    cls = METHODS.get(name)
    method = cls(_small(cls.Config()), random_backbones(bert=True))
    features = FeatureCache(method, torch.device("cpu")) if cached else None
    log = MetricsLog(None)
    cost = train(method, _batches(), CFG, torch.device("cpu"), log, progress=False, features=features)
    return cost, log.rows, method


@pytest.mark.parametrize("name", METHODS.names())
def test_a_cached_encoder_trains_what_the_encoder_trains_and_costs_both_ways(name):
    cls = METHODS.get(name)
    torch.manual_seed(0)
    why = reason(cls(_small(cls.Config()), random_backbones(bert=True)))
    if why is not None:  # its encoder is not the frozen default: never cached
        assert name in why and ("encode()" in why or "trains modules inside the encoder" in why)
        return
    plain, plain_rows, _ = _train(name, cached=False)
    cached, rows, _ = _train(name, cached=True)
    assert [r["loss"] for r in rows] == [r["loss"] for r in plain_rows]  # bit for bit
    fc = cached["feature_cache"]
    assert fc["used"] and fc["images_encoded"] + fc["samples_served"] == plain["samples_seen"]
    assert 0 < fc["images_encoded"] <= 4 and fc["samples_served"] > 0
    # as run: the encoder's forward only for the images encoded; without the cache: the plain run's
    vision = cached["flops_by_part"]["vision"]["forward"]
    assert vision == fc["images_encoded"] * fc["vision_flops_per_image"] < plain["flops_by_part"]["vision"]["forward"]
    assert cached["train_flops_without_cache"] == plain["train_flops"] > cached["train_flops"]
    assert cached["train_wall_s_without_cache"] > cached["train_wall_s"]
    assert [r["flops_without_cache"] for r in rows] == [r["flops"] for r in plain_rows]


def test_the_methods_that_change_the_encoder_are_refused():
    refused = {n for n in METHODS.names() if reason(METHODS.get(n)(_small(METHODS.get(n).Config()),
                                                                   random_backbones(bert=True))) is not None}
    assert {"tome-vit", "flip", "simvlg-video", "simvlg+flip"} <= refused
    assert not refused & {"baseline", "simvlg", "blip2", "flm"}


def test_the_report_reads_rows_both_ways():
    rows = [{"step": 5, "wall_s": 1.0, "flops": 10, "wall_s_without_cache": 1.5, "flops_without_cache": 14},
            {"step": 6, "wall_s": 2.0, "flops": 20}]
    assert uncached_rows(rows) == [{**rows[0], "wall_s": 1.5, "flops": 14}, rows[1]]


def test_a_cache_of_a_stream_of_shards_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlp_bench", "run", "--set", "data.feature_cache=true",
                           "--set", f"data.shards='{tmp_path}'", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.feature_cache keeps tokens by image id" in proc.stderr.strip().splitlines()[-1]
