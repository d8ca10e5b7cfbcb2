"""The HTML report: rendered from a small real experiment, its numbers checked against the result
files, opened in headless Chromium (no console errors, no network, every image decodes), and fed
user strings that must be shown as text, never run."""

from __future__ import annotations

import html
import json
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
        for col, key in (("time speed-up [95% CI]", "time_speedup"), ("FLOPs speed-up [95% CI]", "flops_speedup")):
            ratio = s[key]
            assert row[col] == ("-" if ratio is None else
                                f"{ratio['value']:.2f}x [{ratio['ci_low']:.2f}, {ratio['ci_high']:.2f}]")
    assert rows["simvlg"]["tokens to LLM"] == "25" and rows["baseline"]["tokens to LLM"] == "65"
    assert f"{sp['target']:.4g}" in page  # the target the speed-ups are measured at
    assert page.count('src="data:image/svg+xml;base64,') == 3  # quality curves, loss curves, Pareto plot
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
    assert len(load.values["images"]) == 3 + 4 and all(load.values["images"])  # every embedded image decodes
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
