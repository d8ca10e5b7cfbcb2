"""The HTML report: rendered from a small real experiment, its numbers checked against the result
files, opened in headless Chromium (no console errors, no network, every image decodes), and fed
user strings that must be shown as text, never run."""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markupsafe import escape

from vlp_bench.files import read_jsonl
from vlp_bench.reports import html as report
from vlp_bench.reports.summary import compute_speedups, describe_curve, load_results, loss_speedups, verdict

try:
    from browser import chromium_path, open_page
except ImportError:  # websocket-client missing: the browser tests say so below
    chromium_path = open_page = None


pytestmark = pytest.mark.slow  # every test reads the shared tiny experiment, run through the CLI


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlp_bench", *args], capture_output=True, text=True, cwd=cwd)


class Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts, by the table's id."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._id = self._row = self._cell = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._id = dict(attrs).get("id", f"table{len(self.tables)}")
            self.tables[self._id] = []
        elif tag == "tr" and self._id:
            self._row = []
            self.tables[self._id].append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._id = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def experiment(shared_experiment):
    """baseline and simvlg (which merges, so it draws its token groups), two seeds each (conftest.py)."""
    return shared_experiment


def svg_figures(out: Path) -> int:
    """The plots the page of this experiment draws: quality, training loss and the Pareto plot always
    (the tiny runs log all three); the validation-loss curves when the runs logged it; a speed-up
    against target quality for each of the target metric and the validation loss that has a grid."""
    dirs = sorted(d for d in out.iterdir() if (d / "results.json").is_file())
    results = load_results(dirs)
    sp, lsp = compute_speedups(dirs, results, "", None, None), loss_speedups(dirs, results, None)
    logged = any("val_loss" in row for d in dirs for row in read_jsonl(d / "metrics.jsonl"))
    return 3 + logged + sum(bool(s and s["curve"]["targets"]) for s in (sp, lsp))


def _speedups(out: Path) -> dict:
    proc = cli("summary", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)["speedups"]


def test_run_writes_the_report_and_its_numbers_match_the_results(experiment):
    out, proc = experiment
    page = (out / "report.html").read_text()
    assert f"report: {out / 'report.html'}" in proc.stdout
    table = Tables(page).tables["T_speedups"]
    header, rows = table[0], {r[0]: dict(zip(table[0], r)) for r in table[1:]}
    assert set(rows) == {"baseline", "simvlg"} and "CIDEr (caption, test)" in header
    sp = _speedups(out)
    for method, row in rows.items():
        recs = [json.loads((out / f"{method}-seed{s}" / "results.json").read_text()) for s in (0, 1)]
        cider = [r["metrics"]["caption"]["CIDEr"] for r in recs]
        assert row["CIDEr (caption, test)"] == f"{statistics.mean(cider):.3f} ± {statistics.stdev(cider):.3f}"
        vqa = [r["metrics"]["vqa"]["overall"] for r in recs]
        assert row["VQA acc. % (test)"] == f"{statistics.mean(vqa):.2f} ± {statistics.stdev(vqa):.2f}"
        assert row["tokens to LLM"] == str(recs[0]["cost"]["tokens_to_llm"])
        per_sample = statistics.mean(r["cost"]["train_flops_per_sample"] for r in recs)
        assert row["GFLOP / train sample"] == f"{per_sample / 1e9:.3f}"
        s = sp["methods"][method]
        assert row["reached target"] == f"{s['reached']}/2"
        for axis, key in (("time", "time_speedup"), ("FLOPs", "flops_speedup")):
            ratio = s[key]  # two methods: one comparison, so the per-comparison level is the joint 95%
            shown = "-" if ratio is None else f"{ratio['value']:.2f}x [{ratio['ci_low']:.2f}, {ratio['ci_high']:.2f}]"
            assert row[f"{axis} speed-up [95% CI]"] == shown
            if method == "baseline":
                assert row[f"{axis} verdict"] == "-"
            elif ratio is not None:
                assert row[f"{axis} verdict"] == verdict(ratio)
            else:  # why there is none: the tiny runs may not reach it, or meet it untrained
                assert row[f"{axis} verdict"] == report.verdict_text(sp, method, key) != "-"
    assert rows["simvlg"]["tokens to LLM"] == "25" and rows["baseline"]["tokens to LLM"] == "65"
    assert f"{sp['target']:.4g}" in page  # the target the speed-ups are measured at
    assert sp["target_source"] in page and "paired t" in page
    assert page.count('src="data:image/svg+xml;base64,') == svg_figures(out)
    paper = json.loads((out / "flops-paper.json").read_text())  # written by the run, shown in the report
    paper_rows = {r[0]: r for r in Tables(page).tables["T_paper0"][1:]}
    assert set(paper_rows) == {"baseline", "simvlg"}
    assert paper_rows["simvlg"][-1] == f"{paper['methods']['simvlg']['ratio_to_reference']:.2f}x"


def test_token_groups_show_what_reached_the_llm(experiment):
    """simvlg records which patches each token holds; the report draws them beside its captions."""
    out, _ = experiment
    assert not (out / "baseline-seed0" / "token_groups.json").exists()  # nothing merged
    tg = json.loads((out / "simvlg-seed0" / "token_groups.json").read_text())
    assert tg["grid"] == [8, 8] and tg["prefix_tokens"] == 1 and tg["tokens_to_llm"] == 25
    captions = {s["image_id"]: s["caption"] for s in read_jsonl(out / "simvlg-seed0" / "samples_caption.jsonl")}
    page = (out / "report.html").read_text()
    for im in tg["images"]:
        flat = [g for row in im["groups"] for g in row]
        assert im["prefix_groups"] == [0]  # CLS is never merged and comes first
        assert sorted(set(flat)) == list(range(1, 25))  # every other token holds >= 1 patch
        assert (out / "simvlg-seed0" / im["file"]).is_file()
        assert html.escape(captions[im["image_id"]]) in page
    assert page.count('src="data:image/png;base64,') == len(tg["images"])


def test_report_is_a_pure_function_of_the_result_files(experiment, tmp_path):
    """Regenerated from a copy of the files (no model, no data root), the page is the same but
    for the time it was generated."""
    out, _ = experiment
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("report.html"))
    dirs = sorted(d for d in copy.iterdir() if (d / "results.json").is_file())
    pages = [report.render(dirs, flops_files=[copy / "flops-paper.json"]) for _ in range(2)]
    original = (out / "report.html").read_text()

    def strip(page: str) -> str:  # the generation time, and the directories (the copy's own)
        page = re.sub(r"Generated [^<]*? from", "Generated from", page)
        return page.replace(str(copy), "OUT").replace(str(out), "OUT")

    assert strip(pages[0]) == strip(pages[1]) == strip(original)


def test_report_command_rescore_and_errors(experiment, tmp_path):
    out, _ = experiment
    proc = cli("report", str(out), "--target", "1000", "-o", str(tmp_path / "r.html"))
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "r.html").read_text()
    assert "not reached" in page and "Did not reach the target in every seed" in page
    bad = cli("report", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "not a run directory" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "x.json").write_text("{}")
    bad = cli("report", str(out), "--flops", str(tmp_path / "x.json"), "-o", str(tmp_path / "r2.html"))
    assert bad.returncode == 2 and "not a `vlp-bench flops --json` table" in bad.stderr
    bad = cli("report", str(out), "--reference", "blip2", "-o", str(tmp_path / "r3.html"))
    assert bad.returncode == 2 and "reference method 'blip2' has no finished run" in bad.stderr


HOSTILE = '<script>window.__pwned = 1</script><img src="http://127.0.0.1:9/x.png" onerror="window.__pwned = 2">'


@pytest.fixture(scope="module")
def hostile(experiment, tmp_path_factory):
    """The experiment with a method label, a config value and a caption that are markup."""
    out, _ = experiment
    copy = tmp_path_factory.mktemp("hostile") / "exp"
    shutil.copytree(out, copy)
    for seed in (0, 1):
        run = copy / f"simvlg-seed{seed}"
        rec = json.loads((run / "results.json").read_text())
        rec["method"] = "evil" + HOSTILE
        rec["config"]["experiment"]["prompt"] = HOSTILE
        (run / "results.json").write_text(json.dumps(rec))
        samples = read_jsonl(run / "samples_caption.jsonl")
        samples[0]["caption"] = HOSTILE
        (run / "samples_caption.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    path = report.write(sorted(copy.glob("*-seed*")), copy / "report.html")
    return path


def test_user_strings_are_escaped(hostile):
    page = hostile.read_text()
    assert HOSTILE not in page and "<script>" not in page  # the page itself has no script at all
    assert str(escape(HOSTILE)) in page  # the config value and the caption: Jinja2's autoescape
    assert str(escape("evil" + HOSTILE)) in page  # the label in the tables: pandas' escape="html"
    assert html.unescape(page).count("evil" + HOSTILE) >= 4  # headline, table, figure titles, configs


def _browser_or_skip():
    if open_page is None or chromium_path() is None:
        if os.environ.get("CI") == "true":  # CI installs Chromium: a missing one is a broken setup
            pytest.fail("headless Chromium (and websocket-client) are required in CI")
        pytest.skip("no Chromium or websocket-client on this machine")


def test_report_loads_in_headless_chromium_offline(experiment, tmp_path):
    _browser_or_skip()
    out, _ = experiment
    path = out / "report.html"
    load = open_page(path, evaluate={
        "images": "Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)",
        "scripts": "document.scripts.length",
        "top": "document.querySelector('.cards').innerText"})
    assert load.errors() == [] and load.dialogs == []
    assert load.external_requests(path.resolve().as_uri()) == []
    assert len(load.values["images"]) == svg_figures(out) + 4 and all(load.values["images"])  # all decode
    assert load.values["scripts"] == 0
    assert "baseline" in load.values["top"]
    assert load.screenshot.startswith(b"\x89PNG")
    (tmp_path / "report.png").write_bytes(load.screenshot)  # to look at when this fails
    if os.environ.get("VLP_BENCH_SCREENSHOTS"):
        shutil.copy(tmp_path / "report.png", os.environ["VLP_BENCH_SCREENSHOTS"])


def test_hostile_strings_are_displayed_not_executed(hostile):
    _browser_or_skip()
    load = open_page(hostile, evaluate={"pwned": "String(window.__pwned)", "text": "document.body.innerText"})
    assert load.values["pwned"] == "undefined" and load.dialogs == [] and load.errors() == []
    assert load.external_requests(hostile.resolve().as_uri()) == []  # the <img> was never created
    assert "evil" + HOSTILE in load.values["text"]  # the label, as the reader sees it


# ----------------------------------------------------------------------------- verdicts, on written runs


def fake_run(root: Path, method: str, seed: int, top: float, wall_per_step: float, flops_per_step: float) -> Path:
    """A finished run directory without training: caption.CIDEr rising from the floor 0.1 towards
    `top` (an evaluation each step) and a validation loss falling with it, logged at the training
    rows (the reader must take it from there)."""
    run = root / f"{method}-seed{seed}"
    run.mkdir(parents=True)
    rows = []
    for step in range(21):
        cider = 0.1 + (top - 0.1) * (1 - math.exp(-step / 5))
        cost = {"step": step, "wall_s": wall_per_step * step, "flops": flops_per_step * step}
        rows.append({**cost, "split": "val", "eval": {"caption": {"CIDEr": cider}}})
        rows.append({**cost, "stage": "train", "loss": 4.0 - cider, "val_loss": 3.0 - cider})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = {"schema_version": 4, "run_id": run.name, "method": method, "seed": seed, "status": "finished",
           "config": {"target": {"metric": "caption.CIDEr"}},
           "metrics": {"caption": {"CIDEr": cider, "floor": {"CIDEr": 0.1, "caption": "a shape"}}},
           "cost": {"train_wall_s": wall_per_step * 20, "train_flops": flops_per_step * 20, "tokens_to_llm": 65,
                    "train_flops_per_sample": flops_per_step / 8, "flops_unit": "FLOP"}, "env": {}}
    (run / "results.json").write_text(json.dumps(rec))
    return run


def fake_experiment(root: Path, seeds: int) -> list[Path]:
    """baseline; "fast", as good about 2x sooner (a little more or less per seed, so its interval has
    a width); "stuck", which levels off at CIDEr 0.4 and so never reaches the higher targets."""
    dirs = []
    for seed in range(seeds):
        wall = 10.0 * (1 + 0.05 * seed)
        dirs += [fake_run(root, "baseline", seed, 1.0 + 0.01 * seed, wall, 1e12),
                 fake_run(root, "fast", seed, 1.0 + 0.01 * seed, wall / (2.0 + 0.1 * seed), 0.5e12),
                 fake_run(root, "stuck", seed, 0.4, wall, 1e12)]
    return dirs


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The pages of the written experiment with three seeds and with one."""
    pages = {}
    for seeds in (3, 1):
        dirs = fake_experiment(tmp_path_factory.mktemp(f"written{seeds}"), seeds)
        results = load_results(dirs)
        pages[seeds] = (report.render(dirs), compute_speedups(dirs, results, "", None, None),
                        loss_speedups(dirs, results, None))
    return pages


def _cards(page: str) -> dict[str, str]:
    """The headline's cards by the method they compare, as text."""
    cards = re.findall(r'<div class="card[^"]*"><b class="big">([^<]*)</b>(.*?)</div>', page, re.S)
    return {name: re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", body))) for name, body in cards}


def test_headline_states_a_verdict_and_the_speedup_curve_with_seeds(written):
    page, sp, lsp = written[3]
    assert "winner" not in page
    cards = _cards(page)
    fast = sp["methods"]["fast"]["time_speedup"]
    assert fast["verdict"] == "faster" and fast["ci_low"] > 1  # 2.0x, 2.1x, 2.2x over three seeds
    assert f"{fast['value']:.2f}x [{fast['ci_low']:.2f}, {fast['ci_high']:.2f}], faster" in cards["fast"]
    assert describe_curve(sp["curve"]["methods"]["fast"]["time"], "caption.CIDEr") in cards["fast"]
    assert describe_curve(lsp["curve"]["methods"]["fast"]["time"], "validation loss") in cards["fast"]
    assert sp["target_source"] == "cross-fitted from the other reference seeds"
    assert f"the mean of the per-seed targets, {sp['target_source']}" in page
    assert f"{sp['target']:.4g}" in page
    # three methods: two comparisons, each at 97.5% so that both hold jointly at 95%
    assert sp["pair_level"] == pytest.approx(0.975) and "paired t intervals at 97.5% per comparison" in page
    assert "jointly at 95%" in page and "pointwise" in page
    rows = {r[0]: dict(zip(Tables(page).tables["T_speedups"][0], r)) for r in Tables(page).tables["T_speedups"][1:]}
    assert rows["fast"]["time verdict"] == rows["fast"]["FLOPs verdict"] == "faster"
    assert "time speed-up [97.5% CI]" in rows["fast"]


def test_a_method_that_never_reaches_the_target_shows_as_such(written):
    page, sp, _ = written[3]
    stuck = sp["methods"]["stuck"]
    assert stuck["reached"] == 0 and stuck["time_speedup"] is None
    card = _cards(page)["stuck"]
    assert "not reached: no speed-up at this target" in card and "wall-clock speed-up" not in card
    assert "not reached at" in card  # where over the grid its advantage ends
    verdicts = [e["verdict"] for e in sp["curve"]["methods"]["stuck"]["time"]]
    assert verdicts[-1] == "not reached" and verdicts[0] != "not reached"  # the low targets it does reach
    rows = {r[0]: dict(zip(Tables(page).tables["T_speedups"][0], r)) for r in Tables(page).tables["T_speedups"][1:]}
    assert rows["stuck"]["time to target (s)"] == rows["stuck"]["time verdict"] == "not reached"
    assert "Did not reach the target in every seed" in page


def test_one_seed_gives_a_labelled_point_estimate_and_no_verdict(written):
    page, sp, _ = written[1]
    fast = sp["methods"]["fast"]["time_speedup"]
    assert fast["verdict"] == "point estimate" and fast["ci_low"] is None
    assert sp["target_source"] == "own run (one reference seed)" in page
    card = _cards(page)["fast"]
    assert f"{fast['value']:.2f}x, one seed: point estimate, no verdict" in card
    assert "faster" not in card and "slower" not in card
    rows = {r[0]: dict(zip(Tables(page).tables["T_speedups"][0], r)) for r in Tables(page).tables["T_speedups"][1:]}
    assert rows["fast"]["time verdict"] == "one seed: point estimate, no verdict"


def test_the_speedup_against_target_quality_and_the_validation_loss_are_drawn(written):
    for seeds in (3, 1):
        page, sp, lsp = written[seeds]
        assert lsp is not None and lsp["higher_is_better"] is False and lsp["curve"]["targets"]
        titles = re.findall(r"<h2>([^<]*)</h2>\s*<figure><img src=\"data:image/svg", page)
        assert titles == ["caption.CIDEr learning curves", "Validation loss curves", "Loss curves",
                          "Speed-up against target quality: validation caption.CIDEr",
                          "Speed-up against target quality: validation loss (lower is better)",
                          "Quality against cost"]
        assert "Bonferroni" in page and f"{len(sp['curve']['targets'])} targets from 10% to 90% of the way" in page
        assert "each seed&#39;s set by baseline&#39;s other seeds" in page
        assert "BLIP-2&#39;s stage 1" in page  # the validation-loss caption: stages that log none


def test_no_speedup_curve_when_the_reference_never_leaves_its_floor(tmp_path):
    dirs = []
    for seed in range(2):
        dirs += [fake_run(tmp_path, "baseline", seed, 0.1, 10.0, 1e12),
                 fake_run(tmp_path, "fast", seed, 0.1, 5.0, 1e12)]
    for d in dirs:  # no validation loss either
        rows = [{k: v for k, v in r.items() if k != "val_loss"} for r in read_jsonl(d / "metrics.jsonl")]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = report.render(dirs)
    assert "Speed-up against target quality" not in page and "Validation loss curves" not in page
    assert "no range of targets to compare the methods over" in page
    assert "no targets (the reference never left its floor)" in _cards(page)["fast"]


def test_the_validation_loss_as_the_target_metric(tmp_path):
    """Lower is better; the quality columns and curves stay on the task metric (the loss has no final
    test value), and its speed-up against target quality is drawn once."""
    page = report.render(fake_experiment(tmp_path, 2), metric="val_loss")
    assert "target: validation val_loss ≤" in page and "Best final caption.CIDEr (test)" in page
    assert "val_loss: faster" in _cards(page)["fast"]
    titles = re.findall(r"<h2>([^<]*)</h2>\s*<figure><img src=\"data:image/svg", page)
    assert titles == ["caption.CIDEr learning curves", "Validation loss curves", "Loss curves",
                      "Speed-up against target quality: validation loss (lower is better)", "Quality against cost"]


def test_a_run_with_the_feature_cache_is_compared_both_ways(tmp_path):
    """A run that kept its encoder tokens (data.feature_cache) is 2x faster as run but would have
    been as slow as the baseline without the cache: the summary and the page say both."""
    dirs = [fake_run(tmp_path, "baseline", 0, 1.0, 10.0, 1e12), fake_run(tmp_path, "fast", 0, 1.0, 5.0, 0.5e12)]
    run = dirs[1]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [{**r, "wall_s_without_cache": 2 * r["wall_s"], "flops_without_cache": 2 * r["flops"]} for r in rows]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = json.loads((run / "results.json").read_text())
    rec["cost"]["feature_cache"] = {"used": True, "images_encoded": 4, "samples_served": 156}
    (run / "results.json").write_text(json.dumps(rec))
    results = load_results(dirs)
    as_run = compute_speedups(dirs, results, "", None, None)["methods"]["fast"]
    without = compute_speedups(dirs, results, "", None, None, uncached=True)["methods"]["fast"]
    assert as_run["time_speedup"]["value"] == pytest.approx(2.0, rel=0.05)
    assert without["time_speedup"]["value"] == pytest.approx(1.0, rel=0.05)
    assert without["flops_speedup"]["value"] == pytest.approx(1.0, rel=0.05)
    page = report.render(dirs)
    tables = Tables(page).tables
    speed = {name: {r[0]: dict(zip(tables[name][0], r)) for r in tables[name][1:]} for name in ("T_speedups", "T_uncached")}
    column = next(c for c in tables["T_speedups"][0] if "speed-up" in c and "time" in c.lower())
    assert speed["T_speedups"]["fast"][column].startswith("2.0") and speed["T_uncached"]["fast"][column].startswith("1.0")
    assert "data.feature_cache" in page
    out = cli("summary", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["speedups_without_feature_cache"]["methods"]["fast"]["time_speedup"]["value"] == \
        pytest.approx(1.0, rel=0.05)
