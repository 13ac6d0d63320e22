"""`sampled_dot`: selected entries of a product A·Bᵀ, the rest never computed.

A weight gradient is gyᵀ·x (output gradient by input, summed over tokens); an element-level
core needs only its own entries of it, each the dot product of one column of gy with one
column of x. Given gyᵀ and xᵀ (the tokens along each row), this computes those dot products
and nothing else: k · tokens multiply-adds instead of out · in · tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ._checks import check_float32


def sampled_dot(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, *, backend: str | None = None) -> Tensor:
    """fp32 ``out[i] = a[rows[i]] · b[cols[i]]`` for 2-D fp32 `a` (R × n) and `b` (C × n)
    and int64 index vectors `rows`, `cols` of one length. The native CPU kernel sums each
    product in a fixed order whatever the thread count; other devices use torch ops."""
    op = "sampled_dot"
    check_float32(op, "a", a, 2)
    check_float32(op, "b", b, 2)
    if a.shape[1] != b.shape[1] or a.device != b.device:
        raise ValueError(f"{op}: a {tuple(a.shape)} on {a.device} and b {tuple(b.shape)} on {b.device} "
                         "must share their second dimension and device")
    for name, t, limit in (("rows", rows, a.shape[0]), ("cols", cols, b.shape[0])):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype != torch.int64 or t.device != a.device:
            raise ValueError(f"{op}: {name} must be a 1-D int64 tensor on {a.device}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= limit):
            raise ValueError(f"{op}: {name} holds an index outside [0, {limit})")
    if rows.numel() != cols.numel():
        raise ValueError(f"{op}: rows ({rows.numel()}) and cols ({cols.numel()}) differ in length")
    return sampled_dot_trusted(a, b, rows, cols, backend=backend)


@torch.library.custom_op("trace_kernels::sampled_dot", mutates_args=())
def _sampled_dot_op(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, backend: str) -> Tensor:
    return _sampled_dot_impl(a, b, rows, cols, backend)


@_sampled_dot_op.register_fake
def _(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, backend: str) -> Tensor:
    return a.new_empty(rows.shape[0], dtype=torch.float32)


def _sampled_dot_impl(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, backend: str) -> Tensor:
    name = backends.choose(a.device, backend or None).name
    # a and b as given: the cpu backend reads transposed (token-major) operands in place
    return backends.kernel("sampled_dot", name)(a, b, rows.contiguous(), cols.contiguous())


def sampled_dot_trusted(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, *,
                        backend: str | None = None) -> Tensor:
    """`sampled_dot` for inputs already known valid (core_grads' backward: indices built
    from the layer's own mask at install): no range check, so no device sync per call.
    Under torch.compile the registered op ``trace_kernels::sampled_dot`` (its fake gives
    the output's shape), else the backend's function directly."""
    if torch.compiler.is_compiling():
        return _sampled_dot_op(a, b, rows, cols, backend or "")
    return _sampled_dot_impl(a, b, rows, cols, backend or "")
