"""The tiny world: a deterministic synthetic dataset in real file formats, images with COCO captions
and VQAv2 questions, and short clips in the MSR-VTT layout.

The package, by role (each module imports only from those above it):

    scenes.py     what stills and clips share: WorldConfig, world_dir, the vocabulary, scenes,
                  relations, rendering, text and file helpers
    captions.py   5 true captions per still
    vqa.py        unambiguous questions per still, with 10 crowd answers each
    stills.py     the images and their caption and VQA files
    clips.py      the clips and their MSR-VTT annotations
    __init__.py   `build_world`, which writes both, and the public names other modules import

`build_world` writes into `<dir>.tmp-<pid>` and renames it into place when complete (with a `DONE`
marker), so an interrupted build never leaves a half world behind and a finished world is reused
at once.

Layout under `world_dir(cfg, cache)`:

    images/{image_id:06d}.png              RGB, image_size x image_size; ids 1.. over all splits
    annotations/captions_{split}.json      COCO captions format, exactly 5 captions per image
    vqa/questions_{split}.json             VQAv2 questions format
    vqa/annotations_{split}.json           VQAv2 annotations format, 10 answers per question
    scenes.json                            the scene facts per image (for debugging)
    msrvtt/                                clips in the MSR-VTT layout (vlp_bench/data/world/clips.py);
                                           their frames (msrvtt/videos/) only once a video task asks
    world.json                             config, generator version, counts
    DONE                                   written last
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from vlp_bench.data.world.clips import EVENTS, MSRVTT_SPLITS, TEMPORAL, generate_clips, said_order, write_clip_frames
from vlp_bench.data.world.scenes import (
    COLOR_SYNONYMS,
    COLORS,
    EXTENT,
    GENERATOR_VERSION,
    SHAPE_SYNONYMS,
    SHAPES,
    SIZE_SYNONYMS,
    SIZES,
    SPLITS,
    WorldConfig,
    region,
    world_dir,
)
from vlp_bench.data.world.stills import generate_stills, load_coco_captions
from vlp_bench.errors import UserError
from vlp_bench.files import atomic_dir

__all__ = [
    "COLOR_SYNONYMS", "COLORS", "EVENTS", "EXTENT", "GENERATOR_VERSION", "MSRVTT_SPLITS", "SHAPE_SYNONYMS", "SHAPES",
    "SIZE_SYNONYMS", "SIZES", "SPLITS", "TEMPORAL", "WorldConfig", "build_world", "load_coco_captions", "region",
    "said_order", "world_dir",
]


def _generate(cfg: WorldConfig, out: Path, clip_frames: bool) -> dict:
    """Write the stills, then the clips, then world.json under `out`; returns world.json's content."""
    counts = generate_stills(cfg, out)
    counts.update(generate_clips(cfg, out, clip_frames))
    info = {"config": asdict(cfg), "generator_version": GENERATOR_VERSION, "counts": counts}
    (out / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def build_world(cfg: WorldConfig, cache: Path, clip_frames: bool = True) -> Path:
    """Generate the world for `cfg` under `cache` (or reuse a complete one); return its directory.
    `clip_frames=False` leaves the clips' frames out (two thirds of the build, and only a video task
    reads them; their annotations, which the tiny LM reads, are always written): a later call
    with `clip_frames=True` adds them to the same world."""
    try:
        cfg.validate()
    except ValueError as e:
        raise UserError(f"world: {e}") from None
    final = world_dir(cfg, cache)
    if not (final / "DONE").is_file():
        # another process that finishes the same world first keeps its own (identical); a directory
        # without DONE is a stray one, replaced
        with atomic_dir(final, complete="DONE") as tmp:
            _generate(cfg, tmp, clip_frames)
            (tmp / "DONE").write_text(GENERATOR_VERSION + "\n")
    videos = final / "msrvtt" / "videos"
    if clip_frames and not videos.is_dir():  # renamed into place whole, so one that exists is complete
        with atomic_dir(videos) as tmp:
            write_clip_frames(cfg, tmp)
    return final
