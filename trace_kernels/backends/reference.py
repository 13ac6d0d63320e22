"""Pure-PyTorch implementations: the oracle every backend is tested against, and the
fallback where no native kernel is built. Inputs are already validated by `ops`.

The masked AdamW step gathers the selected elements, applies the update formula of
`csrc/include/trace_kernels/adamw_math.h` one rounding at a time, and scatters the result
back, so the native kernels (compiled without FMA contraction) match it bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..masks import expand_blocks
from .registry import register_kernel
from ._common import (advance_steps, check_block_indices, host_lr, inf_found, register_adamw, round_bits,
                      round_key, to_param)


def _f32(x: float) -> float:
    """Round a Python float to fp32, as ATen does with a scalar meeting an fp32 tensor."""
    return float(np.float32(x))


def adamw_update_(p, g, m, v, vmax, *, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW update of fp32 vectors in place (the formula of adamw_math.h)."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    w = _f32(1 - beta1)
    if abs(w) < 0.5:
        m.add_((g - m).mul_(w))
    else:
        m.copy_(g - (g - m).mul_(_f32(1 - w)))
    v.mul_(beta2).add_(g.mul(1 - beta2).mul_(g))
    second = v
    if vmax is not None:
        torch.maximum(vmax, v, out=vmax)
        second = vmax
    # torch.sqrt on CPU may go through MKL's vector math (not always correctly rounded);
    # sqrt in fp64 rounded to fp32 is the correctly rounded fp32 sqrt the kernels compute.
    denom = second.double().sqrt_().float().div_(bias_correction2**0.5).add_(eps)
    p.add_(m.mul(-(lr / bias_correction1)).div_(denom))


def _unscaled(g, grad_scale, maximize):
    g = g.to(torch.float32)
    if grad_scale is not None:
        g = g / grad_scale.to(g.device, torch.float32)
    return g.neg() if maximize else g


def _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes,
           steps, fishers, fisher_scale, *, lr, beta1, beta2, eps, weight_decay, amsgrad,
           maximize, grad_scale, found_inf, masters=(), elem_bases=(), stochastic=False, seed=0):
    """The selected elements gathered, updated one rounding at a time and scattered back;
    with `fishers`, fisher += fisher_scale * g^2 (g unscaled) in state order first; with
    `masters`, the update applied to them and the parameter given them rounded."""
    if inf_found(found_inf):
        return
    step_values = advance_steps(steps)
    lr = host_lr(lr)
    for i, p in enumerate(params):
        idx = block_indices[i]
        if idx.numel() == 0:
            continue
        ei = expand_blocks(idx, block_sizes[i])
        flat_p = p.view(-1)
        base = elem_bases[i] if elem_bases else 0
        if masters and masters[i].numel():
            pv = masters[i]
            # rounding.h's master_or_weight: the weight wins where it no longer holds what the
            # last step wrote from the master
            w = flat_p[ei]
            prev = round_bits(round_key(seed, step_values[i] - 1), ei + base) if stochastic else None
            same = to_param(pv, p.dtype, prev).view(torch.int16) == w.view(torch.int16)
            pv.copy_(torch.where(same, pv, w.to(torch.float32)))
        else:
            pv = flat_p[ei].to(torch.float32)
        g = _unscaled(grads[i].view(-1)[ei], grad_scale, maximize)
        if fishers:
            fishers[i].view(-1).add_(g.mul(fisher_scale).mul_(g))
        adamw_update_(
            pv, g, exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None,
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            step=step_values[i],
        )
        bits = round_bits(round_key(seed, step_values[i]), ei + base) if stochastic else None
        flat_p[ei] = to_param(pv, p.dtype, bits)


masked_adamw_, adamw_fisher_ = register_adamw("reference", _adamw)
register_kernel("check_block_indices", "reference")(check_block_indices)


@register_kernel("delta_stats", "reference")
def delta_stats(post, pre, fishers, refs, block_sizes, num_refs, outputs):
    """Per-block sums of d^2, fisher, d*ref, ref^2 (d = post - pre in fp32; sums in fp64)."""
    sum_sq, fisher_sum, dots, ref_sq = outputs
    row = 0
    for i, t in enumerate(post):
        b = block_sizes[i]
        nb = t.numel() // b
        rows = slice(row, row + nb)
        row += nb
        if nb == 0:
            continue
        d = t.reshape(-1).to(torch.float32)
        if pre:
            d = d - pre[i].reshape(-1).to(torch.float32)

        def block_sum(x):
            # B = 1: the single fp32 product, as the kernels store it
            return x.view(nb, b).sum(1).to(torch.float32) if b > 1 else x.to(torch.float32)

        dd = d.double() if b > 1 else d
        sum_sq[rows] = block_sum(dd * dd)
        fisher_sum[rows] = block_sum(fishers[i].reshape(-1).double()) if fishers else 0.0
        for r in range(num_refs):
            ref = refs[i * num_refs + r].reshape(-1).to(torch.float32)
            rr = ref.double() if b > 1 else ref
            dots[rows, r] = block_sum(dd * rr)
            ref_sq[rows, r] = block_sum(rr * rr)


@register_kernel("sampled_dot", "reference")
def sampled_dot(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                budget: int = 1 << 24) -> torch.Tensor:
    """out[i] = a[rows[i]] · b[cols[i]], in chunks of at most `budget` gathered values per
    operand (64 MiB of fp32), whatever the vectors' length."""
    chunk = max(1, budget // max(1, a.shape[1]))
    out = torch.empty(rows.numel(), dtype=torch.float32, device=a.device)
    for s in range(0, rows.numel(), chunk):
        r, c = rows[s:s + chunk], cols[s:s + chunk]
        out[s:s + chunk] = (a.index_select(0, r) * b.index_select(0, c)).sum(1)
    return out


@register_kernel("rank_scores", "reference")
def rank_scores(x: torch.Tensor, y: torch.Tensor, x_ranks: torch.Tensor, y_ranks: torch.Tensor, bits: int,
                factors: tuple[torch.Tensor, ...], excluded: torch.Tensor | None, floor: float,
                chunk: int = 1 << 20):
    """The torch ops, in chunks of `chunk` elements (no element-sized fp64 temporary)."""
    from ..ops.rank_scores import RankScores, rank_bin

    finite, index, value = 0, [], []
    for a in range(0, x.numel(), chunk):
        s = x_ranks[rank_bin(x[a:a + chunk], bits)]
        s += y_ranks[rank_bin(y[a:a + chunk], bits)]
        s.mul_(0.5)
        for f in factors:
            s.mul_(f[a:a + chunk])
        if excluded is not None:
            s[excluded[a:a + chunk]] = -math.inf
        ok = torch.isfinite(s)
        finite += int(torch.count_nonzero(ok))
        keep = torch.nonzero(ok.logical_and_(s >= floor)).reshape(-1)
        index.append(keep + a)
        value.append(s[keep])
    empty = torch.zeros(0, dtype=torch.int64, device=x.device)
    return RankScores(finite, torch.cat(index) if index else empty,
                      torch.cat(value) if value else empty.double())


@register_kernel("rank_counts", "reference")
def rank_counts(x: torch.Tensor, bits: int, counts: torch.Tensor, chunk: int = 1 << 20) -> None:
    """bincount over each chunk's span of bins."""
    from ..ops.rank_scores import rank_bin

    for a in range(0, x.numel(), chunk):
        key = rank_bin(x[a:a + chunk], bits)
        lo, hi = int(key.min()), int(key.max())
        counts[lo:hi + 1] += torch.bincount(key.sub_(lo), minlength=hi - lo + 1)


@register_kernel("element_max_cosine", "reference")
def element_max_cosine(d: torch.Tensor, refs: list[torch.Tensor]) -> torch.Tensor:
    """The torch ops of the block path at one element per block."""
    ss = (d * d).double()
    best = None
    for r in refs:
        den = (ss * (r * r).double()).sqrt()
        c = torch.where(den > 0, (d * r).double() / den.clamp_min(1e-300), torch.zeros_like(den))
        best = c if best is None else torch.maximum(best, c)
    return best
