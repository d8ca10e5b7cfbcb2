"""docs/fidelity.md covers every registered method, and the deviations it lists as not yet aligned
are the ones the code has: fixing one, or adding a method, makes this fail until the page says so."""

from __future__ import annotations

import re

import pytest

from vlp_bench.method import Method

from test_config import REPO
from vlp_bench.registry import METHODS

PAGE = (REPO / "docs" / "fidelity.md").read_text()
SECTIONS = "\n".join(line for line in PAGE.splitlines() if line.startswith("## "))
# vlp-bench's own methods (an installed plug-in, such as the example package, documents itself)
BUILTIN = [n for n in METHODS.names() if all(METHODS.get(p).__module__.startswith("vlp_bench.methods.")
                                              for p in METHODS.get(n).parts or (n,))]


@pytest.mark.parametrize("name", BUILTIN)
def test_every_method_has_a_fidelity_section(name):
    """A composition is covered by its parts; a method by a section naming its file."""
    parts = METHODS.get(name).parts or (name,)
    for part in parts:
        module = METHODS.get(part).__module__.rpartition(".")[2]
        assert f"`methods/{module}.py`" in SECTIONS, f"docs/fidelity.md has no section for {part} (methods/{module}.py)"


def test_the_reference_table_names_a_reference_for_every_method():
    table = PAGE.split("## ")[0]
    listed = set(re.findall(r"`([a-z0-9-]+)`", table))
    missing = {n for n in BUILTIN if METHODS.get(n).parts is None} - listed
    assert not missing, f"the reference table at the top of docs/fidelity.md does not list {sorted(missing)}"


def test_the_text_side_familys_remaining_deviations():
    """The text-side family as docs/fidelity.md lists it: FLM's reference shape (the first layers of
    a masked-LM encoder, a reconstructor layer beside each text layer, new parts at 5x the rate), a
    frozen ViT, and no image-side cross-modal layers."""
    from vlp_bench.methods.flm import FLM, FLMConfig
    from vlp_bench.textside import FusionBlock, TextSideConfig, TextSideMethod

    cfg = TextSideConfig()
    assert (cfg.init, cfg.lr_scale) == ("bert", 5.0) and FLMConfig().reconstructor_layers == -1
    assert FLM.paper_config.text_layers == FLM.paper_config.fusion_depth == 6
    assert not any("image" in n for n, _ in FusionBlock(8, 8, 2).named_modules())  # only the text reads the image
    assert TextSideMethod.encode is Method.encode  # the frozen ViT of every method
    assert "## FLM, MLM and AR" in PAGE and "not yet aligned" not in PAGE.split("## FLM, MLM and AR")[1]


def test_every_test_the_page_names_exists():
    """A deviation is pinned by the tests its row names: each must be a test function in tests/."""
    defined = {m for f in (REPO / "tests").glob("test_*.py")
               for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    files = {f.stem for f in (REPO / "tests").glob("test_*.py")}
    named = set(re.findall(r"\b(test_\w+)", PAGE)) - files
    assert named and not named - defined, f"docs/fidelity.md names tests that do not exist: {sorted(named - defined)}"
