"""The token-major `sampled_dot` promises one summation order on every ISA clone (AVX-512,
AVX2, scalar), so a core's gradient, and a run, has the same bits on any x86-64. The
installed extension dispatches to the widest clone the CPU has; here the kernel's source is
built once per clone, each forced (a copy of it beside an `isa_dispatch.h` naming one
target), and every build the CPU can run must give the installed op's bits."""

import ast
import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from trace_kernels import ops

pytest.importorskip("trace_kernels._C")
pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("g++") is None, reason="needs x86-64 and g++")

ROOT = Path(__file__).resolve().parents[2]
CPU_SOURCES = ROOT / "csrc" / "cpu"


def setup_compile_args() -> list[str]:
    """`compile_args` of setup.py's CPU extension (read, not copied: the flags that decide the
    arithmetic, no FMA contraction above all, are the build's)."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "compile_args" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no compile_args list")


TARGETS = {"x86-64-v4": '__attribute__((target("arch=x86-64-v4")))',
           "x86-64-v3": '__attribute__((target("arch=x86-64-v3")))',
           "default": ""}
ENTRY = """
extern "C" __attribute__((visibility("default")))
void forced_sampled_dot(const float* a, long aw, const float* b, long bw, long len, const long* rows,
                        const long* cols, long count, float* out, int nt) {
  trace_kernels::cpu::sampled_dot_token_major(a, aw, b, bw, len, rows, cols, count, out, nt);
}
"""
# whether the CPU runs the clone (`__builtin_cpu_supports` takes a literal only)
RUNS_HERE = 'extern "C" __attribute__((visibility("default"))) int runs_here() {{ return {}; }}\n'


@pytest.fixture(scope="module")
def forced_builds(tmp_path_factory):
    flags = [*setup_compile_args(), "-std=c++17", "-fPIC", "-shared", "-Wno-psabi"]
    builds = {}
    for name, attribute in TARGETS.items():
        src = tmp_path_factory.mktemp(name.replace("-", "_"))
        for header in ("sampled_dot.h", "parallel.h"):
            shutil.copy(CPU_SOURCES / header, src / header)
        (src / "isa_dispatch.h").write_text(f"#pragma once\n#define TK_CPU_CLONES {attribute}\n")
        check = "1" if name == "default" else f'__builtin_cpu_supports("{name}")'
        (src / "forced.cpp").write_text((CPU_SOURCES / "sampled_dot.cpp").read_text() + ENTRY
                                        + RUNS_HERE.format(check))
        built = subprocess.run(["g++", *flags, f"-I{src}", str(src / "forced.cpp"), "-o", str(src / "forced.so")],
                               capture_output=True, text=True)
        if built.returncode != 0:  # an arch name an older g++ does not know: that clone untested here
            assert name != "default", built.stderr
            continue
        lib = ctypes.CDLL(str(src / "forced.so"))
        if lib.runs_here():
            builds[name] = lib
    return builds


@pytest.mark.parametrize("R,C,n", [(45, 70, 517), (37, 2053, 300), (33, 17, 15), (16, 16, 16),
                                   (1536, 576, 688)])
def test_every_clone_gives_the_installed_ops_bits(forced_builds, R, C, n):
    """Whole and partial 16 × 16 copies, one and many token blocks, tails, 1 and 2 threads."""
    assert "default" in forced_builds
    gen = torch.Generator().manual_seed(R * C + n)
    a, b = torch.randn(n, R, generator=gen), torch.randn(n, C, generator=gen)
    rows = torch.randint(0, R, (2001,), generator=gen).sort().values
    cols = torch.randint(0, C, (2001,), generator=gen)
    want = ops.sampled_dot(a.t(), b.t(), rows, cols, backend="cpu")
    p = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    for name, lib in forced_builds.items():
        for threads in (1, 2):
            got = torch.full((rows.numel(),), float("nan"))
            lib.forced_sampled_dot(p(a), ctypes.c_long(R), p(b), ctypes.c_long(C), ctypes.c_long(n), p(rows),
                                   p(cols), ctypes.c_long(rows.numel()), p(got), ctypes.c_int(threads))
            assert torch.equal(got, want), (name, threads)
