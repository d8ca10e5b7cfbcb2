"""The experiment's configuration: every section of bench.toml as a typed dataclass, read,
resolved and validated here once, then saved with every run.

A section that configures one component keeps its dataclass beside that component (`TrainConfig`
in vlp_bench/train/trainer.py, `DataConfig` in vlp_bench/data/images.py, ...); this module gathers
them into `BenchConfig`, defines the experiment-level sections, and resolves the plug-ins'
[methods.NAME] and [tasks.NAME] tables into each one's own Config. It names no method and no task:
the default comparison is the application's (vlp_bench/experiment.py `DEFAULTS`, and bench.toml).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vlp_bench.backbones import BertBackboneConfig, LLMConfig, VisionConfig
from vlp_bench.data.images import DataConfig
from vlp_bench.data.world import WorldConfig
from vlp_bench.errors import UserError, suggest
from vlp_bench.metrics.targets import VAL_LOSS, split_metric
from vlp_bench.nn.generation import CAPTION_PROMPT
from vlp_bench.registry import METHODS, TASKS
from vlp_bench.trackers import TrackersConfig
from vlp_bench.train.state import TrainConfig
from vlp_bench.typed import apply_overrides, from_dict, load_toml, to_dict


@dataclass
class ExperimentConfig:
    methods: list[str] = field(default_factory=list)  # one run per (method, seed); names: `vlp-bench list`
    seeds: list[int] = field(default_factory=lambda: [0])  # one run per (method, seed)
    tasks: list[str] = field(default_factory=list)  # evaluated after training (and during, on val)
    out: str = ""  # "" = runs/<date-time>
    cache: str = ""  # "" = $VLP_BENCH_CACHE, else ~/.cache/vlp-bench (world and tiny backbones)
    device: str = "auto"  # auto = cuda when available, else cpu
    threads: int = 0  # torch CPU threads; 0 = torch's default (all cores)
    prompt: str = CAPTION_PROMPT  # text between the soft prompt and the caption during training (= caption prompt)
    # {method: {train key: value}} laid over [train] for that method's runs: each method's tuned values
    # (`vlp-bench claims` with claims.tune); {} = every method trains with [train] as it is
    train_by_method: dict = field(default_factory=dict)


@dataclass
class TargetConfig:
    """Time- and FLOPs-to-target (vlp_bench/metrics/targets.py), read from the validation learning curves."""

    # task.key of the curve; "" = the first task's headline metric (`Task.primary`): caption.CIDEr
    # (what the papers report) by default, video_caption.CIDEr for a video experiment
    metric: str = ""
    # 0 = each seed's target cross-fitted: 0.8 of the way from the floor to the best (monotone-fitted)
    # validation value of the *other* reference seeds, so no run sets the number it is judged by
    value: float = 0.0
    # the method speed-ups (and the cost model's ratios) are measured against; "" = the application's
    # reference (the no-merge baseline when it ran, else the first method)
    reference: str = ""

    def validate(self) -> None:
        if self.metric:
            split_metric(self.metric)
        if self.value < 0:
            raise ValueError(f"value must be >= 0 (0 = the reference's final value), got {self.value}")


@dataclass
class RecipeConfig:
    """Where a config file's settings come from (recipes/*.toml): saved with every run's results."""

    source: str = ""  # the paper (and its section or table) the settings follow; "" = not a recipe
    differences: list[str] = field(default_factory=list)  # what this harness runs differently, each with why


@dataclass
class SearchConfig:
    """`vlp-bench search` (vlp_bench/search.py): an Optuna study over one method's settings."""

    method: str = ""  # the method whose [methods.NAME] values the search varies ("" = the application's default)
    trials: int = 20  # finished (complete or pruned) trials the study should hold; re-running tops it up
    mode: Literal["pareto", "budget"] = "pareto"  # pareto: quality vs cost; budget: quality under a FLOPs budget
    metric: str = ""  # maximised: the final validation value (the test split never chooses); "" = target.metric
    cost: Literal["flops", "wall_s"] = "flops"  # minimised in pareto mode: training FLOPs (exact) or wall-clock (noisy)
    budget_gflop_per_sample: float = 0.0  # budget mode: configs above it are pruned before training (0 = no budget)
    pruner: Literal["median", "hyperband", "none"] = "median"  # budget mode: stops trials at validation evaluations
    storage: str = ""  # "" = sqlite:///OUT/study.db; any Optuna RDB URL (postgresql://...) for several workers
    study: str = ""  # "" = "<method>-<mode>"
    seed: int = 0  # the sampler's seed (each worker adds its trial count, so workers do not repeat each other)
    heartbeat_s: int = 30  # a trial whose worker stops beating for 2 x this is marked failed and retried
    retries: int = 2  # retries of a failed trial (a killed worker, a crash)
    # laid over the method's own space (its `search_space`): an entry here replaces or adds that
    # parameter; a one-item list fixes one. {} = the method's space as it declares it. Entries named
    # train.KEY search that training setting for the method (e.g. train.lr)
    space: dict = field(default_factory=dict)
    method_space: bool = True  # search the method's own search_space too; false: [search.space] alone

    def validate(self) -> None:
        if self.metric:
            split_metric(self.metric)
        if self.metric == VAL_LOSS:
            raise ValueError(f"search.metric is maximised: {VAL_LOSS} (a loss) cannot be it; name a task metric")
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        for name, spec in self.space.items():
            check_spec(name, spec)


# the training settings one run of an experiment can take on its own (experiment.train_by_method, a
# search's train.* keys): the optimiser's. The others (batch size, steps, evaluations) shape what the
# experiment's runs share (their batches, phases, validation) and stay the experiment's
PER_RUN_TRAIN = ("lr", "warmup_steps", "weight_decay", "min_lr_ratio", "grad_clip")


@dataclass
class ClaimsConfig:
    """`vlp-bench claims` (vlp_bench/claims.py, reports/claims.py): the papers' claims, each run on
    several tiny worlds and judged by one rule (docs/claims.md)."""

    # tiny worlds: world k shifts the world's and the three backbones' seeds by k (new images, captions,
    # questions and pre-trained backbones); a verdict that differs between worlds is "fragile"
    worlds: int = 2
    # worlds run side by side, one process each with its share of the threads: models this small use
    # one thread better than two (1.3-1.5x faster with two), so two processes do more; 0 = one per
    # world, at most one per CPU core; 1 = one after another in this process
    jobs: int = 0
    only: list[str] = field(default_factory=list)  # the claims to measure (their ids); [] = all
    # equal tuning: every compared method gets this many trials of the same search over `tune_space`
    # on world 0 (seed tune_seed, validation curve) before its seeds run with its best values; 0 = defaults
    tune: int = 0
    tune_space: dict = field(default_factory=lambda: {"train.lr": {"low": 2e-4, "high": 5e-3, "log": True},
                                                      "train.warmup_steps": {"low": 0, "high": 90}})
    tune_seed: int = 1000  # no seed that is then judged helps choose the settings
    data_fractions: list[float] = field(default_factory=lambda: [0.1, 0.3])  # SimVLG's data sweep; the paper's 1/10 first
    # a quality claim of "no noticeable drop" / "near" holds when the paired quality ratio's interval
    # stays above 1 - margin: 5% relative, wider than the papers' own gaps (ToMe: 0.2-0.4 points of
    # accuracy) because three tiny-world seeds cannot resolve less (docs/claims.md)
    margin: float = 0.05
    # a claimed "about k x" holds down to about x k (ToMe's "2x" is 1.8x-2.2x across its models)
    about: float = 0.8

    def validate(self) -> None:
        if self.worlds < 1 or self.tune < 0 or self.jobs < 0:
            raise ValueError(f"worlds must be >= 1, tune and jobs >= 0, got {self.worlds}, {self.tune}, {self.jobs}")
        if not all(0 < f < 1 for f in self.data_fractions):
            raise ValueError(f"data_fractions must lie in (0, 1), got {self.data_fractions}")
        if not 0 < self.margin < 1 or not 0 < self.about <= 1:
            raise ValueError(f"margin must be in (0, 1) and about in (0, 1], got {self.margin}, {self.about}")
        for name, spec in self.tune_space.items():
            if name.partition(".")[0] != "train" or name.partition(".")[2] not in PER_RUN_TRAIN:
                raise ValueError(f"tune_space.{name}: equal tuning searches the training settings a run takes "
                                 f"on its own: {', '.join('train.' + k for k in PER_RUN_TRAIN)}")
            check_spec(name, spec)


def check_spec(name: str, spec) -> None:
    """One parameter of a search space: a list of choices or {low, high[, log]}."""
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


@dataclass
class BenchConfig:
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    bert: BertBackboneConfig = field(default_factory=BertBackboneConfig)  # where the bridges start
    train: TrainConfig = field(default_factory=TrainConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)  # `vlp-bench search`
    claims: ClaimsConfig = field(default_factory=ClaimsConfig)  # `vlp-bench claims`
    trackers: TrackersConfig = field(default_factory=TrackersConfig)  # TensorBoard, W&B (off by default)
    methods: dict = field(default_factory=dict)  # [methods.NAME] tables, resolved into each method's Config
    tasks: dict = field(default_factory=dict)  # [tasks.NAME] tables, resolved into each task's Config


def load_config(path: Path | None = None, overrides: list[str] = (), defaults: dict | None = None) -> BenchConfig:
    """`defaults` (the application's), then the TOML file (or nothing), then --set overrides ->
    a validated BenchConfig."""
    data = _laid_over(json.loads(json.dumps(defaults or {})), load_toml(path) if path is not None else {})
    return load_config_dict(apply_overrides(data, list(overrides)))


def _laid_over(base: dict, top: dict) -> dict:
    """`top`'s values over `base`'s, table by table."""
    for key, value in top.items():
        base[key] = _laid_over(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return base


def load_config_dict(data: dict) -> BenchConfig:
    """A plain dict (a TOML file's, or a saved experiment.json) -> a validated BenchConfig."""
    cfg = from_dict(BenchConfig, data)
    exp = cfg.experiment
    if not exp.methods or not exp.seeds:
        raise UserError("experiment.methods and experiment.seeds must not be empty")
    if len(set(exp.methods)) != len(exp.methods):
        raise UserError(f"experiment.methods lists a method twice: {exp.methods}")
    for name in exp.methods:
        METHODS.get(name)  # unknown names (and impossible compositions) fail here, before any work
    for name in exp.tasks:
        TASKS.get(name)
    searched = [cfg.search.method] if cfg.search.method else []
    for name in searched:
        METHODS.get(name)
    cfg.methods = _resolve_plugins(cfg.methods, METHODS, "methods", [*exp.methods, *searched])
    cfg.tasks = _resolve_plugins(cfg.tasks, TASKS, "tasks")
    _check_data_kinds(cfg)
    headline = next((f"{n}.{TASKS.get(n).primary}" for n in exp.tasks if TASKS.get(n).primary), "")
    if not cfg.target.metric:  # stays "" when no task has one (an experiment that only trains)
        cfg.target.metric = headline
    if not cfg.search.metric:  # the search maximises: never the loss
        cfg.search.metric = headline if cfg.target.metric == VAL_LOSS else cfg.target.metric
    for name, values in exp.train_by_method.items():
        if name not in exp.methods or not isinstance(values, dict) or set(values) - set(PER_RUN_TRAIN):
            raise UserError(f"experiment.train_by_method.{name}: not one of experiment.methods {exp.methods} with "
                            f"a table of the training settings a run takes on its own ({', '.join(PER_RUN_TRAIN)})")
        from_dict(TrainConfig, {**to_dict(cfg.train), **values}, f"experiment.train_by_method.{name}")
    if cfg.target.reference and cfg.target.reference not in exp.methods:
        raise UserError(f"target.reference '{cfg.target.reference}' is not one of experiment.methods {exp.methods}")
    return cfg


def _resolve_plugins(tables: dict, registry, section: str, wanted: list[str] = ()) -> dict:
    """Validate every [section.NAME] table against the registered plug-in's Config; every plug-in
    (and every composition named in `wanted`) gets its config, so configs saved with results are
    complete. A composition "bridge+side" starts from its parts as configured here (and the pair's
    own defaults, registered with it: `Method.configured_from`)."""
    for name in tables:
        if "+" not in name and name not in registry:
            raise UserError(f"[{section}.{name}]: unknown {registry.kind} '{name}'{suggest(name, registry.names())}")
    resolved: dict = {}
    names = dict.fromkeys([*registry.names(), *tables, *wanted])
    for name in sorted(names, key=lambda n: "+" in n):  # the parts before their compositions
        cls = registry.get(name)
        base = cls.configured_from(resolved) if hasattr(cls, "configured_from") else {}  # tasks: {}
        resolved[name] = from_dict(cls.Config, {**base, **tables.get(name, {})}, f"{section}.{name}")
    return resolved


def on_clips(cfg: BenchConfig) -> bool:
    """Whether the experiment's tasks (and so its training data) are clips rather than images."""
    return any(TASKS.get(name).data == "clips" for name in cfg.experiment.tasks)


def _check_data_kinds(cfg: BenchConfig) -> None:
    """One kind of training data per experiment; and what a video experiment cannot do, found when
    the config is read: train on (image) shards, or run a method that does not take clips or
    learns fewer frame positions than data.frames."""
    kinds = {name: TASKS.get(name).data for name in cfg.experiment.tasks}
    if len(set(kinds.values())) > 1:
        raise UserError(f"experiment.tasks mixes tasks on images and on clips ({', '.join(f'{n}: {k}' for n, k in kinds.items())}): "
                        f"a run trains on one kind of data; run them as two experiments")
    if not on_clips(cfg):
        return
    if cfg.data.shards:
        raise UserError("data.shards hold images; a video experiment trains on the clips of msrvtt/ (unset data.shards)")
    for name in cfg.experiment.methods:
        if not METHODS.get(name).video:
            raise UserError(f"method '{name}' does not take video clips (its encoder's tokens differ from frame "
                            f"to frame), and experiment.tasks {cfg.experiment.tasks} evaluate on clips")
        max_frames = getattr(cfg.methods[name], "max_frames", None)
        if max_frames is not None and max_frames < cfg.data.frames:
            raise UserError(f"methods.{name}.max_frames = {max_frames} is less than data.frames = {cfg.data.frames}")


def resume_config(out: Path) -> BenchConfig:
    """The config an experiment directory was started with (OUT/experiment.json, complete)."""
    path = Path(out) / "experiment.json"
    if not path.is_file():
        raise UserError(f"nothing to resume in {out}: no experiment.json (was it made by `vlp-bench run`?)")
    try:
        return load_config_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON: {e}") from None


def cache_dir(cfg: BenchConfig) -> Path:
    """Where the tiny world and the tiny backbones are kept between runs."""
    if cfg.experiment.cache:
        return Path(cfg.experiment.cache).expanduser()
    if os.environ.get("VLP_BENCH_CACHE"):
        return Path(os.environ["VLP_BENCH_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "vlp-bench"
