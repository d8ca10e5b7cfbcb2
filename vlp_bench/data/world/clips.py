"""The tiny world's clips: short videos of its shapes doing one thing, with five references each,
in the MSR-VTT annotation layout that vlp_bench.data.video reads for real MSR-VTT too.

A clip holds an *actor* (one shape) and, half the time, a still *bystander*. The actor does one
of five things over `clip_frames` frames; the first four can only be told apart from their time
reversal by the order of the frames, which averaging the frames throws away:

    moves       slides left, right, up or down by about 40% of the image ("moves to the left")
    appears     absent in the first half of the clip, present in the second
    disappears  the reverse
    turns       one colour in the first half, another in the second ("a red circle turns blue")
    stays       still in every frame (the control: nothing to get wrong about time)

The MSR-VTT `category` of a clip is its event (ids in EVENTS' order); the annotation also lists
the categories with a `temporal` flag (an extra key), so the video captioning task can score the
clips that need frame order apart from the others. Everything about clip `k` is drawn from
generators seeded by (seed, k) alone, as for the images.

Layout (inside the world directory, beside images/ and annotations/):

    msrvtt/videodatainfo.json        {"videos": [{video_id, id, split, category}], "sentences":
                                      [{video_id, sen_id, caption}], "categories": [...]}
    msrvtt/videos/video{k}/{t:02d}.png   the frames of clip k (splits: train, validate, test)
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np

from vlp_bench.data.world.scenes import (
    COLOR_SYNONYMS,
    COLORS,
    EXTENT,
    GENERATOR_VERSION,
    IMAGE_WORDS,
    SHAPE_SYNONYMS,
    SIZES,
    Entity,
    Obj,
    Scene,
    WorldConfig,
    jittered_rgb,
    noun_phrase,
    render,
    sample_background,
    sample_kind,
    write_json,
)
from vlp_bench.log import note

EVENTS = ("moves", "appears", "disappears", "turns", "stays")
TEMPORAL = ("moves", "appears", "disappears", "turns")  # reversing the clip changes what is true
_EVENT_WEIGHTS = (0.35, 0.15, 0.15, 0.2, 0.15)
MSRVTT_SPLITS = {"train": "train", "val": "validate", "test": "test"}  # ours -> MSR-VTT's names
DIRECTIONS = ("left", "right", "up", "down")
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_ADVERB = {"left": ["left", "to the left"], "right": ["right", "to the right"], "up": ["up", "upwards"],
           "down": ["down", "downwards"]}
_FROM_TO = {"left": ("right", "left"), "right": ("left", "right"), "up": ("bottom", "top"), "down": ("top", "bottom")}


def _obj(shape: str, color: str, size: str, x: float, y: float, r: float, rng: np.random.Generator) -> Obj:
    """An object at a (rounded) point of a path, its colour jittered by `rng`."""
    return Obj(shape, color, size, int(round(x)), int(round(y)), round(r, 3), jittered_rgb(color, rng))


def _clear(path: list[tuple[float, float]], r: float, other: Obj | None, gap: float) -> bool:
    """Whether an object of radius `r` keeps `gap` clear of `other` all along `path`."""
    return other is None or all(math.hypot(x - other.x, y - other.y) >= EXTENT * (r + other.r) + gap
                                for x, y in path)


def sample_clip(cfg: WorldConfig, rng: np.random.Generator) -> tuple[dict, list[Scene]]:
    """(facts, one scene per frame): the event, the actor's attributes, and the bystander's."""
    S, F = cfg.image_size, cfg.clip_frames
    background = sample_background(rng)
    event = EVENTS[rng.choice(len(EVENTS), p=_EVENT_WEIGHTS)]
    while True:  # retried with fresh draws in the rare case the actor's path does not fit
        shape, color = sample_kind(rng)
        size = "large" if rng.random() < 0.4 else "small"
        r = SIZES[size] * S
        lo, hi = EXTENT * r, S - EXTENT * r
        direction, dist = DIRECTIONS[rng.integers(4)], rng.uniform(0.35, 0.45) * S
        dx, dy = _STEP[direction] if event == "moves" else (0, 0)
        # the start leaves room for the whole path inside the image
        x0 = rng.uniform(lo - min(0, dx) * dist, hi - max(0, dx) * dist)
        y0 = rng.uniform(lo - min(0, dy) * dist, hi - max(0, dy) * dist)
        path = [(x0 + dx * dist * t / (F - 1), y0 + dy * dist * t / (F - 1)) for t in range(F)]
        bystander = None
        if rng.random() < 0.5:
            for _ in range(200):
                b_shape, b_color = sample_kind(rng)
                if (b_shape, b_color) == (shape, color):
                    continue
                br = SIZES["small"] * S
                bx, by = rng.uniform(EXTENT * br, S - EXTENT * br, size=2)
                candidate = _obj(b_shape, b_color, "small", bx, by, br, rng)
                if _clear(path, r, candidate, 0.03 * S):
                    bystander = candidate
                    break
            else:
                continue
        break
    second = color
    if event == "turns":
        second = rng.choice([c for c in COLORS if c != color])
    half = F // 2
    actor = {t: _obj(shape, second if event == "turns" and t >= half else color, size, x, y, r, rng)
             for t, (x, y) in enumerate(path)}
    if event == "appears":
        actor = {t: o for t, o in actor.items() if t >= half}
    elif event == "disappears":
        actor = {t: o for t, o in actor.items() if t < half}
    scenes = [Scene(S, background, [o for o in (actor.get(t), bystander) if o is not None]) for t in range(F)]
    facts = {"event": event, "shape": shape, "color": color, "size": size, "direction": direction if event == "moves"
             else None, "new_color": second if event == "turns" else None,
             "bystander": None if bystander is None else {"shape": bystander.shape, "color": bystander.color}}
    return facts, scenes


def _entity(color: str, shape: str, size: str | None = None) -> Entity:
    return Entity(color, shape, [Obj(shape, color, size or "small", 0, 0, 0.0, (0, 0, 0))])


def _event_phrases(f: dict, rng: random.Random) -> list[str]:
    """Statements about the actor, each true of the clip and false of its time reversal (but
    for "stays")."""
    actor = _entity(f["color"], f["shape"], f["size"])
    a = noun_phrase(actor, rng, size_p=0.3)
    shape = rng.choice(SHAPE_SYNONYMS[f["shape"]])
    img = rng.choice(IMAGE_WORDS)
    event = f["event"]
    if event == "moves":
        d = f["direction"]
        start, end = _FROM_TO[d]
        return [f"{a} moves {rng.choice(_ADVERB[d])}", f"{a} slides {rng.choice(_ADVERB[d])}",
                f"{a} moving {rng.choice(_ADVERB[d])}", f"{a} travels from the {start} to the {end}",
                f"{a} goes {rng.choice(_ADVERB[d])} across the {img}"]
    if event == "appears":
        return [f"{a} appears", f"{a} shows up", f"suddenly {a} appears", f"{a} comes into view",
                f"{a} pops up in the {img}"]
    if event == "disappears":
        return [f"{a} disappears", f"{a} vanishes", f"{a} disappears from the {img}", f"{a} goes away",
                f"suddenly {a} vanishes"]
    if event == "turns":
        old, new = f["color"], rng.choice(COLOR_SYNONYMS[f["new_color"]])
        return [f"{a} turns {new}", f"{a} changes color to {new}", f"the {shape} changes from {old} to {new}",
                f"a {shape} turning from {old} to {new}", f"{a} becomes {new}"]
    return [f"{a} stays still", f"{a} does not move", f"{a} sits still", f"a still {img} of {a}",
            f"{a} remains in place"]


def clip_captions(f: dict, rng: random.Random, n: int = 5) -> list[str]:
    """`n` distinct references: the event phrases, some naming the still bystander too."""
    phrases = _event_phrases(f, rng)
    rng.shuffle(phrases)
    captions: list[str] = []
    b = f["bystander"]
    for text in phrases:
        if b is not None and rng.random() < 0.4:
            other = noun_phrase(_entity(b["color"], b["shape"]), rng, size_p=0.0)
            also = " also" if f["event"] == "stays" else ""
            text += rng.choice([f" while {other}{also} stays still", f" next to {other}", f" and {other}{also} does not move"])
        text = text + "." if rng.random() < 0.15 else text
        if text not in captions:
            captions.append(text)
    return captions[:n]


def _clip(cfg: WorldConfig, k: int) -> tuple[dict, list[Scene], np.random.Generator]:
    """Clip k's facts and scenes, and the stream its frames' noise is then drawn from."""
    pix_rng = np.random.default_rng([cfg.seed, 1_000_000_007, k])  # never an image's stream
    facts, scenes = sample_clip(cfg, pix_rng)
    return facts, scenes, pix_rng


def _sizes(cfg: WorldConfig) -> dict[str, int]:
    return {"train": cfg.n_clips_train, "val": cfg.n_clips_val, "test": cfg.n_clips_test}


def generate_clips(cfg: WorldConfig, out: Path, frames: bool = True) -> dict:
    """Write msrvtt/ under `out` (its frames, msrvtt/videos/, only with `frames`: write_clip_frames
    adds them later, the same bytes); returns the clip and caption counts per split."""
    (out / "msrvtt").mkdir()
    videos, sentences, facts_out = [], [], []
    counts: dict[str, dict[str, int]] = {"clips": {}, "clip_captions": {}}
    k = 0
    for split, size in _sizes(cfg).items():
        n_caps = len(sentences)
        for _ in range(size):
            vid = f"video{k}"
            facts = _clip(cfg, k)[0]
            videos.append({"video_id": vid, "id": k, "split": MSRVTT_SPLITS[split],
                           "category": EVENTS.index(facts["event"]), "url": "", "start time": 0.0,
                           "end time": float(cfg.clip_frames)})
            for text in clip_captions(facts, random.Random(f"clip-captions:{cfg.seed}:{k}")):
                sentences.append({"video_id": vid, "sen_id": len(sentences), "caption": text})
            facts_out.append({"video_id": vid, "split": split, **facts})
            k += 1
        counts["clips"][split] = size
        counts["clip_captions"][split] = len(sentences) - n_caps
    write_json(out / "msrvtt" / "videodatainfo.json", {
        "info": {"description": "tiny world clips", "version": GENERATOR_VERSION, "frames": cfg.clip_frames},
        "videos": videos, "sentences": sentences,
        "categories": [{"id": i, "name": e, "temporal": e in TEMPORAL} for i, e in enumerate(EVENTS)]})
    write_json(out / "msrvtt" / "clips.json", {"clips": facts_out})
    if frames:
        (out / "msrvtt" / "videos").mkdir()
        write_clip_frames(cfg, out / "msrvtt" / "videos")
    return counts


def write_clip_frames(cfg: WorldConfig, videos_dir: Path) -> None:
    """Render every clip's frames into `videos_dir`/video{k}/{t:02d}.png (an empty directory)."""
    total = sum(_sizes(cfg).values())
    for k in range(total):
        _, scenes, pix_rng = _clip(cfg, k)
        (videos_dir / f"video{k}").mkdir()
        for t, scene in enumerate(scenes):
            render(scene, pix_rng).save(videos_dir / f"video{k}" / f"{t:02d}.png", format="PNG", compress_level=1)
        if (k + 1) % 500 == 0 or k + 1 == total:
            note(f"tiny world: {k + 1}/{total} clips")


# ----------------------------------------------------------------------------- reading captions back

_DIRECTION_WORDS = {"left": "left", "right": "right", "up": "up", "upwards": "up", "top": "up", "down": "down",
                    "downwards": "down", "bottom": "down"}
_APPEAR = ("appear", "shows up", "show up", "comes into view", "pops up")
_DISAPPEAR = ("disappear", "vanish", "goes away")


def said_order(facts: dict, caption: str) -> bool | None:
    """Whether a caption of a clip states its event the right way round: the direction it moved
    to, that it appeared rather than disappeared (or the reverse), the colour it turned; False
    when it says the time-reversed event (or none of it), None for clips whose event has no order."""
    if facts["event"] not in TEMPORAL:
        return None
    text = " " + caption.lower().rstrip(".") + " "
    for clause in (" while ", " next to ", " and "):  # the bystander's part says nothing about the actor
        text = text.split(clause)[0]
    words = text.split()
    if facts["event"] == "moves":
        said = [_DIRECTION_WORDS[w] for w in words if w in _DIRECTION_WORDS]
        return bool(said) and said[-1] == facts["direction"]  # "from the right to the left": the last one
    if facts["event"] in ("appears", "disappears"):
        appears = any(p in text for p in _APPEAR) and not any(p in text for p in _DISAPPEAR)
        disappears = any(p in text for p in _DISAPPEAR)
        return appears if facts["event"] == "appears" else disappears
    colors = [c for w in words for c, names in COLOR_SYNONYMS.items() if w in names]
    return bool(colors) and colors[-1] == facts["new_color"]  # "a red circle turns blue": the last colour
