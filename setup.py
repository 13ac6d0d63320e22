"""Builds the native extensions of trace-kernels.

`trace_kernels._cuda` (CUDA kernels) is built when nvcc is found: TRACE_KERNELS_CUDA=1
requires it (and fails loudly without nvcc), =0 skips it. Architectures come from
TRACE_KERNELS_CUDA_ARCHS (default "8.0;9.0": real code for each, plus PTX for the newest;
"9.0a" is accepted). It links only the CUDA runtime, statically: no libtorch, so one wheel
per CUDA major version serves every torch version.

`trace_kernels._C` (CPU kernels) is built on every install with pybind11: C++17, -O3,
OpenMP, and runtime ISA dispatch through GCC target_clones (never -march=native, so a
wheel runs on any x86-64). It needs no torch at build time: tensors cross as addresses.

If the compiler fails, the install still succeeds and the package falls back to its
pure-PyTorch reference backend (`python -m trace_kernels` says so), unless
TRACE_KERNELS_REQUIRE_CPU=1 asks for the build to be fatal, as CI does.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "trace_kernels" / "_version.py").read_text()).group(1)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _headers() -> list[str]:
    """Headers every extension includes: listed as depends so an edit to one relinks."""
    return sorted(str(p.relative_to(ROOT)) for d in ("csrc/include", "csrc/bindings")
                  for p in (ROOT / d).rglob("*.h"))


def cpu_extension() -> Pybind11Extension:
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    sources.append("csrc/bindings/cpu_module.cpp")
    compile_args = [
        "-O3",
        "-fopenmp",
        # sqrt without errno lets the loops vectorise; results are unchanged.
        "-fno-math-errno",
        # No FMA contraction: every ISA clone, and the reference, round identically.
        "-ffp-contract=off",
        "-fvisibility=hidden",
    ]
    return Pybind11Extension(
        "trace_kernels._C",
        sources,
        include_dirs=["csrc/include"],
        cxx_std=17,
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
        define_macros=[("TRACE_KERNELS_VERSION", f'"{VERSION}"')],
        depends=_headers(),
    )


def cuda_home() -> Path | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return Path("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parents[1] if nvcc else None


def cuda_archs() -> list[str]:
    """["80", "90"] from "8.0;9.0" (also "90a" from "9.0a")."""
    raw = os.environ.get("TRACE_KERNELS_CUDA_ARCHS", "8.0;9.0")
    archs = []
    for item in re.split(r"[;, ]+", raw.strip()):
        m = re.fullmatch(r"(\d+)\.(\d)(a?)", item)
        if not m:
            raise ValueError(f"TRACE_KERNELS_CUDA_ARCHS: cannot read {item!r} (expected e.g. 8.0;9.0a)")
        archs.append(m.group(1) + m.group(2) + m.group(3))
    return archs


class CUDAExtension(Pybind11Extension):
    """A pybind11 module whose .cu sources are compiled by nvcc and linked with cudart."""

    def __init__(self, name, sources, cu_sources, home: Path):
        super().__init__(
            name, sources, include_dirs=["csrc/include", str(home / "include")], cxx_std=17,
            extra_compile_args=["-O3", "-fvisibility=hidden"],
            library_dirs=[str(home / "lib64"), str(home / "lib")],
            libraries=["cudart_static", "dl", "rt", "pthread"],
            define_macros=[("TRACE_KERNELS_CUDA_ARCHS", '"' + ";".join(cuda_archs()) + '"')],
            # The .cu files are compiled outside setuptools; listing them relinks on an edit.
            depends=_headers() + list(cu_sources),
        )
        self.cu_sources = cu_sources
        self.cuda_home = home


def nvcc_compile(ext: CUDAExtension, build_temp: str) -> list[str]:
    nvcc = str(ext.cuda_home / "bin" / "nvcc") if (ext.cuda_home / "bin" / "nvcc").exists() else "nvcc"
    archs = cuda_archs()
    gencode = []
    for a in archs:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    newest = archs[-1]
    gencode += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]  # PTX for later GPUs
    objects = []
    for src in ext.cu_sources:
        obj = str(Path(build_temp) / (Path(src).stem + ".cu.o"))
        Path(obj).parent.mkdir(parents=True, exist_ok=True)
        cmd = [nvcc, "-O3", "-std=c++17", "-fmad=false", "-Xcompiler", "-fPIC,-fvisibility=hidden",
               "-Icsrc/include", *gencode, "-c", src, "-o", obj]
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)
        objects.append(obj)
    return objects


class OptionalBuildExt(build_ext):
    """Builds each extension; a failed CPU build leaves a working pure-PyTorch package and a
    failed optional CUDA build a working CPU/Triton one."""

    def build_extension(self, ext):
        required = _flag("TRACE_KERNELS_CUDA") if isinstance(ext, CUDAExtension) else _flag(
            "TRACE_KERNELS_REQUIRE_CPU")
        try:
            if isinstance(ext, CUDAExtension):
                ext.extra_objects = nvcc_compile(ext, self.build_temp)
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            if required:
                raise
            print(f"WARNING: building {ext.name} failed ({exc}); trace_kernels will work without "
                  "it (python -m trace_kernels reports what is available).", file=sys.stderr)


def extensions() -> list:
    exts = [cpu_extension()]
    mode = os.environ.get("TRACE_KERNELS_CUDA", "").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return exts
    home = cuda_home()
    if home is None:
        if _flag("TRACE_KERNELS_CUDA"):
            raise RuntimeError("TRACE_KERNELS_CUDA=1 but no nvcc was found (set CUDA_HOME)")
        return exts
    exts.append(CUDAExtension("trace_kernels._cuda", ["csrc/bindings/cuda_module.cpp"],
                              ["csrc/cuda/kernels.cu"], home))
    return exts


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
