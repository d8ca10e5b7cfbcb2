"""Video captioning (MSR-VTT-style): the captioning task on clips (vlp_bench.data.video), with the same
official metrics and floor. Where the annotations give categories, each category is also scored
on its own, and so are the clips whose categories need frame order ("temporal": moves, appears,
disappears and turns in the tiny world) and the others ("static"): the subset where temporal
modules can make a difference, and its control. On the tiny world (whose msrvtt/clips.json holds
each clip's facts) `order` is the share of generated captions that state the event the right way
round (the direction moved, appeared rather than disappeared, the colour turned to), per event
and over all temporal clips: what averaging the frames cannot know."""

from __future__ import annotations

import json
from dataclasses import dataclass

from vlp_bench.registry import TASKS
from vlp_bench.tasks.caption import CaptionConfig, Captioning
from vlp_bench.data.video import VideoSplit
from vlp_bench.data.world import said_order


@dataclass
class VideoCaptionConfig(CaptionConfig):
    pass  # the same decoding and split defaults as image captioning (MSR-VTT's test split)


@TASKS.register("video_caption")
class VideoCaptioning(Captioning):
    """Video captioning on MSR-VTT-style clips: coco-caption metrics, floor, and per-category scores."""

    Config = VideoCaptionConfig
    Split = VideoSplit
    data = "clips"
    token_pictures = False  # clips: the tokens are frame averages, no one picture

    def subsets(self, data: VideoSplit, ids: list[int]) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for i in ids:
            if i in data.categories:
                groups.setdefault(data.categories[i], []).append(i)
                if data.temporal:
                    groups.setdefault("temporal" if data.categories[i] in data.temporal else "static", []).append(i)
        return dict(sorted(groups.items()))

    def extra_metrics(self, data: VideoSplit, samples: list[dict]) -> dict:
        facts_file = self.root / "msrvtt" / "clips.json"
        if not facts_file.is_file():  # only the tiny world records what each clip shows
            return {}
        facts = {c["video_id"]: c for c in json.loads(facts_file.read_text())["clips"]}
        right: dict[str, list[bool]] = {}
        for row in samples:
            f = facts[data.video_ids[row["video_id"]]]
            if (ok := said_order(f, row["caption"])) is not None:
                right.setdefault(f["event"], []).append(ok)
                right.setdefault("temporal", []).append(ok)
        return {"order": {k: sum(v) / len(v) for k, v in sorted(right.items())}}

    def sample(self, data: VideoSplit, i: int, caption: str) -> dict:
        row = {"video_id": i, "caption": caption, "references": data.refs[i]}
        return row | ({"category": data.categories[i]} if i in data.categories else {})
