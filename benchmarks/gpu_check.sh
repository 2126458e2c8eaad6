#!/usr/bin/env bash
# The GPU check: one run of a few minutes on a CUDA or ROCm machine whose venv has a GPU build of
# torch (make setup TORCH_INDEX=...; see README). It
#   1. runs the walkthrough notebooks 00-05 on the GPU with the stand-in (bf16, device_map="auto"),
#   2. times Mixtral-8x22B's real layer dimensions, a few layers deep, random bf16 weights
#      (benchmarks/layer_bench.py), per experts implementation and with int8 weights (torch's CUDA
#      int8 kernel, helpers/quantize.py), and extrapolates the full model's tokens/s,
# and writes both into benchmarks/results/<date>-<gpu>.md, to be committed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no GPU. Install the ROCm or CUDA build of torch (make setup TORCH_INDEX=...)" >&2
    echo "           or run benchmarks/layer_bench.py --device cpu --scale 0.0625 for a rehearsal." >&2
    exit 2
fi
"$PY" -c "from helpers import this_machine; print(this_machine())"

log=$(mktemp)
"$PY" -m workshop standin --verify
started=$(date +%s)
"$PY" -m workshop walkthrough 00_ 01_ 02_ 03_ 04_ 05_ 2>&1 | tee "$log"
walkthrough_s=$(( $(date +%s) - started ))

"$PY" benchmarks/layer_bench.py --layers 1 3 --tokens 32 | tee -a "$log"
result=$(grep -o 'benchmarks/results/[^ ]*\.md' "$log" | tail -1)

{
    echo
    echo "## The walkthrough on this GPU (stand-in, $(date +%F))"
    echo
    echo "Notebooks 00-05 executed in ${walkthrough_s} s:"
    echo
    grep -E '^\[[0-9]+/[0-9]+\]|done in|FAILED|tok/s' "$log" | sed 's/^/    /'
} >> "$result"
echo "gpu_check: results in $result (commit it)"
