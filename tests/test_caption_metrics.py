"""Tests for vlp_bench.metrics.caption: exact parity with pycocoevalcap's COCOEvalCap.

Every official scoring run starts Java (PTB tokenizer twice, METEOR once), a few seconds
each, so the official results are computed once per module and the tests share them.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from vlp_bench.metrics import caption as caption_metrics
from vlp_bench.metrics.caption import (
    METRIC_NAMES,
    evaluate_files,
    floor_caption,
    floor_scores,
    score_captions,
)
from vlp_bench.errors import UserError

N_IMAGES = 240
N_EXTRA_IMAGES = 20  # in the annotations but never predicted

# Zipf-like vocabulary: a few words everywhere, many words on only a few images, so that
# CIDEr's document frequencies (and therefore the corpus) matter.
COMMON_SUBJECTS = ["man", "woman", "dog", "cat", "person"]
RARE_SUBJECTS = ("giraffe zebra elephant surfer skateboarder chef toddler pilot kite-flyer "
                 "fisherman sheep cow horse parrot pigeon penguin tiger lion bear goat").split()
VERBS = ["sitting", "standing", "riding", "holding", "eating", "walking", "looking at",
         "playing with", "lying", "jumping over"]
COMMON_OBJECTS = ["table", "street", "grass", "water", "bench"]
RARE_OBJECTS = ("surfboard frisbee umbrella laptop pizza sandwich broccoli bicycle "
                "motorcycle suitcase snowboard toaster hydrant kayak tractor lantern "
                "violin hammock canoe trampoline").split()
PLACES = ["in a park", "on the beach", "in a kitchen", "near a building", "at night",
          "in the snow", "by the river", "on a farm", "in a city", "under a bridge"]
ADJECTIVES = ["", "small ", "large ", "red ", "white ", "old ", "young ", "brown "]


def _pick(rng: random.Random, common: list[str], rare: list[str]) -> str:
    return rng.choice(common) if rng.random() < 0.6 else rng.choice(rare)


def _sentence(rng: random.Random, subject: str, obj: str, place: str) -> str:
    templates = [
        "A {adj}{s} {v} a {o} {p}.",
        "a {s} {v} the {o}",
        "The {adj}{s} is {v} a {o} {p}",
        "{p}, a {s} {v} a {adj}{o}.",
        "There is a {s} {v} a {o}",
        "Two {s}s and a {o} {p}!",
    ]
    text = rng.choice(templates).format(
        adj=rng.choice(ADJECTIVES), s=subject, v=rng.choice(VERBS), o=obj, p=place
    )
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def _make_dataset(seed: int = 0) -> tuple[dict[int, list[str]], dict[int, str], list[int]]:
    """(refs, cands, image ids in annotation-file order) with varied, realistic captions."""
    rng = random.Random(seed)
    image_ids = rng.sample(range(1, 1_000_000), N_IMAGES + N_EXTRA_IMAGES)
    refs: dict[int, list[str]] = {}
    cands: dict[int, str] = {}
    for n, image_id in enumerate(image_ids):
        subject = _pick(rng, COMMON_SUBJECTS, RARE_SUBJECTS)
        obj = _pick(rng, COMMON_OBJECTS, RARE_OBJECTS)
        place = rng.choice(PLACES)
        refs[image_id] = [_sentence(rng, subject, obj, place) for _ in range(5)]
        kind = n % 10
        if kind < 4:  # a good guess
            cands[image_id] = _sentence(rng, subject, obj, place)
        elif kind == 4:  # an exact copy of a reference
            cands[image_id] = rng.choice(refs[image_id])
        elif kind == 5:  # right subject, wrong everything else
            cands[image_id] = _sentence(rng, subject, rng.choice(RARE_OBJECTS),
                                        rng.choice(PLACES))
        elif kind == 6:  # bag of random words
            words = COMMON_SUBJECTS + RARE_OBJECTS + VERBS + ["a", "the", "on"]
            cands[image_id] = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        elif kind == 7:  # short
            cands[image_id] = rng.choice([f"a {subject}", f"{obj}", f"A {subject} {place}."])
        elif kind == 8:  # odd formatting: empty, punctuation only, spacing, non-ASCII
            cands[image_id] = rng.choice(["", ".", "   ", f"  A   {subject} ,  {obj} ... ",
                                          f"a {subject} at the café", f"A {subject}'s {obj}"])
        else:  # long and rambling
            cands[image_id] = " and ".join(
                _sentence(rng, subject, obj, place).rstrip(".!") for _ in range(3))
    order = image_ids[:]
    rng.shuffle(order)
    return refs, cands, order


def _write_annotations(path: Path, refs: dict[int, list[str]], order: list[int]) -> Path:
    rng = random.Random(1)
    anns = [{"image_id": i, "id": 0, "caption": c} for i in order for c in refs[i]]
    for ann_id, ann in enumerate(anns):
        ann["id"] = ann_id + 1
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in order]
    rng.shuffle(anns)  # annotations need not be grouped by image
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def _write_results(path: Path, cands: dict[int, str]) -> Path:
    path.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in cands.items()]))
    return path


class _NoSpice:
    """Stand-in for pycocoevalcap's Spice (needs a CoreNLP download unavailable here)."""

    def compute_score(self, gts: Any, res: Any) -> tuple[float, list[Any]]:
        return 0.0, []

    def method(self) -> str:
        return "SPICE"


def _official(annotations: Path, results: Path) -> dict[str, float]:
    """Scores from pycocoevalcap's own COCOEvalCap, run as its README shows."""
    import pycocoevalcap.eval
    from pycocotools.coco import COCO

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pycocoevalcap.eval, "Spice", _NoSpice)
        coco = COCO(str(annotations))
        coco_res = coco.loadRes(str(results))
        evaluator = pycocoevalcap.eval.COCOEvalCap(coco, coco_res)
        evaluator.params["image_id"] = coco_res.getImgIds()
        evaluator.evaluate()
    return {name: evaluator.eval[name] for name in METRIC_NAMES}


@pytest.fixture(scope="module")
def dataset() -> tuple[dict[int, list[str]], dict[int, str], list[int]]:
    return _make_dataset()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, dataset: Any) -> dict[str, Path]:
    refs, cands, order = dataset
    tmp = tmp_path_factory.mktemp("captions")
    predicted = [i for i in order if i in cands]
    # Predictions in an order of their own: scoring must follow the annotation file.
    shuffled = predicted[:]
    random.Random(2).shuffle(shuffled)
    # N_EXTRA_IMAGES images are left out: they have references but no prediction.
    all_cands = {i: cands[i] for i in shuffled[:N_IMAGES]}
    subset_ids = shuffled[:70]
    subset = {i: cands[i] for i in subset_ids}
    # Line breaks in a caption: the official tool handles "\n" (replaced by a space);
    # we also handle the other characters Java ends a line at, which it does not.
    subset_crlf = dict(subset)
    subset_crlf[subset_ids[3]] = "a man\rsitting\x0bon a\u2028bench\u2029in\x0cthe park"
    subset_lf = dict(subset)
    subset_lf[subset_ids[3]] = "a man\nsitting\non a\nbench\nin\nthe park"
    return {
        "annotations": _write_annotations(tmp / "captions_val.json", refs, order),
        "all": _write_results(tmp / "results_all.json", all_cands),
        "subset": _write_results(tmp / "results_subset.json", subset_crlf),
        "subset_lf": _write_results(tmp / "results_subset_lf.json", subset_lf),
    }


@pytest.fixture(scope="module")
def ours_all(files: dict[str, Path]) -> dict[str, float]:
    return evaluate_files(files["annotations"], files["all"])


@pytest.fixture(scope="module")
def official_all(files: dict[str, Path]) -> dict[str, float]:
    return _official(files["annotations"], files["all"])


def test_dataset_is_varied(dataset: Any, files: dict[str, Path]) -> None:
    refs, _, _ = dataset
    assert len(refs) == N_IMAGES + N_EXTRA_IMAGES and N_IMAGES >= 200
    assert all(len(r) == 5 for r in refs.values())
    predicted = [entry["caption"] for entry in json.loads(files["all"].read_text())]
    assert len(predicted) == N_IMAGES
    # Captions that tokenize to nothing are part of the parity data.
    assert sum(c == "" for c in predicted) >= 2 and sum(c in (".", "   ") for c in predicted) >= 2


@pytest.mark.slow
def test_parity_with_official_cocoevalcap(ours_all: dict, official_all: dict) -> None:
    assert tuple(ours_all) == METRIC_NAMES
    assert all(type(v) is float for v in ours_all.values())
    for name in METRIC_NAMES:
        assert ours_all[name] == official_all[name], name
    # Sanity: the data is neither trivial nor hopeless.
    assert 0.05 < ours_all["Bleu_4"] < 0.9 and 0.1 < ours_all["CIDEr"] < 5


@pytest.mark.slow
def test_only_predicted_images_are_scored(
    files: dict[str, Path], ours_all: dict, capfd: pytest.CaptureFixture[str]
) -> None:
    # The subset file also has a caption with \r, \v, \f, U+2028 and U+2029 inside; the
    # official tool gets the same caption with "\n" instead, which it turns into spaces.
    meteor = caption_metrics._meteor  # started for ours_all
    ours = evaluate_files(files["annotations"], files["subset"])

    # While we are at it (a METEOR start costs seconds): nothing reached stdout, neither
    # Python prints (BLEU) nor the Java tools, and the METEOR process that scored ours_all
    # scored this too, the only Java process left; the numbers below are still the official ones.
    out, err = capfd.readouterr()
    assert out == ""
    assert "testlen" in err  # BLEU's print went to stderr instead
    assert caption_metrics._meteor is meteor and _java_children() == [str(meteor.meteor_p.pid)]

    official = _official(files["annotations"], files["subset_lf"])
    for name in METRIC_NAMES:
        assert ours[name] == official[name], name
    assert ours != ours_all


@pytest.mark.slow
def test_during_a_run_the_tools_messages_go_to_its_log_file(
    files: dict[str, Path], ours_all: dict, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from vlp_bench.log import run_log

    capfd.readouterr()
    with run_log(tmp_path / "run.log"):
        again = evaluate_files(files["annotations"], files["all"])
    out, err = capfd.readouterr()
    assert again == ours_all and out == "" and "testlen" not in err and "PTBTokenizer" not in err
    log = (tmp_path / "run.log").read_text()
    assert "testlen" in log and "PTBTokenizer tokenized" in log  # BLEU's print and the Java tokenizer's


@pytest.mark.slow
def test_a_dead_or_failed_meteor_process_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    gts = {1: ["a red circle", "one red disc"], 2: ["two blue squares"]}
    res = {1: ["a red circle"], 2: ["a blue square"]}
    first = caption_metrics._meteor_score(gts, res)
    caption_metrics._meteor.meteor_p.kill()
    caption_metrics._meteor.meteor_p.wait()
    assert caption_metrics._meteor_score(gts, res) == first  # a new process, the same score
    broken = caption_metrics._meteor
    monkeypatch.setattr(broken, "_stat", lambda *args: 1 / 0)  # fails halfway, holding its lock
    with pytest.raises(ZeroDivisionError):
        caption_metrics._meteor_score(gts, res)
    assert caption_metrics._meteor is None and broken.meteor_p.poll() is not None and not broken.lock.locked()
    assert caption_metrics._meteor_score(gts, res) == first


def _java_children() -> list[str]:
    children = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"java" in cmdline:
                children.append(pid)
    return children


def test_cider_is_corpus_level(dataset: Any, files: dict[str, Path], ours_all: dict) -> None:
    """Scoring in batches and averaging gives another CIDEr: document frequencies differ."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs, cands, order = dataset
    predicted = {entry["image_id"] for entry in json.loads(files["all"].read_text())}
    ids = [i for i in order if i in predicted]  # the order the official tool scores in
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": cands[i]}] for i in ids})

    assert Cider().compute_score(gts, res)[0] == ours_all["CIDEr"]
    batch = 24
    per_batch = [
        Cider().compute_score({i: gts[i] for i in ids[start:start + batch]},
                              {i: res[i] for i in ids[start:start + batch]})[0]
        for start in range(0, len(ids), batch)
    ]
    batch_mean = sum(per_batch) / len(per_batch)
    assert abs(batch_mean - ours_all["CIDEr"]) > 0.01


def test_floor_caption_counts_normalized_and_breaks_ties() -> None:
    train = {
        1: ["A dog on grass.", "a cat", "a dog on  grass"],
        2: ["a dog on grass", "A cat."],
        3: ["a bird", "A cat", "a bird"],
    }
    assert floor_caption(train) == "a cat"  # 3 x "a cat" vs 3 x "a dog on grass": tie
    assert floor_caption({1: ["b b", "a a", "b b", "a a"]}) == "a a"
    assert floor_caption({1: ["Zebra.", "x"], 2: ["zebra"]}) == "zebra"
    with pytest.raises(UserError):
        floor_caption({1: [], 2: ["  "]})


def test_floor_scores_scores_the_floor_caption_everywhere(
    dataset: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vlp_bench.metrics.caption as caption_metrics

    calls = []

    def fake_score_captions(refs: dict, cands: dict, spice: bool = False) -> dict:
        calls.append((refs, cands, spice))
        return {name: 0.5 for name in METRIC_NAMES}

    monkeypatch.setattr(caption_metrics, "score_captions", fake_score_captions)
    refs, _, order = dataset
    train = {i: refs[i] for i in order[:150]}
    evaluation = {i: refs[i] for i in order[150:]}
    result = floor_scores(train, evaluation)

    caption = floor_caption(train)
    assert result == {"caption": caption, **{name: 0.5 for name in METRIC_NAMES}}
    assert calls == [(evaluation, {i: caption for i in evaluation}, False)]


def test_score_captions_rejects_missing_references() -> None:
    with pytest.raises(UserError, match="no reference captions for 2 candidate image id"):
        score_captions({1: ["a dog"], 2: []}, {1: "a dog", 2: "a cat", 3: "x"})
    with pytest.raises(UserError, match="no candidate captions"):
        score_captions({1: ["a dog"]}, {})


# ----------------------------------------------------------------------------------------
# Validation of the two files
# ----------------------------------------------------------------------------------------

GOOD_ANNOTATIONS = {
    "images": [{"id": i} for i in range(1, 11)] + [{"id": 99}],
    "annotations": [{"image_id": i, "id": i, "caption": f"caption {i}"} for i in range(1, 11)],
}
GOOD_PREDICTIONS = [{"image_id": i, "caption": "a caption"} for i in range(1, 4)]
MISSING = object()


def _ann(**changes: Any) -> dict:
    data = json.loads(json.dumps(GOOD_ANNOTATIONS))
    data.update(changes)
    return data


# (annotations content, predictions content, the file the message must name, text in it)
# Content: MISSING (no file), a str (written verbatim), anything else (written as JSON).
BAD_INPUTS = {
    "annotations missing": (MISSING, GOOD_PREDICTIONS, "ann", "not found"),
    "predictions missing": (GOOD_ANNOTATIONS, MISSING, "pred", "not found"),
    "annotations invalid JSON": ('{"images": [\n  {"id": 1},\n  oops\n]}', GOOD_PREDICTIONS,
                                 "ann", "line 3"),
    "predictions invalid JSON": (GOOD_ANNOTATIONS, '[{"image_id": 1,\n "caption": "x"}', "pred",
                                 "line 2"),
    "annotations are a list": ([{"image_id": 1, "caption": "x"}], GOOD_PREDICTIONS, "ann",
                               "'images' and 'annotations'"),
    "annotations without images": ({"annotations": []}, GOOD_PREDICTIONS, "ann",
                                   "'images' and 'annotations'"),
    "image without id": (_ann(images=[{"file_name": "x.jpg"}]), GOOD_PREDICTIONS, "ann",
                         "images[0] has no integer 'id'"),
    "annotation without caption": (_ann(annotations=[{"image_id": 1, "id": 1}]),
                                   GOOD_PREDICTIONS, "ann", "annotations[0] has no string"),
    "annotation with string image_id": (_ann(annotations=[{"image_id": "1", "caption": "x"}]),
                                        GOOD_PREDICTIONS, "ann", "no integer 'image_id'"),
    "predictions are an object": (GOOD_ANNOTATIONS, {"1": "a caption"}, "pred",
                                  "expected a JSON list"),
    "prediction not an object": (GOOD_ANNOTATIONS, ["a caption"], "pred", "entry 0 is a JSON string"),
    "prediction without caption": (GOOD_ANNOTATIONS, [{"image_id": 1}], "pred",
                                   "entry 0 needs both"),
    "prediction without image_id": (GOOD_ANNOTATIONS, [{"caption": "x"}], "pred",
                                    "entry 0 needs both"),
    "prediction with string image_id": (GOOD_ANNOTATIONS, [{"image_id": "1", "caption": "x"}],
                                        "pred", "not an integer"),
    "prediction with bool image_id": (GOOD_ANNOTATIONS, [{"image_id": True, "caption": "x"}],
                                      "pred", "not an integer"),
    "prediction with null caption": (GOOD_ANNOTATIONS, [{"image_id": 1, "caption": None}],
                                     "pred", "type null"),
    "duplicate prediction": (GOOD_ANNOTATIONS, GOOD_PREDICTIONS + [{"image_id": 2, "caption": "y"}],
                             "pred", "image_id 2 has more than one caption"),
    "unknown image ids": (GOOD_ANNOTATIONS,
                          [{"image_id": i, "caption": "x"} for i in [1, 50, 51, 52, 53, 54, 55]],
                          "pred", "6 predicted image id(s) are not in the images of"),
    "empty predictions": (GOOD_ANNOTATIONS, [], "pred", "no predictions"),
    "image without references": (GOOD_ANNOTATIONS, [{"image_id": 99, "caption": "x"}], "ann",
                                 "no reference captions for 1 predicted image(s): 99"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_files_raise_one_line_user_error(tmp_path: Path, case: tuple) -> None:
    ann_content, pred_content, named, expected = case
    paths = {"ann": tmp_path / "my_annotations.json", "pred": tmp_path / "my_predictions.json"}
    for key, content in (("ann", ann_content), ("pred", pred_content)):
        if content is MISSING:
            continue
        text = content if isinstance(content, str) else json.dumps(content)
        paths[key].write_text(text)

    with pytest.raises(UserError) as info:
        evaluate_files(paths["ann"], paths["pred"])
    message = str(info.value)
    assert "\n" not in message
    assert str(paths[named]) in message
    assert expected in message
    if "unknown" in message or "not in the images" in message:
        assert message.endswith("50, 51, 52, 53, 54, ...")  # five ids, then "..." (the path may hold any digits)
