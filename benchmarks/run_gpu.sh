#!/usr/bin/env bash
# The GPU measurements of the README's Performance section, most important first, in one call.
#
# Usage: bash benchmarks/run_gpu.sh [RESULTS_DIR]   (default: benchmark-results)
#
# Runs from a checkout without installing it (the checkout goes on PYTHONPATH); basicsr and lmdb must be
# importable. PYTHON names the interpreter (default: python3).
# Each benchmark writes RESULTS_DIR/<name>.md (its table) and <name>.err, as soon as it ends, and gets at most
# STEP_TIMEOUT seconds (default 240): a step that runs out leaves the others' results in place. Order:
#   train        bench_train.py: hat, moe, moe_dense x fp32-plain, fp32, bf16 (paper size, 4x64^2, x4)
#   arch         bench_arch.py: forward, head and memory ratios (paper size, 1x64^2)
#   tiling       bench_tiling.py: tiled memory at 256^2 / 512^2 / 1024^2 LR and the seam error (paper size)
#   compile      bench_train.py: hat and moe under torch.compile (slowest: inductor compiles each network)
set -u
results=$(realpath -m "${1:-benchmark-results}")
mkdir -p "$results"
cd "$(dirname "$0")"
export PYTHONPATH="$(cd .. && pwd)${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$results/gpu.csv" 2>&1

step() {
    local name=$1
    shift
    local start=$SECONDS
    timeout "${STEP_TIMEOUT:-240}" "${PYTHON:-python3}" "$@" > "$results/$name.md" 2> "$results/$name.err"
    echo "$name: exit $? after $((SECONDS - start)) s"
}

step train bench_train.py --device cuda --modes fp32-plain fp32 bf16
step arch bench_arch.py --device cuda
step tiling bench_tiling.py --device cuda
step compile bench_train.py --device cuda --configs hat moe --modes fp32 compile
