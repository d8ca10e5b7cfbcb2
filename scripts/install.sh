#!/usr/bin/env bash
# Install vlp-bench into ./.venv (idempotent; re-running is quick). `install.sh test` adds the test
# tools: pytest and friends, and headless Chromium (Debian's, with apt) for the report's browser test.
# PyTorch: the torchvision that timm needs must match torch, so both are pinned together; on
# this project's CI machines they install from local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v java >/dev/null 2>&1; then  # pycocoevalcap's tokenizer and METEOR run on Java
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless) >/dev/null
  else
    echo "install: Java (17+) is required by pycocoevalcap; please install it" >&2; exit 2
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
  if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null
    else
      echo "install: the report's browser test needs Chromium; install it, or the test is skipped" >&2
    fi
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
