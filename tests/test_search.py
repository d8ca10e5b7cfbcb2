"""`vlp-bench search`: a short study on the tiny world (SQLite) that writes its trials and resumes;
two workers sharing one study on a real PostgreSQL server; a killed worker's trial fails and is
retried."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlp_bench.errors import UserError
from vlp_bench.registry import METHODS
from vlp_bench.methods.simvlg import schedule_values as method_values
from vlp_bench.search import space_of

from conftest import random_backbones

import optuna


def _sets(overrides):
    return [a for o in [*overrides, "experiment.tasks=['caption']"] for a in ("--set", o)]  # the searched metric only


def search(tiny_overrides, *args, cwd, wait=True):
    cmd = [sys.executable, "-m", "vlp_bench", "search", *_sets(tiny_overrides), *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def test_method_values_turn_an_inflection_into_a_ramp():
    assert method_values({"r": 8, "inflection": 0.5, "variant": "tome"}) == {"r": [8, 0.5], "variant": "tome"}
    assert method_values({"r": 8, "inflection": 0.0}) == {"r": 8}
    assert method_values({"variant": "evlgen"}) == {"variant": "evlgen"}


def test_per_layer_lists_and_token_counts_are_schedules():
    from vlp_bench.nn.merging import token_counts

    assert method_values({"r_layer_1": 4, "r_layer_0": 9}, depth=2) == {"r": [9, 4]}
    with pytest.raises(Exception, match="2 r_layer_\\* parameters for a bridge of 3 layers"):
        method_values({"r_layer_0": 1, "r_layer_1": 2}, depth=3)
    for tokens in (65, 40, 25, 17, 9):  # reached exactly where ToMe's clamp allows, else as close as it can
        r = method_values({"tokens": tokens}, n_tokens=65, depth=2)["r"]
        assert token_counts(65, r)[-1] == max(tokens, 17)
    assert token_counts(65, method_values({"tokens": 9}, n_tokens=65, depth=4)["r"])[-1] == 9


def test_search_space_is_the_methods_own_with_the_config_laid_over_it():
    simvlg = METHODS.get("simvlg")
    assert space_of(simvlg, {}) == simvlg.search_space
    narrowed = space_of(simvlg, {"r": {"low": 10, "high": 20}, "variant": ["tome"]})
    assert narrowed == {**simvlg.search_space, "r": {"low": 10, "high": 20}, "variant": ["tome"]}
    assert simvlg.search_space["variant"] == ["tome", "evlgen"]  # the class's own space is left alone
    with pytest.raises(UserError, match="method 'mlp' declares no search_space"):
        space_of(METHODS.get("mlp"), {})
    assert space_of(METHODS.get("mlp"), {"x": [1]}) == {"x": [1]}  # run_search then names unknown settings
    lr = {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    assert space_of(simvlg, lr, method_space=False) == lr  # training settings alone (equal tuning)
    assert space_of(simvlg, lr) == {**simvlg.search_space, **lr}


@pytest.mark.parametrize("override, message", [
    ("search.space.r={low=5, high=1}", "space.r: low 5 > high 1"),
    ("search.space.r=[]", "space.r: an empty list of choices"),
    ("search.space.r={low=1}", "a list of choices or {low, high[, log]}"),
    ("search.trials=0", "trials must be >= 1"),
    ("search.metric=vqa.overall", "task 'vqa' is not in experiment.tasks ['caption']"),
    ("search.space.widht=[1]", "['widht'] are not settings of methods.simvlg"),
    ("search.space={'train.lrr' = [1e-3]}", "['train.lrr'] are not settings of methods.simvlg"),
])
def test_bad_search_configs_are_one_line_errors(override, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlp_bench", "search", "--set", override, "--set",
                           "experiment.tasks=['caption']"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sqlite_search_writes_its_trials_and_resumes(tiny_overrides, tmp_path):
    out = tmp_path / "s"
    proc = search(tiny_overrides, "--trials", "2", "-o", str(out), cwd=tmp_path)
    assert f"report: {out / 'report.html'}" in proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "search.json").read_text())
    trials = summary["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 2 and summary["directions"] == ["MAXIMIZE", "MINIMIZE"]
    assert [t["params"]["r"] for t in trials[:2]] == [0, 30]  # no merging; the smallest r closest to 29/257
    for t in trials:  # every trial is an ordinary run, its costs on the trial
        rec = json.loads((Path(t["user_attrs"]["run_dir"]) / "results.json").read_text())
        assert rec["status"] == "finished" and rec["method"] == "simvlg"
        assert t["values"][1] == rec["cost"]["train_flops"] == t["user_attrs"]["train_flops"]
        assert t["user_attrs"]["tokens_to_llm"] == rec["cost"]["tokens_to_llm"]
    assert trials[0]["user_attrs"]["tokens_to_llm"] == 65 and trials[1]["user_attrs"]["tokens_to_llm"] == 18
    assert summary["best"] and set(summary["best"]) <= {0, 1}
    again = search(tiny_overrides, "--trials", "3", "-o", str(out), cwd=tmp_path)  # resumes: one more trial
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((out / "search.json").read_text())["trials"]
    assert [t["number"] for t in resumed] == [0, 1, 2] and resumed[:2] == [
        {**t, "duration_s": resumed[i]["duration_s"]} for i, t in enumerate(trials)]
    assert len(list(out.glob("trial-*"))) == 3
    page = (out / "report.html").read_text()  # the report shows the study: every trial, the front
    assert "Search: study simvlg-pareto (pareto)" in page and "complete 3" in page
    table = [line for line in page.splitlines() if "<td" in line and "T_search0" in line]
    assert len(table) >= 3 * 2  # one row per complete trial (a row holds several cells)
    assert json.loads((out / "search.json").read_text())["best"]


@pytest.mark.slow
def test_budget_mode_prunes_configs_over_budget_before_training(tiny_overrides, tmp_path):
    """Scalarised mode: a config whose counted FLOPs per sample exceed the budget never trains; the
    others report their validation evaluations to the pruner."""
    out = tmp_path / "b"
    proc = search(tiny_overrides, "--trials", "2", "-o", str(out), "--set", "search.mode=budget",
                  "--set", "search.budget_gflop_per_sample=0.02", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    no_merge, paper = json.loads((out / "search.json").read_text())["trials"][:2]
    assert no_merge["state"] == "PRUNED" and no_merge["user_attrs"]["predicted_gflop_per_sample"] > 0.02
    assert "run_dir" not in no_merge["user_attrs"] and not (out / "trial-0000").exists()
    assert paper["state"] == "COMPLETE" and paper["user_attrs"]["predicted_gflop_per_sample"] <= 0.02
    study = optuna.load_study(study_name="simvlg-budget", storage=f"sqlite:///{out / 'study.db'}")
    assert sorted(study.trials[1].intermediate_values) == [0, 4, 6]  # every validation evaluation


@pytest.mark.slow
def test_a_run_stopped_by_its_evaluation_callback_is_recorded_as_pruned(tiny_overrides, tmp_path):
    """How a pruner stops a trial: the callback sees each validation evaluation and raises StopRun."""
    from vlp_bench.experiment import StopRun, load_config, prepare

    cfg = load_config(None, [*tiny_overrides, "experiment.tasks=['caption']"])
    experiment = prepare(cfg)
    seen = []

    def on_eval(step, metrics):
        seen.append((step, metrics["caption"]["CIDEr"]))
        if step == 4:
            raise StopRun("pruned at step 4")

    with pytest.raises(StopRun):
        experiment.run_one("simvlg", 0, tmp_path / "run", on_eval=on_eval)
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rec["status"] == "pruned" and rec["error"] == "pruned at step 4" and [s for s, _ in seen] == [0, 4]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_search_a_composition_by_name(tiny_overrides, tmp_path):
    proc = search(tiny_overrides, "--method", "simvlg+tome-vit", "--trials", "1", "-o", str(tmp_path / "c"),
                  "--set", "search.space={r={low=0, high=8}}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trial, known = json.loads((tmp_path / "c" / "search.json").read_text())["trials"]
    assert trial["state"] == "COMPLETE" and known["state"] == "WAITING"  # the paper's point, enqueued for later
    assert trial["params"]["r"] == 0 and trial["user_attrs"]["tokens_to_llm"] == 57  # the ViT still merges


@pytest.mark.slow
def test_a_search_whose_trials_all_fail_stops(tiny_overrides, tmp_path):
    out = tmp_path / "f"
    proc = search(tiny_overrides, "--trials", "1", "-o", str(out), "--set", "train.lr=1e30",
                  "--set", "train.grad_clip=0.0", cwd=tmp_path)
    assert proc.returncode == 1 and "the study holds 0 of 1 finished trials" in proc.stderr
    trials = json.loads((out / "search.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["FAIL"] * 3
    assert "NonFiniteLoss" in json.loads((out / "trial-0000" / "simvlg-seed0" / "results.json").read_text())["error"]


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A real PostgreSQL server on a free local port, in a temporary directory; stopped at the end."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    pytest.importorskip("psycopg2")
    if not (initdb and pg_ctl):
        if os.environ.get("CI") == "true":  # CI installs PostgreSQL: a missing one is a broken setup
            pytest.fail("PostgreSQL (initdb, pg_ctl) is required in CI")
        pytest.skip("no PostgreSQL server binaries on this machine")
    base = tmp_path_factory.mktemp("pg")
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
        as_user = ["runuser", "-u", "postgres", "--"]
        os.chmod(base, 0o777)
        for parent in base.parents:
            if parent == Path("/"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = base / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-o",
                    f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)


def _study_trials(url: str, name: str):
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


@pytest.mark.slow
def test_two_workers_share_one_study_on_postgresql(postgres, tiny_overrides, tmp_path):
    out = tmp_path / "s"
    prep = subprocess.run([sys.executable, "-m", "vlp_bench", "prepare", *_sets(tiny_overrides)], cwd=tmp_path,
                          capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr[-2000:]
    args = ["--trials", "3", "--storage", postgres, "--study", "shared", "-o", str(out)]
    first = search(tiny_overrides, *args, cwd=tmp_path, wait=False)
    deadline = time.time() + 120  # the first worker creates the study and enqueues its known points
    while time.time() < deadline:
        try:
            if len(_study_trials(postgres, "shared")) >= 2:
                break
        except KeyError:
            pass
        time.sleep(0.5)
    second = search(tiny_overrides, *args, cwd=tmp_path, wait=False)
    for proc in (first, second):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    trials = _study_trials(postgres, "shared")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 3 <= len(complete) <= 4 and len(trials) == len(complete)  # nothing lost or failed; at most one extra
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["run_dir"] for t in trials}) == len(trials)  # no trial ran twice
    assert [t.params["r"] for t in trials].count(0) == 1  # the known points were enqueued once
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers did work
    for t in trials:
        rec = json.loads((Path(t.user_attrs["run_dir"]) / "results.json").read_text())
        assert rec["status"] == "finished" and t.values[1] == rec["cost"]["train_flops"]


@pytest.mark.slow
def test_a_killed_workers_trial_fails_and_is_retried(postgres, tiny_overrides, tmp_path):
    out = tmp_path / "s"
    args = ["--storage", postgres, "--study", "killed", "-o", str(out), "--set", "search.heartbeat_s=1"]
    worker = search(tiny_overrides, *args, "--trials", "1", "--set", "train.steps=40", cwd=tmp_path, wait=False)
    deadline = time.time() + 180
    while time.time() < deadline and not list(out.glob("trial-0000/*/metrics.jsonl")):
        time.sleep(0.2)
    assert worker.poll() is None, "the worker finished before it could be killed"
    os.killpg(worker.pid, signal.SIGKILL)  # a crashed machine: no clean-up, the heartbeat just stops
    worker.wait()
    time.sleep(3)  # longer than the grace period (2 x heartbeat)
    # a new worker (short training now): the study's waiting trials are the enqueued paper point and,
    # once the stale trial is failed, its retry; 2 finished trials take both, in the order queued
    again = search(tiny_overrides, *args, "--trials", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = _study_trials(postgres, "killed")
    assert trials[0].state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 0]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == trials[0].params
    assert [t.state for t in trials[1:]] == [optuna.trial.TrialState.COMPLETE] * 2  # nothing else ran or hangs


def test_start_points_carry_the_configured_training_values_the_space_holds():
    from vlp_bench.experiment import load_config
    from vlp_bench.search import start_points

    bench = load_config(None, ["experiment.methods=['simvlg']", "search.method=simvlg", "train.lr=1e-3"])
    simvlg = METHODS.get("simvlg")
    backbones = random_backbones()
    own = space_of(simvlg, {})
    lr = {"low": 1e-4, "high": 1e-2, "log": True}
    known = start_points(simvlg, bench, backbones, own)
    with_lr = start_points(simvlg, bench, backbones, {**own, "train.lr": lr})
    assert known and with_lr == [{**p, "train.lr": 1e-3} for p in known]  # the method's points, at [train]'s lr
    assert start_points(simvlg, bench, backbones, {"train.lr": lr}) == [{"train.lr": 1e-3}]
    assert start_points(simvlg, bench, backbones, {"train.warmup_steps": [0]}) == []  # 30 is not in the space
