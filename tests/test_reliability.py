"""Reliability: resume after SIGKILL, nothing half-written, failures isolated, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from test_e2e import cli
from vlp_bench.metrics.caption import METRIC_NAMES
from vlp_bench.experiment import load_config, run as run_experiment
from vlp_bench.method import StepOutput
from vlp_bench.methods.baseline import Baseline
from vlp_bench.registry import METHODS
from vlp_bench.files import atomic_write_json, read_jsonl


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.slow
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tiny_overrides, tmp_path):
    over = [*tiny_overrides, "train.steps=40", "train.checkpoint_every=4", "train.eval_every=20",
            "train.log_every=4", "experiment.tasks=['caption']"]
    ref = cli("run", *_sets(over), "--out", str(tmp_path / "ref"), cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vlp_bench", "run", *_sets(over), "--out", str(killed)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "baseline-seed0" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = killed / "baseline-seed0"
    assert json.loads((run / "results.json").read_text())["status"] == "running"  # killed mid-run

    resumed = cli("run", "--resume", str(killed), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming baseline-seed0 from its checkpoint" in resumed.stderr
    a = json.loads((tmp_path / "ref" / "baseline-seed0" / "results.json").read_text())
    b = json.loads((run / "results.json").read_text())
    assert b["status"] == "finished"
    assert {k: b["metrics"]["caption"][k] for k in METRIC_NAMES} == {k: a["metrics"]["caption"][k] for k in METRIC_NAMES}
    for key in ("steps", "samples_seen", "tokens_to_llm", "train_flops", "flops_by_part"):
        assert b["cost"][key] == a["cost"][key]  # each step counted once, FLOPs included
    assert [(s["name"], s["steps"], s["samples"]) for s in b["cost"]["stages"]] == [("train", 40, 320)]
    rows_a, rows_b = (read_jsonl(d / "baseline-seed0" / "metrics.jsonl") for d in (tmp_path / "ref", killed))
    assert [(r["step"], r.get("loss"), r.get("flops")) for r in rows_a] == \
        [(r["step"], r.get("loss"), r.get("flops")) for r in rows_b]
    assert not (run / "checkpoint.pt").exists()  # removed once the run finished


@pytest.mark.slow
def test_resume_keeps_finished_runs_and_refuses_other_options(tiny_overrides, tmp_path):
    out = tmp_path / "exp"
    assert cli("run", *_sets(tiny_overrides), "--out", str(out), cwd=tmp_path).returncode == 0
    before = (out / "baseline-seed0" / "results.json").read_text()
    again = cli("run", "--resume", str(out), cwd=tmp_path)
    assert again.returncode == 0 and "already finished, kept" in again.stderr
    assert (out / "baseline-seed0" / "results.json").read_text() == before
    both = cli("run", "--resume", str(out), "--set", "train.steps=3", cwd=tmp_path)
    assert both.returncode == 2 and "give it no other option" in both.stderr


def test_a_crash_during_a_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"status": "finished"})

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"status": "half"})
    assert json.loads(path.read_text()) == {"status": "finished"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


class _Diverges(Baseline):
    """Test-only: its loss becomes NaN at the third step (step 2) of the tiny 6-step run."""

    def set_progress(self, fraction):
        self.step = round(fraction * 6)

    def training_loss(self, batch, stage):
        out = super().training_loss(batch, stage)
        return StepOutput(out.loss * float("nan"), out.tokens_to_llm) if self.step >= 2 else out


@pytest.mark.slow
def test_a_diverging_method_is_isolated_while_the_others_finish(tiny_overrides, tmp_path):
    METHODS.register("test-diverges")(_Diverges)
    try:
        cfg = load_config(None, [*tiny_overrides, "experiment.tasks=['caption']"])
        cfg = replace(cfg, methods={**cfg.methods, "test-diverges": cfg.methods["baseline"]},
                      experiment=replace(cfg.experiment, methods=["test-diverges", "baseline"], out=str(tmp_path)))
        run_experiment(cfg)
    finally:
        METHODS._entries.pop("test-diverges")
    bad = json.loads((tmp_path / "test-diverges-seed0" / "results.json").read_text())
    good = json.loads((tmp_path / "baseline-seed0" / "results.json").read_text())
    assert bad["status"] == "failed" and "loss is nan at step 2" in bad["error"]
    assert good["status"] == "finished" and isinstance(good["metrics"]["caption"]["CIDEr"], float)


@pytest.mark.parametrize("args, message", [
    (["run", "--out", "{tmp}/file.txt/out"], "cannot write to the output directory"),
    (["run", "--resume", "{tmp}/nothing"], "nothing to resume in"),
    (["run", "--set", "data.root='{tmp}/no-such-dir'"], "data.root is not a directory"),
    (["run", "--set", "data.root='{tmp}'"], "caption annotations not found"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    proc = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("vlp-bench: error")]) == 1
    assert message in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = cli("--debug", "run", "--set", "train.stpes=1", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "did you mean 'steps'" in proc.stderr


def test_checkpoints_load_without_pickle(tmp_path):
    """Checkpoints are read with weights_only=True: an arbitrary pickled object is refused."""
    from vlp_bench.train.checkpoint import load_checkpoint

    torch.save({"weights": {}, "evil": object()}, tmp_path / "c.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(tmp_path / "c.pt", None, None, None, "cpu")


@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_line_lets_idle_openmp_threads_sleep(preset, expected):
    """OMP_WAIT_POLICY is read once, when torch loads: the CLI sets it (unless the user did) before
    any command imports torch, so that a busy machine does not multiply step times (docs/decisions.md)."""
    code = ("import os, sys\nimport vlp_bench.cli as cli\nassert 'torch' not in sys.modules\n"
            "sys.argv = ['vlp-bench', 'list']\ntry:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print('policy', os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == f"policy {expected} True"  # set first, torch loaded after
