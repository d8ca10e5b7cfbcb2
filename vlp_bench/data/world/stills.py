"""The tiny world's stills: images of flat shapes with COCO captions and VQAv2 questions.

Every image is a plain, slightly tinted and lightly noisy background with 1..max_objects flat
shapes (5 shapes x 6 colours x 2 sizes) that never overlap. Scenes regularly hold two or three
copies of the same coloured shape, so captions and questions involve counting.

Everything about image `i` is drawn from generators seeded by (seed, i) alone: one numpy stream
for the scene and its pixels, one `random.Random` for its captions (captions.py) and one for its
questions (vqa.py). Output is therefore byte-identical for the same config, independent of build
order, and changing the language code never changes the pixels.

Files written under the world directory (the whole layout: vlp_bench/data/world/__init__.py):

    images/{image_id:06d}.png              RGB, image_size x image_size; ids 1.. over all splits
    annotations/captions_{split}.json      COCO captions format, exactly 5 captions per image
    vqa/questions_{split}.json             VQAv2 questions format
    vqa/annotations_{split}.json           VQAv2 annotations format, 10 answers per question
    scenes.json                            the scene facts per image (for debugging)

`load_coco_captions` reads a COCO caption file back.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

from vlp_bench.data.world.captions import make_captions
from vlp_bench.data.world.scenes import (
    EXTENT,
    GENERATOR_VERSION,
    SIZES,
    SPLITS,
    Obj,
    Scene,
    WorldConfig,
    jittered_rgb,
    render,
    sample_background,
    sample_kind,
    write_json,
)
from vlp_bench.data.world.vqa import vqa_entries
from vlp_bench.errors import UserError
from vlp_bench.log import note


def sample_scene(cfg: WorldConfig, rng: np.random.Generator) -> Scene:
    """Random objects (with a planted group of identical ones 40% of the time), placed without overlap."""
    S = cfg.image_size
    gap = 0.02 * S
    background = sample_background(rng)
    while True:  # retried with fresh attributes in the rare case the objects do not fit
        n = int(rng.integers(1, cfg.max_objects + 1))
        attrs = [sample_kind(rng) for _ in range(n)]
        if n >= 2 and rng.random() < 0.4:
            k = int(rng.integers(2, n + 1))
            attrs[:k] = [attrs[0]] * k
        objects: list[Obj] = []
        for shape, color in attrs:
            size = "large" if rng.random() < 0.5 else "small"
            placed = None
            for attempt in range(400):
                if attempt == 200:
                    size = "small"  # a large one does not fit: try a small one
                r = SIZES[size] * S
                ext = EXTENT * r
                lo, hi = math.ceil(ext), math.floor(S - ext)
                x, y = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
                if all(math.hypot(x - o.x, y - o.y) >= ext + EXTENT * o.r + gap for o in objects):
                    placed = (x, y, r)
                    break
            if placed is None:
                break
            rgb = jittered_rgb(color, rng)
            objects.append(Obj(shape, color, size, placed[0], placed[1], round(placed[2], 3), rgb))
        if len(objects) == n:
            return Scene(S, background, objects)


def _add_still(cfg: WorldConfig, out: Path, image_id: int, entries: dict[str, list[dict]]) -> Scene:
    """Sample and render image `image_id`, and append its COCO image entry, captions, VQA questions
    and VQA annotations to `entries`; returns its scene."""
    pix_rng = np.random.default_rng([cfg.seed, image_id])
    scene = sample_scene(cfg, pix_rng)
    name = f"{image_id:06d}.png"
    render(scene, pix_rng).save(out / "images" / name, format="PNG", compress_level=1)
    entries["images"].append({"id": image_id, "file_name": name, "height": cfg.image_size, "width": cfg.image_size})
    cap_rng = random.Random(f"captions:{cfg.seed}:{image_id}")
    for k, text in enumerate(make_captions(scene, cap_rng)):
        entries["captions"].append({"image_id": image_id, "id": image_id * 10 + k, "caption": text})
    vqa_rng = random.Random(f"vqa:{cfg.seed}:{image_id}")
    questions, answers = vqa_entries(scene, vqa_rng, cfg.questions_per_image, image_id)
    entries["questions"] += questions
    entries["answers"] += answers
    return scene


def _scene_record(image_id: int, split: str, scene: Scene) -> dict:
    """The facts of one scene as stored in scenes.json."""
    return {"image_id": image_id, "split": split, "background": list(scene.background),
            "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "x": o.x, "y": o.y,
                         "r": o.r, "rgb": list(o.rgb)} for o in scene.objects]}


def _write_split(out: Path, split: str, entries: dict[str, list[dict]]) -> None:
    """The split's COCO caption file and VQAv2 question and annotation files."""
    write_json(out / "annotations" / f"captions_{split}.json", {
        "info": {"description": f"tiny world captions ({split})", "version": GENERATOR_VERSION},
        "licenses": [], "type": "captions", "images": entries["images"], "annotations": entries["captions"]})
    write_json(out / "vqa" / f"questions_{split}.json", {
        "info": {"description": f"tiny world VQA questions ({split})", "version": GENERATOR_VERSION},
        "task_type": "Open-Ended", "data_type": "tinyworld", "data_subtype": split, "license": {},
        "questions": entries["questions"]})
    write_json(out / "vqa" / f"annotations_{split}.json", {
        "info": {"description": f"tiny world VQA annotations ({split})", "version": GENERATOR_VERSION},
        "license": {}, "data_type": "tinyworld", "data_subtype": split, "annotations": entries["answers"]})


def generate_stills(cfg: WorldConfig, out: Path) -> dict:
    """Write images/, annotations/, vqa/ and scenes.json under `out`; returns the image, caption and
    question counts per split."""
    (out / "images").mkdir(parents=True)
    (out / "annotations").mkdir()
    (out / "vqa").mkdir()
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    total = sum(sizes.values())
    scenes_out: list[dict] = []
    counts: dict[str, dict[str, int]] = {"images": {}, "captions": {}, "questions": {}}
    image_id = 0
    for split in SPLITS:
        entries: dict[str, list[dict]] = {"images": [], "captions": [], "questions": [], "answers": []}
        for _ in range(sizes[split]):
            image_id += 1
            scene = _add_still(cfg, out, image_id, entries)
            scenes_out.append(_scene_record(image_id, split, scene))
            if image_id % 500 == 0 or image_id == total:
                note(f"tiny world: {image_id}/{total} images")
        _write_split(out, split, entries)
        counts["images"][split] = len(entries["images"])
        counts["captions"][split] = len(entries["captions"])
        counts["questions"][split] = len(entries["questions"])
    write_json(out / "scenes.json", {"image_size": cfg.image_size, "scenes": scenes_out})
    return counts


def load_coco_captions(path: Path) -> tuple[list[dict], dict[int, list[str]]]:
    """Read a COCO caption file: (images list, image_id -> captions in file order)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"caption annotations not found: {path}")
    try:
        data = json.loads(path.read_text())
        images = list(data["images"])
        refs: dict[int, list[str]] = {int(im["id"]): [] for im in images}
        for ann in data["annotations"]:
            image_id = int(ann["image_id"])
            if image_id not in refs:
                raise KeyError(f"annotation for unknown image id {image_id}")
            if not isinstance(ann["caption"], str):
                raise TypeError(f"caption of annotation {ann.get('id')} is not a string")
            refs[image_id].append(ann["caption"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a COCO caption annotation file ({type(e).__name__}: {e})") from None
    return images, refs
