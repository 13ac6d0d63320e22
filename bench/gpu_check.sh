#!/usr/bin/env bash
# One run on a machine with an NVIDIA GPU: install, GPU tests, GPU benchmarks.
# Prints a short table last and writes JSON/markdown under bench/results/ (and $OUT if set).
# Sized to finish in well under 6 minutes on an H100. Needs torch, triton, pytest and
# pybind11 already installed (the lent GPU machines have them and no network).
#
#   bench/gpu_check.sh            # on the GPU machine
#   bench/gpu_check.sh --dry-run  # anywhere: print each step instead of running it
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
run() { echo "+ $*"; if [ "$dry" = 0 ]; then "$@"; fi; }
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
run python3 -m pip install --quiet --no-build-isolation --no-deps -e .
run python3 -m trace_kernels --require cuda --require triton

echo "== GPU tests"
run python3 -m pytest -q -m gpu tests/
run python3 -m pytest -q tests/kernel_ops/test_backend_triton.py tests/kernel_ops/test_op_masked_adamw.py \
  tests/kernel_ops/test_op_adamw_fisher.py tests/kernel_ops/test_op_delta_stats.py tests/kernel_ops/test_cuda_host.py \
  tests/kernel_ops/test_bf16.py

echo "== GPU benchmarks"
run python3 bench/bench_gpu.py "$@"
# a training step: full fine-tuning against trace cores (element 5 %, row 5 %, tensors 10 %)
run python3 bench/bench_train_step.py --device cuda --steps 8 --out bench/results/train_step_gpu
if [ -n "${OUT:-}" ]; then run cp bench/results/gpu_* bench/results/train_step_gpu.* "$OUT"/ || true; fi
