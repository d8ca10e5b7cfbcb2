"""The interface every task implements: evaluate a trained method on a split of the data, and, for
a task with a training split to learn from (VQA), the batches of its fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, Iterator

from vlp_bench.data.images import ImageLoader
from vlp_bench.errors import UserError
from vlp_bench.method import Method
from vlp_bench.train import dist


class Task:
    name: ClassVar[str]  # set by the registry
    Config: ClassVar[type]
    # what the task evaluates on, and so what a run that evaluates it trains on: "images" (the
    # COCO layout, vlp_bench.data.images) or "clips" (the MSR-VTT layout, vlp_bench.data.video)
    data: ClassVar[str] = "images"
    primary: ClassVar[str] = ""  # the headline metric (target.metric "" picks the first task's)
    # each run draws which patches each token reaching the LLM holds, on this task's first test
    # images (vlp_bench/nn/token_pictures.py): a task on images in the COCO layout whose samples the
    # report shows; the first such task of an experiment is drawn
    token_pictures: ClassVar[bool] = False

    def __init__(self, cfg, data_root: Path, images: ImageLoader):  # a ClipLoader for "clips"
        self.cfg = cfg
        self.root = Path(data_root)
        self.images = images

    @classmethod
    def check(cls, cfg, data_root: Path) -> None:
        """Raise UserError if the data this task needs is missing (run before any training)."""

    def evaluate(self, method: Method, split: str, limit: int | None = None) -> tuple[dict, list[dict]]:
        """-> (metrics for results.json, per-sample rows for samples_<task>.jsonl). Under torchrun
        every rank calls it: a task that decodes through `decode` shares the work and returns ({},
        []) on the ranks other than zero; one that does not decodes everything on every rank."""
        raise NotImplementedError

    def decode(self, items: list, generate: Callable[[list], list[str]]) -> dict | None:
        """{item: output} of generate(batch) over `items` in batches of the task's batch_size, in
        order; under torchrun each rank generates its share of the batches (the same batches as
        one process: padding and beams unchanged) and rank zero gets them all, the others None."""
        bs = self.cfg.batch_size
        batches = [items[i: i + bs] for i in range(0, len(items), bs)]
        outputs = dist.decode_batches(batches, generate)
        return None if outputs is None else dict(zip(items, outputs))

    def prompt(self, question: str | None = None) -> str:
        """What the method generates after, for one input: the task's configured prompt (its
        DecodingConfig's); a task that asks questions (VQA) puts `question` into it instead."""
        if question is not None:
            raise UserError(f"task '{self.name}' takes no question (a question is for a task like vqa)")
        prompt = getattr(self.cfg, "prompt", None)
        if not isinstance(prompt, str):
            raise UserError(f"task '{self.name}' does not generate text after a prompt")
        return prompt

    def finetune_steps(self, method: Method) -> int:
        """The steps `method` is fine-tuned on this task's training split before each evaluation of
        it (0: evaluated as pre-trained): the task's `finetune_steps` setting, where -1 (its default)
        is the method's own (Method.task_finetune_steps); 0 for a task without that setting."""
        steps = getattr(self.cfg, "finetune_steps", 0)
        return method.task_finetune_steps if steps < 0 else steps

    def protocol(self, method: Method) -> str | None:
        """How `method` meets this task, the label of its figures: "zero-shot" or "fine-tuned (N
        steps)"; None for a task that cannot fine-tune (no `finetune_steps` setting)."""
        if not hasattr(self.cfg, "finetune_steps"):
            return None
        steps = self.finetune_steps(method)
        return f"fine-tuned ({steps} steps)" if steps else "zero-shot"

    def finetune_batches(self, batch_size: int, seed: int, workers: int = 0) -> Iterator[dict]:
        """Endless seeded training batches of this task (a task with a `finetune_steps` setting):
        {"images", "prompt": one per row, "captions": each row's target, ...}."""
        raise NotImplementedError(f"task '{self.name}' has no training split to fine-tune on")
