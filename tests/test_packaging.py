"""methods/, tasks/ and reports/ install under the vlp_bench namespace, never as top-level names."""

from __future__ import annotations

import subprocess
import sys


def test_no_generic_top_level_packages(tmp_path):
    code = ("import importlib.util as u, vlp_bench.methods, vlp_bench.tasks, vlp_bench.reports;"
            "print([n for n in ('methods', 'tasks', 'reports') if u.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
