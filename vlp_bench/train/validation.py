"""The cheap, frequent validation signal: the teacher-forced loss of a fixed set of validation
captions under each method's generation path (`Method.generation_loss`), the weights as they stand.

It is comparable across methods because every method is scored on the same captions by the model
that generates its answers (the frozen LLM behind the bridge; the text-side family's decoder), and
cheap because it is one forward pass, no decoding: the trainer reads it at every `log_every` row,
off the training clock, where the generation metrics come only every `eval_every` steps. A method
whose generation path needs a phase before it exists (the text-side family's decoder fine-tuning)
is read at the evaluations instead, after that phase; a stage with no generation path yet (BLIP-2's
stage 1, where the LLM projection is untrained) gives no point.

Reading it changes nothing in the run: eval mode (no dropout), no gradients, and a forked random
stream, so a run with it ends exactly as a run without it. Rank zero's alone, collectives off.
"""

from __future__ import annotations

import contextlib

import torch

from vlp_bench.method import Method, Stage
from vlp_bench.train import dist
from vlp_bench.train.compile import eager


class ValidationLoss:
    """loss(method, stage) -> the mean per-token loss of `batches` (None: no generation path)."""

    def __init__(self, batches: list[dict], device: torch.device, autocast: contextlib.AbstractContextManager):
        self.batches, self.device, self.autocast = batches, device, autocast

    def __bool__(self) -> bool:
        return bool(self.batches)

    def __call__(self, method: Method, stage: Stage) -> float | None:
        if not self.batches:
            return None
        was_training = method.training
        method.eval()
        devices = [torch.cuda.current_device()] if self.device.type == "cuda" else []
        total = weight = 0.0
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices), dist.local(), eager(), self.autocast:
                for batch in self.batches:
                    out = method.generation_loss({**batch, "images": batch["images"].to(self.device)}, stage)
                    if out is None:
                        return None
                    w = float(len(batch["captions"]) if out.weight is None else out.weight)
                    total, weight = total + float(out.loss) * w, weight + w
        finally:
            method.train(was_training)
        return round(total / weight, 6)
