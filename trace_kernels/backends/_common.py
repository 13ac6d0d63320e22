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
