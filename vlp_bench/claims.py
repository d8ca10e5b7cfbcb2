"""`vlp-bench claims`: run what the papers' claims need, on several tiny worlds, then judge them.

The claims and the studies they read are data (vlp_bench/reports/claims.py); this module only runs
them. A ledger directory holds:
- claims.json: the ledger itself (reports/claims.py `ledger`), rewritten after every study;
- ledger.json: the config the ledger was started with (what `--resume` continues);
- timing.json: each study's wall-clock on each world, in seconds, gathered from
- world-K/STUDY/: one ordinary `vlp-bench run` experiment directory per study and world, with
  claims-time.json (the study's wall-clock, summed over resumed sessions);
- tune/STUDY/METHOD/: with claims.tune, each compared arm's tuning search (vlp_bench/search.py), and
  tune/best.json: {study: {method: its tuned train values}}.

Studies are taken in order, each on every world before the next, by up to claims.jobs spawned
processes side by side (one per world by default); only the command's process writes the ledger.
An interrupted ledger already decides the claims of the studies it finished; `--resume` continues
the rest (finished runs are kept, interrupted ones continue from their checkpoints).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from vlp_bench.config import BenchConfig, load_config_dict
from vlp_bench.errors import UserError
from vlp_bench.experiment import FINAL, run as run_experiment, run_status
from vlp_bench.files import atomic_write_json
from vlp_bench.log import say, set_progress, shows_progress
from vlp_bench.reports import claims as ledger_mod
from vlp_bench.reports.claims_scale import read_json
from vlp_bench.typed import to_dict

SAVED = "ledger.json"
TIMING = "timing.json"
WALL = "claims-time.json"  # in each study's directory: its wall-clock, summed over sessions
SEED_SECTIONS = ("world", "vision", "llm", "bert")  # world k adds k to each one's seed


def world_config(cfg: BenchConfig, k: int) -> dict:
    """The config of tiny world k as a plain dict: every seed that makes the world and its
    pre-trained backbones shifted by k."""
    data = to_dict(cfg)
    for section in SEED_SECTIONS:
        data[section]["seed"] += k
    return data


def study_config(cfg: BenchConfig, study: ledger_mod.Study, k: int, out: Path, tuned: dict) -> BenchConfig:
    """The `vlp-bench run` config of one study on world k (`tuned`: {method: {train.key: value}})."""
    data = world_config(cfg, k)
    data["experiment"].update(methods=list(study.methods), tasks=list(study.tasks), out=str(out))
    data["target"].update(metric="", reference=study.reference)  # the study's own headline and reference
    data["search"]["metric"] = ""
    for key, value in study.settings.items():
        section, _, name = key.partition(".")
        data[section][name] = value
    data["experiment"]["train_by_method"] = tuned
    return load_config_dict(data)


def _done(out: Path) -> bool:
    """Whether an experiment directory's runs are all over (finished, failed or pruned)."""
    saved = out / "experiment.json"
    if not saved.is_file():
        return False
    cfg = read_json(saved, "an experiment's config")["experiment"]
    return all(run_status(out / f"{m}-seed{s}") in FINAL for m in cfg["methods"] for s in cfg["seeds"])


def run_claims(cfg: BenchConfig | None, out: Path, resume: bool = False, bench_files: list[Path] = ()) -> dict:
    """Run (or, with `resume`, continue with its saved config) every study the selected claims
    need, on every world, writing the ledger after each (with `bench_files`' step times); returns
    the ledger. OUT/timing.json gathers each study's claims-time.json (its wall-clock, summed over
    the sessions that ran it)."""
    if resume:
        cfg = saved_config(out)
    elif (out / SAVED).is_file():
        raise UserError(f"{out} already holds a ledger; choose another --out, or continue it with "
                        f"`vlp-bench claims --resume {out}`")
    claims = ledger_mod.select(cfg.claims.only)
    studies = ledger_mod.studies_for(claims, cfg.claims)
    if cfg.claims.tune and cfg.claims.tune_seed in cfg.experiment.seeds:  # before anything is written
        raise UserError(f"claims.tune_seed {cfg.claims.tune_seed} is one of experiment.seeds {cfg.experiment.seeds}: "
                        f"a judged seed would help choose the settings")
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / SAVED, to_dict(cfg))
    except OSError as e:
        raise UserError(f"cannot write to the output directory {out}: {e.strerror or e}") from None
    cores = torch.get_num_threads()  # torch's default, the machine's cores (before tuning sets experiment.threads)
    jobs = min(cfg.claims.jobs or cores, cfg.claims.worlds)
    threads = cfg.experiment.threads or max(1, cores // jobs)
    tuned = tune_methods(cfg, out, claims) if cfg.claims.tune else {}
    tasks = [(i, study, k) for i, (study, k) in enumerate(((s, k) for s in studies for k in range(cfg.claims.worlds)), 1)]
    wheres = {i: out / f"world-{k}" / study.name for i, study, k in tasks}
    configs = {i: study_config(cfg, study, k, wheres[i], tuned.get(study.name, {})) for i, study, k in tasks}
    todo = []
    for i, study, k in tasks:
        if _done(wheres[i]):
            say(f"claims: study {i}/{len(tasks)} ({study.name}, world {k}) already done, kept")
            write_costs(configs[i], wheres[i])
        else:
            todo.append((i, study, k))
    result = None

    def finished(i: int) -> dict:  # this process alone writes the ledger, after each study
        write_costs(configs[i], wheres[i])
        atomic_write_json(out / TIMING, {f"{p.parent.name}/{p.name}": read_json(p / WALL, "a study's time")["wall_s"]
                                         for p in sorted(out.glob("world-*/*")) if (p / WALL).is_file()})
        return write_ledger(out, bench_files)

    if jobs == 1 or len(todo) < 2:
        for i, study, k in todo:
            say(f"claims: study {i}/{len(tasks)} ({study.name}, world {k}) in {wheres[i]}")
            run_study(to_dict(configs[i]), 0, None)
            result = finished(i)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        say(f"claims: {len(todo)} studies, {jobs} side by side with {threads} thread(s) each")
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            running = {pool.submit(run_study, to_dict(configs[i]), threads, shows_progress()): (i, study, k)
                       for i, study, k in todo}
            try:
                for done in as_completed(running):
                    i, study, k = running[done]
                    done.result()  # a failure is raised here, as it would be in this process
                    say(f"claims: study {i}/{len(tasks)} ({study.name}, world {k}) done")
                    result = finished(i)
            except BaseException:  # no queued study starts; a running one ends (--resume continues)
                for future in running:
                    future.cancel()
                raise
    return result if result is not None else finished(tasks[-1][0])


def run_study(data: dict, threads: int, progress: bool | None) -> None:
    """Run one study's experiment (its config as a dict; `threads`: torch's, 0 = as it is), adding its
    wall-clock to STUDY/claims-time.json, an interrupted session's too. `progress`: in a process of
    its own, whether to show progress (as lines: several processes share the terminal); None here."""
    cfg = load_config_dict(data)
    if progress is not None:
        set_progress(progress, lines=True)
    if threads:
        torch.set_num_threads(threads)
    where = Path(cfg.experiment.out)
    t0 = time.perf_counter()
    try:
        run_experiment(cfg, resume=(where / "experiment.json").is_file())
    finally:
        spent = read_json(where / WALL, "a study's time")["wall_s"] if (where / WALL).is_file() else 0.0
        where.mkdir(parents=True, exist_ok=True)
        atomic_write_json(where / WALL, {"wall_s": spent + time.perf_counter() - t0})


def write_costs(cfg: BenchConfig, out: Path) -> None:
    """The study's per-sample costs at the ViT-L/14 + 1B preset too (flops-vitl-1b.json): its methods
    that the paper scale cannot cost (ToMe inside EVA's ViT-g) get a large-scale ratio there."""
    from vlp_bench import costmodel
    from vlp_bench.experiment import reference_method

    path = out / "flops-vitl-1b.json"
    if path.is_file():
        return
    try:
        table = costmodel.costable_table(costmodel.scale("vitl-1b", cfg), cfg.experiment.methods, reference_method(cfg))
        atomic_write_json(path, table)
    except Exception as e:  # noqa: BLE001 - the study's runs are done; the ledger reads the paper scale alone
        say(f"the vitl-1b costs of {out} could not be written ({type(e).__name__}: {e})")


def saved_config(out: Path) -> BenchConfig:
    """The config a ledger directory was started with."""
    path = out / SAVED
    if not path.is_file():
        raise UserError(f"nothing to resume in {out}: no {SAVED} (was it made by `vlp-bench claims`?)")
    return load_config_dict(read_json(path, "a ledger's config"))


def write_ledger(out: Path, bench_files: list[Path] = (), sources: list[Path] = (), settings: dict | None = None) -> dict:
    """Judge the claims from the result files of the ledger directory (or of `sources`; `settings`:
    the rule's margin and about, if not the saved ones); writes OUT/claims.json and OUT/report.html."""
    from vlp_bench.reports import html

    result = ledger_mod.ledger(list(sources) or [out], bench_files, settings)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to the output directory {out}: {e.strerror or e}") from None
    atomic_write_json(out / "claims.json", result)
    try:
        html.write([], out / "report.html", ledgers=[out / "claims.json"])
    except Exception as e:  # noqa: BLE001 - the ledger is written; the page can be made again
        say(f"the report could not be written ({type(e).__name__}: {e}); `vlp-bench report {out}` retries")
    return result


def tune_methods(cfg: BenchConfig, out: Path, claims: list) -> dict:
    """Equal tuning: the same `claims.tune`-trial search over `claims.tune_space` for every arm the
    claims compare (a method in a study), on world 0 with seed claims.tune_seed, on its study's
    headline validation metric; returns {study: {method: its best train.* values}}. Resumes the
    searches it finds; tune/best.json keeps what is done."""
    from vlp_bench.search import run_search

    saved = out / "tune" / "best.json"
    best: dict = read_json(saved, "tuning results") if saved.is_file() else {}
    arms = dict.fromkeys(arm for c in claims for arm in (c.method, c.reference))
    for name, method in arms:
        if method in best.get(name, {}):
            continue
        where = out / "tune" / name / method
        data = to_dict(study_config(cfg, ledger_mod.study_of(name), 0, where, {}))
        data["experiment"].update(methods=[method], seeds=[cfg.claims.tune_seed])
        data["target"]["reference"] = method
        data["search"].update(method=method, trials=cfg.claims.tune, mode="budget", pruner="none",
                              space=cfg.claims.tune_space, method_space=False, study=f"tune-{name}-{method}",
                              storage="", budget_gflop_per_sample=0.0)
        say(f"claims: tuning {method} in {name} ({cfg.claims.tune} trials over {', '.join(cfg.claims.tune_space)})")
        summary = run_search(load_config_dict(data), where)
        trials = {t["number"]: t for t in summary["trials"]}
        if not summary["best"]:
            raise UserError(f"tuning {method} in {name}: no trial finished (see {where})")
        best.setdefault(name, {})[method] = {k.partition(".")[2]: v
                                             for k, v in trials[summary["best"][0]]["params"].items()}
        atomic_write_json(saved, best)
    return best
