"""Captions of a tiny world still: 5 true references per image, written like an annotator crowd.

Descriptions are built from the scene facts only: objects with the same colour and shape form one
*entity* ("two red circles"), relations between entities are stated only when every member pair
agrees clearly on one axis, and locations in the image only when the object lies clearly inside
a third of the image. The 5 references come from different templates (full listings, pairwise
relations, "side by side", only the salient object, counts, locations, colours only), with
synonyms (square/box, big/large, picture/image, ...), varied word order, some with a final
period. Every statement is true for the image.
"""

from __future__ import annotations

import random
from typing import Callable

from vlp_bench.data.world.scenes import (
    COLOR_SYNONYMS,
    COLORS,
    COUNT_WORDS,
    IMAGE_WORDS,
    REL_PHRASES,
    SIZE_SYNONYMS,
    Entity,
    Scene,
    join_words,
    noun_phrase,
    region,
    relation,
    with_article,
)


def _be(e: Entity) -> str:
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


def _obj_region(e: Entity, S: int) -> str | None:
    return region(e.members[0].x, e.members[0].y, S) if e.count == 1 else None


def _cap_list(s: Scene, rng: random.Random) -> str:
    ents = list(s.entities)
    rng.shuffle(ents)
    body = join_words([noun_phrase(e, rng) for e in ents])
    img = rng.choice(IMAGE_WORDS)
    return rng.choice([
        body,
        f"there {_be(ents[0])} {body}",
        f"{with_article(img)} of {body}",
        f"{with_article(img)} with {body}",
        f"{body} on a {rng.choice(['plain', 'light', 'pale'])} background",
        f"this {img} shows {body}",
    ])


def _cap_relation(s: Scene, rng: random.Random) -> str | None:
    if not s.pairs:
        return None
    a, b, rel = rng.choice(s.pairs)
    na, nb, phrase = noun_phrase(a, rng), noun_phrase(b, rng), rng.choice(REL_PHRASES[rel])
    return rng.choice([f"{na} {phrase} {nb}", f"{na} {_be(a)} {phrase} {nb}", f"there {_be(a)} {na} {phrase} {nb}"])


def _cap_side_by_side(s: Scene, rng: random.Random) -> str | None:
    if not s.pairs:
        return None
    a, b, rel = rng.choice(s.pairs)
    if rel in ("left", "right"):
        tail = rng.choice(["side by side", "next to each other", "beside each other"])
    else:
        tail = rng.choice(["one above the other", "stacked vertically"])
    return f"{noun_phrase(a, rng)} and {noun_phrase(b, rng)} {tail}"


def _cap_salient(s: Scene, rng: random.Random) -> str:
    biggest = max(s.objects, key=lambda o: o.r)  # first of the largest
    e = next(e for e in s.entities if biggest in e.members)
    text = noun_phrase(e, rng, size_p=0.6)
    reg = _obj_region(e, s.image_size)
    if reg and rng.random() < 0.5:
        text += " " + _location(reg, rng)
    return rng.choice([text, text, f"{with_article(rng.choice(IMAGE_WORDS))} of {text}"])


def _cap_location(s: Scene, rng: random.Random) -> str | None:
    located = [e for e in s.entities if _obj_region(e, s.image_size)]
    if not located:
        return None
    rng.shuffle(located)
    parts = [f"{noun_phrase(e, rng)} {_location(_obj_region(e, s.image_size), rng)}" for e in located[:2]]
    text = " and ".join(parts)
    return text if rng.random() < 0.7 else f"there is {text}"


def _cap_count(s: Scene, rng: random.Random) -> str | None:
    n = len(s.objects)
    if n < 2:
        return None
    N = COUNT_WORDS[n]
    noun = rng.choice(["shapes", "objects", "shapes"])
    options = [f"{N} {noun}: {join_words([noun_phrase(x, rng) for x in s.entities])}"] if len(s.entities) > 1 else []
    partial = [e for e in s.entities if e.count < n]  # "including" needs something else besides
    if partial:
        e = rng.choice(partial)
        options += [f"{N} {noun} including {noun_phrase(e, rng)}",
                    f"{with_article(rng.choice(IMAGE_WORDS))} with {N} {noun}, among them {noun_phrase(e, rng)}"]
        if e.count == 1:
            options.append(f"{N} {noun}, one of them {noun_phrase(e, rng)}")
    colors = {o.color for o in s.objects}
    if len(colors) == 1 and rng.random() < 0.5:  # true but vague: not too often
        options.append(f"{N} {rng.choice(COLOR_SYNONYMS[colors.pop()])} {noun}")
    return rng.choice(options) if options else None


def _cap_group(s: Scene, rng: random.Random) -> str | None:
    """About one group of identical shapes: its layout or its sizes."""
    groups = [e for e in s.entities if e.count >= 2]
    if not groups:
        return None
    e = rng.choice(groups)
    text = noun_phrase(e, rng, size_p=0.2)
    if e.count == 2 and rng.random() < 0.3:
        text = "a pair of " + text.removeprefix("two ")
    options = []
    rels = {relation(p, q, s.image_size) for p in e.members for q in e.members if p is not q}
    if rels <= {"left", "right"}:
        options += [f"{text} side by side", f"{text} next to each other"]
    if rels <= {"above", "below"}:
        options += [f"{text}, one above the other", f"{text} stacked vertically"]
    if e.count == 2 and e.size is None:
        big, small = rng.choice(SIZE_SYNONYMS["large"]), rng.choice(SIZE_SYNONYMS["small"])
        options += [f"{text}, one {big} and one {small}", f"{text} of different sizes"]
    if not options:
        options = [f"{text} on a plain background", f"{with_article(rng.choice(IMAGE_WORDS))} showing {text}"]
    return rng.choice(options)


def _cap_colors(s: Scene, rng: random.Random) -> str | None:
    colors = list(dict.fromkeys(o.color for o in s.objects))
    if len(colors) < 2:
        return None
    rng.shuffle(colors)
    words = join_words([rng.choice(COLOR_SYNONYMS[c]) for c in colors])
    return rng.choice([f"{words} shapes", f"shapes in {words}", f"{words} shapes on a plain background",
                       f"{with_article(rng.choice(IMAGE_WORDS))} with {words} shapes"])


def _cap_single(s: Scene, rng: random.Random) -> str | None:
    if len(s.objects) != 1:
        return None
    e = s.entities[0]
    lead = rng.choice(["a single", "just one", "a lone", "only one", "one"])
    text = noun_phrase(e, rng, size_p=0.5, count_word=lead)
    return rng.choice([text, text, f"{text} on a plain background", f"{text} in the {rng.choice(IMAGE_WORDS)}"])


_CAPTIONERS: list[tuple[float, Callable[[Scene, random.Random], str | None]]] = [
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


def make_captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
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
