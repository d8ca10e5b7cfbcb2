"""Video-caption data in the MSR-VTT layout, read the same way for the tiny world's clips and real
MSR-VTT. Under a data root:

    msrvtt/*videodatainfo.json   MSR-VTT annotations (its release has train_val_videodatainfo.json
                                 and test_videodatainfo.json; the tiny world writes one file):
                                 "videos" [{video_id, split: train|validate|test, id?, category?}],
                                 "sentences" [{video_id, caption}], "categories" (optional, extra)
    msrvtt/videos/VIDEO_ID/      the clip's frames as images, in file-name order, or
    msrvtt/videos/VIDEO_ID.mp4   a video file (.mp4 .avi .webm .mkv .mov), decoded with PyAV
                                 (pip install 'vlp-bench[video]')

A clip is read as `frames` frames (data.frames) taken at the centres of as many equal segments of
its frames (TSN's test-time sampling): every part of the clip is seen, and a clip shorter than
`frames` repeats frames. Batches of clips are (B, T, 3, H, W) tensors; a VideoSplit and a
ClipLoader stand in for a CaptionSplit and an ImageLoader, so TrainBatches serves clips unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image

from vlp_bench.data.images import ImageLoader
from vlp_bench.errors import UserError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SPLIT_NAMES = {"train": ("train",), "val": ("validate", "val"), "test": ("test",)}  # ours -> MSR-VTT's


def annotation_files(root: Path) -> list[Path]:
    return sorted((Path(root) / "msrvtt").glob("*videodatainfo.json"))


class VideoSplit:
    """One split of an MSR-VTT-style root: its clips (id, file or frame folder) and references.
    `image_ids`, `refs`, `image_path` and `ann_path` mirror CaptionSplit's, for the shared readers;
    `categories` (clip id -> category name) and `temporal` (category names whose captions need
    frame order) are empty when the annotations do not give them."""

    source = "msrvtt"  # the layout, for results.json

    def __init__(self, root: Path, split: str):
        self.root, self.split = Path(root), split
        files = annotation_files(self.root)
        if not files:
            raise UserError(f"video annotations not found: no {self.root / 'msrvtt'}/*videodatainfo.json")
        self.ann_path = files[0] if len(files) == 1 else self.root / "msrvtt"
        names = SPLIT_NAMES.get(split, (split,))
        videos, sentences, categories = [], [], {}
        for path in files:
            try:
                data = json.loads(path.read_text())
                videos += [v for v in data["videos"] if v["split"] in names]
                sentences += [(s["video_id"], s["caption"]) for s in data["sentences"]]
                categories.update({int(c["id"]): c for c in data.get("categories", [])})
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
                raise UserError(f"{path}: not an MSR-VTT annotation file ({type(e).__name__}: {e})") from None
        ids = {}
        for k, v in enumerate(videos):
            ids[str(v["video_id"])] = int(v.get("id", k))
        if len(set(ids.values())) != len(ids):
            raise UserError(f"{self.ann_path}: two clips of split '{split}' share an id")
        self.video_ids = {i: vid for vid, i in ids.items()}
        self.refs: dict[int, list[str]] = {i: [] for i in self.video_ids}
        for vid, caption in sentences:
            if vid in ids:
                self.refs[ids[vid]].append(str(caption))
        self.image_ids = sorted(i for i in self.video_ids if self.refs[i])
        if not self.image_ids:
            raise UserError(f"{self.ann_path}: no captioned clips in split '{split}' (MSR-VTT names: {'/'.join(names)})")
        self.categories = {ids[str(v["video_id"])]: categories[int(v["category"])]["name"]
                           for v in videos if int(v.get("category", -1)) in categories}
        self.temporal = sorted({c["name"] for c in categories.values() if c.get("temporal")})
        self.files = self._locate()

    def _locate(self) -> dict[int, Path]:
        """Clip id -> its frame folder or video file; a clear error naming the missing ones."""
        videos = self.root / "msrvtt" / "videos"
        try:
            present = set(os.listdir(videos))
        except OSError:
            raise UserError(f"video folder not found: {videos}") from None
        files, missing = {}, []
        for i in self.image_ids:
            vid = self.video_ids[i]
            name = next((n for n in (vid, *(vid + e for e in VIDEO_EXTENSIONS)) if n in present), None)
            if name is None:
                missing.append(vid)
            else:
                files[i] = videos / name
        if missing:
            raise UserError(f"{len(missing)} clip(s) of split '{self.split}' missing from {videos} (neither a "
                            f"frame folder nor {'/'.join(VIDEO_EXTENSIONS)}): {', '.join(missing[:3])}"
                            f"{', ...' if len(missing) > 3 else ''}")
        return files

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, clip_id: int) -> Path:
        return self.files[clip_id]


def segment_centres(n: int, frames: int) -> list[int]:
    """Indices of `frames` frames out of `n`: the centre of each of `frames` equal segments."""
    return [min(n - 1, int((k + 0.5) * n / frames)) for k in range(frames)]


class ClipLoader:
    """A clip (frame folder or video file) -> (frames, 3, H, W), each frame read as ImageLoader
    reads an image; `batch` stacks clips into (B, frames, 3, H, W)."""

    def __init__(self, images: ImageLoader, frames: int):
        self.images, self.frames = images, frames
        self.size = images.size

    def __call__(self, path: Path) -> torch.Tensor:
        path = Path(path)
        if path.is_dir():
            names = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)
            if not names:
                raise UserError(f"no frames ({'/'.join(FRAME_EXTENSIONS)}) in {path}")
            return torch.stack([self.images(names[i]) for i in segment_centres(len(names), self.frames)])
        frames = _decode(path)
        return torch.stack([self.images.from_image(frames[i]) for i in segment_centres(len(frames), self.frames)])

    def batch(self, paths) -> torch.Tensor:
        return torch.stack([self(p) for p in paths])


def _decode(path: Path) -> list[Image.Image]:
    """Every frame of a video file, with PyAV."""
    try:
        import av
    except ImportError:
        raise UserError(f"decoding {path.suffix} files needs PyAV: pip install 'vlp-bench[video]' "
                        f"(or extract the frames into {path.with_suffix('')}/)") from None
    try:
        with av.open(str(path)) as container:
            frames = [f.to_image() for f in container.decode(video=0)]
    except (av.FFmpegError, OSError, IndexError, ValueError) as e:
        raise UserError(f"cannot decode video {path}: {e}") from None
    if not frames:
        raise UserError(f"video {path} has no frames")
    return frames
