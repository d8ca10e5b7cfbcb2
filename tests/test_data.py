"""Training data at scale: TrainBatches with loader workers, and tar shards (vlp_bench/data/shards.py):
export, streaming, bad samples counted and skipped, exact resume, clear errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlp_bench.data.images import CaptionSplit, ImageLoader, TrainBatches
from vlp_bench.errors import UserError
from vlp_bench.data.shards import ShardBatches, export_shards, read_shard, shard_paths
from vlp_bench.data.world import WorldConfig, build_world

LOADER = ImageLoader(64, (0.5,) * 3, (0.5,) * 3)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return build_world(WorldConfig(n_train=48, n_val=4, n_test=4, n_clips_train=4, n_clips_val=2, n_clips_test=2), tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def shards(root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    export_shards(CaptionSplit(root, "train"), out, shard_size=8)
    return out


def _take(batches, n):
    return [next(batches) for _ in range(n)]


def _same(a: list[dict], b: list[dict], keys=("image_ids", "captions")) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert all(x[k] == y[k] for k in keys if k in x)
        assert torch.equal(x["images"], y["images"])


def test_loader_workers_change_nothing_but_the_speed(root):
    split = CaptionSplit(root, "train")
    _same(_take(TrainBatches(split, LOADER, 8, seed=3), 9), _take(TrainBatches(split, LOADER, 8, seed=3, workers=2), 9))


def test_dropping_a_sampler_stops_its_workers_at_once(root):
    """No reference cycle through the loader: otherwise the workers live on until the garbage
    collector runs, and their shutdown then took 10 s per sampler (every run, every evaluation)."""
    batches = TrainBatches(CaptionSplit(root, "train"), LOADER, 8, seed=0, workers=2)
    next(batches)
    workers = list(batches._images._workers)
    assert workers and all(w.is_alive() for w in workers)
    del batches  # no gc.collect(): reference counting alone
    for w in workers:
        w.join(timeout=20)
    assert not any(w.is_alive() for w in workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_sampler_continues_with_the_same_batches(root, workers):
    """The workers decode ahead, so the generator runs ahead of what was handed out: the state is
    the position after the last batch handed out."""
    split = CaptionSplit(root, "train")
    ref = _take(TrainBatches(split, LOADER, 8, seed=1), 10)  # crosses an epoch (48 images = 6 batches)
    first = TrainBatches(split, LOADER, 8, seed=1, workers=workers)
    _take(first, 4)
    state = first.state_dict()
    resumed = TrainBatches(split, LOADER, 8, seed=99, workers=workers)
    resumed.load_state_dict(state)
    _same(_take(resumed, 6), ref[4:])


def test_ranks_split_every_global_batch(root):
    split = CaptionSplit(root, "train")
    whole = _take(TrainBatches(split, LOADER, 8, seed=0), 3)
    halves = [_take(TrainBatches(split, LOADER, 8, seed=0, rank=r, world=2), 3) for r in (0, 1)]
    for b, h0, h1 in zip(whole, *halves):
        assert h0["image_ids"] + h1["image_ids"] == b["image_ids"] and h0["captions"] + h1["captions"] == b["captions"]


# ----------------------------------------------------------------------------- shards


def test_export_writes_every_sample_with_its_captions(root, shards):
    split = CaptionSplit(root, "train")
    paths = shard_paths(str(shards))
    assert [p.name for p in paths] == [f"train-{i:06d}.tar" for i in range(6)]
    skipped = Counter()
    samples = [s for p in paths for s in read_shard(p, skipped)]
    assert not skipped and len(samples) == len(split)
    for key, data, name, captions in samples:
        image_id = int(key)
        assert captions == split.refs[image_id] and data == split.image_path(image_id).read_bytes()


def test_shard_specs_brace_glob_and_directory(shards):
    full = shard_paths(str(shards))
    assert shard_paths(str(shards / "train-{000000..000005}.tar")) == full
    assert shard_paths(str(shards / "*.tar")) == full
    with pytest.raises(UserError, match=r"1 of 7 shards not found, e.g. .*train-000006.tar"):
        shard_paths(str(shards / "train-{000000..000006}.tar"))
    with pytest.raises(UserError, match="no .tar shards found at"):
        shard_paths(str(shards / "nothing-*.tar"))


def _add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    """Two shards of 6 good samples each, with every kind of bad one between them, and a third
    shard cut short after 2 good samples."""
    out = tmp_path_factory.mktemp("broken")
    with tarfile.open(out / "a-0.tar", "w") as tar:
        for i in range(3):
            _add(tar, f"g{i}.png", _png((10 * i, 0, 0)))
            _add(tar, f"g{i}.txt", f"a red thing {i}".encode())
        _add(tar, "bad0.jpg", b"not an image at all")  # does not decode
        _add(tar, "bad0.txt", b"a caption")
        _add(tar, "bad1.png", _png((0, 0, 0)))  # no caption
        _add(tar, "bad2.txt", b"a caption without an image")  # no image
        _add(tar, "bad3.png", _png((0, 0, 0)))
        _add(tar, "bad3.json", b"{not json")  # a caption file that is not valid
        for i in range(3, 6):
            _add(tar, f"g{i}.png", _png((10 * i, 0, 0)))
            _add(tar, f"g{i}.json", json.dumps({"captions": [f"a blue thing {i}", f"another {i}"]}).encode())
    with tarfile.open(out / "a-1.tar", "w") as tar:
        for i in range(6, 12):
            _add(tar, f"g{i}.png", _png((10 * i, 0, 0)))
            _add(tar, f"g{i}.json", json.dumps({"caption": f"a green thing {i}"}).encode())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(12, 16):
            _add(tar, f"g{i}.png", _png((10 * i, 0, 0)))
            _add(tar, f"g{i}.txt", f"a shard cut short {i}".encode())
    data = buf.getvalue()
    (out / "a-2.tar").write_bytes(data[: 512 * 9 + 100])  # 2 samples (4 files), then the middle of the 5th
    return out


def test_a_shard_yields_its_complete_samples_and_counts_the_rest(broken):
    skipped = Counter()
    assert [s[0] for s in read_shard(broken / "a-0.tar", skipped)] == ["g0", "g1", "g2", "bad0", "g3", "g4", "g5"]
    assert skipped == {"no_caption": 1, "no_image": 1, "bad_caption": 1}
    skipped.clear()
    samples = list(read_shard(broken / "a-2.tar", skipped))
    assert [s[0] for s in samples] == ["g12", "g13"] and skipped == {"truncated_shard": 1}
    assert samples[0][3] == ["a shard cut short 12"]


def test_bad_samples_are_counted_by_reason_and_skipped(broken):
    batches = ShardBatches(str(broken), LOADER, 4, seed=0, workers=0, shuffle_buffer=1)
    seen = [k for b in _take(batches, 4) for k in b["keys"]]  # 16 samples: the 14 good ones and more
    assert set(seen) == {f"g{i}" for i in range(14)}
    skipped = batches.report()["skipped"]  # every bad one was read (and counted) once at least
    assert set(skipped) == {"bad_image", "no_caption", "no_image", "bad_caption", "truncated_shard"}


def test_shard_streams_resume_exactly(shards):
    def make(workers):
        return ShardBatches(str(shards), LOADER, 4, seed=5, workers=workers, shuffle_buffer=6)

    for workers in (0, 2):  # the readers split the shards, so the stream is a function of their number
        ref = _take(make(workers), 15)  # 48 samples = 12 batches: crosses an epoch
        first = make(workers)
        _take(first, 5)
        resumed = make(workers)
        resumed.load_state_dict(first.state_dict())
        _same(_take(resumed, 10), ref[5:], keys=("keys", "captions"))


def test_ranks_read_different_shards(shards):
    keys = [{k for b in _take(ShardBatches(str(shards), LOADER, 4, seed=0, rank=r, world=2, workers=0), 3)
             for k in b["keys"]} for r in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_too_few_shards_for_the_readers_is_a_clear_error(shards):
    with pytest.raises(UserError, match=r"6 shards for 2 processes x 4 data.workers"):
        ShardBatches(str(shards), LOADER, 4, seed=0, rank=0, world=2, workers=4)


@pytest.mark.slow
def test_a_run_trains_on_shards_and_reports_what_it_skipped(tiny_overrides, broken, tmp_path):
    sets = [a for o in [*tiny_overrides, f"data.shards='{broken}'", "data.workers=1", "train.batch_size=4",
                        "experiment.tasks=[]", "train.eval_every=0"] for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "vlp_bench", "run", *sets, "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "x" / "baseline-seed0" / "results.json").read_text())
    assert res["status"] == "finished"
    assert res["data"]["source"] == "shards" and res["data"]["batches_drawn"] == res["cost"]["steps"]
    assert res["data"]["skipped"]["bad_image"] >= 1 and res["data"]["skipped"]["truncated_shard"] >= 1


@pytest.mark.slow
def test_missing_shards_fail_before_training(tiny_overrides, tmp_path):
    sets = [a for o in [*tiny_overrides, f"data.shards='{tmp_path}/none-{{000000..000003}}.tar'"]
            for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "vlp_bench", "run", *sets, "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.shards: 4 of 4 shards not found, e.g." in proc.stderr and "none-000000.tar" in proc.stderr
    assert not (tmp_path / "x" / "baseline-seed0").exists()


# ----------------------------------------------------------------------------- real COCO layout


def test_import_coco_lays_out_karpathy_splits_and_vqa(root, tmp_path):
    """A miniature dataset_coco.json over the tiny world's images (as train2014/ and val2014/),
    and VQAv2 files: the result is a data root the tasks read, restval in train."""
    split = CaptionSplit(root, "train")
    coco = tmp_path / "coco"
    ids = split.image_ids[:8]
    entries = []
    for k, image_id in enumerate(ids):
        folder = "train2014" if k < 4 else "val2014"
        (coco / folder).mkdir(parents=True, exist_ok=True)
        name = f"COCO_{folder}_{image_id:012d}.png"
        (coco / folder / name).write_bytes(split.image_path(image_id).read_bytes())
        entries.append({"filepath": folder, "filename": name, "cocoid": image_id, "imgid": k,
                        "split": ["train", "restval", "train", "restval", "val", "val", "test", "test"][k],
                        "sentences": [{"raw": c + " ", "tokens": c.split()} for c in split.refs[image_id]]})
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    vq = [{"question_id": 10 * i, "image_id": i, "question": "what color?"} for i in ids]
    va = [{"question_id": 10 * i, "image_id": i, "answer_type": "other", "question_type": "what color",
           "multiple_choice_answer": "red", "answers": [{"answer": "red", "answer_id": j + 1} for j in range(10)]}
          for i in ids]
    (tmp_path / "q.json").write_text(json.dumps({"questions": vq}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": va}))
    out = tmp_path / "root"
    proc = subprocess.run([sys.executable, "-m", "vlp_bench", "import-coco", str(karpathy), "--images", str(coco),
                           "--out", str(out), "--vqa-questions", str(tmp_path / "q.json"),
                           "--vqa-annotations", str(tmp_path / "a.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "train: 4 images" in proc.stdout and "test: 2 images" in proc.stdout
    train, test = CaptionSplit(out, "train"), CaptionSplit(out, "test")
    assert train.image_ids == sorted(ids[:4]) and test.image_ids == sorted(ids[6:])
    for i in ids[:4]:
        assert train.refs[i] == split.refs[i] and train.image_path(i).read_bytes() == split.image_path(i).read_bytes()
    from vlp_bench.metrics.vqa import load_questions

    assert set(load_questions(out / "vqa" / "questions_test.json")) == {10 * i for i in ids[6:]}
    from vlp_bench.registry import TASKS

    for name in ("caption", "vqa"):  # what the tasks check before a run
        TASKS.get(name).check(TASKS.get(name).Config(), out)


def test_import_coco_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlp_bench", "import-coco", str(tmp_path / "none.json"),
                           "--images", str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Karpathy split file not found" in proc.stderr and "Traceback" not in proc.stderr
