"""data.feature_cache: the frozen encoder's tokens of each training image computed once, the
first time the image is drawn, and read from memory at every later visit, so that from the second
epoch on a step runs no vision forward.

Only where that changes nothing but cost: a method whose encode() is the frozen, deterministic
default (Method.encode: the ViT under no_grad, frames averaged) and whose training reads it through
`Method.visual_tokens`. A method that changes what the encoder does (ToMe inside the ViT, FLIP's
random masking, simvlg-video's trained temporal modules) is refused (`reason`), and the run says so.
The cached tokens are the very tensors the encoder returned, so a cached run trains exactly what an
uncached one does (tests/test_features.py).

The accounting stays honest both ways. As run: the step clock includes the encoder where it ran
(the first visit of each image) and the FLOP count includes its forward there
(`vision_flops_per_image`, counted once off the clock, times the images encoded). Without the
cache: what an uncached run would have spent, the same figures plus, for each sample served from
the cache, one encoder forward at the measured seconds per image (`encode_s / images_encoded`) and
the counted FLOPs per image. Rows and results carry both (`wall_s_without_cache`,
`flops_without_cache`), and `vlp-bench summary` gives time- and FLOPs-to-target both ways.

Memory: images x tokens x width x bytes, on the training device: the tiny world's 4,000 images
x 65 tokens x 128 x 4 B = 133 MB; COCO's 113k images x 257 x 1,408 (EVA ViT-g) x 2 B = 82 GB,
beyond a GPU (a cache on disk is not built).
"""

from __future__ import annotations

import time

import torch

from vlp_bench.method import Method, Stage
from vlp_bench.train.flops import FlopCount, FlopCounter
from vlp_bench.train.measure import sync


def reason(method: Method) -> str | None:
    """Why `method`'s encoder tokens cannot be cached (None: they can)."""
    if type(method).encode is not Method.encode:
        return f"'{method.name}' changes what the encoder computes (its own encode())"
    if method.trains_encoder:
        return f"'{method.name}' trains modules inside the encoder"
    return None


class FeatureCache:
    """The tokens of each training image by image id, and the counters of what the cache saved."""

    def __init__(self, method: Method, device: torch.device):
        self.method, self.device = method, device
        self.tokens: dict = {}
        # what the cache saved so far: a plain dict that the trainer's state shares (TrainState.feature_cache),
        # so that a checkpoint carries it and a resumed run goes on counting (its tokens are encoded anew)
        self.counts = {"encoded": 0, "served": 0, "encode_s": 0.0, "vision_flops_per_image": None}

    def resume(self, saved: dict) -> None:
        """Share the counters with the trainer's state (`saved`: its feature_cache, from a checkpoint
        or empty): both then update the one dict."""
        saved.update({**self.counts, **saved})
        self.counts = saved

    def fill(self, batch: dict, stage: Stage, autocast, flops: FlopCount | None) -> float:
        """Put the batch's tokens in batch["visual"], encoding the images not seen before (their
        forward FLOPs added to `flops` when counting). Returns the seconds spent counting FLOPs,
        which the caller takes off the clock."""
        ids = batch["image_ids"]
        first = {}  # each image not seen before -> its first row in the batch (an image may come twice)
        for k, i in enumerate(ids):
            if i not in self.tokens:
                first.setdefault(i, k)
        missing = list(first.values())
        paused = 0.0
        if missing:
            images = batch["images"][missing]
            if flops is not None and self.counts["vision_flops_per_image"] is None:
                paused = self._count(images[:1], stage, autocast)
            sync(self.device)
            t0 = time.perf_counter()
            with torch.no_grad(), autocast:
                tokens = self.method.encode(images, stage)
            sync(self.device)
            self.counts["encode_s"] += time.perf_counter() - t0
            self.tokens.update(zip(first, tokens))
            if flops is not None:
                flops.add("vision", "forward", int(len(missing) * self.counts["vision_flops_per_image"]))
        batch["visual"] = torch.stack([self.tokens[i] for i in ids])
        self.counts["encoded"] += len(missing)
        self.counts["served"] += len(ids) - len(missing)
        return paused

    def _count(self, image: torch.Tensor, stage: Stage, autocast) -> float:
        c0 = time.perf_counter()
        with torch.no_grad(), autocast, FlopCounter(*self.method.flop_parts()) as counter:
            self.method.encode(image, stage)
        self.counts["vision_flops_per_image"] = counter.result.total
        return time.perf_counter() - c0

    def _job(self, group) -> tuple[float, float, float]:
        """(samples served, images encoded, seconds encoding) summed over the job's ranks."""
        c = self.counts
        served, encoded, seconds = group.sum([c["served"], c["encoded"], c["encode_s"]])
        return served, encoded, seconds

    def without(self, wall_s: float, flops: float | None, group) -> dict:
        """A row's cost fields as an uncached run would have spent them: every sample served from
        the cache encoded, at the job's measured seconds per image (its ranks encode side by side)
        and the counted FLOPs per image. Every rank calls it (a collective)."""
        served, encoded, seconds = self._job(group)
        per_image = seconds / encoded if encoded else 0.0
        out = {"wall_s_without_cache": round(wall_s + served / group.world * per_image, 4)}
        per_image_flops = self.counts["vision_flops_per_image"]
        if flops is not None and per_image_flops is not None:
            out["flops_without_cache"] = int(flops + served * per_image_flops)
        return out

    def summary(self, group) -> dict:
        """results.json's cost.feature_cache: the job's counters. Every rank calls it."""
        served, encoded, seconds = self._job(group)
        return {"used": True, "images_encoded": int(encoded), "samples_served": int(served),
                "encode_s": round(seconds, 4), "vision_flops_per_image": self.counts["vision_flops_per_image"]}
