#!/usr/bin/env bash
# One run on a machine with an NVIDIA GPU: install, GPU tests, GPU benchmarks.
# Prints a short table last and writes JSON/markdown under bench/results/ (and $OUT if set).
# Sized to finish in well under 6 minutes on an H100. Needs torch, triton, pytest and
# pybind11 already installed (the lent GPU machines have them and no network).
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m pip install --quiet --no-build-isolation --no-deps -e . 2>&1 | tail -3
python3 -m trace_kernels --require cuda --require triton

echo "== GPU tests"
python3 -m pytest -q -m gpu tests/
python3 -m pytest -q tests/kernels/test_backend_triton.py tests/kernels/test_op_masked_adamw.py \
  tests/kernels/test_op_adamw_fisher.py tests/kernels/test_op_delta_stats.py tests/kernels/test_cuda_host.py

echo "== GPU benchmarks"
python3 bench/bench_gpu.py "$@"
if [ -n "${OUT:-}" ]; then cp bench/results/gpu_* "$OUT"/ 2>/dev/null || true; fi
