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
    runs = {m: out / f"{m}-seed0" for m in METHODS}
    return ({m: json.loads((r / "results.json").read_text()) for m, r in runs.items()},
            {m: read_jsonl(r / "metrics.jsonl") for m, r in runs.items()}, proc, runs)


# the bridges DDP must keep exact: the baseline's, SimVLG's merging with its token-mean loss (what
# the rank weighting must get right), BLIP-2's Q-Former in stage 2 (a stage that leaves some of its
# parameters unused: the text embeddings). BLIP-2's stage 1 draws its ITM negatives per rank, so it
# is tested with fixed negatives in test_blip2_dist.py.
METHODS = ["baseline", "simvlg", "blip2"]
METHOD = "simvlg"  # the one whose figures the cost and tracker tests read


@pytest.fixture(scope="module")
def job(tiny_overrides) -> list[str]:
    """The `run` arguments of the job every test here launches, with 1 or 2 processes."""
    return [a for o in [*tiny_overrides, f"experiment.methods={METHODS}", "experiment.tasks=['caption','vqa']",
                        "experiment.device='cpu'", "train.log_every=1", "train.eval_every=3",
                        "train.checkpoint_every=0", "trackers.tensorboard=true", "methods.blip2.stage1_fraction=0.0",
                        # several evaluation batches, so that both ranks decode some
                        "tasks.caption.batch_size=4", "tasks.vqa.batch_size=4",
                        # dropout draws its masks per rank: N processes then train the same model in
                        # distribution, not bit for bit; without it they train exactly what one does
                        *(f"methods.{m}.dropout=0.0" for m in METHODS)] for a in ("--set", o)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, job):
    return _run(job, tmp_path_factory.mktemp("one"), 1), _run(job, tmp_path_factory.mktemp("two"), 2)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory, job):
    """The same job with the frozen LLM sharded over the 2 processes (train.parallel = "fsdp")."""
    return _run([*job, "--set", "train.parallel='fsdp'"], tmp_path_factory.mktemp("fsdp"), 2)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_train_and_evaluate_what_one_does(runs, request, method, parallel):
    (res1, rows1, _, run1), two = runs
    (res2, rows2, _, run2) = two if parallel == "ddp" else request.getfixturevalue("fsdp")
    res1, res2, rows1, rows2, run1, run2 = (x[method] for x in (res1, res2, rows1, rows2, run1, run2))
    loss1 = [r["loss"] for r in rows1 if "loss" in r]
    loss2 = [r["loss"] for r in rows2 if "loss" in r]
    assert len(loss1) == len(loss2) == res1["cost"]["steps"]
    # every step's reduced loss is the one-process loss of the whole batch, and stays so: the
    # gradients were averaged (diverging ranks would drift from step 2 on)
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    evals1 = [r["eval"] for r in rows1 if r.get("split") == "val"]
    evals2 = [r["eval"] for r in rows2 if r.get("split") == "val"]
    assert evals2 == evals1 and len(evals1) == 3  # the ranks' shared decoding, scored by rank zero
    assert res2["metrics"] == res1["metrics"]  # the final test metrics, and every output behind them
    for task in ("caption", "vqa"):
        assert read_jsonl(run2 / f"samples_{task}.jsonl") == read_jsonl(run1 / f"samples_{task}.jsonl")
    job = res2["distributed"]
    assert (job["world_size"], job["backend"], job["parallel"]) == (2, "gloo", parallel) and "distributed" not in res1
    # the frozen LLM's layers are sharded (its embeddings stay whole: vlp_bench/train/sharding.py)
    assert (job["llm_bytes_per_rank"] < job["llm_bytes"]) == (parallel == "fsdp")
    assert set(res2["cost"]["eval_wall_s_by_task"]) == {"caption", "vqa"}
    assert all(set(r["eval_wall_s_by_task"]) == {"caption", "vqa"} for r in rows2 if r.get("split") == "val")


@pytest.mark.slow
def test_trackers_write_on_rank_zero_only(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, (_, rows2, _, run2) = runs
    rows2, run2 = rows2[METHOD], run2[METHOD]
    (events,) = run2.glob("events.out.tfevents.*")  # one writer (a file per process): rank zero's
    reader = EventAccumulator(str(events))
    reader.Reload()
    assert [e.step for e in reader.Scalars("train/loss")] == [r["step"] for r in rows2 if "loss" in r]


@pytest.mark.slow
def test_costs_are_the_whole_jobs(runs):
    (res1, _, _, _), (res2, _, _, _) = runs
    c1, c2 = res1[METHOD]["cost"], res2[METHOD]["cost"]
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
    assert "Traceback" not in proc2.stderr and "Warning" not in proc2.stderr  # nor does DDP warn


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


def _decode_worker(rank: int, port: int, out: str):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    from vlp_bench.train import dist

    dist.init(torch.device("cpu"))
    try:
        seen: list = []
        batches = [[1, 2], [3, 4], [5, 6], [7]]  # an odd number of batches, the last one short

        def decode(batch):
            seen.append(batch)
            with dist.local():  # a rank's decoding runs with the training collectives off
                return [f"out{i}" for i in batch]

        torch.save({"outputs": dist.decode_batches(batches, decode), "seen": seen}, f"{out}/rank{rank}.pt")
    finally:
        dist.finish()


def test_each_rank_decodes_its_share_of_whole_batches_and_rank_zero_gets_them_in_order(tmp_path):
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_decode_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["seen"] == [[1, 2], [5, 6]] and r1["seen"] == [[3, 4], [7]]  # whole batches, as formed
    assert r0["outputs"] == [f"out{i}" for i in range(1, 8)] and r1["outputs"] is None
    from vlp_bench.train.dist import decode_batches  # one process: everything, in order

    assert decode_batches([[1], [2, 3]], lambda b: [i * 10 for i in b]) == [10, 20, 30]
