"""Captioning metrics computed exactly as the official coco-caption pipeline does.

The official tool is pycocoevalcap's ``COCOEvalCap.evaluate()``. For the images that
have a predicted caption it runs:

1. ``PTBTokenizer`` (Stanford CoreNLP 3.4.1, a Java subprocess, ``-preserveLines
   -lowerCase``) once over all reference captions and once over all candidates, then
   drops punctuation tokens;
2. ``Bleu(4)``, ``Meteor()`` (a long-lived Java subprocess), ``Rouge()``, ``Cider()``
   and ``Spice()`` on the tokenized text.

Every scorer sees all evaluated images at once, so the scores are corpus-level: BLEU
sums n-gram statistics over the corpus, METEOR aggregates its statistics in Java,
ROUGE-L is the mean over images, and CIDEr (CIDEr-D as pycocoevalcap implements it)
takes its n-gram document frequencies from the references of all evaluated images.
Scoring a test set in batches and averaging would give different CIDEr values.

This module calls those same pycocoevalcap classes, in the same order and with the same
inputs, so the numbers are bit-for-bit the official ones. What it adds:

* SPICE only when asked for (it needs a Stanford CoreNLP 3.6.0 download);
* nothing reaches stdout: pycocoevalcap prints (e.g. BLEU's ``{'testlen': ...}``)
  and its Java tokenizer's messages go to the run's log file during a run, else to
  stderr (``vlp_bench.log.tool_output``: Python's streams and the file descriptors the
  Java tools inherit);
* one METEOR Java process per Python process, started on first use and reused by
  every later call, instead of one per call: starting it (loading its paraphrase
  table) takes seconds, a call milliseconds, and each call's ``EVAL`` line carries all
  the statistics it scores, so a call's result does not depend on earlier ones. A
  process that died or failed is replaced; it is stopped at exit;
* input validation with one-line ``UserError`` messages;
* characters that the Java tokenizer treats as line breaks (``\\r``, ``\\v``, ``\\f``,
  U+2028, U+2029) are replaced by spaces, as the official wrapper already does for
  ``\\n``. The official pipeline would otherwise split such a caption into two lines
  and silently shift every later caption onto the wrong image.

Empty candidate captions (or ones that are only punctuation) are scored as the official
pipeline scores them: they tokenize to an empty string and get 0 from every metric for
that image, without any error.
"""

from __future__ import annotations

import atexit
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from vlp_bench.errors import UserError
from vlp_bench.log import tool_output
from vlp_bench.metrics.jsonfiles import is_int, load_json, load_results, some_ids

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
SPICE_NAME = "SPICE"

# Characters that Java's line reader treats as line terminators ("\n" is handled by the
# official wrapper itself, which replaces it with a space before tokenizing).
_JAVA_LINE_BREAKS = str.maketrans({c: " " for c in "\r\x0b\x0c\u2028\u2029"})



# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------


def score_captions(
    refs: dict[int, list[str]], cands: dict[int, str], spice: bool = False,
    subsets: dict[str, list[int]] | None = None,
) -> dict[str, float]:
    """Score one candidate caption per image against its references, corpus-level.

    Only the images in ``cands`` are evaluated (in the order of ``cands``); ``refs`` may
    hold more images. Returns ``{"Bleu_1": ..., ..., "CIDEr": ...}`` (plus ``"SPICE"``
    when ``spice`` is true), the values exactly as pycocoevalcap's scorers return them.
    With ``subsets`` ({name: image ids}), ``"subsets"`` holds each one scored on its own, as
    the official scorers score a file of those images alone (CIDEr's document frequencies
    come from that subset's references): BLEU, METEOR, ROUGE-L and CIDEr, from the same PTB
    tokenization (SPICE would start a Java process per subset), plus ``"images"``.
    """
    if not cands:
        raise UserError("no candidate captions to score")
    missing = [image_id for image_id in cands if not refs.get(image_id)]
    if missing:
        raise UserError(
            f"no reference captions for {len(missing)} candidate image id(s): {some_ids(missing)}"
        )
    for image_id, caption in cands.items():
        if not isinstance(caption, str):
            raise UserError(
                f"candidate caption for image {image_id} must be a string, "
                f"got {type(caption).__name__}"
            )
        if not all(isinstance(ref, str) for ref in refs[image_id]):
            raise UserError(f"reference captions for image {image_id} must all be strings")
    if shutil.which("java") is None:
        raise UserError("captioning metrics need Java (the PTB tokenizer and METEOR), but "
                        "no 'java' executable is on PATH")

    # The input format of pycocoevalcap's tokenizer: {image_id: [{"caption": str}, ...]}.
    gts = {i: [{"caption": _one_line(r)} for r in refs[i]] for i in cands}
    res = {i: [{"caption": _one_line(cands[i])}] for i in cands}

    for name, ids in (subsets or {}).items():
        if not ids or set(ids) - set(cands):
            raise UserError(f"caption subset '{name}' is empty or names images without a candidate")
    with tool_output():  # the run's log file during a run, else stderr: never stdout
        return _run_official_scorers(gts, res, spice, subsets or {})


def _run_official_scorers(
    gts: dict[int, list[dict[str, str]]], res: dict[int, list[dict[str, str]]], spice: bool,
    subsets: dict[str, list[int]] | None = None,
) -> dict[str, float]:
    """The body of ``COCOEvalCap.evaluate()``, minus its bookkeeping and prints."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts_tok = tokenizer.tokenize(gts)
    res_tok = tokenizer.tokenize(res)
    _check_alignment(gts, gts_tok)
    _check_alignment(res, res_tok)

    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts_tok, res_tok)
    for name, value in zip(METRIC_NAMES[:4], bleu):
        scores[name] = float(value)

    scores["METEOR"] = _meteor_score(gts_tok, res_tok)

    scores["ROUGE_L"] = float(Rouge().compute_score(gts_tok, res_tok)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts_tok, res_tok)[0])

    if spice:
        scores[SPICE_NAME] = float(_spice_scorer().compute_score(gts_tok, res_tok)[0])
    if subsets:
        scores["subsets"] = {}
        for name, ids in subsets.items():
            g, r = {i: gts_tok[i] for i in ids}, {i: res_tok[i] for i in ids}
            part = dict(zip(METRIC_NAMES[:4], map(float, Bleu(4).compute_score(g, r)[0])))
            part["METEOR"] = _meteor_score(g, r)
            part["ROUGE_L"] = float(Rouge().compute_score(g, r)[0])
            part["CIDEr"] = float(Cider().compute_score(g, r)[0])
            scores["subsets"][name] = {**part, "images": len(ids)}
    return scores


def _one_line(caption: str) -> str:
    return caption.translate(_JAVA_LINE_BREAKS)


def _check_alignment(before: dict[int, list[Any]], after: dict[int, list[str]]) -> None:
    """The tokenizer pairs output lines with images by position; make sure none got lost."""
    for image_id, captions in before.items():
        if len(after.get(image_id, [])) != len(captions):
            raise RuntimeError(
                f"PTB tokenizer output is misaligned with its input at image {image_id}"
            )


_meteor: Any = None  # the process's METEOR scorer (see the module docstring)
_meteor_guard = threading.Lock()


def _meteor_score(gts_tok: dict[int, list[str]], res_tok: dict[int, list[str]]) -> float:
    """pycocoevalcap's ``Meteor().compute_score`` on the process's long-lived METEOR."""
    global _meteor
    from pycocoevalcap.meteor.meteor import Meteor

    with _meteor_guard:
        if _meteor is None or _meteor.meteor_p.poll() is not None:
            _meteor = Meteor()
        meteor = _meteor
        try:
            return float(meteor.compute_score(gts_tok, res_tok)[0])
        except BaseException:
            _meteor = None  # its pipes may hold half an answer: the next call starts a new one
            _close_meteor(meteor)
            raise


@atexit.register
def _stop_meteor() -> None:
    """At exit: stop the process's METEOR, if one is running (one hook, whichever process is current)."""
    if _meteor is not None:
        _close_meteor(_meteor)


def _close_meteor(meteor: Any) -> None:
    """Stop a METEOR Java process (pycocoevalcap only does it in ``__del__``). compute_score does
    not release its lock when it fails, so a held lock is released here, where __del__ would hang."""
    if meteor.lock.locked():
        meteor.lock.release()
    process = meteor.meteor_p
    with meteor.lock:
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        process.kill()
        process.wait()


def _spice_scorer() -> Any:
    from pycocoevalcap.spice.spice import Spice

    try:
        return Spice()  # downloads Stanford CoreNLP 3.6.0 on first use
    except OSError as error:
        message = " ".join(str(error).split())
        raise UserError(
            "SPICE needs the Stanford CoreNLP 3.6.0 models, which could not be "
            f"downloaded: {message}"
        ) from error


# ---------------------------------------------------------------------------------------
# Files in the official formats
# ---------------------------------------------------------------------------------------


def evaluate_files(annotations: Path, predictions: Path, spice: bool = False) -> dict[str, float]:
    """Score a COCO results file against a COCO caption annotation file.

    ``annotations``: ``{"images": [{"id": int, ...}], "annotations": [{"image_id": int,
    "caption": str, ...}]}``. ``predictions``: ``[{"image_id": int, "caption": str}]``,
    one entry per image. As in the official tool, only the predicted images are scored.
    """
    annotations, predictions = Path(annotations), Path(predictions)
    image_ids, refs = load_annotations(annotations)
    cands = load_predictions(predictions)

    known = set(image_ids)
    unknown = [image_id for image_id in cands if image_id not in known]
    if unknown:
        raise UserError(
            f"{predictions}: {len(unknown)} predicted image id(s) are not in the images of "
            f"{annotations}: {some_ids(unknown)}"
        )
    no_refs = [image_id for image_id in cands if not refs.get(image_id)]
    if no_refs:
        raise UserError(
            f"{annotations}: no reference captions for {len(no_refs)} predicted image(s): "
            f"{some_ids(no_refs)}"
        )

    # The official tool evaluates images in the order of the annotation file's "images".
    ordered = {image_id: cands[image_id] for image_id in image_ids if image_id in cands}
    return score_captions(refs, ordered, spice=spice)


def load_annotations(path: Path) -> tuple[list[int], dict[int, list[str]]]:
    """Read a COCO caption annotation file: (image ids in file order, refs per image)."""
    data = load_json(path, "caption annotations")
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise UserError(
            f"{path}: expected a COCO caption file, a JSON object with lists "
            "'images' and 'annotations'"
        )

    image_ids: dict[int, None] = {}  # ordered set; a repeated id keeps its first place
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not is_int(image.get("id")):
            raise UserError(f"{path}: images[{index}] has no integer 'id'")
        image_ids[image["id"]] = None

    refs: dict[int, list[str]] = {}
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise UserError(f"{path}: annotations[{index}] is not a JSON object")
        if not is_int(ann.get("image_id")):
            raise UserError(f"{path}: annotations[{index}] has no integer 'image_id'")
        if not isinstance(ann.get("caption"), str):
            raise UserError(f"{path}: annotations[{index}] has no string 'caption'")
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    return list(image_ids), refs


def load_predictions(path: Path) -> dict[int, str]:
    """Read a COCO caption results file: ``[{"image_id": int, "caption": str}]``."""
    return load_results(path, "caption predictions", "image_id", "caption", "image")










# ---------------------------------------------------------------------------------------
# Floor baseline
# ---------------------------------------------------------------------------------------


def floor_caption(train_refs: dict[int, list[str]]) -> str:
    """The most common training caption: the answer of a model that ignores the image.

    Captions are compared after lowercasing, collapsing whitespace and dropping a
    final period (so "A man." and "a man" count together; the tokenizer would make them
    identical anyway). Ties go to the lexicographically smallest caption.
    """
    counts = Counter(
        caption for captions in train_refs.values() for caption in map(_normalize, captions)
        if caption
    )
    if not counts:
        raise UserError("no training captions to choose a floor caption from")
    return min(counts.items(), key=lambda item: (-item[1], item[0]))[0]


def floor_scores(
    train_refs: dict[int, list[str]], eval_refs: dict[int, list[str]], spice: bool = False
) -> dict[str, float | str]:
    """Scores of always answering ``floor_caption(train_refs)`` on every eval image.

    Returns the metrics of :func:`score_captions` plus ``"caption"``, the floor caption.
    """
    caption = floor_caption(train_refs)
    scores = score_captions(eval_refs, {image_id: caption for image_id in eval_refs}, spice)
    return {"caption": caption, **scores}


def _normalize(caption: str) -> str:
    return " ".join(caption.lower().split()).rstrip(" .")
