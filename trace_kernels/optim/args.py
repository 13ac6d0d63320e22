"""MaskedAdamW's constructor arguments, checked as torch.optim.AdamW checks its own (plus
ours), before anything is built."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import backends

UNMASKED = ("freeze", "dense")
ROUNDINGS = ("nearest", "stochastic")


def checked_defaults(*, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable,
                     differentiable, fused, unmasked, backend, rounding, seed, master_weights) -> dict[str, Any]:
    """The param-group defaults, or ValueError naming the first bad argument."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("lr as a Tensor must have one element")
    elif not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: {betas}; each must be in [0, 1)")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if capturable:
        raise ValueError("MaskedAdamW does not support capturable=True (CUDA graph capture)")
    if differentiable:
        raise ValueError("MaskedAdamW does not support differentiable=True")
    if unmasked not in UNMASKED:
        raise ValueError(f"unmasked must be one of {UNMASKED}, got {unmasked!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if master_weights is not None and not isinstance(master_weights, bool):
        raise ValueError(f"master_weights must be True, False or None, got {master_weights!r}")
    if seed is not None and (not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if backend is not None and backend not in backends.BACKENDS:
        raise ValueError(f"backend must be one of {backends.BACKENDS} or None, got {backend!r}")
    if seed is None:  # drawn only when used: a nearest-rounding run draws nothing
        seed = int(torch.randint(0, 2**62, ()).item()) if rounding == "stochastic" else 0
    # the rounding seed is a group setting, so state_dict saves it and a resumed run rounds
    # bit for bit as the uninterrupted one
    return dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                maximize=maximize, foreach=foreach, capturable=False, differentiable=False,
                fused=fused, rounding_seed=seed)
