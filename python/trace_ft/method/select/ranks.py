"""Importance numerics: percentile ranks (exact by one radix sort of the float bits up to
`EXACT_RANKS_UP_TO` values, binned by their top `RANK_BITS` bits above), and the
combination of the L2 and Fisher scores into one importance per block (`importance`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from trace_kernels import ops

from .config import SelectConfig


def order_key(x: Tensor) -> Tensor:
    """Integers that sort as the floats `x` do (equal exactly where the floats are equal):
    their bits, negative values mirrored. Integer sorts are radix sorts on the CPU, several
    times faster than float sorts at an element-level selection's size."""
    bits = (x + 0.0).view(torch.int32 if x.dtype == torch.float32 else torch.int64)  # -0.0 → +0.0
    negative = bits < 0
    if negative.any():  # sums of squares and Fisher values never are: no second copy for them
        bits = torch.where(negative, bits ^ torch.iinfo(bits.dtype).max, bits)
    return bits


# Percentile ranks are exact up to this many blocks; above (an element-level selection of a
# real model: 106M blocks for SmolLM2-135M, billions at 8B) values are binned by their top
# RANK_BITS bits (sign, exponent and 12 bits of mantissa for fp32: values within 0.025 % of
# each other share a bin and its mean rank), which needs no sort and no index per element.
EXACT_RANKS_UP_TO = 1 << 24
RANK_BITS = 21


def rank_bins(dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """The function giving the bins (0 … 2^RANK_BITS − 1, in the values' order) of fp32 or
    fp64 values: their top `RANK_BITS` bits (fp32: the native passes' own, `ops.rank_bin`)."""
    if dtype == torch.float32:
        return lambda part: ops.rank_bin(part, RANK_BITS)
    shift, half = 64 - RANK_BITS, 1 << (RANK_BITS - 1)

    def bins(part: Tensor) -> Tensor:
        return (order_key(part) >> shift).to(torch.int64).add_(half)

    return bins


def bin_counts(bins: Callable[[Tensor], Tensor], values: Tensor, chunk: int = 1 << 20,
               into: Tensor | None = None) -> Tensor:
    """How many of `values` (flat) fall in each bin, added to `into` (default: new zeros):
    fp32 values by `ops.rank_counts` (one native pass on the CPU); fp64 values chunk by
    chunk, each counted over the span of bins it reaches (a tensor's values span a few
    thousand of the 2^RANK_BITS), not all of them."""
    counts = torch.zeros(1 << RANK_BITS, dtype=torch.int64) if into is None else into
    if values.dtype == torch.float32:
        return ops.rank_counts(values.reshape(-1), counts)
    for a in range(0, values.numel(), chunk):
        key = bins(values[a:a + chunk])
        lo, hi = int(key.min()), int(key.max())
        counts[lo:hi + 1] += torch.bincount(key.sub_(lo), minlength=hi - lo + 1)
    return counts


def mean_ranks(counts: Tensor, n: int) -> Tensor:
    """Each bin's mean percentile rank in [0, 1] among `n` values (its values tied)."""
    ends = counts.cumsum(0)
    return (2 * ends - counts - 1).double().div_(2 * (n - 1))


def _bin_means(parts: list[Tensor], n: int, chunk: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """For values binned by their top `RANK_BITS` bits: each bin's mean rank in [0, 1] (its
    values tied), and the function giving a tensor's bins."""
    bins = rank_bins(parts[0].dtype)
    counts = torch.zeros(1 << RANK_BITS, dtype=torch.int64)
    for t in parts:
        bin_counts(bins, t, chunk, into=counts)
    return mean_ranks(counts, n), bins


def _binned_rank(parts: list[Tensor], into: Tensor | None = None, chunk: int = 1 << 20) -> Tensor:
    """`_percentile_rank` of the concatenated `parts` with values binned (see above), added
    into `into` when given (no second buffer), without a copy of the values."""
    parts = [t.reshape(-1) if t.dtype in (torch.float32, torch.float64) else t.reshape(-1).double() for t in parts]
    if len({t.dtype for t in parts}) > 1:
        parts = [t.double() for t in parts]
    n = sum(t.numel() for t in parts)
    mean, bins = _bin_means(parts, n, chunk)
    out = torch.zeros(n, dtype=torch.float64) if into is None else into
    start = 0
    for t in parts:
        for a in range(0, t.numel(), chunk):
            part = t[a:a + chunk]
            out[start + a:start + a + part.numel()] += mean[bins(part)]
        start += t.numel()
    return out


def _percentile_rank(x: Tensor) -> Tensor:
    """Rank of each value in [0, 1] (ties share their mean rank), fp64.

    One sort: each run of equal values, positions [lo, hi) of the sorted order, gets its
    mean position (lo + hi − 1)/2, exactly the number averaging the positions gives, and
    it is scattered back to the run's elements. Binned above `EXACT_RANKS_UP_TO` values."""
    n = x.numel()
    if n <= 1:
        return torch.ones(x.shape, dtype=torch.float64)
    if n > EXACT_RANKS_UP_TO:
        return _binned_rank([x])
    keys = order_key(x.double() if x.dtype not in (torch.float32, torch.float64) else x)
    ordered, order = torch.sort(keys)
    del keys
    counts = torch.unique_consecutive(ordered, return_counts=True)[1]
    del ordered
    ends = counts.cumsum(0)
    mean = (2 * ends - counts - 1).double().div_(2).repeat_interleave(counts)
    del ends, counts
    out = torch.empty(n, dtype=torch.float64).index_copy_(0, order, mean)
    return out.div_(n - 1)


def _normalised(x: Tensor, how: str) -> Tensor:
    if how == "rank":
        return _percentile_rank(x)
    m = x.max() if x.numel() else x.new_tensor(0.0)
    return x / m if m > 0 else torch.zeros_like(x)


def importance(sum_sq: list[Tensor], fisher: list[Tensor], cfg: SelectConfig) -> Tensor:
    """Importance per block, over the blocks of the given tensors in order, from their
    Σ Δ² (its square root is the L2 score) and Σ F. Ranks need only the order, which the
    square root keeps, so "rank" never forms it; past `EXACT_RANKS_UP_TO` blocks the ranks
    are binned and summed in place, with no copy of the sums."""
    n = sum(t.numel() for t in sum_sq)
    if cfg.importance == "rank" and n > EXACT_RANKS_UP_TO:
        return _binned_rank(fisher, into=_binned_rank(sum_sq)).mul_(0.5)
    sum_sq, fisher = torch.cat(sum_sq), torch.cat(fisher)
    if cfg.importance == "rank":  # 0.5·(r1 + r2), made in place (one fp64 per block)
        return _percentile_rank(sum_sq).add_(_percentile_rank(fisher)).mul_(0.5)
    l2 = sum_sq.double().sqrt()
    if cfg.importance == "l2":
        return _normalised(l2, "max")
    if cfg.importance == "fisher":
        return _normalised(fisher.double(), "max")
    a, b = _normalised(l2, "max"), _normalised(fisher.double(), "max")
    if cfg.importance == "product":
        return a * b
    return cfg.weights[0] * a + cfg.weights[1] * b
