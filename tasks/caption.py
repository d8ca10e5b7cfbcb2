"""Image captioning: beam search through the method's generation path, scored corpus-level with
the official coco-caption pipeline (vlp_bench.metrics.caption), plus the trivial floor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlp_bench.metrics.caption import floor_scores, score_captions
from vlp_bench.data.images import CaptionSplit
from vlp_bench.method import DecodingConfig, Method
from vlp_bench.registry import TASKS
from vlp_bench.task import Task


@dataclass
class CaptionConfig(DecodingConfig):
    split: str = "test"  # the Karpathy-style test split is what papers report
    spice: bool = False  # SPICE needs a Stanford CoreNLP download: off by default


@TASKS.register("caption")
class Captioning(Task):
    """Image captioning, official coco-caption metrics (BLEU, METEOR, ROUGE-L, CIDEr) and floor."""

    Config = CaptionConfig
    Split: ClassVar[type] = CaptionSplit  # reads a split's samples and references (VideoSplit for clips)
    primary = "CIDEr"
    token_pictures = True  # the report shows its captions beside what merging did to the image

    def __init__(self, cfg: CaptionConfig, data_root, images):
        super().__init__(cfg, data_root, images)
        self._floors: dict[tuple, dict] = {}  # the floor depends on the data only: score it once

    @classmethod
    def check(cls, cfg: CaptionConfig, data_root) -> None:
        for split in ("train", "val", cfg.split):  # train: the floor; val: evaluations during training
            cls.Split(data_root, split)

    def floor(self, split, ids: list[int]) -> dict:
        key = (split.split, tuple(ids))
        if key not in self._floors:
            train_refs = self.Split(self.root, "train").refs
            self._floors[key] = floor_scores(train_refs, {i: split.refs[i] for i in ids}, spice=self.cfg.spice)
        return self._floors[key]

    def subsets(self, data, ids: list[int]) -> dict[str, list[int]]:
        """Groups of the evaluated samples scored on their own as well (none for images)."""
        return {}

    def extra_metrics(self, data, samples: list[dict]) -> dict:
        """Task-specific metrics of the generated samples, added to the official ones (none here)."""
        return {}

    def sample(self, data, i: int, caption: str) -> dict:
        """One line of samples_<task>.jsonl."""
        return {"image_id": i, "caption": caption, "references": data.refs[i]}

    def evaluate(self, method: Method, split: str, limit: int | None = None) -> tuple[dict, list[dict]]:
        data = self.Split(self.root, split)
        ids = data.image_ids[:limit] if limit else data.image_ids
        device = next(method.parameters()).device

        def generate(chunk: list[int]) -> list[str]:
            images = self.images.batch([data.image_path(i) for i in chunk]).to(device)
            return method.generate(images, [self.cfg.prompt] * len(chunk), self.cfg)

        cands = self.decode(ids, generate)
        if cands is None:
            return {}, []  # under torchrun: this rank decoded its share, rank zero scores them all
        refs = {i: data.refs[i] for i in ids}
        metrics = score_captions(refs, cands, spice=self.cfg.spice, subsets=self.subsets(data, ids))
        metrics["floor"] = self.floor(data, ids)
        metrics["split"], metrics["images"] = split, len(ids)
        samples = [self.sample(data, i, cands[i]) for i in ids]
        metrics.update(self.extra_metrics(data, samples))
        return metrics, samples
