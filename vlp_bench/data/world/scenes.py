"""What the tiny world's stills and clips share: the config, the vocabulary, scenes and their
relations, rendering, text helpers and file helpers.

* `WorldConfig` sizes the whole world (images and clips); `world_dir` is where a config's world
  lives in the cache, keyed by the config and `GENERATOR_VERSION`.
* The vocabulary: 5 shapes x 6 colours x 2 sizes, and the synonyms and phrases captions use
  (tests parse captions with these tables).
* A scene is data first (`Obj`s on a background; objects of one colour and shape form an
  `Entity`, "two red circles"), then rendered (`render`: drawn at 4x and box-downsampled, so edges
  are anti-aliased, plus light noise). `relation` and `region` state where objects are only when
  it is clear.
* The random draws that stills and clips make alike (`sample_background`, `sample_kind`,
  `jittered_rgb`) are made here in one place, always in the same order.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

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
    # 5000 training clips is where simvlg-video beats the frame average (docs/results.md), but the tiny LM
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
class Obj:
    """One drawn shape."""

    shape: str
    color: str
    size: str
    x: int  # centre, pixels from the left
    y: int  # centre, pixels from the top
    r: float  # nominal radius in pixels
    rgb: tuple[int, int, int]


@dataclass
class Entity:
    """All objects of one colour and shape: what a caption names as "two red circles"."""

    color: str
    shape: str
    members: list[Obj]

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def size(self) -> str | None:
        sizes = {o.size for o in self.members}
        return sizes.pop() if len(sizes) == 1 else None


@dataclass
class Scene:
    """Objects on a background; `entities` groups them by colour and shape, `pairs` holds the clear
    relations between entities."""

    image_size: int
    background: tuple[int, int, int]
    objects: list[Obj]

    def __post_init__(self) -> None:
        groups: dict[tuple[str, str], list[Obj]] = {}
        for o in self.objects:
            groups.setdefault((o.color, o.shape), []).append(o)
        self.entities = [Entity(c, s, m) for (c, s), m in groups.items()]
        # ordered pairs (a, b, rel) meaning "a is <rel> of b", both directions included
        self.pairs = [(a, b, rel) for a in self.entities for b in self.entities
                      if a is not b and (rel := _entity_relation(a, b, self.image_size))]


def relation(a: Obj, b: Obj, image_size: int) -> str | None:
    """Where `a` is relative to `b`: left/right/above/below if clear on a dominant axis, else None."""
    dx, dy = a.x - b.x, a.y - b.y
    margin = 0.12 * image_size
    if abs(dx) >= 1.25 * abs(dy) and abs(dx) >= margin:
        return "left" if dx < 0 else "right"
    if abs(dy) >= 1.25 * abs(dx) and abs(dy) >= margin:
        return "above" if dy < 0 else "below"
    return None


def _entity_relation(a: Entity, b: Entity, image_size: int) -> str | None:
    rels = {relation(p, q, image_size) for p in a.members for q in b.members}
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


def sample_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light grey, slightly tinted background colour (4 draws from `rng`)."""
    base = rng.uniform(195, 235)
    return tuple(int(np.clip(base + rng.uniform(-12, 12), 0, 255)) for _ in range(3))


def sample_kind(rng: np.random.Generator) -> tuple[str, str]:
    """A random (shape, colour), the shape drawn first."""
    return SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]


def jittered_rgb(color: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """The RGB of a colour name with each channel moved by -12..12 (3 draws from `rng`)."""
    jitter = rng.integers(-12, 13, size=3)
    return tuple(int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255))


# ----------------------------------------------------------------------------- rendering


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


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """The scene as an RGB image (its noise drawn from `rng`)."""
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


# ----------------------------------------------------------------------------- text


def with_article(phrase: str) -> str:
    """The phrase with "a" or "an": "a red circle", "an orange box"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def plural(word: str) -> str:
    """The plural of a shape word: "circles", "boxes", "crosses"."""
    return word + ("es" if word.endswith(("s", "x")) else "s")


def join_words(parts: list[str]) -> str:
    """Parts listed as in a sentence: "a", "a and b", "a, b and c"."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def noun_phrase(e: Entity, rng: random.Random, size_p: float = 0.3, count_word: str | None = None) -> str:
    """A noun phrase for an entity with its exact count: "a big red circle", "two blue boxes"."""
    words = []
    if e.size and rng.random() < size_p:
        words.append(rng.choice(SIZE_SYNONYMS[e.size]))
    words.append(rng.choice(COLOR_SYNONYMS[e.color]))
    shape = rng.choice(SHAPE_SYNONYMS[e.shape])
    words.append(shape if e.count == 1 else plural(shape))
    head = " ".join(words)
    if count_word is not None:
        return f"{count_word} {head}"
    return with_article(head) if e.count == 1 else f"{COUNT_WORDS[e.count]} {head}"


# ----------------------------------------------------------------------------- files


def world_dir(cfg: WorldConfig, cache: Path) -> Path:
    """cache/world/<key>: the key hashes the config and the generator version."""
    text = json.dumps(asdict(cfg), sort_keys=True) + GENERATOR_VERSION
    return Path(cache) / "world" / hashlib.sha1(text.encode()).hexdigest()[:12]


def write_json(path: Path, obj: Any) -> None:
    """Compact ASCII JSON plus a newline: the byte layout of every annotation file."""
    path.write_text(json.dumps(obj, separators=(",", ":"), ensure_ascii=True) + "\n")

