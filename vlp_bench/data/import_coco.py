"""`vlp-bench import-coco`: real COCO (Karpathy splits) and VQAv2 laid out as a data root.

Input: Karpathy's `dataset_coco.json` (images with filepath, filename, cocoid, split and
sentences), the COCO image folder it refers to (holding train2014/ and val2014/), and optionally
the VQAv2 question and annotation files (train2014 and val2014). Output, under OUT:

    images -> the COCO image folder (a symbolic link: nothing is copied)
    annotations/captions_{train,val,test}.json   "restval" joins train, as everyone trains on it
    vqa/questions_{split}.json, vqa/annotations_{split}.json
                                                 the VQAv2 questions on that split's images

so that evaluation on "test" is the Karpathy test split (5,000 images) for captioning and the
VQAv2 questions on those images for VQA; `data.root = OUT` then runs on it.
"""

from __future__ import annotations

from pathlib import Path

from vlp_bench.errors import UserError
from vlp_bench.metrics.jsonfiles import load_json
from vlp_bench.files import atomic_write_json

SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def karpathy_splits(path: Path) -> dict[str, dict]:
    """split -> COCO caption annotation dict, from Karpathy's dataset_coco.json."""
    data = load_json(path, "Karpathy split")
    out = {s: {"info": {"description": f"{s} split of {path.name}"}, "images": [], "annotations": []}
           for s in ("train", "val", "test")}
    try:
        for im in data["images"]:
            split = SPLITS.get(im["split"])
            if split is None:
                raise UserError(f"{path}: unknown split '{im['split']}' (expected {', '.join(SPLITS)})")
            image_id = int(im.get("cocoid", im.get("imgid")))
            name = f"{im['filepath']}/{im['filename']}" if im.get("filepath") else im["filename"]
            out[split]["images"].append({"id": image_id, "file_name": name})
            for s in im["sentences"]:
                ann = out[split]["annotations"]
                ann.append({"id": len(ann) + 1, "image_id": image_id, "caption": s["raw"].strip()})
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a Karpathy split file ({type(e).__name__}: {e})") from None
    return out


def import_coco(karpathy: Path, images: Path, out: Path, vqa_questions: list[Path] = (),
                vqa_annotations: list[Path] = ()) -> dict[str, dict]:
    """Write the data root; returns {split: {"images": n, "captions": n, "questions": n}}."""
    if not images.is_dir():
        raise UserError(f"COCO image folder not found: {images}")
    if len(vqa_questions) != len(vqa_annotations):
        raise UserError("give as many --vqa-annotations files as --vqa-questions files (one pair per VQAv2 split)")
    splits = karpathy_splits(karpathy)
    missing = [im["file_name"] for im in splits["test"]["images"][:50] if not (images / im["file_name"]).is_file()]
    if missing:
        raise UserError(f"{images / missing[0]} not found: is {images} the folder holding train2014/ and val2014/?")
    out.mkdir(parents=True, exist_ok=True)
    link = out / "images"
    if link.is_symlink() or link.exists():
        if link.resolve() != images.resolve():
            raise UserError(f"{link} already exists and is not a link to {images}")
    else:
        link.symlink_to(images.resolve(), target_is_directory=True)
    summary = {}
    for split, ann in splits.items():
        atomic_write_json(out / "annotations" / f"captions_{split}.json", ann)
        summary[split] = {"images": len(ann["images"]), "captions": len(ann["annotations"])}
    if vqa_questions:
        questions, annotations = [], []
        for q_path, a_path in zip(vqa_questions, vqa_annotations):
            try:
                questions += load_json(q_path, "VQAv2 questions")["questions"]
                annotations += load_json(a_path, "VQAv2 annotations")["annotations"]
            except (KeyError, TypeError) as e:
                raise UserError(f"{q_path} / {a_path}: not VQAv2 files ({type(e).__name__}: {e})") from None
        for split, ann in splits.items():
            ids = {im["id"] for im in ann["images"]}
            qs = [q for q in questions if q["image_id"] in ids]
            atomic_write_json(out / "vqa" / f"questions_{split}.json", {"questions": qs})
            atomic_write_json(out / "vqa" / f"annotations_{split}.json",
                              {"annotations": [a for a in annotations if a["image_id"] in ids]})
            summary[split]["questions"] = len(qs)
    return summary
