"""Backend selection: which implementation runs an op for a given device, and why.

Backends share one signature per op (see `reference.py`, the oracle):
- ``reference``: pure PyTorch, any device; the fallback when nothing native is built.
- ``cpu``: the C++/OpenMP extension ``trace_kernels._C``, CPU tensors.
- ``cuda``: the CUDA extension ``trace_kernels._cuda``, CUDA tensors.
- ``triton``: Triton kernels for GPU tensors (CPU tensors too under TRITON_INTERPRET=1,
  which is how they are tested without a GPU).

``TRACE_KERNELS_BACKEND`` (or an explicit ``backend=`` argument) forces one; asking for a
backend that cannot run here is an error, never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from .. import _native
from .registry import OPS, kernel, register_kernel  # noqa: F401 (re-exported)

GPU_DEVICES = ("cuda", "xpu")
ENV_VAR = "TRACE_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run on this build or device."""


@dataclass(frozen=True)
class Choice:
    name: str
    reason: str


def _runs_anywhere(device_type: str, index: int | None) -> str | None:
    return None


def _cpu_why_not(device_type: str, index: int | None) -> str | None:
    if device_type != "cpu":
        return f"the cpu backend runs CPU tensors only, not {device_type}"
    err = _native.error("_C")
    return None if err is None else f"the CPU extension trace_kernels._C is not built or failed to load ({err})"


def _cuda_why_not(device_type: str, index: int | None) -> str | None:
    if device_type != "cuda":
        return f"the cuda backend runs CUDA tensors only, not {device_type}"
    from . import cuda as cuda_backend

    return cuda_backend.unavailable_reason(index)


def _triton_why_not(device_type: str, index: int | None) -> str | None:
    from . import triton as triton_backend

    why_not = triton_backend.available()
    if why_not is not None:
        return why_not
    if device_type not in GPU_DEVICES and not (device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"Triton kernels run on GPU tensors ({device_type} given; CPU only with TRITON_INTERPRET=1)"
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of the ops: its module (in this package), whether it can run
    tensors of a device type here (None) or why not, and why it is picked by default."""

    name: str
    module: str
    why_not: Callable[[str, int | None], str | None]
    picked_because: str


REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("reference", "reference", _runs_anywhere, "the pure-PyTorch oracle"),
    Backend("cpu", "cpu", _cpu_why_not, "native CPU extension built and loaded"),
    Backend("cuda", "cuda", _cuda_why_not, "CUDA extension built and a device is visible"),
    Backend("triton", "triton", _triton_why_not, "Triton available"),
)}
BACKENDS = tuple(REGISTRY)
# What runs a device type's tensors by default: the first of these that can, else the reference.
PREFERENCE: dict[str, tuple[str, ...]] = {"cpu": ("cpu",), "cuda": ("cuda", "triton"), "xpu": ("cuda", "triton")}


def _unavailable_reason(name: str, device_type: str, index: int | None = None) -> str | None:
    """None if `name` can run tensors of `device_type` here, else why not."""
    backend = REGISTRY.get(name)
    if backend is None:
        return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}"
    return backend.why_not(device_type, index)


def choose(device: torch.device | str, requested: str | None = None) -> Choice:
    """Pick the backend for tensors on `device`: explicit request, then env var, then best built."""
    device = device if isinstance(device, torch.device) else torch.device(device)
    return _choose(device.type, device.index, requested or None, os.environ.get(ENV_VAR, ""),
                   os.environ.get("TRITON_INTERPRET", ""))


@functools.lru_cache(maxsize=64)
def _choose(device_type: str, index: int | None, requested: str | None, env_value: str,
            interpret: str) -> Choice:
    # Cached per (device type, request, environment): the answer only changes with those.
    source = "backend argument"
    if not requested:
        requested = env_value.strip() or None
        source = f"{ENV_VAR}={requested}"
    if requested:
        requested = requested.lower()
        why_not = _unavailable_reason(requested, device_type, index)
        if why_not is not None:
            raise BackendUnavailableError(f"backend {requested!r} requested by {source}: {why_not}")
        return Choice(requested, f"forced by {source}")
    reasons = []
    for name in PREFERENCE.get(device_type, ()):
        why_not = _unavailable_reason(name, device_type, index)
        if why_not is None:
            because = REGISTRY[name].picked_because
            return Choice(name, f"{because} ({'; '.join(reasons)})" if reasons else because)
        reasons.append(why_not)
    if reasons:
        return Choice("reference", f"reference only: {'; '.join(reasons)}")
    return Choice("reference", f"no native backend for {device_type} in this build")


def module(name: str) -> ModuleType:
    """The Python module implementing backend `name` (imported: its kernels registered)."""
    backend = REGISTRY.get(name)
    if backend is None:
        raise BackendUnavailableError(f"unknown backend {name!r}")
    return importlib.import_module(f"{__name__}.{backend.module}")
