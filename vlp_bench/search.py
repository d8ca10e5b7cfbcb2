"""`vlp-bench search`: an Optuna study over a method's config (by default SimVLG's merge schedule).

Each trial is an ordinary run (its own run directory, records and costs) of the method with the
sampled values. Two modes:
- "pareto": maximise the validation metric and minimise the training cost (FLOPs or wall-clock);
  the answer is the Pareto front.
- "budget": maximise the validation metric among configs whose counted training FLOPs per sample
  fit a budget; a config over it is pruned before it trains (the cost model counts it on the meta
  device), and the validation evaluations during training feed a pruner (median or Hyperband).
The test split is never used to choose: trials are scored on the final validation evaluation.

The study lives in an Optuna RDB storage: a SQLite file in the output directory by default, or
any URL (PostgreSQL for several workers). Re-running the command resumes the study until it holds
`trials` finished (complete or pruned) trials.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import warnings
from pathlib import Path

from vlp_bench import costmodel
from vlp_bench.config import PER_RUN_TRAIN, BenchConfig, SearchConfig, check_spec
from vlp_bench.errors import UserError
from vlp_bench.experiment import Experiment, StopRun, prepare
from vlp_bench.files import atomic_write_json, read_jsonl
from vlp_bench.log import say
from vlp_bench.registry import METHODS
from vlp_bench.typed import from_dict, to_dict

TRAIN = "train."  # a space entry with this prefix searches a training setting (train.lr), not the method's


def space_of(method_cls, overrides: dict, method_space: bool = True) -> dict:
    """The space searched: the method's own `search_space` (unless `method_space` is off) with
    [search.space]'s entries laid over it."""
    own = json.loads(json.dumps(method_cls.search_space or {})) if method_space else {}
    space = {**own, **overrides}
    if not space:
        raise UserError(f"method '{method_cls.name}' declares no search_space: give its parameters in "
                        f"[search.space] (a list = choices, {{low, high}} = a range)")
    for name, spec in space.items():
        try:
            check_spec(name, spec)
        except ValueError as e:
            raise UserError(f"{method_cls.name}.search_space: {e}") from None
    return space


def suggest(trial, space: dict) -> dict:
    """The trial's values for every parameter of the space."""
    params = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            params[name] = trial.suggest_categorical(name, spec)
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            params[name] = trial.suggest_int(name, spec["low"], spec["high"], log=spec.get("log", False))
        else:
            params[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=spec.get("log", False))
    return params


def _storage(url: str, cfg: SearchConfig):
    import optuna

    try:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=cfg.heartbeat_s, grace_period=2 * cfg.heartbeat_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.retries))
    except Exception as e:  # noqa: BLE001 - a bad URL or an unreachable server: one line
        raise UserError(f"search storage {url}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _pruner(name: str):
    import optuna

    return {"median": optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
            "hyperband": optuna.pruners.HyperbandPruner(), "none": optuna.pruners.NopPruner()}[name]


def run_search(bench: BenchConfig, out: Path) -> dict:
    """Run (or resume) the study; returns the summary written to OUT/search.json."""
    import optuna

    if not bench.search.method:
        raise UserError("search.method is not set: name the method whose settings are searched")
    cls = METHODS.get(bench.search.method)
    cfg: SearchConfig = dataclasses.replace(bench.search, space=space_of(cls, bench.search.space,
                                                                         bench.search.method_space))
    if not cfg.metric:
        raise UserError("search.metric is not set and none of experiment.tasks declares a headline metric")
    if cfg.metric.partition(".")[0] not in bench.experiment.tasks:
        raise UserError(f"search.metric {cfg.metric}: task '{cfg.metric.partition('.')[0]}' is not in "
                        f"experiment.tasks {bench.experiment.tasks}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to the output directory {out}: {e.strerror or e}") from None
    _check_space(cls, cfg)
    url = cfg.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study = _open_study(cfg, url)
    experiment = prepare(bench)  # the same preparation as `vlp-bench run`: data, backbones, tasks, batches
    for point in start_points(cls, bench, experiment.backbones, cfg.space):
        study.enqueue_trial(point, skip_if_exists=True)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    t0 = time.perf_counter()
    left = cfg.trials - len(study.get_trials(deepcopy=False, states=finished))
    if left > 0:
        say(f"study '{study.study_name}' in {url}: {cfg.trials - left} of {cfg.trials} trials done; running the rest")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        failures: list[int] = []

        def stop_on_failures(study, trial):  # a run that fails fails again: never loop on them for ever
            if trial.state == optuna.trial.TrialState.FAIL:
                failures.append(trial.number)
                if len(failures) >= max(3, cfg.trials):
                    say(f"{len(failures)} trials failed in this worker (see their run directories); stopping")
                    study.stop()

        study.optimize(_Objective(experiment, cls, cfg, out), catch=(RuntimeError,), callbacks=[
            optuna.study.MaxTrialsCallback(cfg.trials, states=finished), stop_on_failures])
    summary = summarize(study, cfg, url, time.perf_counter() - t0)
    atomic_write_json(out / "search.json", summary)
    return summary


def start_points(cls, bench: BenchConfig, backbones, space: dict) -> list[dict]:
    """The trials every study runs first: the method's known points (over its own parameters), each
    with the training settings of the space at their configured values; a space of training
    settings alone starts from those. A configured value the space does not hold is left for the
    sampler (a point must lie in the space)."""
    train = {k: getattr(bench.train, k[len(TRAIN):]) for k in space if k.startswith(TRAIN)}
    train = {k: v for k, v in train.items() if _holds(space[k], v)}
    own = {k: v for k, v in space.items() if not k.startswith(TRAIN)}
    points = cls.search_start_points(bench.methods[bench.search.method], backbones, own) if own else [{}]
    return [point for p in points if (point := {**p, **train})]


def _holds(spec, value) -> bool:
    return value in spec if isinstance(spec, list) else spec["low"] <= value <= spec["high"]


def _open_study(cfg: SearchConfig, url: str):
    """The study named by the config in `url`, created or resumed (its directions must match the mode)."""
    import optuna

    name = cfg.study or f"{cfg.method}-{cfg.mode}"
    directions = ["maximize", "minimize"] if cfg.mode == "pareto" else ["maximize"]
    storage = _storage(url, cfg)
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True,
                                    sampler=optuna.samplers.TPESampler(seed=cfg.seed + len(_trials(storage, name))),
                                    pruner=_pruner(cfg.pruner) if cfg.mode == "budget" else optuna.pruners.NopPruner())
    except ValueError as e:  # e.g. the stored study has other directions
        raise UserError(f"study '{name}' in {url}: {e}") from None
    if study.directions != [optuna.study.StudyDirection[d.upper()] for d in directions]:
        raise UserError(f"study '{name}' in {url} was made for another mode; name another --study")
    return study


def _check_space(cls, cfg: SearchConfig) -> None:
    """Every parameter of the space is a setting of the method, or one its search_values hook turns
    into settings (`Method.search_derived`): found before any preparation."""
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    derived = cls.search_derived
    train = {TRAIN + k for k in PER_RUN_TRAIN}
    unknown = {k for k in cfg.space if k not in fields and k not in derived and k not in train
               and not any(d.endswith("_") and k.startswith(d) for d in derived)}
    if unknown:
        raise UserError(f"search.space: {sorted(unknown)} are not settings of methods.{cfg.method} "
                        f"({', '.join(sorted(fields))}) nor training settings a run takes on its own "
                        f"({', '.join(TRAIN + k for k in PER_RUN_TRAIN)})")


class _Objective:
    """One trial: the sampled settings -> an ordinary run of the experiment -> (quality[, cost])."""

    def __init__(self, experiment: Experiment, cls, cfg: SearchConfig, out: Path):
        self.exp, self.cls, self.cfg, self.out = experiment, cls, cfg, out
        self.base = experiment.cfg.methods[cfg.method]
        self.seed = experiment.cfg.experiment.seeds[0]
        self.task, _, self.key = cfg.metric.partition(".")
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, trial):
        import optuna

        cfg = self.cfg
        trial.set_user_attr("worker", self.worker)
        sampled = suggest(trial, cfg.space)
        train = {k[len(TRAIN):]: v for k, v in sampled.items() if k.startswith(TRAIN)}
        values = self.cls.search_values({k: v for k, v in sampled.items() if not k.startswith(TRAIN)}, self.base,
                                        self.exp.backbones)
        mcfg = self.feasible(trial, values)
        run_dir = self.out / f"trial-{trial.number:04d}" / f"{cfg.method}-seed{self.seed}"
        trial.set_user_attr("run_dir", str(run_dir))
        say(f"trial {trial.number}: {values | {TRAIN + k: v for k, v in train.items()}}")

        def on_eval(step: int, metrics: dict) -> None:
            value = metrics.get(self.task, {}).get(self.key)
            if cfg.mode == "budget" and isinstance(value, (int, float)):
                trial.report(value, step)
                if trial.should_prune():
                    raise StopRun(f"pruned at step {step} ({cfg.metric} {value:.4g})")

        try:
            self.exp.run_one(cfg.method, self.seed, run_dir, method_cfg=mcfg, on_eval=on_eval, train=train)
        except StopRun as e:
            raise optuna.TrialPruned(str(e)) from None
        return self.values(trial, run_dir)

    def feasible(self, trial, values: dict):
        """The trial's method config, or a pruned trial: a schedule that removes more tokens than
        exist, or (budget mode) a per-sample cost over the budget, found before it trains."""
        import optuna

        cfg, name = self.cfg, self.cfg.method
        try:
            mcfg = from_dict(self.cls.Config, {**to_dict(self.base), **values}, f"methods.{name}")
            self.cls.check(mcfg, self.exp.backbones)
        except (UserError, ValueError) as e:
            trial.set_user_attr("infeasible", str(e))
            raise optuna.TrialPruned(str(e)) from None
        if cfg.mode == "budget" and cfg.budget_gflop_per_sample > 0:
            bench = dataclasses.replace(self.exp.cfg, methods={**self.exp.cfg.methods, name: mcfg})
            per_sample = costmodel.per_sample_costs(costmodel.tiny_scale(bench), [name])[name]["total"] / 1e9
            trial.set_user_attr("predicted_gflop_per_sample", per_sample)
            if per_sample > cfg.budget_gflop_per_sample:
                trial.set_user_attr("infeasible", f"{per_sample:.4g} GFLOP/sample over the budget")
                raise optuna.TrialPruned("over the FLOPs budget")
        return mcfg

    def values(self, trial, run_dir: Path):
        """The finished run's final validation value (and cost): what the study optimises."""
        rec = json.loads((run_dir / "results.json").read_text())
        if rec["status"] != "finished":
            raise RuntimeError(f"run {run_dir} {rec['status']}: {rec.get('error', '')}")
        c, task, key = rec["cost"], self.task, self.key
        val = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split") == "val" and "eval" in r]
        quality = val[-1]["eval"][task][key]
        for k, v in (("train_flops", c["train_flops"]), ("train_wall_s", c["train_wall_s"]),
                     ("tokens_to_llm", c["tokens_to_llm"]), ("test_" + self.cfg.metric, rec["metrics"][task][key])):
            trial.set_user_attr(k, v)
        if self.cfg.mode == "pareto":
            return quality, (c["train_flops"] if self.cfg.cost == "flops" else c["train_wall_s"])
        return quality


def _trials(storage, name: str) -> list:
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # no such study yet
        return []


def summarize(study, cfg: SearchConfig, url: str, wall_s: float) -> dict:
    """Every trial (state, params, values, user attributes), the Pareto front (or the best trial)
    and parameter importances."""
    import optuna

    trials = [{"number": t.number, "state": t.state.name, "params": t.params, "values": t.values,
               "user_attrs": t.user_attrs, "duration_s": t.duration.total_seconds() if t.duration else None}
              for t in study.get_trials(deepcopy=False)]
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    best = [t.number for t in study.best_trials] if complete else []
    importances = {}
    if len(complete) >= 2 and len({json.dumps(t.params, sort_keys=True) for t in complete}) >= 2:
        try:
            with warnings.catch_warnings():  # Optuna's default (PED-ANOVA) explains *low* targets: negate
                warnings.simplefilter("ignore")
                importances = {k: float(v) for k, v in optuna.importance.get_param_importances(
                    study, target=lambda t: -t.values[0]).items()}
        except (RuntimeError, ValueError):  # e.g. a parameter that never varied
            importances = {}
    return {"study": study.study_name, "storage": url, "mode": cfg.mode, "metric": cfg.metric,
            "cost": cfg.cost if cfg.mode == "pareto" else None, "directions": [d.name for d in study.directions],
            "config": dataclasses.asdict(cfg), "wall_s_this_worker": wall_s, "trials": trials,
            "best": best, "importances": importances}
