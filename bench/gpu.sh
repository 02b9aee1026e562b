#!/usr/bin/env bash
# GPU benchmark (bf16 autocast, batches that fill the GPU): writes bench/results-gpu.json naming the GPU.
# Usage on a GPU machine, from the repository root, after `make install`: bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# 560 s: inside the 600 s of one call on a lent GPU machine; rows written before a stop are kept
timeout 560 "$PY" bench/gpu.py "$@"
