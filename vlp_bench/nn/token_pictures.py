"""The report's picture of what token merging does: for the first evaluation images of a task, which
patches each token that reaches the LLM holds (ToMe's source tracking through every merge, in the
ViT and in the bridge), beside the image as the encoder saw it."""

from __future__ import annotations

from pathlib import Path

import torch

from vlp_bench.data.images import CaptionSplit
from vlp_bench.files import atomic_write_json
from vlp_bench.nn.merging import token_groups, track_sources

TOKEN_GROUP_IMAGES = 4  # a few evaluation images: enough to see the pattern, small enough to embed


def save_token_groups(method, task, run_dir: Path) -> None:
    """token_groups.json and token_groups/ID.png in `run_dir`, for `task`'s first test images (a task
    on images in the COCO layout: `Task.token_pictures`). Methods that merge nothing (or do not hand
    the LLM a visual prefix) write nothing."""
    from PIL import Image

    vision = getattr(method, "vision", None)
    grid = getattr(getattr(getattr(vision, "model", None), "patch_embed", None), "grid_size", None)
    if not hasattr(method, "visual_prefix") or grid is None:
        return
    data = CaptionSplit(task.root, task.cfg.split)
    ids = data.image_ids[:TOKEN_GROUP_IMAGES]
    images = task.images.batch([data.image_path(i) for i in ids]).to(next(method.parameters()).device)
    method.eval()
    with torch.no_grad(), track_sources() as mergers:
        prefix = method.visual_prefix(images)
    if not mergers:
        return
    groups = token_groups(mergers).cpu()  # (B, prefix + patches) -> index of the token to the LLM
    p, (gh, gw) = vision.num_prefix_tokens, grid
    if groups.shape[1] != p + gh * gw or groups.max() >= prefix.shape[1]:
        return  # not a plain patch grid, or tokens added after merging: nothing honest to draw
    (run_dir / "token_groups").mkdir(exist_ok=True)
    rows = []
    for k, image_id in enumerate(ids):
        with Image.open(data.image_path(image_id)) as im:
            im.convert("RGB").resize((vision.image_size,) * 2, Image.BICUBIC).save(
                run_dir / "token_groups" / f"{image_id}.png")
        rows.append({"image_id": image_id, "file": f"token_groups/{image_id}.png",
                     "groups": groups[k, p:].view(gh, gw).tolist(), "prefix_groups": groups[k, :p].tolist()})
    atomic_write_json(run_dir / "token_groups.json", {
        "split": task.cfg.split, "image_size": vision.image_size, "grid": [gh, gw], "prefix_tokens": p,
        "tokens_to_llm": prefix.shape[1], "images": rows})
