"""`vlp-bench flops`: per-sample costs on the meta device, pinned to the layer shapes of the real
paper-scale models (EVA ViT-g/14, OPT-2.7B, the 12-layer bridge)."""

from __future__ import annotations

import json

import pytest
import torch

from test_e2e import cli
from vlp_bench import costmodel


@pytest.fixture(scope="module")
def paper():
    return costmodel.cost_table(costmodel.paper_scale(), ["baseline", "simvlg", "blip2"], "baseline")


def opt_2_7b(tokens: int, backward: bool = False, caption: int = 32) -> int:
    """OPT-2.7B over `tokens` positions: per layer q, k, v, out (d x d) and the 4x FFN, attention's
    two score products (forward) or five (fused backward: scores recomputed); the LM head over the
    last caption + 1 positions only (the soft prompt's logits are never computed: docs/fidelity.md);
    the frozen model's backward computes input gradients only (as many FLOPs as the forward's products)."""
    T, d, ffn, layers, vocab = tokens, 2560, 10240, 32, 50272
    attention = (10 if backward else 4) * T * T * d
    return layers * (4 * 2 * T * d * d + 2 * 2 * T * d * ffn + attention) + 2 * (caption + 1) * d * vocab


def bridge(tokens: int, width=768, depth=12, vision_dim=1408, llm_dim=2560) -> int:
    N, D = tokens, width
    return 2 * N * vision_dim * D + depth * (24 * N * D * D + 4 * N * N * D) + 2 * N * D * llm_dim


def test_paper_preset_is_pinned_to_the_models_layer_shapes(paper):
    m = paper["methods"]
    assert paper["vision_tokens"] == 257 and paper["caption_tokens"] == 32 and paper["prompt"] == ""
    assert [m[k]["tokens_to_llm"] for k in ("baseline", "simvlg", "blip2")] == [257, 29, 32]
    # EVA ViT-g/14: 39 of its 40 blocks run (BLIP-2 reads the penultimate), 1408 wide, MLP 6144
    N, D = 257, 1408
    vit = 2 * 256 * 3 * 14 * 14 * D + 39 * (8 * N * D * D + 4 * N * D * 6144 + 4 * N * N * D)
    for name in m:
        assert m[name]["per_sample"]["vision"] == {"forward": pytest.approx(vit, rel=1e-12), "backward": 0}
    base = m["baseline"]["per_sample"]
    assert base["bridge"]["forward"] == bridge(257)
    assert base["llm"] == {"forward": opt_2_7b(257 + 32), "backward": opt_2_7b(257 + 32, backward=True)}
    assert m["simvlg"]["per_sample"]["llm"]["forward"] == opt_2_7b(29 + 32)


def test_ratios_and_stage_weights(paper):
    m = paper["methods"]
    assert m["baseline"]["ratio_to_reference"] == 1.0
    for r in m.values():
        assert r["ratio_to_reference"] == pytest.approx(m["baseline"]["total"] / r["total"])
        assert r["total"] == pytest.approx(r["forward"] + r["backward"])
    s1, s2 = m["blip2"]["stages"]
    assert (s1["name"], s2["name"]) == ("stage1", "stage2")
    assert s1["share"] == pytest.approx(250 / 330, abs=1e-4) and s1["share"] + s2["share"] == 1
    assert "llm" not in s1["per_sample"] and s1["tokens_to_llm"] == 0  # stage 1 never runs the LLM
    assert m["blip2"]["total"] == pytest.approx(s1["share"] * s1["total"] + s2["share"] * s2["total"])
    # SimVLG's merging cuts what the LLM sees from 257 to 29 tokens: ~3x cheaper per sample, not 5x
    assert 2.5 < m["simvlg"]["ratio_to_reference"] < 3.5


@pytest.mark.slow
def test_flops_cli_tiny_and_paper(tiny_overrides):
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    proc = cli("flops", *sets, "--methods", "baseline,simvlg", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads(proc.stdout)
    assert table["preset"] == "tiny" and table["unit"].startswith("FLOP")
    assert table["vision_tokens"] == 65 and table["methods"]["simvlg"]["tokens_to_llm"] == 25
    text = cli("flops", "--preset", "paper", "--methods", "simvlg")
    assert text.returncode == 0 and "simvlg" in text.stdout and "baseline" in text.stdout


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--methods", "simvlgg"], "did you mean 'simvlg'"),
])
def test_flops_bad_input_is_one_line(args, message):
    proc = cli("flops", *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_every_method_as_configured_by_default_fits_the_default_tiny_backbones():
    """bench.toml's defaults must make every registered method (compositions too) runnable."""
    from vlp_bench.experiment import load_config
    from vlp_bench.registry import METHODS

    cfg = load_config(None)
    names = METHODS.names()
    table = costmodel.cost_table(costmodel.tiny_scale(cfg), names, names[0])  # runs each method's check() first
    assert set(table["methods"]) == set(names)
    assert table["methods"]["simvlg+tome-vit"]["tokens_to_llm"] == table["methods"]["simvlg"]["tokens_to_llm"]


@pytest.mark.slow
def test_the_simvlg_vs_blip2_recipe_is_costed_against_blip2_at_paper_scale():
    """The SimVLG paper's own comparison: its three methods, speed-ups read against two-stage BLIP-2."""
    from test_config import REPO

    proc = cli("flops", "--config", str(REPO / "recipes" / "simvlg-vs-blip2-opt2.7b.toml"), "--preset", "paper", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads(proc.stdout)
    assert list(table["methods"]) == ["simvlg", "blip2", "baseline"] and table["reference"] == "blip2"
    assert table["methods"]["blip2"]["ratio_to_reference"] == 1.0


# The text-side family at paper scale: the FLM paper's own backbones (costmodel.flm_setting)

@pytest.fixture(scope="module")
def family():
    # the requested reference (the baseline) runs on other backbones: each ratio is to MLM, theirs
    return costmodel.cost_table(costmodel.paper_scale(), ["flm", "mlm", "ar"], "baseline")


def clip_b32_288(backward: bool = False) -> int:
    """CLIP ViT-B/32 at 288 px: the patch embedding (81 patches of 3x32x32) and 11 of its 12 blocks
    over 82 tokens (the reference drops the last); trained (backward): the blocks' weight and input
    gradients, attention's fused backward (5 products), the patch embedding's weight gradient."""
    N, D, P = 82, 768, 81
    linear = 8 * N * D * D + 4 * N * D * 3072
    blocks = 11 * (2 * linear + 10 * N * N * D if backward else linear + 4 * N * N * D)
    return 2 * P * 3 * 32 * 32 * D + blocks


L, D, NV = 50, 768, 82  # text rows (<s>, 48 words, </s>), width, vision tokens
ROBERTA_LAYER = 8 * L * D * D + 4 * L * D * 3072 + 4 * L * L * D  # q, k, v, out; FFN 3072; attention
HEAD = 2 * L * D * D + 2 * L * D * 50265  # the new prediction head: dense, decoder to RoBERTa's vocabulary
# self-attention, cross-attention (keys and values from the image tokens), MLP
FUSION = 12 * L * D * D + 4 * L * L * D + 4 * NV * D * D + 4 * L * NV * D + 16 * L * D * D
RECONSTRUCTOR = 4 * L * D * D + 8 * L * D * D + 8 * L * L * D + 16 * L * D * D  # cross to 2L keys (both streams), MLP


def test_the_family_is_costed_on_the_flm_papers_backbones_against_mlm(family):
    m = family["methods"]
    assert list(m) == ["flm", "mlm", "ar"] and family["reference"] == "mlm"  # the baseline is neither used nor listed
    assert (family["image_size"], family["vision_tokens"], family["caption_tokens"]) == (288, 82, 49)
    for r in m.values():
        assert r["backbones"] == "CLIP ViT-B/32 288 px + RoBERTa-base" and r["reference"] == "mlm"
        assert r["per_sample"]["vision"] == {"forward": pytest.approx(clip_b32_288(), rel=1e-12), "backward": 0}
        assert r["trained_vision"]["per_sample"]["vision"]["backward"] == pytest.approx(clip_b32_288(True), rel=1e-12)
        assert r["ratio_to_reference"] == pytest.approx(m["mlm"]["total"] / r["total"])
        assert r["trained_vision"]["ratio_to_reference"] == pytest.approx(m["mlm"]["trained_vision"]["total"]
                                                                          / r["trained_vision"]["total"])
    mlm, flm = m["mlm"]["per_sample"], m["flm"]["per_sample"]
    assert mlm["llm"]["forward"] == pytest.approx(6 * ROBERTA_LAYER + HEAD, rel=1e-12)
    assert mlm["bridge"]["forward"] == pytest.approx(6 * FUSION, rel=1e-12)
    # FLM: two streams, the reconstructor beside each of their 12 layers, three heads (its loss and both AR losses)
    assert flm["llm"]["forward"] == pytest.approx(2 * 6 * ROBERTA_LAYER + 3 * HEAD, rel=1e-12)
    assert flm["bridge"]["forward"] == pytest.approx(2 * 6 * FUSION + 12 * RECONSTRUCTOR, rel=1e-12)
    assert m["ar"]["per_sample"] == mlm  # one stream and one head each
    # a trained ViT adds its backward and the gradients into its tokens (the cross-attention's k, v)
    for name, streams in (("mlm", 1), ("flm", 2)):
        added = m[name]["trained_vision"]["total"] - m[name]["total"]
        assert added == pytest.approx(clip_b32_288(True) + streams * 6 * 4 * NV * D * D, rel=1e-12)
    assert 2.4 < m["mlm"]["ratio_to_reference"] / m["flm"]["ratio_to_reference"] < 2.6  # FLM: ~2.5x MLM's cost
    trained = [m[n]["trained_vision"]["ratio_to_reference"] for n in ("mlm", "flm")]
    assert 2.0 < trained[0] / trained[1] < 2.1


def test_a_table_across_backbones_says_so_and_keeps_each_ratio_within_its_backbones():
    scale = costmodel.paper_scale()
    table = costmodel.cost_table(scale, ["baseline", "flm"], "baseline")
    m = table["methods"]
    assert list(m) == ["baseline", "flm", "mlm"] and table["backbones_differ"]
    assert (m["baseline"]["reference"], m["flm"]["reference"], m["mlm"]["reference"]) == ("baseline", "mlm", "mlm")
    assert m["baseline"]["backbones"] == "EVA ViT-g/14 224 px + OPT-2.7B" and "trained_vision" not in m["baseline"]
    text = costmodel.format_table(table)
    assert any(line.startswith("method") and "backbones" in line for line in text.splitlines())
    assert "(mlm)" in text and "(baseline)" in text
    assert "EVA ViT-g/14 224 px + OPT-2.7B: 257 vision tokens at 224 px" in text
    # the requested reference on the family's backbones: every ratio to it
    table = costmodel.cost_table(scale, ["flm", "ar"], "mlm")
    assert list(table["methods"]) == ["flm", "ar", "mlm"] and not table["backbones_differ"]
    assert "mlm / method" in costmodel.format_table(table)


def test_the_text_side_tokenizer_stand_in():
    with torch.device("meta"):
        body, tok = costmodel.text_model(costmodel.roberta_base())  # RoBERTa's ids, from its config
    assert body.config.model_type == "roberta" and body.pooler is None
    ids = (tok.cls_token_id, tok.pad_token_id, tok.eos_token_id, tok.mask_token_id, len(tok))
    assert ids == (0, 1, 2, 50264, 50265)
    ids = tok("a b c", add_special_tokens=False).input_ids
    assert ids == [3, 3, 3] and not any(p.startswith("##") for p in tok.convert_ids_to_tokens(ids))


def reduced_flm(device, dropout: float = 0.0) -> costmodel.Scale:
    """flm_setting at test size: a 2-block ViT-B/32-style encoder 64 wide at 64 px (5 tokens), a
    4-layer RoBERTa 64 wide, the family at 2 + 2 layers. `dropout`: RoBERTa's attention dropout."""
    import dataclasses

    from transformers import RobertaConfig

    from vlp_bench.registry import METHODS

    text = RobertaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64, type_vocab_size=1, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2, attention_probs_dropout_prob=dropout,
                         attn_implementation="sdpa")
    s = costmodel.flm_setting(device, image_size=64, text=text, depth=2, embed_dim=64, num_heads=2)
    configs = {n: dataclasses.replace(METHODS.get(n).paper_config, text_layers=2, fusion_depth=2, heads=4)
               for n in ("flm", "mlm", "ar")}
    return dataclasses.replace(s, method_configs=configs, caption_words=6)


def test_the_family_costed_on_meta_is_what_a_measured_cpu_step_counts(monkeypatch):
    """The cross-check of the other presets (docs/costs.md: `vlp-bench bench` times the trainer's real
    step and counts it), for the FLM setting at test size: the trainer's count of a measured step on
    CPU, with real weights, equals the meta-device cost, for the frozen ViT and the trained one."""
    import contextlib

    from conftest import TINY
    from vlp_bench import bench
    from vlp_bench.experiment import load_config
    from vlp_bench.registry import METHODS
    from vlp_bench.train.flops import count_step

    names = ["flm", "mlm", "ar"]
    meta = costmodel.per_sample_costs(reduced_flm("meta"), names)
    monkeypatch.setitem(costmodel.SCALES, "paper", lambda cfg, device: reduced_flm(device))
    table = bench.bench(load_config(None, TINY), "paper", names, torch.device("cpu"), batch_size=2, steps=1, warmup=0)
    assert [r["flops_per_sample"] for r in table["rows"]] == [meta[n]["total"] for n in names]
    assert {r["backbones"] for r in table["rows"]} == {"CLIP ViT-B/32 64 px + RoBERTa-base"}
    for dropout in (0.0, 0.1):
        cpu = reduced_flm("cpu", dropout)
        for name, streams in (("flm", 2), ("mlm", 1)):
            torch.manual_seed(0)
            method = METHODS.get(name)(cpu.method_configs[name], cpu.backbones).train()
            batch = {**costmodel.sample_batch(cpu, 4, "cpu"), "images": torch.randn(4, 3, 64, 64)}
            stage = method.stages(10)[0]
            with costmodel.trained_vision(method.vision):
                trained = count_step(method, batch, stage, contextlib.nullcontext())[0].scaled(1 / 4)
            frozen = count_step(method, batch, stage, contextlib.nullcontext())[0].scaled(1 / 4)
            if dropout == 0.0:
                assert (frozen, trained) == (meta[name]["per_sample"], meta[name]["trained_vision"]["per_sample"])
            else:  # on CPU, attention dropout takes SDPA's unfused path: a backward of 4 products, not 5
                short = meta[name]["per_sample"]["llm"]["backward"] - frozen["llm"]["backward"]
                assert short == streams * 2 * (2 * 8 * 8 * 64)  # per stream, 2 layers of 2 L^2 D (L = 8)


@pytest.mark.slow
def test_flops_cli_prints_the_family_at_paper_scale():
    proc = cli("flops", "--preset", "paper", "--methods", "flm,mlm,ar", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads(proc.stdout)
    assert list(table["methods"]) == ["flm", "mlm", "ar"] and table["reference"] == "mlm"
    assert all(m["per_sample"]["llm"]["forward"] > 0 for m in table["methods"].values())
