"""The tiny world: a deterministic synthetic image / caption / VQA dataset in real file formats.

Every image is a plain, slightly tinted and lightly noisy background with 1..max_objects flat
shapes (5 shapes x 6 colours x 2 sizes) that never overlap. Scenes regularly hold two or three
copies of the same coloured shape, so captions and questions involve counting.

Design:

* Everything about image `i` is drawn from generators seeded by (seed, i) alone: one numpy
  stream for the scene and its pixels, one `random.Random` for its captions and one for its
  questions. Output is therefore byte-identical for the same config, independent of build order,
  and changing the language code never changes the pixels.
* A scene is first sampled as data (`_Obj`), then rendered (at 4x and box-downsampled, so edges
  are anti-aliased) and described. Descriptions are built from the scene facts only: objects
  with the same colour and shape form one *entity* ("two red circles"), relations between
  entities are stated only when every member pair agrees clearly on one axis, and locations in
  the image only when the object lies clearly inside a third of the image.
* Captions imitate an annotator crowd: 5 distinct references per image from different templates
  (full listings, pairwise relations, "side by side", only the salient object, counts, locations,
  colours only), with synonyms (square/box, big/large, picture/image, ...), varied word order,
  some with a final period. Every statement is true for the image.
* VQA questions are only asked when the answer is unambiguous (referring expressions are the
  shortest attribute combination that picks out exactly one object). Ten human answers per
  question mix the canonical answer with surface variants that the official VQA normaliser maps
  back ("Two", "the left", "a circle", "yes."), sensible near misses ("violet", "big") and a few
  wrong answers; the canonical answer is always the most frequent raw answer.
* `build_world` writes into `<dir>.tmp-<pid>` and renames it into place when complete (with a
  `DONE` marker), so an interrupted build never leaves a half world behind and a finished world
  is reused at once.

Layout under `world_dir(cfg, cache)`:

    images/{image_id:06d}.png              RGB, image_size x image_size; ids 1.. over all splits
    annotations/captions_{split}.json      COCO captions format, exactly 5 captions per image
    vqa/questions_{split}.json             VQAv2 questions format
    vqa/annotations_{split}.json           VQAv2 annotations format, 10 answers per question
    scenes.json                            the scene facts per image (for debugging)
    msrvtt/                                clips in the MSR-VTT layout (vlp_bench/data/world/clips.py)
    world.json                             config, generator version, counts
    DONE                                   written last
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

from vlp_bench.errors import UserError

GENERATOR_VERSION = "tinyworld-2"  # bump whenever the output for a given config changes
SPLITS = ("train", "val", "test")


@dataclass
class WorldConfig:
    seed: int = 0  # one seed fixes every pixel, caption and answer
    n_train: int = 4000  # enough images for a small model to learn attributes and relations
    n_val: int = 200  # quick to evaluate during training, still a stable estimate
    n_test: int = 300  # held-out final numbers with sensible confidence intervals
    image_size: int = 64  # small enough for CPU training, large enough to tell shapes apart
    max_objects: int = 3  # 1..3 objects give relations and counts without clutter
    questions_per_image: int = 3  # ~ the VQAv2 rate (5.4 per image) scaled to simple scenes
    # clips (vlp_bench/data/world/clips.py, for video captioning): a quarter as many as images, since each
    # clip is clip_frames images; 8 frames leave the samplers of 4 frames (the paper's) both halves.
    # 5000 training clips is where simvlg-video beats the frame average (README), but the tiny LM
    # would then pre-train mostly on clip captions, so the image default stays 1000
    n_clips_train: int = 1000
    n_clips_val: int = 100
    n_clips_test: int = 200
    clip_frames: int = 8

    def validate(self) -> None:
        """Raise ValueError on a config the generator cannot honour."""
        for name in ("seed", "n_train", "n_val", "n_test", "image_size", "max_objects", "questions_per_image",
                     "n_clips_train", "n_clips_val", "n_clips_test", "clip_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("n_train", "n_val", "n_test"):
            if not 1 <= getattr(self, name) <= 1_000_000:
                raise ValueError(f"{name} must be between 1 and 1000000, got {getattr(self, name)}")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be between 32 and 1024, got {self.image_size}")
        if not 1 <= self.max_objects <= 4:
            raise ValueError(f"max_objects must be between 1 and 4, got {self.max_objects}")
        for name in ("n_clips_train", "n_clips_val", "n_clips_test"):
            if not 1 <= getattr(self, name) <= 1_000_000:
                raise ValueError(f"{name} must be between 1 and 1000000, got {getattr(self, name)}")
        if not 2 <= self.clip_frames <= 64:
            raise ValueError(f"clip_frames must be between 2 and 64, got {self.clip_frames}")
        if not 1 <= self.questions_per_image <= 6:
            raise ValueError(f"questions_per_image must be between 1 and 6, got {self.questions_per_image}")


# ----------------------------------------------------------------------------- vocabulary

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 80, 220),
    "yellow": (240, 205, 30),
    "purple": (140, 50, 180),
    "orange": (250, 135, 20),
}
SIZES: dict[str, float] = {"small": 0.085, "large": 0.145}  # nominal radius / image side
EXTENT = 1.2  # bounding radius of every drawn shape / nominal radius (for the overlap test)

# Caption synonyms; repeated entries are more likely. Tests parse captions with these tables.
SHAPE_SYNONYMS = {
    "circle": ["circle", "circle", "circle", "disc"],
    "square": ["square", "square", "square", "box"],
    "triangle": ["triangle"],
    "star": ["star"],
    "cross": ["cross", "cross", "cross", "plus sign"],
}
COLOR_SYNONYMS = {c: [c] for c in COLORS} | {"purple": ["purple", "purple", "purple", "violet"]}
SIZE_SYNONYMS = {"small": ["small", "small", "little"], "large": ["large", "big", "big"]}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
IMAGE_WORDS = ["image", "picture"]
REL_PHRASES = {
    "left": ["to the left of", "to the left of", "left of"],
    "right": ["to the right of", "to the right of", "right of"],
    "above": ["above", "above", "over"],
    "below": ["below", "below", "under", "beneath"],
}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
REGIONS = ("top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right")


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class _Obj:
    shape: str
    color: str
    size: str
    x: int  # centre, pixels from the left
    y: int  # centre, pixels from the top
    r: float  # nominal radius in pixels
    rgb: tuple[int, int, int]


@dataclass
class _Entity:
    """All objects of one colour and shape: what a caption names as "two red circles"."""

    color: str
    shape: str
    members: list[_Obj]

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def size(self) -> str | None:
        sizes = {o.size for o in self.members}
        return sizes.pop() if len(sizes) == 1 else None


@dataclass
class _Scene:
    image_size: int
    background: tuple[int, int, int]
    objects: list[_Obj]

    def __post_init__(self) -> None:
        groups: dict[tuple[str, str], list[_Obj]] = {}
        for o in self.objects:
            groups.setdefault((o.color, o.shape), []).append(o)
        self.entities = [_Entity(c, s, m) for (c, s), m in groups.items()]
        # ordered pairs (a, b, rel) meaning "a is <rel> of b", both directions included
        self.pairs = [(a, b, rel) for a in self.entities for b in self.entities
                      if a is not b and (rel := _entity_relation(a, b, self.image_size))]


def _relation(a: _Obj, b: _Obj, image_size: int) -> str | None:
    """Where `a` is relative to `b`: left/right/above/below if clear on a dominant axis, else None."""
    dx, dy = a.x - b.x, a.y - b.y
    margin = 0.12 * image_size
    if abs(dx) >= 1.25 * abs(dy) and abs(dx) >= margin:
        return "left" if dx < 0 else "right"
    if abs(dy) >= 1.25 * abs(dx) and abs(dy) >= margin:
        return "above" if dy < 0 else "below"
    return None


def _entity_relation(a: _Entity, b: _Entity, image_size: int) -> str | None:
    rels = {_relation(p, q, image_size) for p in a.members for q in b.members}
    return rels.pop() if len(rels) == 1 and None not in rels else None


def region(x: float, y: float, image_size: int) -> str | None:
    """The image region ("top left", "left", "middle", ...) of a point, None near a border of thirds."""

    def third(v: float) -> int | None:
        t = v / image_size
        for k, (lo, hi) in enumerate(((-1.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 2.0))):
            if lo + 0.04 < t < hi - 0.04:
                return k
        return None

    h, v = third(x), third(y)
    if h is None or v is None:
        return None
    if h == 1 and v == 1:
        return "middle"
    return " ".join(w for w in (("top", "", "bottom")[v], ("left", "", "right")[h]) if w)


def _sample_scene(cfg: WorldConfig, rng: np.random.Generator) -> _Scene:
    """Random objects (with a planted group of identical ones 40% of the time), placed without overlap."""
    S = cfg.image_size
    gap = 0.02 * S
    base = rng.uniform(195, 235)
    background = tuple(int(np.clip(base + rng.uniform(-12, 12), 0, 255)) for _ in range(3))
    while True:  # retried with fresh attributes in the rare case the objects do not fit
        n = int(rng.integers(1, cfg.max_objects + 1))
        attrs = [(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]) for _ in range(n)]
        if n >= 2 and rng.random() < 0.4:
            k = int(rng.integers(2, n + 1))
            attrs[:k] = [attrs[0]] * k
        objects: list[_Obj] = []
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
            jitter = rng.integers(-12, 13, size=3)
            rgb = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255))
            objects.append(_Obj(shape, color, size, placed[0], placed[1], round(placed[2], 3), rgb))
        if len(objects) == n:
            return _Scene(S, background, objects)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        R = 1.15 * r
        return [(cx + R * math.cos(math.radians(a)), cy + R * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    if shape == "star":
        outer, inner = EXTENT * r, 0.5 * EXTENT * r
        return [(cx + (outer if k % 2 == 0 else inner) * math.cos(math.radians(-90 + 36 * k)),
                 cy + (outer if k % 2 == 0 else inner) * math.sin(math.radians(-90 + 36 * k))) for k in range(10)]
    if shape == "cross":
        a, w = 1.05 * r, 0.38 * r
        pts = [(w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a), (-w, -a), (-w, -w), (-a, -w), (-a, w), (-w, w), (-w, a)]
        return [(cx + px, cy + py) for px, py in pts]
    raise ValueError(shape)


def _render(scene: _Scene, rng: np.random.Generator) -> Image.Image:
    factor = 4  # draw large and box-downsample: anti-aliased edges, still deterministic
    S = scene.image_size
    big = Image.new("RGB", (S * factor, S * factor), scene.background)
    draw = ImageDraw.Draw(big)
    for o in scene.objects:
        cx, cy, r = (o.x + 0.5) * factor, (o.y + 0.5) * factor, o.r * factor
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o.rgb)
        else:
            draw.polygon(_shape_polygon(o.shape, cx, cy, r), fill=o.rgb)
    small = np.asarray(big.resize((S, S), Image.Resampling.BOX), dtype=np.int16)
    noise = rng.integers(-5, 6, size=(S, S, 1), dtype=np.int16)  # light grey-level noise
    return Image.fromarray(np.clip(small + noise, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- captions


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x")) else "s")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _np(e: _Entity, rng: random.Random, size_p: float = 0.3, count_word: str | None = None) -> str:
    """A noun phrase for an entity with its exact count: "a big red circle", "two blue boxes"."""
    words = []
    if e.size and rng.random() < size_p:
        words.append(rng.choice(SIZE_SYNONYMS[e.size]))
    words.append(rng.choice(COLOR_SYNONYMS[e.color]))
    shape = rng.choice(SHAPE_SYNONYMS[e.shape])
    words.append(shape if e.count == 1 else _plural(shape))
    head = " ".join(words)
    if count_word is not None:
        return f"{count_word} {head}"
    return _a(head) if e.count == 1 else f"{COUNT_WORDS[e.count]} {head}"


def _be(e: _Entity) -> str:
    return "is" if e.count == 1 else "are"


def _location(reg: str, rng: random.Random) -> str:
    img = rng.choice(IMAGE_WORDS)
    if reg == "middle":
        return rng.choice(["in the middle", f"in the middle of the {img}", f"in the center of the {img}"])
    if " " in reg:
        v, h = reg.split()
        v = rng.choice({"top": ["top", "top", "upper"], "bottom": ["bottom", "bottom", "lower"]}[v])
        return rng.choice([f"in the {v} {h} corner", f"in the {v} {h} of the {img}", f"at the {v} {h}"])
    if reg in ("left", "right"):
        return rng.choice([f"on the {reg}", f"on the {reg} side of the {img}", f"at the {reg} of the {img}"])
    return rng.choice([f"at the {reg}", f"near the {reg} of the {img}", f"at the {reg} of the {img}"])


def _obj_region(e: _Entity, S: int) -> str | None:
    return region(e.members[0].x, e.members[0].y, S) if e.count == 1 else None


def _cap_list(s: _Scene, rng: random.Random) -> str:
    ents = list(s.entities)
    rng.shuffle(ents)
    body = _join([_np(e, rng) for e in ents])
    img = rng.choice(IMAGE_WORDS)
    return rng.choice([
        body,
        f"there {_be(ents[0])} {body}",
        f"{_a(img)} of {body}",
        f"{_a(img)} with {body}",
        f"{body} on a {rng.choice(['plain', 'light', 'pale'])} background",
        f"this {img} shows {body}",
    ])


def _cap_relation(s: _Scene, rng: random.Random) -> str | None:
    if not s.pairs:
        return None
    a, b, rel = rng.choice(s.pairs)
    na, nb, phrase = _np(a, rng), _np(b, rng), rng.choice(REL_PHRASES[rel])
    return rng.choice([f"{na} {phrase} {nb}", f"{na} {_be(a)} {phrase} {nb}", f"there {_be(a)} {na} {phrase} {nb}"])


def _cap_side_by_side(s: _Scene, rng: random.Random) -> str | None:
    if not s.pairs:
        return None
    a, b, rel = rng.choice(s.pairs)
    if rel in ("left", "right"):
        tail = rng.choice(["side by side", "next to each other", "beside each other"])
    else:
        tail = rng.choice(["one above the other", "stacked vertically"])
    return f"{_np(a, rng)} and {_np(b, rng)} {tail}"


def _cap_salient(s: _Scene, rng: random.Random) -> str:
    biggest = max(s.objects, key=lambda o: o.r)  # first of the largest
    e = next(e for e in s.entities if biggest in e.members)
    text = _np(e, rng, size_p=0.6)
    reg = _obj_region(e, s.image_size)
    if reg and rng.random() < 0.5:
        text += " " + _location(reg, rng)
    return rng.choice([text, text, f"{_a(rng.choice(IMAGE_WORDS))} of {text}"])


def _cap_location(s: _Scene, rng: random.Random) -> str | None:
    located = [e for e in s.entities if _obj_region(e, s.image_size)]
    if not located:
        return None
    rng.shuffle(located)
    parts = [f"{_np(e, rng)} {_location(_obj_region(e, s.image_size), rng)}" for e in located[:2]]
    text = " and ".join(parts)
    return text if rng.random() < 0.7 else f"there is {text}"


def _cap_count(s: _Scene, rng: random.Random) -> str | None:
    n = len(s.objects)
    if n < 2:
        return None
    N = COUNT_WORDS[n]
    noun = rng.choice(["shapes", "objects", "shapes"])
    options = [f"{N} {noun}: {_join([_np(x, rng) for x in s.entities])}"] if len(s.entities) > 1 else []
    partial = [e for e in s.entities if e.count < n]  # "including" needs something else besides
    if partial:
        e = rng.choice(partial)
        options += [f"{N} {noun} including {_np(e, rng)}",
                    f"{_a(rng.choice(IMAGE_WORDS))} with {N} {noun}, among them {_np(e, rng)}"]
        if e.count == 1:
            options.append(f"{N} {noun}, one of them {_np(e, rng)}")
    colors = {o.color for o in s.objects}
    if len(colors) == 1 and rng.random() < 0.5:  # true but vague: not too often
        options.append(f"{N} {rng.choice(COLOR_SYNONYMS[colors.pop()])} {noun}")
    return rng.choice(options) if options else None


def _cap_group(s: _Scene, rng: random.Random) -> str | None:
    """About one group of identical shapes: its layout or its sizes."""
    groups = [e for e in s.entities if e.count >= 2]
    if not groups:
        return None
    e = rng.choice(groups)
    text = _np(e, rng, size_p=0.2)
    if e.count == 2 and rng.random() < 0.3:
        text = "a pair of " + text.removeprefix("two ")
    options = []
    rels = {_relation(p, q, s.image_size) for p in e.members for q in e.members if p is not q}
    if rels <= {"left", "right"}:
        options += [f"{text} side by side", f"{text} next to each other"]
    if rels <= {"above", "below"}:
        options += [f"{text}, one above the other", f"{text} stacked vertically"]
    if e.count == 2 and e.size is None:
        big, small = rng.choice(SIZE_SYNONYMS["large"]), rng.choice(SIZE_SYNONYMS["small"])
        options += [f"{text}, one {big} and one {small}", f"{text} of different sizes"]
    if not options:
        options = [f"{text} on a plain background", f"{_a(rng.choice(IMAGE_WORDS))} showing {text}"]
    return rng.choice(options)


def _cap_colors(s: _Scene, rng: random.Random) -> str | None:
    colors = list(dict.fromkeys(o.color for o in s.objects))
    if len(colors) < 2:
        return None
    rng.shuffle(colors)
    words = _join([rng.choice(COLOR_SYNONYMS[c]) for c in colors])
    return rng.choice([f"{words} shapes", f"shapes in {words}", f"{words} shapes on a plain background",
                       f"{_a(rng.choice(IMAGE_WORDS))} with {words} shapes"])


def _cap_single(s: _Scene, rng: random.Random) -> str | None:
    if len(s.objects) != 1:
        return None
    e = s.entities[0]
    lead = rng.choice(["a single", "just one", "a lone", "only one", "one"])
    text = _np(e, rng, size_p=0.5, count_word=lead)
    return rng.choice([text, text, f"{text} on a plain background", f"{text} in the {rng.choice(IMAGE_WORDS)}"])


_CAPTIONERS: list[tuple[float, Callable[[_Scene, random.Random], str | None]]] = [
    (1.0, _cap_list),
    (1.6, _cap_relation),
    (0.6, _cap_side_by_side),
    (0.9, _cap_salient),
    (0.8, _cap_location),
    (0.7, _cap_count),
    (0.8, _cap_group),
    (0.4, _cap_colors),
    (1.0, _cap_single),
]


def make_captions(scene: _Scene, rng: random.Random, n: int = 5) -> list[str]:
    """`n` distinct true captions, preferring a different template for each.

    Together they name every colour in the image: if the crowd left one out, the last caption
    is replaced by a full listing.
    """
    captions: list[str] = []
    used: set[int] = set()
    for _ in range(1000):
        if len(captions) == n:
            break
        fresh = [i for i in range(len(_CAPTIONERS)) if i not in used] or list(range(len(_CAPTIONERS)))
        i = rng.choices(fresh, weights=[_CAPTIONERS[j][0] for j in fresh])[0]
        used.add(i)
        text = _CAPTIONERS[i][1](scene, rng)
        if text is not None and text.rstrip(".") not in {c.rstrip(".") for c in captions}:
            captions.append(text + "." if rng.random() < 0.15 else text)
    for _ in range(1000):
        named = {c for c in COLORS for text in captions if any(w in text.split() for w in COLOR_SYNONYMS[c])}
        if len(captions) == n and named >= {o.color for o in scene.objects}:
            return captions
        text = _cap_list(scene, rng)
        if text not in captions:
            captions[-1] = text
    raise RuntimeError(f"could not write {n} distinct captions for scene {scene}")  # a bug, not bad input


# ----------------------------------------------------------------------------- VQA

def _surface_variants(answer: str, answer_type: str) -> list[str]:
    """Spellings the official VQA normaliser maps back onto `answer` ("Two", "the left", "red.")."""
    if answer_type == "number":
        return [COUNT_WORDS.get(int(answer), "zero"), answer + ".", COUNT_WORDS.get(int(answer), "zero").capitalize()]
    variants = [answer.capitalize(), answer + "."]
    if answer_type == "other":
        variants += ["the " + answer if answer in REGIONS else _a(answer) if answer in SHAPES else answer.upper()]
        if " " in answer:
            variants.append(answer.replace(" ", "-"))
    return variants


# Sensible answers that the normaliser does NOT map onto the canonical one.
_NEAR_MISSES = {
    "yes": ["yep"], "no": ["nope"],
    "purple": ["violet"], "blue": ["dark blue"], "green": ["dark green"],
    "circle": ["round", "oval"], "square": ["box", "rectangle"], "cross": ["plus", "plus sign"],
    "star": ["star shape"], "triangle": ["triangular"],
    "left": ["on the left", "left side"], "right": ["on the right", "right side"],
    "top": ["on top", "up"], "bottom": ["on bottom", "down"], "middle": ["center", "in the middle"],
    "top left": ["upper left"], "top right": ["upper right"], "bottom left": ["lower left"], "bottom right": ["lower right"],
    "small": ["little", "tiny"], "large": ["big"],
}
_CONFUSABLE = {"red": ["orange"], "orange": ["red", "yellow"], "yellow": ["orange"], "blue": ["purple"],
               "purple": ["blue"], "green": ["yellow"]}


def _wrong_answers(answer: str, answer_type: str) -> list[str]:
    if answer_type == "yes/no":
        return ["no" if answer == "yes" else "yes"]
    if answer_type == "number":
        return [str(v) for v in (int(answer) - 1, int(answer) + 1) if v >= 0]
    if answer in COLORS:
        return _CONFUSABLE[answer] * 2 + [c for c in COLORS if c != answer]
    if answer in SHAPES:
        return [s for s in SHAPES if s != answer]
    if answer in SIZES:
        return [s for s in SIZES if s != answer]
    return [r for r in REGIONS if r != answer and (set(r.split()) & set(answer.split()) or answer == "middle")]


def _human_answers(answer: str, answer_type: str, rng: random.Random) -> list[dict]:
    """Ten crowd answers: mostly canonical, some surface variants, near misses and mistakes."""
    variants = _surface_variants(answer, answer_type)
    near = _NEAR_MISSES.get(answer, [])
    wrong = _wrong_answers(answer, answer_type)
    p_wrong = rng.choice([0.0, 0.0, 0.05, 0.1, 0.15])  # questions differ in how confusing they are
    p_near = 0.06 if near else 0.0
    p_variant = 0.2
    raw: list[tuple[str, str]] = []
    for _ in range(100):
        raw = []
        for _ in range(10):
            u = rng.random()
            if u < p_wrong:
                raw.append((rng.choice(wrong), rng.choice(["maybe", "maybe", "no", "yes"])))
            elif u < p_wrong + p_near:
                raw.append((rng.choice(near), rng.choice(["yes", "maybe"])))
            elif u < p_wrong + p_near + p_variant:
                raw.append((rng.choice(variants), rng.choice(["yes", "yes", "yes", "maybe"])))
            else:
                raw.append((answer, "yes" if rng.random() < 0.9 else "maybe"))
        counts = Counter(a for a, _ in raw)
        if counts[answer] > max((c for a, c in counts.items() if a != answer), default=0):
            break
    else:
        raw = [(answer, "yes")] * 10
    return [{"answer": a, "answer_confidence": c, "answer_id": i + 1} for i, (a, c) in enumerate(raw)]


def _refer(scene: _Scene, target: _Obj, exclude: str) -> str | None:
    """Shortest description ("circle", "red object", "large red circle") naming only `target`."""
    combos = [("shape",), ("color", "shape"), ("size", "shape"), ("color",), ("size",),
              ("size", "color", "shape"), ("size", "color")]
    for combo in combos:
        if exclude in combo:
            continue
        key = [getattr(target, a) for a in combo]
        if sum(1 for o in scene.objects if [getattr(o, a) for a in combo] == key) == 1:
            words = [getattr(target, a) for a in ("size", "color") if a in combo]
            return " ".join(words + [target.shape if "shape" in combo else "object"])
    return None


def _question_candidates(scene: _Scene, rng: random.Random) -> dict[str, list[tuple[str, str, str, str]]]:
    """Category -> [(question, answer, answer_type, question_type)], all unambiguous."""
    S, objs = scene.image_size, scene.objects
    c: dict[str, list[tuple[str, str, str, str]]] = {k: [] for k in
                                                     ("color", "shape", "count", "exist", "where", "what_rel", "is_rel", "size")}
    for o in objs:
        if ref := _refer(scene, o, "color"):
            c["color"].append(rng.choice([(f"what color is the {ref}?", o.color, "other", "what color is the"),
                                          (f"what is the color of the {ref}?", o.color, "other", "what is the color of the")]))
        if ref := _refer(scene, o, "shape"):
            c["shape"].append(rng.choice([(f"what shape is the {ref}?", o.shape, "other", "what shape is the"),
                                          (f"what is the {ref}?", o.shape, "other", "what is the")]))
        if ref := _refer(scene, o, "size"):
            c["size"].append((f"what size is the {ref}?", o.size, "other", "what size is the"))
        ref = _refer(scene, o, "")
        if ref and (reg := region(o.x, o.y, S)):
            c["where"].append((f"where is the {ref}?", reg, "other", "where is the"))
    for shape in SHAPES:
        members = [o for o in objs if o.shape == shape]
        if len(members) >= 2 and len({o.color for o in members}) == 1:
            c["color"].append((f"what color are the {_plural(shape)}?", members[0].color, "other", "what color are the"))
    # counting: present shapes / colours / coloured shapes, all objects, and occasionally absent ones
    count_q = [(f"how many {_plural(s)} are there?", sum(o.shape == s for o in objs)) for s in SHAPES]
    count_q += [(f"how many {col} objects are there?", sum(o.color == col for o in objs)) for col in COLORS]
    count_q += [(f"how many {e.color} {_plural(e.shape)} are there?", e.count) for e in scene.entities]
    count_q += [(f"how many {rng.choice(['objects', 'shapes'])} are there?", len(objs))]
    zeros = [q for q in count_q if q[1] == 0]
    count_q = [q for q in count_q if q[1] > 0] + rng.sample(zeros, min(1, len(zeros)))
    c["count"] = [(q, str(n), "number", "how many") for q, n in count_q]
    # existence: present coloured shapes, and absent ones sharing a colour or shape with the scene
    present = {(e.color, e.shape) for e in scene.entities}
    c["exist"] = [(f"is there {_a(f'{col} {sh}')}?", "yes", "yes/no", "is there a") for col, sh in sorted(present)]
    absent = [(col, sh) for col in COLORS for sh in SHAPES if (col, sh) not in present
              and any(col == pc or sh == ps for pc, ps in present)]
    c["exist"] += [(f"is there {_a(f'{col} {sh}')}?", "no", "yes/no", "is there a") for col, sh in rng.sample(absent, min(3, len(absent)))]
    # relations between single objects that can be named
    for a in objs:
        for b in objs:
            if a is b or not (rel := _relation(a, b, S)):
                continue
            ra, rb = _refer(scene, a, ""), _refer(scene, b, "")
            if not (ra and rb):
                continue
            phrase = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
            asked, ans = (rel, "yes") if rng.random() < 0.5 else (OPPOSITE[rel], "no")
            c["is_rel"].append((f"is the {ra} {phrase[asked]} the {rb}?", ans, "yes/no", "is the"))
            # "what is left of the B?": only when a is the one object on that side of b at all
            side = [o for o in objs if o is not b and {"left": o.x < b.x, "right": o.x > b.x,
                                                          "above": o.y < b.y, "below": o.y > b.y}[rel]]
            if side == [a]:
                c["what_rel"].append((f"what is {phrase[rel]} the {rb}?", a.shape, "other", "what is"))
    return c


_QUESTION_WEIGHTS = {"color": 1.0, "shape": 1.0, "count": 1.2, "exist": 1.0, "where": 0.8,
                     "what_rel": 0.6, "is_rel": 0.8, "size": 0.4}


def make_questions(scene: _Scene, rng: random.Random, n: int) -> list[tuple[str, str, str, str]]:
    """`n` distinct questions from as many different categories as possible."""
    cands = _question_candidates(scene, rng)
    chosen: list[tuple[str, str, str, str]] = []
    used_cats: set[str] = set()
    while len(chosen) < n:
        asked = {q[0] for q in chosen}
        open_cats = [k for k, v in cands.items() if any(q[0] not in asked for q in v)]
        if not open_cats:
            raise RuntimeError(f"not enough distinct questions for scene {scene}")  # a bug, not bad input
        fresh = [k for k in open_cats if k not in used_cats] or open_cats
        cat = rng.choices(fresh, weights=[_QUESTION_WEIGHTS[k] for k in fresh])[0]
        used_cats.add(cat)
        options = [q for q in cands[cat] if q[0] not in asked]
        if options[0][2] == "yes/no":  # balance yes and no
            answer = rng.choice(sorted({q[1] for q in options}))
            options = [q for q in options if q[1] == answer]
        chosen.append(rng.choice(options))
    return chosen


# ----------------------------------------------------------------------------- building


def world_dir(cfg: WorldConfig, cache: Path) -> Path:
    """cache/world/<key>: the key hashes the config and the generator version."""
    text = json.dumps(asdict(cfg), sort_keys=True) + GENERATOR_VERSION
    return Path(cache) / "world" / hashlib.sha1(text.encode()).hexdigest()[:12]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":"), ensure_ascii=True) + "\n")


def _generate(cfg: WorldConfig, out: Path, progress: bool) -> dict:
    (out / "images").mkdir(parents=True)
    (out / "annotations").mkdir()
    (out / "vqa").mkdir()
    S = cfg.image_size
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    total = sum(sizes.values())
    scenes_out: list[dict] = []
    counts: dict[str, dict[str, int]] = {"images": {}, "captions": {}, "questions": {}}
    image_id = 0
    for split in SPLITS:
        images, caps, questions, answers = [], [], [], []
        for _ in range(sizes[split]):
            image_id += 1
            pix_rng = np.random.default_rng([cfg.seed, image_id])
            scene = _sample_scene(cfg, pix_rng)
            name = f"{image_id:06d}.png"
            _render(scene, pix_rng).save(out / "images" / name, format="PNG", compress_level=1)
            images.append({"id": image_id, "file_name": name, "height": S, "width": S})
            cap_rng = random.Random(f"captions:{cfg.seed}:{image_id}")
            for k, text in enumerate(make_captions(scene, cap_rng)):
                caps.append({"image_id": image_id, "id": image_id * 10 + k, "caption": text})
            vqa_rng = random.Random(f"vqa:{cfg.seed}:{image_id}")
            for k, (q, a, atype, qtype) in enumerate(make_questions(scene, vqa_rng, cfg.questions_per_image)):
                qid = image_id * 1000 + k  # the VQAv2 convention
                questions.append({"image_id": image_id, "question": q, "question_id": qid})
                human = _human_answers(a, atype, vqa_rng)
                most = Counter(h["answer"] for h in human).most_common(1)[0][0]
                answers.append({"question_id": qid, "image_id": image_id, "question_type": qtype,
                                "answer_type": atype, "multiple_choice_answer": most, "answers": human})
            scenes_out.append({"image_id": image_id, "split": split, "background": list(scene.background),
                               "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "x": o.x, "y": o.y,
                                            "r": o.r, "rgb": list(o.rgb)} for o in scene.objects]})
            if progress and (image_id % 500 == 0 or image_id == total):
                print(f"tiny world: {image_id}/{total} images", file=sys.stderr, flush=True)
        _write_json(out / "annotations" / f"captions_{split}.json", {
            "info": {"description": f"tiny world captions ({split})", "version": GENERATOR_VERSION},
            "licenses": [], "type": "captions", "images": images, "annotations": caps})
        _write_json(out / "vqa" / f"questions_{split}.json", {
            "info": {"description": f"tiny world VQA questions ({split})", "version": GENERATOR_VERSION},
            "task_type": "Open-Ended", "data_type": "tinyworld", "data_subtype": split, "license": {},
            "questions": questions})
        _write_json(out / "vqa" / f"annotations_{split}.json", {
            "info": {"description": f"tiny world VQA annotations ({split})", "version": GENERATOR_VERSION},
            "license": {}, "data_type": "tinyworld", "data_subtype": split, "annotations": answers})
        counts["images"][split] = len(images)
        counts["captions"][split] = len(caps)
        counts["questions"][split] = len(questions)
    _write_json(out / "scenes.json", {"image_size": S, "scenes": scenes_out})
    from vlp_bench.data.world.clips import generate_clips

    counts.update(generate_clips(cfg, out, progress))
    info = {"config": asdict(cfg), "generator_version": GENERATOR_VERSION, "counts": counts}
    (out / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def build_world(cfg: WorldConfig, cache: Path, progress: bool = False) -> Path:
    """Generate the world for `cfg` under `cache` (or reuse a complete one); return its directory."""
    try:
        cfg.validate()
    except ValueError as e:
        raise UserError(f"world: {e}") from None
    final = world_dir(cfg, cache)
    if (final / "DONE").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _generate(cfg, tmp, progress)
        (tmp / "DONE").write_text(GENERATOR_VERSION + "\n")
        if final.exists() and not (final / "DONE").is_file():
            shutil.rmtree(final)  # not ours and not complete: a stray directory
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "DONE").is_file():
                raise
            # another process finished the same world first; theirs is identical
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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
