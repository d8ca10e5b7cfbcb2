"""VQA: each method answers "Question: {} Short answer:" through its generation path, zero-shot or
after fine-tuning on the training questions (`finetune_steps`); scored with the official VQAv2
accuracy (vlp_bench.metrics.vqa), plus the answer-type floor."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

from vlp_bench.data.images import CaptionSplit, TrainBatches
from vlp_bench.errors import UserError
from vlp_bench.method import DecodingConfig, Method
from vlp_bench.registry import TASKS
from vlp_bench.task import Task
from vlp_bench.metrics.vqa import answer_floor, load_annotations, load_questions, vqa_accuracy


@dataclass
class VQAConfig(DecodingConfig):
    prompt: str = "Question: {} Short answer:"  # BLIP-2's zero-shot VQA prompt; {} is the question
    num_beams: int = 5  # BLIP-2's VQA decoding: beam 5, max 10, min 1 new tokens
    max_new_tokens: int = 10
    min_new_tokens: int = 1
    split: str = "test"
    # steps of fine-tuning on the training questions before each evaluation, on a copy of the weights
    # (cost recorded apart); 0 = zero-shot; -1 = the method's default (Method.task_finetune_steps): 0
    # for the frozen-LLM methods, which their papers evaluate zero-shot; FLM's paper fine-tunes
    finetune_steps: int = -1

    def validate(self) -> None:
        if "{}" not in self.prompt:
            raise ValueError(f"prompt must contain {{}} where the question goes, got {self.prompt!r}")
        if self.finetune_steps < -1:
            raise ValueError(f"finetune_steps must be >= 0, or -1 for the method's default, got {self.finetune_steps}")


def _paths(root, split: str):
    q, a = root / "vqa" / f"questions_{split}.json", root / "vqa" / f"annotations_{split}.json"
    for path in (q, a):
        if not path.is_file():
            raise UserError(f"VQA file not found: {path} (the vqa task needs vqa/questions_{{split}}.json "
                            f"and vqa/annotations_{{split}}.json under the data root)")
    return q, a


class QuestionSplit:
    """A split's questions as training samples, read by TrainBatches as it reads a caption split:
    one sample per question (its id in `image_ids`) with its image, and one target (`refs`): its
    `multiple_choice_answer`, VQAv2's most common of the ten human answers (the floor's answer)."""

    source = "vqa"

    def __init__(self, root, split: str):
        q, self.ann_path = _paths(root, split)
        questions, annotations = load_questions(q), load_annotations(self.ann_path)
        self.images, self.split = CaptionSplit(root, split), split
        self.questions = {k: v for k, v in questions.items() if v.get("image_id") in self.images.files}
        self.image_ids = sorted(self.questions)
        if not self.image_ids:
            raise UserError(f"{q}: no question on an image of {self.images.ann_path}")
        missing = [k for k in self.image_ids if not isinstance(annotations.get(k, {}).get("multiple_choice_answer"), str)]
        if missing:
            raise UserError(f"{self.ann_path}: question {missing[0]} has no annotation with a 'multiple_choice_answer' "
                            f"(the answer VQA fine-tuning trains on)")
        self.refs = {k: [annotations[k]["multiple_choice_answer"]] for k in self.image_ids}

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, question_id: int):
        return self.images.image_path(self.questions[question_id]["image_id"])


@TASKS.register("vqa")
class VQA(Task):
    """VQA (zero-shot or fine-tuned), official VQAv2 accuracy and answer-type floor."""

    Config = VQAConfig
    primary = "overall"

    def __init__(self, cfg: VQAConfig, data_root, images):
        super().__init__(cfg, data_root, images)
        self._floors: dict[tuple, dict] = {}  # depends on the data only: computed once per split

    @classmethod
    def check(cls, cfg: VQAConfig, data_root) -> None:
        for split in ("train", "val", cfg.split):  # train: the answer floor; val: evaluations during training
            _paths(data_root, split)

    def _files(self, split: str):
        q, a = _paths(self.root, split)
        return load_questions(q), load_annotations(a)

    @functools.cached_property
    def train_questions(self) -> QuestionSplit:
        return QuestionSplit(self.root, "train")

    def prompt(self, question: str | None = None) -> str:
        if not question:
            raise UserError("task 'vqa' answers a question: give one (--question \"...\")")
        return self.cfg.prompt.format(question)

    def finetune_batches(self, batch_size: int, seed: int, workers: int = 0) -> Iterator[dict]:
        """The training questions in seeded batches: each row its question's image, the prompt with
        the question and its answer as the target."""
        split = self.train_questions
        for batch in TrainBatches(split, self.images, batch_size, seed, workers=workers):
            qids = batch["image_ids"]
            yield {**batch, "question_ids": qids, "image_ids": [split.questions[q]["image_id"] for q in qids],
                   "prompt": [self.prompt(split.questions[q]["question"]) for q in qids]}

    def evaluate(self, method: Method, split: str, limit: int | None = None) -> tuple[dict, list[dict]]:
        questions, annotations = self._files(split)
        images = CaptionSplit(self.root, split)
        if limit:  # the questions of the first `limit` images, like the captioning task's limit
            keep = set(images.image_ids[:limit])
            questions = {k: q for k, q in questions.items() if q["image_id"] in keep}
        qids = sorted(questions)
        device = next(method.parameters()).device

        def generate(chunk: list[int]) -> list[str]:
            pixels = self.images.batch([images.image_path(questions[q]["image_id"]) for q in chunk]).to(device)
            return method.generate(pixels, [self.prompt(questions[q]["question"]) for q in chunk], self.cfg)

        answers = self.decode(qids, generate)
        if answers is None:
            return {}, []  # under torchrun: this rank decoded its share, rank zero scores them all
        metrics = vqa_accuracy(questions, annotations, answers)
        key = (split, tuple(qids))
        if key not in self._floors:
            _, train_annotations = self._files("train")
            self._floors[key] = answer_floor(train_annotations, questions, annotations)
        metrics["floor"] = self._floors[key]
        metrics["split"] = split
        samples = [{"question_id": q, "image_id": questions[q]["image_id"], "question": questions[q]["question"],
                    "answer": answers[q], "answers": [a["answer"] for a in annotations[q]["answers"]]}
                   for q in qids]
        return metrics, samples
