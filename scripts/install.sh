#!/usr/bin/env bash
# Install vlp-bench and its test tools into ./.venv (idempotent; re-running is quick).
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
.venv/bin/python -m pip install -q -e ".[test]"
