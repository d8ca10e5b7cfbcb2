"""`vlp-bench flops`: per-sample costs on the meta device, pinned to the layer shapes of the real
paper-scale models (EVA ViT-g/14, OPT-2.7B, the 12-layer bridge)."""

from __future__ import annotations

import json

import pytest

from test_e2e import cli
from vlp_bench import costmodel


@pytest.fixture(scope="module")
def paper():
    return costmodel.cost_table(costmodel.paper_scale(), ["baseline", "simvlg", "blip2"], "baseline")


def opt_2_7b(tokens: int, backward: bool = False) -> int:
    """OPT-2.7B over `tokens` positions: per layer q, k, v, out (d x d) and the 4x FFN, attention's
    two score products (forward) or five (fused backward: scores recomputed), the LM head; the
    frozen model's backward computes input gradients only (as many FLOPs as the forward's products)."""
    T, d, ffn, layers, vocab = tokens, 2560, 10240, 32, 50272
    attention = (10 if backward else 4) * T * T * d
    return layers * (4 * 2 * T * d * d + 2 * 2 * T * d * ffn + attention) + 2 * T * d * vocab


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
