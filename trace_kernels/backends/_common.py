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
