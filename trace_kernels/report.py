"""The build and backend report printed by ``python -m trace_kernels``."""

from __future__ import annotations

import platform

import torch

from . import _native, backends
from ._version import __version__


def _devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


def report() -> str:
    """Version, native builds, and which backend each device would use and why."""
    lines = [
        f"trace_kernels {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}",
    ]
    ext = _native.load("_C")
    if ext is not None:
        lines.append(
            f"CPU extension trace_kernels._C: built (OpenMP {'on' if ext.openmp_enabled() else 'off'}, "
            f"ISA clone in use: {ext.isa_levels()[0]}, threads: {torch.get_num_threads()})"
        )
    else:
        lines.append(f"CPU extension trace_kernels._C: NOT available ({_native.error('_C')})")
        lines.append("  -> only the pure-PyTorch reference backend is available")
    cuda_ext = _native.load("_cuda")
    if cuda_ext is not None:
        v = cuda_ext.CUDA_VERSION
        runnable = "runs here" if cuda_ext.device_count() > 0 else "cannot run here: no CUDA device"
        lines.append(f"CUDA extension trace_kernels._cuda: built for sm {cuda_ext.ARCHS.replace(';', ', ')} "
                     f"(+PTX), CUDA runtime {v // 1000}.{v % 1000 // 10}, {runnable}")
    else:
        lines.append(f"CUDA extension trace_kernels._cuda: not built ({_native.error('_cuda')})")
    from .backends import triton as triton_backend

    why_not = triton_backend.available()
    lines.append("Triton kernels: " + ("available" if why_not is None else f"not available ({why_not})"))
    env = backends.ENV_VAR
    for device in _devices():
        try:
            choice = backends.choose(device)
            lines.append(f"backend for {device}: {choice.name} ({choice.reason})")
        except backends.BackendUnavailableError as exc:
            lines.append(f"backend for {device}: ERROR {exc}")
    lines.append(f"(set {env}={'|'.join(backends.BACKENDS)} to force one)")
    return "\n".join(lines)
