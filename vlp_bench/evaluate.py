"""A finished run, opened again from the weights it kept (train.keep_weights):

    reopen(run_dir, overrides, tasks) -> Reopened   the run's own config (plus the few settings an
                                       evaluation may change), its experiment prepared for `tasks`,
                                       its method rebuilt as the run built it, its weights put back
    evaluate_run(run_dir, ...)         `vlp-bench evaluate run`: tasks on a split, after the phases the
                                       run's own evaluation ran (decoder phase, a task's fine-tuning,
                                       re-run from the run's seed), into RUN/evals/<name>/, never over
                                       the run's own records
    predict(run_dir, inputs, ...)      `vlp-bench predict`: one caption (or answer) per image

Re-evaluating a run's own tasks and split with its own settings is the run's final evaluation, the
same code (Experiment.evaluate_tasks) on the same weights: its metrics are the recorded ones, to
the last digit, on the same device type and thread count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vlp_bench.config import load_config_dict, on_clips
from vlp_bench.errors import UserError
from vlp_bench.experiment import WEIGHTS, Experiment, phase_costs, prepare
from vlp_bench.files import atomic_dir, atomic_write_json
from vlp_bench.log import run_log, say
from vlp_bench.method import Method
from vlp_bench.registry import METHODS
from vlp_bench.results import SCHEMA_VERSION
from vlp_bench.train import dist
from vlp_bench.train.compile import eager
from vlp_bench.train.trainer import Evaluation, Phase
from vlp_bench.train.weights import load_weights
from vlp_bench.typed import apply_overrides, parse_override, to_dict

# what an evaluation may change: how the tasks decode and on what, and where the work runs. Anything
# else (the method, the backbones, training) would describe another model than the one the weights are
EDITABLE = ("tasks", "experiment.device", "experiment.threads", "experiment.cache", "data.root", "data.workers")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Reopened:
    dir: Path
    record: dict  # the run's results.json
    exp: Experiment
    method: Method


def finished_run(run_dir: Path) -> dict:
    """The run's results.json, when the run finished and kept its weights; else a one-line refusal."""
    if not (Path(run_dir) / "results.json").is_file():
        raise UserError(f"{run_dir}: not a run directory (no results.json)")
    record = _json(Path(run_dir) / "results.json")
    if record.get("status") != "finished":
        raise UserError(f"{run_dir}: the run did not finish (status {record.get('status')!r}); only a finished run "
                        f"can be evaluated again")
    if not (Path(run_dir) / WEIGHTS).is_file():
        raise UserError(f"{run_dir}: no {WEIGHTS}: the run kept no weights (train.keep_weights was off, or an older "
                        f"vlp-bench made it)")
    if not (Path(run_dir) / "config.json").is_file():
        raise UserError(f"{run_dir}: no config.json, the config the run was trained with")
    return record


def _json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid JSON: {e}") from None


def run_config(run_dir: Path, record: dict, overrides: list[str], tasks: list[str] | None):
    """The run's config (config.json) for its one method and seed, `tasks` in place of its own, and
    `overrides` (only EDITABLE keys)."""
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if not any(key == e or key.startswith(e + ".") for e in EDITABLE):
            raise UserError(f"--set {key}: an evaluation may change only tasks.*, experiment.device, experiment.threads, "
                            f"experiment.cache, data.root and data.workers ({key} would describe another model)")
    data = _json(Path(run_dir) / "config.json")
    exp = data.setdefault("experiment", {})
    exp.update(methods=[record["method"]], seeds=[record["seed"]], out="")
    own = exp.get("train_by_method", {}).get(record["method"])  # the run's own tuned values, not its peers'
    exp["train_by_method"] = {record["method"]: own} if own else {}
    if tasks:
        exp["tasks"] = list(tasks)
    data["target"] = {}  # speed-up targets compare methods: nothing to do with one run's evaluation
    return load_config_dict(apply_overrides(data, list(overrides)))


def reopen(run_dir: Path, overrides: list[str] = (), tasks: list[str] | None = None) -> Reopened:
    """Prepare the run's experiment (data and the frozen backbones, from the cache or checkpoints),
    rebuild its method from its seed as the run did, and put its trained weights back. The weights
    file checks that the backbones found are the ones it was trained on."""
    run_dir = Path(run_dir)
    record = finished_run(run_dir)
    cfg = run_config(run_dir, record, list(overrides), tasks)
    try:
        exp = prepare(cfg)
    except UserError as e:  # e.g. a backbone checkpoint gone, a data root moved
        raise UserError(f"cannot rebuild {run_dir.name} as it ran: {e}") from None
    name, seed = record["method"], record["seed"]
    torch.manual_seed(seed)  # every tensor that did not train, drawn as the run drew it
    method = METHODS.get(name)(cfg.methods[name], exp.backbones).to(exp.device)
    load_weights(run_dir / WEIGHTS, method)
    total = sum(stage.steps for stage in method.stages(cfg.train.steps))
    method.set_progress((total - 1) / total)  # the curricula where the run's last step left them
    method.eval()
    return Reopened(run_dir, record, exp, method)


def own_tasks(run_dir: Path) -> list[str]:
    """The tasks the run's experiment evaluated."""
    return list(_json(Path(run_dir) / "config.json").get("experiment", {}).get("tasks", []))


def evaluate_run(run_dir: Path, tasks: list[str] | None = None, split: str | None = None,
                 overrides: list[str] = (), name: str | None = None) -> Path:
    """Evaluate a finished run on `tasks` (default: its own) and `split` (default: each task's
    configured one), each after the phase the run's evaluation ran before it; writes
    RUN/evals/<name>/ (results.json, samples_<task>.jsonl) and returns it."""
    run_dir = Path(run_dir)
    finished_run(run_dir)  # refusals before any preparation
    tasks = list(tasks or own_tasks(run_dir))
    overrides = [*overrides, *(f"tasks.{t}.split={json.dumps(split)}" for t in tasks if split)]
    out = _fresh(run_dir / "evals", name or _default_name(tasks, split, overrides), chosen=name is not None)
    r = reopen(run_dir, overrides, tasks)
    cfg, t0 = r.exp.cfg, time.perf_counter()
    with atomic_dir(out) as tmp, run_log(tmp / "run.log"):
        row = r.exp.evaluate_tasks(r.method, r.record["seed"], tmp)
        cost = {"eval_wall_s": round(time.perf_counter() - t0, 3),
                "eval_wall_s_by_task": row.get("eval_wall_s_by_task", {}), **phase_costs(row)}
        atomic_write_json(tmp / "results.json", {
            "schema_version": SCHEMA_VERSION, "kind": "evaluation", "name": out.name, "run_id": r.record.get("run_id"),
            "method": r.record["method"], "seed": r.record["seed"], "status": "finished", "tasks": tasks,
            "splits": {t: cfg.tasks[t].split for t in tasks if hasattr(cfg.tasks[t], "split")},
            "overrides": list(overrides), "settings": {t: to_dict(cfg.tasks[t]) for t in tasks},
            "metrics": {t: row["eval"][t] for t in tasks}, "cost": cost, "env": r.exp.env})
    return out


def _default_name(tasks: list[str], split: str | None, overrides: list[str]) -> str:
    """<tasks>[-<split>][-<hash of the other settings>]: the same request gets the same stem."""
    rest = sorted(o for o in overrides if not o.split("=", 1)[0].strip().endswith(".split"))
    digest = hashlib.sha256("\n".join(rest).encode()).hexdigest()[:6] if rest else ""
    return "-".join(filter(None, ["+".join(tasks), split, digest]))


def _fresh(parent: Path, name: str, chosen: bool) -> Path:
    """parent/name, or name-2, name-3, ... when taken; a name the user chose is never reused."""
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"--name {name!r}: give a plain folder name")
    if not (parent / name).exists():
        return parent / name
    if chosen:
        raise UserError(f"{parent / name} already holds an evaluation; choose another --name")
    k = 2
    while (parent / f"{name}-{k}").exists():
        k += 1
    return parent / f"{name}-{k}"


def inputs_of(paths: list[Path], clips: bool) -> list[Path]:
    """The images to predict on: files, and the image files of folders (sorted); for a run on clips,
    each path is one clip (a folder of frames or a video file). Missing paths fail at once."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p}: no such file or folder")
        if p.is_dir() and not clips:
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{p}: no image files in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out.extend(found)
        else:
            out.append(p)
    if not clips:
        for f in out:
            _check_image(f)
    return out


def _check_image(path: Path) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def predict(run_dir: Path, paths: list[Path], question: str | None = None, task: str | None = None,
            overrides: list[str] = ()) -> list[tuple[Path, str]]:
    """What a finished run's model says of each image (clip): the task's prompt (the question in
    VQA's), decoded with the task's settings, by the weights that task was evaluated with: the
    run's kept phase copy (weights-<task>.safetensors), else its weights after that task's phase
    re-run from the run's seed. Default task: vqa with a question, else captioning."""
    run_dir = Path(run_dir)
    clips = on_clips(run_config(run_dir, finished_run(run_dir), [], None))
    task = task or ("vqa" if question else ("video_caption" if clips else "caption"))
    inputs = inputs_of(paths, clips)
    r = reopen(run_dir, list(overrides), [task])
    t, method = r.exp.tasks[task], r.method
    prompt = t.prompt(question)
    copy = run_dir / f"weights-{task}.safetensors"  # unless the fine-tuning it came from is changed
    kept = copy.is_file() and not any(parse_override(o)[0][:3] == ["tasks", task, "finetune_steps"] for o in overrides)
    phases = [] if kept else [dataclasses.replace(p, tasks=[task])  # generate() runs once per task
                          for p in r.exp.phases(method, r.record["seed"]) if p.trains and task in p.tasks]
    if kept:
        load_weights(copy, method)
    for phase in phases:
        say(f"fine-tuning as the run did before evaluating {task} ({phase.stage.steps} steps; no kept copy)")
    texts: list[str] = []

    def generate(step: int, names) -> dict:
        bs = t.cfg.batch_size
        for k in range(0, len(inputs), bs):
            pixels = r.exp.images.batch(inputs[k:k + bs]).to(r.exp.device)
            texts.extend(method.generate(pixels, [prompt] * pixels.shape[0], t.cfg))
        return {}

    with dist.local(), eager():
        Evaluation(generate, phases or [Phase([task])])(method, r.exp.cfg.train, r.exp.device, 0)
    return list(zip(inputs, texts))
