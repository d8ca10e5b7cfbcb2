"""Tests for vlp_bench.metrics.vqa: VQAv2 accuracy as the official vqaEval.py computes it.

Every expected value below was worked out by hand from the official algorithm (see the
module docstring); the comments show the arithmetic.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest

from vlp_bench.errors import UserError
from vlp_bench.metrics.vqa import (
    answer_floor,
    evaluate_files,
    floor_answers,
    normalize_answer,
    question_accuracy,
    vqa_accuracy,
)


def _answers(*texts: str) -> list[dict[str, Any]]:
    """A VQAv2 "answers" list: one dict per annotator, each with its own answer_id."""
    return [
        {"answer": text, "answer_confidence": "yes", "answer_id": index + 1}
        for index, text in enumerate(texts)
    ]


def _ann(
    qid: int, texts: list[str], answer_type: str = "other", question_type: str = "what is",
    multiple_choice_answer: str | None = None,
) -> dict[str, Any]:
    return {
        "question_id": qid, "image_id": 1000 + qid, "answers": _answers(*texts),
        "answer_type": answer_type, "question_type": question_type,
        "multiple_choice_answer": multiple_choice_answer or texts[0],
    }


def _score(prediction: str, texts: list[str]) -> float:
    """Rounded percent accuracy of a single question, through the public API."""
    annotation = _ann(1, texts)
    return vqa_accuracy({1: {}}, {1: annotation}, {1: prediction})["overall"]


# ---------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------

NORMALIZATION_CASES = [
    # Punctuation: deleted when next to a space, replaced by a space otherwise.
    ("yes.", "yes"),            # period not followed by a digit: deleted
    ("red,", "red"),            # "," not next to a space -> "red " -> split/join -> "red"
    ("red, white", "red white"),  # ", " present -> "," deleted
    ("black/white", "black white"),  # "/" not next to a space -> space
    ("t-shirt", "t shirt"),
    ("what?!", "what"),         # each mark replaced by a space, then whitespace collapsed
    ("(left)", "left"),
    # Digits: a digit-comma-digit anywhere deletes every listed mark instead.
    ("1,000", "1000"),
    ("1,000-ish", "1000ish"),   # "-" is deleted, not spaced, because "1,000" matched
    ("3.5", "3.5"),             # period followed by a digit stays
    ("3.", "3"),
    (".5", ".5"),
    ("mr. smith", "mr smith"),
    # Not in the official punctuation list: kept.
    ("don't", "don't"),
    ("12:30", "12:30"),
    ("50%", "50%"),
    # Number words (after lower-casing), including "none" -> "0".
    ("two", "2"),
    ("Two", "2"),
    ("ten", "10"),
    ("none", "0"),
    ("zero", "0"),
    ("eleven", "eleven"),       # only none/zero/one..ten are mapped
    ("one way", "1 way"),
    # Articles a/an/the are dropped, as whole words only.
    ("a circle", "circle"),
    ("the left", "left"),
    ("an apple", "apple"),
    ("A Dog", "dog"),
    ("a", ""),
    ("theater", "theater"),
    # Contractions written without apostrophe.
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("Wont", "won't"),          # lower-cased first, then looked up
    ("somebody'd", "somebodyd"),  # the official table maps it backwards; reproduced
    # The official processDigitArticle lower-cases (inText.lower().split()), so the
    # table's capitalised keys ("Im", "Ive", ...) can never match: "Im" -> "im".
    ("Im", "im"),
    ("YES", "yes"),
    # Whitespace is collapsed by split/join.
    ("  two   dogs ", "2 dogs"),
]


@pytest.mark.parametrize("raw, expected", NORMALIZATION_CASES)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_at_most_32_periods_are_deleted() -> None:
    # The official code calls periodStrip.sub("", text, re.UNICODE): re.UNICODE == 32
    # lands in ``count``, so only the first 32 periods go.
    assert normalize_answer("." * 40 + "x") == "." * 8 + "x"


# ---------------------------------------------------------------------------------------
# Per-question accuracy (leave-one-out over the 10 annotators)
# ---------------------------------------------------------------------------------------


def test_ten_identical_answers_score_100() -> None:
    # Dropping any annotator leaves 9 matches: min(1, 9/3) = 1 for all ten subsets.
    assert _score("yes", ["yes"] * 10) == 100.0


def test_three_of_ten_matching_scores_90() -> None:
    # Dropping one of the 3 matching annotators leaves 2 matches -> 2/3 (3 subsets);
    # dropping one of the 7 others leaves 3 matches -> 1 (7 subsets).
    # (3 * 2/3 + 7 * 1) / 10 = 9/10.
    texts = ["red"] * 3 + ["blue"] * 7
    assert question_accuracy("red", _answers(*texts)) == pytest.approx(0.9)
    assert _score("red", texts) == 90.0


def test_one_of_ten_matching_scores_30() -> None:
    # Dropping the matching annotator leaves 0 matches -> 0 (1 subset); dropping any
    # of the 9 others leaves 1 match -> 1/3 (9 subsets). (0 + 9 * 1/3) / 10 = 0.3.
    texts = ["red"] + ["blue"] * 9
    assert question_accuracy("red", _answers(*texts)) == pytest.approx(0.3)
    assert _score("red", texts) == 30.0


def test_two_of_ten_matching_scores_60() -> None:
    # 2 subsets with 1 match (1/3), 8 subsets with 2 matches (2/3):
    # (2/3 + 16/3) / 10 = 6/10.
    assert _score("red", ["red"] * 2 + ["blue"] * 8) == 60.0


def test_four_of_ten_matching_scores_100() -> None:
    # Even dropping a matching annotator leaves 3 matches -> 1 in every subset.
    assert _score("red", ["red"] * 4 + ["blue"] * 6) == 100.0


def test_no_match_scores_0() -> None:
    assert _score("green", ["red"] * 4 + ["blue"] * 6) == 0.0


def test_normalisation_when_annotators_disagree() -> None:
    # The humans disagree, so they and the prediction are normalised: "Two", "two" and
    # "2" all become "2" (5 + 2 + 1 = 8 matches), "3 " -> "3".
    texts = ["Two"] * 5 + ["two"] * 2 + ["2"] + ["3 "] * 2
    assert _score("two", texts) == 100.0
    assert _score("2.", texts) == 100.0
    # "three" -> "3": 2 of 10 match -> 0.6 (see test_two_of_ten_matching_scores_60).
    assert _score("Three", texts) == 60.0


def test_no_normalisation_when_all_annotators_agree() -> None:
    # Official behaviour (len(set(gtAnswers)) > 1 gates normalisation of both sides):
    # when all ten humans wrote the same string, the prediction is compared as is
    # (only \n, \t -> space and strip). LAVIS would normalise the prediction and give 100.
    assert _score("two", ["2"] * 10) == 0.0
    assert _score("2.", ["2"] * 10) == 0.0
    assert _score("Yes", ["yes"] * 10) == 0.0
    assert _score("Yes", ["Yes"] * 10) == 100.0
    assert _score("  yes\n", ["yes"] * 10) == 100.0  # cleaning (strip) always applies
    assert _score("yes\tplease", ["yes please"] * 10) == 100.0  # "\t" -> " "


def test_humans_are_stripped_before_the_agreement_check() -> None:
    # "yes " and "yes\n" strip to "yes": the ten answers agree, so no normalisation and
    # "Yes" does not match. With a genuinely different answer, everything is normalised.
    assert _score("Yes", ["yes"] * 8 + ["yes ", "yes\n"]) == 0.0
    assert _score("Yes", ["yes"] * 9 + ["no"]) == 100.0


def test_leave_one_out_compares_whole_answer_dicts_like_the_official_tool() -> None:
    # The official code drops every answer dict equal to the left-out one. With distinct
    # answer_ids (always so in VQAv2) exactly one is dropped; identical id-less dicts are
    # dropped together, so ten {"answer": "yes"} leave no other answers at all -> 0.
    assert question_accuracy("yes", [{"answer": "yes"}] * 10) == 0.0
    assert question_accuracy("yes", _answers(*["yes"] * 10)) == 1.0
    # 3 "yes" + 7 "no" without ids: leaving a "yes" out drops all 3 "yes" -> 0 matches;
    # leaving a "no" out drops the 7 "no" -> 3 matches -> 1. (3 * 0 + 7 * 1) / 10 = 0.7.
    id_less = [{"answer": "yes"}] * 3 + [{"answer": "no"}] * 7
    assert question_accuracy("yes", id_less) == pytest.approx(0.7)


def test_inputs_are_not_modified() -> None:
    annotation = _ann(1, ["Two"] * 5 + ["2 "] * 5)
    before = copy.deepcopy(annotation)
    vqa_accuracy({1: {}}, {1: annotation}, {1: "two"})
    assert annotation == before


# ---------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------


def _aggregation_case() -> tuple[dict, dict, dict]:
    annotations = {
        # yes/no, "is the": 1.0 and 0.0
        1: _ann(1, ["yes"] * 10, "yes/no", "is the"),
        2: _ann(2, ["yes"] * 10, "yes/no", "is the"),
        # number: 3 of 10 say "2" -> 0.9
        3: _ann(3, ["2"] * 3 + ["3"] * 7, "number", "how many"),
        # other: 1 of 10 -> 0.3; "Red." normalised to "red", 4 of 10 -> 1.0
        4: _ann(4, ["red"] + ["blue"] * 9, "other", "what color is the"),
        5: _ann(5, ["red"] * 4 + ["blue"] * 6, "other", "what color is the"),
    }
    predictions = {1: "yes", 2: "no", 3: "2", 4: "red", 5: "Red."}
    questions = {qid: {"question_id": qid, "question": "?"} for qid in annotations}
    return questions, annotations, predictions


def test_per_type_aggregation() -> None:
    result = vqa_accuracy(*_aggregation_case())
    assert result == {
        "overall": 64.0,  # (1 + 0 + 0.9 + 0.3 + 1) / 5 = 0.64
        "perAnswerType": {"yes/no": 50.0, "number": 90.0, "other": 65.0},
        "perQuestionType": {"is the": 50.0, "how many": 90.0, "what color is the": 65.0},
        "questions": 5,
    }


def test_only_predicted_questions_are_evaluated() -> None:
    questions, annotations, predictions = _aggregation_case()
    del predictions[2]  # the 0.0 question
    result = vqa_accuracy(questions, annotations, predictions)
    assert result["questions"] == 4
    assert result["overall"] == 80.0  # (1 + 0.9 + 0.3 + 1) / 4
    assert result["perAnswerType"]["yes/no"] == 100.0


def test_rounding_to_two_decimals_like_set_accuracy() -> None:
    annotations = {
        1: _ann(1, ["a1"] * 10),                  # pred matches: 1.0
        2: _ann(2, ["red"] + ["blue"] * 9),       # 1 of 10: 0.3
        3: _ann(3, ["b1"] * 10),                  # no match: 0.0
    }
    predictions = {1: "a1", 2: "red", 3: "x"}
    result = vqa_accuracy(annotations, annotations, predictions)
    assert result["overall"] == 43.33  # round(100 * 1.3 / 3, 2) = round(43.333..., 2)
    result = vqa_accuracy(annotations, annotations, {1: "a1", 2: "x", 3: "b1"})
    assert result["overall"] == 66.67  # round(200 / 3, 2)


def test_matches_an_independent_formulation_on_random_data() -> None:
    # With distinct answer_ids, leaving annotator i out leaves M - [answer_i == pred]
    # matches, where M counts all matching annotators (after the same normalisation).
    rng = random.Random(1)
    vocabulary = ["yes", "Yes", "no", "2", "two", "a dog", "dog", "red,", "red", "t-shirt",
                  "t shirt", "1,000", "1000", "3.5"]
    annotations, predictions = {}, {}
    expected_sum = 0.0
    for qid in range(300):
        texts = [rng.choice(vocabulary[: rng.randint(1, len(vocabulary))]) for _ in range(10)]
        prediction = rng.choice(vocabulary)
        annotations[qid] = _ann(qid, texts)
        predictions[qid] = prediction
        if len(set(texts)) > 1:
            texts = [normalize_answer(text) for text in texts]
            prediction = normalize_answer(prediction)
        matches = sum(text == prediction for text in texts)
        expected_sum += sum(min(1.0, (matches - (text == prediction)) / 3) for text in texts) / 10
    result = vqa_accuracy(annotations, annotations, predictions)
    assert result["overall"] == pytest.approx(100 * expected_sum / 300, abs=0.005)


@pytest.mark.parametrize(
    "predictions, expected",
    [
        ({}, "no predictions to evaluate"),
        ({1: "yes", 7: "no"}, "1 predicted question id(s) are not in the questions: 7"),
        ({1: "yes", 2: 3}, "predicted answer for question 2 must be a string"),
    ],
)
def test_vqa_accuracy_rejects_bad_predictions(predictions: dict, expected: str) -> None:
    annotations = {1: _ann(1, ["yes"] * 10), 2: _ann(2, ["no"] * 10)}
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        vqa_accuracy(annotations, annotations, predictions)


def test_vqa_accuracy_rejects_unannotated_and_malformed_annotations() -> None:
    with pytest.raises(UserError, match="no annotation for 1 predicted question"):
        vqa_accuracy({1: {}, 2: {}}, {1: _ann(1, ["yes"] * 10)}, {1: "yes", 2: "no"})
    bad = _ann(1, ["yes"] * 10)
    del bad["answer_type"]
    with pytest.raises(UserError, match="annotation of question 1 has no string 'answer_type'"):
        vqa_accuracy({1: {}}, {1: bad}, {1: "yes"})


# ---------------------------------------------------------------------------------------
# Answer floor
# ---------------------------------------------------------------------------------------


def _train_annotations() -> dict[int, dict]:
    rows = [
        # yes/no: "yes" 3, "no" 3 -> tie -> "no" (lexicographically smallest)
        *[("yes/no", "yes")] * 3, *[("yes/no", "no")] * 3,
        # number: "2" twice, "1" once -> "2"
        ("number", "2"), ("number", "2"), ("number", "1"),
        # other: "white" 2, "red" 2, "blue" 1 -> tie -> "red"
        ("other", "white"), ("other", "red"), ("other", "white"), ("other", "red"),
        ("other", "blue"),
    ]
    return {
        qid: _ann(qid, [answer] * 10, kind, "q", multiple_choice_answer=answer)
        for qid, (kind, answer) in enumerate(rows, start=100)
    }


def test_floor_answers_most_common_per_type_ties_to_smallest() -> None:
    assert floor_answers(_train_annotations()) == {"number": "2", "other": "red", "yes/no": "no"}


def test_answer_floor() -> None:
    eval_annotations = {
        10: _ann(10, ["yes"] * 10, "yes/no", "is the"),          # floor "no": 0
        11: _ann(11, ["no"] * 10, "yes/no", "is the"),           # "no": 1
        12: _ann(12, ["2"] * 5 + ["3"] * 5, "number", "how many"),  # "2", 5 match: 1
        13: _ann(13, ["white"] * 10, "other", "what color"),     # "red": 0
    }
    eval_questions = {qid: {"question_id": qid} for qid in eval_annotations}
    result = answer_floor(_train_annotations(), eval_questions, eval_annotations)
    assert result == {
        "overall": 50.0,
        "perAnswerType": {"yes/no": 50.0, "number": 100.0, "other": 0.0},
        "perQuestionType": {"is the": 50.0, "how many": 100.0, "what color": 0.0},
        "questions": 4,
        "answers": {"number": "2", "other": "red", "yes/no": "no"},
    }


def test_answer_floor_errors() -> None:
    train = _train_annotations()
    unseen = {20: _ann(20, ["x"] * 10, "color", "what")}
    with pytest.raises(UserError, match="answer type 'color' of 1 eval question"):
        answer_floor(train, {20: {}}, unseen)
    with pytest.raises(UserError, match="no annotation for 1 eval question id"):
        answer_floor(train, {20: {}, 21: {}}, unseen)
    with pytest.raises(UserError, match="no eval questions"):
        answer_floor(train, {}, unseen)
    with pytest.raises(UserError, match="no training annotations"):
        answer_floor({}, {20: {}}, unseen)
    broken = {1: {"answer_type": "other"}}
    with pytest.raises(UserError, match="has no string 'multiple_choice_answer'"):
        floor_answers(broken)


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------

MISSING = object()

GOOD_QUESTIONS = {"questions": [{"question_id": q, "image_id": 7, "question": "What?"}
                                for q in (1, 2, 3)]}
GOOD_ANNOTATIONS = {"annotations": [
    _ann(1, ["yes"] * 10, "yes/no", "is the"),
    _ann(2, ["2"] * 3 + ["3"] * 7, "number", "how many"),
    _ann(3, ["red"] + ["blue"] * 9, "other", "what color"),
    _ann(4, ["extra"] * 10),  # not in the questions file: ignored
]}
GOOD_PREDICTIONS = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "two"},
                    {"question_id": 3, "answer": "red"}]


def _write(tmp_path: Path, questions: Any, annotations: Any, predictions: Any) -> dict[str, Path]:
    paths = {"q": tmp_path / "my_questions.json", "ann": tmp_path / "my_annotations.json",
             "pred": tmp_path / "my_predictions.json"}
    for key, content in (("q", questions), ("ann", annotations), ("pred", predictions)):
        if content is MISSING:
            continue
        if isinstance(content, bytes):
            paths[key].write_bytes(content)
        elif isinstance(content, str):
            paths[key].write_text(content)
        else:
            paths[key].write_text(json.dumps(content))
    return paths


def test_evaluate_files(tmp_path: Path) -> None:
    paths = _write(tmp_path, GOOD_QUESTIONS, GOOD_ANNOTATIONS, GOOD_PREDICTIONS)
    result = evaluate_files(paths["q"], paths["ann"], paths["pred"])
    assert result == {
        "overall": 73.33,  # (1 + 0.9 + 0.3) / 3 = 0.7333...
        "perAnswerType": {"yes/no": 100.0, "number": 90.0, "other": 30.0},
        "perQuestionType": {"is the": 100.0, "how many": 90.0, "what color": 30.0},
        "questions": 3,
    }


def _replace(base: dict, key: str, index: int, **changes: Any) -> dict:
    data = copy.deepcopy(base)
    entry = data[key][index]
    for name, value in changes.items():
        if value is MISSING:
            del entry[name]
        else:
            entry[name] = value
    return data


def _without_id(index: int) -> list[dict]:
    return [p for p in GOOD_PREDICTIONS if p["question_id"] != index]


_Q, _A, _P = GOOD_QUESTIONS, GOOD_ANNOTATIONS, GOOD_PREDICTIONS

BAD_INPUTS = {
    # (questions, annotations, predictions, file named in the message, expected text)
    "missing questions file": (MISSING, _A, _P, "q", "VQA questions file not found"),
    "missing annotations file": (_Q, MISSING, _P, "ann", "VQA annotations file not found"),
    "missing predictions file": (_Q, _A, MISSING, "pred", "VQA predictions file not found"),
    "questions invalid JSON": ('{"questions": [\n  {"question_id": 1,}\n]}', _A, _P, "q",
                               "invalid JSON at line 2"),
    "annotations invalid JSON": (_Q, '{\n\n"annotations": [', _P, "ann",
                                 "invalid JSON at line 3"),
    "predictions invalid JSON": (_Q, _A, '[\n{"question_id": 1, "answer": yes}]', "pred",
                                 "invalid JSON at line 2"),
    "predictions not UTF-8": (_Q, _A, b'[{"answer": "\xff"}]', "pred", "not UTF-8"),
    "questions not an object": (_Q["questions"], _A, _P, "q", "a JSON object with a list "
                                "'questions'"),
    "questions list missing": ({"question": []}, _A, _P, "q", "with a list 'questions'"),
    "questions empty": ({"questions": []}, _A, _P, "q", "no questions"),
    "question not an object": ({"questions": [1]}, _A, _P, "q",
                               "questions[0] is a JSON number, not an object"),
    "question without id": (_replace(_Q, "questions", 1, question_id=MISSING), _A, _P, "q",
                            "questions[1] has no integer 'question_id'"),
    "question with string id": (_replace(_Q, "questions", 0, question_id="1"), _A, _P, "q",
                                "questions[0] has no integer 'question_id'"),
    "duplicate question": ({"questions": _Q["questions"] + [_Q["questions"][0]]}, _A, _P, "q",
                           "question_id 1 appears more than once"),
    "annotations list missing": (_Q, {"annotation": []}, _P, "ann",
                                 "with a list 'annotations'"),
    "annotations is a list": (_Q, _A["annotations"], _P, "ann", "with a list 'annotations'"),
    "annotation without id": (_Q, _replace(_A, "annotations", 2, question_id=MISSING), _P, "ann",
                              "annotations[2] has no integer 'question_id'"),
    "annotation without answers": (_Q, _replace(_A, "annotations", 1, answers=MISSING), _P,
                                   "ann", "annotations[1] (question 2) needs a non-empty list"),
    "annotation with empty answers": (_Q, _replace(_A, "annotations", 1, answers=[]), _P, "ann",
                                      "needs a non-empty list 'answers'"),
    "annotation with non-string answer": (
        _Q, _replace(_A, "annotations", 0, answers=[{"answer": "yes"}, {"answer": 2}]), _P,
        "ann", "(question 1) has no string 'answer' in answers[1]"),
    "annotation without answer_type": (_Q, _replace(_A, "annotations", 0, answer_type=MISSING),
                                       _P, "ann", "has no string 'answer_type'"),
    "annotation without question_type": (
        _Q, _replace(_A, "annotations", 0, question_type=None), _P, "ann",
        "has no string 'question_type'"),
    "duplicate annotation": (_Q, {"annotations": _A["annotations"] + [_A["annotations"][2]]},
                             _P, "ann", "question_id 3 appears more than once"),
    "predictions not a list": (_Q, _A, {"1": "yes"}, "pred", "got a JSON object"),
    "predictions empty": (_Q, _A, [], "pred", "no predictions (the list is empty)"),
    "prediction not an object": (_Q, _A, ["yes"], "pred", "entry 0 is a JSON string"),
    "prediction without answer": (_Q, _A, [{"question_id": 1}], "pred",
                                  "entry 0 needs both 'question_id' and 'answer'"),
    "prediction with string id": (_Q, _A, [{"question_id": "1", "answer": "x"}], "pred",
                                  "'question_id' of type string, not an integer"),
    "prediction with bool id": (_Q, _A, [{"question_id": True, "answer": "x"}], "pred",
                                "'question_id' of type boolean, not an integer"),
    "prediction with null answer": (_Q, _A, [{"question_id": 1, "answer": None}], "pred",
                                    "'answer' of type null, not a string"),
    "duplicate prediction": (_Q, _A, _P + [{"question_id": 2, "answer": "3"}], "pred",
                             "question_id 2 has more than one answer (entries 1 and 3)"),
    "unknown predicted ids": (_Q, _A, _P + [{"question_id": i, "answer": "x"}
                                            for i in (4, 50, 51, 52, 53, 54)],
                              "pred", "6 predicted question id(s) are not in"),
    "question without annotation": (
        {"questions": _Q["questions"] + [{"question_id": 9}]}, _A,
        _P + [{"question_id": 9, "answer": "x"}], "ann", "no annotation for 1 question id(s)"),
    "missing predictions": (_Q, _A, _without_id(2), "pred",
                            "no prediction for 1 of the 3 question(s) in"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_files_raise_one_line_user_error(tmp_path: Path, case: tuple) -> None:
    questions, annotations, predictions, named, expected = case
    paths = _write(tmp_path, questions, annotations, predictions)
    with pytest.raises(UserError) as info:
        evaluate_files(paths["q"], paths["ann"], paths["pred"])
    message = str(info.value)
    assert "\n" not in message
    assert str(paths[named]) in message
    assert expected in message


def test_id_lists_in_messages_are_capped(tmp_path: Path) -> None:
    extra = [{"question_id": i, "answer": "x"} for i in (4, 50, 51, 52, 53, 54)]
    paths = _write(tmp_path, GOOD_QUESTIONS, GOOD_ANNOTATIONS, GOOD_PREDICTIONS + extra)
    with pytest.raises(UserError) as info:
        evaluate_files(paths["q"], paths["ann"], paths["pred"])
    message = str(info.value)
    assert str(paths["q"]) in message  # names the questions file it was checked against
    assert message.endswith(": 4, 50, 51, 52, 53, ...")

    paths = _write(tmp_path, GOOD_QUESTIONS, GOOD_ANNOTATIONS, [GOOD_PREDICTIONS[0]])
    with pytest.raises(UserError, match=r"no prediction for 2 of the 3 question\(s\)") as info:
        evaluate_files(paths["q"], paths["ann"], paths["pred"])
    assert str(info.value).endswith(": 2, 3")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    paths = _write(tmp_path, GOOD_QUESTIONS, GOOD_ANNOTATIONS, GOOD_PREDICTIONS)
    with pytest.raises(UserError, match="VQA annotations path is not a file"):
        evaluate_files(paths["q"], tmp_path, paths["pred"])
