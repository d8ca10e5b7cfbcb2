"""Image-caption data in the COCO caption format, read the same way for the tiny world and real COCO.

A data root has this layout (the tiny world writes exactly this; real COCO Karpathy splits can be
laid out the same way or pointed at with links):

    images/                            image files; `file_name` in the annotations is relative to it
    annotations/captions_{split}.json  COCO caption annotations (images + annotations lists)
    vqa/questions_{split}.json         VQAv2 questions            (optional)
    vqa/annotations_{split}.json       VQAv2 annotations          (optional)
    msrvtt/                            MSR-VTT-style clips        (optional; vlp_bench/data/video.py)
"""

from __future__ import annotations

import collections
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlp_bench.errors import UserError, from_worker


@dataclass
class DataConfig:
    root: str = ""  # "" = the embedded tiny world built from [world]; else a directory laid out as above
    # training data as tar shards (vlp_bench/data/shards.py): a directory, a glob or "dir/x-{000000..000099}.tar";
    # "" = the root's train split. Evaluation always reads the root's val/test splits.
    shards: str = ""
    workers: int = 2  # image-decoding processes per rank (0 = in the training process): decoding overlaps the step
    shuffle_buffer: int = 1000  # samples shuffled together while streaming shards (WebDataset's usual size)
    frames: int = 4  # frames read per clip by video tasks (vlp_bench/data/video.py); the paper's 4
    # keep the frozen encoder's tokens of each training image after its first visit (vlp_bench/train/features.py):
    # later epochs skip the vision forward; results give the costs with and without it. Off: the papers'
    # methods run the encoder on every step, and the cache holds a whole split's tokens in device memory
    feature_cache: bool = False
    # train on the first share of the root's train split (its images in id order; the tiny world's are in
    # random order): a training-set-size sweep on the same world, backbones and test split. 1.0 = all
    train_fraction: float = 1.0

    def validate(self) -> None:
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.train_fraction < 1 and self.shards:
            raise ValueError("train_fraction takes a share of the root's train split; shards stream their own samples")
        if self.workers < 0 or self.shuffle_buffer < 1:
            raise ValueError(f"workers must be >= 0 and shuffle_buffer >= 1, got {self.workers}, {self.shuffle_buffer}")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")


def check_global_batch(batch_size: int, world: int) -> None:
    """train.batch_size is the global batch: each of `world` processes takes an equal slice."""
    if batch_size % world:
        raise UserError(f"train.batch_size {batch_size} is the global batch: it must divide evenly over "
                        f"the {world} processes")


class CaptionSplit:
    """One split: its images (id, file) and their reference captions."""

    source = "coco"  # the layout, for results.json

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
                return self.from_image(im)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read image {path}: {e}") from None

    def from_image(self, im: Image.Image) -> torch.Tensor:
        im = im.convert("RGB")
        if im.size != (self.size, self.size):
            im = im.resize((self.size, self.size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0
        return (torch.from_numpy(arr).permute(2, 0, 1) - self.mean) / self.std

    def batch(self, paths) -> torch.Tensor:
        return torch.stack([self(p) for p in paths])


class TrainBatches:
    """Endless shuffled batches of (image, one of its captions drawn at random), fully seeded.

    An epoch visits the images in a fresh random order; the ragged last batch is dropped. The
    sampling position is part of `state_dict()`, so a resumed run sees exactly the batches an
    uninterrupted one would. `extra` is added to every batch (e.g. the training prompt).

    The draws are made here, in order; with `workers` > 0 the images are decoded ahead by that
    many DataLoader processes (into pinned memory with `pin_memory`), so decoding overlaps the
    training step. The batches do not depend on `workers`.

    Data-parallel (vlp_bench.train.dist): every rank draws the same global batch of `batch_size` and
    loads only its `rank`-th of `world` equal slices, so the job trains on what one process would."""

    def __init__(self, split: CaptionSplit, loader: ImageLoader, batch_size: int, seed: int,
                 extra: dict | None = None, rank: int = 0, world: int = 1, workers: int = 0,
                 pin_memory: bool = False):
        if batch_size > len(split):
            raise UserError(f"batch size {batch_size} exceeds the {len(split)} images of split '{split.split}'")
        check_global_batch(batch_size, world)
        self.split, self.loader, self.batch_size, self.extra = split, loader, batch_size, extra or {}
        self.slice = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
        self.workers, self.pin = workers, pin_memory
        self.g = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.pos = 0
        self._state = self._snapshot()  # the position after the last batch handed out
        self._pending: collections.deque = collections.deque()  # drawn, not yet handed out
        self._images = None

    def __iter__(self):
        return self

    def _draw(self) -> list[int]:
        """The next batch's image ids (this rank's slice); its captions and the position after it
        wait in _pending until the batch is handed out."""
        ids, bs = self.split.image_ids, self.batch_size
        if not self.order or self.pos + bs > len(ids):  # a new epoch
            self.order = torch.randperm(len(ids), generator=self.g).tolist()
            self.pos = 0
        chosen = [ids[i] for i in self.order[self.pos : self.pos + bs]]
        self.pos += bs
        picks = torch.randint(0, 1 << 30, (bs,), generator=self.g).tolist()
        chosen, picks = chosen[self.slice], picks[self.slice]
        captions = [self.split.refs[i][p % len(self.split.refs[i])] for i, p in zip(chosen, picks)]
        self._pending.append((chosen, captions, self._snapshot()))
        return chosen

    def _snapshot(self) -> tuple:
        return self.g.get_state(), self.order, self.pos  # order is replaced, never changed, at each epoch

    @staticmethod
    def _plan(ref: weakref.ref):
        """The DataLoader's batch sampler: draws made by the TrainBatches it belongs to. A weak
        reference, so dropping the TrainBatches drops its loader (and workers) at once, rather
        than when the garbage collector breaks a cycle (10 s of worker shutdown, measured)."""
        while (owner := ref()) is not None:
            ids = owner._draw()
            del owner
            yield ids

    def __next__(self) -> dict:
        if self.workers == 0:
            chosen = self._draw()
            images = self.loader.batch([self.split.image_path(i) for i in chosen])
        else:
            if self._images is None:  # worker seeds from a private generator: the global random
                # stream's draws (dropout masks) must not depend on when a loader starts (a resume)
                self._images = iter(torch.utils.data.DataLoader(
                    _Images(self.split, self.loader), batch_sampler=self._plan(weakref.ref(self)), num_workers=self.workers,
                    collate_fn=torch.stack, pin_memory=self.pin, prefetch_factor=2,
                    generator=torch.Generator().manual_seed(0)))
            try:
                images = next(self._images)
            except UserError as e:
                raise from_worker(e) from None
        chosen, captions, self._state = self._pending.popleft()
        return {**self.extra, "image_ids": chosen, "images": images, "captions": captions}

    def state_dict(self) -> dict:
        g, order, pos = self._state
        return {"generator": g, "order": torch.tensor(order, dtype=torch.long), "pos": pos}

    def load_state_dict(self, state: dict) -> None:
        self.g.set_state(state["generator"])
        self.order, self.pos = state["order"].tolist(), int(state["pos"])
        self._state, self._images = self._snapshot(), None  # draws made ahead are dropped
        self._pending.clear()

    def report(self) -> dict:
        """For results.json: where the training data came from."""
        return {"source": self.split.source, "annotations": str(self.split.ann_path), "images": len(self.split)}


class _Images(torch.utils.data.Dataset):
    """Image id -> decoded image: what TrainBatches' workers do."""

    def __init__(self, split: CaptionSplit, loader: ImageLoader):
        self.split, self.loader = split, loader

    def __getitem__(self, image_id: int) -> torch.Tensor:
        return self.loader(self.split.image_path(image_id))
