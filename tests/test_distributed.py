"""Data-parallel training under torchrun (vlp_bench.train.dist): two gloo processes on the CPU, each with
half of every batch, train and measure exactly what one process does with the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vlp_bench.files import read_jsonl


def _run(args: list[str], out, processes: int):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, "-m", "vlp_bench", "run", *args, "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = out / f"{METHOD}-seed0"
    return json.loads((run / "results.json").read_text()), read_jsonl(run / "metrics.jsonl"), proc, run


METHOD = "simvlg"  # merging in the bridge and a token-mean loss: what the rank weighting must get right


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_overrides):
    sets = [a for o in [*tiny_overrides, f"experiment.methods=['{METHOD}']", "experiment.tasks=['vqa']",
                        "experiment.device='cpu'", "train.log_every=1", "train.eval_every=3",
                        "train.checkpoint_every=0", "trackers.tensorboard=true",
                        # dropout draws its masks per rank: N processes then train the same model in
                        # distribution, not bit for bit; without it they train exactly what one does
                        f"methods.{METHOD}.dropout=0.0"] for a in ("--set", o)]
    one = _run(sets, tmp_path_factory.mktemp("one"), 1)
    two = _run(sets, tmp_path_factory.mktemp("two"), 2)
    return one, two


@pytest.mark.slow
def test_two_processes_train_what_one_does(runs):
    (res1, rows1, _, run1), (res2, rows2, _, run2) = runs
    loss1 = [r["loss"] for r in rows1 if "loss" in r]
    loss2 = [r["loss"] for r in rows2 if "loss" in r]
    assert len(loss1) == len(loss2) == res1["cost"]["steps"]
    # every step's reduced loss is the one-process loss of the whole batch, and stays so: the
    # gradients were averaged (diverging ranks would drift from step 2 on)
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    evals1 = [r["eval"] for r in rows1 if r.get("split") == "val"]
    evals2 = [r["eval"] for r in rows2 if r.get("split") == "val"]
    assert evals2 == evals1 and len(evals1) == 3  # rank zero's evaluations, of the same weights
    assert res2["metrics"] == res1["metrics"]  # the final test metrics, and every answer behind them
    assert read_jsonl(run2 / "samples_vqa.jsonl") == read_jsonl(run1 / "samples_vqa.jsonl")
    assert res2["distributed"] == {"world_size": 2, "backend": "gloo"} and "distributed" not in res1


@pytest.mark.slow
def test_trackers_write_on_rank_zero_only(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, (_, rows2, _, run2) = runs
    (events,) = run2.glob("events.out.tfevents.*")  # one writer (a file per process): rank zero's
    reader = EventAccumulator(str(events))
    reader.Reload()
    assert [e.step for e in reader.Scalars("train/loss")] == [r["step"] for r in rows2 if "loss" in r]


@pytest.mark.slow
def test_costs_are_the_whole_jobs(runs):
    (res1, _, _, _), (res2, _, _, _) = runs
    c1, c2 = res1["cost"], res2["cost"]
    assert c2["samples_seen"] == c1["samples_seen"] == c1["steps"] * 8
    # the frozen encoder sees each image once per step, on whichever rank: the same FLOPs
    assert c2["flops_by_part"]["vision"] == c1["flops_by_part"]["vision"]
    # the text is padded per rank, to no more than the whole batch's longest caption
    assert 0.5 * c1["train_flops"] < c2["train_flops"] <= c1["train_flops"]


@pytest.mark.slow
def test_only_rank_zero_writes_and_speaks(runs):
    (_, _, proc1, _), (_, _, proc2, _) = runs
    lines = lambda text: [x for x in text.splitlines() if x.startswith("[vlp-bench")]  # noqa: E731
    assert len(lines(proc2.stderr)) == len(lines(proc1.stderr))  # rank 1 says nothing
    assert proc2.stdout.count("results in") == proc1.stdout.count("results in") == 1  # nor reports


@pytest.mark.slow
def test_a_batch_that_does_not_divide_is_a_clear_error(tiny_overrides, tmp_path):
    sets = [a for o in [*tiny_overrides, "experiment.device='cpu'", "train.batch_size=7"] for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "vlp_bench", "run", *sets, "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode != 0
    assert "train.batch_size 7 is the global batch: it must divide evenly over the 2 processes" in proc.stderr


def test_the_job_reports_every_ranks_skipped_samples():
    from vlp_bench.train.dist import Group
    from vlp_bench.experiment import _job_report

    class TwoRanks(Group):  # rank zero's view: its own report, then rank one's
        def gather(self, obj):
            return [obj, {**obj, "skipped": {"bad_image": 2, "no_image": 1}}]

    report = _job_report(TwoRanks(0, 2), {"source": "shards", "batches_drawn": 5, "skipped": {"bad_image": 1}})
    assert report == {"source": "shards", "batches_drawn": 5, "skipped": {"bad_image": 3, "no_image": 1}}
    assert _job_report(Group(), {"source": "coco", "images": 4}) == {"source": "coco", "images": 4}
