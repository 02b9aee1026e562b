#!/usr/bin/env bash
# GPU benchmark (bf16 autocast, batches that fill the GPU): writes bench/results-gpu.json naming the GPU.
# Usage on a GPU machine, from the repository root, after `make install`: bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
timeout 480 "$PY" bench/gpu.py "$@"
