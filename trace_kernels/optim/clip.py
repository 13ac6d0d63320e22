"""Gradient clipping on what MaskedAdamW trains: the core elements' gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from ..sharding import local_tensor
from .core_rows import carrier_of, core_in_carrier
from .layout import ParamLayout


@torch.no_grad()
def clip_core_grad_norm_(layout: dict[Tensor, ParamLayout], max_norm: float, eps: float,
                         rows_cache: dict) -> Tensor:
    """Scale every stepped gradient so the L2 norm of the core elements' gradients, over all
    parameters together, is at most `max_norm`; return the norm before clipping. The norm is
    the same whether a weight's gradient is full or core-only (a carrier's); a sharded
    parameter's squares are summed over its ranks, so every rank clips alike."""
    plain, sharded, grads, group = [], [], [], None
    for p, lay in layout.items():
        if not lay.entry.numel_selected:
            continue
        c = carrier_of(p)
        if c is not None:
            g, (idx, bs) = c.grad, core_in_carrier(rows_cache, p, lay, c)
        elif p.grad is not None:
            g, idx, bs = local_tensor(p.grad), lay.kernel_indices, lay.kernel.block_size
        else:
            continue
        sq = g.reshape(-1, bs).index_select(0, idx.to(torch.int64)).float().square().sum()
        (sharded if lay.shard is not None else plain).append(sq)
        group = lay.shard.group if lay.shard is not None else group
        grads.append(g)
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    if sharded:
        total += torch.stack([s.to(device) for s in sharded]).sum()
        import torch.distributed as dist

        dist.all_reduce(total, group=group)
    if plain:
        total += torch.stack([s.to(device) for s in plain]).sum()
    total = total.sqrt()
    coef = (max_norm / (total + eps)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))
    return total
