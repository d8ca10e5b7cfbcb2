"""An experiment, prepared once for every command that trains or evaluates (`run`, `search`,
`validate`, `prepare`):

    prepare(cfg) -> Experiment         the device (joining a torchrun job), the data root (the tiny
                                       world, built once), the frozen backbones, the tasks and the
                                       training batches: what every run of the config shares
    Experiment.run_one(method, seed, run_dir)
                                       one run: train, evaluate, write its records
    run(cfg)                           every (method, seed), then finish()
    finish(cfg, out, dirs)             the experiment directory's paper-scale costs and HTML report

`vlp-bench run` is `run(cfg)` plus the tables on stdout, so the library and the command leave the
same files. The default comparison lives here (`DEFAULTS`) and in bench.toml, never in the core.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from vlp_bench.backbones import Backbones, load_backbones
from vlp_bench.config import BenchConfig, cache_dir, load_config_dict, on_clips, resume_config
from vlp_bench.config import load_config as load_config_file
from vlp_bench.data.images import CaptionSplit, ImageLoader, TrainBatches, check_global_batch
from vlp_bench.data.world import build_world
from vlp_bench.errors import UserError
from vlp_bench.files import atomic_write_json, write_jsonl
from vlp_bench.log import run_log, say
from vlp_bench.nn.bert import EXPERIMENT_BERT
from vlp_bench.nn.token_pictures import save_token_groups
from vlp_bench.registry import METHODS, TASKS
from vlp_bench.results import SCHEMA_VERSION, MetricsLog, env_info
from vlp_bench.trackers import Trackers
from vlp_bench.train import dist
from vlp_bench.train.compile import eager
from vlp_bench.train.features import FeatureCache, reason as feature_reason
from vlp_bench.train.sharding import memory as sharded_memory, shard_frozen_llm
from vlp_bench.train.trainer import Evaluation, NonFiniteLoss, Phase, train
from vlp_bench.train.weights import fingerprint_of, save_weights
from vlp_bench.typed import to_dict

__all__ = ["DEFAULTS", "Experiment", "StopRun", "finish", "load_config", "load_config_dict", "prepare",
           "reference_method", "resume_config", "run"]

DEFAULTS = {
    # the seed papers' central comparison: SimVLG and two-stage BLIP-2 against the no-merge
    # baseline, on what they report (COCO-style captioning, zero-shot VQA)
    "experiment": {"methods": ["baseline", "simvlg", "blip2"], "tasks": ["caption", "vqa"]},
    "search": {"method": "simvlg"},  # the merge schedule is the setting SimVLG's paper tunes
}
DEFAULT_REFERENCE = "baseline"  # the method every acceleration claims to beat, when it ran


def load_config(path: Path | None = None, overrides: list[str] = ()) -> BenchConfig:
    """bench.toml (or nothing) + --set overrides, over the default experiment -> a validated BenchConfig."""
    return load_config_file(path, overrides, DEFAULTS)


def reference_method(cfg: BenchConfig, costs_only: bool = False) -> str:
    """What speed-ups and cost ratios are measured against: target.reference, else the baseline when
    it ran (`costs_only`: when it is registered: a per-sample cost needs no run), else the first method."""
    known = METHODS.names() if costs_only else cfg.experiment.methods
    return cfg.target.reference or (DEFAULT_REFERENCE if DEFAULT_REFERENCE in known else cfg.experiment.methods[0])


class StopRun(Exception):
    """Raised by an `on_eval` callback to stop a run on purpose (a search pruning a trial): the run
    is recorded as "pruned" and the exception goes on to the caller."""


FINAL = ("finished", "failed", "pruned")  # a run in one of these states is done; "running"/"interrupted" can resume
# offsets the run seed for the batches of the phases before each evaluation (the decoder phase's, a task's
# fine-tuning): a stream training never draws
DECODER_SEED = 1_000_003
WEIGHTS = "weights.safetensors"  # a finished run's trained weights (train.keep_weights)
RANK_SEED = 1_000_033  # rank r > 0 of a torchrun job draws its random numbers from seed + r * RANK_SEED


@dataclass
class Experiment:
    """What every run of a config shares, prepared once by `prepare`."""

    cfg: BenchConfig
    root: Path  # the data root (tiny world or data.root)
    backbones: Backbones  # frozen vision encoder + LLM + tokenizer
    device: torch.device
    images: ImageLoader  # a sample at the encoder's resolution (a ClipLoader for tasks on clips)
    tasks: dict  # name -> Task, on the data root
    env: dict  # the environment recorded in every results.json

    def batches(self, seed: int, rank: int = 0, world: int = 1):
        """A run's training batches (this rank's slice of each global batch): from data.shards when
        set, else from the root's train split (its clips, when the tasks are on clips)."""
        cfg, pin = self.cfg, self.device.type == "cuda"
        prompt = {"prompt": cfg.experiment.prompt}
        if cfg.data.shards:
            from vlp_bench.data.shards import ShardBatches

            return ShardBatches(cfg.data.shards, self.images, cfg.train.batch_size, seed, prompt, rank, world,
                                cfg.data.workers, cfg.data.shuffle_buffer, pin_memory=pin)
        return TrainBatches(self.train_split, self.images, cfg.train.batch_size, seed, prompt, rank, world,
                            cfg.data.workers, pin_memory=pin)

    @functools.cached_property
    def train_split(self):
        """The root's train split, read once (its clips when the tasks are on clips); its first
        data.train_fraction of images when that is below 1."""
        if on_clips(self.cfg):
            from vlp_bench.data.video import VideoSplit

            split = VideoSplit(self.root, "train")
        else:
            split = CaptionSplit(self.root, "train")
        if self.cfg.data.train_fraction < 1:
            split.image_ids = split.image_ids[:max(1, math.ceil(self.cfg.data.train_fraction * len(split.image_ids)))]
        return split

    @functools.cached_property
    def validation_batches(self) -> list[dict]:
        """The validation loss's fixed captions: the first train.val_loss_images validation images
        (clips) with their first reference each, in training-size batches; none when no task
        evaluates (an experiment that only trains has no validation split to read)."""
        cfg = self.cfg
        if not cfg.train.val_loss_images or not self.tasks:
            return []
        if on_clips(cfg):
            from vlp_bench.data.video import VideoSplit

            split = VideoSplit(self.root, "val")
        else:
            split = CaptionSplit(self.root, "val")
        ids, size = split.image_ids[:cfg.train.val_loss_images], cfg.train.batch_size
        return [{"prompt": cfg.experiment.prompt, "image_ids": chunk, "captions": [split.refs[i][0] for i in chunk],
                 "images": self.images.batch([split.image_path(i) for i in chunk])}
                for chunk in (ids[k:k + size] for k in range(0, len(ids), size))]

    def phases(self, method, seed: int) -> list[Phase]:
        """What every evaluation of a run with `seed` runs before its tasks, each phase on a copy of
        the weights: the method's decoder phase (if any; the same batches each time, none of
        training's) before the tasks evaluated as pre-trained; and before each task that fine-tunes
        (Task.finetune_steps), instead, its own fine-tuning on its training split (Method.task_stage).
        Each phase draws its batches and random numbers from the seed alone, so an evaluation from
        saved weights repeats them exactly."""
        cfg, seed = self.cfg, seed + DECODER_SEED
        steps = {name: task.finetune_steps(method) for name, task in self.tasks.items()}

        def task_batches(task):
            return lambda: task.finetune_batches(cfg.train.batch_size, seed, cfg.data.workers)

        return [Phase([n for n, k in steps.items() if not k], method.decoder_stage(), lambda: self.batches(seed),
                      seed=seed),
                *(Phase([n], method.task_stage(k, cfg.train.steps), task_batches(self.tasks[n]), task=n, seed=seed)
                  for n, k in steps.items() if k)]

    def labelled(self, name: str, method, metrics: dict) -> dict:
        """A task's metrics with how the method met it (Task.protocol), where the task can fine-tune."""
        protocol = self.tasks[name].protocol(method)
        return metrics if protocol is None else {**metrics, "protocol": protocol}

    def evaluate_tasks(self, method, seed: int, out: Path, keep: bool = False) -> dict:
        """Every task on its configured split (task.cfg.split), each after its phase (phases()),
        training collectives off; under torchrun every rank calls it (the decoding is shared) and
        rank zero writes: samples_<task>.jsonl in `out`, and with `keep` the weights each phase that
        trained evaluated its task with (weights-<task>.safetensors). Returns the evaluation row:
        eval {task: metrics}, eval_wall_s_by_task, the phases' costs, weights {task: file}."""
        phases = self.phases(method, seed)
        trained = {n for phase in phases if phase.trains for n in phase.tasks}
        kept: dict = {}
        main = dist.job().is_main

        def evaluate(step: int, names: list[str]) -> dict:
            metrics = {}
            for name in names:
                task = self.tasks[name]
                say(f"evaluate {name} on {task.cfg.split}")
                scores, samples = task.evaluate(method, task.cfg.split)
                metrics[name] = self.labelled(name, method, scores)
                if not main:
                    continue
                write_jsonl(out / f"samples_{name}.jsonl", samples)
                if keep and name in trained:
                    meta = {"method": method.name, "seed": seed, "phase": name}
                    kept[name] = save_weights(out / f"weights-{name}.safetensors", method, meta)["file"]
            return metrics

        with dist.local(), eager():
            row = Evaluation(evaluate, phases)(method, self.cfg.train, self.device, 0)
        return {**row, "weights": kept} if kept else row

    def run_one(self, method_name: str, seed: int, run_dir: Path, method_cfg=None,
                on_eval: Callable[[int, dict], None] | None = None, train: dict | None = None) -> None:
        """Train and evaluate `method_name` with `seed`, writing run_dir's records; `method_cfg`
        replaces its configured settings (a search trial's), `train` lays {key: value} over its
        training settings (after experiment.train_by_method), `on_eval(step, metrics)` sees each
        validation evaluation (and may raise StopRun). A failing run is recorded as "failed" and
        the experiment goes on; Ctrl-C is recorded as "interrupted" and stops it."""
        cfg = self.cfg
        if method_cfg is not None:
            cfg = dataclasses.replace(cfg, methods={**cfg.methods, method_name: method_cfg})
        train = {**cfg.experiment.train_by_method.get(method_name, {}), **(train or {})}
        if train:  # the method's own training settings (tuned, or a search trial's)
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))
        run = _Run(self, cfg, method_name, seed, Path(run_dir), on_eval)
        run.execute()


class _Run:
    """One (method, seed) run of an experiment: its record, its files and the order of its work."""

    def __init__(self, exp: Experiment, cfg: BenchConfig, method_name: str, seed: int, run_dir: Path, on_eval):
        self.exp, self.cfg, self.name, self.seed, self.dir, self.on_eval = exp, cfg, method_name, seed, run_dir, on_eval
        self.group = dist.group()
        self.main = self.group.is_main  # the only rank that writes files and evaluates
        self.checkpoint = run_dir / "checkpoint.pt"
        self.record = {"schema_version": SCHEMA_VERSION, "run_id": run_dir.name, "method": method_name,
                       "seed": seed, "status": "running", "config": to_dict(cfg), "metrics": {}, "cost": {},
                       "method_info": {}, "env": exp.env}
        if self.group.active:
            self.record["distributed"] = {"world_size": self.group.world, "backend": torch.distributed.get_backend(),
                                          "parallel": cfg.train.parallel, **sharded_memory(exp.backbones.llm)}

    def write(self, name: str, obj) -> None:
        if self.main:
            atomic_write_json(self.dir / name, obj)

    def execute(self) -> None:
        self.write("config.json", self.record["config"])
        self.write("results.json", self.record)  # a killed run says "running" and can resume
        trackers = Trackers(self.cfg.trackers, self.dir, self.record) if self.main else None
        log = MetricsLog(self.dir / "metrics.jsonl" if self.main else None, trackers)
        try:
            with run_log(self.dir / "run.log") if self.main else contextlib.nullcontext():
                self.train_and_evaluate(log)  # the metrics tools' own messages go to run.log
            self.record["status"] = "finished"
        except UserError:
            raise
        except StopRun as e:
            self.record["status"], self.record["error"] = "pruned", str(e)
            self.write("results.json", self.record)
            self.drop_checkpoint()
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: say so, keep the checkpoint, stop the experiment
            self.record["status"] = "interrupted"
            self.write("results.json", self.record)
            raise
        except Exception as e:  # one failing method must not sink the experiment
            if self.group.active and not isinstance(e, NonFiniteLoss):
                raise  # one rank's failure: torchrun ends the job; the run stays "running", --resume continues it
            self.record.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            say(f"run {self.dir.name} FAILED: {self.record['error']}")
        finally:  # the trackers see the run's last status, whichever way it ends
            if trackers is not None:
                trackers.close(self.record)
        self.write("results.json", self.record)
        self.drop_checkpoint()  # the run is over: its results are complete
        self.group.barrier()  # the other ranks wait for rank zero's files

    def drop_checkpoint(self) -> None:
        if self.main:
            self.checkpoint.unlink(missing_ok=True)

    def train_and_evaluate(self, log: MetricsLog) -> None:
        exp, cfg, seed, group = self.exp, self.cfg, self.seed, self.group
        torch.manual_seed(seed)  # the same initial weights on every rank
        method = METHODS.get(self.name)(cfg.methods[self.name], exp.backbones).to(exp.device)
        if group.rank:  # but each rank its own random stream (masks, noise) from here on
            torch.manual_seed(seed + group.rank * RANK_SEED)
        batches = exp.batches(seed, group.rank, group.world)

        def evaluate(step: int, names: list[str]) -> dict:  # on the first validation images
            return {name: exp.labelled(name, method, exp.tasks[name].evaluate(method, "val", cfg.train.eval_images)[0])
                    for name in names}

        phases = exp.phases(method, seed)
        why = feature_reason(method) if cfg.data.feature_cache else None  # a method the cache cannot serve
        features = FeatureCache(method, exp.device) if cfg.data.feature_cache and why is None else None
        if why:
            say(f"data.feature_cache: off for this run, {why}")
        t0 = time.perf_counter()
        if self.checkpoint.is_file():
            say(f"resuming {self.dir.name} from its checkpoint")
        cost = self.record["cost"] = train(method, batches, cfg.train, exp.device, log,
                                           Evaluation(evaluate, phases, self.on_eval),
                                           checkpoint=self.checkpoint, validation_batches=exp.validation_batches,
                                           features=features)
        if why:
            cost["feature_cache"] = {"used": False, "reason": why}
        self.record["data"] = _job_report(group, batches.report())
        if self.main and cfg.train.keep_weights:
            self.keep_weights(method)
        self.final_evaluation(method)  # on every rank: each decodes its share
        log.append({"step": cost["steps"], "samples": cost["samples_seen"], "wall_s": round(cost["train_wall_s"], 4),
                    "flops": cost.get("train_flops"), "split": "test", "eval": self.record["metrics"], "final": True})
        cost["total_wall_s"] = time.perf_counter() - t0
        self.record["method_info"] = method.info()
        pictured = [task for task in exp.tasks.values() if task.token_pictures]
        if pictured and self.main:  # the report's picture of what merging does, beside the samples
            save_token_groups(method, pictured[0], self.dir)

    def final_evaluation(self, method) -> None:
        """Every task on its test split after its phase (Experiment.evaluate_tasks), its samples and
        (train.keep_weights) the weights a phase trained for it beside the run's records."""
        row = self.exp.evaluate_tasks(method, self.seed, self.dir, keep=self.cfg.train.keep_weights)
        self.record["metrics"] = {name: row["eval"][name] for name in self.exp.tasks}
        self.record["cost"]["eval_wall_s_by_task"] = row.get("eval_wall_s_by_task", {})
        self.record["cost"].update(phase_costs(row))  # a cost of evaluating, not of pre-training
        if row.get("weights"):
            self.record.setdefault("weights", {})["phases"] = row["weights"]

    def keep_weights(self, method) -> None:
        """The pre-trained weights (weights.safetensors), before any evaluation phase touches them."""
        meta = {"method": self.name, "seed": self.seed, "step": self.record["cost"]["steps"]}
        self.record["weights"] = save_weights(self.dir / WEIGHTS, method, meta)


def phase_costs(row: dict) -> dict:
    """An evaluation row's phase costs under their results.json names: decoder_finetune (the decoder
    phase), task_finetune ({task: its fine-tuning}); only those that ran."""
    names = {"decoder": "decoder_finetune", "task_finetune": "task_finetune"}
    return {field: row[key] for key, field in names.items() if key in row}


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


def data_root(cfg: BenchConfig) -> Path:
    """data.root, or the tiny world (built into the cache on first use)."""
    if cfg.data.root:
        root = Path(cfg.data.root).expanduser()
        if not root.is_dir():
            raise UserError(f"data.root is not a directory: {root}")
        return root
    say(f"tiny world in {cache_dir(cfg)} (built once, then cached)")
    return build_world(cfg.world, cache_dir(cfg), clip_frames=on_clips(cfg))  # frames only for a video task


def image_loader(cfg: BenchConfig, backbones: Backbones):
    """Reads a sample at the encoder's resolution: an ImageLoader, or a ClipLoader of data.frames
    frames when the experiment's tasks are on clips."""
    images = ImageLoader(backbones.vision.image_size, backbones.vision.mean, backbones.vision.std)
    if on_clips(cfg):
        from vlp_bench.data.video import ClipLoader

        return ClipLoader(images, cfg.data.frames)
    return images


def _needs_bert(cfg: BenchConfig) -> bool:
    """Whether a method of the experiment starts from its BERT backbone (init = "bert": the bridges,
    and the text-side family's text model): only then is the tiny BERT pre-trained."""
    return any(getattr(cfg.methods.get(m), "init", "") == EXPERIMENT_BERT for m in cfg.experiment.methods)


def prepare(cfg: BenchConfig) -> Experiment:
    """Build (or find in the cache) the data and the frozen backbones, and check what can be checked
    before any training. Under torchrun this joins the job (vlp_bench.train.dist) and rank zero
    builds the caches before the other ranks read them."""
    group, device = dist.init(resolve_device(cfg.experiment.device))
    check_global_batch(cfg.train.batch_size, group.world)
    cfg.trackers.check()  # a tracker switched on without its package fails before any work
    if cfg.experiment.threads:
        torch.set_num_threads(cfg.experiment.threads)
    if cfg.data.feature_cache and cfg.data.shards:
        raise UserError("data.feature_cache keeps tokens by image id, which a stream of data.shards does not "
                        "give: use it with a COCO-layout data.root")
    if cfg.data.shards:
        from vlp_bench.data.shards import shard_paths

        shard_paths(cfg.data.shards)  # missing shards fail before any long work
    with dist.main_first(group):
        root = data_root(cfg)
    for name in cfg.experiment.tasks:  # missing task files fail before any long work
        TASKS.get(name).check(cfg.tasks[name], root)
    say("frozen backbones (tiny ones are pre-trained once, then cached)")
    with dist.main_first(group):
        bert = cfg.bert if _needs_bert(cfg) else None
        backbones = load_backbones(cfg.vision, cfg.llm, root, cache_dir(cfg), device, bert)
    if group.active and cfg.train.parallel == "fsdp":
        say(f"sharding the frozen LLM over {group.world} processes (FSDP2)")
        shard_frozen_llm(backbones.llm, device, lambda: fingerprint_of(backbones.vision, backbones.llm))
    images = image_loader(cfg, backbones)
    tasks = {name: TASKS.get(name)(cfg.tasks[name], root, images) for name in cfg.experiment.tasks}
    return Experiment(cfg, root, backbones, device, images, tasks, env_info(device))


def run_status(run_dir: Path) -> str | None:
    """The status in a run directory's results.json, or None when it has none."""
    path = run_dir / "results.json"
    if not path.is_file():
        return "interrupted" if (run_dir / "config.json").is_file() else None
    try:
        return json.loads(path.read_text()).get("status")
    except (json.JSONDecodeError, OSError):
        return "interrupted"


def run(cfg: BenchConfig, resume: bool = False) -> list[Path]:
    """Train and evaluate every (method, seed), then finish the experiment directory; returns the
    run directories. With `resume`, runs that finished or failed are kept, the others continue from
    their last checkpoint."""
    exp = cfg.experiment
    out = Path(exp.out) if exp.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    cfg = dataclasses.replace(cfg, experiment=dataclasses.replace(exp, out=str(out)))  # names the directory used
    planned = [(m, seed, out / f"{m}-seed{seed}") for m in exp.methods for seed in exp.seeds]
    group, _ = dist.init(resolve_device(exp.device))  # under torchrun: rank zero alone writes
    check_global_batch(cfg.train.batch_size, group.world)
    if not resume:
        taken = [d for _, _, d in planned if run_status(d) is not None]
        if taken:  # never overwrite earlier work
            raise UserError(f"{taken[0]} already holds a run; choose another --out, or continue it with "
                            f"`vlp-bench run --resume {out}`")
    _start_directory(out, cfg)  # before the long preparation: an unwritable --out fails at once
    experiment = prepare(cfg)
    for name in exp.methods:  # configs that cannot work with these backbones fail before any training
        try:
            METHODS.get(name).check(cfg.methods[name], experiment.backbones)
        except ValueError as e:
            raise UserError(f"methods.{name}: {e}") from None
    for method_name, seed, run_dir in planned:
        if resume and run_status(run_dir) in FINAL:
            say(f"run {run_dir}: already {run_status(run_dir)}, kept")
            continue
        say(f"run {run_dir}")
        experiment.run_one(method_name, seed, run_dir)
    dirs = [d for _, _, d in planned]
    if dist.finish():  # under torchrun the job ends here; rank zero finishes the directory
        finish(cfg, out, dirs)
    return dirs


def _start_directory(out: Path, cfg: BenchConfig) -> None:
    if not dist.group().is_main:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "experiment.json", to_dict(cfg))
    except OSError as e:
        raise UserError(f"cannot write to the output directory {out}: {e.strerror or e}") from None


def finish(cfg: BenchConfig, out: Path, dirs: list[Path]) -> Path | None:
    """The experiment directory's paper-scale costs of its methods (flops-paper.json, once) and its
    report.html; returns the report's path. Neither can fail the finished runs: a problem is said
    and `vlp-bench report OUT` retries."""
    from vlp_bench import costmodel
    from vlp_bench.reports import html

    paper = out / "flops-paper.json"
    try:
        if not paper.is_file():
            say("paper-scale costs of these methods (flops-paper.json)")
            scale = costmodel.paper_scale(frames=costmodel.frames_of(cfg))
            atomic_write_json(paper, costmodel.costable_table(scale, cfg.experiment.methods, reference_method(cfg)))
        say("report")
        return html.write(dirs, out / "report.html", metric=cfg.target.metric, target=cfg.target.value or None,
                          reference=cfg.target.reference or None, flops_files=[paper] if paper.is_file() else [])
    except Exception as e:  # noqa: BLE001 - the runs are done and saved; say what went wrong, keep them
        say(f"the report could not be written ({type(e).__name__}: {e}); `vlp-bench report {out}` retries")
        return None
