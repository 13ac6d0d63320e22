"""The budget: the highest-scoring blocks up to a number of elements, ties to the lower
index in tensor order. `take_budget` over scores held whole (a threshold by the k-th largest,
no sort of the blocks); `TopScores` over scores seen one tensor at a time (the streamed
selection: only those that can still be among the k largest are kept)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from trace_kernels import ops

from . import ranks
from .ranks import RANK_BITS, order_key


def _finite(x: Tensor, chunk: int = 1 << 20) -> Tensor:
    """`torch.isfinite` in chunks (it makes full-size temporaries of a fp64 input)."""
    out = torch.empty(x.shape, dtype=torch.bool)
    for a in range(0, x.numel(), chunk):
        out[a:a + chunk] = torch.isfinite(x[a:a + chunk])
    return out


def _kth_largest(scores: Tensor, finite: Tensor, k: int, chunk: int = 1 << 20) -> Tensor:
    """The k-th largest of the finite scores, exactly. Above `EXACT_RANKS_UP_TO` scores
    without a copy of them: a histogram of their top bits finds the bin that holds it, and
    only that bin's scores are searched."""
    m = int(torch.count_nonzero(finite))
    if scores.numel() <= ranks.EXACT_RANKS_UP_TO:
        return torch.kthvalue(scores[finite], m - k + 1).values
    shift, half, n = 64 - RANK_BITS, 1 << (RANK_BITS - 1), scores.numel()
    counts = torch.zeros(1 << RANK_BITS, dtype=torch.int64)
    for a in range(0, n, chunk):
        part = scores[a:a + chunk][finite[a:a + chunk]].double()
        counts += torch.bincount((order_key(part) >> shift).add_(half), minlength=1 << RANK_BITS)
    above = counts.flip(0).cumsum(0).flip(0)          # scores in this bin or a higher one
    b = int(torch.nonzero(above >= k).reshape(-1)[-1])  # the highest bin with k at or above it
    need = k - (int(above[b + 1]) if b + 1 < above.numel() else 0)
    parts = []
    for a in range(0, n, chunk):
        part = scores[a:a + chunk][finite[a:a + chunk]].double()
        parts.append(part[(order_key(part) >> shift).add_(half) == b])
    cand = torch.cat(parts)
    return torch.kthvalue(cand, cand.numel() - need + 1).values.to(scores.dtype)


def blocks_in_budget(block_elems: int, budget_elems: float) -> int:
    """The most blocks of `block_elems` elements with k·size ≤ budget, exactly."""
    k = int(budget_elems // block_elems)
    while block_elems * (k + 1) <= budget_elems:
        k += 1
    while k > 0 and block_elems * k > budget_elems:
        k -= 1
    return k


def take_budget(scores: Tensor, block_elems: Tensor | int, budget_elems: float) -> Tensor:
    """Bool per block: highest scores first (ties: the lower index first) while the element
    budget lasts (finite scores only). `block_elems`: elements per block, one number when
    every block has the same size (then the top k by a threshold, with no sort of the
    blocks: an element-level selection has a block per element)."""
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    if budget_elems <= 0:
        return chosen
    finite = _finite(scores)
    m = int(torch.count_nonzero(finite))  # (a bool sum would make an int64 copy first)
    if m == 0:
        return chosen
    if isinstance(block_elems, int):
        k = min(blocks_in_budget(block_elems, budget_elems), m)
        if k == 0:
            return chosen
        if k == m:
            return finite
        t = _kth_largest(scores, finite, k)
        chosen = scores > t
        ties = torch.nonzero(scores == t).reshape(-1)
        chosen[ties[:k - int(torch.count_nonzero(chosen))]] = True
        return chosen
    cand = torch.nonzero(finite).reshape(-1)
    order = cand[torch.argsort(scores[cand], descending=True, stable=True)]
    used = torch.cumsum(block_elems[order], 0)
    chosen[order[used <= budget_elems]] = True
    return chosen


class TopScores:
    """The scores that can still be among the k largest, with their positions, kept in scan
    order: each tensor's scores at or above a floor are added, and once more than 2k are
    kept the floor rises (no score below it can be among the k largest of all) and those
    below it go. At most 2k plus one tensor's are held (more only where many scores share
    the floor's fp32 bin).

    The floor comes from a histogram of the kept scores' fp32 bins (`ops.rank_counts`), not
    a selection over them: the lowest bin edge with at least k kept scores at or above it,
    less one fp32 step (a double that rounds into a bin is above the fp32 value below the
    bin's edge). It is at most the k-th largest kept score, so it drops nothing that can be
    chosen; the exact k-th largest is found once, at the end (`chosen`)."""

    def __init__(self, k: int) -> None:
        self.k, self.floor = k, -math.inf
        self.where: list[tuple[str, Tensor]] = []   # (tensor, its kept indices)
        self.values: list[Tensor] = []
        # kept scores per fp32 bin (a bin's count is zeroed when the floor passes it)
        self.counts = torch.zeros(1 << RANK_BITS if k else 1, dtype=torch.int64)

    def add(self, name: str, idx: Tensor, values: Tensor, finite: int) -> int:
        """Keep a tensor's finite scores at or above `floor`, `values` at positions `idx`
        (increasing; `trace_kernels.ops.rank_scores` gives them so); returns `finite`, how
        many of its scores are finite."""
        if self.k == 0:
            return finite
        self.where.append((name, idx))
        self.values.append(values)
        ops.rank_counts(values.float(), self.counts)
        if sum(v.numel() for v in self.values) > 2 * self.k:
            self._raise_floor()
        return finite

    def _raise_floor(self) -> None:
        at_or_above = self.counts.flip(0).cumsum(0).flip(0)
        b = int(torch.nonzero(at_or_above >= self.k).reshape(-1)[-1])  # the highest such bin
        key = (b - (1 << (RANK_BITS - 1))) << (32 - RANK_BITS)           # its lowest order key
        edge = torch.tensor([key if key >= 0 else key ^ 0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
        below = torch.nextafter(edge, edge.new_tensor([-math.inf]))
        if not torch.isfinite(below).all() or float(below) <= self.floor:
            return
        self.floor = float(below)
        self.counts[:b] = 0
        for i, v in enumerate(self.values):
            up = v >= self.floor
            self.where[i] = (self.where[i][0], self.where[i][1][up])
            self.values[i] = v[up]

    def chosen(self, k: int) -> dict[str, tuple[Tensor, Tensor]]:
        """Per tensor, the indices and scores of the k largest (all > t, then the first of
        those equal to the k-th largest t in scan order), in index order."""
        values = torch.cat(self.values) if self.values else torch.zeros(0, dtype=torch.float64)
        if k < values.numel():
            t = torch.kthvalue(values, values.numel() - k + 1).values
            ties = k - int(torch.count_nonzero(values > t))   # how many of those equal to t
            pick = values > t
            pick[torch.nonzero(values == t).reshape(-1)[:ties]] = True
        else:
            pick = torch.ones(values.numel(), dtype=torch.bool)
        out, at = {}, 0
        for (name, idx), v in zip(self.where, self.values):
            p = pick[at:at + v.numel()]
            out[name] = (idx[p], v[p])
            at += v.numel()
        return out
