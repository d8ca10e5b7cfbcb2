"""`vlp-bench bench`: every registered method's training step timed at a scale, without data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import TINY, random_bert
from vlp_bench import bench, costmodel
from vlp_bench.experiment import load_config
from vlp_bench.registry import METHODS
from vlp_bench.textside import TextSideMethod
from vlp_bench.train.flops import UNIT


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, TINY)


@pytest.mark.parametrize("name", METHODS.names())
def test_bench_times_every_stage_of_every_method(cfg, name):
    if issubclass(METHODS.get(name), TextSideMethod):  # its text model is [bert]'s, which TINY turns off
        cfg = load_config(None, [*TINY, f"bert.name='{random_bert(32)}'"])
    table = bench.bench(cfg, "tiny", [name], torch.device("cpu"), batch_size=4, steps=2, warmup=1)
    stages = [s.name for s in METHODS.get(name)(cfg.methods[name], costmodel.tiny_scale(cfg, "cpu").backbones).stages(3)]
    rows = table["rows"]
    assert [r["stage"] for r in rows] == stages and all(r["method"] == name for r in rows)
    for r in rows:
        assert r["median_step_s"] > 0 and r["samples_per_s"] == pytest.approx(4 / r["median_step_s"])
        assert r["flops_per_sample"] > 0 and r["achieved_flops_per_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["mfu"] is None  # no tensor-core peak on a CPU
    assert table["unit"] == UNIT and table["caption_tokens"] == 8  # the one FLOP unit


@pytest.mark.slow
def test_bench_cli_prints_a_table_and_json(tmp_path):
    sets = [a for o in TINY for a in ("--set", o)]
    base = [sys.executable, "-m", "vlp_bench", "bench", "--methods", "baseline,simvlg", "--steps", "2", "--warmup", "1",
            "--batch-size", "4", *sets]
    proc = subprocess.run([*base, "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads(proc.stdout)
    assert [r["method"] for r in table["rows"]] == ["baseline", "simvlg"]
    assert table["rows"][1]["tokens_to_llm"] < table["rows"][0]["tokens_to_llm"]  # merging shortened the prompt
    proc = subprocess.run(base, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "step ms" in proc.stdout and "simvlg" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--batch-size", "1"], "--batch-size must be >= 2"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bench_errors_are_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlp_bench", "bench", *args], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def tiny_experiment(tiny_overrides):
    from vlp_bench.experiment import prepare

    return prepare(load_config(None, [*tiny_overrides, "experiment.methods=['simvlg']", "data.workers=0"]))


def test_the_overheads_bare_loop_trains_exactly_as_the_trainer(tiny_experiment):
    """`bench --overhead` compares like with like: from the same seed and batches, the bare loop and
    the trainer (FLOPs counted, rows logged, a checkpoint written) end with the same weights."""
    import dataclasses

    from vlp_bench.overhead import bare_loop
    from vlp_bench.results import MetricsLog
    from vlp_bench.train.trainer import train

    exp = tiny_experiment
    cfg = dataclasses.replace(exp.cfg.train, steps=5, eval_every=0, val_loss_images=0, checkpoint_every=0)
    weights = []
    for harness in (True, False):
        torch.manual_seed(0)
        method = METHODS.get("simvlg")(exp.cfg.methods["simvlg"], exp.backbones)  # a curriculum: set_progress
        if harness:
            train(method, exp.batches(0), cfg, exp.device, MetricsLog(None), progress=False)
        else:
            bare_loop(method, iter(exp.batches(0)), cfg, exp.device)
        weights.append({n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad})
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_overhead_measures_interleaved_rounds(tiny_experiment):
    from vlp_bench.overhead import format_table, measure

    table = measure(tiny_experiment, ["simvlg"], steps=4, rounds=2)
    row = table["rows"][0]
    assert len(row["rounds"]) == 2 and table["checkpoint_every"] == 2
    assert all(r["overhead"] == pytest.approx(r["trainer_s"] / r["bare_s"] - 1) for r in row["rounds"])
    assert row["overhead_min"] <= row["overhead"] <= row["overhead_max"]
    assert "simvlg" in format_table(table) and "interleaved rounds of 4 steps" in format_table(table)
