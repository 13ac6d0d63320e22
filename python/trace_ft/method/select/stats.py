"""A tensor's block sums for selection, from one `delta_stats` pass: Σ Δ², Σ F and, for each
earlier update given, Σ Δ·ref and Σ ref², per block. A sharded (FSDP2) tensor's come from its
shard's partial sums, added over the ranks."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from trace_kernels import ops
from trace_kernels.sharding import all_reduce_sum, is_dtensor, local_tensor, shard_layout


def block_stats(d: Tensor, fisher: Tensor | None, refs: list[Tensor], B: int, name: str):
    """Per block of `B` elements of `d` (one tensor): (Σ d², Σ fisher, Σ d·ref (blocks × R),
    Σ ref² (blocks × R)). A plain tensor's are delta_stats' fp32 sums (kept fp32: an element
    level selection has a block per element; every use turns them to fp64 first, exactly);
    a sharded tensor's are fp64, the ranks' partial sums added."""
    if is_dtensor(d):
        return _shard_stats(d, fisher, refs, B, name)
    s = ops.delta_stats([d.contiguous()], None, [fisher.reshape(-1).float().contiguous()] if fisher is not None else None,
                        [refs] if refs else None, [B])
    return s.sum_sq, s.fisher_sum, s.dots, s.ref_sq


def _shard_stats(d: Tensor, fisher: Tensor | None, refs: list[Tensor], B: int, name: str):
    """delta_stats of one sharded tensor: the rank's shard summed in sub-blocks that divide
    both the blocks and the shard's ends, folded into the global blocks it meets, then
    summed over the ranks. A block inside one shard is summed exactly as one process does;
    a block across a shard boundary is the sum of the ranks' fp32 partial sums."""
    shard = shard_layout(d, repr(name))
    lo, hi, nb, R = shard.lo, shard.hi, d.numel() // B, len(refs)
    # the sums live where the shard and the process group's backend are (NCCL: the GPU)
    device = local_tensor(d).device
    out = [torch.zeros(nb, dtype=torch.float64, device=device), torch.zeros(nb, dtype=torch.float64, device=device),
           torch.zeros(nb, R, dtype=torch.float64, device=device),
           torch.zeros(nb, R, dtype=torch.float64, device=device)]
    n = hi - lo
    if n:
        b = math.gcd(B, math.gcd(lo, n))
        local = local_tensor(d).reshape(-1).contiguous()
        ref_local = [(local_tensor(r) if is_dtensor(r) else r.reshape(-1)[lo:hi]).reshape(-1).contiguous()
                     for r in refs]
        f = local_tensor(fisher).reshape(-1).float().contiguous() if fisher is not None else None
        s = ops.delta_stats([local], None, [f] if f is not None else None, [ref_local] if R else None, [b])
        where = (lo + torch.arange(n // b, dtype=torch.int64, device=device) * b) // B
        for acc, part in zip(out, s[:4]):
            acc.index_add_(0, where, part.double())
    for acc in out:
        all_reduce_sum(acc, d)
    return tuple(out)
