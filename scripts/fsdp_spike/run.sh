#!/bin/bash
# The FSDP2-on-gloo spike behind docs/scale.md ("Why only the frozen LLM is sharded"), 2 CPU processes.
# usage, from the repository root: bash scripts/fsdp_spike/run.sh scripts/fsdp_spike/p12_train.py [key=value ...]
export OMP_NUM_THREADS=1
timeout ${TMO:-180} .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node=2 "$@" 2>&1 \
    | grep -v "^W0\|OMP_NUM_THREADS\|\*\*\*\*\*"
echo "exit ${PIPESTATUS[0]}"
