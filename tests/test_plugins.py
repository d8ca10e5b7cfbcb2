"""Plug-ins from other packages: the example package (examples/vlp-bench-stride, installed by
conftest.py) is listed, validated and run end to end with the trackers on; broken plug-ins are
left out with a message naming their package; `validate` catches a method that misreports its
tokens or its cost hooks; TensorBoard's own reader reads the run's curves back."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlp_bench.errors import UserError
from vlp_bench.experiment import load_config
from vlp_bench.methods.baseline import Baseline
from vlp_bench.registry import METHODS
from vlp_bench.results import SCHEMA_VERSION
from vlp_bench.files import read_jsonl
from vlp_bench.trackers import Trackers, TrackersConfig
from vlp_bench.validate import validate


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "vlp_bench", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_the_example_plugin_is_listed_with_its_package():
    assert METHODS.origin("stride") == "vlp-bench-stride 0.1.0" and METHODS.origin("baseline") == "built-in"
    proc = cli("list")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.split()[:1] == ["stride"])
    assert "vlp-bench-stride 0.1.0" in line and "Keep every s-th patch token" in line
    assert "built-in" in next(ln for ln in proc.stdout.splitlines() if ln.split()[:1] == ["baseline"])


@pytest.fixture(scope="module")
def stride_run(tmp_path_factory, tiny_overrides):
    """The example plug-in trained, evaluated and reported like a built-in, both trackers on."""
    out = tmp_path_factory.mktemp("plugin-run")
    sets = [a for o in [*tiny_overrides, "experiment.tasks=['caption']", "trackers.tensorboard=true",
                        "trackers.wandb='offline'"] for a in ("--set", o)]
    proc = cli("run", "--methods", "stride", *sets, "--out", str(out), cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "stride-seed0"


@pytest.mark.slow
def test_the_example_plugin_runs_end_to_end(stride_run):
    res = json.loads((stride_run / "results.json").read_text())
    assert res["schema_version"] == SCHEMA_VERSION and res["status"] == "finished" and res["method"] == "stride"
    assert res["config"]["methods"]["stride"] == {"stride": 2}  # its config is saved like a built-in's
    assert res["env"]["plugins"] == {"methods": {"stride": "vlp-bench-stride 0.1.0"}, "tasks": {}}
    assert res["cost"]["tokens_to_llm"] == res["method_info"]["tokens_to_llm"] == 33  # CLS + 64 / 2 patches
    assert res["cost"]["train_flops"] > 0 and isinstance(res["metrics"]["caption"]["CIDEr"], float)
    assert (stride_run.parent / "report.html").is_file()
    assert "stride" in json.loads((stride_run.parent / "flops-paper.json").read_text())["methods"]


@pytest.mark.slow
def test_tensorboard_holds_the_loss_and_cider_curves(stride_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(stride_run))
    events.Reload()
    rows = read_jsonl(stride_run / "metrics.jsonl")
    loss = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    cider = [(r["step"], r["eval"]["caption"]["CIDEr"]) for r in rows if r.get("split") == "val"]
    assert len(loss) == 3 and len(cider) == 3  # steps 2, 4, 6; evaluations at 0, 4, 6
    val_loss = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert [s for s, _ in val_loss] == [0, 2, 4, 6]  # step 0's evaluation, then every log row, once each
    for tag, curve in (("train/loss", loss), ("val/caption/CIDEr", cider), ("val/loss", val_loss)):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(s, pytest.approx(v, rel=1e-6)) for s, v in curve]  # float32 in the event file
    (final,) = events.Scalars("test/caption/CIDEr")
    assert final.value == pytest.approx(json.loads((stride_run / "results.json").read_text())
                                        ["metrics"]["caption"]["CIDEr"], rel=1e-6)


@pytest.mark.slow
def test_wandb_offline_run_is_written(stride_run):
    (run_file,) = stride_run.glob("wandb/offline-run-*/run-*.wandb")
    data = run_file.read_bytes()  # W&B's own record format: the logged keys are stored as text
    assert b"train/loss" in data and b"val/caption/CIDEr" in data and b"stride-seed0" in data


def _fake_package(root: Path, name: str, entry_points: str, modules: dict[str, str]) -> Path:
    """An installed distribution as pip leaves one: a dist-info with METADATA and entry_points.txt."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    for module, text in modules.items():
        (root / f"{module}.py").write_text(text)
    return root


@pytest.mark.slow
def test_broken_plugins_are_left_out_with_their_package_named(tmp_path):
    import os

    site = _fake_package(tmp_path / "site", "lab-methods", "\n".join([
        "[vlp_bench.methods]", "broken = lab_broken:Method", "baseline = lab_ok:Clash", "notamethod = lab_ok:helper",
        "[vlp_bench.tasks]", "lab-task = lab_ok:LabTask", ""]), {
        "lab_broken": "import a_module_that_is_not_installed\n",
        "lab_ok": ("from dataclasses import dataclass\nfrom vlp_bench.task import Task\n"
                   "from vlp_bench.methods.baseline import Baseline\n\nclass Clash(Baseline):\n    pass\n\n"
                   "def helper():\n    pass\n\n@dataclass\nclass LabConfig:\n    split: str = 'val'\n\n"
                   "class LabTask(Task):\n    '''A lab's own task.'''\n    Config = LabConfig\n"),
    })
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ["PYTHONPATH"]])}
    proc = cli("list", env=env)
    assert proc.returncode == 0, proc.stderr
    methods = [ln.split()[0] for ln in proc.stdout.split("tasks:")[0].splitlines()[1:]]
    assert "baseline" in methods and "stride" in methods and "broken" not in methods  # the rest works
    assert "lab-task" in proc.stdout and "lab-methods 1.0" in proc.stdout  # a task plug-in, with its origin
    left_out = proc.stdout.split("plug-ins left out:")[1]
    assert "'broken' of lab-methods 1.0 (lab_broken:Method) cannot be imported: ModuleNotFoundError" in left_out
    assert "'baseline' of lab-methods 1.0 (lab_ok:Clash): the name is taken by a built-in one" in left_out
    assert "'notamethod' of lab-methods 1.0 (lab_ok:helper) is not a subclass of vlp_bench.method:Method" in left_out
    assert proc.stderr.count("vlp-bench: warning: plug-in") == 3  # said once each, on stderr

    proc = cli("run", "--methods", "broken", env=env, cwd=tmp_path)  # asking for it: its reason, one line
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: plug-in method 'broken' of lab-methods 1.0 (lab_broken:Method) cannot be imported" in proc.stderr
    proc = cli("flops", "--methods", "stride,baseline", "--json", env=env, cwd=tmp_path)  # the others still work
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)["methods"]) == {"stride", "baseline"}


class _MisreportsTokens(Baseline):
    """Test-only: tells the trainer one token fewer than it sends the LLM."""

    def training_loss(self, batch, stage):
        out = super().training_loss(batch, stage)
        return dataclasses.replace(out, tokens_to_llm=out.tokens_to_llm - 1)

    def info(self):
        return {"tokens_to_llm": 16}  # and declares a count it never sends


class _CoarseShapeKey(Baseline):
    """Test-only: one shape_key for every batch, though its text length changes the FLOPs."""

    def shape_key(self, batch, stage):
        return 0


def test_validate_catches_misdeclared_tokens_and_cost_hooks(tiny_overrides):
    for name, cls in (("test-tokens", _MisreportsTokens), ("test-shape-key", _CoarseShapeKey)):
        METHODS.register(name)(cls)
    try:
        found = validate(lambda: load_config(None, [
            *tiny_overrides, "experiment.methods=['stride', 'test-tokens', 'test-shape-key']",
            "experiment.tasks=['vqa']"]))
    finally:
        for name in ("test-tokens", "test-shape-key"):
            METHODS._entries.pop(name)
    problems = {(f.subject, f.check): f.detail for f in found.problems}
    assert set(problems) == {("method test-tokens", "tokens"), ("method test-shape-key", "costs")}, problems
    assert "StepOutput.tokens_to_llm says 64 but 65 reach the LLM" in problems["method test-tokens", "tokens"]
    assert 'info()["tokens_to_llm"] says 16 but 65 reach the LLM in generation' in problems["method test-tokens", "tokens"]
    assert "shape_key() 0 is equal for batches whose FLOPs differ" in problems["method test-shape-key", "costs"]
    checks = {f.check for f in found if f.subject == "method stride"}
    assert checks == {"fits", "stage train", "tokens", "costs", "vqa"}  # the example passes every check


def test_validate_reports_a_bad_config_in_its_list_exit_1(tmp_path):
    proc = cli("validate", "--set", "train.stpes=3", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "PROBLEM" in proc.stdout and "unknown config key 'train.stpes' (did you mean 'steps'?)" in proc.stdout


def test_a_failing_tracker_is_switched_off_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    from vlp_bench import trackers

    def boom(self, row):
        raise OSError("disk full")

    monkeypatch.setattr(trackers.TensorBoard, "log", boom)
    t = Trackers(TrackersConfig(tensorboard=True), tmp_path, {"config": {}, "run_id": "x"})
    t.log({"step": 1, "loss": 1.0})
    t.log({"step": 2, "loss": 0.5})  # said once: the tracker is off
    t.close({"status": "finished"})
    assert capsys.readouterr().err.count("tracker TensorBoard switched off (OSError: disk full)") == 1


def test_a_tracker_without_its_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'vlp-bench\[wandb\]'"):
        TrackersConfig(wandb="offline").check()


@pytest.mark.slow
def test_validate_finds_no_problem_in_any_registered_method(tiny_overrides):
    """No false alarms: every method (built-in, composed, installed plug-in) passes every check."""
    names = METHODS.names()
    family = [f"methods.{m}.{k}" for m in ("flm", "mlm", "ar") for k in ("init='llm'", "text_layers=1")]  # TINY: no [bert]
    found = validate(lambda: load_config(None, [*tiny_overrides, f"experiment.methods={names}",
                                                "experiment.tasks=['vqa']", *family]))
    assert not found.problems, [(f.subject, f.check, f.detail) for f in found.problems]
    assert {f.subject for f in found} >= {f"method {n}" for n in names}


def test_the_guide_shows_the_example_package_as_it_is():
    """docs/adding-a-method.md's code blocks are excerpts of examples/vlp-bench-stride, verbatim."""
    import re

    repo = Path(__file__).resolve().parents[1]
    guide = (repo / "docs" / "adding-a-method.md").read_text()
    files = [p.read_text() for p in (repo / "examples" / "vlp-bench-stride").iterdir() if p.suffix in (".py", ".toml")]
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", guide, flags=re.S)
    assert len(blocks) >= 5
    for block in blocks:
        assert any(block in text for text in files), f"not in the example package:\n{block}"
