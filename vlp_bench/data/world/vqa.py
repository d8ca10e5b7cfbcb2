"""VQA questions about a tiny world still, with ten crowd answers each (VQAv2 style).

Questions are only asked when the answer is unambiguous: referring expressions are the shortest
attribute combination that picks out exactly one object. Ten human answers per question mix the
canonical answer with surface variants that the official VQA normaliser maps back ("Two",
"the left", "a circle", "yes."), sensible near misses ("violet", "big") and a few wrong answers;
the canonical answer is always the most frequent raw answer.
"""

from __future__ import annotations

import random
from collections import Counter

from vlp_bench.data.world.scenes import (
    COLORS,
    COUNT_WORDS,
    OPPOSITE,
    REGIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    plural,
    region,
    relation,
    with_article,
)


def _surface_variants(answer: str, answer_type: str) -> list[str]:
    """Spellings the official VQA normaliser maps back onto `answer` ("Two", "the left", "red.")."""
    if answer_type == "number":
        return [COUNT_WORDS.get(int(answer), "zero"), answer + ".", COUNT_WORDS.get(int(answer), "zero").capitalize()]
    variants = [answer.capitalize(), answer + "."]
    if answer_type == "other":
        variants += ["the " + answer if answer in REGIONS else with_article(answer) if answer in SHAPES else answer.upper()]
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


def _refer(scene: Scene, target: Obj, exclude: str) -> str | None:
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


def _question_candidates(scene: Scene, rng: random.Random) -> dict[str, list[tuple[str, str, str, str]]]:
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
            c["color"].append((f"what color are the {plural(shape)}?", members[0].color, "other", "what color are the"))
    # counting: present shapes / colours / coloured shapes, all objects, and occasionally absent ones
    count_q = [(f"how many {plural(s)} are there?", sum(o.shape == s for o in objs)) for s in SHAPES]
    count_q += [(f"how many {col} objects are there?", sum(o.color == col for o in objs)) for col in COLORS]
    count_q += [(f"how many {e.color} {plural(e.shape)} are there?", e.count) for e in scene.entities]
    count_q += [(f"how many {rng.choice(['objects', 'shapes'])} are there?", len(objs))]
    zeros = [q for q in count_q if q[1] == 0]
    count_q = [q for q in count_q if q[1] > 0] + rng.sample(zeros, min(1, len(zeros)))
    c["count"] = [(q, str(n), "number", "how many") for q, n in count_q]
    # existence: present coloured shapes, and absent ones sharing a colour or shape with the scene
    present = {(e.color, e.shape) for e in scene.entities}
    c["exist"] = [(f"is there {with_article(f'{col} {sh}')}?", "yes", "yes/no", "is there a") for col, sh in sorted(present)]
    absent = [(col, sh) for col in COLORS for sh in SHAPES if (col, sh) not in present
              and any(col == pc or sh == ps for pc, ps in present)]
    c["exist"] += [(f"is there {with_article(f'{col} {sh}')}?", "no", "yes/no", "is there a")
                   for col, sh in rng.sample(absent, min(3, len(absent)))]
    # relations between single objects that can be named
    for a in objs:
        for b in objs:
            if a is b or not (rel := relation(a, b, S)):
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


def make_questions(scene: Scene, rng: random.Random, n: int) -> list[tuple[str, str, str, str]]:
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


def vqa_entries(scene: Scene, rng: random.Random, n: int, image_id: int) -> tuple[list[dict], list[dict]]:
    """`n` questions about image `image_id` with their crowd answers, as VQAv2 entries: (questions,
    annotations)."""
    questions, annotations = [], []
    for k, (q, a, atype, qtype) in enumerate(make_questions(scene, rng, n)):
        qid = image_id * 1000 + k  # the VQAv2 convention
        questions.append({"image_id": image_id, "question": q, "question_id": qid})
        human = _human_answers(a, atype, rng)
        most = Counter(h["answer"] for h in human).most_common(1)[0][0]
        annotations.append({"question_id": qid, "image_id": image_id, "question_type": qtype,
                            "answer_type": atype, "multiple_choice_answer": most, "answers": human})
    return questions, annotations
