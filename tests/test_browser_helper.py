"""Tests of the headless-Chromium helper (tests/browser.py) itself.

Page checks built on the helper assert that lists come back empty (no errors, no external
requests), which would pass vacuously if the helper recorded nothing. These tests show that it
does record each kind of event, on tiny pages written into a temporary directory.

Without Chromium the module is skipped, except under CI (``CI=true``), where Chromium is meant to
be installed and a skip would hide a broken setup: there the tests run and fail instead.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from pathlib import Path

import pytest
from PIL import Image

IN_CI = os.environ.get("CI") == "true"
if not IN_CI:  # under CI a missing websocket-client makes the import below fail instead
    pytest.importorskip("websocket")

from browser import BrowserTimeout, chromium_path, open_page  # noqa: E402

pytestmark = pytest.mark.skipif(chromium_path() is None and not IN_CI,
                                reason="no Chromium (set $CHROMIUM or install chromium)")

# A 1x1 PNG, inline: loading it must not count as an external request.
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAF"
         "BQIAX8jx0gAAAABJRU5ErkJggg==")


def page(tmp_path: Path, body: str, head: str = "") -> Path:
    path = tmp_path / "page.html"
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'>{head}</head><body>{body}</body></html>")
    return path


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR width and height


def processes_mentioning(text: str) -> list[str]:
    """Ids of the live processes whose command line contains `text` (Linux /proc; [] elsewhere)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(cmdline.parent.name)
        except OSError:  # the process ended meanwhile
            pass
    return found


@pytest.fixture
def profiles(tmp_path, monkeypatch) -> Path:
    """A folder the helper's temporary browser profiles go into, to check that it cleans up."""
    folder = tmp_path / "profiles"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_chromium_is_available():
    assert chromium_path() is not None, "no Chromium found: set $CHROMIUM or install chromium"


def test_clean_page(tmp_path, profiles):
    path = page(tmp_path, f"<p>Hello</p><img src='{PIXEL}' alt='dot'>",
                head="<title>Clean</title><style>body { background: rgb(10, 200, 30); }</style>")
    load = open_page(path, {"title": "document.title", "pixel": "document.images[0].naturalWidth",
                            "later": "new Promise(r => setTimeout(() => r(42), 10))"}, width=640, height=480)
    assert load.errors() == []
    assert load.external_requests(path.as_uri()) == []
    assert load.dialogs == []
    assert load.values == {"title": "Clean", "pixel": 1, "later": 42}
    # Not vacuous: the page and its inline image were both seen as requests.
    assert path.as_uri() in load.requests
    assert PIXEL in load.requests
    assert png_size(load.screenshot) == (640, 480)
    assert Image.open(io.BytesIO(load.screenshot)).convert("RGB").getpixel((630, 470)) == (10, 200, 30)
    # The browser is gone and so is its profile.
    assert processes_mentioning(str(profiles)) == []
    assert list(profiles.iterdir()) == []


def test_external_request_and_console_error_are_caught(tmp_path):
    url = "http://127.0.0.1:9/x.png"  # a closed local port: nothing is fetched for real
    path = page(tmp_path, f"<img src='{url}'><script>console.error('boom')</script>")
    load = open_page(path)
    assert load.external_requests(path.as_uri()) == [url]
    assert "boom" in load.errors()
    assert {"level": "error", "text": "boom"} in load.console


def test_uncaught_exception_is_an_error(tmp_path):
    load = open_page(page(tmp_path, "<script>throw new Error('kaboom')</script>"))
    assert any("kaboom" in e for e in load.errors()), load.errors()
    assert any("kaboom" in e for e in load.exceptions)


def test_alert_is_recorded_and_dismissed(tmp_path):
    path = page(tmp_path, "<script>alert('x'); document.title = confirm('sure?') ? 'yes' : 'no'</script>")
    load = open_page(path, {"title": "document.title"}, timeout=15)
    assert load.dialogs == ["x", "sure?"]
    assert load.values["title"] == "no"  # the page went on after its dialogs were dismissed
    assert load.errors() == []


def test_timeout_raises_and_cleans_up(tmp_path, profiles):
    with pytest.raises(BrowserTimeout):
        open_page(page(tmp_path, "<p>slow</p>"), timeout=0.01)
    assert processes_mentioning(str(profiles)) == []
    assert list(profiles.iterdir()) == []
