"""`vlp-bench claims`: run what the papers' claims need, on several tiny worlds, then judge them.

The claims and the studies they read are data (vlp_bench/reports/claims.py); this module only runs
them. A ledger directory holds:
- claims.json: the ledger itself (reports/claims.py `ledger`), rewritten after every study;
- ledger.json: the config the ledger was started with (what `--resume` continues);
- timing.json: each study's wall-clock on each world, in seconds (summed over resumed sessions);
- world-K/STUDY/: one ordinary `vlp-bench run` experiment directory per study and world;
- tune/METHOD/: with claims.tune, each compared method's tuning search (vlp_bench/search.py).

Studies run one after another, each on every world before the next, so an interrupted ledger
already decides the claims of the studies it finished; `--resume` continues the rest (finished runs
are kept, interrupted ones continue from their checkpoints).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from vlp_bench.config import BenchConfig, load_config_dict
from vlp_bench.errors import UserError
from vlp_bench.experiment import FINAL, run as run_experiment, run_status
from vlp_bench.files import atomic_write_json
from vlp_bench.log import say
from vlp_bench.reports import claims as ledger_mod
from vlp_bench.typed import to_dict

SAVED = "ledger.json"
TIMING = "timing.json"
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
    cfg = json.loads(saved.read_text())["experiment"]
    return all(run_status(out / f"{m}-seed{s}") in FINAL for m in cfg["methods"] for s in cfg["seeds"])


def run_claims(cfg: BenchConfig | None, out: Path, resume: bool = False) -> dict:
    """Run (or, with `resume`, continue with its saved config) every study the selected claims
    need, on every world, writing the ledger after each; returns the ledger. OUT/timing.json keeps
    each study's wall-clock, summed over the sessions that ran it."""
    if resume:
        cfg = saved_config(out)
    elif (out / SAVED).is_file():
        raise UserError(f"{out} already holds a ledger; choose another --out, or continue it with "
                        f"`vlp-bench claims --resume {out}`")
    claims = ledger_mod.select(cfg.claims.only)
    studies = ledger_mod.studies_for(claims, cfg.claims)
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / SAVED, to_dict(cfg))
    except OSError as e:
        raise UserError(f"cannot write to the output directory {out}: {e.strerror or e}") from None
    tuned = tune_methods(cfg, out, studies) if cfg.claims.tune else {}
    total = len(studies) * cfg.claims.worlds
    timing = json.loads((out / TIMING).read_text()) if (out / TIMING).is_file() else {}
    for i, (study, k) in enumerate(((s, k) for s in studies for k in range(cfg.claims.worlds)), 1):
        where = out / f"world-{k}" / study.name
        scfg = study_config(cfg, study, k, where, {m: tuned[m] for m in study.methods if m in tuned})
        if _done(where):
            say(f"claims: study {i}/{total} ({study.name}, world {k}) already done, kept")
        else:
            say(f"claims: study {i}/{total} ({study.name}, world {k}) in {where}")
            t0 = time.perf_counter()
            run_experiment(scfg, resume=(where / "experiment.json").is_file())
            timing[f"world-{k}/{study.name}"] = timing.get(f"world-{k}/{study.name}", 0.0) + time.perf_counter() - t0
            atomic_write_json(out / TIMING, timing)
        write_costs(scfg, where)
        write_ledger(out)
    return write_ledger(out)


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
    return load_config_dict(json.loads(path.read_text()))


def write_ledger(out: Path, bench_files: list[Path] = (), sources: list[Path] = ()) -> dict:
    """Judge the claims from the result files of the ledger directory (or of `sources`); writes
    OUT/claims.json and OUT/report.html."""
    from vlp_bench.reports import html

    result = ledger_mod.ledger(list(sources) or [out], bench_files)
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


def tune_methods(cfg: BenchConfig, out: Path, studies: list) -> dict:
    """Equal tuning: the same `claims.tune`-trial search over `claims.tune_space` for every method the
    studies compare, on world 0 with seed claims.tune_seed, each on its study's headline validation
    metric; returns {method: its best train.* values}. Resumes the searches it finds."""
    from vlp_bench.search import run_search

    saved = out / "tune" / "best.json"
    best: dict = json.loads(saved.read_text()) if saved.is_file() else {}  # a resumed ledger's, kept
    for study in studies:
        for method in study.methods:
            if method in best:
                continue
            scfg = study_config(cfg, study, 0, out / "tune" / method, {})
            data = to_dict(scfg)
            data["experiment"].update(methods=[method], seeds=[cfg.claims.tune_seed])
            data["target"]["reference"] = method
            data["search"].update(method=method, trials=cfg.claims.tune, mode="budget", pruner="none",
                                  space=cfg.claims.tune_space, method_space=False, study=f"tune-{method}",
                                  storage="", budget_gflop_per_sample=0.0)
            say(f"claims: tuning {method} ({cfg.claims.tune} trials over {', '.join(cfg.claims.tune_space)})")
            summary = run_search(load_config_dict(data), out / "tune" / method)
            trials = {t["number"]: t for t in summary["trials"]}
            if not summary["best"]:
                raise UserError(f"tuning {method}: no trial finished (see {out / 'tune' / method})")
            best[method] = {k.partition(".")[2]: v for k, v in trials[summary["best"][0]]["params"].items()}
            atomic_write_json(saved, best)
    return best
