"""Host-side steps shared by the backends."""

from __future__ import annotations

import torch
from torch import Tensor


def inf_found(found_inf: torch.Tensor | None) -> bool:
    """True when a GradScaler reported inf/nan grads: the whole step is skipped."""
    return found_inf is not None and bool(found_inf.item() != 0)


def advance_steps(steps: list[torch.Tensor]) -> list[float]:
    """Increment each parameter's step (torch does this before the update) and read it."""
    if not steps:
        return []
    torch._foreach_add_(steps, 1)
    return torch.stack([s.reshape(()).to("cpu", torch.float64) for s in steps]).tolist()


def host_lr(lr: float | Tensor) -> float:
    """The learning rate as a Python float (reads a tensor lr: one host sync if on a GPU)."""
    return float(lr.item()) if isinstance(lr, Tensor) else float(lr)


def check_block_indices(indices: Tensor, limit: int) -> tuple[int, str] | None:
    """None if strictly increasing and in [0, limit), else (first bad position, reason).
    Torch ops, so it runs where the indices are (the cpu backend has a native twin)."""
    if indices.numel() == 0:
        return None
    idx = indices.to(torch.int64)
    bad_range = torch.nonzero((idx < 0) | (idx >= limit))
    bad_order = torch.nonzero(idx[1:] <= idx[:-1]) + 1
    first_range = int(bad_range[0, 0]) if bad_range.numel() else None
    first_order = int(bad_order[0, 0]) if bad_order.numel() else None
    if first_range is None and first_order is None:
        return None
    if first_order is None or (first_range is not None and first_range <= first_order):
        return first_range, "out of range"
    return first_order, "not strictly increasing"


def split_stats(final: Tensor, outputs, num_refs: int) -> None:
    """Copy fp64 rows (d², fisher, d·ref[R], ref²[R]) into delta_stats' fp32 outputs."""
    sum_sq, fisher_sum, dots, ref_sq = outputs
    sum_sq.copy_(final[:, 0])
    fisher_sum.copy_(final[:, 1])
    dots.copy_(final[:, 2:2 + num_refs])
    ref_sq.copy_(final[:, 2 + num_refs:])


def whole_tensor_blocks(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """adamw_fisher_ runs as the masked step with one block spanning each tensor: the block
    indices ([0], or none for an empty tensor) and block sizes that say so."""
    if not params:
        return [], []
    zero = torch.zeros(1, dtype=torch.int32, device=params[0].device)
    return [zero if p.numel() else zero[:0] for p in params], [max(p.numel(), 1) for p in params]


def register_adamw(backend: str, adamw):
    """Register (and return) a backend's masked_adamw_ and adamw_fisher_, both made from its
    one `adamw` function, which takes the masked-step arguments plus (fishers, fisher_scale):
    the masked step passes no fishers; adamw_fisher_ passes one block spanning each tensor."""
    from .registry import register_kernel

    @register_kernel("masked_adamw_", backend)
    def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices,
                      block_sizes, steps, **hyper):
        adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes,
              steps, None, 0.0, **hyper)

    @register_kernel("adamw_fisher_", backend)
    def adamw_fisher_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, steps, *,
                      fisher_scale, **hyper):
        indices, sizes = whole_tensor_blocks(params)
        adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, indices, sizes, steps,
              fishers, fisher_scale, **hyper)

    return masked_adamw_, adamw_fisher_


# ---- stochastic rounding: csrc/include/trace_kernels/rounding.h, in torch ----------------

_M32 = 0xFFFFFFFF


def _mix32(x):
    """rounding.h's mix32 on int64 tensors (or ints) holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def round_key(seed: int, step: float) -> int:
    """rounding.h's round_key: one tensor's stochastic-rounding key for one step."""
    s = int(step) & _M32
    return _mix32((seed & _M32) ^ _mix32(((seed >> 32) & _M32) ^ _mix32(s)))


def round_bits(key: int, elements: torch.Tensor) -> torch.Tensor:
    """rounding.h's round_bits: the 16 random bits of each element (int64 indices)."""
    e = elements.to(torch.int64)
    hi = _mix32(((e >> 32) + 0x9E3779B9) & _M32)
    return _mix32((key ^ (e & _M32)) ^ hi) & 0xFFFF


def to_param(x: torch.Tensor, dtype: torch.dtype, bits: torch.Tensor | None) -> torch.Tensor:
    """fp32 → the parameter dtype: nearest even, or (bf16, with `bits`) stochastically."""
    if bits is None or dtype != torch.bfloat16:
        return x.to(dtype)
    u = x.view(torch.int32).to(torch.int64) & _M32
    mag = u & 0x7FFFFFFF
    r = (u + bits) >> 16
    r = torch.where(mag == 0x7F800000, u >> 16, r)      # ±inf stays
    r = torch.where(mag > 0x7F800000, 0x7FC0, r)        # NaN: the canonical quiet NaN
    return r.to(torch.int32).to(torch.int16).view(torch.bfloat16)
