"""Host-side steps shared by the CPU-resident backends (reference on CPU, cpu)."""

from __future__ import annotations

import torch


def inf_found(found_inf: torch.Tensor | None) -> bool:
    """True when a GradScaler reported inf/nan grads: the whole step is skipped."""
    return found_inf is not None and bool(found_inf.item() != 0)


def advance_steps(steps: list[torch.Tensor]) -> list[float]:
    """Increment each parameter's step (torch does this before the update) and read it."""
    if not steps:
        return []
    torch._foreach_add_(steps, 1)
    return torch.stack([s.reshape(()).to("cpu", torch.float64) for s in steps]).tolist()


def resolve_lr(lr: float, lr_tensor: torch.Tensor | None) -> float:
    return float(lr_tensor.item()) if lr_tensor is not None else float(lr)


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
