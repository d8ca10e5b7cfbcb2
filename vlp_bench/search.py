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
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vlp_bench.errors import UserError
from vlp_bench.metrics.targets import split_metric

@dataclass
class SearchConfig:
    method: str = "simvlg"  # the method whose [methods.NAME] values the search varies
    trials: int = 20  # finished (complete or pruned) trials the study should hold; re-running tops it up
    mode: Literal["pareto", "budget"] = "pareto"  # pareto: quality vs cost; budget: quality under a FLOPs budget
    metric: str = "caption.CIDEr"  # maximised: the final validation value (the test split never chooses)
    cost: Literal["flops", "wall_s"] = "flops"  # minimised in pareto mode: training FLOPs (exact) or wall-clock (noisy)
    budget_gflop_per_sample: float = 0.0  # budget mode: configs above it are pruned before training (0 = no budget)
    pruner: Literal["median", "hyperband", "none"] = "median"  # budget mode: stops trials at validation evaluations
    storage: str = ""  # "" = sqlite:///OUT/study.db; any Optuna RDB URL (postgresql://...) for several workers
    study: str = ""  # "" = "<method>-<mode>"
    seed: int = 0  # the sampler's seed (each worker adds its trial count, so workers do not repeat each other)
    heartbeat_s: int = 30  # a trial whose worker stops beating for 2 x this is marked failed and retried
    retries: int = 2  # retries of a failed trial (a killed worker, a crash)
    # laid over the method's own space (its `search_space`): an entry here replaces or adds that
    # parameter; a one-item list fixes one. {} = the method's space as it declares it.
    space: dict = field(default_factory=dict)

    def validate(self) -> None:
        split_metric(self.metric)
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        for name, spec in self.space.items():
            _check_spec(name, spec)


def _check_spec(name: str, spec) -> None:
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"space.{name}: an empty list of choices")
        return
    if not isinstance(spec, dict) or set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
        raise ValueError(f"space.{name}: a list of choices or {{low, high[, log]}}, got {spec!r}")
    if not all(isinstance(spec[k], (int, float)) and not isinstance(spec[k], bool) for k in ("low", "high")):
        raise ValueError(f"space.{name}: low and high must be numbers, got {spec!r}")
    if spec["low"] > spec["high"]:
        raise ValueError(f"space.{name}: low {spec['low']} > high {spec['high']}")


def space_of(method_cls, overrides: dict) -> dict:
    """The space searched: the method's own `search_space` with [search.space]'s entries laid over it."""
    space = {**json.loads(json.dumps(method_cls.search_space or {})), **overrides}
    if not space:
        raise UserError(f"method '{method_cls.name}' declares no search_space: give its parameters in "
                        f"[search.space] (a list = choices, {{low, high}} = a range)")
    for name, spec in space.items():
        try:
            _check_spec(name, spec)
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


def schedule_for_tokens(n_tokens: int, depth: int, tokens: int, protected: int = 1) -> list[int]:
    """Per-layer r that takes n_tokens to `tokens` (or as close as ToMe's per-layer clamp allows),
    merging as evenly as possible across the layers."""
    def fewest(t: int, layers: int) -> int:  # the fewest tokens `layers` more layers can leave
        for _ in range(layers):
            t -= (t - protected) // 2
        return t

    schedule, t = [], n_tokens
    for i in range(depth):
        cap = (t - protected) // 2
        r = min(max(math.ceil((t - tokens) / (depth - i)), 0), cap)
        while r < cap and fewest(t - r, depth - i - 1) > tokens:  # merge more now if later layers cannot
            r += 1
        schedule.append(r)
        t -= r
    return schedule


def method_values(params: dict, n_tokens: int = 2, depth: int = 1) -> dict:
    """Sampled parameters -> [methods.NAME] values, reading the schedule grammar's three forms:
    - "r" with "inflection": the ramp [r, inflection] (inflection 0: the same r in every layer);
    - "r_layer_0", "r_layer_1", ...: a per-layer list (one per bridge layer);
    - "tokens": the final token count, reached by merging evenly across the layers
      (n_tokens: tokens into the bridge; depth: its layers)."""
    values = dict(params)
    inflection = values.pop("inflection", None)
    if inflection is not None and "r" in values and round(inflection, 6) != 0:
        values["r"] = [values["r"], float(inflection)]
    layers = sorted((k for k in values if k.startswith("r_layer_")), key=lambda k: int(k.rpartition("_")[2]))
    if layers:
        if len(layers) != depth:
            raise UserError(f"search.space: {len(layers)} r_layer_* parameters for a bridge of {depth} layers")
        values["r"] = [int(values.pop(k)) for k in layers]
    if "tokens" in values:
        values["r"] = schedule_for_tokens(n_tokens, depth, int(values.pop("tokens")))
    return values


def known_points(method_cls, cfg, backbones, space: dict) -> list[dict]:
    """Trials every study starts from: no merging, and the paper's schedule scaled to this encoder:
    SimVLG keeps 29 of ViT-g's 257 tokens (r = 19 in 12 layers); here, with "r", the constant r
    within the space's range whose final count (ToMe clamps each layer to half) comes closest to
    that share, or with "tokens", that share itself."""
    from vlp_bench.nn.merging import token_counts

    n = method_cls.input_tokens(cfg, backbones.vision)
    goal = n * 29 / 257
    form = next((k for k in ("r", "tokens") if isinstance(space.get(k), dict)), None)
    if form is None:
        return []
    lo, hi = space[form]["low"], space[form]["high"]
    if form == "r":
        ends = (lo, min(range(lo, hi + 1), key=lambda r: abs(token_counts(n, [r] * cfg.depth)[-1] - goal)))
    else:
        ends = (min(max(n, lo), hi), min(max(round(goal), lo), hi))
    fixed = {"inflection": 0.0, "curriculum_start": 1.0, "curriculum_ramp": 0.0, "variant": "tome"}
    points = []
    for value in dict.fromkeys(ends):
        p = {k: value if k == form else fixed.get(k, v[0] if isinstance(v, list) else None) for k, v in space.items()}
        if all(v is not None for v in p.values()):  # a parameter with no known value: no known point
            points.append(p)
    return points


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


def run_search(bench, out: Path, progress: bool = True) -> dict:
    """Run (or resume) the study; returns the summary written to OUT/search.json."""
    import optuna

    from vlp_bench import costmodel
    from vlp_bench.config import from_dict, to_dict
    from vlp_bench.data.images import ImageLoader
    from vlp_bench.experiment import StopRun, _one_run, prepare, say, training_data
    from vlp_bench.registry import METHODS, TASKS
    from vlp_bench.results import atomic_write_json, env_info

    cls = METHODS.get(bench.search.method)
    cfg: SearchConfig = dataclasses.replace(bench.search, space=space_of(cls, bench.search.space))
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = {k for k in cfg.space if k not in ("inflection", "tokens") and not k.startswith("r_layer_")} - fields
    if unknown:
        raise UserError(f"search.space: {sorted(unknown)} are not settings of methods.{cfg.method} "
                        f"({', '.join(sorted(fields))})")
    if cfg.metric.partition(".")[0] not in bench.experiment.tasks:
        raise UserError(f"search.metric {cfg.metric}: task '{cfg.metric.partition('.')[0]}' is not in "
                        f"experiment.tasks {bench.experiment.tasks}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to the output directory {out}: {e.strerror or e}") from None
    url = cfg.storage or f"sqlite:///{(out / 'study.db').resolve()}"
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

    root, backbones, device = prepare(bench, progress)
    base_cfg = bench.methods[cfg.method]
    for point in known_points(cls, base_cfg, backbones, cfg.space):
        study.enqueue_trial(point, skip_if_exists=True)
    images = ImageLoader(backbones.vision.image_size, backbones.vision.mean, backbones.vision.std)
    tasks = {n: TASKS.get(n)(bench.tasks[n], root, images) for n in bench.experiment.tasks}
    data, env = training_data(bench, root, images, device), env_info(device)
    seed = bench.experiment.seeds[0]
    task, _, key = cfg.metric.partition(".")

    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial):
        trial.set_user_attr("worker", worker)
        params = suggest(trial, cfg.space)
        values = method_values(params, cls.input_tokens(base_cfg, backbones.vision), getattr(base_cfg, "depth", 1))
        try:
            mcfg = from_dict(cls.Config, {**to_dict(base_cfg), **values}, f"methods.{cfg.method}")
            cls.check(mcfg, backbones)
        except (UserError, ValueError) as e:  # a schedule that removes more tokens than exist: infeasible
            trial.set_user_attr("infeasible", str(e))
            raise optuna.TrialPruned(str(e)) from None
        if cfg.mode == "budget" and cfg.budget_gflop_per_sample > 0:
            per_sample = costmodel.per_sample_costs(
                costmodel.tiny_scale(dataclasses.replace(bench, methods={**bench.methods, cfg.method: mcfg})),
                [cfg.method])[cfg.method]["total"] / 1e9
            trial.set_user_attr("predicted_gflop_per_sample", per_sample)
            if per_sample > cfg.budget_gflop_per_sample:
                trial.set_user_attr("infeasible", f"{per_sample:.4g} GFLOP/sample over the budget")
                raise optuna.TrialPruned("over the FLOPs budget")
        run_dir = out / f"trial-{trial.number:04d}" / f"{cfg.method}-seed{seed}"
        trial.set_user_attr("run_dir", str(run_dir))
        say(f"trial {trial.number}: {values}")
        run_cfg = dataclasses.replace(bench, methods={**bench.methods, cfg.method: mcfg})

        def on_eval(step: int, metrics: dict) -> None:
            value = metrics.get(task, {}).get(key)
            if cfg.mode == "budget" and isinstance(value, (int, float)):
                trial.report(value, step)
                if trial.should_prune():
                    raise StopRun(f"pruned at step {step} ({cfg.metric} {value:.4g})")

        try:
            _one_run(run_cfg, cfg.method, seed, run_dir, backbones, tasks, data, device, env, progress,
                     on_eval=on_eval)
        except StopRun as e:
            raise optuna.TrialPruned(str(e)) from None
        rec = json.loads((run_dir / "results.json").read_text())
        if rec["status"] != "finished":
            raise RuntimeError(f"run {run_dir} {rec['status']}: {rec.get('error', '')}")
        c = rec["cost"]
        val = [r for r in _rows(run_dir) if r.get("split") == "val" and "eval" in r]
        quality = val[-1]["eval"][task][key]
        for k, v in (("train_flops", c["train_flops"]), ("train_wall_s", c["train_wall_s"]),
                     ("tokens_to_llm", c["tokens_to_llm"]), ("test_" + cfg.metric, rec["metrics"][task][key])):
            trial.set_user_attr(k, v)
        if cfg.mode == "pareto":
            return quality, (c["train_flops"] if cfg.cost == "flops" else c["train_wall_s"])
        return quality

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    t0 = time.perf_counter()
    left = cfg.trials - len(study.get_trials(deepcopy=False, states=finished))
    if left > 0:
        say(f"study '{name}' in {url}: {cfg.trials - left} of {cfg.trials} trials done; running the rest")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        def stop_on_failures(study, trial):  # a run that fails fails again: never loop on them for ever
            if trial.state == optuna.trial.TrialState.FAIL:
                failures.append(trial.number)
                if len(failures) >= max(3, cfg.trials):
                    say(f"{len(failures)} trials failed in this worker (see their run directories); stopping")
                    study.stop()

        failures: list[int] = []
        study.optimize(objective, catch=(RuntimeError,), callbacks=[
            optuna.study.MaxTrialsCallback(cfg.trials, states=finished), stop_on_failures])
    summary = summarize(study, cfg, url, time.perf_counter() - t0)
    atomic_write_json(out / "search.json", summary)
    return summary


def _rows(run_dir: Path) -> list[dict]:
    from vlp_bench.results import read_jsonl

    return read_jsonl(run_dir / "metrics.jsonl")


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
