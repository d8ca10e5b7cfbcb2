"""Image-caption data in the COCO caption format, read the same way for the tiny world and real COCO.

A data root has this layout (the tiny world writes exactly this; real COCO Karpathy splits can be
laid out the same way or pointed at with links):

    images/                            image files; `file_name` in the annotations is relative to it
    annotations/captions_{split}.json  COCO caption annotations (images + annotations lists)
    vqa/questions_{split}.json         VQAv2 questions            (optional)
    vqa/annotations_{split}.json       VQAv2 annotations          (optional)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlp_bench.errors import UserError


@dataclass
class DataConfig:
    root: str = ""  # "" = the embedded tiny world built from [world]; else a directory laid out as above


class CaptionSplit:
    """One split: its images (id, file) and their reference captions."""

    def __init__(self, root: Path, split: str):
        self.root = Path(root)
        self.split = split
        self.ann_path = self.root / "annotations" / f"captions_{split}.json"
        if not self.ann_path.is_file():
            raise UserError(f"caption annotations not found: {self.ann_path}")
        try:
            data = json.loads(self.ann_path.read_text())
            self.files = {int(im["id"]): im["file_name"] for im in data["images"]}
            self.refs: dict[int, list[str]] = {i: [] for i in self.files}
            for ann in data["annotations"]:
                self.refs[int(ann["image_id"])].append(ann["caption"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{self.ann_path}: not a COCO caption annotation file ({type(e).__name__}: {e})") from None
        self.image_ids = sorted(i for i in self.files if self.refs[i])
        if not self.image_ids:
            raise UserError(f"{self.ann_path}: no captioned images")

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: int) -> Path:
        return self.root / "images" / self.files[image_id]


class ImageLoader:
    """Reads an image file into a normalised float tensor at the vision encoder's resolution."""

    def __init__(self, image_size: int, mean, std):
        self.size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (self.size, self.size):
                    im = im.resize((self.size, self.size), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read image {path}: {e}") from None
        return (torch.from_numpy(arr).permute(2, 0, 1) - self.mean) / self.std

    def batch(self, paths) -> torch.Tensor:
        return torch.stack([self(p) for p in paths])


class TrainBatches:
    """Endless shuffled batches of (image, one of its captions drawn at random), fully seeded.

    An epoch visits the images in a fresh random order; the ragged last batch is dropped. The
    sampling position is part of `state_dict()`, so a resumed run sees exactly the batches an
    uninterrupted one would. `extra` is added to every batch (e.g. the training prompt)."""

    def __init__(self, split: CaptionSplit, loader: ImageLoader, batch_size: int, seed: int,
                 extra: dict | None = None):
        if batch_size > len(split):
            raise UserError(f"batch size {batch_size} exceeds the {len(split)} images of split '{split.split}'")
        self.split, self.loader, self.batch_size, self.extra = split, loader, batch_size, extra or {}
        self.g = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.pos = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        ids, bs = self.split.image_ids, self.batch_size
        if not self.order or self.pos + bs > len(ids):  # a new epoch
            self.order = torch.randperm(len(ids), generator=self.g).tolist()
            self.pos = 0
        chosen = [ids[i] for i in self.order[self.pos : self.pos + bs]]
        self.pos += bs
        picks = torch.randint(0, 1 << 30, (bs,), generator=self.g).tolist()
        return {
            **self.extra,
            "image_ids": chosen,
            "images": self.loader.batch([self.split.image_path(i) for i in chosen]),
            "captions": [self.split.refs[i][p % len(self.split.refs[i])] for i, p in zip(chosen, picks)],
        }

    def state_dict(self) -> dict:
        return {"generator": self.g.get_state(), "order": torch.tensor(self.order, dtype=torch.long), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.g.set_state(state["generator"])
        self.order, self.pos = state["order"].tolist(), int(state["pos"])
