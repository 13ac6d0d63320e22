"""`rank_scores`: importance from two binned percentile-rank tables, element by element, with
only the scores that can still be chosen kept.

An element-level selection of a real model scores every weight (106M for SmolLM2-135M,
billions at 8B): each score is the mean of two ranks looked up by the top bits of two
values (Σ Δ² and Σ F), scaled by per-element factors and set to -inf where excluded; of
those, only the ones at or above a floor (the running k-th largest) are candidates. Done
with torch ops this is a dozen element-sized temporaries per tensor; the native kernel
reads each input once and writes only the candidates.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .. import backends
from ._checks import check_float32

# the rank tables' index width, at most (a table has 2^bits fp64 entries)
MAX_RANK_BITS = 24


class RankScores(NamedTuple):
    finite: int      # how many scores are finite
    index: Tensor    # int64 positions of the finite scores >= floor, increasing
    value: Tensor    # their scores (fp64)


def rank_bin(values: Tensor, bits: int) -> Tensor:
    """The bins (0 … 2^bits − 1, in the values' order) of fp32 `values`: the top `bits` bits
    of their order key (the float's bits, negative values mirrored, -0 as +0)."""
    key = (values + 0.0).view(torch.int32)
    key = torch.where(key < 0, key ^ torch.iinfo(torch.int32).max, key)
    return (key >> (32 - bits)).to(torch.int64).add_(1 << (bits - 1))


def rank_scores(x: Tensor, y: Tensor, x_ranks: Tensor, y_ranks: Tensor, *,
                factors: tuple[Tensor, ...] = (), excluded: Tensor | None = None,
                floor: float = -math.inf, backend: str | None = None) -> RankScores:
    """Per element i of 1-D fp32 `x` and `y`: s = (x_ranks[bin(x[i])] + y_ranks[bin(y[i])]) · 0.5,
    multiplied by each of `factors` (fp64, one value per element) in order, -inf where the
    bool `excluded` is set; returns how many s are finite and the positions and values of
    the finite s ≥ `floor`. `x_ranks`, `y_ranks`: fp64 tables of 2^bits entries (bits ≤
    `MAX_RANK_BITS`); `bin` is `rank_bin`. Exactly the torch ops' bits on every backend."""
    op = "rank_scores"
    check_float32(op, "x", x, 1)
    check_float32(op, "y", y, 1)
    n, device = x.numel(), x.device
    if y.numel() != n or y.device != device:
        raise ValueError(f"{op}: y has {y.numel()} elements on {y.device}, x {n} on {device}")
    for name, t in (("x_ranks", x_ranks), ("y_ranks", y_ranks)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype != torch.float64 or t.device != device:
            raise ValueError(f"{op}: {name} must be a 1-D float64 tensor on {device}")
    bits = x_ranks.numel().bit_length() - 1
    if x_ranks.numel() != 1 << bits or not 1 <= bits <= MAX_RANK_BITS or y_ranks.numel() != x_ranks.numel():
        raise ValueError(f"{op}: x_ranks and y_ranks must both hold 2^bits entries, 1 <= bits <= "
                         f"{MAX_RANK_BITS}; got {x_ranks.numel()} and {y_ranks.numel()}")
    if len(factors) > 2:
        raise ValueError(f"{op}: at most 2 factors, got {len(factors)}")
    for i, f in enumerate(factors):
        if not isinstance(f, Tensor) or f.dtype != torch.float64 or f.numel() != n or f.device != device:
            raise ValueError(f"{op}: factors[{i}] must be a float64 tensor of {n} elements on {device}")
    if excluded is not None and (not isinstance(excluded, Tensor) or excluded.dtype != torch.bool
                                 or excluded.numel() != n or excluded.device != device):
        raise ValueError(f"{op}: excluded must be a bool tensor of {n} elements on {device}")
    if not isinstance(floor, (int, float)) or math.isnan(floor):
        raise ValueError(f"{op}: floor must be a number, got {floor!r}")
    name = backends.choose(device, backend).name
    return backends.kernel(op, name)(x.contiguous(), y.contiguous(), x_ranks.contiguous(),
                                     y_ranks.contiguous(), bits,
                                     tuple(f.reshape(-1).contiguous() for f in factors),
                                     None if excluded is None else excluded.reshape(-1).contiguous(),
                                     float(floor))


def rank_counts(x: Tensor, counts: Tensor, *, backend: str | None = None) -> Tensor:
    """Add to int64 `counts` (2^bits entries, bits ≤ `MAX_RANK_BITS`) how many of 1-D fp32 `x`
    fall in each bin (`rank_bin`); returns `counts`. The histogram binned ranks are made of."""
    op = "rank_counts"
    check_float32(op, "x", x, 1)
    bits = counts.numel().bit_length() - 1 if isinstance(counts, Tensor) else 0
    if (not isinstance(counts, Tensor) or counts.dtype != torch.int64 or counts.dim() != 1
            or counts.numel() != 1 << bits or not 1 <= bits <= MAX_RANK_BITS or not counts.is_contiguous()
            or counts.device != x.device):
        raise ValueError(f"{op}: counts must be a contiguous 1-D int64 tensor of 2^bits entries, 1 <= bits "
                         f"<= {MAX_RANK_BITS}, on {x.device}")
    name = backends.choose(x.device, backend).name
    backends.kernel(op, name)(x.contiguous(), bits, counts)
    return counts
