#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, most important first, in one call.
#
# Usage: bash benchmarks/run_gpu.sh [RESULTS_DIR]   (default: benchmark-results)
#
# Runs from a checkout without installing it (the checkout goes on PYTHONPATH); basicsr and lmdb must be
# importable. PYTHON names the interpreter (default: python3).
# Each step writes RESULTS_DIR/<name>.md (its table) and <name>.err as soon as it ends. A step gets at most
# STEP_TIMEOUT seconds (default 300) and never runs past DEADLINE seconds from the start (default 540); a
# step that runs out leaves the others' results in place. Every bench_train step measures its own HAT
# fp32-plain baseline. Steps:
#   train        hat, moe x fp32-plain, fp32, bf16 (paper size, 4x64^2, x4): both targets of the issue
#   arch         bench_arch.py: forward, head and memory ratios (paper size, 1x64^2)
#   tiling       bench_tiling.py: tiled memory at 256^2 / 512^2 / 1024^2 LR and the seam error (paper size)
#   compile      hat, moe x fp32-plain, compile (inductor compiles each network: the slowest step)
#   dense        hat, moe_dense x fp32-plain, fp32, bf16: the authors' dense experts
set -u
results=$(realpath -m "${1:-benchmark-results}")
mkdir -p "$results"
cd "$(dirname "$0")"
export PYTHONPATH="$(cd .. && pwd)${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$results/gpu.csv" 2>&1

step() {
    local name=$1
    shift
    local left=$((${DEADLINE:-540} - SECONDS))
    local limit=$((left < ${STEP_TIMEOUT:-300} ? left : ${STEP_TIMEOUT:-300}))
    if ((limit <= 0)); then
        echo "$name: skipped (deadline reached)"
        return
    fi
    local start=$SECONDS
    timeout "$limit" "${PYTHON:-python3}" "$@" > "$results/$name.md" 2> "$results/$name.err"
    echo "$name: exit $? after $((SECONDS - start)) s (limit $limit s)"
}

step train bench_train.py --device cuda --configs hat moe --modes fp32-plain fp32 bf16
step arch bench_arch.py --device cuda
step tiling bench_tiling.py --device cuda
step compile bench_train.py --device cuda --configs hat moe --modes fp32-plain compile
step dense bench_train.py --device cuda --configs hat moe_dense --modes fp32-plain fp32 bf16
