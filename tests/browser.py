"""Open a local HTML file in headless Chromium and record what the page did.

A small test helper that speaks the Chrome DevTools Protocol (CDP) over one synchronous websocket
(the ``websocket-client`` package). Every :func:`open_page` call starts its own browser with a
throw-away profile and always kills it again, so calls are isolated from each other.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import websocket

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         "--disable-component-update", "--disable-sync")


class BrowserTimeout(TimeoutError):
    """The browser did not answer (or the page did not finish loading) within the time allowed."""


def chromium_path() -> str | None:
    """The browser to use: ``$CHROMIUM`` if set, else the first Chromium/Chrome on ``PATH``, else None."""
    return os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)


@dataclass
class PageLoad:
    """What one page did while it loaded, plus a screenshot and the values asked for."""

    console: list[dict] = field(default_factory=list)  # {"level": ..., "text": ...}
    exceptions: list[str] = field(default_factory=list)  # uncaught exceptions (and failed evaluations)
    requests: list[str] = field(default_factory=list)  # every URL requested, the page itself included
    dialogs: list[str] = field(default_factory=list)  # messages of alert/confirm/prompt (all dismissed)
    screenshot: bytes = b""  # PNG of the viewport
    values: dict = field(default_factory=dict)  # name -> result of the expression evaluated

    def errors(self) -> list[str]:
        """Console messages of level error or assert, then uncaught exceptions."""
        return [c["text"] for c in self.console if c["level"] in ("error", "assert")] + self.exceptions

    def external_requests(self, page_url: str) -> list[str]:
        """Requests that would fetch something: neither the page itself nor a ``data:`` URL."""
        return [u for u in self.requests if u != page_url and not u.startswith("data:")]


class _Cdp:
    """A websocket to the browser endpoint, driving one page session attached with ``flatten``.

    A single reader (:meth:`_pump`) takes every message: responses are kept by id, events of the
    page session are buffered in order, and JavaScript dialogs are dismissed as they open.
    """

    def __init__(self, url: str, deadline: float):
        self.deadline, self.next_id, self.session = deadline, 0, None
        self.responses: dict[int, dict] = {}
        self.events: list[tuple[str, dict]] = []
        self.ws = websocket.create_connection(url, timeout=max(deadline - time.monotonic(), 0.1),
                                              suppress_origin=True)  # Chromium refuses unknown origins

    def send(self, method: str, params: dict | None = None) -> int:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session and method.split(".")[0] not in ("Target", "Browser"):
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        return self.next_id

    def call(self, method: str, params: dict | None = None) -> dict:
        """Send a command and wait for its answer (buffering any events that come first)."""
        i = self.send(method, params)
        self.wait(lambda: i in self.responses, f"the answer to {method}")
        msg = self.responses.pop(i)
        if "error" in msg:
            raise RuntimeError(f"CDP {method} failed: {msg['error']}")
        return msg.get("result", {})

    def wait(self, done: Callable[[], bool], what: str) -> None:
        while not done():
            if not self._pump(self.deadline):
                raise BrowserTimeout(f"timed out waiting for {what}")

    def settle(self, quiet: float, longest: float) -> None:
        """Read until no message came for `quiet` seconds, but for `longest` seconds at most."""
        limit = min(self.deadline, time.monotonic() + longest)
        while self._pump(min(limit, time.monotonic() + quiet)):
            pass

    def _pump(self, until: float) -> bool:
        """Read and file one message; False if none came before `until`."""
        left = until - time.monotonic()
        if left <= 0:
            return False
        self.ws.settimeout(left)
        try:
            msg = json.loads(self.ws.recv())
        except websocket.WebSocketTimeoutException:
            return False
        if "id" in msg:
            self.responses[msg["id"]] = msg
        elif msg.get("sessionId") == self.session:
            self.events.append((msg["method"], msg.get("params", {})))
            if msg["method"] == "Page.javascriptDialogOpening":  # the page is blocked until answered
                self.send("Page.handleJavaScriptDialog", {"accept": False})
        return True


def _devtools_url(proc: subprocess.Popen, stderr: Path, profile: Path, deadline: float) -> str:
    """The browser's websocket URL, from its stderr or else the DevToolsActivePort file."""
    while True:
        log = stderr.read_text(errors="replace")
        if m := re.search(r"DevTools listening on (ws://\S+)", log):
            return m.group(1)
        port_file = profile / "DevToolsActivePort"  # "PORT\n/devtools/browser/ID"
        lines = port_file.read_text().split() if port_file.exists() else []
        if len(lines) == 2:
            return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with code {proc.returncode} before DevTools was ready:\n{log[-2000:]}")
        if time.monotonic() > deadline:
            raise BrowserTimeout(f"chromium did not start DevTools in time:\n{log[-2000:]}")
        time.sleep(0.05)


def _close(proc: subprocess.Popen | None, cdp: _Cdp | None) -> None:
    """Ask the browser to quit (it then reaps most of its helpers), then kill its process group."""
    if cdp is not None:
        try:
            cdp.send("Browser.close")
            proc.wait(2)
        except Exception:  # already gone, hung or unreachable: the kill below deals with it
            pass
        cdp.ws.close()
    if proc is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _describe(details: dict) -> str:
    """An exception's description (message and stack) from CDP ExceptionDetails."""
    return details.get("exception", {}).get("description") or details["text"]


def _text(args: list[dict]) -> str:
    """A console call's arguments as one line: primitives by value, objects by their description."""
    return " ".join(str(a["value"]) if "value" in a else a.get("description", a.get("type", "")) for a in args)


def open_page(path: Path, evaluate: Mapping[str, str] | None = None, width: int = 1280, height: int = 900,
              timeout: float = 30.0) -> PageLoad:
    """Load `path` in a fresh headless Chromium and return what happened (see :class:`PageLoad`).

    Waits for the load event and then until the page is quiet for 0.5 s (3 s at most), evaluates
    each expression of `evaluate` (name -> JavaScript; promises are awaited) and takes a
    `width` x `height` screenshot. Raises :class:`BrowserTimeout` if all this takes over `timeout` s.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(path)
    exe = chromium_path()
    if exe is None:
        raise RuntimeError("no Chromium found: set $CHROMIUM or put chromium on PATH")
    deadline = time.monotonic() + timeout
    tmp = Path(tempfile.mkdtemp(prefix="cdp-"))
    proc = cdp = None
    try:
        with open(tmp / "stderr.log", "wb") as log:
            proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={tmp / 'profile'}", "about:blank"],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                    start_new_session=True)  # its own process group, to kill all of it
        cdp = _Cdp(_devtools_url(proc, tmp / "stderr.log", tmp / "profile", deadline), deadline)
        target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        cdp.session = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            cdp.call(f"{domain}.enable")
        cdp.call("Emulation.setDeviceMetricsOverride",
                 {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        start = len(cdp.events)
        nav = cdp.call("Page.navigate", {"url": path.as_uri()})
        if nav.get("errorText"):
            raise RuntimeError(f"could not open {path}: {nav['errorText']}")
        cdp.wait(lambda: any(m == "Page.loadEventFired" for m, _ in cdp.events[start:]), "the page's load event")
        cdp.settle(quiet=0.5, longest=3.0)

        page, failed = PageLoad(), []
        for name, expression in (evaluate or {}).items():
            r = cdp.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
            if "exceptionDetails" in r:
                failed.append(f"evaluating {name}: {_describe(r['exceptionDetails'])}")
            page.values[name] = r["result"].get("value")
        page.screenshot = base64.b64decode(cdp.call("Page.captureScreenshot", {"format": "png"})["data"])

        for method, p in cdp.events[start:]:
            if method == "Runtime.consoleAPICalled":
                page.console.append({"level": p["type"], "text": _text(p.get("args", []))})
            elif method == "Log.entryAdded":
                page.console.append({"level": p["entry"]["level"], "text": p["entry"]["text"]})
            elif method == "Runtime.exceptionThrown":
                page.exceptions.append(_describe(p["exceptionDetails"]))
            elif method == "Network.requestWillBeSent":
                page.requests.append(p["request"]["url"])
            elif method == "Page.javascriptDialogOpening":
                page.dialogs.append(p["message"])
        page.exceptions += failed
        return page
    except BrowserTimeout as e:
        raise BrowserTimeout(f"{path}: {e} (timeout {timeout} s)") from None
    finally:
        _close(proc, cdp)
        shutil.rmtree(tmp, ignore_errors=True)
