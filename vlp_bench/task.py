"""The interface every task implements: evaluate a trained method on a split of the data."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from vlp_bench.data.images import ImageLoader
from vlp_bench.method import Method


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
        """-> (metrics for results.json, per-sample rows for samples_<task>.jsonl)."""
        raise NotImplementedError
