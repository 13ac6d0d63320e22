#!/usr/bin/env bash
# Build a CUDA-enabled wheel of trace-kernels for GPU clusters, then check it.
#
#   TRACE_KERNELS_CUDA_ARCHS="8.0;9.0" tools/build_cuda_wheel.sh [OUT_DIR]
#
# Needs nvcc (CUDA_HOME or on PATH); no GPU. The wheel holds the CPU extension (_C) and the
# CUDA extension (_cuda, CUDA runtime linked statically, no libtorch): one wheel per CUDA
# major version serves every torch version. For a manylinux tag, run auditwheel repair on
# the result (it vendors libgomp).
set -euo pipefail
cd "$(dirname "$0")/.."
export TRACE_KERNELS_CUDA=1 TRACE_KERNELS_REQUIRE_CPU=1
out="${1:-wheelhouse}"
mkdir -p "$out"
python3 -m pip wheel --no-deps --no-build-isolation -w "$out" .
python3 tools/check_wheel.py "$out"/trace_kernels-*.whl
