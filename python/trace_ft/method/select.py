"""Core-parameter selection: importance and specificity per block, then a budget.

The default ("trace", METHOD.md):
- importance per block b: L2 = ‖Δ_b‖₂ and Fisher = Σ_{e∈b} F_e, combined scale-free as the
  mean of the two scores' percentile ranks over all eligible blocks (options: product or
  weighted sum of max-normalised scores, either score alone; ranks/maxima over all blocks
  or within each tensor);
- specificity: s_b = max over earlier tasks τ of cos(Δ_t,b, Δ_τ,b), from exact earlier
  updates or their sketches;
- the core: among blocks with s_b below `specificity_threshold` (rule "exclude"; or rule
  "downweight": importance × (1 − max(s_b, 0))) and not core for an earlier task (unless
  `share_earlier_cores`), the most important blocks up to `budget` of the eligible elements,
  globally or per tensor.

The "paper" method reproduces the authors' released selection: whole tensors, score
0.5·minmax(RMS of Δ) + 0.5·minmax(mean Fisher), the top `budget` (default 10 %) of tensors
ranked globally. "paper_specificity" is their separate specificity selector: tensors
ranked by mean cosine with earlier tasks' updates, least similar first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from trace_kernels import CoreMask, ops
from trace_kernels.masks import block_size_for
from trace_kernels.sharding import all_reduce_sum, is_dtensor, local_tensor, shard_layout

from .offload import TensorsOnDisk
from .probe import ProbeResult
from .sketch import BlockSketch, sketch_cosine

IMPORTANCE = ("rank", "product", "weighted", "l2", "fisher")
METHODS = ("trace", "paper", "paper_specificity")
SPECIFICITY_UNITS = ("block", "row", "tensor")
GRANULARITIES = ("element", "row", "tensor")


def specificity_size(shape: tuple[int, ...], block_size: int, unit: str) -> int:
    """Elements per specificity unit: the selection block, or the row or tensor holding it
    (never finer than the block, and always a whole number of blocks)."""
    if unit == "block":
        return block_size
    size = block_size_for(shape, unit)
    return size if size >= block_size and size % block_size == 0 else block_size


@dataclass(frozen=True)
class SelectConfig:
    method: str = "trace"
    budget: float = 0.05              # fraction of eligible elements (paper: of tensors)
    granularity: str | int = "element"  # "element", "row", "tensor" or a block size
    scope: str = "global"             # budget over all tensors, or "per_tensor"
    importance: str = "rank"
    weights: tuple[float, float] = (0.5, 0.5)   # (L2, Fisher) for "weighted"
    normalize: str = "global"         # ranks/maxima over all blocks, or "per_tensor"
    specificity_threshold: float = 0.5
    # Where the cosine is measured: "block" (each selection block) or a coarser unit whose
    # value every block inside it shares: "row" or "tensor". A one-element block's cosine
    # is only the sign agreement of two numbers (±1), so element-level selection needs a
    # coarser unit for specificity to mean anything.
    specificity_unit: str = "block"
    shared_rule: str = "exclude"      # or "downweight"
    share_earlier_cores: bool = False
    # Interference guard: weight importance by the share of each block's (normalised)
    # Fisher mass that belongs to the new task, F_t / (F_t + protect·Σ_τ F_τ), using the
    # earlier tasks' Fisher diagonals (EarlierTask.fisher). 0 turns it off.
    protect: float = 0.0

    def __post_init__(self) -> None:
        self.validate()  # (frozen: `replace` builds anew, so every variant is checked)

    @classmethod
    def paper(cls, budget: float = 0.10, specificity: bool = False) -> SelectConfig:
        return cls(method="paper_specificity" if specificity else "paper", budget=budget,
                   granularity="tensor")

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"budget must be a fraction in [0, 1], got {self.budget}")
        g = self.granularity
        if not (g in GRANULARITIES or (isinstance(g, int) and not isinstance(g, bool) and g >= 1)):
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)} or a block "
                             f"size >= 1, got {g!r}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {IMPORTANCE}, got {self.importance!r}")
        if self.scope not in ("global", "per_tensor"):
            raise ValueError(f"scope must be 'global' or 'per_tensor', got {self.scope!r}")
        if self.normalize not in ("global", "per_tensor"):
            raise ValueError(f"normalize must be 'global' or 'per_tensor', got {self.normalize!r}")
        if self.specificity_unit not in SPECIFICITY_UNITS:
            raise ValueError(f"specificity_unit must be one of {SPECIFICITY_UNITS}, "
                             f"got {self.specificity_unit!r}")
        if self.shared_rule not in ("exclude", "downweight"):
            raise ValueError(f"shared_rule must be 'exclude' or 'downweight', got {self.shared_rule!r}")
        if not (math.isfinite(self.protect) and self.protect >= 0):
            raise ValueError(f"protect must be >= 0 and finite, got {self.protect}")
        if not math.isfinite(self.specificity_threshold):  # NaN would silently exclude nothing
            raise ValueError(f"specificity_threshold must be a finite number, got {self.specificity_threshold}")
        if len(self.weights) != 2 or not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"weights must be two finite numbers, got {self.weights}")


@dataclass
class EarlierTask:
    """What selection needs of an earlier task: its updates (exact tensors or sketches, by
    parameter name), its core mask, and optionally its Fisher diagonal (by parameter name,
    any float dtype) for the interference guard (`SelectConfig.protect`)."""

    updates: Mapping[str, Tensor | BlockSketch] = field(default_factory=dict)
    core: CoreMask | None = None
    fisher: Mapping[str, Tensor] = field(default_factory=dict)

    def has_exact(self) -> bool:
        """Whether any update is an exact tensor (not a sketch); reads none from disk."""
        if isinstance(self.updates, TensorsOnDisk):
            return len(self.updates) > 0
        return any(isinstance(u, Tensor) for u in self.updates.values())

    def has_sharded(self) -> bool:
        """Whether any update is a DTensor (kept sharded like its parameter)."""
        return not isinstance(self.updates, TensorsOnDisk) and any(is_dtensor(u) for u in self.updates.values())


@dataclass
class Selection:
    mask: CoreMask
    report: list[dict]                 # one row per tensor
    scores: dict[str, Tensor]          # final per-block score per tensor (-inf: excluded);
                                       # empty for a large element-level selection (streamed)
    config: SelectConfig | None = None  # the settings it was made with

    def summary(self) -> str:
        lines = [f"{'tensor':40s} {'chosen':>8s} {'blocks':>8s} {'mean L2':>10s} "
                 f"{'mean F':>10s} {'spec':>6s} {'shared':>6s} {'earlier':>7s}"]
        for r in self.report:
            lines.append(
                f"{r['name'][:40]:40s} {r['chosen']:8d} {r['blocks']:8d} {r['mean_l2']:10.3e} "
                f"{r['mean_fisher']:10.3e} {r['mean_specificity']:6.2f} {r['excluded_shared']:6d} "
                f"{r['excluded_earlier_core']:7d}")
        lines.append(f"core: {self.mask.numel_selected:,} of {self.mask.numel:,} elements "
                     f"({self.mask.density:.2%})")
        return "\n".join(lines)


def _order_key(x: Tensor) -> Tensor:
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
    fp64 values: their top `RANK_BITS` bits."""
    width = 32 if dtype == torch.float32 else 64
    shift, half = width - RANK_BITS, 1 << (RANK_BITS - 1)

    def bins(part: Tensor) -> Tensor:
        return (_order_key(part) >> shift).to(torch.int64).add_(half)

    return bins


def bin_counts(bins: Callable[[Tensor], Tensor], values: Tensor, chunk: int = 1 << 20,
               into: Tensor | None = None) -> Tensor:
    """How many of `values` (flat) fall in each bin, added to `into` (default: new zeros).
    Each chunk is counted over the span of bins it reaches (a tensor's values span a few
    thousand of the 2^RANK_BITS), not all of them."""
    counts = torch.zeros(1 << RANK_BITS, dtype=torch.int64) if into is None else into
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
    keys = _order_key(x.double() if x.dtype not in (torch.float32, torch.float64) else x)
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


def _combine(sum_sq: list[Tensor], fisher: list[Tensor], cfg: SelectConfig) -> Tensor:
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


def _stats(deltas: list[Tensor], fishers: list[Tensor] | None, refs: list[list[Tensor]] | None,
           sizes: list[int], names: list[str]) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Per tensor and block: Σ d², Σ fisher, Σ d·ref and Σ ref²: the fp32 sums delta_stats
    gives (kept fp32: an element-level selection has a block per element; every use turns
    them to fp64 first, exactly). Plain tensors in one delta_stats pass; a sharded (FSDP2)
    tensor's blocks from its shard's partial sums, added over the ranks in fp64."""
    out: list = [None] * len(deltas)
    plain = [i for i, d in enumerate(deltas) if not is_dtensor(d)]
    if plain:
        s = ops.delta_stats([deltas[i].contiguous() for i in plain], None,
                            [fishers[i].reshape(-1).float().contiguous() for i in plain] if fishers else None,
                            [refs[i] for i in plain] if refs else None, [sizes[i] for i in plain])
        for k, i in enumerate(plain):
            rows = slice(s.row_offsets[k], s.row_offsets[k + 1])
            out[i] = (s.sum_sq[rows], s.fisher_sum[rows], s.dots[rows], s.ref_sq[rows])
    for i, d in enumerate(deltas):
        if out[i] is None:
            out[i] = _shard_stats(d, fishers[i] if fishers else None, refs[i] if refs else [],
                                  sizes[i], names[i])
    return out


def _shard_stats(d: Tensor, fisher: Tensor | None, refs: list[Tensor], B: int, name: str):
    """delta_stats of one sharded tensor: the rank's shard summed in sub-blocks that divide
    both the blocks and the shard's ends, folded into the global blocks it meets, then
    summed over the ranks. A block inside one shard is summed exactly as one process does;
    a block across a shard boundary is the sum of the ranks' fp32 partial sums."""
    shard = shard_layout(d, repr(name))
    lo, hi, nb, R = shard.lo, shard.hi, d.numel() // B, len(refs)
    out = [torch.zeros(nb, dtype=torch.float64), torch.zeros(nb, dtype=torch.float64),
           torch.zeros(nb, R, dtype=torch.float64), torch.zeros(nb, R, dtype=torch.float64)]
    n = hi - lo
    if n:
        b = math.gcd(B, math.gcd(lo, n))
        local = local_tensor(d).reshape(-1).contiguous()
        ref_local = [(local_tensor(r) if is_dtensor(r) else r.reshape(-1)[lo:hi]).reshape(-1).contiguous()
                     for r in refs]
        f = local_tensor(fisher).reshape(-1).float().contiguous() if fisher is not None else None
        s = ops.delta_stats([local], None, [f] if f is not None else None, [ref_local] if R else None, [b])
        where = (lo + torch.arange(n // b, dtype=torch.int64) * b) // B
        for acc, part in zip(out, s[:4]):
            acc.index_add_(0, where, part.double())
    for acc in out:
        all_reduce_sum(acc, d)
    return tuple(out)


def _chunks(numels: list[int], limit: int = 1 << 22) -> list[list[int]]:
    """Consecutive tensor indices in groups of at most `limit` elements (one tensor alone
    when it is larger), so per-element temporaries stay bounded whatever the model size."""
    out, cur, size = [], [], 0
    for i, n in enumerate(numels):
        if cur and size + n > limit:
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    return out + ([cur] if cur else [])


def _block_stats(probe: ProbeResult, sizes: dict[str, int], earlier: Sequence[EarlierTask],
                 spec_sizes: dict[str, int] | None = None, max_only: bool = False):
    """Per tensor: (sum_sq, fisher_sum, cos (blocks, tasks)) using delta_stats for exact
    earlier updates (16 at a time) and sketch space for sketched ones. Cosines are measured
    per specificity unit (`spec_sizes`, default the blocks) and given to every block in it.
    `max_only`: keep one cosine column, the maximum over the earlier tasks (all that the
    trace rule reads), instead of one per task."""
    spec_sizes = spec_sizes or sizes
    names = probe.names
    deltas = [probe.deltas[n] for n in names]
    fishers = [probe.fisher[n] for n in names]
    exact_tasks = [t for t in earlier if t.has_exact()]
    cos_cols: dict[str, list[Tensor]] = {n: [] for n in names}
    zeros: dict[str, Tensor] = {}

    def ref_for(task: EarlierTask, i: int) -> Tensor:
        u = task.updates.get(names[i])
        if isinstance(u, Tensor):
            if u.numel() != deltas[i].numel():
                raise ValueError(f"earlier update of {names[i]!r} has {u.numel()} elements, "
                                 f"the parameter has {deltas[i].numel()}")
            if is_dtensor(u):  # kept sharded like the parameter
                return u
            return u.reshape(-1).to(local_tensor(deltas[i]).device).contiguous()
        if names[i] not in zeros:  # no exact update of this tensor: no similarity
            zeros[names[i]] = torch.zeros(deltas[i].numel(), dtype=deltas[i].dtype,
                                          device=local_tensor(deltas[i]).device)
        return zeros[names[i]]

    block_sizes = [sizes[n] for n in names]
    unit_sizes = [spec_sizes[n] for n in names]
    stats = _stats(deltas, fishers, None, block_sizes, names)

    def per_block(cos: Tensor, i: int) -> Tensor:  # one row per unit → one row per block
        k = unit_sizes[i] // block_sizes[i]
        return cos if k == 1 else cos.repeat_interleave(k, 0)

    # past EXACT_RANKS_UP_TO blocks the (max) cosines are kept in fp32, like the binned ranks
    # a bounded-memory approximation (a cosine within 1e-7 of the threshold may flip)
    lean = max_only and sum(d.numel() // sizes[n] for n, d in zip(names, deltas)) > EXACT_RANKS_UP_TO

    def add(n: str, cos: Tensor) -> None:
        if lean:
            cos = cos.float()
        if max_only and cos_cols[n]:
            cos_cols[n] = [torch.maximum(cos_cols[n][0], cos.max(1, keepdim=True).values)]
        else:
            cos_cols[n].append(cos.max(1, keepdim=True).values if max_only else cos)

    for g0 in range(0, len(exact_tasks), ops.MAX_REFS):
        group = exact_tasks[g0:g0 + ops.MAX_REFS]
        for chunk in _chunks([d.numel() for d in deltas]):
            refs = [[ref_for(t, i) for t in group] for i in chunk]
            part = _stats([deltas[i] for i in chunk], None, refs, [unit_sizes[i] for i in chunk],
                          [names[i] for i in chunk])
            for i, stat in zip(chunk, part):
                ss, _, dots, ref_sq = (t.double() for t in stat)
                denom = (ss.unsqueeze(1) * ref_sq).sqrt()
                cos = torch.where(denom > 0, dots / denom.clamp_min(1e-300), torch.zeros_like(denom))
                del ss, dots, ref_sq, denom
                add(names[i], per_block(cos, i))
            del part, refs
    for task in earlier:
        for i, n in enumerate(names):
            u = task.updates.get(n)
            if isinstance(u, BlockSketch):
                if is_dtensor(deltas[i]):
                    raise ValueError(f"{n!r}: sketched earlier updates are not supported for a sharded "
                                     "selection yet; keep exact updates (sketch_dim None)")
                if u.block_size != unit_sizes[i]:
                    raise ValueError(f"sketch of {n!r} has block size {u.block_size}, specificity "
                                     f"uses {unit_sizes[i]}")
                add(n, per_block(sketch_cosine(deltas[i], n, u).double().unsqueeze(1), i))
    out = {}
    for i, n in enumerate(names):
        sum_sq, fisher_sum = stats[i][0], stats[i][1]
        cos = torch.cat(cos_cols[n], 1) if cos_cols[n] else torch.zeros(sum_sq.numel(), 0, dtype=torch.float64)
        out[n] = (sum_sq, fisher_sum, cos)
    return out


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
    if scores.numel() <= EXACT_RANKS_UP_TO:
        return torch.kthvalue(scores[finite], m - k + 1).values
    shift, half, n = 64 - RANK_BITS, 1 << (RANK_BITS - 1), scores.numel()
    counts = torch.zeros(1 << RANK_BITS, dtype=torch.int64)
    for a in range(0, n, chunk):
        part = scores[a:a + chunk][finite[a:a + chunk]].double()
        counts += torch.bincount((_order_key(part) >> shift).add_(half), minlength=1 << RANK_BITS)
    above = counts.flip(0).cumsum(0).flip(0)          # scores in this bin or a higher one
    b = int(torch.nonzero(above >= k).reshape(-1)[-1])  # the highest bin with k at or above it
    need = k - (int(above[b + 1]) if b + 1 < above.numel() else 0)
    parts = []
    for a in range(0, n, chunk):
        part = scores[a:a + chunk][finite[a:a + chunk]].double()
        parts.append(part[(_order_key(part) >> shift).add_(half) == b])
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


def _take_budget(scores: Tensor, block_elems: Tensor | int, budget_elems: float) -> Tensor:
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


def select_core(
    probe: ProbeResult,
    earlier: Sequence[EarlierTask] = (),
    config: SelectConfig | None = None,
    **overrides,
) -> Selection:
    """Choose the task's core blocks from a probe (see the module doc for the rules).

    `earlier` lists the earlier tasks (updates for specificity, cores for exclusion).
    Keyword overrides replace fields of `config`, e.g. ``select_core(r, budget=0.01)``.
    """
    cfg = replace(config or SelectConfig(), **overrides)
    shapes = probe.shapes
    if not shapes:
        raise ValueError("the probe result has no parameters")
    gran = "tensor" if cfg.method != "trace" else cfg.granularity
    sizes = {n: block_size_for(s, gran) for n, s in shapes.items()}
    for n, b in sizes.items():
        if math.prod(shapes[n]) % b:
            raise ValueError(f"block size {b} does not divide {n!r} of shape {shapes[n]}")
    units = {n: specificity_size(shapes[n], b, cfg.specificity_unit) for n, b in sizes.items()}
    from .select_streamed import select_streamed, streamable  # (it builds on this module)

    if streamable(probe, earlier, sizes, cfg):  # a large model's element level, in bounded memory
        return select_streamed(probe, earlier, units, cfg)
    stats = _block_stats(probe, sizes, earlier, units, max_only=cfg.method == "trace")
    names = list(shapes)
    if cfg.method == "trace":
        scores, info, flat = _trace_scores(stats, sizes, shapes, earlier, cfg)
    else:
        scores, info = _paper_scores(stats, shapes, cfg)
        flat = torch.cat([scores[n] for n in names])
    # what the report needs of the block sums, taken now so they go before the budget
    summary = {}
    for n in names:
        sum_sq, fisher, cos = stats[n]
        empty = not sum_sq.numel()
        summary[n] = {"mean_l2": 0.0 if empty else float(sum_sq.double().sqrt().mean()),
                      "mean_fisher": 0.0 if empty else float(fisher.double().mean()),
                      "mean_specificity": 0.0 if empty or not cos.shape[1] else float(cos.max(1).values.mean())}
    del stats
    if cfg.method != "trace":  # the paper's budget counts tensors
        k = max(1, round(cfg.budget * len(names))) if cfg.budget > 0 else 0
        chosen_flat = _take_budget(flat, 1, k)
        chosen = {n: chosen_flat[i:i + 1] for i, n in enumerate(names)}
    elif cfg.scope == "global":  # `flat`: every block's score, in name order
        total = sum(math.prod(s) for s in shapes.values())
        one_size = len({sizes[n] for n in names}) == 1
        elems = sizes[names[0]] if one_size else torch.cat(
            [torch.full((scores[n].numel(),), sizes[n], dtype=torch.float64) for n in names])
        chosen_flat = _take_budget(flat, elems, cfg.budget * total)
        chosen, start = {}, 0
        for n in names:
            chosen[n] = chosen_flat[start:start + scores[n].numel()]
            start += scores[n].numel()
    else:
        chosen = {n: _take_budget(scores[n], sizes[n], cfg.budget * math.prod(shapes[n])) for n in names}
    mask = CoreMask.from_blocks({n: (shapes[n], sizes[n], chosen[n]) for n in names})
    report = []
    for n in names:
        c = chosen[n]
        report.append({
            "name": n, "block_size": sizes[n], "blocks": int(c.numel()), "chosen": int(torch.count_nonzero(c)),
            "mean_l2": summary[n]["mean_l2"], "mean_fisher": summary[n]["mean_fisher"],
            "mean_score_chosen": float(scores[n][c].mean()) if c.any() else float("nan"),
            "mean_specificity": summary[n]["mean_specificity"],
            "excluded_shared": int(info[n]["shared"]),
            "excluded_earlier_core": int(info[n]["earlier_core"]),
        })
    return Selection(mask=mask, report=report, scores=scores, config=cfg)


def _earlier_core_blocks(earlier: Sequence[EarlierTask], name: str, shape, block_size: int) -> Tensor | None:
    hit = None
    for task in earlier:
        if task.core is None or name not in task.core:
            continue
        dense = task.core.to_dense(name).reshape(-1, block_size).any(1)
        hit = dense if hit is None else hit | dense
    return hit


def _trace_scores(stats, sizes, shapes, earlier, cfg: SelectConfig):
    """Per tensor, the final score of each block (-inf: excluded), as views of one flat
    fp64 buffer in name order (what the global budget reads; the scores are made in
    place, so an element-level selection holds one score per element)."""
    names = list(shapes)
    if cfg.normalize == "global":
        flat = _combine([stats[n][0] for n in names], [stats[n][1] for n in names], cfg)
    else:
        flat = torch.cat([_combine([stats[n][0]], [stats[n][1]], cfg) for n in names])
    scores, start = {}, 0
    for n in names:
        scores[n] = flat[start:start + stats[n][0].numel()]
        start += stats[n][0].numel()
    guard = _protection(stats, sizes, earlier, cfg) if cfg.protect > 0 else {}
    info = {}
    for n in names:
        s = scores[n]
        if n in guard:
            s.mul_(guard[n])
        cos = stats[n][2]
        hit = None if cfg.share_earlier_cores else _earlier_core_blocks(earlier, n, shapes[n], sizes[n])
        info[n] = exclude_blocks(s, cos.max(1).values if cos.shape[1] else None, hit, cfg)
    return scores, info, flat


def exclude_blocks(s: Tensor, spec: Tensor | None, hit: Tensor | None, cfg: SelectConfig) -> dict[str, int]:
    """The trace rule's exclusions, on scores `s` in place: blocks whose max cosine `spec`
    reaches the threshold (excluded, or down-weighted), and blocks core for an earlier
    task (`hit`); how many of each the report counts."""
    shared = torch.zeros(s.numel(), dtype=torch.bool)
    if spec is not None:
        shared = spec >= cfg.specificity_threshold
        if cfg.shared_rule == "exclude":
            s[shared] = -math.inf
        else:
            s.mul_(1 - spec.clamp_min(0))
    core_hit = torch.zeros(s.numel(), dtype=torch.bool)
    if hit is not None:
        core_hit = hit
        s[hit] = -math.inf
    return {"shared": int((shared & ~core_hit).sum()) if cfg.shared_rule == "exclude" else 0,
            "earlier_core": int(core_hit.sum())}


def _protection(stats, sizes, earlier: Sequence[EarlierTask], cfg: SelectConfig) -> dict[str, Tensor]:
    """Per block, the share of Fisher mass that is the new task's: F_t / (F_t + protect·F_old),
    each task's Fisher normalised to unit total so tasks with larger losses do not dominate.
    At first order a converged earlier task loses ½·Δᵀ F_τ Δ, so blocks where earlier tasks
    are sensitive are the ones whose training makes them forget."""
    names = list(sizes)
    new_total = sum(float(stats[n][1].double().sum()) for n in names) or 1.0
    old = {n: torch.zeros(stats[n][1].shape, dtype=torch.float64) for n in names}
    for task in earlier:
        if not task.fisher:
            continue
        sums = {}
        for n in names:
            f = task.fisher.get(n)
            if f is None:
                continue
            if f.numel() != stats[n][1].numel() * sizes[n]:
                raise ValueError(f"earlier Fisher of {n!r} has {f.numel()} elements, the parameter "
                                 f"has {stats[n][1].numel() * sizes[n]}")
            if is_dtensor(f):  # sharded like the parameter: block sums over the ranks
                sums[n] = _stats([f], [f], None, [sizes[n]], [n])[0][1].double()
            else:
                sums[n] = f.detach().reshape(-1, sizes[n]).double().sum(1).cpu()
        total = sum(float(v.sum()) for v in sums.values()) or 1.0
        for n, v in sums.items():
            old[n] += v / total
    out = {}
    for n in names:
        mine = stats[n][1].double() / new_total
        denom = mine + cfg.protect * old[n]
        out[n] = torch.where(denom > 0, mine / denom.clamp_min(1e-300), torch.ones_like(mine))
    return out


def _paper_scores(stats, shapes, cfg: SelectConfig):
    """Whole tensors: minmax(RMS Δ) and minmax(mean Fisher), 0.5 each; or, for the
    specificity selector, minus the mean cosine with earlier tasks (least similar first)."""
    names = list(shapes)
    numel = torch.tensor([max(math.prod(shapes[n]), 1) for n in names], dtype=torch.float64)
    if cfg.method == "paper_specificity":
        cos = [stats[n][2] for n in names]
        if not any(c.numel() for c in cos):
            raise ValueError("paper_specificity needs earlier tasks' updates")
        flat = -torch.stack([c.mean() if c.numel() else torch.tensor(0.0, dtype=torch.float64) for c in cos])
    else:
        rms = torch.stack([stats[n][0].double().sum() for n in names]).div(numel).sqrt()
        mean_f = torch.stack([stats[n][1].double().sum() for n in names]).div(numel)

        def minmax(x):
            span = x.max() - x.min()
            return (x - x.min()) / span if span > 0 else torch.zeros_like(x)

        flat = 0.5 * minmax(rms) + 0.5 * minmax(mean_f)
    scores = {n: flat[i:i + 1] for i, n in enumerate(names)}
    return scores, {n: {"shared": 0, "earlier_core": 0} for n in names}
