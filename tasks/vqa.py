"""Zero-shot VQA: each method answers "Question: {} Short answer:" through its generation path;
scored with the official VQAv2 accuracy (vlp_bench.metrics.vqa), plus the answer-type floor."""

from __future__ import annotations

from dataclasses import dataclass

from vlp_bench.data.images import CaptionSplit
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

    def validate(self) -> None:
        if "{}" not in self.prompt:
            raise ValueError(f"prompt must contain {{}} where the question goes, got {self.prompt!r}")


def _paths(root, split: str):
    q, a = root / "vqa" / f"questions_{split}.json", root / "vqa" / f"annotations_{split}.json"
    for path in (q, a):
        if not path.is_file():
            raise UserError(f"VQA file not found: {path} (the vqa task needs vqa/questions_{{split}}.json "
                            f"and vqa/annotations_{{split}}.json under the data root)")
    return q, a


@TASKS.register("vqa")
class VQA(Task):
    """Zero-shot VQA, official VQAv2 accuracy and answer-type floor."""

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

    def evaluate(self, method: Method, split: str, limit: int | None = None) -> tuple[dict, list[dict]]:
        questions, annotations = self._files(split)
        images = CaptionSplit(self.root, split)
        if limit:  # the questions of the first `limit` images, like the captioning task's limit
            keep = set(images.image_ids[:limit])
            questions = {k: q for k, q in questions.items() if q["image_id"] in keep}
        qids = sorted(questions)
        device = next(method.parameters()).device
        answers: dict[int, str] = {}
        bs = self.cfg.batch_size
        for start in range(0, len(qids), bs):
            chunk = qids[start : start + bs]
            pixels = self.images.batch([images.image_path(questions[q]["image_id"]) for q in chunk]).to(device)
            prompts = [self.cfg.prompt.format(questions[q]["question"]) for q in chunk]
            answers.update(zip(chunk, method.generate(pixels, prompts, self.cfg)))
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
