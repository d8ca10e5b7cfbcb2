"""`vlp-bench bench`: what one training step of each method costs on this device at a named scale
(vlp_bench.costmodel: tiny, vitl-1b, paper), so a user can size a job before paying for it.

Each method runs on its own backbones at the scale (paper: the text-side family on the FLM paper's
CLIP ViT-B/32 and RoBERTa-base, the others on EVA ViT-g and OPT-2.7B; costmodel.Scale.setting), built
only when a method needs them; each row names them (`backbones`).
No data and no downloads: the backbones get random weights (frozen; bf16 on a GPU, as in a run),
the images are one random tensor already on the device and the captions have the scale's length,
so the figures are the model's alone. Each stage of each method is trained by the run's own
trainer (vlp_bench.train.trainer.train) for `warmup + steps` steps; the trainer synchronises the device
around each step, leaves the first `warmup` out and reports medians; FLOPs are counted once per
shape, off the clock, as in a run. Per stage: median step time, samples/s, achieved TFLOP/s, MFU
(CUDA: against the device's dense bf16 peak, or train.peak_tflops) and peak memory.
`--set train.compile=inductor` times the steps with torch.compile'd blocks (compiling happens in
the warm-up steps).
"""

from __future__ import annotations

import dataclasses
import platform

import torch

from vlp_bench import costmodel
from vlp_bench.errors import UserError
from vlp_bench.method import Stage
from vlp_bench.log import say, text_table
from vlp_bench.registry import METHODS
from vlp_bench.results import MetricsLog
from vlp_bench.train.flops import UNIT
from vlp_bench.train.measure import peak_flops_per_s, peak_memory_bytes, reset_peak_memory
from vlp_bench.train.trainer import train


class SyntheticBatches:
    """Endless identical batches: one random image tensor on the device, captions of `words`
    words (LengthTokenizer: one token each). The trainer's `.to(device)` is then a no-op, so no
    data loading is timed."""

    def __init__(self, batch_size: int, image_size: int, words: int, prompt: str, device: torch.device,
                 frames: int = 0):
        g = torch.Generator().manual_seed(0)
        clip = (frames,) if frames else ()  # clips of `frames` frames for a video experiment
        self.batch = {"images": torch.randn(batch_size, *clip, 3, image_size, image_size, generator=g).to(device),
                      "captions": [" ".join(["w"] * words)] * batch_size, "prompt": prompt,
                      "image_ids": list(range(batch_size))}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return dict(self.batch)


def bench(cfg, preset: str, names: list[str], device: torch.device, batch_size: int, steps: int, warmup: int) -> dict:
    """{preset, device, ..., rows: [one per (method, stage)]} measured on `device`."""
    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    if batch_size < 2:
        raise UserError(f"--batch-size must be >= 2 (BLIP-2's in-batch negatives need two), got {batch_size}")
    configs = costmodel.method_configs(preset, cfg)
    for name in names:  # before building the backbones, which takes a while at the larger scales
        if name not in configs:
            raise UserError(f"method '{name}' has no {preset}-scale config (set `paper_config` in its file)")
    say(f"{preset} backbones with random weights on {device}")
    scale = costmodel.scale(preset, cfg, device)
    tcfg = dataclasses.replace(cfg.train, steps=warmup + steps, batch_size=batch_size, grad_accum=1, eval_every=0,
                               checkpoint_every=0, warmup_exclude=warmup, count_flops=True, log_every=10**9)
    rows = []
    for name in names:
        cls, s = METHODS.get(name), scale.setting(name)  # the method's own backbones at this scale
        mcfg = s.method_configs[name]
        try:
            cls.check(mcfg, s.backbones)
        except ValueError as e:
            raise UserError(f"methods.{name} at {preset} scale: {e}") from None
        torch.manual_seed(0)
        method = cls(mcfg, s.backbones).to(device)
        batches = SyntheticBatches(batch_size, s.image_size, s.caption_words, s.prompt, device, s.frames)
        for stage in method.stages(warmup + steps):  # each stage on its own, for as many steps
            say(f"{name}: stage {stage.name}, {warmup} + {steps} steps of {batch_size}")
            memory_kind = reset_peak_memory(device)
            cost = train(method, batches, tcfg, device, MetricsLog(None),
                         stages=[Stage(stage.name, warmup + steps)])
            achieved = cost["achieved_flops_per_s"]
            rows.append({"method": name, "stage": stage.name, "backbones": scale.label(name),
                         "image_size": s.image_size, "vision_tokens": s.backbones.vision.num_tokens,
                         "caption_tokens": s.caption_words + 1, "tokens_to_llm": cost["tokens_to_llm"],
                         "median_step_s": cost["median_step_s"], "samples_per_s": cost["samples_per_s"],
                         "flops_per_sample": cost["train_flops_per_sample"], "achieved_flops_per_s": achieved,
                         "mfu": cost["mfu"], "peak_memory_bytes": peak_memory_bytes(device),
                         "peak_memory_kind": memory_kind, "trainable_params": cost["trainable_params"]})
        del method
        if device.type == "cuda":
            torch.cuda.empty_cache()
    first = scale.setting(names[0]) if names else scale  # top-level sizes: the first method's (rows: each one's)
    return {"preset": preset, "unit": UNIT, "batch_size": batch_size, "steps": steps,
            "warmup": warmup, "image_size": first.image_size, "vision_tokens": first.backbones.vision.num_tokens,
            "caption_tokens": first.caption_words + 1, "backbones_differ": len({r["backbones"] for r in rows}) > 1,
            "device": _device_name(device),
            "torch": torch.__version__, "peak_flops_per_s": peak_flops_per_s(device, tcfg), "compile": tcfg.compile,
            "rows": rows}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def format_table(table: dict) -> str:
    mixed = table.get("backbones_differ")
    header = ["method", "stage", *(["backbones"] if mixed else []), "tokens->LLM", "step ms", "samples/s",
              "GFLOP/sample", "TFLOP/s", "MFU", "peak mem GiB"]
    rows = []
    for r in table["rows"]:
        tflops = r["achieved_flops_per_s"]
        rows.append([r["method"], r["stage"], *([r["backbones"]] if mixed else []), str(r["tokens_to_llm"]),
                     f"{r['median_step_s'] * 1e3:.1f}", f"{r['samples_per_s']:.1f}",
                     f"{r['flops_per_sample'] / 1e9:.4g}",
                     "-" if tflops is None else f"{tflops / 1e12:.2f}",
                     "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%", f"{r['peak_memory_bytes'] / 2**30:.2f}"])
    inputs = ("backbones, vision tokens and captions per method (JSON: each row's)" if mixed else
              f"{table['rows'][0]['backbones'] + ', ' if table['rows'] else ''}{table['vision_tokens']} vision "
              f"tokens, captions of {table['caption_tokens']} tokens")
    title = (f"{table['preset']} scale on {table['device']} (torch {table['torch']}): batch {table['batch_size']}, "
             f"median of {table['steps']} steps after {table['warmup']} warm-up; {inputs}; FLOPs: {table['unit']}"
             f"{'; blocks compiled (' + table['compile'] + ')' if table.get('compile') else ''}")
    return "\n".join([title, text_table(header, rows, left=2)])
