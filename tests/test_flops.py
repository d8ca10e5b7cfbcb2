"""The FLOP counter against analytic counts (attention included, on CPU), fvcore (units), merging
(counts follow the real token counts), and the trainer's per-step accounting for every method."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import random_backbones
from test_methods import _batch, _small
from test_trainer import batches
from vlp_bench.train import flops
from vlp_bench.nn.merging import layer_schedule
from vlp_bench.registry import METHODS
from vlp_bench.files import read_jsonl
from vlp_bench.results import MetricsLog
from vlp_bench.train.flops import count_step
from vlp_bench.train.trainer import TrainConfig, train


def vit_forward_flops(tokens: int, patches: int, dim: int, depth: int, patch_in: int, classes: int) -> int:
    """A ViT's forward from its layer shapes: patch projection, per block qkv + QK^T + AV + proj +
    MLP (4x), and a linear head on the class token; 2 FLOPs per multiply-add."""
    N, D = tokens, dim
    block = 2 * N * D * 3 * D + 2 * N * N * D + 2 * N * N * D + 2 * N * D * D + 2 * N * D * 4 * D * 2
    return 2 * patches * patch_in * D + depth * block + 2 * D * classes


def test_vit_base_forward_flops_at_batch_1_count_attention_on_cpu():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        got = flops.count(model, torch.randn(1, 3, 224, 224))
    expected = vit_forward_flops(tokens=197, patches=196, dim=768, depth=12, patch_in=3 * 16 * 16, classes=1000)
    assert got.total == expected == 35_127_656_448
    assert got.backward == 0
    # PyTorch's own counter misses the fused CPU attention: exactly the QK^T and AV products
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as torch_counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert expected - torch_counter.get_total_flops() == 12 * 4 * 197 * 197 * 768


class FrozenTrainableFrozen(nn.Module):
    """encoder (frozen, no grad) -> bridge (trainable linear + SDPA self-attention) -> head (frozen)."""

    def __init__(self, d_in=24, d=32, d_out=40, heads=4):
        super().__init__()
        self.heads = heads
        self.enc = nn.Linear(d_in, d).requires_grad_(False)
        self.lin = nn.Linear(d, d)
        self.head = nn.Linear(d, d_out).requires_grad_(False)

    def flop_parts(self):
        return {"vision": self.enc, "llm": self.head}, "bridge"

    def step(self, x):
        with torch.no_grad():
            h = self.enc(x)
        h = self.lin(h)
        B, T, D = h.shape
        q = h.view(B, T, self.heads, D // self.heads).transpose(1, 2)
        h = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(B, T, D)
        self.head(h).square().mean().backward()


def test_training_step_total_matches_the_analytic_count():
    B, T, d_in, d, d_out = 3, 10, 24, 32, 40
    torch.manual_seed(0)
    model = FrozenTrainableFrozen(d_in, d, d_out)
    got = flops.count(model.step, torch.randn(B, T, d_in))
    attn_fwd = 4 * B * T * T * d  # QK^T and AV over all heads
    attn_bwd = 10 * B * T * T * d  # the fused backward: scores recomputed + 4 gradient products
    enc, lin, head = 2 * B * T * d_in * d, 2 * B * T * d * d, 2 * B * T * d * d_out
    assert got.by_part["vision"] == {"forward": enc, "backward": 0}  # no grad: no backward at all
    # the bridge's input carries no gradient, so its linear computes the weight gradient only
    assert got.by_part["bridge"] == {"forward": lin + attn_fwd, "backward": lin + attn_bwd}
    # a frozen head still passes the gradient through (input gradient), never a weight gradient
    assert got.by_part["llm"] == {"forward": head, "backward": head}
    assert got.total == enc + 2 * lin + attn_fwd + attn_bwd + 2 * head


def test_a_part_whose_input_is_also_used_elsewhere_ends_its_backward_on_time():
    """FLM's streams feed both the LM head and the reconstructor: the head's backward must not
    take in the reconstructor's, which runs before the shared input has its whole gradient."""
    B, D, V = 4, 16, 24
    torch.manual_seed(0)
    lin, head, other = nn.Linear(D, D, bias=False), nn.Linear(D, V, bias=False), nn.Linear(D, D, bias=False)

    def step(x):
        h = lin(x)
        rest = other(h).sum()  # created first, so autograd runs the head's backward before it
        (head(h).sum() + rest).backward()

    with flops.FlopCounter({"head": head}, "rest") as counter:
        step(torch.randn(B, D))
    mm = lambda i, o: 2 * B * i * o  # noqa: E731
    assert counter.result.by_part["head"] == {"forward": mm(D, V), "backward": 2 * mm(D, V)}
    # x needs no gradient: lin computes its weight gradient only
    assert counter.result.by_part["rest"] == {"forward": mm(D, D) * 2, "backward": 2 * mm(D, D) + mm(D, D)}


def test_meta_device_counts_what_cpu_counts():
    torch.manual_seed(0)
    model = FrozenTrainableFrozen()
    cpu = flops.count(model.step, torch.randn(2, 7, 24))
    with torch.device("meta"):
        meta_model = FrozenTrainableFrozen()
    meta = flops.count(meta_model.step, torch.randn(2, 7, 24, device="meta"))
    assert meta.by_part == cpu.by_part


class NoSDPA(nn.Module):
    """Convolution, linear layers and attention written as plain matmuls: all that fvcore counts."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 10)

    def forward(self, x, sdpa: bool = False):
        x = self.conv(x).flatten(2).transpose(1, 2)  # (B, 16 tokens, 16)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if sdpa:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = (q @ k.transpose(1, 2) / 4).softmax(-1) @ v
        return self.out(x)


def test_fvcore_counts_multiply_adds_and_no_sdpa():
    from fvcore.nn import FlopCountAnalysis

    model, x = NoSDPA().eval(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ours = flops.count(model, x).total
        ours_sdpa = flops.count(model, x, True).total
    fv = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).total()
    fv_sdpa = FlopCountAnalysis(model, (x, True)).unsupported_ops_warnings(False).total()
    assert ours == 2 * fv  # same operations; fvcore's unit is the multiply-add
    assert ours_sdpa == ours  # the fused kernel is counted like the matmuls it replaces
    assert ours_sdpa - 2 * fv_sdpa == 2 * 2 * (2 * 16 * 16 * 16)  # fvcore misses QK^T and AV inside SDPA


@pytest.mark.parametrize("variant", ["tome", "evlgen"])
def test_merging_counts_follow_the_real_token_counts(variant):
    torch.manual_seed(0)
    cls = METHODS.get("simvlg")
    cfg = dataclasses.replace(cls.Config(), width=32, heads=2, depth=3, r=[9, 4, 0], variant=variant)
    bb = random_backbones(vision_dim=32, llm_dim=32)
    method = cls(cfg, bb).eval()
    B, N, w, hd = 2, bb.vision.num_tokens, 32, 16
    with torch.no_grad():
        got = flops.count(method.bridge, torch.randn(B, N, 32))
    expected, T = 2 * B * N * 32 * w, N  # input projection
    for r in layer_schedule(cfg.r, cfg.depth):
        expected += 2 * B * T * w * 3 * w + 4 * B * T * T * w + 2 * B * T * w * w  # qkv, attention, proj
        r = min(r, (T - 1) // 2)
        if r > 0:  # bipartite matching: (|A| x hd) @ (hd x |B|) on the head-averaged keys
            expected += 2 * B * math.ceil(T / 2) * (T // 2) * hd
        T -= r
        expected += 2 * 2 * B * T * w * 4 * w  # the MLP runs on the merged tokens
    expected += 2 * B * T * w * 32  # output projection of the tokens that reach the LLM
    assert T == method.info()["tokens_to_llm"]
    assert got.total == expected


# ----------------------------------------------------------------------------- every method


@pytest.fixture(params=METHODS.names())
def method(request):
    torch.manual_seed(0)
    cls = METHODS.get(request.param)
    return cls(_small(cls.Config()), random_backbones(bert=True))


def test_every_method_counts_frozen_vision_forward_only_and_the_bridge_backward(method):
    """The frozen encoder runs no backward, unless modules inside it train (`trains_encoder`)."""
    method.train()
    for stage in method.stages(8):
        got = count_step(method, _batch(), stage, torch.autocast("cpu", enabled=False))[0]
        assert got.by_part["vision"]["forward"] > 0
        assert (got.by_part["vision"]["backward"] > 0) == type(method).trains_encoder
        assert got.by_part["bridge"]["backward"] > 0
        llm = got.by_part.get("llm", {"forward": 0, "backward": 0})
        # a stage that uses the frozen LLM runs a backward through it to reach the bridge
        assert (llm["backward"] > 0) == (llm["forward"] > 0)
        assert all(p.grad is None for p in method.parameters())  # counting stores no gradient


def test_shape_key_is_sound_for_every_method(method):
    """Batches with equal keys cost the same FLOPs; a key that changes when the shapes do."""
    method.train()
    g = torch.Generator().manual_seed(3)
    caps = ["a red circle", "two green stars", "a blue square", "a yellow cross left of a red star",
            "three small green circles above a big blue square", "a star"]
    seen: dict = {}
    for stage in method.stages(8):
        for trial in range(6):
            idx = torch.randint(0, len(caps), (3,), generator=g).tolist()
            batch = {"images": torch.randn(3, 3, 64, 64, generator=g), "prompt": "a photo of",
                     "captions": [caps[i] for i in idx]}
            key = method.shape_key(batch, stage)
            if key is None:
                continue  # counted every step: always exact
            got = count_step(method, batch, stage, torch.autocast("cpu", enabled=False))[0].by_part
            full_key = (stage.name, key)
            assert seen.setdefault(full_key, got) == got, f"{stage.name}: equal keys, different FLOPs"


@pytest.mark.slow
def test_trainer_flops_with_the_cache_equal_counting_every_step(method, tmp_path, monkeypatch):
    cfg = TrainConfig(steps=6, batch_size=3, warmup_steps=1, log_every=1, eval_every=0, warmup_exclude=1)
    if hasattr(method.cfg, "curriculum_start"):  # a step curriculum: shapes change during training
        method.cfg = dataclasses.replace(method.cfg, curriculum_start=0.3, curriculum_ramp=0.8)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    cached = train(method, batches(n=3), cfg, torch.device("cpu"), MetricsLog(tmp_path / "a.jsonl"), progress=False)
    method.load_state_dict(state)
    monkeypatch.setattr(type(method), "shape_key", lambda self, batch, stage: None)
    every = train(method, batches(n=3), cfg, torch.device("cpu"), MetricsLog(tmp_path / "b.jsonl"), progress=False)
    assert cached["flops_by_part"] == every["flops_by_part"]
    assert every["flop_counts"] == 6 and cached["flop_counts"] <= 6
    assert cached["train_flops"] == sum(s["train_flops"] for s in cached["stages"])
    assert cached["train_flops_per_sample"] == cached["train_flops"] / 18
    rows = read_jsonl(tmp_path / "a.jsonl")  # log_every=1: one row per step
    assert sum(r["step_flops"] for r in rows) == rows[-1]["flops"] == cached["train_flops"]


def test_counting_changes_neither_training_nor_the_clock_accounting(method, tmp_path):
    cfg = TrainConfig(steps=4, batch_size=3, warmup_steps=1, log_every=1, eval_every=0, warmup_exclude=1)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    runs = []
    for count in (True, False):
        method.load_state_dict(state)
        torch.manual_seed(0)  # BLIP-2 draws its hard negatives from the global RNG
        log = MetricsLog(tmp_path / f"{count}.jsonl")
        cost = train(method, batches(n=3), dataclasses.replace(cfg, count_flops=count), torch.device("cpu"),
                     log, progress=False)
        runs.append(([r["loss"] for r in log.rows], {k: v.clone() for k, v in method.state_dict().items()}, cost))
    (loss_a, w_a, cost_a), (loss_b, w_b, cost_b) = runs
    assert loss_a == loss_b
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert cost_a["train_flops"] > 0 and "train_flops" not in cost_b
    assert cost_a["mfu"] is None and cost_a["peak_flops_per_s"] is None  # no MFU on a CPU


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA A100-SXM4-80GB", 312.0), ("Some Future GPU", None)])
def test_mfu_peak_is_looked_up_by_device_name(name, tflops, monkeypatch):
    from vlp_bench.train.measure import peak_flops_per_s

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    got = peak_flops_per_s(torch.device("cuda"), TrainConfig())
    assert got == (None if tflops is None else tflops * 1e12)
    assert peak_flops_per_s(torch.device("cuda"), TrainConfig(peak_tflops=100.0)) == 100e12  # the config wins
    assert peak_flops_per_s(torch.device("cpu"), TrainConfig()) is None


@pytest.mark.parametrize("op", ["_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                                "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"])
def test_grouped_keys_cost_what_repeated_keys_cost(op):
    """GQA (Llama 3, TinyLlama: 8 key/value heads for 32 query heads) runs SDPA's fused kernels on
    fewer key heads; each query head still attends over every key. PyTorch's formulas reject the
    shapes (a `vlp-bench bench` on a GPU failed on it): ours count the keys repeated per head."""
    q = torch.empty(2, 8, 10, 16, device="meta")
    grouped, full = torch.empty(2, 2, 12, 16, device="meta"), torch.empty(2, 8, 12, 16, device="meta")
    fwd, bwd = (flops.FORMULAS[getattr(torch.ops.aten, op + suffix)] for suffix in ("", "_backward"))
    assert fwd(q, grouped, grouped, out_val=None) == fwd(q, full, full, out_val=None) == 2 * (2 * 2 * 8 * 10 * 12 * 16)
    assert bwd(q, q, grouped, grouped, out_val=None) == bwd(q, q, full, full, out_val=None) > 0
