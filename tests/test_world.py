"""Tests for the tiny world generator (vlp_bench.data.world): formats, determinism, truthfulness."""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlp_bench.errors import UserError
from vlp_bench.data.world import (
    COLOR_SYNONYMS,
    COLORS,
    EXTENT,
    SHAPE_SYNONYMS,
    SHAPES,
    SIZE_SYNONYMS,
    WorldConfig,
    build_world,
    load_coco_captions,
    region,
    world_dir,
)

SMALL = WorldConfig(n_train=40, n_val=10, n_test=10, n_clips_train=12, n_clips_val=4, n_clips_test=4)
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, float]:
    start = time.perf_counter()
    d = build_world(SMALL, tmp_path_factory.mktemp("cache"))
    return d, time.perf_counter() - start


@pytest.fixture(scope="module")
def world(built) -> Path:
    return built[0]


def _json(path: Path):
    return json.loads(path.read_text())


def _scenes(world: Path) -> dict[int, dict]:
    return {s["image_id"]: s for s in _json(world / "scenes.json")["scenes"]}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- building


def test_world_dir_is_a_stable_short_hash(tmp_path):
    d = world_dir(SMALL, tmp_path)
    assert d.parent == tmp_path / "world"
    assert re.fullmatch(r"[0-9a-f]{12}", d.name)
    assert world_dir(WorldConfig(n_train=40, n_val=10, n_test=10, n_clips_train=12, n_clips_val=4, n_clips_test=4), tmp_path) == d
    assert world_dir(WorldConfig(n_train=40, n_val=10, n_test=10, n_clips_train=12, n_clips_val=4, n_clips_test=4, seed=1), tmp_path) != d


def test_build_is_deterministic(world, tmp_path):
    again = build_world(SMALL, tmp_path / "other")
    assert again != world
    a, b = _files(world), _files(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_seed_changes_the_world(world, tmp_path):
    other = build_world(WorldConfig(n_train=40, n_val=10, n_test=10, n_clips_train=12, n_clips_val=4, n_clips_test=4, seed=1), tmp_path)
    assert other.name != world.name
    for name in ("scenes.json", "annotations/captions_train.json", "vqa/annotations_train.json", "images/000001.png"):
        assert (other / name).read_bytes() != (world / name).read_bytes()


def test_rebuild_is_immediate_and_leaves_no_temporary_dirs(world):
    done = (world / "DONE").stat().st_mtime_ns
    start = time.perf_counter()
    assert build_world(SMALL, world.parent.parent) == world
    assert time.perf_counter() - start < 0.5
    assert (world / "DONE").stat().st_mtime_ns == done
    assert [p.name for p in world.parent.iterdir()] == [world.name]


def test_incomplete_directory_is_rebuilt(tmp_path):
    d = world_dir(SMALL, tmp_path)
    d.mkdir(parents=True)
    (d / "junk").write_text("half a world")
    assert build_world(SMALL, tmp_path) == d
    assert (d / "DONE").is_file() and not (d / "junk").exists()


@pytest.mark.parametrize("change", [{"n_train": 0}, {"image_size": 8}, {"max_objects": 9},
                                    {"questions_per_image": 0}, {"seed": -1}, {"n_val": 1.5},
                                    {"n_clips_test": 0}, {"clip_frames": 1}])
def test_bad_config_is_a_user_error(tmp_path, change):
    with pytest.raises(UserError):
        build_world(WorldConfig(**change), tmp_path)


@pytest.mark.slow
def test_default_config_builds(tmp_path):
    d = build_world(WorldConfig(), tmp_path)
    info = _json(d / "world.json")
    assert info["counts"]["images"] == {"train": 4000, "val": 200, "test": 300}
    assert info["counts"]["clips"] == {"train": 1000, "val": 100, "test": 200}


# ----------------------------------------------------------------------------- layout and formats


def test_world_json(world):
    info = _json(world / "world.json")
    assert info["config"]["n_train"] == 40
    assert info["counts"]["images"] == {"train": 40, "val": 10, "test": 10}
    assert info["counts"]["captions"] == {"train": 200, "val": 50, "test": 50}
    assert info["counts"]["questions"] == {"train": 120, "val": 30, "test": 30}
    assert (world / "DONE").is_file()


def test_caption_files_are_coco_format_with_five_distinct_captions(world):
    all_ids: list[int] = []
    ann_ids: list[int] = []
    for split in SPLITS:
        data = _json(world / "annotations" / f"captions_{split}.json")
        assert data["type"] == "captions" and data["licenses"] == [] and isinstance(data["info"], dict)
        images, refs = load_coco_captions(world / "annotations" / f"captions_{split}.json")
        assert images == data["images"]
        for im in images:
            assert set(im) == {"id", "file_name", "height", "width"}
            assert im["file_name"] == f"{im['id']:06d}.png"
            assert im["height"] == im["width"] == SMALL.image_size
            caps = refs[im["id"]]
            assert len(caps) == 5
            assert len({c.rstrip(".") for c in caps}) == 5, caps
            for c in caps:
                assert c == c.lower() and c.strip() == c and "  " not in c
        all_ids += [im["id"] for im in images]
        ann_ids += [a["id"] for a in data["annotations"]]
    assert sorted(all_ids) == list(range(1, 61))
    assert len(set(ann_ids)) == len(ann_ids)


def test_images_are_rgb_pngs_of_the_right_size(world):
    files = sorted((world / "images").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(1, 61)]
    for f in files[:10]:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)


def test_vqa_files_have_the_vqav2_format(world):
    qids = []
    for split in SPLITS:
        qs = _json(world / "vqa" / f"questions_{split}.json")
        ans = _json(world / "vqa" / f"annotations_{split}.json")
        assert qs["task_type"] == "Open-Ended" and qs["data_subtype"] == split and qs["data_type"] == "tinyworld"
        assert ans["data_subtype"] == split and "license" in ans and "info" in ans
        questions, annotations = qs["questions"], ans["annotations"]
        assert [q["question_id"] for q in questions] == [a["question_id"] for a in annotations]
        per_image = Counter(q["image_id"] for q in questions)
        assert set(per_image.values()) == {SMALL.questions_per_image}
        for q, a in zip(questions, annotations):
            assert q["image_id"] == a["image_id"] and q["question"].endswith("?")
            assert a["answer_type"] in {"yes/no", "number", "other"}
            assert [h["answer_id"] for h in a["answers"]] == list(range(1, 11))
            assert {h["answer_confidence"] for h in a["answers"]} <= {"yes", "maybe", "no"}
            raw = Counter(h["answer"] for h in a["answers"])
            top = raw[a["multiple_choice_answer"]]
            assert top == max(raw.values()) and list(raw.values()).count(top) == 1
            mc = a["multiple_choice_answer"]
            if a["answer_type"] == "yes/no":
                assert mc in {"yes", "no"}
            elif a["answer_type"] == "number":
                assert mc.isdigit()
        qids += [q["question_id"] for q in questions]
    assert len(set(qids)) == len(qids)
    assert len(qids) == 60 * SMALL.questions_per_image


def test_answers_vary_like_a_crowd(world):
    answers = [a for split in SPLITS for a in _json(world / "vqa" / f"annotations_{split}.json")["annotations"]]
    disagree = sum(len({h["answer"] for h in a["answers"]}) > 1 for a in answers)
    assert 0.3 * len(answers) < disagree < len(answers)
    types = Counter(a["answer_type"] for a in answers)
    assert set(types) == {"yes/no", "number", "other"}


def test_load_coco_captions_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "captions_train.json"
    with pytest.raises(UserError, match=re.escape(str(missing))):
        load_coco_captions(missing)
    bad = tmp_path / "bad.json"
    for text in ("{not json", '{"images": []}', '{"images": [{"id": 1}], "annotations": [{"image_id": 2, "caption": "x"}]}'):
        bad.write_text(text)
        with pytest.raises(UserError, match=re.escape(str(bad))):
            load_coco_captions(bad)


# ----------------------------------------------------------------------------- content is true


def test_scenes_are_valid_and_include_counting(world):
    scenes = _scenes(world)
    assert sorted(scenes) == list(range(1, 61))
    groups = 0
    for s in scenes.values():
        objs = s["objects"]
        assert 1 <= len(objs) <= SMALL.max_objects
        for o in objs:
            assert o["shape"] in SHAPES and o["color"] in COLORS and o["size"] in ("small", "large")
            assert EXTENT * o["r"] <= o["x"] <= 64 - EXTENT * o["r"]
            assert EXTENT * o["r"] <= o["y"] <= 64 - EXTENT * o["r"]
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                assert math.hypot(a["x"] - b["x"], a["y"] - b["y"]) >= EXTENT * (a["r"] + b["r"])
        groups += any(c >= 2 for c in Counter((o["color"], o["shape"]) for o in objs).values())
    assert groups >= 3


def _alternation(words) -> str:
    return "|".join(sorted({re.escape(w) for w in words}, key=len, reverse=True))


_COLOR = {w: c for c, ws in COLOR_SYNONYMS.items() for w in ws}
_SHAPE = {w: s for s, ws in SHAPE_SYNONYMS.items() for w in ws} | {
    w + ("es" if w.endswith(("s", "x")) else "s"): s for s, ws in SHAPE_SYNONYMS.items() for w in ws}
_SIZE = {w: s for s, ws in SIZE_SYNONYMS.items() for w in ws}
_COUNT = {"a": 1, "an": 1, "one": 1, "a single": 1, "a lone": 1, "just one": 1, "only one": 1,
          "two": 2, "a pair of": 2, "three": 3, "four": 4}
NP = (rf"\b(?:({_alternation(_COUNT)}) )(?:({_alternation(_SIZE)}) )?({_alternation(_COLOR)}) "
      rf"({_alternation(_SHAPE)})\b")
REL = {"to the left of": "left", "left of": "left", "to the right of": "right", "right of": "right",
       "above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below"}


def _members(scene: dict, m: re.Match) -> list[dict]:
    """The objects a noun phrase names, checking its count and size against the scene."""
    count, size, color, shape = m.groups()
    members = [o for o in scene["objects"] if o["color"] == _COLOR[color] and o["shape"] == _SHAPE[shape]]
    assert len(members) == _COUNT[count], (m.group(0), scene)
    if size:
        assert all(o["size"] == _SIZE[size] for o in members), (m.group(0), scene)
    return members


def _rel(a: dict, b: dict) -> str:
    """Where a is relative to b along the dominant axis."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def test_captions_are_true_to_the_scene(world):
    scenes = _scenes(world)
    np_re = re.compile(NP)
    rel_re = re.compile(rf"({NP}) (?:is |are )?({_alternation(REL)}) ({NP})")
    pair_re = re.compile(rf"({NP}) and ({NP}) (side by side|next to each other|beside each other|"
                         rf"one above the other|stacked vertically)")
    loc_re = re.compile(rf"({NP}) (?:in|at|on|near) the (top|bottom|upper|lower|left|right|middle|center)\b(?: (left|right)\b)?")
    total_re = re.compile(rf"\b(two|three|four) (?:({_alternation(_COLOR)}) )?(shapes|objects)\b")
    checked = Counter()
    for split in SPLITS:
        _, refs = load_coco_captions(world / "annotations" / f"captions_{split}.json")
        for image_id, caps in refs.items():
            scene = scenes[image_id]
            colors = {o["color"] for o in scene["objects"]}
            mentioned = set()
            for cap in caps:
                mentioned |= {_COLOR[w] for w in re.findall(r"[a-z]+", cap) if w in _COLOR}
                for m in np_re.finditer(cap):
                    _members(scene, m)
                    checked["noun phrases"] += 1
                for m in rel_re.finditer(cap):
                    a = _members(scene, np_re.fullmatch(m.group(1)))
                    b = _members(scene, np_re.fullmatch(m.group(7)))
                    assert {_rel(p, q) for p in a for q in b} == {REL[m.group(6)]}, (cap, scene)
                    checked["relations"] += 1
                for m in pair_re.finditer(cap):
                    a = _members(scene, np_re.fullmatch(m.group(1)))
                    b = _members(scene, np_re.fullmatch(m.group(6)))
                    axis = {"left", "right"} if "above" not in m.group(11) and "vertical" not in m.group(11) else {"above", "below"}
                    assert {_rel(p, q) for p in a for q in b} <= axis, (cap, scene)
                    checked["pairs"] += 1
                for m in loc_re.finditer(cap):
                    (obj,) = _members(scene, np_re.fullmatch(m.group(1)))
                    words = {"upper": "top", "lower": "bottom", "center": "middle"}
                    said = {words.get(w, w) for w in m.groups()[-2:] if w}
                    assert said <= set(region(obj["x"], obj["y"], 64).split()), (cap, scene)
                    checked["locations"] += 1
                for m in total_re.finditer(cap):
                    n = {"two": 2, "three": 3, "four": 4}[m.group(1)]
                    objs = [o for o in scene["objects"] if not m.group(2) or o["color"] == _COLOR[m.group(2)]]
                    assert len(objs) == n, (cap, scene)
                    checked["totals"] += 1
            assert mentioned == colors, (caps, scene)  # no invented colour, none forgotten
    assert min(checked.values()) > 5 and len(checked) == 5, checked


def test_captions_are_varied(world):
    _, refs = load_coco_captions(world / "annotations" / "captions_train.json")
    caps = [c for cs in refs.values() for c in cs]
    most = Counter(caps).most_common(1)[0][1]
    assert most <= 3
    assert len(set(caps)) > 0.8 * len(caps)
    assert any(c.endswith(".") for c in caps) and sum(c.endswith(".") for c in caps) < 0.4 * len(caps)


def test_vqa_answers_are_true_to_the_scene(world):
    """Recompute counting, existence and colour answers from the scene facts."""
    scenes = _scenes(world)
    plural = {s + ("es" if s.endswith("s") else "s"): s for s in SHAPES}
    checked = Counter()
    for split in SPLITS:
        qs = _json(world / "vqa" / f"questions_{split}.json")["questions"]
        ans = _json(world / "vqa" / f"annotations_{split}.json")["annotations"]
        for q, a in zip(qs, ans):
            objs = scenes[q["image_id"]]["objects"]
            text, mc = q["question"], a["multiple_choice_answer"]
            if m := re.fullmatch(r"how many (?:(\w+) )?(\w+) are there\?", text):
                color, noun = m.groups()
                hits = [o for o in objs if (color is None or o["color"] == color)
                        and (noun in ("objects", "shapes") or o["shape"] == plural[noun])]
                assert mc == str(len(hits)), (text, objs)
                checked["count"] += 1
            elif m := re.fullmatch(r"is there an? (\w+) (\w+)\?", text):
                there = any(o["color"] == m.group(1) and o["shape"] == m.group(2) for o in objs)
                assert mc == ("yes" if there else "no"), (text, objs)
                checked["exist"] += 1
            elif m := re.fullmatch(r"what (?:color is the|is the color of the) (?:(small|large) )?(\w+)\?", text):
                size, shape = m.groups()
                hits = [o for o in objs if shape in (o["shape"], "object") and size in (o["size"], None)]
                assert len(hits) == 1 and mc == hits[0]["color"], (text, objs)
                checked["color"] += 1
            elif m := re.fullmatch(r"where is the (.+)\?", text):
                words = m.group(1).split()
                hits = [o for o in objs if all(w in (o["size"], o["color"], o["shape"], "object") for w in words)]
                assert len(hits) == 1 and mc == region(hits[0]["x"], hits[0]["y"], 64), (text, objs)
                checked["where"] += 1
    assert min(checked.values()) >= 3 and len(checked) == 4, checked
