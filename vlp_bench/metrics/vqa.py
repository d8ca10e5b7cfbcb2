"""VQAv2 accuracy computed exactly as the official VQA evaluation computes it.

The official tool is ``VQAEval.evaluate()`` in ``vqaEval.py`` of the VQA API
(github.com/GT-Vision-Lab/VQA, current master). This module re-implements it (no
dependency on that code) and gives the same numbers, rounding included.

Per question
------------
1. ``\\n`` and ``\\t`` become spaces and the ends are stripped, in the prediction and in
   each of the (10) human answers.
2. Only if the stripped human answers are *not all identical* (``len(set(...)) > 1``) are
   the human answers **and the prediction** normalised with :func:`normalize_answer`.
   When all humans agree, nothing is normalised: humans all saying ``"2"`` give the
   prediction ``"two"`` (or ``"2."``, or ``"Two"`` against ``"two"``) accuracy 0.
3. Leave-one-out: for each human answer, the others are the answers that are not equal to
   it, and ``min(1, matches / 3)`` counts how many of them equal the prediction
   (exact string equality). The question's accuracy is the mean of these (10) values:
   3 of 10 humans matching give ``(3 * 2/3 + 7 * 1) / 10 = 0.9``, 1 of 10 gives 0.3.

   "Not equal" is the official ``item != gtAnsDatum``: it compares whole answer
   *dicts* (after normalisation). In VQAv2 every answer has its own ``answer_id``, so
   exactly one answer is left out each time. Answer dicts without distinct ids that are
   identical (e.g. ten ``{"answer": "yes"}``) are all left out together, as in the
   official tool (ten identical id-less ``"yes"`` dicts score 0). Keep ``answer_id``.

Normalisation (:func:`normalize_answer`) is the official ``processPunctuation`` followed
by ``processDigitArticle``:

* each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted if the *original*
  text has it next to a space (``"x "`` or ``" x"``) or if the text contains a
  digit-comma-digit anywhere (``"1,000"`` -> ``"1000"``, and then every listed
  punctuation mark is deleted: ``"1,000-ish"`` -> ``"1000ish"``); otherwise it is
  replaced by a space (``"t-shirt"`` -> ``"t shirt"``). Apostrophes, colons and
  ``* # $ % & ^ ~ |`` are kept;
* periods not followed by a digit are deleted (``"yes."`` -> ``"yes"``, ``"3.5"``
  stays). The official code passes ``re.UNICODE`` (32) where ``re.sub`` expects its
  ``count``, so at most 32 periods are deleted; reproduced;
* the text is lower-cased and split on whitespace; the number words ``none zero one ...
  ten`` become ``0 0 1 ... 10``; the articles ``a an the`` are dropped; contractions
  written without apostrophe become their official spelling (``"dont"`` ->
  ``"don't"``). The table's capitalised keys (``"Im"``, ``"Ive"``, ...) can never
  match since the word is already lower-cased (``"Im"`` -> ``"im"``); reproduced.

Aggregation: overall, per answer type and per question type accuracies are means over
questions (in the order of the annotation file), times 100, rounded to 2 decimals with
``round(100 * float(sum(accs)) / len(accs), 2)`` exactly as the official
``setAccuracy`` (Python 3's ``round``; the original Python 2 tool rounded exact halves
like ``12.125`` away from zero instead).

Official vs LAVIS
-----------------
LAVIS (``lavis/common/vqa_tools/vqa_eval.py``) copies an earlier revision of the
official file, which differs in step 1-2: the prediction is *always* normalised
(punctuation and digits/articles), the human answers, when they disagree, only get
``processPunctuation`` (no lower-casing, number words, articles or contractions), and the
human answers are not stripped. So LAVIS scores humans ``"2" x 10`` vs prediction
``"two"`` as 100, where the official tool (and this module) gives 0. Numbers from the
two can differ slightly; this module follows the official one.

Files (:func:`evaluate_files`) are the official formats: the questions file
(``{"questions": [{"question_id", "image_id", "question"}]}``), the annotations file
(``{"annotations": [{"question_id", "answers", "answer_type", "question_type", ...}]}``)
and a results file (``[{"question_id": int, "answer": str}]``). Like the official tool,
which asserts that the results cover exactly the question set, a prediction for every
question of the questions file is required and none for other questions. The
annotations file may hold more questions than the questions file; those are ignored.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from vlp_bench.errors import UserError
from vlp_bench.metrics.jsonfiles import is_int, json_type, load_json, load_results, some_ids

PRECISION = 2  # the official VQAEval's default ``n``: decimals kept by ``round``


# ---------------------------------------------------------------------------------------
# Normalisation tables (the official ones)
# ---------------------------------------------------------------------------------------

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                ">", "<", "@", "`", ",", "?", "!")

# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a negative *lookahead*
# for the text "<=" + digit, which can never match where a "." is, so it is a no-op.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in ``count``.
_PERIOD_STRIP_COUNT = int(re.UNICODE)

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# word as written -> official spelling, one pair per line. The entries are the official
# table's, quirks included ("somebody'd" -> "somebodyd", unreachable capitalised keys).
_CONTRACTION_PAIRS = """
aint ain't             arent aren't           cant can't             couldve could've
couldnt couldn't       couldn'tve couldn't've couldnt've couldn't've didnt didn't
doesnt doesn't         dont don't             hadnt hadn't           hadnt've hadn't've
hadn'tve hadn't've     hasnt hasn't           havent haven't         hed he'd
hed've he'd've         he'dve he'd've         hes he's               howd how'd
howll how'll           hows how's             Id've I'd've           I'dve I'd've
Im I'm                 Ive I've               isnt isn't             itd it'd
itd've it'd've         it'dve it'd've         itll it'll             let's let's
maam ma'am             mightnt mightn't       mightnt've mightn't've mightn'tve mightn't've
mightve might've       mustnt mustn't         mustve must've         neednt needn't
notve not've           oclock o'clock         oughtnt oughtn't       ow's'at 'ow's'at
'ows'at 'ow's'at       'ow'sat 'ow's'at       shant shan't           shed've she'd've
she'dve she'd've       she's she's            shouldve should've     shouldnt shouldn't
shouldnt've shouldn't've                      shouldn'tve shouldn't've
somebody'd somebodyd   somebodyd've somebody'd've                    somebody'dve somebody'd've
somebodyll somebody'll somebodys somebody's   someoned someone'd     someoned've someone'd've
someone'dve someone'd've                      someonell someone'll   someones someone's
somethingd something'd somethingd've something'd've                  something'dve something'd've
somethingll something'll                      thats that's           thered there'd
thered've there'd've   there'dve there'd've   therere there're       theres there's
theyd they'd           theyd've they'd've     they'dve they'd've     theyll they'll
theyre they're         theyve they've         twas 'twas             wasnt wasn't
wed've we'd've         we'dve we'd've         weve we've             werent weren't
whatll what'll         whatre what're         whats what's           whatve what've
whens when's           whered where'd         wheres where's         whereve where've
whod who'd             whod've who'd've       who'dve who'd've       wholl who'll
whos who's             whove who've           whyll why'll           whyre why're
whys why's             wont won't             wouldve would've       wouldnt wouldn't
wouldnt've wouldn't've wouldn'tve wouldn't've yall y'all             yall'll y'all'll
y'allll y'all'll       yall'd've y'all'd've   y'alld've y'all'd've   y'all'dve y'all'd've
youd you'd             youd've you'd've       you'dve you'd've       youll you'll
youre you're           youve you've
"""
_WORDS = _CONTRACTION_PAIRS.split()
_CONTRACTIONS = dict(zip(_WORDS[0::2], _WORDS[1::2]))
del _WORDS


# ---------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------


def normalize_answer(answer: str) -> str:
    """The official answer processing: ``processPunctuation`` then ``processDigitArticle``."""
    return _process_digit_article(_process_punctuation(answer))


def _process_punctuation(text: str) -> str:
    # The tests look at the *original* text, so the order of the marks does not matter.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------


def question_accuracy(prediction: str, answers: list[dict[str, Any]]) -> float:
    """Accuracy in [0, 1] of one predicted answer against a question's human answers.

    ``answers`` is the VQAv2 ``"answers"`` list (dicts with at least ``"answer"``); the
    value is the official per-question accuracy, unrounded (see the module docstring).
    """
    predicted = _clean(prediction)
    humans = [dict(answer, answer=_clean(answer["answer"])) for answer in answers]
    if len({human["answer"] for human in humans}) > 1:
        for human in humans:
            human["answer"] = normalize_answer(human["answer"])
        predicted = normalize_answer(predicted)

    per_subset = []
    for left_out in humans:
        # Official: the other answers are those whose whole dict differs from left_out.
        matches = sum(1 for human in humans if human != left_out and human["answer"] == predicted)
        per_subset.append(min(1, matches / 3))
    return float(sum(per_subset)) / len(per_subset)


def vqa_accuracy(
    questions: Mapping[int, Any],
    annotations: Mapping[int, dict[str, Any]],
    predictions: Mapping[int, str],
) -> dict[str, Any]:
    """VQA accuracy of ``predictions`` (question id -> answer), in percent.

    Exactly the question ids in ``predictions`` are evaluated, in the order of
    ``annotations`` (the official tool's order, which fixes the float sums). Every one
    must be in ``questions`` and ``annotations``. Returns ``{"overall": float,
    "perAnswerType": {type: float}, "perQuestionType": {type: float}, "questions": n}``,
    each accuracy rounded to 2 decimals as the official ``setAccuracy`` does.
    """
    if not predictions:
        raise UserError("no predictions to evaluate")
    unknown = [qid for qid in predictions if qid not in questions]
    if unknown:
        raise UserError(
            f"{len(unknown)} predicted question id(s) are not in the questions: {some_ids(unknown)}"
        )
    unannotated = [qid for qid in predictions if qid not in annotations]
    if unannotated:
        raise UserError(
            f"no annotation for {len(unannotated)} predicted question id(s): {some_ids(unannotated)}"
        )
    for qid, answer in predictions.items():
        if not isinstance(answer, str):
            raise UserError(
                f"predicted answer for question {qid} must be a string, "
                f"got {json_type(answer)}"
            )

    overall: list[float] = []
    per_answer_type: dict[str, list[float]] = {}
    per_question_type: dict[str, list[float]] = {}
    for qid, annotation in annotations.items():
        if qid not in predictions:
            continue
        problem = _annotation_problem(annotation)
        if problem:
            raise UserError(f"annotation of question {qid} {problem}")
        accuracy = question_accuracy(predictions[qid], annotation["answers"])
        overall.append(accuracy)
        per_answer_type.setdefault(annotation["answer_type"], []).append(accuracy)
        per_question_type.setdefault(annotation["question_type"], []).append(accuracy)

    return {
        "overall": _percent(overall),
        "perAnswerType": {kind: _percent(accs) for kind, accs in per_answer_type.items()},
        "perQuestionType": {kind: _percent(accs) for kind, accs in per_question_type.items()},
        "questions": len(overall),
    }


def _percent(accuracies: list[float]) -> float:
    # Official setAccuracy, operation order included: (100 * sum) / len, then round.
    return round(100 * float(sum(accuracies)) / len(accuracies), PRECISION)


def _annotation_problem(annotation: Any) -> str | None:
    """What makes ``annotation`` unusable for scoring, worded to follow its name."""
    if not isinstance(annotation, dict):
        return f"is a JSON {json_type(annotation)}, not an object"
    answers = annotation.get("answers")
    if not isinstance(answers, list) or not answers:
        return "needs a non-empty list 'answers'"
    for index, answer in enumerate(answers):
        if not isinstance(answer, dict) or not isinstance(answer.get("answer"), str):
            return f"has no string 'answer' in answers[{index}]"
    for key in ("answer_type", "question_type"):
        if not isinstance(annotation.get(key), str):
            return f"has no string '{key}'"
    return None


# ---------------------------------------------------------------------------------------
# Files in the official formats
# ---------------------------------------------------------------------------------------


def evaluate_files(questions: Path, annotations: Path, predictions: Path) -> dict[str, Any]:
    """VQA accuracy of a results file, as :func:`vqa_accuracy` returns it.

    Every question of the questions file must have exactly one prediction and an
    annotation; predictions for other questions are an error.
    """
    questions, annotations, predictions = Path(questions), Path(annotations), Path(predictions)
    question_map = load_questions(questions)
    annotation_map = load_annotations(annotations)
    answers = load_predictions(predictions)

    unknown = [qid for qid in answers if qid not in question_map]
    if unknown:
        raise UserError(
            f"{predictions}: {len(unknown)} predicted question id(s) are not in "
            f"{questions}: {some_ids(unknown)}"
        )
    unannotated = [qid for qid in question_map if qid not in annotation_map]
    if unannotated:
        raise UserError(
            f"{annotations}: no annotation for {len(unannotated)} question id(s) of "
            f"{questions}: {some_ids(unannotated)}"
        )
    missing = [qid for qid in question_map if qid not in answers]
    if missing:
        raise UserError(
            f"{predictions}: no prediction for {len(missing)} of the {len(question_map)} "
            f"question(s) in {questions} (the official evaluation needs all): {some_ids(missing)}"
        )

    # Official order: the annotation file's.
    ordered = {qid: ann for qid, ann in annotation_map.items() if qid in question_map}
    return vqa_accuracy(question_map, ordered, answers)


def load_questions(path: Path) -> dict[int, dict[str, Any]]:
    """Read a VQA questions file: question id -> question entry, in file order."""
    questions = _by_question_id(Path(path), "VQA questions", "questions")
    if not questions:
        raise UserError(f"{path}: no questions (the 'questions' list is empty)")
    return questions


def load_annotations(path: Path) -> dict[int, dict[str, Any]]:
    """Read a VQA annotations file: question id -> annotation, in file order."""
    return _by_question_id(Path(path), "VQA annotations", "annotations", _annotation_problem)


def _by_question_id(path: Path, what: str, key: str, problem_of=None) -> dict[int, dict[str, Any]]:
    """The entries of the list `key` of a VQA file, by question id (unique), validated."""
    data = load_json(path, what)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise UserError(f"{path}: expected a {what} file, a JSON object with a list '{key}'")
    entries: dict[int, dict[str, Any]] = {}
    for index, entry in enumerate(data[key]):
        if not isinstance(entry, dict):
            raise UserError(f"{path}: {key}[{index}] is a JSON {json_type(entry)}, not an object")
        qid = entry.get("question_id")
        if not is_int(qid):
            raise UserError(f"{path}: {key}[{index}] has no integer 'question_id'")
        problem = problem_of(entry) if problem_of else None
        if problem:
            raise UserError(f"{path}: {key}[{index}] (question {qid}) {problem}")
        if qid in entries:
            raise UserError(f"{path}: question_id {qid} appears more than once in '{key}'")
        entries[qid] = entry
    return entries


def load_predictions(path: Path) -> dict[int, str]:
    """Read a VQA results file: ``[{"question_id": int, "answer": str}]``."""
    return load_results(path, "VQA predictions", "question_id", "answer", "question")










# ---------------------------------------------------------------------------------------
# Floor baseline
# ---------------------------------------------------------------------------------------


def floor_answers(train_annotations: Mapping[int, dict[str, Any]]) -> dict[str, str]:
    """Per answer type, the most common training ``multiple_choice_answer``.

    Answers are counted as written (VQAv2's ``multiple_choice_answer`` is already in
    normalised form); ties go to the lexicographically smallest. Sorted by answer type.
    """
    counts: dict[str, Counter[str]] = {}
    for qid, annotation in train_annotations.items():
        if not isinstance(annotation, dict):
            raise UserError(f"training annotation of question {qid} is not an object")
        for key in ("answer_type", "multiple_choice_answer"):
            if not isinstance(annotation.get(key), str):
                raise UserError(f"training annotation of question {qid} has no string '{key}'")
        counts.setdefault(annotation["answer_type"], Counter())[
            annotation["multiple_choice_answer"]
        ] += 1
    if not counts:
        raise UserError("no training annotations to choose floor answers from")
    return {
        kind: min(counter.items(), key=lambda item: (-item[1], item[0]))[0]
        for kind, counter in sorted(counts.items())
    }


def answer_floor(
    train_annotations: Mapping[int, dict[str, Any]],
    eval_questions: Mapping[int, Any],
    eval_annotations: Mapping[int, dict[str, Any]],
) -> dict[str, Any]:
    """Accuracy of always answering the most common training answer of the answer type.

    Every question of ``eval_questions`` gets ``floor_answers(train_annotations)`` of its
    annotation's answer type. Returns :func:`vqa_accuracy`'s dict plus ``"answers"``
    (answer type -> floor answer).
    """
    answers = floor_answers(train_annotations)
    if not eval_questions:
        raise UserError("no eval questions to compute the answer floor on")
    unannotated = [qid for qid in eval_questions if qid not in eval_annotations]
    if unannotated:
        raise UserError(
            f"no annotation for {len(unannotated)} eval question id(s): {some_ids(unannotated)}"
        )
    predictions: dict[int, str] = {}
    unseen: dict[str, list[Any]] = {}
    for qid in eval_questions:
        problem = _annotation_problem(eval_annotations[qid])
        if problem:
            raise UserError(f"annotation of eval question {qid} {problem}")
        kind = eval_annotations[qid]["answer_type"]
        if kind in answers:
            predictions[qid] = answers[kind]
        else:
            unseen.setdefault(kind, []).append(qid)
    if unseen:
        kind, qids = next(iter(unseen.items()))
        raise UserError(
            f"answer type '{kind}' of {len(qids)} eval question(s) never occurs in the "
            f"training annotations: {some_ids(qids)}"
        )
    return {**vqa_accuracy(eval_questions, eval_annotations, predictions), "answers": answers}
