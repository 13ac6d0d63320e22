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


def adamw_entry_points(adamw):
    """A backend's masked_adamw_ and adamw_fisher_ from its one `adamw` function, which takes
    the masked-step arguments plus (fishers, fisher_scale): the masked step passes no
    fishers; adamw_fisher_ passes one block spanning each tensor."""

    def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices,
                      block_sizes, steps, **hyper):
        adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes,
              steps, None, 0.0, **hyper)

    def adamw_fisher_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, steps, *,
                      fisher_scale, **hyper):
        indices, sizes = whole_tensor_blocks(params)
        adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, indices, sizes, steps,
              fishers, fisher_scale, **hyper)

    return masked_adamw_, adamw_fisher_
