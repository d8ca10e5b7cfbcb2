"""The prepared experiment every command shares: `vlp-bench search` prepares what `vlp-bench run`
does (a video experiment included), and `experiment.run()` from Python leaves the same files as
the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlp_bench.data.images import CaptionSplit
from vlp_bench.experiment import load_config, prepare, run
from vlp_bench.log import set_progress
from vlp_bench.search import run_search

pytestmark = pytest.mark.slow  # whole tiny runs, several per test

VIDEO = ["experiment.tasks=['video_caption']", "experiment.methods=['simvlg']", "train.steps=4"]


def test_search_runs_on_a_video_task(tiny_overrides, tmp_path):
    """Search once rebuilt the experiment with an image loader, and failed on clips with `cannot read
    image .../msrvtt/videos/videoN: Is a directory`; it now trains on the experiment's own batches."""
    cfg = load_config(None, [*tiny_overrides, *VIDEO, "search.trials=1", "search.space={r=[4]}"])
    assert cfg.search.metric == "video_caption.CIDEr"  # search.metric "" = the experiment's headline metric
    summary = run_search(cfg, tmp_path / "s")
    (trial,) = summary["trials"]
    assert trial["state"] == "COMPLETE", trial
    run_dir = Path(trial["user_attrs"]["run_dir"])
    rec = json.loads((run_dir / "results.json").read_text())
    assert rec["status"] == "finished" and "video_caption" in rec["metrics"]


def _files(out: Path) -> dict[str, object]:
    """Every file of an experiment directory, by relative path: JSON records with what differs
    between two identical runs (wall-clock, the directory's own name, the environment) left out,
    other files by size class (their presence is the point)."""
    found = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = str(path.relative_to(out))
        if rel.endswith("results.json"):
            rec = json.loads(path.read_text())
            found[rel] = {"status": rec["status"], "metrics": rec["metrics"],
                          "train_flops": rec["cost"].get("train_flops"), "method_info": rec["method_info"]}
        else:
            found[rel] = path.suffix
    return found


def test_the_library_and_the_command_leave_the_same_files(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, "experiment.methods=['baseline', 'simvlg']"]
    set_progress(False)
    try:
        run(load_config(None, [*overrides, f"experiment.out='{tmp_path / 'lib'}'"]))
    finally:
        set_progress(True)
    sets = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "vlp_bench", "run", *sets, "--out", str(tmp_path / "cli")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lib, cli = _files(tmp_path / "lib"), _files(tmp_path / "cli")
    assert {"experiment.json", "flops-paper.json", "report.html"} <= set(lib)
    assert lib == cli


def test_prepare_gives_what_every_run_shares(tiny_overrides):
    experiment = prepare(load_config(None, tiny_overrides))
    assert set(experiment.tasks) == {"caption", "vqa"} and experiment.root.is_dir()
    batch = next(experiment.batches(seed=0))
    assert batch["images"].shape[0] == experiment.cfg.train.batch_size
    assert next(experiment.batches(seed=0))["captions"] == batch["captions"]  # seed i: the same data order
    val = experiment.validation_batches  # the validation loss's captions: fixed, the same for every run
    split = CaptionSplit(experiment.root, "val")
    ids = split.image_ids[:experiment.cfg.train.val_loss_images]
    assert [i for b in val for i in b["image_ids"]] == ids
    assert [c for b in val for c in b["captions"]] == [split.refs[i][0] for i in ids]
    assert all(b["images"].shape[0] == len(b["captions"]) <= experiment.cfg.train.batch_size for b in val)


def test_the_tiny_bert_is_built_only_for_methods_that_start_from_it():
    from vlp_bench.experiment import _needs_bert

    assert _needs_bert(load_config(None))  # the default bridges start from [bert]
    assert _needs_bert(load_config(None, ["experiment.methods=['flm']"]))  # the text side's masked-LM encoder
    assert not _needs_bert(load_config(None, ["experiment.methods=['flm', 'mlp']", "methods.flm.init='llm'"]))
    assert not _needs_bert(load_config(None, ["methods.simvlg.init=''", "experiment.methods=['simvlg']"]))
