#!/usr/bin/env bash
# Build a CUDA-enabled wheel of trace-kernels for GPU clusters, then check it.
#
#   TRACE_KERNELS_CUDA_ARCHS="8.0;9.0" tools/build_cuda_wheel.sh [OUT_DIR]
#
# Needs nvcc (CUDA_HOME or on PATH); no GPU. The wheel holds the CPU extension (_C) and the
# CUDA extension (_cuda, CUDA runtime linked statically, no libtorch): one wheel per CUDA
# major version serves every torch version.
#
# With auditwheel (and patchelf) installed, the wheel is then repaired into a manylinux
# wheel: libgomp is vendored under trace_kernels.libs/ with a hashed name, so the OpenMP
# runtime the CPU kernels use is the one they were built with (torch's own libgomp, loaded
# first by `import torch`, is a different file and name; the two coexist as in any wheel
# that vendors it). OUT_DIR then holds the manylinux wheel; the linux_x86_64 one stays in
# OUT_DIR/raw/.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRACE_KERNELS_CUDA=1 TRACE_KERNELS_REQUIRE_CPU=1
out="${1:-wheelhouse}"
mkdir -p "$out/raw"
rm -f "$out"/raw/trace_kernels-*.whl "$out"/trace_kernels-*.whl
python3 -m pip wheel --no-deps --no-build-isolation -w "$out/raw" .
wheel=$(ls "$out"/raw/trace_kernels-*.whl)
if python3 -m auditwheel --version >/dev/null 2>&1 && command -v patchelf >/dev/null; then
    python3 -m auditwheel repair --exclude 'libcuda.so.*' -w "$out" "$wheel"
    wheel=$(ls "$out"/trace_kernels-*manylinux*.whl)
else
    echo "auditwheel or patchelf not installed: keeping the linux_x86_64 wheel (not manylinux)"
    cp "$wheel" "$out/"
    wheel="$out/$(basename "$wheel")"
fi
python3 tools/check_wheel.py "$wheel"
