"""Video captioning: the tiny world's clips, the MSR-VTT reader, simvlg-video's temporal modules
(where they sit in a block and their logits' scale, as EVLGen; zero-gate equivalence, where
gradients go, frame order; on a timm ViT and on a timm Eva), and a tiny video run end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import random_backbones
from test_flip import tiny_eva, with_vision
from vlp_bench.backbones import VisionEncoder, freeze
from vlp_bench.data.images import ImageLoader
from vlp_bench.errors import UserError
from vlp_bench.method import DecodingConfig
from vlp_bench.registry import METHODS
from vlp_bench.data.video import ClipLoader, VideoSplit, segment_centres
from vlp_bench.data.world import EVENTS, TEMPORAL, WorldConfig, build_world, said_order

CLIPS = WorldConfig(n_train=8, n_val=2, n_test=2, n_clips_train=40, n_clips_val=6, n_clips_test=6)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_world(CLIPS, tmp_path_factory.mktemp("clips"))


def _actor_x(frame: Path, background) -> float:
    """Mean column of the pixels that differ from the background."""
    arr = np.asarray(Image.open(frame).convert("RGB"), dtype=np.int16)
    mask = np.abs(arr - np.array(background, dtype=np.int16)).max(axis=-1) > 40
    return float(np.nonzero(mask)[1].mean())


# ----------------------------------------------------------------------------- the tiny world's clips


def test_clips_are_written_in_the_msrvtt_layout(world):
    info = json.loads((world / "msrvtt" / "videodatainfo.json").read_text())
    splits = [v["split"] for v in info["videos"]]
    assert (splits.count("train"), splits.count("validate"), splits.count("test")) == (40, 6, 6)
    assert {c["name"]: c["temporal"] for c in info["categories"]} == {e: e in TEMPORAL for e in EVENTS}
    per_clip: dict[str, list[str]] = {}
    for s in info["sentences"]:
        per_clip.setdefault(s["video_id"], []).append(s["caption"])
    assert all(len(set(caps)) == 5 for caps in per_clip.values()) and len(per_clip) == 52
    frames = sorted((world / "msrvtt" / "videos" / "video0").iterdir())
    assert [f.name for f in frames] == [f"{t:02d}.png" for t in range(CLIPS.clip_frames)]
    assert Image.open(frames[0]).size == (CLIPS.image_size, CLIPS.image_size)
    assert json.loads((world / "world.json").read_text())["counts"]["clips"] == {"train": 40, "val": 6, "test": 6}


def test_captions_say_what_the_frames_show(world):
    """A clip that moves left or right does so in its frames; its captions name the direction, a
    colour change names both colours, and the captions of each event use its verbs."""
    clips = json.loads((world / "msrvtt" / "clips.json").read_text())["clips"]
    split = VideoSplit(world, "train")
    refs = {split.video_ids[i]: split.refs[i] for i in split.image_ids}
    checked = 0
    for c in clips:
        caps = " ".join(refs.get(c["video_id"], []))
        if not caps:
            continue
        assert split.categories[next(i for i, v in split.video_ids.items() if v == c["video_id"])] == c["event"]
        if c["event"] == "moves":
            assert c["direction"] in caps or {"up": "top", "down": "bottom"}[c["direction"]] in caps
        if c["event"] == "turns":
            assert c["color"] in caps
        if c["event"] == "moves" and c["direction"] in ("left", "right") and c["bystander"] is None:
            scenes_dir = world / "msrvtt" / "videos" / c["video_id"]
            first, last = sorted(scenes_dir.iterdir())[0], sorted(scenes_dir.iterdir())[-1]
            bg = np.asarray(Image.open(first).convert("RGB"))[0, 0]
            moved = _actor_x(last, bg) - _actor_x(first, bg)
            assert (moved < -10) if c["direction"] == "left" else (moved > 10)
            checked += 1
    assert checked >= 1


def _reversed(facts: dict) -> dict:
    """The facts of the clip played backwards."""
    swap = {"left": "right", "right": "left", "up": "down", "down": "up", "appears": "disappears",
            "disappears": "appears"}
    f = dict(facts, event=swap.get(facts["event"], facts["event"]))
    if f["event"] == "moves":
        f["direction"] = swap[f["direction"]]
    if f["event"] == "turns":
        f["color"], f["new_color"] = f["new_color"], f["color"]
    return f


def test_order_is_read_back_from_every_reference_and_not_from_the_reversed_clip(world):
    clips = {c["video_id"]: c for c in json.loads((world / "msrvtt" / "clips.json").read_text())["clips"]}
    info = json.loads((world / "msrvtt" / "videodatainfo.json").read_text())
    judged = 0
    for s in info["sentences"]:
        facts = clips[s["video_id"]]
        if facts["event"] == "stays":
            assert said_order(facts, s["caption"]) is None
            continue
        assert said_order(facts, s["caption"]) is True, s["caption"]
        assert said_order(_reversed(facts), s["caption"]) is False, s["caption"]
        judged += 1
    assert judged >= 100
    assert said_order({"event": "moves", "direction": "left"}, "a red circle") is False  # no direction said


def test_clip_generation_is_deterministic(world, tmp_path):
    again = build_world(CLIPS, tmp_path)
    a, b = world / "msrvtt", again / "msrvtt"
    assert (a / "videodatainfo.json").read_bytes() == (b / "videodatainfo.json").read_bytes()
    assert (a / "videos" / "video3" / "05.png").read_bytes() == (b / "videos" / "video3" / "05.png").read_bytes()


def test_clip_frames_are_added_on_demand_with_the_same_bytes(world, tmp_path):
    """An image experiment's world has the clips' annotations (the tiny LM reads them) but no
    frames; a video task's call adds them to that world, byte for byte those of a full build."""
    lean = build_world(CLIPS, tmp_path, clip_frames=False)
    assert (lean / "msrvtt" / "videodatainfo.json").read_bytes() == (world / "msrvtt" / "videodatainfo.json").read_bytes()
    assert not (lean / "msrvtt" / "videos").exists()
    assert build_world(CLIPS, tmp_path) == lean
    full = sorted(p.relative_to(world) for p in (world / "msrvtt" / "videos").rglob("*.png"))
    added = sorted(p.relative_to(lean) for p in (lean / "msrvtt" / "videos").rglob("*.png"))
    assert full == added and len(full) == 52 * CLIPS.clip_frames
    assert all((world / p).read_bytes() == (lean / p).read_bytes() for p in full)
    assert not list((lean / "msrvtt").glob("videos.tmp-*"))


# ----------------------------------------------------------------------------- reading MSR-VTT-style data


def test_segment_centres():
    assert segment_centres(8, 4) == [1, 3, 5, 7]
    assert segment_centres(2, 4) == [0, 0, 1, 1]  # a short clip repeats frames
    assert segment_centres(300, 1) == [150]


def test_split_names_and_clip_loading(world):
    val = VideoSplit(world, "val")  # MSR-VTT calls it "validate"
    assert len(val) == 6 and val.source == "msrvtt" and set(val.temporal) == set(TEMPORAL)
    clips = ClipLoader(ImageLoader(64, (0.5,) * 3, (0.5,) * 3), frames=4)
    batch = clips.batch([val.image_path(i) for i in val.image_ids[:2]])
    assert batch.shape == (2, 4, 3, 64, 64)
    frame1 = ImageLoader(64, (0.5,) * 3, (0.5,) * 3)(val.image_path(val.image_ids[0]) / "01.png")
    assert torch.equal(batch[0, 0], frame1)  # 4 of 8 frames: the centres of the segments, 1, 3, 5, 7


def test_video_files_are_decoded_to_the_same_frames(world, tmp_path):
    av = pytest.importorskip("av")
    root = tmp_path / "root"
    (root / "msrvtt" / "videos").mkdir(parents=True)
    src = world / "msrvtt" / "videos" / "video0"
    frames = [Image.open(f).convert("RGB") for f in sorted(src.iterdir())]
    with av.open(str(root / "msrvtt" / "videos" / "clip7.mp4"), "w") as out:
        stream = out.add_stream("libx264rgb", rate=8, options={"crf": "0"})  # lossless, in RGB
        stream.width = stream.height = 64
        stream.pix_fmt = "rgb24"
        for im in frames:
            out.mux(stream.encode(av.VideoFrame.from_image(im)))
        out.mux(stream.encode(None))
    (root / "msrvtt" / "test_videodatainfo.json").write_text(json.dumps({
        "videos": [{"video_id": "clip7", "split": "test", "id": 7}],
        "sentences": [{"video_id": "clip7", "caption": "a clip", "sen_id": 0}]}))
    split = VideoSplit(root, "test")
    loader = ClipLoader(ImageLoader(64, (0.5,) * 3, (0.5,) * 3), frames=4)
    decoded = loader(split.image_path(7))
    from_frames = loader(src)
    assert decoded.shape == (4, 3, 64, 64) and torch.allclose(decoded, from_frames, atol=1e-6)


def test_missing_clips_and_annotations_are_one_line_errors(world, tmp_path):
    with pytest.raises(UserError, match="video annotations not found"):
        VideoSplit(tmp_path, "train")
    root = tmp_path / "partial"
    (root / "msrvtt" / "videos").mkdir(parents=True)
    (root / "msrvtt" / "videodatainfo.json").write_text((world / "msrvtt" / "videodatainfo.json").read_text())
    (root / "msrvtt" / "videos" / "video0").symlink_to(world / "msrvtt" / "videos" / "video0")
    with pytest.raises(UserError, match=r"clip\(s\) of split 'train' missing from .*: video1, video2, video3, \.\.\."):
        VideoSplit(root, "train")
    (root / "msrvtt" / "videos" / "video9.mp4").write_bytes(b"not a video")
    loader = ClipLoader(ImageLoader(64, (0.5,) * 3, (0.5,) * 3), frames=4)
    with pytest.raises(UserError, match="cannot decode video|needs PyAV"):
        loader(root / "msrvtt" / "videos" / "video9.mp4")


# ----------------------------------------------------------------------------- simvlg-video


def _backbones(encoder: str = "vit"):
    """The random test backbones; "eva": their ViT swapped for a tiny timm Eva (rotary positions,
    layer scale) read at its penultimate block (forward_intermediates, as BLIP-2 reads EVA ViT-g)."""
    return random_backbones() if encoder == "vit" else with_vision(tiny_eva(feature_layer=-2, depth=3))


def _pair(backbones=None, **options):
    """simvlg-video and simvlg built from the same seed on the same backbones: equal bridges."""
    bb = backbones or random_backbones()
    video, image = METHODS.get("simvlg-video"), METHODS.get("simvlg")
    torch.manual_seed(0)
    cfg = dataclasses.replace(video.Config(), width=32, heads=2, temporal_dim=16, temporal_heads=2, **options)
    video.check(cfg, bb)
    v = video(cfg, bb)
    torch.manual_seed(0)
    s = image(dataclasses.replace(image.Config(), width=32, heads=2), bb)
    return v.eval(), s.eval(), bb


CLIP = torch.randn(2, 4, 3, 64, 64, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("encoder", ["vit", "eva"])
def test_zero_gates_make_the_video_model_the_image_model_per_frame_averaged(encoder):
    v, s, bb = _pair(_backbones(encoder))
    with torch.no_grad():
        per_frame = torch.stack([bb.vision(CLIP[:, t]) for t in range(4)], dim=1).mean(dim=1)
        assert torch.equal(v.encode(CLIP), per_frame)  # to the last bit
        assert torch.equal(v.visual_prefix(CLIP), s.bridge(per_frame))
        assert torch.equal(s.visual_prefix(CLIP), s.bridge(per_frame))  # simvlg on clips: the frame average
        for m in v.temporal:
            m.gate.fill_(0.5)
        assert not torch.allclose(v.visual_prefix(CLIP), s.bridge(per_frame), atol=1e-3)


# ----------------------------------------------------------------------------- EVLGen's module, written out


def _temporal(m, x: torch.Tensor, frames: int) -> torch.Tensor:
    """EVLGen's TemporalTokenMerge (lavis/models/eva_vit_g.py) for module m's weights, written out:
    at each position, attention over the frames with q, k projected (+ the frame positions vlp-bench
    adds), v the stream itself split into heads, logits scaled by the whole q/k width ** -0.5
    (EVLGen's hidden_dim ** -0.5: 1/16 at 256), not a head's; gated."""
    BT, N, D = x.shape
    B, h = BT // frames, m.heads
    s = x.reshape(B, frames, N, D).permute(0, 2, 1, 3)  # (B, N, T, D)
    q, k = F.linear(s, m.q.weight, m.q.bias), F.linear(s, m.k.weight, m.k.bias)
    if m.pos is not None:
        q, k = q + m.pos[:frames], k + m.pos[:frames]
    width = q.shape[-1]
    q, k, v = (t.reshape(B, N, frames, h, -1) for t in (q, k, s))
    attn = (torch.einsum("bnthd,bnshd->bnhts", q, k) / math.sqrt(width)).softmax(dim=-1)
    out = torch.einsum("bnhts,bnshd->bnthd", attn, v).reshape(B, N, frames, D).permute(0, 2, 1, 3)
    return m.gate * out.reshape(BT, N, D)


def _branches(blk, x, rope):
    """A timm ViT Block's or EvaBlock's attention branch (layer scale included) and its MLP branch."""
    if hasattr(blk, "gamma_1"):  # EvaBlock: layer scale as parameters, rotary positions
        scale = (lambda g, y: y if g is None else g * y)
        return (lambda t: scale(blk.gamma_1, blk.attn(blk.norm1(t), rope=rope)),
                lambda t: scale(blk.gamma_2, blk.mlp(blk.norm2(t))))
    return lambda t: blk.ls1(blk.attn(blk.norm1(t))), lambda t: blk.ls2(blk.mlp(blk.norm2(t)))


def _video_encoder(vision, temporal, clips, placement: str = "evlgen"):
    """The frame-averaged tokens of a clip batch, each block's temporal module where EVLGen has it
    (Block.forward: x = x + attention; x = temporal(x); x = x + mlp), or "before" the block (the
    placement vlp-bench had); and the streams the modules read."""
    vit = vision.model
    B, T = clips.shape[:2]
    out = vit._pos_embed(vit.patch_embed(clips.flatten(0, 1)))
    x, rope = out if isinstance(out, tuple) else (out, None)  # Eva: (tokens, rotary embedding)
    x = vit.norm_pre(x)
    streams = []
    for blk, m in zip(vit.blocks, temporal):
        attention, mlp = _branches(blk, x, rope)
        if placement == "before":
            x = x + _temporal(m, x, T)
        x = x + attention(x)
        if placement == "evlgen":
            streams.append(x)
            x = x + _temporal(m, x, T)
        x = x + mlp(x)
    x = vit.norm(x) if vision.feature_layer == -1 else x
    return x.unflatten(0, (B, T)).mean(dim=1), streams


@pytest.mark.parametrize("encoder", ["vit", "eva"])
def test_the_temporal_module_sits_between_a_blocks_attention_and_its_mlp(encoder):
    """With non-zero gates, each module reads the residual stream after its block's attention
    sub-layer, and the encoder's output is EVLGen's: the gated output added to that stream, the
    MLP reading the sum (not the module in front of the block)."""
    bb = _backbones(encoder)
    with torch.no_grad():  # attention and MLP weighing in the stream (at timm's init they hardly do)
        for layer in bb.vision.model.blocks.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, 0.2)
    v, _, _ = _pair(bb)
    read = []
    handles = [m.register_forward_pre_hook(lambda mod, args: read.append(args[0])) for m in v.temporal]
    with torch.no_grad():
        for i, m in enumerate(v.temporal):
            m.gate.fill_(0.5 + 0.25 * i)
        got = v.encode(CLIP)
        want, streams = _video_encoder(bb.vision, v.temporal, CLIP)
        before, _ = _video_encoder(bb.vision, v.temporal, CLIP, placement="before")
    for handle in handles:
        handle.remove()
    assert len(read) == len(streams) == len(v.temporal) == len(bb.vision.model.blocks) + 1 + bb.vision.feature_layer
    assert torch.equal(read[0], streams[0])  # the first block's own x + attention branch, to the last bit
    for a, b in zip(read, streams):  # later: up to rounding (vlp-bench adds x + (b + g t), EVLGen (x + b) + g t)
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, before, atol=1e-2)


def test_temporal_logits_are_scaled_by_the_whole_qk_width_as_evlgen():
    from vlp_bench.methods.simvlg_video import SimVLGVideo, TemporalAttention

    paper = SimVLGVideo.paper_config
    module = TemporalAttention(1408, paper.temporal_dim, paper.temporal_heads, paper.max_frames, paper.frame_positions)
    assert module.scale == 1 / 16  # 256 ** -0.5 (EVLGen's hidden_dim), not a 32-wide head's 32 ** -0.5
    torch.manual_seed(0)
    m = TemporalAttention(32, 16, 2, 4, True)
    with torch.no_grad():
        m.gate.fill_(1.0)
        for layer in (m.q, m.k):  # sharp enough attention that the scale shows
            layer.weight.normal_(0.0, 0.5)
        x = torch.randn(2 * 4, 5, 32)
        want = _temporal(m, x, 4)
        assert torch.allclose(m(x, 4), want, atol=1e-6)
        m.scale = 8 ** -0.5  # a head's (16 / 2 wide): other attention
        assert not torch.allclose(m(x, 4), want, atol=1e-3)


def test_an_image_is_a_clip_of_one_frame_and_of_a_still_clip():
    v, _, _ = _pair()
    image = CLIP[:, 0]
    with torch.no_grad():
        for m in v.temporal:
            m.gate.fill_(0.5)
        one = v.encode(image)
        assert torch.equal(one, v.encode(image[:, None]))
        assert torch.allclose(one, v.encode(image[:, None].expand(-1, 4, -1, -1, -1)), atol=1e-5)


def test_blocks_whose_attention_branch_the_module_cannot_follow_are_refused():
    from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer

    vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                            block_fn=ParallelScalingBlock)
    bb = with_vision(freeze(VisionEncoder(vit, 64, (0.5,) * 3, (0.5,) * 3)))
    with pytest.raises(ValueError, match="not of ParallelScalingBlock"):
        _pair(bb)


@pytest.mark.parametrize("encoder", ["vit", "eva"])
def test_gradients_reach_only_the_temporal_modules_and_the_bridge(encoder):
    v, s, bb = _pair(_backbones(encoder))
    v.train()
    batch = {"images": CLIP, "prompt": "a photo of", "captions": ["a red circle moves left", "a star appears"]}
    v.training_loss(batch, v.stages(4)[0]).loss.backward()
    gates = [m.gate.grad for m in v.temporal]
    assert all(g is not None and g != 0 for g in gates)  # at gate 0 the gates alone learn first
    with torch.no_grad():
        for m in v.temporal:
            m.gate.fill_(0.3)
    v.zero_grad(set_to_none=True)
    v.training_loss(batch, v.stages(4)[0]).loss.backward()
    for name, p in v.named_parameters():
        if name.startswith(("vision.", "llm.")):
            assert p.grad is None, name
        elif name.startswith("temporal."):
            assert p.grad is not None, name
            if not name.endswith("k.bias"):  # a key bias shifts every score alike: softmax ignores it (grad 0)
                assert p.grad.abs().sum() > 0, name
    trained = {n.split(".")[0] for n, p in v.named_parameters() if p.requires_grad}
    assert trained == {"temporal"} | {n.split(".")[0] for n, p in s.named_parameters() if p.requires_grad}
    assert len(v.temporal) == len(bb.vision.model.blocks) + 1 + bb.vision.feature_layer


@pytest.mark.parametrize("frame_positions", [False, True])
def test_only_frame_positions_let_the_model_see_the_order_of_the_frames(frame_positions):
    v, _, _ = _pair(frame_positions=frame_positions)
    with torch.no_grad():
        for m in v.temporal:
            m.gate.fill_(0.5)
        forward, backward = v.visual_prefix(CLIP), v.visual_prefix(CLIP.flip(1))
    assert torch.allclose(forward, backward, atol=1e-5) != frame_positions


def test_clips_longer_than_the_learnt_frame_positions_are_refused():
    v, _, _ = _pair(max_frames=2)
    with pytest.raises(ValueError, match="max_frames = 2"):
        v.visual_prefix(CLIP)


@pytest.mark.parametrize("name", [n for n in METHODS.names() if METHODS.get(n).video])
def test_every_method_that_takes_clips_trains_and_generates_on_them(name):
    """Registry-wide: a method whose `video` is true takes (B, T, 3, H, W) batches."""
    from test_methods import _small

    cls = METHODS.get(name)
    torch.manual_seed(0)
    method = cls(_small(cls.Config()), random_backbones(bert=True))
    method.train()
    batch = {"images": CLIP, "prompt": "a photo of", "captions": ["a red circle moves left", "a star appears"]}
    for stage in method.stages(4):
        out = method.training_loss(batch, stage)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    method.eval()
    texts = method.generate(CLIP, ["a photo of"] * 2, DecodingConfig(num_beams=2, max_new_tokens=4, min_new_tokens=1))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


# ----------------------------------------------------------------------------- a tiny video run


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "vlp_bench", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def video_experiment(tmp_path_factory, tiny_overrides):
    out = tmp_path_factory.mktemp("video")
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    proc = _cli("run", *sets, "--task", "video_caption", "--methods", "simvlg-video,simvlg", "--out", str(out), cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_a_tiny_video_run_writes_valid_records(video_experiment):
    from vlp_bench.metrics.caption import METRIC_NAMES
    from vlp_bench.results import SCHEMA_VERSION
    from vlp_bench.files import read_jsonl

    out, proc = video_experiment
    for method in ("simvlg-video", "simvlg"):
        res = json.loads((out / f"{method}-seed0" / "results.json").read_text())
        assert res["schema_version"] == SCHEMA_VERSION and res["status"] == "finished"
        assert res["data"]["source"] == "msrvtt" and res["config"]["target"]["metric"] == "video_caption.CIDEr"
        m = res["metrics"]["video_caption"]
        assert set(m) >= {*METRIC_NAMES, "floor", "subsets", "order"} and m["images"] == 8
        assert "caption" not in res["metrics"] and all(0 <= v <= 1 for v in m["order"].values())
        subsets = m["subsets"]
        assert sum(subsets.get(g, {}).get("images", 0) for g in ("temporal", "static")) == 8
        assert sum(subsets[e]["images"] for e in EVENTS if e in subsets) == 8
        samples = read_jsonl(out / f"{method}-seed0" / "samples_video_caption.jsonl")
        assert len(samples) == 8 and all(s["category"] in EVENTS and len(s["references"]) == 5 for s in samples)
        curve = [r for r in read_jsonl(out / f"{method}-seed0" / "metrics.jsonl") if r.get("split") == "val"]
        assert curve and all("CIDEr" in r["eval"]["video_caption"] for r in curve)
        assert res["cost"]["train_flops"] > 0
    video = json.loads((out / "simvlg-video-seed0" / "results.json").read_text())
    image = json.loads((out / "simvlg-seed0" / "results.json").read_text())
    assert len(video["method_info"]["temporal_gates"]) == 1  # the tiny test ViT has one block
    # the temporal modules cost their own forward and the backward through the frozen ViT
    assert video["cost"]["flops_by_part"]["vision"]["backward"] > 0 == image["cost"]["flops_by_part"]["vision"]["backward"]
    paper = json.loads((out / "flops-paper.json").read_text())
    assert paper["frames"] == 4 and set(paper["methods"]) >= {"simvlg-video", "simvlg"}
    html = (out / "report.html").read_text()
    assert "video_caption.CIDEr by subset" in html and "temporal (" in html


@pytest.mark.slow
def test_video_subset_scores_equal_scoring_the_subset_alone(video_experiment):
    """The "temporal" scores are what the official scorers give for those clips' samples alone."""
    from vlp_bench.metrics.caption import score_captions
    from vlp_bench.files import read_jsonl

    out, _ = video_experiment
    res = json.loads((out / "simvlg-seed0" / "results.json").read_text())
    rows = [r for r in read_jsonl(out / "simvlg-seed0" / "samples_video_caption.jsonl") if r["category"] in TEMPORAL]
    alone = score_captions({r["video_id"]: r["references"] for r in rows}, {r["video_id"]: r["caption"] for r in rows})
    assert res["metrics"]["video_caption"]["subsets"]["temporal"] == {**alone, "images": len(rows)}


@pytest.mark.parametrize("args, message", [
    (["--task", "video_caption", "--methods", "tome-vit"], "method 'tome-vit' does not take video clips"),
    (["--tasks", "caption,video_caption"], "mixes tasks on images and on clips"),
    (["--task", "video_caption", "--set", "data.shards=/nowhere"], "data.shards hold images"),
])
def test_video_experiments_refuse_what_cannot_work(args, message, tiny_overrides, tmp_path):
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    proc = _cli("run", *sets, *args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
