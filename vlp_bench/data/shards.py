"""Web-scale image-text training data as tar shards in the WebDataset layout, streamed.

A shard is a plain tar file; a sample is the files that share a key (the name up to its first
dot): an image (`.jpg`, `.jpeg`, `.png`, `.webp`) and its text, either `.txt` (one caption, as
CC3M/LAION shards hold) or `.json` with "caption" (a string) or "captions" (a list: one is drawn
per visit). `data.shards` names the shards as a directory, a glob (`dir/*.tar`) or a brace range
(`dir/train-{000000..000099}.tar`); `vlp-bench export-shards` writes any COCO-layout split (the
tiny world's included) this way, so the path is tested without downloads.

Streaming: each (rank, worker) reads every (ranks x workers)-th shard of an epoch's shuffled
order, samples pass through a seeded shuffle buffer, and each rank's data-loading workers
(torch DataLoader, pinned memory on a GPU) decode the images. As in any sharded stream, which
reader reads which shard depends on the number of readers (ranks x data.workers), and so does the
order of the samples; for a given number, every batch is a function of (seed, batches drawn
before it), so a resumed run re-reads the stream to where it stopped and continues with the very
batches an uninterrupted run would have seen.

Bad samples are never silently dropped: an image that does not decode, a sample without an image
or a caption, a text that is not valid, and the rest of a truncated shard are counted by reason,
skipped, and reported in the run's results.json (`data.skipped`).
"""

from __future__ import annotations

import glob
import io
import json
import random
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vlp_bench.data.images import CaptionSplit, ImageLoader, check_global_batch
from vlp_bench.errors import UserError, from_worker
from vlp_bench.files import atomic_file

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def shard_paths(spec: str) -> list[Path]:
    """The shard files `spec` names (sorted); a clear error when there are none or one is missing."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo)
        paths = [Path(spec[: m.start()] + str(i).zfill(width) + spec[m.end():]) for i in range(int(lo), int(hi) + 1)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"data.shards: {len(missing)} of {len(paths)} shards not found, e.g. {missing[0]}")
    elif Path(spec).is_dir():
        paths = sorted(Path(spec).glob("*.tar"))
    else:
        paths = sorted(Path(p) for p in glob.glob(spec))
    if not paths:
        raise UserError(f"data.shards: no .tar shards found at '{spec}'")
    return paths


def _text(name: str, data: bytes) -> list[str] | None:
    """The captions a sample's text file holds, or None when it holds none."""
    try:
        if name.endswith(".txt"):
            caption = data.decode("utf-8").strip()
            return [caption] if caption else None
        obj = json.loads(data)
        captions = obj.get("captions", [obj.get("caption")]) if isinstance(obj, dict) else None
        captions = [c.strip() for c in captions or [] if isinstance(c, str) and c.strip()]
        return captions or None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def read_shard(path: Path, skipped: Counter):
    """(key, image bytes, image name, captions) for each complete sample of one shard, in order;
    incomplete or broken ones are counted in `skipped` by reason."""
    current, parts = None, {}

    def finish():
        if current is None:
            return None
        image = next(((n, d) for n, d in parts.items() if n.lower().endswith(IMAGE_EXTS)), None)
        texts = [(n, d) for n, d in parts.items() if n.endswith((".txt", ".json"))]
        if image is None:
            skipped["no_image"] += 1
            return None
        captions = next((c for c in (_text(n, d) for n, d in texts) if c), None)
        if captions is None:
            skipped["no_caption" if not texts else "bad_caption"] += 1
            return None
        return current, image[1], image[0], captions

    try:
        with tarfile.open(path, "r|*") as tar:  # a stream: shards are read once, front to back
            for member in tar:
                if not member.isfile():
                    continue
                name = Path(member.name).name
                key = str(Path(member.name).parent / name.split(".", 1)[0])
                if key != current:
                    sample = finish()
                    if sample is not None:
                        yield sample
                    current, parts = key, {}
                parts[name[len(Path(key).name):]] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError):
        skipped["truncated_shard"] += 1  # the samples before the break were read; the rest is lost
        return
    sample = finish()
    if sample is not None:
        yield sample


@dataclass
class StreamConfig:
    paths: list[Path]
    batch_size: int  # this rank's micro-batch
    seed: int
    rank: int
    world: int
    shuffle_buffer: int


def _stream(cfg: StreamConfig, worker: int, workers: int, skipped: Counter):
    """Endless samples for one (rank, worker): its shards of each epoch's order, through a seeded
    shuffle buffer."""
    slots = cfg.world * workers
    slot = cfg.rank * workers + worker
    rng = random.Random(f"{cfg.seed}/{slot}")
    buffer: list = []
    epoch = 0
    while True:
        order = list(cfg.paths)
        random.Random(f"{cfg.seed}/epoch{epoch}").shuffle(order)  # the same order on every reader
        got = 0
        for path in order[slot::slots]:
            for sample in read_shard(path, skipped):
                got += 1
                if len(buffer) < cfg.shuffle_buffer:
                    buffer.append(sample)
                    continue
                i = rng.randrange(len(buffer))
                buffer[i], sample = sample, buffer[i]
                yield sample
        if not got and not buffer:
            raise UserError(f"data.shards: reader {slot} found no readable sample in its shards")
        epoch += 1


class ShardDataset(torch.utils.data.IterableDataset):
    """Batches of one rank from its shards: {"images", "captions", "keys", "skipped"}, starting
    after the first `skip` batches of the stream (where a resumed run starts)."""

    def __init__(self, cfg: StreamConfig, loader: ImageLoader, skip: int = 0):
        self.cfg, self.loader, self.skip = cfg, loader, skip

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes batches from its workers in turn, starting with worker 0; batch b of
        # the stream is reader b % workers's, so after `skip` batches worker w plays reader
        # (w + skip) % workers, which first re-draws the batches that reader had already given.
        reader = (worker + self.skip) % workers
        to_skip = len(range(reader, self.skip, workers))
        skipped: Counter = Counter()
        samples = _stream(self.cfg, reader, workers, skipped)
        rng = random.Random(f"{self.cfg.seed}/captions/{self.cfg.rank}/{reader}")
        drawn = 0
        while True:
            batch = []
            while len(batch) < self.cfg.batch_size:
                key, data, name, captions = next(samples)
                caption = captions[rng.randrange(len(captions))]
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        image = self.loader.from_image(im)
                except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
                    skipped["bad_image"] += 1
                    continue
                batch.append((key, image, caption))
            drawn += 1
            if drawn <= to_skip:  # re-drawn exactly as before (bad images included); its counts
                skipped.clear()  # are already in the resumed state
                continue
            yield {"images": torch.stack([b[1] for b in batch]), "captions": [b[2] for b in batch],
                   "keys": [b[0] for b in batch], "skipped": dict(skipped)}
            skipped.clear()


class ShardBatches:
    """The trainer's batch source for shards (the counterpart of data.TrainBatches): endless
    batches of this rank's slice of the global batch; `skipped` counts bad samples by reason."""

    def __init__(self, spec: str, loader: ImageLoader, batch_size: int, seed: int, extra: dict | None = None,
                 rank: int = 0, world: int = 1, workers: int = 2, shuffle_buffer: int = 1000, pin_memory: bool = False):
        check_global_batch(batch_size, world)
        self.cfg = StreamConfig(shard_paths(spec), batch_size // world, seed, rank, world, shuffle_buffer)
        readers = world * max(workers, 1)
        if len(self.cfg.paths) < readers:
            raise UserError(f"data.shards: {len(self.cfg.paths)} shards for {world} processes x {max(workers, 1)} "
                            f"data.workers; each reader needs at least one shard (more shards, or fewer workers)")
        self.loader, self.extra, self.workers, self.pin = loader, extra or {}, workers, pin_memory
        self.drawn = 0
        self.skipped: Counter = Counter()
        self._it = None

    def _start(self):
        data = ShardDataset(self.cfg, self.loader, skip=self.drawn)
        self._it = iter(torch.utils.data.DataLoader(
            data, batch_size=None, num_workers=self.workers, pin_memory=self.pin,
            persistent_workers=False, prefetch_factor=4 if self.workers else None,
            generator=torch.Generator().manual_seed(0)))  # worker seeds apart from the global random stream

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except UserError as e:
            raise from_worker(e) from None
        self.drawn += 1
        self.skipped.update(batch.pop("skipped"))
        return {**self.extra, **batch}

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.drawn, self.skipped = int(state["drawn"]), Counter(state["skipped"])
        self._it = None  # restarts the stream at `drawn`

    def report(self) -> dict:
        """For results.json: where the data came from and what was skipped, by reason."""
        return {"source": "shards", "shards": len(self.cfg.paths), "batches_drawn": self.drawn,
                "skipped": dict(self.skipped)}


def export_shards(split: CaptionSplit, out: Path, shard_size: int, progress=None) -> list[Path]:
    """Write a COCO-layout split as tar shards of `shard_size` samples: per image, its file as is
    and a .json {"image_id", "captions"}. Returns the shard paths."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    ids = split.image_ids
    paths = []
    for start in range(0, len(ids), shard_size):
        path = out / f"{split.split}-{start // shard_size:06d}.tar"
        with atomic_file(path) as tmp, tarfile.open(tmp, "w") as tar:
            for image_id in ids[start: start + shard_size]:
                src = split.image_path(image_id)
                if not src.is_file():
                    raise UserError(f"image not found: {src}")
                key = f"{image_id:012d}"
                tar.add(src, arcname=key + src.suffix.lower())
                meta = json.dumps({"image_id": image_id, "captions": split.refs[image_id]}).encode()
                info = tarfile.TarInfo(key + ".json")
                info.size = len(meta)
                tar.addfile(info, io.BytesIO(meta))
        paths.append(path)
        if progress:
            progress(len(paths), -(-len(ids) // shard_size))
    return paths
