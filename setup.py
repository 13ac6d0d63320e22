"""Builds the native extensions of trace-kernels.

`trace_kernels._C` (CPU kernels) is built on every install with pybind11: C++17, -O3,
OpenMP, and runtime ISA dispatch through GCC target_clones (never -march=native, so a
wheel runs on any x86-64). It needs no torch at build time: tensors cross as addresses.

If the compiler fails, the install still succeeds and the package falls back to its
pure-PyTorch reference backend (`python -m trace_kernels` says so), unless
TRACE_KERNELS_REQUIRE_CPU=1 asks for the build to be fatal, as CI does.
"""

import os
import re
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "trace_kernels" / "_version.py").read_text()).group(1)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


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
    )


class OptionalBuildExt(build_ext):
    """Builds each extension; a failed CPU build leaves a working pure-PyTorch package."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            if _flag("TRACE_KERNELS_REQUIRE_CPU"):
                raise
            print(
                f"WARNING: building {ext.name} failed ({exc}); trace_kernels will use the "
                "reference backend only. Set TRACE_KERNELS_REQUIRE_CPU=1 to make this fatal.",
                file=sys.stderr,
            )


setup(
    ext_modules=[cpu_extension()],
    cmdclass={"build_ext": OptionalBuildExt},
)
