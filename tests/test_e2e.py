"""A tiny experiment end to end through the CLI: it prepares the world and backbones, trains,
evaluates and writes valid records; the same seed gives the same run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlp_bench.metrics.caption import METRIC_NAMES, evaluate_files
from vlp_bench.results import SCHEMA_VERSION
from vlp_bench.files import read_jsonl
from vlp_bench.metrics.vqa import evaluate_files as evaluate_vqa_files
from vlp_bench.metrics.targets import TARGET_LEVEL, monotone
from vlp_bench.config import cache_dir, load_config, load_config_dict
from vlp_bench.data.world.scenes import world_dir


pytestmark = pytest.mark.slow  # every test runs the CLI, most of them on the shared tiny experiment


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlp_bench", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def experiment(shared_experiment, tiny_overrides):
    """The shared tiny experiment (conftest.py: baseline and simvlg, seeds 0 and 1), and the --set
    arguments of its baseline seed-0 run alone."""
    out, proc = shared_experiment
    return out, proc, [a for o in tiny_overrides for a in ("--set", o)]


def test_run_writes_valid_records(experiment):
    out, proc, _ = experiment
    run = out / "baseline-seed0"
    res = json.loads((run / "results.json").read_text())
    assert res["schema_version"] == SCHEMA_VERSION and res["status"] == "finished"
    assert res["method"] == "baseline" and res["seed"] == 0 and res["run_id"] == "baseline-seed0"
    assert res["config"] == json.loads((run / "config.json").read_text())
    assert res["config"]["train"]["steps"] == 6
    log = (run / "run.log").read_text()  # the metrics tools' messages, out of the progress lines
    assert "PTBTokenizer tokenized" in log and "PTBTokenizer" not in proc.stderr and "testlen" not in proc.stderr
    cap = res["metrics"]["caption"]
    for name in METRIC_NAMES:
        assert isinstance(cap[name], float)
    assert cap["images"] == 16 and cap["split"] == "test"
    assert set(cap["floor"]) >= {*METRIC_NAMES, "caption"}
    cost = res["cost"]
    assert cost["steps"] == 6 and cost["samples_seen"] == 6 * 8 and cost["tokens_to_llm"] == 65
    assert cost["train_wall_s"] > 0 and cost["peak_memory_bytes"] > 0
    for key in ("python", "versions", "device", "git_commit"):
        assert key in res["env"]
    rows = read_jsonl(run / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6]
    assert all(r["samples"] == r["step"] * 8 for r in steps)
    evals = [r for r in rows if "eval" in r]
    curve = [r for r in evals if r["split"] == "val"]  # the learning curve: untrained, every 4 steps, last
    assert [r["step"] for r in curve] == [0, 4, 6] and curve[0]["wall_s"] == curve[0]["flops"] == 0
    assert all(r["eval"]["caption"]["images"] == 4 for r in curve)
    assert evals[-1].get("final") and evals[-1]["split"] == "test"
    assert evals[-1]["eval"]["caption"]["CIDEr"] == cap["CIDEr"]
    # FLOPs: cumulative in the rows, totals and per-sample by part in results.json
    flops = [r["flops"] for r in rows if "flops" in r]
    assert flops == sorted(flops) and steps[-1]["flops"] == cost["train_flops"] == evals[-1]["flops"]
    assert cost["flops_unit"].startswith("FLOP") and cost["train_flops_per_sample"] == cost["train_flops"] / 48
    assert cost["train_flops"] == cost["train_flops_forward"] + cost["train_flops_backward"]
    assert set(cost["flops_by_part"]) == {"vision", "bridge", "llm"}
    assert cost["flops_by_part"]["vision"]["backward"] == 0 and cost["flops_by_part"]["llm"]["backward"] > 0
    assert 1 <= cost["flop_counts"] <= 6 and cost["median_step_s"] > 0 and cost["samples_per_s"] > 0
    assert cost["mfu"] is None  # CPU: no tensor-core peak to compare against
    samples = read_jsonl(run / "samples_caption.jsonl")
    assert len(samples) == 16 and all(len(s["references"]) == 5 for s in samples)
    assert "baseline-seed0" in proc.stdout and "finished" in proc.stdout  # the summary table
    assert not list(run.glob(".*tmp*"))  # nothing half-written left behind


def test_samples_rescore_to_the_same_metrics(experiment, tmp_path):
    """samples_caption.jsonl is enough to re-score a run with `vlp-bench evaluate caption`."""
    out, _, _ = experiment
    run = out / "baseline-seed0"
    samples = read_jsonl(run / "samples_caption.jsonl")
    gt = {"images": [{"id": s["image_id"]} for s in samples],
          "annotations": [{"image_id": s["image_id"], "id": k * 10 + j, "caption": c}
                          for k, s in enumerate(samples) for j, c in enumerate(s["references"])]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": s["image_id"], "caption": s["caption"]}
                                                   for s in samples]))
    proc = cli("evaluate", "caption", "--annotations", str(tmp_path / "gt.json"),
               "--predictions", str(tmp_path / "res.json"))
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)  # stdout is pure JSON
    cap = json.loads((run / "results.json").read_text())["metrics"]["caption"]
    assert {k: printed[k] for k in METRIC_NAMES} == {k: cap[k] for k in METRIC_NAMES}
    assert printed == evaluate_files(tmp_path / "gt.json", tmp_path / "res.json")


def test_same_seed_same_run(experiment, tmp_path):
    """Determinism on CPU: the cached world and backbones are reused and the run repeats exactly."""
    out, _, sets = experiment
    proc = cli("run", *sets, "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (read_jsonl(d / "baseline-seed0" / "metrics.jsonl") for d in (out, tmp_path))
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
    assert read_jsonl(out / "baseline-seed0" / "samples_caption.jsonl") == \
        read_jsonl(tmp_path / "baseline-seed0" / "samples_caption.jsonl")


def test_list_shows_methods_and_tasks():
    proc = cli("list")
    assert proc.returncode == 0
    assert "baseline" in proc.stdout and "caption" in proc.stdout


def test_finished_runs_are_never_overwritten(experiment):
    out, _, sets = experiment
    before = (out / "baseline-seed0" / "results.json").read_text()
    proc = cli("run", *sets, "--out", str(out), cwd=out)
    assert proc.returncode == 2 and "already holds a run; choose another --out, or continue it with" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "baseline-seed0" / "results.json").read_text() == before


def test_a_diverging_method_is_recorded_as_failed(tiny_overrides, tmp_path):
    sets = [a for o in [*tiny_overrides, "train.lr=1e30", "train.grad_clip=0.0"] for a in ("--set", o)]
    proc = cli("run", *sets, "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]  # the experiment itself completes
    res = json.loads((tmp_path / "baseline-seed0" / "results.json").read_text())
    assert res["status"] == "failed" and "NonFiniteLoss: loss is nan" in res["error"]
    assert "failed" in proc.stdout


def test_simvlg_run_records_its_token_counts(experiment):
    out, _, _ = experiment
    res = json.loads((out / "simvlg-seed0" / "results.json").read_text())
    assert res["status"] == "finished" and isinstance(res["metrics"]["caption"]["CIDEr"], float)
    assert res["method_info"]["tokens_per_layer"] == [65, 45, 25]  # r = 20 in each of 2 layers
    assert res["cost"]["tokens_to_llm"] == 25
    rows = read_jsonl(out / "simvlg-seed0" / "metrics.jsonl")
    assert all(r["tokens_to_llm"] == 25 for r in rows if "loss" in r)


def test_impossible_merge_schedule_fails_before_training(tiny_overrides, tmp_path):
    sets = [a for o in [*tiny_overrides, "methods.simvlg.r=40"] for a in ("--set", o)]
    proc = cli("run", *sets, "--methods", "baseline,simvlg", "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "removes 80 tokens but the vision encoder gives 65" in proc.stderr
    assert not (tmp_path / "baseline-seed0").exists()  # nothing trained


def test_blip2_run_accounts_for_both_stages(experiment, tiny_overrides, tmp_path):
    """With the default's tiny BERT too: pre-trained on the world's captions, the Q-Former starts from it."""
    bert = ["bert.name='tiny'", "bert.width=32", "bert.heads=2", "bert.depth=2", "bert.pretrain_steps=20"]
    sets = [a for o in [*tiny_overrides, *bert] for a in ("--set", o)]
    proc = cli("run", *sets, "--methods", "blip2", "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "blip2-seed0" / "results.json").read_text())
    assert res["status"] == "finished"
    start = Path(res["method_info"]["init"])
    assert start.name.startswith("tiny-bert-") and (start / "tokenizer.json").is_file()
    stages = res["cost"]["stages"]
    assert [(s["name"], s["steps"], s["samples"]) for s in stages] == [("stage1", 4, 32), ("stage2", 2, 16)]
    assert res["cost"]["steps"] == 6 and res["cost"]["samples_seen"] == 48 and res["cost"]["tokens_to_llm"] == 4
    assert sum(s["train_wall_s"] for s in stages) == pytest.approx(res["cost"]["train_wall_s"])
    rows = [r for r in read_jsonl(tmp_path / "blip2-seed0" / "metrics.jsonl") if "loss" in r]
    assert [(r["stage"], r["tokens_to_llm"]) for r in rows] == [("stage1", 0), ("stage1", 0), ("stage2", 4)]


def test_run_reports_vqa_and_its_samples_rescore(experiment, tmp_path):
    out, proc, _ = experiment
    run = out / "baseline-seed0"
    vqa = json.loads((run / "results.json").read_text())["metrics"]["vqa"]
    assert isinstance(vqa["overall"], float) and 0 <= vqa["overall"] <= 100
    assert set(vqa["perAnswerType"]) <= {"yes/no", "number", "other"}
    assert vqa["split"] == "test" and 0 <= vqa["floor"]["overall"] <= 100 and vqa["floor"]["answers"]
    samples = read_jsonl(run / "samples_vqa.jsonl")
    assert len(samples) == vqa["questions"] > 0 and all(len(s["answers"]) == 10 for s in samples)
    assert "VQA %" in proc.stdout
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval" in r]
    assert "vqa" in evals[0]["eval"]  # periodic validation evaluations include VQA
    # the samples re-score to the same accuracy with `vlp-bench evaluate vqa`
    (tmp_path / "res.json").write_text(json.dumps([{"question_id": s["question_id"], "answer": s["answer"]}
                                                   for s in samples]))
    cfg = load_config_dict(json.loads((run / "config.json").read_text()))
    world = world_dir(cfg.world, cache_dir(cfg))  # the shared cache may hold other worlds (the claims test's)
    q, a = world / "vqa" / "questions_test.json", world / "vqa" / "annotations_test.json"
    proc = cli("evaluate", "vqa", "--questions", str(q), "--annotations", str(a),
               "--predictions", str(tmp_path / "res.json"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == evaluate_vqa_files(q, a, tmp_path / "res.json")
    assert json.loads(proc.stdout)["overall"] == vqa["overall"]


def test_missing_task_files_fail_before_training(tiny_overrides, tmp_path):
    """A data root without VQA files: a one-line error before the backbones or any method train."""
    import shutil

    cfg = load_config(overrides=tiny_overrides)
    world = world_dir(cfg.world, cache_dir(cfg))
    root = tmp_path / "data"
    shutil.copytree(world, root, ignore=shutil.ignore_patterns("vqa"))
    sets = [a for o in [*tiny_overrides, f"data.root='{root}'"] for a in ("--set", o)]
    proc = cli("run", *sets, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2 and "VQA file not found" in proc.stderr and "Traceback" not in proc.stderr
    assert "frozen backbones" not in proc.stderr  # nothing was pre-trained for this data root
    assert not (tmp_path / "out" / "baseline-seed0").exists()


def test_config_json_names_the_output_directory(experiment):
    out, _, _ = experiment
    assert json.loads((out / "baseline-seed0" / "config.json").read_text())["experiment"]["out"] == str(out)


def test_summary_recomputes_time_to_target_from_the_files(experiment):
    out, proc, _ = experiment
    assert "target: caption.CIDEr >=" in proc.stdout  # printed at the end of the run
    res = cli("summary", str(out / "baseline-seed0"), "--json")  # one run: the one-seed case
    assert res.returncode == 0, res.stderr[-2000:]
    sp = json.loads(res.stdout)["speedups"]
    curve = [r for r in read_jsonl(out / "baseline-seed0" / "metrics.jsonl") if r.get("split") == "val"]
    # one reference seed: the target comes from its own run, TARGET_LEVEL of the way from the floor to its best
    fit = monotone([r["eval"]["caption"]["CIDEr"] for r in curve])
    floor = json.loads((out / "baseline-seed0" / "results.json").read_text())["metrics"]["caption"]["floor"]["CIDEr"]
    floor, best = (floor if floor < fit[-1] else fit[0]), fit[-1]  # a floor it never beat: its start
    assert sp["reference"] == "baseline" and sp["target_source"].startswith("own run")
    assert sp["target"] == pytest.approx(floor + TARGET_LEVEL * (best - floor))
    base = sp["methods"]["baseline"]
    assert base["reached"] == 1 and 0 <= base["flops_to_target"]["mean"] <= curve[-1]["flops"]
    if base["time_to_target_s"]["mean"] == 0:  # 6 tiny steps may not beat the untrained model
        assert base["time_speedup"] is None  # 0/0: no ratio
    else:
        assert base["time_speedup"]["value"] == 1.0 and base["time_speedup"]["verdict"] == "point estimate"
    assert json.loads(res.stdout)["loss_speedups"]["metric"] == "val_loss"  # the runs logged it
    never = cli("summary", str(out / "baseline-seed0"), "--target", "1000")
    assert never.returncode == 0 and "not reached" in never.stdout
    bad = cli("summary", str(out), "--reference", "blip2")
    assert bad.returncode == 2 and "reference method 'blip2' has no finished run" in bad.stderr
    missing = cli("summary", str(out / "nope"))
    assert missing.returncode == 2 and "not a run directory" in missing.stderr
