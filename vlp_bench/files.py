"""Writing files so that a kill never leaves half of one: everything vlp-bench writes (records,
checkpoints, shards, reports, cache entries) goes to a temporary name beside its place and is
renamed into it when complete. This is the one place that knows how."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from vlp_bench.errors import UserError


def _temporary(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process (concurrent writers never share one)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to; it replaces `path` when the block ends
    without error. On an error the temporary file goes and the previous `path`, if any, stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except ValueError as e:  # bad JSON or bad UTF-8: name the file, never a traceback
        raise UserError(f"{path}: not a JSON-lines file ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def atomic_dir(final: Path, complete: str = "") -> Iterator[Path]:
    """Yield an empty temporary directory to build `final` in; it is renamed into place when the
    block ends without error. A cache entry that another process published first is kept (theirs
    is the same entry); `complete`: a marker file that says an existing `final` is whole (a
    directory without it is a stray one, replaced)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if complete and final.exists() and not (final / complete).is_file():
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if complete and not (final / complete).is_file():
                raise  # not a finished entry of another process: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
