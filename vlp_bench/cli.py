"""The `vlp-bench` command line. Bad input is a one-line error and exit code 2, never a traceback."""

from __future__ import annotations

import json
import signal
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

from vlp_bench.errors import UserError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Benchmark vision-language pre-training acceleration methods side by side.")
evaluate_app = typer.Typer(no_args_is_help=True, help="Score prediction files with the official metrics.")
app.add_typer(evaluate_app, name="evaluate")

ConfigOpt = typer.Option(None, "--config", "-c", help="Experiment file (default: ./bench.toml if present).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config value: section.key=value (repeatable).")


def _config(config: Optional[Path], overrides: Optional[list[str]]):
    from vlp_bench.experiment import load_config

    if config is None and Path("bench.toml").is_file():
        config = Path("bench.toml")
    return load_config(config, overrides or [])


@app.command()
def run(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (overrides experiment.methods)."),
    seeds: Optional[int] = typer.Option(None, help="Run each method with seeds 0..N-1 (overrides experiment.seeds)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Experiment directory (default: runs/<date-time>)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the unfinished runs of this experiment directory."),
):
    """Train and evaluate each method; write one run directory per (method, seed)."""
    from vlp_bench.experiment import resume_config, run as run_experiment
    from vlp_bench.reports.summary import load_results, summary_table

    if resume is not None:
        if config or set_ or methods or seeds or out:
            raise UserError("--resume continues an experiment with its saved config; give it no other option")
        dirs = run_experiment(resume_config(resume), resume=True)
        typer.echo(summary_table(load_results(dirs)))
        typer.echo(f"results in {resume}")
        return
    overrides = list(set_ or [])
    if methods is not None:
        names = [m.strip() for m in methods.split(",") if m.strip()]
        overrides.append("experiment.methods=" + json.dumps(names))
    if seeds is not None:
        if seeds < 1:
            raise UserError(f"--seeds must be >= 1, got {seeds}")
        overrides.append(f"experiment.seeds={list(range(seeds))}")
    if out is not None:
        overrides.append("experiment.out=" + json.dumps(str(out)))
    dirs = run_experiment(_config(config, overrides))

    typer.echo(summary_table(load_results(dirs)))
    typer.echo(f"results in {dirs[0].parent}")


@app.command()
def prepare(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt):
    """Build the tiny world and pre-train the tiny backbones into the cache (run does it on demand)."""
    from vlp_bench.experiment import prepare as prepare_experiment

    root, _, _ = prepare_experiment(_config(config, set_))
    typer.echo(f"data ready in {root}")


@app.command("list")
def list_():
    """List the registered methods and tasks."""
    from vlp_bench.registry import METHODS, TASKS

    for registry in (METHODS, TASKS):
        typer.echo(f"{registry.kind}s:")
        for name in registry.names():
            doc = (registry.get(name).__doc__ or "").strip().splitlines()
            typer.echo(f"  {name:<14} {doc[0] if doc else ''}")


@evaluate_app.command("caption")
def evaluate_caption(
    annotations: Path = typer.Option(..., help="COCO caption annotation JSON (the references)."),
    predictions: Path = typer.Option(..., help='Results JSON: [{"image_id": int, "caption": str}, ...].'),
    spice: bool = typer.Option(False, help="Also compute SPICE (needs Stanford CoreNLP locally)."),
):
    """Score a caption results file exactly as the official coco-caption tools do; prints JSON."""
    from vlp_bench.caption_metrics import evaluate_files

    typer.echo(json.dumps(evaluate_files(annotations, predictions, spice=spice), indent=2))


@evaluate_app.command("vqa")
def evaluate_vqa(
    questions: Path = typer.Option(..., help="VQAv2 questions JSON."),
    annotations: Path = typer.Option(..., help="VQAv2 annotations JSON."),
    predictions: Path = typer.Option(..., help='Results JSON: [{"question_id": int, "answer": str}, ...].'),
):
    """Score VQA answers exactly as the official VQAv2 evaluation does; prints JSON."""
    from vlp_bench.vqa_metrics import evaluate_files

    typer.echo(json.dumps(evaluate_files(questions, annotations, predictions), indent=2))


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the traceback of errors too.")):
    global DEBUG
    DEBUG = debug


DEBUG = False


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # a run killed politely writes status "interrupted" and keeps its checkpoint


def main() -> None:
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
