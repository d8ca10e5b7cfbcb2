"""What a run keeps of its training (weights.safetensors) and what is done with it afterwards:
`vlp-bench evaluate run` reproduces the run's own metrics and evaluates tasks it never ran,
`vlp-bench predict` captions and answers on images, and every case that cannot work is refused
in one line (exit 2) before any long work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # tiny runs in the process, evaluations with the official metrics (Java)

FAMILY = ["methods.flm.init='llm'", "methods.flm.text_layers=1", "methods.flm.decoder_steps=4",
          "tasks.vqa.finetune_steps=4"]  # the tiny test world has no [bert]; phases kept short


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlp_bench", *args], capture_output=True, text=True, cwd=cwd)


def _run(overrides: list[str], method: str, out: Path) -> Path:
    from vlp_bench.experiment import load_config, prepare
    from vlp_bench.log import set_progress

    cfg = load_config(None, [*overrides, f"experiment.methods=['{method}']", "train.steps=8", "train.eval_every=0",
                             "train.val_loss_images=0", "data.workers=0"])
    set_progress(False)
    try:
        prepare(cfg).run_one(method, 0, out / f"{method}-seed0")
    finally:
        set_progress(True)
    rec = json.loads((out / f"{method}-seed0" / "results.json").read_text())
    assert rec["status"] == "finished", rec.get("traceback")
    return out / f"{method}-seed0"


@pytest.fixture(scope="module")
def runs(tiny_overrides, tmp_path_factory):
    """flm (a decoder phase before captioning, fine-tuning before VQA) on captioning and VQA, and
    the baseline on captioning alone."""
    out = tmp_path_factory.mktemp("keep")
    return {"flm": _run([*tiny_overrides, *FAMILY], "flm", out),
            "baseline": _run([*tiny_overrides, "experiment.tasks=['caption']"], "baseline", out)}


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def test_the_run_keeps_its_trained_weights_and_the_phases_copies(runs):
    from vlp_bench.train.weights import read_meta

    rec = json.loads((runs["flm"] / "results.json").read_text())
    kept = rec["weights"]
    assert kept["file"] == "weights.safetensors" and kept["parameters"] == rec["cost"]["trainable_params"]
    assert kept["bytes"] == (runs["flm"] / "weights.safetensors").stat().st_size
    assert kept["phases"] == {"caption": "weights-caption.safetensors", "vqa": "weights-vqa.safetensors"}
    meta = read_meta(runs["flm"] / "weights-vqa.safetensors")
    assert meta["phase"] == "vqa" and meta["method"] == "flm" and meta["backbones"] == kept["backbones"]
    assert "phases" not in json.loads((runs["baseline"] / "results.json").read_text())["weights"]  # none trained


@pytest.mark.parametrize("method", ["flm", "baseline"])
def test_evaluating_a_run_again_reproduces_its_recorded_metrics(runs, method):
    """The run's own tasks and split with its own settings: the same metrics to the last digit and
    the same samples, the phases before them (flm: decoder phase, VQA fine-tuning) re-run from the
    run's seed; the run's own files are untouched."""
    from vlp_bench.evaluate import evaluate_run

    run = runs[method]
    before = _files(run)
    out = evaluate_run(run)
    rec, own = json.loads((out / "results.json").read_text()), json.loads((run / "results.json").read_text())
    assert out.parent == run / "evals" and rec["kind"] == "evaluation" and rec["tasks"] == list(own["metrics"])
    assert rec["metrics"] == own["metrics"]
    for task in own["metrics"]:
        assert (out / f"samples_{task}.jsonl").read_text() == (run / f"samples_{task}.jsonl").read_text()
    if method == "flm":
        assert rec["cost"]["task_finetune"]["vqa"]["steps"] == 4 and rec["cost"]["decoder_finetune"]["steps"] == 4
    assert _files(run) == before
    assert evaluate_run(run).name == out.name + "-2"  # never over an earlier evaluation


def test_a_captioning_run_is_evaluated_on_vqa_with_other_settings(runs):
    out = cli("evaluate", "run", str(runs["baseline"]), "--task", "vqa", "--split", "val",
              "--set", "tasks.vqa.num_beams=1")
    assert out.returncode == 0, out.stderr[-2000:]
    found = next((runs["baseline"] / "evals").glob("vqa-val-*/results.json"))
    rec = json.loads(found.read_text())
    assert rec["splits"] == {"vqa": "val"} and rec["settings"]["vqa"]["num_beams"] == 1
    assert rec["metrics"]["vqa"]["protocol"] == "zero-shot" and rec["metrics"]["vqa"]["questions"] > 0
    assert "vqa" in out.stdout and "overall" in out.stdout
    from vlp_bench.reports.summary import extra_evaluations  # `summary --json` lists these

    assert any(e["task"] == "vqa" and e["split"] == "val" and e["overrides"] == ["tasks.vqa.num_beams=1",
                                                                                  'tasks.vqa.split="val"']
               for e in extra_evaluations([runs["baseline"]]))
    page = cli("report", str(runs["baseline"]), "--out", str(found.parent / "report.html"))
    assert page.returncode == 0 and "Extra evaluations" in (found.parent / "report.html").read_text()


def _two_images(run: Path) -> list[str]:
    from vlp_bench.config import cache_dir, load_config_dict

    cfg = load_config_dict(json.loads((run / "config.json").read_text()))
    images = sorted((cache_dir(cfg) / "world").glob("*/images/*.png"))[:2]
    assert len(images) == 2
    return [str(p) for p in images]


@pytest.mark.parametrize("method", ["baseline", "flm"])
def test_predict_captions_and_answers_on_two_images(runs, method, capfd):
    from vlp_bench.evaluate import predict

    images = [Path(p) for p in _two_images(runs[method])]
    for question in (None, "what color is the circle?"):
        rows = predict(runs[method], images, question)
        assert [p for p, _ in rows] == images and all(isinstance(t, str) for _, t in rows)
    assert "fine-tuning as the run did" not in capfd.readouterr().err  # flm: its kept phase copies


def test_predict_on_the_command_line_reads_files_and_folders(runs):
    from vlp_bench.evaluate import inputs_of

    images = _two_images(runs["baseline"])
    out = cli("predict", str(runs["baseline"]), *images, "--set", "tasks.caption.num_beams=1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert [line.split("\t")[0] for line in out.stdout.splitlines()] == images
    folder = Path(images[0]).parent
    assert inputs_of([folder], clips=False) == sorted(folder.glob("*.png"))


def test_predict_repeats_the_phase_when_no_copy_was_kept(runs, tmp_path, capfd):
    from vlp_bench.evaluate import predict

    run = tmp_path / "flm-seed0"
    shutil.copytree(runs["flm"], run, ignore=shutil.ignore_patterns("evals", "weights-*"))
    images = [Path(p) for p in _two_images(run)]
    again = predict(run, images, "what color is the circle?")
    assert "fine-tuning as the run did before evaluating vqa (4 steps" in capfd.readouterr().err
    kept = predict(runs["flm"], images, "what color is the circle?")
    assert [t for _, t in again] == [t for _, t in kept]  # the phase re-run from the seed gives the copy's answers


def test_refusals(runs, tmp_path):
    from vlp_bench.errors import UserError
    from vlp_bench.evaluate import evaluate_run, predict

    base, images = runs["baseline"], [Path(p) for p in _two_images(runs["baseline"])]

    def copy(name: str) -> Path:
        return Path(shutil.copytree(base, tmp_path / name, ignore=shutil.ignore_patterns("evals")))

    running = copy("running")
    rec = json.loads((running / "results.json").read_text())
    (running / "results.json").write_text(json.dumps({**rec, "status": "running"}))
    out = cli("evaluate", "run", str(running))  # one refusal through the command line: exit 2, one line
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "did not finish" in out.stderr

    no_weights = copy("no-weights")
    (no_weights / "weights.safetensors").unlink()
    with pytest.raises(UserError, match="kept no weights"):
        predict(no_weights, images)

    other = copy("other-method")  # the flm run's weights in the baseline's place
    shutil.copy(runs["flm"] / "weights.safetensors", other / "weights.safetensors")
    with pytest.raises(UserError, match="does not match method 'baseline'"):
        evaluate_run(other)

    moved = copy("other-backbones")  # its LLM re-pre-trained with one more step: not the one it trained on
    cfg = json.loads((moved / "config.json").read_text())
    cfg["llm"]["pretrain_steps"] += 1
    (moved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="other frozen backbones"):
        evaluate_run(moved)
    assert not (moved / "evals").exists()  # nothing half-written

    gone = copy("backbone-gone")  # a checkpoint the run was trained on, no longer there
    cfg = json.loads((gone / "config.json").read_text())
    cfg["llm"]["name"] = str(tmp_path / "deleted-llm")
    (gone / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="cannot rebuild backbone-gone as it ran: .*not available"):
        predict(gone, images)

    for call, match in [(lambda: evaluate_run(base, overrides=["train.lr=0.1"]), "would describe another model"),
                        (lambda: predict(base, [tmp_path / "missing.png"]), "no such file"),
                        (lambda: predict(base, images, "why?", task="caption"), "takes no question"),
                        (lambda: predict(base, [base / "config.json"]), "cannot read image"),
                        (lambda: evaluate_run(tmp_path), "not a run directory")]:
        with pytest.raises(UserError, match=match):
            call()
