"""Repository-wide pytest set-up (tests/ and examples/): the example plug-ins are installed first."""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent
EXAMPLES = sorted(p.parent for p in (REPO / "examples").glob("*/pyproject.toml"))


def pytest_configure(config):
    """Install the example plug-ins (examples/*/) for the session as a user installs a package (pip,
    from their pyproject.toml, offline) into a temporary directory put on sys.path and PYTHONPATH,
    before any test is collected: the registry-parametrised tests cover them, and so do the CLI
    subprocesses."""
    tmp = Path(tempfile.mkdtemp(prefix="vlp-bench-plugins-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    sources = [shutil.copytree(p, tmp / "src" / p.name) for p in EXAMPLES]  # builds leave nothing in the repo
    target = tmp / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), *map(str, sources)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"installing the example plug-ins failed:\n{proc.stderr}")
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
