"""Build the CUDA extension's own source for the CPU: csrc/cuda/kernels.cu and the binding
csrc/bindings/cuda_module.cpp compiled by the host C++ compiler over csrc/cuda/host/ (a
stand-in for the CUDA runtime), as the module `_cuda_host`. The tests drive it through the
CUDA backend's own Python code on CPU tensors (tests/kernel_ops/test_cuda_host.py).

    python tools/build_cuda_host.py OUT_DIR      # prints the path of the built module
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "csrc" / "cuda" / "kernels.cu", ROOT / "csrc" / "bindings" / "cuda_module.cpp"]


def build(out_dir: str | Path, compiler: str | None = None) -> Path:
    import pybind11

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"_cuda_host{sysconfig.get_config_var('EXT_SUFFIX')}"
    cxx = compiler or os.environ.get("CXX", "g++")
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden",
           # the rounding of the device build: IEEE division and square root, no contraction
           "-ffp-contract=off", "-DTK_CUDA_HOST", "-DTK_CUDA_MODULE=_cuda_host",
           '-DTRACE_KERNELS_CUDA_ARCHS="host"',
           f"-I{ROOT / 'csrc' / 'cuda' / 'host'}", f"-I{ROOT / 'csrc' / 'include'}",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           "-x", "c++", str(SOURCES[0]), "-x", "c++", str(SOURCES[1]), "-o", str(target)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"host build of the CUDA source failed:\n{' '.join(cmd)}\n{out.stderr[-4000:]}")
    return target


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else ROOT / "build" / "cuda_host"))
