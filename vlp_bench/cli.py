"""The `vlp-bench` command line. Bad input is a one-line error and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

from vlp_bench.errors import UserError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Benchmark vision-language pre-training acceleration methods side by side.")
evaluate_app = typer.Typer(no_args_is_help=True, help="Score prediction files with the official metrics, or "
                           "evaluate a finished run again from its kept weights.")
app.add_typer(evaluate_app, name="evaluate")

ConfigOpt = typer.Option(None, "--config", "-c", help="Experiment file (default: ./bench.toml if present).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config value: section.key=value (repeatable).")


def _overrides(set_: Optional[list[str]], methods: Optional[str] = None, tasks: Optional[str] = None) -> list[str]:
    """--set values, then --methods a,b as experiment.methods (a method is configured as in a run)
    and --tasks a,b as experiment.tasks."""
    overrides = list(set_ or [])
    for key, names in (("methods", methods), ("tasks", tasks)):
        if names is not None:
            overrides.append(f"experiment.{key}=" + json.dumps([n.strip() for n in names.split(",") if n.strip()]))
    return overrides


def _seed_overrides(seeds: Optional[int]) -> list[str]:
    """--seeds N as experiment.seeds = [0, ..., N-1] (none when not given)."""
    if seeds is None:
        return []
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    return [f"experiment.seeds={list(range(seeds))}"]


def _config(config: Optional[Path], overrides: Optional[list[str]]):
    """The experiment's config: --config, else ./bench.toml when there is one, else the defaults."""
    from vlp_bench.experiment import load_config

    if config is None and Path("bench.toml").is_file():
        config = Path("bench.toml")
    return load_config(config, overrides or [])


@app.command()
def run(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (overrides experiment.methods)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", "--task",
                                        help="Comma-separated tasks (overrides experiment.tasks), e.g. video_caption."),
    seeds: Optional[int] = typer.Option(None, help="Run each method with seeds 0..N-1 (overrides experiment.seeds)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Experiment directory (default: runs/<date-time>)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the unfinished runs of this experiment directory."),
):
    """Train and evaluate each method; write one run directory per (method, seed)."""
    from vlp_bench.experiment import resume_config, run as run_experiment
    from vlp_bench.log import is_main

    if resume is not None:
        if config or set_ or methods or tasks or seeds or out:
            raise UserError("--resume continues an experiment with its saved config; give it no other option")
        cfg = resume_config(resume)
    else:
        overrides = _overrides(set_, methods, tasks)
        overrides += _seed_overrides(seeds)
        if out is not None:
            overrides.append("experiment.out=" + json.dumps(str(out)))
        cfg = _config(config, overrides)
    dirs = run_experiment(cfg, resume=resume is not None)
    if not is_main():  # under torchrun: rank zero speaks
        return
    _print_summary(dirs, cfg.target)
    out_dir = dirs[0].parent
    if (out_dir / "report.html").is_file():
        typer.echo(f"report: {out_dir / 'report.html'}")
    typer.echo(f"results in {out_dir}")


def _print_summary(dirs, target, as_json: bool = False, strict: bool = False) -> None:
    """The per-run table, then time- and FLOPs-to-target per method with verdicts and speed-up
    curves, on the target metric and on the validation loss. After a run (not strict), a target
    that cannot be computed (e.g. no learning curve) is a note, never a failure."""
    from vlp_bench.metrics.targets import VAL_LOSS
    from vlp_bench.reports.summary import (compute_speedups, extra_evaluations, extra_table, load_results,
                                           loss_speedups, speedup_table, summary_table, used_feature_cache)

    results = load_results(dirs)
    try:
        sp = compute_speedups(dirs, results, target.metric, target.value or None, target.reference or None)
    except UserError as e:
        if strict:
            raise
        sp, why = None, str(e)
    extra = extra_evaluations(dirs)
    loss = None if sp and sp["metric"] == VAL_LOSS else loss_speedups(
        dirs, results, sp["reference"] if sp else target.reference or None)  # the loss, unless it is the target
    uncached = (compute_speedups(dirs, results, sp["metric"], target.value or None, sp["reference"], uncached=True)
                if sp and used_feature_cache(results) else None)  # the costs without data.feature_cache
    if as_json:
        typer.echo(json.dumps({"runs": [{"dir": str(d), "results": r} for d, r in zip(dirs, results)],
                               "speedups": sp, "loss_speedups": loss, "extra_evaluations": extra,
                               **({"speedups_without_feature_cache": uncached} if uncached else {})}, indent=2))
        return
    typer.echo(summary_table(results))
    typer.echo("")
    typer.echo(speedup_table(sp) if sp else f"no speed-ups: {why}")
    if uncached:
        typer.echo("\nthe same without the feature cache (every sample's encoder forward counted, at the run's own "
                   "seconds and FLOPs per image; the table above: as run, cache filled on first visits):")
        typer.echo(speedup_table(uncached))
    if loss:
        typer.echo("")
        typer.echo(speedup_table(loss))
    if extra:
        typer.echo("\nevaluations after the runs, from their kept weights (vlp-bench evaluate run):")
        typer.echo(extra_table(extra))


@app.command()
def summary(
    runs: list[Path] = typer.Argument(..., help="Run directories, or experiment directories holding them."),
    metric: Optional[str] = typer.Option(None, help="task.key of the learning curve (default: target.metric)."),
    target: Optional[float] = typer.Option(None, help="Target value (default: 0.8 of the way from the floor to "
                                           "the other reference seeds' best, docs/costs.md)."),
    reference: Optional[str] = typer.Option(None, help="Reference method (default: baseline if it ran, else the first)."),
    as_json: bool = typer.Option(False, "--json", help="Print the runs and speed-ups as JSON."),
):
    """Re-print the tables of finished runs: quality, cost, time- and FLOPs-to-target."""
    from vlp_bench.config import TargetConfig
    from vlp_bench.reports.summary import run_dirs

    cfg = TargetConfig(metric=metric or TargetConfig.metric, value=target or 0.0, reference=reference or "")
    try:
        cfg.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    _print_summary(run_dirs(runs), cfg, as_json, strict=True)


@app.command()
def search(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    method: Optional[str] = typer.Option(None, help="Method whose settings are searched (default: search.method)."),
    trials: Optional[int] = typer.Option(None, help="Finished trials the study should hold (default: search.trials)."),
    storage: Optional[str] = typer.Option(None, help="Optuna RDB URL (default: sqlite:///OUT/study.db)."),
    study: Optional[str] = typer.Option(None, help="Study name (default: <method>-<mode>)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory of the trials' runs (default: runs/search-<study>)."),
):
    """Search a method's settings (SimVLG's merge schedule) with Optuna; re-running resumes the study."""
    from vlp_bench.search import run_search

    overrides = list(set_ or [])
    for key, value in (("method", method), ("trials", trials), ("storage", storage), ("study", study)):
        if value is not None:
            overrides.append(f"search.{key}=" + json.dumps(value))
    cfg = _config(config, overrides)  # an unknown search.method: a one-line error with a suggestion
    out = out or Path("runs") / f"search-{cfg.search.study or cfg.search.method + '-' + cfg.search.mode}"
    summary = run_search(cfg, out)
    done = [t for t in summary["trials"] if t["state"] in ("COMPLETE", "PRUNED")]
    typer.echo(f"study '{summary['study']}': {len(done)} finished trials; best (Pareto front when two objectives):")
    for t in summary["trials"]:
        if t["number"] in summary["best"]:
            typer.echo(f"  trial {t['number']}: values {t['values']} params {t['params']}")
    from vlp_bench.reports import html

    report = html.write([], out / "report.html", searches=[out / "search.json"])
    typer.echo(f"report: {report}")
    typer.echo(f"results in {out} (search.json)")
    if len(done) < cfg.search.trials:  # stopped on failing trials: their run directories say why
        typer.echo(f"the study holds {len(done)} of {cfg.search.trials} finished trials", err=True)
        raise typer.Exit(1)


@app.command()
def claims(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Ledger directory (default: runs/claims-<date-time>); "
                                       "with --from, where claims.json and report.html are written."),
    only: Optional[str] = typer.Option(None, help="Comma-separated claim ids (default: claims.only, else all; --list)."),
    worlds: Optional[int] = typer.Option(None, help="Tiny worlds each claim is judged on (default: claims.worlds)."),
    seeds: Optional[int] = typer.Option(None, help="Seeds 0..N-1 per method and world (default: experiment.seeds)."),
    tune: Optional[int] = typer.Option(None, help="Equal tuning: N trials of train.* per compared arm first "
                                       "(default: claims.tune; 0 = default settings)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the ledger in this directory with its saved config."),
    from_: Optional[list[Path]] = typer.Option(None, "--from", help="Judge the runs already in these directories "
                                               "(a ledger, experiments, runs) without training (repeatable)."),
    bench_: Optional[list[Path]] = typer.Option(None, "--bench", help="A `vlp-bench bench --json` table: the "
                                                "speed-up claims' per-sample time ratio from its step times (repeatable)."),
    list_claims: bool = typer.Option(False, "--list", help="List the claims and the studies each needs."),
    as_json: bool = typer.Option(False, "--json", help="Print the ledger as JSON."),
):
    """Measure the papers' claims on several tiny worlds and judge each: reproduced, refuted or
    inconclusive, with its interval, robustness and paper-scale bound (docs/claims.md)."""
    from vlp_bench import claims as claims_mod
    from vlp_bench.reports import claims as ledger_mod, claims_text

    if list_claims:
        for c in ledger_mod.CLAIMS:
            typer.echo(f"{c.id:<26} {c.source:<7} {c.statement} [{c.method[1]} ({c.method[0]}) against "
                       f"{c.reference[1]} ({c.reference[0]})]")
        return
    for f in bench_ or []:
        if not f.is_file():
            raise UserError(f"--bench {f}: no such file")
    if from_:
        rule = [o for o in set_ or [] if o.split("=")[0].strip() in ("claims.margin", "claims.about")]
        if config or len(rule) < len(set_ or []) or only or worlds or seeds or tune is not None or resume:
            raise UserError("--from judges finished runs as they are; give it only --bench, --out, --json and "
                            "--set claims.margin / claims.about")
        rules = _config(None, rule).claims  # typed and validated like any setting
        settings = {k: getattr(rules, k) for k in ("margin", "about") if any(o.startswith(f"claims.{k}") for o in rule)}
        result = (claims_mod.write_ledger(out, bench_ or [], from_, settings) if out is not None  # + its page
                  else ledger_mod.ledger(from_, bench_ or [], settings))
    elif resume is not None:
        if config or set_ or out or only or worlds or seeds or tune is not None:
            raise UserError("--resume continues a ledger with its saved config; give it no other option")
        result = claims_mod.run_claims(None, resume, resume=True, bench_files=bench_ or [])
        out = resume
    else:
        overrides = list(set_ or [])
        if only:
            overrides.append("claims.only=" + json.dumps([n.strip() for n in only.split(",") if n.strip()]))
        for key, value in (("claims.worlds", worlds), ("claims.tune", tune)):
            if value is not None:
                overrides.append(f"{key}={value}")
        overrides += _seed_overrides(seeds)
        cfg = _config(config, overrides)
        ledger_mod.select(cfg.claims.only)  # an unknown claim fails before any work
        import time

        out = out or Path("runs") / time.strftime("claims-%Y%m%d-%H%M%S")
        result = claims_mod.run_claims(cfg, out, bench_files=bench_ or [])
    typer.echo(json.dumps(result, indent=2) if as_json else claims_text.format_ledger(result))
    if out is not None:
        typer.echo(f"ledger in {out} (claims.json)")


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories, experiment directories holding them, "
                                                "`vlp-bench search` directories (search.json) or `vlp-bench claims` "
                                                "ledgers (claims.json)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (default: EXPERIMENT/report.html for "
                                                               "one experiment directory, else ./report.html)."),
    metric: Optional[str] = typer.Option(None, help="task.key of the learning curve (default: target.metric)."),
    target: Optional[float] = typer.Option(None, help="Target value (default: 0.8 of the way from the floor to "
                                           "the other reference seeds' best, docs/costs.md)."),
    reference: Optional[str] = typer.Option(None, help="Reference method (default: baseline if it ran, else the first)."),
    flops_: Optional[list[Path]] = typer.Option(None, "--flops", help="A `vlp-bench flops --json` table to show "
                                                "(repeatable; default: the flops-*.json of the experiment directories)."),
):
    """Write the self-contained HTML speed-up report of finished runs (from their result files only)."""
    from vlp_bench.config import TargetConfig
    from vlp_bench.reports import html
    from vlp_bench.reports.summary import run_dirs

    cfg = TargetConfig(metric=metric or TargetConfig.metric, value=target or 0.0, reference=reference or "")
    try:
        cfg.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    searches = [p / "search.json" for p in runs if (p / "search.json").is_file()]  # `vlp-bench search` outputs
    ledgers = [p / "claims.json" for p in runs if (p / "claims.json").is_file()]  # `vlp-bench claims` outputs
    runs = [p for p in runs if not (p / "search.json").is_file() and not (p / "claims.json").is_file()]
    dirs = run_dirs(runs)
    experiments = [p for p in runs if not (p / "results.json").is_file()]
    if flops_ is None:
        flops_ = sorted(f for p in experiments for f in p.glob("flops-*.json"))
    for f in flops_:
        if not f.is_file():
            raise UserError(f"--flops {f}: no such file")
    if out is None:  # one experiment or search directory: the report goes in it
        homes = [*experiments, *(s.parent for s in searches + ledgers)]
        out = homes[0] / "report.html" if len(runs) + len(searches) + len(ledgers) == 1 and homes else Path("report.html")
    path = html.write(dirs, out, metric=cfg.metric, target=cfg.value or None, reference=cfg.reference or None,
                      flops_files=flops_, strict=any(x is not None for x in (metric, target, reference)),
                      searches=searches, ledgers=ledgers)
    typer.echo(f"report: {path}")


@app.command()
def flops(
    preset: str = typer.Option("tiny", help="Scale: tiny (the tiny world and methods as configured: bench.toml, "
                                            "--set), vitl-1b (ViT-L/14, a 1.2B Llama) or paper (each method's "
                                            "paper backbones: ViT-g/14 + OPT-2.7B; FLM, MLM, AR: CLIP ViT-B/32 at "
                                            "288 px + RoBERTa-base); the larger two use each method's paper config."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: experiment.methods)."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """FLOPs of one training sample per method, by part and pass, on the meta device (no weights)."""
    from vlp_bench import costmodel
    from vlp_bench.experiment import reference_method

    overrides = _overrides(set_, methods)
    cfg = _config(config, overrides)  # unknown methods: a one-line error with a suggestion
    table = costmodel.cost_table(costmodel.scale(preset, cfg), cfg.experiment.methods, reference_method(cfg, costs_only=True))
    typer.echo(json.dumps(table, indent=2) if as_json else costmodel.format_table(table))


@app.command()
def bench(
    preset: str = typer.Option("tiny", help="Scale: tiny (as configured), vitl-1b (ViT-L/14 + a 1.2B Llama) or "
                                            "paper (ViT-g/14 + OPT-2.7B; FLM, MLM, AR: CLIP ViT-B/32 at 288 px + "
                                            "RoBERTa-base), with random weights."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: experiment.methods)."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per step (default: train.batch_size)."),
    steps: Optional[int] = typer.Option(None, help="Timed steps per method and stage (the median is reported; "
                                        "default 20), or with --overhead steps per round (default 200)."),
    warmup: int = typer.Option(5, help="Untimed steps first (allocator, kernel selection)."),
    overhead: bool = typer.Option(False, "--overhead", help="The trainer's mean step against a bare loop of the "
                                  "same method, batches and optimizer, on the experiment's data (tiny world)."),
    rounds: int = typer.Option(5, help="With --overhead: interleaved rounds (the median is reported)."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Step time, samples/s, TFLOP/s, MFU and peak memory per method on this device, without data;
    or (--overhead) what the trainer costs over a bare loop."""
    from vlp_bench import bench as bench_mod
    from vlp_bench.experiment import resolve_device
    from vlp_bench.log import set_progress

    overrides = _overrides(set_, methods)
    if overhead and batch_size:
        overrides.append(f"train.batch_size={batch_size}")
    cfg = _config(config, overrides)
    set_progress(not as_json)
    if overhead:
        from vlp_bench import overhead as overhead_mod
        from vlp_bench.experiment import prepare

        if preset != "tiny":
            raise UserError("--overhead runs on the experiment's own data and backbones; leave --preset out")
        table = overhead_mod.measure(prepare(cfg), cfg.experiment.methods, steps or 200, rounds)
        typer.echo(json.dumps(table, indent=2) if as_json else overhead_mod.format_table(table))
        return
    steps = 20 if steps is None else steps
    device = resolve_device(cfg.experiment.device)
    if cfg.experiment.threads:
        import torch

        torch.set_num_threads(cfg.experiment.threads)
    table = bench_mod.bench(cfg, preset, cfg.experiment.methods, device, batch_size or cfg.train.batch_size, steps,
                            warmup)
    typer.echo(json.dumps(table, indent=2) if as_json else bench_mod.format_table(table))


@app.command("export-shards")
def export_shards(
    out: Path = typer.Argument(..., help="Directory for the shards (SPLIT-000000.tar, ...)."),
    split: str = typer.Option("train", help="The split of the data root (default: the tiny world) to export."),
    shard_size: int = typer.Option(1000, help="Samples per shard."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """Write a COCO-layout split as WebDataset-style tar shards (train on them with data.shards)."""
    from vlp_bench.data.images import CaptionSplit
    from vlp_bench.data.shards import export_shards as export
    from vlp_bench.experiment import data_root
    from vlp_bench.log import say

    cfg = _config(config, set_)
    data = CaptionSplit(data_root(cfg), split)
    paths = export(data, out, shard_size, progress=lambda i, n: say(f"shard {i}/{n}"))
    typer.echo(f"{len(data)} samples in {len(paths)} shards in {out}; train on them with "
               f"--set data.shards='{out}'")


@app.command("import-coco")
def import_coco(
    karpathy: Path = typer.Argument(..., help="Karpathy's dataset_coco.json (the caption splits)."),
    images: Path = typer.Option(..., help="The COCO image folder holding train2014/ and val2014/."),
    out: Path = typer.Option(..., "--out", "-o", help="The data root to write (then: --set data.root=OUT)."),
    vqa_questions: Optional[list[Path]] = typer.Option(None, help="VQAv2 questions file (repeat: train2014, val2014)."),
    vqa_annotations: Optional[list[Path]] = typer.Option(None, help="VQAv2 annotations file, in the same order."),
):
    """Lay out real COCO (Karpathy splits) and VQAv2 as a vlp-bench data root (links the images)."""
    from vlp_bench.data.import_coco import import_coco as do_import

    summary = do_import(karpathy, images, out, list(vqa_questions or []), list(vqa_annotations or []))
    for split, n in summary.items():
        typer.echo(f"{split}: " + ", ".join(f"{v} {k}" for k, v in n.items()))
    typer.echo(f"data root ready: {out} (use --set data.root='{out}')")


@app.command()
def validate(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: experiment.methods)."),
):
    """Check a config and its methods and tasks, plug-ins included, without training: one batch
    forward and backward, declared tokens and cost hooks against what runs. Exit 1 on any problem."""
    from vlp_bench.validate import format_findings, validate as check_all

    overrides = _overrides(set_, methods)
    found = check_all(lambda: _config(config, overrides))
    typer.echo(format_findings(found))
    if found.problems:
        raise typer.Exit(1)


@app.command()
def prepare(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt):
    """Build the tiny world and pre-train the tiny backbones into the cache (run does it on demand)."""
    from vlp_bench.experiment import prepare as prepare_experiment

    experiment = prepare_experiment(_config(config, set_))
    typer.echo(f"data ready in {experiment.root}")


@app.command("list")
def list_():
    """List the registered methods and tasks, where each comes from, and plug-ins left out."""
    from vlp_bench.registry import METHODS, TASKS

    for registry in (METHODS, TASKS):
        typer.echo(f"{registry.kind}s:")
        names = registry.names()
        width = max(map(len, names), default=0)
        origin = max((len(registry.origin(n)) for n in names), default=0)
        for name in names:
            doc = (registry.get(name).__doc__ or "").strip().splitlines()
            typer.echo(f"  {name:<{width}}  {registry.origin(name):<{origin}}  {doc[0] if doc else ''}".rstrip())
    problems = [*METHODS.problems, *TASKS.problems]
    if problems:
        typer.echo("plug-ins left out:")
        for why in problems:
            typer.echo(f"  {why}")


@evaluate_app.command("caption")
def evaluate_caption(
    annotations: Path = typer.Option(..., help="COCO caption annotation JSON (the references)."),
    predictions: Path = typer.Option(..., help='Results JSON: [{"image_id": int, "caption": str}, ...].'),
    spice: bool = typer.Option(False, help="Also compute SPICE (needs Stanford CoreNLP locally)."),
):
    """Score a caption results file exactly as the official coco-caption tools do; prints JSON."""
    from vlp_bench.metrics.caption import evaluate_files

    typer.echo(json.dumps(evaluate_files(annotations, predictions, spice=spice), indent=2))


@evaluate_app.command("vqa")
def evaluate_vqa(
    questions: Path = typer.Option(..., help="VQAv2 questions JSON."),
    annotations: Path = typer.Option(..., help="VQAv2 annotations JSON."),
    predictions: Path = typer.Option(..., help='Results JSON: [{"question_id": int, "answer": str}, ...].'),
):
    """Score VQA answers exactly as the official VQAv2 evaluation does; prints JSON."""
    from vlp_bench.metrics.vqa import evaluate_files

    typer.echo(json.dumps(evaluate_files(questions, annotations, predictions), indent=2))


@evaluate_app.command("run")
def evaluate_run(
    run_dir: Path = typer.Argument(..., help="A finished run's directory (it kept weights.safetensors)."),
    task: Optional[str] = typer.Option(None, "--task", "--tasks", help="Comma-separated tasks (default: the run's own); "
                                       "any registered task, e.g. vqa after a captioning-only run."),
    split: Optional[str] = typer.Option(None, help="Split to evaluate on (default: each task's configured split)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", "-s", help="Change a task's setting (tasks.T.key=value), "
                                             "or experiment.device / threads / cache, data.root / workers."),
    name: Optional[str] = typer.Option(None, help="Folder under RUN_DIR/evals/ (default: from the tasks, split "
                                       "and settings; never over an earlier one)."),
):
    """Evaluate a finished run again from its kept weights, beside its own results (RUN_DIR/evals/NAME)."""
    from vlp_bench.evaluate import evaluate_run as run_evaluation
    from vlp_bench.log import text_table
    from vlp_bench.reports.summary import numeric

    tasks = [t.strip() for t in task.split(",") if t.strip()] if task else None
    out = run_evaluation(run_dir, tasks, split, list(set_ or []), name)
    record = json.loads((out / "results.json").read_text())
    own = json.loads((run_dir / "results.json").read_text()).get("metrics", {})
    rows = []
    for t, metrics in record["metrics"].items():
        recorded = numeric(own.get(t, {})) if own.get(t, {}).get("split") == metrics.get("split") else {}
        rows.extend([t, metrics.get("split", ""), k, f"{v:.4f}", f"{recorded[k]:.4f}" if k in recorded else "-"]
                    for k, v in numeric(metrics).items())
    typer.echo(text_table(["task", "split", "metric", "value", "the run's own"], rows, left=3))
    typer.echo(f"results in {out}")


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A finished run's directory (it kept weights.safetensors)."),
    inputs: list[Path] = typer.Argument(..., help="Image files or folders of images (clips, for a run on clips)."),
    question: Optional[str] = typer.Option(None, help="Answer this question about each image (the vqa task)."),
    task: Optional[str] = typer.Option(None, help="Task whose prompt and decoding to use (default: vqa with "
                                       "--question, else caption / video_caption)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", "-s", help="Change a task's setting (tasks.T.key=value)."),
    as_json: bool = typer.Option(False, "--json", help="Print [{input, text}] as JSON."),
):
    """Caption your own images (or answer a question about them) with a finished run's model."""
    from vlp_bench.evaluate import predict as run_predict

    rows = run_predict(run_dir, inputs, question, task, list(set_ or []))
    if as_json:
        typer.echo(json.dumps([{"input": str(p), "text": t} for p, t in rows], indent=2))
        return
    for path, text in rows:
        typer.echo(f"{path}\t{text}")


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the traceback of errors too.")):
    global DEBUG
    DEBUG = debug


DEBUG = False


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # a run killed politely writes status "interrupted" and keeps its checkpoint


# OpenMP's worker threads sleep between parallel regions instead of spinning (read once, when torch
# loads, so set before any command imports it; an OMP_WAIT_POLICY already set is kept). Measured with
# `vlp-bench bench --preset tiny --methods baseline` on 2 cores (docs/decisions.md): spinning threads
# beside one other CPU-bound process made each step 3.55x slower; sleeping ones 1.70x, for 7% quiet.
WAIT_POLICY = "PASSIVE"


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        app()
    except UserError as e:
        if DEBUG:
            traceback.print_exc()
        print(f"vlp-bench: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("vlp-bench: interrupted", file=sys.stderr)
        sys.exit(130)
