#!/usr/bin/env bash
# Install vlp-bench into ./.venv (idempotent; re-running is quick). `install.sh test` adds the test
# tools: pytest and friends, headless Chromium (the report's browser test) and the PostgreSQL server
# (the search's multi-worker test), both Debian's, with apt.
# PyTorch: the torchvision that timm needs must match torch, so both are pinned together; on
# this project's CI machines they install from local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
apt_install() {  # Debian packages, as root or through password-less sudo; fails when neither works
  local run=()
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && run=(sudo); } || return 1
  command -v apt-get >/dev/null 2>&1 || return 1
  ("${run[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${run[@]}" apt-get install -y -qq "$@") >/dev/null
}
if ! command -v java >/dev/null 2>&1; then  # pycocoevalcap's tokenizer and METEOR run on Java
  apt_install openjdk-17-jre-headless || {
    echo "install: Java (17+) is required by pycocoevalcap; please install it" >&2; exit 2; }
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
  if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    apt_install chromium || {  # the report's browser test (CI=true makes its absence a failure)
      echo "install: the report's browser test needs Chromium; install it, or the test is skipped" >&2; }
  fi
  if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    apt_install postgresql || {  # the search's multi-worker test starts its own server (CI=true: required)
      echo "install: the search's PostgreSQL test needs the server binaries; install them, or it is skipped" >&2; }
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
