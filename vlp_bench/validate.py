"""`vlp-bench validate`: everything a run would trip over, found in a minute without training.

In order: the plug-ins load; the config resolves; the data and the backbones are there; then, for
each method of experiment.methods, on a few training samples:
  fits       Method.check() accepts its config with these backbones, and it builds
  stage S    one forward and backward: a finite scalar loss, gradients in the stage's trainable
             parameters and none in the frozen backbones
  tokens     what the method declares agrees with what reaches the frozen LLM: StepOutput.tokens_to_llm
             in training, info()["tokens_to_llm"] in generation, input_tokens() = what encode() gives
  costs      the step's FLOPs are counted; batches with equal shape_key() cost equal FLOPs; the cost
             model (`vlp-bench flops`, meta device) runs and sends the same tokens; so does the paper scale
  TASK       each task of experiment.tasks evaluates it on its first validation images
Every finding is one line; `validate` exits 1 when any is a problem.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from vlp_bench.errors import UserError
from vlp_bench.log import say

SAMPLES = 4  # training samples per checked batch: enough for padding and batching, small at any scale
SHAPE_BATCHES = 12  # batches whose shape_key()s are compared: equal keys must mean equal FLOPs
KEY_PAIRS = 2  # pairs of batches with equal keys whose FLOPs are counted and compared
EVAL_SAMPLES = 2  # validation images each task scores (the `limit` of Task.evaluate)


@dataclass
class Finding:
    subject: str  # "config", "plug-ins", "method NAME", "task NAME"
    check: str
    ok: bool
    detail: str


class Findings(list):
    def add(self, subject: str, check: str, ok: bool, detail: str) -> bool:
        self.append(Finding(subject, check, ok, detail))
        return ok

    @contextlib.contextmanager
    def guard(self, subject: str, check: str):
        """A check's unexpected exception is a finding (with the line that raised), not a crash."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - every failure of the code under test is a finding
            self.add(subject, check, False, _why(e))

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self if not f.ok]


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _why(e: BaseException) -> str:
    if isinstance(e, UserError):
        return str(e)
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" (at {frame.filename}:{frame.lineno})" if frame else ""
    return f"{type(e).__name__}: {e}{where}"


def validate(load_config) -> Findings:
    """Run every check; `load_config()` returns the BenchConfig (its UserError is a finding)."""
    from vlp_bench.registry import METHODS, TASKS

    found = Findings()
    for registry in (METHODS, TASKS):
        registry.names()
        for why in registry.problems:
            found.add("plug-ins", "load", False, why)
    if not found.problems:
        plugins = [f"{n} ({r.origin(n)})" for r in (METHODS, TASKS) for n in r.names() if r.origin(n) != "built-in"]
        found.add("plug-ins", "load", True, ", ".join(plugins) + " loaded" if plugins else "none installed")
    try:
        cfg = load_config()
    except UserError as e:
        found.add("config", "resolves", False, str(e))
        return found
    found.add("config", "resolves", True, f"methods {', '.join(cfg.experiment.methods)}; "
                                         f"tasks {', '.join(cfg.experiment.tasks)}")
    from vlp_bench.experiment import prepare

    try:
        say("data and frozen backbones")
        experiment = prepare(cfg)  # the tasks are built here too: their problems are the config's
    except UserError as e:
        found.add("config", "data and backbones", False, str(e))
        return found
    found.add("config", "data and backbones", True, f"data {experiment.root}; vision {cfg.vision.name} "
                                                   f"({experiment.backbones.vision.num_tokens} tokens), llm {cfg.llm.name}")
    small = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=SAMPLES),
                                data=dataclasses.replace(cfg.data, workers=0))
    data: list[dict] = []
    with found.guard("config", "training data"):
        batches = dataclasses.replace(experiment, cfg=small).batches(0)
        data = [next(batches) for _ in range(SHAPE_BATCHES)]
    if not data:
        return found
    from vlp_bench import costmodel

    scales = functools.cache(lambda preset: costmodel.scale(preset, cfg))  # meta-device backbones, built once
    for name in cfg.experiment.methods:
        say(f"method {name}")
        check_method(found, cfg, name, experiment.backbones, experiment.device, data, experiment.tasks, scales)
    return found


def check_method(found: Findings, cfg, name: str, backbones, device, data: list[dict], tasks: dict,
                 scales: Callable) -> None:
    from vlp_bench.registry import METHODS

    subject = f"method {name}"
    cls = METHODS.get(name)
    method = None
    with found.guard(subject, "fits"):
        try:
            cls.check(cfg.methods[name], backbones)
        except ValueError as e:
            found.add(subject, "fits", False, f"check(): {e}")
            return
        torch.manual_seed(0)
        method = cls(cfg.methods[name], backbones).to(device)
        trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
        found.add(subject, "fits", trainable > 0, f"builds, {trainable:,} trainable parameters" if trainable
                  else "builds, but has no trainable parameter")
    if method is None:
        return
    batch = _to(data[0], device)
    sent = {}
    for stage in method.stages(cfg.train.steps):
        with found.guard(subject, f"stage {stage.name}"):
            sent[stage.name] = _check_stage(found, subject, method, batch, stage)
    with found.guard(subject, "tokens"):
        _check_tokens(found, subject, method, batch, sent)
    with found.guard(subject, "costs"):
        _check_costs(found, subject, cfg, name, method, data, device, sent, scales)
    method.eval()
    for task_name, task in tasks.items():
        with found.guard(subject, task_name):
            metrics, samples = task.evaluate(method, "val", EVAL_SAMPLES)
            found.add(subject, task_name, True, f"evaluates: {len(samples)} validation samples scored "
                                                f"({', '.join(k for k in metrics if k not in ('split', 'images'))})")


def _check_stage(found: Findings, subject: str, method, batch: dict, stage) -> tuple[int, int | None]:
    """One forward and backward; -> (tokens the step declares, visual positions the LLM was given)."""
    method.train()
    method.zero_grad(set_to_none=True)
    check = f"stage {stage.name}"
    params = method.trainable_parameters(stage)
    with llm_inputs(method.llm) as calls:
        out = method.training_loss(batch, stage)
    loss = out.loss
    if not (torch.is_tensor(loss) and loss.ndim == 0 and loss.requires_grad and math.isfinite(loss.item())):
        found.add(subject, check, False, f"the loss must be a finite scalar that needs a gradient, got {loss!r}")
        return out.tokens_to_llm, (calls[0] if calls else None)
    loss.backward()
    mine = {id(p) for p in params}
    frozen = [n for n, p in method.named_parameters() if p.grad is not None and id(p) not in mine]
    reached = [p for p in params if p.grad is not None and p.grad.abs().sum() > 0]
    if frozen:
        found.add(subject, check, False, f"gradients reach parameters this stage does not train: {frozen[:3]}")
    elif not reached:
        found.add(subject, check, False, f"none of its {len(params)} trainable tensors gets a gradient")
    else:
        found.add(subject, check, True, f"loss {loss.item():.4g}; gradients in {len(reached)} of {len(params)} "
                                        f"trainable tensors, none elsewhere")
    method.zero_grad(set_to_none=True)
    return out.tokens_to_llm, (calls[0] if calls else None)


def _check_tokens(found: Findings, subject: str, method, batch: dict, sent: dict) -> None:
    from vlp_bench.method import FrozenLLMMethod
    from vlp_bench.nn.generation import CAPTION_PROMPT, DecodingConfig

    lines, bad = [], []
    for stage, (declared, measured) in sent.items():
        if measured is None:
            lines.append(f"{stage}: the frozen LLM is not called")
        elif declared != measured:
            bad.append(f"{stage}: StepOutput.tokens_to_llm says {declared} but {measured} reach the LLM")
        else:
            lines.append(f"{stage}: {measured}")
    method.eval()
    images = batch["images"][:1]
    if isinstance(method, FrozenLLMMethod):
        declared, got = type(method).input_tokens(method.cfg, method.vision), method.encode(images).shape[1]
        if declared != got:
            bad.append(f"input_tokens() says {declared} but encode() gives {got}")
    with llm_inputs(method.llm) as calls:
        method.generate(images, [CAPTION_PROMPT], DecodingConfig(num_beams=1, max_new_tokens=2, min_new_tokens=1))
    declared = method.info().get("tokens_to_llm")
    if calls and declared is not None and declared != calls[0]:
        bad.append(f'info()["tokens_to_llm"] says {declared} but {calls[0]} reach the LLM in generation')
    elif calls:
        lines.append(f"generation: {calls[0]}" + ("" if declared is not None else ' (info() declares none)'))
    found.add(subject, "tokens", not bad, "; ".join(bad) if bad else "to the LLM, " + "; ".join(lines))


def _check_costs(found: Findings, subject: str, cfg, name: str, method, data: list[dict], device, sent: dict,
                 scales: Callable) -> None:
    from vlp_bench import costmodel
    from vlp_bench.train.flops import count_step

    method.train()
    stages = method.stages(cfg.train.steps)
    stage = stages[-1]
    flops = count_step(method, _to(data[0], device), stage, contextlib.nullcontext())[0].by_part
    total = sum(v for passes in flops.values() for v in passes.values())
    notes = [f"{total / SAMPLES / 1e9:.4g} GFLOP/sample counted" + (f" ({stage.name})" if len(stages) > 1 else "")]
    compared = 0
    for st in stages:
        groups: dict = {}
        for batch in data:
            key = method.shape_key(_to(batch, device), st)
            if key is None:
                break
            groups.setdefault((st.name, key), []).append(batch)
        for key, pair in [(key, g[:2]) for key, g in groups.items() if len(g) > 1][:KEY_PAIRS]:
            # batches the trainer would cost with one count must cost the same
            a, b = (count_step(method, _to(x, device), st, contextlib.nullcontext())[0].by_part for x in pair)
            if a != b:
                found.add(subject, "costs", False, f"shape_key() {key[1]!r} is equal for batches whose FLOPs differ "
                                                   f"({st.name}): the trainer would reuse a wrong count (make the "
                                                   f"key finer, or None)")
                return
            compared += 1
    notes.append("shape_key() None: every step counted" if key is None else
                 f"shape_key(): {compared} pairs of batches with equal keys, equal FLOPs" if compared else
                 f"shape_key(): no two of {len(data)} batches share a key, not compared")
    table = costmodel.per_sample_costs(scales("tiny"), [name])[name]
    declared = sent.get(stage.name, (None, None))[0]
    tiny = cfg.vision.name == "tiny" and cfg.llm.name == "tiny"  # the cost model's "tiny" scale is these
    if tiny and declared is not None and table["tokens_to_llm"] != declared:
        found.add(subject, "costs", False, f"on the meta device (the cost model) the step sends "
                                           f"{table['tokens_to_llm']} tokens to the LLM, on {device} {declared}")
        return
    if type(method).paper_config is None:
        notes.append("the cost model runs (no paper_config: not costed at paper scale)")
    else:  # a method the paper-scale backbones cannot run is listed as skipped in flops-paper.json, as here
        skipped = costmodel.costable_table(scales("paper"), [name])["skipped"]
        notes.append(f"the cost model runs; paper scale: {skipped[name]}" if name in skipped
                     else "the cost model runs, at tiny and paper scale")
    found.add(subject, "costs", True, "; ".join(notes))


@contextlib.contextmanager
def llm_inputs(llm: torch.nn.Module):
    """The visual positions of each call of the frozen LLM: the length of the sequence it is given
    minus the text positions embedded by its own embedding table since the previous call (a call
    with token ids alone has none). Yields the list, filled as the calls happen."""
    calls: list[int] = []
    text = [0]

    def on_embed(module, args, output):
        text[0] += output.shape[1] if output.dim() == 3 else output.shape[0]

    def on_call(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None and len(args) > 0 and torch.is_tensor(args[0]) and args[0].is_floating_point():
            embeds = args[0]
        calls.append(embeds.shape[1] - text[0] if embeds is not None else 0)
        text[0] = 0

    handles = [llm.get_input_embeddings().register_forward_hook(on_embed),
               llm.register_forward_pre_hook(on_call, with_kwargs=True)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def format_findings(found: Findings) -> str:
    from vlp_bench.log import text_table

    rows = [[f.subject, f.check, "ok" if f.ok else "PROBLEM", f.detail] for f in found]
    n = len(found.problems)
    return text_table(["subject", "check", "", "detail"], rows, left=4) + "\n" + (
        f"validate: {n} problem{'s' * (n != 1)}" if n else "validate: no problems")
