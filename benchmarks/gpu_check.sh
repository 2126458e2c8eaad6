#!/usr/bin/env bash
# The GPU check: one run of a few minutes on a CUDA or ROCm machine whose venv has a GPU build of
# torch (make setup TORCH_INDEX=...; see README). It
#   1. times Mixtral-8x22B's real layer dimensions, a few layers deep, random bf16 weights
#      (benchmarks/layer_bench.py), per experts implementation and with int8 weights (torch's CUDA
#      int8 kernel, helpers/quantize.py), and extrapolates the full model's tokens/s,
#   2. runs the walkthrough notebooks 00-05 on the GPU with the stand-in (bf16, device_map="auto"),
# and writes both into benchmarks/results/<date>-<gpu>.md, to be committed. Each part runs even if the
# other fails; the exit status is 1 if either did.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no GPU. Install the ROCm or CUDA build of torch (make setup TORCH_INDEX=...)" >&2
    echo "           or run benchmarks/layer_bench.py --device cpu --scale 0.0625 for a rehearsal." >&2
    exit 2
fi
"$PY" -c "from helpers import this_machine; print(this_machine())" || echo "gpu_check: this_machine() failed" >&2

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# The layer bench first: it needs nothing but torch, and a notebook that fails must not cost its figures.
"$PY" benchmarks/layer_bench.py --layers 1 3 --tokens 32 2>&1 | tee "$log" || status=1
result=$(grep '^wrote ' "$log" | grep -o 'benchmarks/results/[^ ]*\.md' | tail -1 || true)
if [ -z "$result" ]; then
    result="benchmarks/results/$(date +%F)-gpu-check.md"
    { echo "# GPU check, $(date +%F)"; echo; echo "The layer bench wrote no results; its output:"; echo;
      sed 's/^/    /' "$log"; } > "$result"
fi

# (layer_bench.py rewrites the results file whole: run it alone again and this section is gone)
standin_status=0
"$PY" -m workshop standin --verify 2>&1 | tee "$log" || standin_status=1
walk_status=0
started=$(date +%s)
"$PY" -m workshop walkthrough 00_ 01_ 02_ 03_ 04_ 05_ 2>&1 | tee -a "$log" || walk_status=1
walkthrough_s=$(( $(date +%s) - started ))
[ "$walk_status" = 0 ] && [ "$standin_status" = 0 ] || status=1

{
    echo
    echo "## The walkthrough on this GPU (stand-in, $(date +%F))"
    echo
    [ "$standin_status" = 0 ] || echo "The stand-in's check failed (make standin rebuilds it); its lines are below."
    if [ "$walk_status" = 0 ]; then
        echo "Notebooks 00-05 executed in ${walkthrough_s} s:"
    else
        echo "Notebooks 00-05 did not all execute (${walkthrough_s} s); what the run printed:"
    fi
    echo
    grep -E '^\[[0-9]+/[0-9]+\]|done in|FAILED|tok/s|Error' "$log" | sed -E 's/ -> .*//; s/^/    /' || echo "    (no line of its output matched)"
} >> "$result"
echo "gpu_check: results in $result (commit it)"
exit "$status"
