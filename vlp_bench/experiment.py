"""An experiment: resolve the config, prepare the data and backbones once, then train and evaluate
every (method, seed) run and write its records. `vlp-bench run` is a thin wrapper around `run()`."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlp_bench.train import dist
from vlp_bench.backbones.encoders import LLMConfig, VisionConfig, load_backbones
from vlp_bench.config import apply_overrides, from_dict, load_toml, suggest, to_dict
from vlp_bench.data.images import CaptionSplit, DataConfig, ImageLoader, TrainBatches, check_global_batch
from vlp_bench.errors import UserError
from vlp_bench.metrics.targets import split_metric
from vlp_bench.registry import METHODS, TASKS
from vlp_bench.results import SCHEMA_VERSION, MetricsLog, atomic_write_json, env_info, write_jsonl
from vlp_bench.search import SearchConfig
from vlp_bench.trackers import Trackers, TrackersConfig
from vlp_bench.train.compile import eager
from vlp_bench.train.trainer import NonFiniteLoss, TrainConfig, decoder_finetune, train
from vlp_bench.data.world.stills import WorldConfig, build_world


@dataclass
class ExperimentConfig:
    # the seeds' central comparison (SimVLG and BLIP-2 against the no-merge baseline); `vlp-bench list`
    methods: list[str] = field(default_factory=lambda: ["baseline", "simvlg", "blip2"])
    seeds: list[int] = field(default_factory=lambda: [0])  # one run per (method, seed)
    tasks: list[str] = field(default_factory=lambda: ["caption", "vqa"])  # evaluated after training (and during, on val)
    out: str = ""  # "" = runs/<date-time>
    cache: str = ""  # "" = $VLP_BENCH_CACHE, else ~/.cache/vlp-bench (world and tiny backbones)
    device: str = "auto"  # auto = cuda when available, else cpu
    threads: int = 0  # torch CPU threads; 0 = torch's default (all cores)
    prompt: str = "a photo of"  # text between the soft prompt and the caption during training (= caption prompt)


@dataclass
class TargetConfig:
    """Time- and FLOPs-to-target (vlp_bench/metrics/targets.py), read from the validation learning curves."""

    # task.key of the curve; "" = the first task's headline metric: caption.CIDEr (what the papers
    # report) by default, video_caption.CIDEr for a video experiment
    metric: str = ""
    value: float = 0.0  # 0 = the reference method's final validation value (mean over its seeds)
    reference: str = ""  # the method speed-ups are measured against; "" = baseline when it ran, else the first

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
class BenchConfig:
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)  # `vlp-bench search`
    trackers: TrackersConfig = field(default_factory=TrackersConfig)  # TensorBoard, W&B (off by default)
    methods: dict = field(default_factory=dict)  # [methods.NAME] tables, resolved into each method's Config
    tasks: dict = field(default_factory=dict)  # [tasks.NAME] tables, resolved into each task's Config


def _resolve_plugins(tables: dict, registry, section: str, wanted: list[str] = ()) -> dict:
    """Validate every [section.NAME] table against the registered plug-in's Config; every plug-in
    (and every composition named in `wanted`) gets its config, so configs saved with results are
    complete. A composition "bridge+side" starts from its parts as configured here (and the pair's
    own defaults, methods/__init__.py)."""
    for name in tables:
        if "+" not in name and name not in registry:
            raise UserError(f"[{section}.{name}]: unknown {registry.kind} '{name}'{suggest(name, registry.names())}")
    resolved: dict = {}
    names = dict.fromkeys([*registry.names(), *tables, *wanted])
    for name in sorted(names, key=lambda n: "+" in n):  # the parts before their compositions
        cls = registry.get(name)
        base = {}
        if getattr(cls, "parts", None):
            bridge, side = cls.parts
            own = {f.name for f in dataclasses.fields(registry.get(side).Options)}
            base = {**{k: v for k, v in to_dict(resolved[side]).items() if k in own}, **to_dict(resolved[bridge]),
                    **cls.config_defaults}
        resolved[name] = from_dict(cls.Config, {**base, **tables.get(name, {})}, f"{section}.{name}")
    return resolved


def load_config(path: Path | None = None, overrides: list[str] = ()) -> BenchConfig:
    """bench.toml (or nothing: the defaults) + --set overrides -> a validated BenchConfig."""
    data = load_toml(path) if path is not None else {}
    return load_config_dict(apply_overrides(data, list(overrides)))


def load_config_dict(data: dict) -> BenchConfig:
    cfg = from_dict(BenchConfig, data)
    for name in cfg.experiment.methods:
        METHODS.get(name)  # unknown names (and impossible compositions) fail here, before any work
    for name in cfg.experiment.tasks:
        TASKS.get(name)
    METHODS.get(cfg.search.method)
    cfg.methods = _resolve_plugins(cfg.methods, METHODS, "methods", [*cfg.experiment.methods, cfg.search.method])
    cfg.tasks = _resolve_plugins(cfg.tasks, TASKS, "tasks")
    kinds = {name: TASKS.get(name).data for name in cfg.experiment.tasks}
    if len(set(kinds.values())) > 1:
        raise UserError(f"experiment.tasks mixes tasks on images and on clips ({', '.join(f'{n}: {k}' for n, k in kinds.items())}): "
                        f"a run trains on one kind of data; run them as two experiments")
    if "clips" in kinds.values():
        _check_video(cfg)
    if not cfg.target.metric:
        headline = [f"{n}.{TASKS.get(n).primary}" for n in cfg.experiment.tasks if TASKS.get(n).primary]
        cfg.target.metric = headline[0] if headline else "caption.CIDEr"
    if not cfg.experiment.methods or not cfg.experiment.seeds:
        raise UserError("experiment.methods and experiment.seeds must not be empty")
    if len(set(cfg.experiment.methods)) != len(cfg.experiment.methods):
        raise UserError(f"experiment.methods lists a method twice: {cfg.experiment.methods}")
    if cfg.target.reference and cfg.target.reference not in cfg.experiment.methods:
        raise UserError(f"target.reference '{cfg.target.reference}' is not one of experiment.methods "
                        f"{cfg.experiment.methods}")
    return cfg


def cache_dir(cfg: BenchConfig) -> Path:
    if cfg.experiment.cache:
        return Path(cfg.experiment.cache).expanduser()
    if os.environ.get("VLP_BENCH_CACHE"):
        return Path(os.environ["VLP_BENCH_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "vlp-bench"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available")
    return dev


def say(msg: str) -> None:
    """Progress lines for long work; stderr, so stdout stays machine-readable. Rank zero's only."""
    if dist.group().is_main:
        print(f"[vlp-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def data_root(cfg: BenchConfig, progress: bool = True) -> Path:
    """data.root, or the tiny world (built into the cache on first use)."""
    if cfg.data.root:
        root = Path(cfg.data.root).expanduser()
        if not root.is_dir():
            raise UserError(f"data.root is not a directory: {root}")
        return root
    say(f"tiny world in {cache_dir(cfg)} (built once, then cached)")
    return build_world(cfg.world, cache_dir(cfg), progress=progress)


def prepare(cfg: BenchConfig, progress: bool = True):
    """Build (or find in the cache) the data and the frozen backbones. Under torchrun this joins
    the job (vlp_bench.train.dist) and rank zero builds the caches before the other ranks read them."""
    group, device = dist.init(resolve_device(cfg.experiment.device))
    cfg.trackers.check()  # a tracker switched on without its package fails before any work
    if cfg.experiment.threads:
        torch.set_num_threads(cfg.experiment.threads)
    cache = cache_dir(cfg)
    with dist.main_first(group):
        root = data_root(cfg, progress and group.is_main)
    for name in cfg.experiment.tasks:  # missing task files fail before any long work
        TASKS.get(name).check(cfg.tasks[name], root)
    say("frozen backbones (tiny ones are pre-trained once, then cached)")
    with dist.main_first(group):
        backbones = load_backbones(cfg.vision, cfg.llm, root, cache, device, progress and group.is_main)
    return root, backbones, device


FINAL = ("finished", "failed", "pruned")  # a run in one of these states is done; "running"/"interrupted" can resume


def run_status(run_dir: Path) -> str | None:
    """The status in a run directory's results.json, or None when it has none."""
    path = run_dir / "results.json"
    if not path.is_file():
        return "interrupted" if (run_dir / "config.json").is_file() else None
    try:
        return json.loads(path.read_text()).get("status")
    except (json.JSONDecodeError, OSError):
        return "interrupted"


def resume_config(out: Path) -> BenchConfig:
    """The config an experiment directory was started with (OUT/experiment.json)."""
    path = Path(out) / "experiment.json"
    if not path.is_file():
        raise UserError(f"nothing to resume in {out}: no experiment.json (was it made by `vlp-bench run`?)")
    try:
        return load_config_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON: {e}") from None


def run(cfg: BenchConfig, progress: bool = True, resume: bool = False) -> list[Path]:
    """Train and evaluate every (method, seed); returns the run directories. With `resume`, runs
    that finished or failed are kept, the others continue from their last checkpoint."""
    exp = cfg.experiment
    out = Path(exp.out) if exp.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    exp = dataclasses.replace(exp, out=str(out))  # the saved config names the directory actually used
    cfg = dataclasses.replace(cfg, experiment=exp)
    planned = [(m, seed, out / f"{m}-seed{seed}") for m in exp.methods for seed in exp.seeds]
    group, _ = dist.init(resolve_device(exp.device))  # under torchrun: rank zero alone writes
    check_global_batch(cfg.train.batch_size, group.world)
    if not resume:
        taken = [d for _, _, d in planned if run_status(d) is not None]
        if taken:  # never overwrite earlier work
            raise UserError(f"{taken[0]} already holds a run; choose another --out, or continue it with "
                            f"`vlp-bench run --resume {out}`")
    try:
        if group.is_main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "experiment.json", to_dict(cfg))
    except OSError as e:
        raise UserError(f"cannot write to the output directory {out}: {e.strerror or e}") from None
    root, backbones, device = prepare(cfg, progress)
    for name in exp.methods:  # configs that cannot work with these backbones fail before any training
        try:
            METHODS.get(name).check(cfg.methods[name], backbones)
        except ValueError as e:
            raise UserError(f"methods.{name}: {e}") from None
    images = loader(cfg, backbones)
    tasks = {name: TASKS.get(name)(cfg.tasks[name], root, images) for name in exp.tasks}
    data = training_data(cfg, root, images, device)
    env = env_info(device)
    for method_name, seed, run_dir in planned:
        if resume and run_status(run_dir) in FINAL:
            say(f"run {run_dir}: already {run_status(run_dir)}, kept")
            continue
        say(f"run {run_dir}")
        _one_run(cfg, method_name, seed, run_dir, backbones, tasks, data, device, env, progress)
    return [d for _, _, d in planned]


def on_clips(cfg: BenchConfig) -> bool:
    """Whether the experiment's tasks (and so its training data) are clips rather than images."""
    return any(TASKS.get(name).data == "clips" for name in cfg.experiment.tasks)


def _check_video(cfg: BenchConfig) -> None:
    """What a video experiment cannot do, found when the config is read: train on (image) shards,
    or run a method that does not take clips or learns fewer frame positions than data.frames."""
    if cfg.data.shards:
        raise UserError("data.shards hold images; a video experiment trains on the clips of msrvtt/ (unset data.shards)")
    for name in cfg.experiment.methods:
        if not METHODS.get(name).video:
            raise UserError(f"method '{name}' does not take video clips (its encoder's tokens differ from frame "
                            f"to frame), and experiment.tasks {cfg.experiment.tasks} evaluate on clips")
        max_frames = getattr(cfg.methods[name], "max_frames", None)
        if max_frames is not None and max_frames < cfg.data.frames:
            raise UserError(f"methods.{name}.max_frames = {max_frames} is less than data.frames = {cfg.data.frames}")


def loader(cfg: BenchConfig, backbones):
    """Reads a sample at the encoder's resolution: an ImageLoader, or a ClipLoader of data.frames
    frames when the experiment's tasks are on clips."""
    images = ImageLoader(backbones.vision.image_size, backbones.vision.mean, backbones.vision.std)
    if on_clips(cfg):
        from vlp_bench.data.video import ClipLoader

        return ClipLoader(images, cfg.data.frames)
    return images


def training_data(cfg: BenchConfig, root: Path, images: ImageLoader, device: torch.device):
    """batches(seed, rank=0, world=1): a run's training batches (this rank's slice of each global
    batch), from data.shards when set, else from the root's train split (its clips, when the
    experiment's tasks are on clips)."""
    prompt = {"prompt": cfg.experiment.prompt}
    if cfg.data.shards:
        from vlp_bench.data.shards import ShardBatches, shard_paths

        shard_paths(cfg.data.shards)  # missing shards fail before any long work

        def from_shards(seed: int, rank: int = 0, world: int = 1):
            return ShardBatches(cfg.data.shards, images, cfg.train.batch_size, seed, prompt, rank, world,
                                cfg.data.workers, cfg.data.shuffle_buffer, pin_memory=device.type == "cuda")
        return from_shards
    if on_clips(cfg):
        from vlp_bench.data.video import VideoSplit

        split = VideoSplit(root, "train")
    else:
        split = CaptionSplit(root, "train")

    def from_split(seed: int, rank: int = 0, world: int = 1):
        return TrainBatches(split, images, cfg.train.batch_size, seed, prompt, rank, world, cfg.data.workers,
                            pin_memory=device.type == "cuda")
    return from_split


DECODER_SEED = 1_000_003  # offsets the run seed for the decoder phase's batches: a stream training never draws


class StopRun(Exception):
    """Raised by an `on_eval` callback to stop a run on purpose (a search pruning a trial): the run
    is recorded as "pruned" and the exception goes on to the caller."""


RANK_SEED = 1_000_033  # rank r > 0 of a torchrun job draws its random numbers from seed + r * RANK_SEED


def _one_run(cfg, method_name, seed, run_dir, backbones, tasks, data, device, env, progress, on_eval=None):
    group = dist.group()
    main = group.is_main  # the only rank that writes files and evaluates
    write = atomic_write_json if main else (lambda path, obj: None)
    resolved = to_dict(cfg)
    write(run_dir / "config.json", resolved)
    record = {"schema_version": SCHEMA_VERSION, "run_id": run_dir.name, "method": method_name, "seed": seed,
              "status": "running", "config": resolved, "metrics": {}, "cost": {}, "method_info": {}, "env": env}
    if group.active:
        record["distributed"] = {"world_size": group.world, "backend": torch.distributed.get_backend()}
    write(run_dir / "results.json", record)  # a killed run says "running" and can resume
    trackers = Trackers(cfg.trackers, run_dir, record) if main else None
    log = MetricsLog(run_dir / "metrics.jsonl" if main else None, trackers)
    checkpoint = run_dir / "checkpoint.pt"
    try:
        torch.manual_seed(seed)  # the same initial weights on every rank
        method = METHODS.get(method_name)(cfg.methods[method_name], backbones).to(device)
        if group.rank:  # but each rank its own random stream (masks, noise) from here on
            torch.manual_seed(seed + group.rank * RANK_SEED)
        batches = data(seed, group.rank, group.world)

        def decoder_batches():  # the same batches before every evaluation, none of training's (rank zero's)
            return data(seed + DECODER_SEED)

        def evaluate(step: int) -> dict:
            metrics = {name: task.evaluate(method, "val", cfg.train.eval_images)[0] for name, task in tasks.items()}
            if on_eval is not None:
                on_eval(step, metrics)
            return metrics

        t0 = time.perf_counter()
        if checkpoint.is_file():
            say(f"resuming {run_dir.name} from its checkpoint")
        record["cost"] = train(method, batches, cfg.train, device, log, evaluate, progress, checkpoint,
                               decoder_batches=decoder_batches)
        record["data"] = _job_report(group, batches.report())
        if main:
            _final_evaluation(method, tasks, decoder_batches, cfg, device, record, run_dir)
        log.append({"step": record["cost"]["steps"], "samples": record["cost"]["samples_seen"],
                    "wall_s": round(record["cost"]["train_wall_s"], 4), "flops": record["cost"].get("train_flops"),
                    "split": "test", "eval": record["metrics"], "final": True})
        record["cost"]["total_wall_s"] = time.perf_counter() - t0
        record["method_info"] = method.info()
        if "caption" in tasks and main:  # the report's picture of what merging does, beside the captions
            _save_token_groups(method, tasks["caption"], run_dir)
        record["status"] = "finished"
    except UserError:
        raise
    except StopRun as e:
        record["status"], record["error"] = "pruned", str(e)
        write(run_dir / "results.json", record)
        if main:
            checkpoint.unlink(missing_ok=True)
        raise
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: say so, keep the checkpoint, stop the experiment
        record["status"] = "interrupted"
        write(run_dir / "results.json", record)
        raise
    except Exception as e:  # one failing method must not sink the experiment
        if group.active and not isinstance(e, NonFiniteLoss):
            raise  # one rank's failure: torchrun ends the job; the run stays "running", --resume continues it
        record["status"] = "failed"
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()
        say(f"run {run_dir.name} FAILED: {record['error']}")
    finally:  # the trackers see the run's last status, whichever way it ends
        if trackers is not None:
            trackers.close(record)
    write(run_dir / "results.json", record)
    if main:
        checkpoint.unlink(missing_ok=True)  # the run is over: its results are complete
    group.barrier()  # the other ranks wait for rank zero's final evaluation


def _job_report(group: dist.Group, report: dict) -> dict:
    """The training data's report for the whole job: every rank's skipped samples added up."""
    reports = group.gather(report)
    if "skipped" in report:
        skipped: dict = {}
        for r in reports:
            for reason, n in r["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        report = {**report, "skipped": skipped}
    return report


def _final_evaluation(method, tasks, decoder_batches, cfg, device, record, run_dir) -> None:
    """Every task on its test split (after the method's decoder phase, if it has one), with
    collectives off: rank zero's alone."""
    with dist.local(), eager(), decoder_finetune(method, decoder_batches, cfg.train, device) as decoder:
        if decoder:  # a cost of evaluating this family, not of pre-training it
            record["cost"]["decoder_finetune"] = decoder
        for name, task in tasks.items():
            say(f"evaluate {name} on {task.cfg.split}")
            metrics, samples = task.evaluate(method, task.cfg.split)
            record["metrics"][name] = metrics
            write_jsonl(run_dir / f"samples_{name}.jsonl", samples)


TOKEN_GROUP_IMAGES = 4  # a few evaluation images: enough to see the pattern, small enough to embed


def _save_token_groups(method, task, run_dir: Path) -> None:
    """For the first caption-evaluation images, which patches each token reaching the LLM holds
    (ToMe's source tracking through every merge, in the ViT and in the bridge), with the image as
    the encoder saw it: token_groups.json and token_groups/ID.png. Methods that merge nothing (or
    do not hand the LLM a visual prefix) write nothing."""
    from PIL import Image

    from vlp_bench.nn.merging import token_groups, track_sources

    vision = getattr(method, "vision", None)
    grid = getattr(getattr(getattr(vision, "model", None), "patch_embed", None), "grid_size", None)
    if not hasattr(method, "visual_prefix") or grid is None:
        return
    data = CaptionSplit(task.root, task.cfg.split)
    ids = data.image_ids[:TOKEN_GROUP_IMAGES]
    images = task.images.batch([data.image_path(i) for i in ids]).to(next(method.parameters()).device)
    method.eval()
    with torch.no_grad(), track_sources() as mergers:
        prefix = method.visual_prefix(images)
    if not mergers:
        return
    groups = token_groups(mergers).cpu()  # (B, prefix + patches) -> index of the token to the LLM
    p, (gh, gw) = vision.num_prefix_tokens, grid
    if groups.shape[1] != p + gh * gw or groups.max() >= prefix.shape[1]:
        return  # not a plain patch grid, or tokens added after merging: nothing honest to draw
    (run_dir / "token_groups").mkdir(exist_ok=True)
    rows = []
    for k, image_id in enumerate(ids):
        with Image.open(data.image_path(image_id)) as im:
            im.convert("RGB").resize((vision.image_size,) * 2, Image.BICUBIC).save(
                run_dir / "token_groups" / f"{image_id}.png")
        rows.append({"image_id": image_id, "file": f"token_groups/{image_id}.png",
                     "groups": groups[k, p:].view(gh, gw).tolist(), "prefix_groups": groups[k, :p].tolist()})
    atomic_write_json(run_dir / "token_groups.json", {
        "split": task.cfg.split, "image_size": vision.image_size, "grid": [gh, gw], "prefix_tokens": p,
        "tokens_to_llm": prefix.shape[1], "images": rows})
