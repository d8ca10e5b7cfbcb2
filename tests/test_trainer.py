"""The shared trainer: schedule, determinism, stages, and a loss that goes down."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import random_backbones
from vlp_bench.method import Stage
from vlp_bench.registry import METHODS
from vlp_bench.results import MetricsLog
from vlp_bench.train.trainer import NonFiniteLoss, TrainConfig, lr_at, train

CAPTIONS = ["a red circle", "two green stars", "a blue square above a red circle", "a yellow cross"]


def batches(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(len(CAPTIONS), 3, 64, 64, generator=g)
    while True:
        idx = torch.randint(0, len(CAPTIONS), (n,), generator=g).tolist()
        yield {"images": images[idx], "captions": [CAPTIONS[i] for i in idx], "prompt": "a photo of"}


def small_baseline():
    torch.manual_seed(0)
    cls = METHODS.get("baseline")
    return cls(dataclasses.replace(cls.Config(), width=32, heads=2, depth=1), random_backbones())


def run(tmp_path, name, cfg, method=None):
    log = MetricsLog(tmp_path / name / "metrics.jsonl")
    cost = train(method or small_baseline(), batches(), cfg, torch.device("cpu"), log, progress=False)
    return cost, log.rows


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_training_is_deterministic_and_learns(tmp_path):
    cfg = TrainConfig(steps=30, batch_size=4, lr=2e-2, warmup_steps=3, log_every=5, warmup_exclude=1)
    cost_a, rows_a = run(tmp_path, "a", cfg)
    _, rows_b = run(tmp_path, "b", cfg)
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert rows_a[-1]["loss"] < 0.8 * rows_a[0]["loss"]
    assert cost_a["steps"] == 30 and cost_a["samples_seen"] == 120 and cost_a["tokens_to_llm"] == 65


def test_gradient_accumulation_counts_samples(tmp_path):
    cost, rows = run(tmp_path, "acc", TrainConfig(steps=4, batch_size=4, grad_accum=3, log_every=2))
    assert cost["samples_seen"] == 4 * 4 * 3 and [r["samples"] for r in rows] == [24, 48]


def test_stages_get_their_own_steps_and_parameters(tmp_path):
    """A two-stage method (BLIP-2 style): each stage trains only what it names."""
    method = small_baseline()
    first, rest = list(method.inp.parameters()), [p for n, p in method.named_parameters()
                                                   if p.requires_grad and not n.startswith("inp.")]
    method.stages = lambda total: [Stage("one", 2), Stage("two", total - 2)]
    method.trainable_parameters = lambda stage: first if stage.name == "one" else rest
    before = {id(p): p.detach().clone() for p in [*first, *rest]}
    cost, rows = run(tmp_path, "st", TrainConfig(steps=5, batch_size=4, log_every=1), method)
    assert [r["stage"] for r in rows] == ["one", "one", "two", "two", "two"]
    assert all(not torch.equal(before[id(p)], p) for p in first)
    assert cost["steps"] == 5
    assert [(s["name"], s["steps"], s["samples"]) for s in cost["stages"]] == [("one", 2, 8), ("two", 3, 12)]
    assert sum(s["train_wall_s"] for s in cost["stages"]) == pytest.approx(cost["train_wall_s"])


def test_non_finite_loss_stops_training(tmp_path):
    method = small_baseline()
    with torch.no_grad():
        method.inp.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 0"):
        run(tmp_path, "nan", TrainConfig(steps=3, batch_size=4), method)


@pytest.mark.parametrize("stop_at", [2, 3])  # 2 = the end of stage "one": stage "two" needs a fresh optimizer
def test_resume_from_a_checkpoint_matches_an_uninterrupted_two_stage_run(tmp_path, stop_at):
    from vlp_bench.data.images import TrainBatches

    class Batches(TrainBatches):  # the trainer's sampler interface over the synthetic batches
        def __init__(self):
            self.it, self.n = batches(), 0

        def __next__(self):
            self.n += 1
            return next(self.it)

        def state_dict(self):
            return {"n": torch.tensor(self.n)}

        def load_state_dict(self, state):
            for _ in range(int(state["n"])):
                next(self)

    def two_stage():
        method = small_baseline()
        first = list(method.inp.parameters())
        method.stages = lambda total: [Stage("one", 2), Stage("two", total - 2)]
        method.trainable_parameters = lambda stage: first if stage.name == "one" else \
            [p for n, p in method.named_parameters() if p.requires_grad and not n.startswith("inp.")]
        return method

    cfg = TrainConfig(steps=6, batch_size=4, log_every=1, checkpoint_every=stop_at, warmup_steps=1)
    ref_log = MetricsLog(tmp_path / "ref.jsonl")
    ref = two_stage()
    train(ref, Batches(), cfg, torch.device("cpu"), ref_log, progress=False)

    ckpt = tmp_path / "c.pt"

    class Killed(Exception):
        pass

    first_log = MetricsLog(tmp_path / "a.jsonl")
    killer = two_stage()
    original = killer.training_loss
    calls = []

    def dies_after_checkpoint(batch, stage):
        calls.append(1)
        if len(calls) > stop_at:
            raise Killed
        return original(batch, stage)

    killer.training_loss = dies_after_checkpoint
    with pytest.raises(Killed):
        train(killer, Batches(), cfg, torch.device("cpu"), first_log, progress=False, checkpoint=ckpt)
    resumed = two_stage()
    log = MetricsLog(tmp_path / "b.jsonl")
    cost = train(resumed, Batches(), cfg, torch.device("cpu"), log, progress=False, checkpoint=ckpt)
    assert [r["loss"] for r in log.rows] == [r["loss"] for r in ref_log.rows]
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), resumed.parameters()))
    assert cost["steps"] == 6 and cost["samples_seen"] == 24
    assert [(s["name"], s["steps"]) for s in cost["stages"]] == [("one", 2), ("two", 4)]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="per-run peak RSS needs Linux's /proc")
def test_peak_memory_is_measured_per_run():
    """The runs of an experiment share one process: each run's peak starts from its own start, and
    where the kernel keeps the old peak despite the reset, the kind says so."""
    import mmap

    from vlp_bench.train.measure import _proc_status_bytes, peak_memory_bytes, reset_peak_memory

    cpu = torch.device("cpu")
    size = 256 * 2**20
    big = mmap.mmap(-1, size)  # anonymous memory of our own, given back to the kernel by close()
    for _ in range(size // 2**20):
        big.write(b"\1" * 2**20)
    before = peak_memory_bytes(cpu)
    big.close()
    assert _proc_status_bytes("VmRSS:") < before - 128 * 2**20
    kind = reset_peak_memory(cpu)
    after = peak_memory_bytes(cpu)
    # the kind says what was measured: a reset that did not take is reported as such, never as a run's peak
    assert kind == ("run_peak_rss" if after < before - 128 * 2**20 else "process_max_rss"), (before, after)


def test_compiled_blocks_train_what_eager_blocks_train(tmp_path):
    """train.compile: every transformer block goes through torch.compile (here its "eager"
    backend: Dynamo's tracing without code generation, quick on a CPU), the FLOP replay and the
    evaluations run eagerly, and training is the same."""
    from vlp_bench.train.compile import compile_blocks

    def simvlg():
        torch.manual_seed(0)
        cls = METHODS.get("simvlg")
        return cls(dataclasses.replace(cls.Config(), width=32, heads=2, depth=2, r=4), random_backbones())

    cfg = TrainConfig(steps=4, batch_size=4, log_every=1, warmup_steps=1)
    ref_cost, ref_rows = run(tmp_path, "eager", cfg, simvlg())
    method = simvlg()
    evaluated = []
    log = MetricsLog(None)
    from torch._dynamo.utils import counters

    counters.clear()
    cost = train(method, batches(), dataclasses.replace(cfg, compile="eager", eval_every=2), torch.device("cpu"), log,
                 evaluate=lambda step: evaluated.append(step) or {"x": {"y": 0.0}}, progress=False)
    # the ViT's block, the LM's decoder layer, and the bridge whole (merging included)
    assert compile_blocks(method, "eager") == 3  # compiled by train() already: a second call returns the count
    assert [type(m).__name__ for m in method.modules() if m._compiled_call_impl is not None] == \
        ["Block", "LlamaDecoderLayer"]
    assert hasattr(method.bridge, "_torchdynamo_orig_callable")
    assert counters["stats"]["unique_graphs"] >= 3  # Dynamo did trace them (not a silent eager fallback)
    losses = [r["loss"] for r in log.rows if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in ref_rows], rel=1e-5)
    assert cost["train_flops"] == ref_cost["train_flops"] and evaluated == [0, 2, 4]


@pytest.mark.slow
def test_a_merging_bridge_compiles_whole_with_static_shapes():
    """SimVLG's bridge (BERT layers with ToMe merging after each attention) through inductor with
    fullgraph=True, on the CPU: the loss equals the eager one to 1e-5, and 20 training steps of a
    constant schedule reuse the one graph (no recompilation, no graph break: fullgraph would raise)."""
    from torch._dynamo.utils import counters

    cls = METHODS.get("simvlg")
    cfg = dataclasses.replace(cls.Config(), width=32, heads=2, depth=2, r=8, dropout=0.0)
    torch.manual_seed(0)
    method = cls(cfg, random_backbones())
    stage = method.stages(20)[0]
    batch = next(batches(n=4))
    eager = method.training_loss(batch, stage).loss.item()
    torch._dynamo.reset()
    counters.clear()
    method.bridge = torch.compile(method.bridge, backend="inductor", fullgraph=True)  # what compile_blocks does
    assert method.training_loss(batch, stage).loss.item() == pytest.approx(eager, rel=1e-5, abs=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    for step, batch in zip(range(20), batches(n=4)):
        method.set_progress(step / 20)  # a constant schedule: the same r at every step
        opt.zero_grad()
        method.training_loss(batch, stage).loss.backward()
        opt.step()
    assert graphs == 1 and counters["stats"]["unique_graphs"] == 1


def test_an_unknown_compile_backend_is_a_config_error():
    with pytest.raises(ValueError, match="unknown torch.compile backend 'fast'"):
        TrainConfig(compile="fast").validate()


def test_weight_decay_spares_biases_norms_and_scalars_as_the_reference_trainers():
    from vlp_bench.train.optim import param_groups

    layer, norm, temp = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Parameter(torch.tensor(0.07))
    decayed, spared = param_groups([layer.weight, layer.bias, norm.weight, norm.bias, temp], 0.05)
    assert decayed == {"params": [layer.weight], "weight_decay": 0.05}
    assert spared["weight_decay"] == 0.0 and len(spared["params"]) == 4


def test_a_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    """A run resumed across a change of the method's layers (e.g. the pre-norm bridge before BERT's)."""
    from vlp_bench.train.checkpoint import load_checkpoint

    path = tmp_path / "checkpoint.pt"
    torch.save({"weights": {"blocks.0.norm1.weight": torch.ones(4)}}, path)
    with pytest.raises(ValueError, match="another version of the method"):
        load_checkpoint(path, torch.nn.Linear(4, 4), None, None, "cpu")


def test_validation_loss_rows_leave_the_run_unchanged(tmp_path):
    """Reading the validation loss at every log row (dropout on in training) changes no training
    loss, and its values are the generation path's loss on the fixed captions."""
    torch.manual_seed(0)
    cls = METHODS.get("baseline")
    cfg = TrainConfig(steps=6, batch_size=4, lr=2e-2, warmup_steps=1, log_every=2, warmup_exclude=1)
    val = [next(batches(seed=9, n=4))]

    def go(name, validation_batches):
        torch.manual_seed(0)
        method = cls(dataclasses.replace(cls.Config(), width=32, heads=2, depth=1, dropout=0.1), random_backbones())
        log = MetricsLog(tmp_path / name / "metrics.jsonl")
        train(method, batches(), cfg, torch.device("cpu"), log, progress=False, validation_batches=validation_batches)
        return method, log.rows

    _, plain = go("plain", [])
    method, read = go("read", val)
    assert [r["loss"] for r in read] == [r["loss"] for r in plain]
    assert all("val_loss" not in r for r in plain) and all("val_loss" in r for r in read)
    method.eval()
    with torch.no_grad():
        final = float(method.generation_loss(val[0], Stage("train", 6)).loss)
    assert read[-1]["val_loss"] == pytest.approx(final, abs=1e-5)
