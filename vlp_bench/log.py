"""What vlp-bench tells its user while it works, on stderr (stdout stays machine-readable): a
line per phase (`say`), progress for long work (a tqdm bar with ETA on a terminal; without one, as
in CI, pipes and logs, a plain line every 10%), and plain-text tables.

One gate for every message: only rank zero of a torchrun job speaks (`is_main`), and progress is
one process setting (`set_progress`; on by default, off for `--json` output), not an argument
handed down through the modules. What the tools vlp-bench calls print (the official caption
metrics) goes to the open run's log file (`run_log`, `tool_output`), not between the progress lines.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

_SHOW_PROGRESS = True
_LINES = False  # progress as lines even on a terminal (processes that share one: no bars fighting)


def is_main() -> bool:
    """Rank zero of a torchrun job (RANK, set by torchrun before the process starts), or no job."""
    return os.environ.get("RANK", "0") == "0"


def set_progress(on: bool, lines: bool = False) -> None:
    """Show progress (bars and `say` lines) in this process, or not; `lines`: as lines, never bars."""
    global _SHOW_PROGRESS, _LINES
    _SHOW_PROGRESS, _LINES = on, lines


def shows_progress() -> bool:
    return _SHOW_PROGRESS and is_main()


def say(msg: str) -> None:
    """One line about the phase of long work now starting."""
    if shows_progress():
        print(f"[vlp-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def note(msg: str) -> None:
    """A progress line inside a phase (indented, like a progress bar's plain lines)."""
    if shows_progress():
        print(f"  {msg}", file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    """Something the user should know that does not stop the work (a plug-in left out, a tracker
    switched off): said whatever the progress setting, by rank zero."""
    if is_main():
        print(f"vlp-bench: warning: {msg}", file=sys.stderr, flush=True)


_RUN_LOG: Path | None = None  # the log file of the run in progress (run_log), where tools' chatter goes


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Within the block, external tools' output (tool_output) goes to `path` (appended)."""
    global _RUN_LOG
    previous, _RUN_LOG = _RUN_LOG, Path(path)
    try:
        yield
    finally:
        _RUN_LOG = previous


@contextlib.contextmanager
def tool_output() -> Iterator[None]:
    """Where the chatter of tools vlp-bench calls goes (pycocoevalcap's prints, its Java tokenizer's
    messages, at Python level and on the file descriptors its subprocesses inherit): into the
    run's log file while a run is open (run_log), else onto stderr; never onto stdout, which stays
    machine-readable, and never between the progress lines of a run."""
    sys.stdout.flush()
    sys.stderr.flush()
    target = open(_RUN_LOG, "a", encoding="utf-8") if _RUN_LOG is not None else None
    saved: list[tuple[int, int]] = []
    try:
        for fd in (1, 2) if target is not None else (1,):
            saved.append((fd, os.dup(fd)))
            os.dup2(target.fileno() if target is not None else 2, fd)
    except OSError:  # no usable descriptor: only Python-level output is redirected
        pass
    try:
        with contextlib.redirect_stdout(target or sys.stderr), \
                (contextlib.redirect_stderr(target) if target is not None else contextlib.nullcontext()):
            yield
    finally:
        for stream in (sys.stdout, sys.stderr, target):
            if stream is not None:
                stream.flush()
        for fd, copy in reversed(saved):
            os.dup2(copy, fd)
            os.close(copy)
        if target is not None:
            target.close()


def interactive() -> bool:
    return sys.stderr.isatty() and is_main() and not _LINES


class _Lines:
    """Iterates like tqdm, reporting 'desc: i/n, elapsed, eta' at each 10% on stderr."""

    def __init__(self, iterable, desc: str, enabled: bool):
        self.items = list(iterable)
        self.desc, self.enabled = desc, enabled
        self.postfix = ""

    def __iter__(self):
        n, t0, next_mark = len(self.items), time.perf_counter(), 0.1
        for i, item in enumerate(self.items, 1):
            yield item
            if self.enabled and n >= 10 and i / n >= next_mark - 1e-9:
                elapsed = time.perf_counter() - t0
                eta = elapsed / i * (n - i)
                print(f"  {self.desc}: {i}/{n}, {elapsed:.0f}s elapsed, eta {eta:.0f}s{self.postfix}",
                      file=sys.stderr, flush=True)
                next_mark += 0.1

    def set_postfix(self, refresh: bool = False, **kw):
        self.postfix = "".join(f", {k} {v}" for k, v in kw.items())

    def close(self):
        pass


def progress_bar(iterable, desc: str, enabled: bool = True, **kwargs):
    """`iterable`, reporting its progress when `enabled` and the process shows progress."""
    enabled = enabled and shows_progress()
    if interactive():
        return tqdm(iterable, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False, **kwargs)
    return _Lines(iterable, desc, enabled)


def text_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A plain-text table: columns padded to their widest cell, the first `left` flush left (names),
    the others flush right (numbers)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) if i < left else str(x).rjust(w) for i, (x, w) in
                               enumerate(zip(line, widths))) for line in [header, *rows])
