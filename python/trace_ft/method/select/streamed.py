"""Element-level selection of a large model in bounded memory: `select_core`'s core and
report, bit for bit, without holding a score per element.

Past `EXACT_RANKS_UP_TO` blocks the materialised driver would keep, beside the probe's Δ and
Fisher, fp32 block sums (8 bytes per element at element level) and an fp64 score (8): 2 GB
for SmolLM2-135M, 160 GB at 8B. Every score is a function of one tensor's Δ, Fisher and
earlier updates and of two rank tables (2^RANK_BITS bins each), so here it is computed
tensor by tensor through the same scorer (`scorer.TensorScorer`) instead of kept:
1. histograms of the binned Σ Δ² and Σ F, giving each bin's mean percentile rank;
2. the scores, by one native pass per tensor (`trace_kernels.ops.rank_scores`: the rank
   lookups, the guard's and the down-weighting's factors, the exclusions), of which only
   those that can still be among the k largest come back and are kept
   (`budget.TopScores`: at most 2k and one tensor's, with their positions); the k-th
   largest of those is the threshold, and the chosen blocks are those above it, then the
   first of those equal to it in tensor order.
Beyond Δ and Fisher it holds one tensor's temporaries, the chosen blocks' flags and at most
2k candidates (16 bytes each: a 5 % core of 106M elements, 170 MB at most).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from trace_kernels import CoreMask, ops
from trace_kernels.sharding import is_dtensor

from ..probe import ProbeResult
from .budget import TopScores, blocks_in_budget
from .config import EarlierTask, Selection, SelectConfig
from . import ranks
from .ranks import RANK_BITS, bin_counts, mean_ranks, rank_bins
from .scorer import FisherGuard, TensorScorer, report_row, tensor_summary


def streamable(probe: ProbeResult, earlier: Sequence[EarlierTask], sizes: dict[str, int],
               cfg: SelectConfig) -> bool:
    """Whether `select_core` takes this path: the trace rule at element level with percentile
    ranks and a budget over all tensors, past `EXACT_RANKS_UP_TO` blocks, unsharded."""
    return (cfg.method == "trace" and cfg.importance == "rank" and cfg.normalize == "global"
            and cfg.scope == "global" and all(b == 1 for b in sizes.values())
            and sum(d.numel() for d in probe.deltas.values()) > ranks.EXACT_RANKS_UP_TO
            and not any(is_dtensor(d) for d in probe.deltas.values())
            and not any(t.has_sharded() for t in earlier))


def select_streamed(probe: ProbeResult, earlier: Sequence[EarlierTask], sizes: dict[str, int],
                    units: dict[str, int], cfg: SelectConfig) -> Selection:
    """The core of `select_core` for a `streamable` selection (see the module doc);
    `Selection.scores` is empty (no score is kept)."""
    shapes = probe.shapes
    names = list(shapes)
    scorer = TensorScorer(probe, earlier, sizes, units, cfg, torch.float32)
    # pass 1: the two rank tables (and the new task's Fisher total for the guard)
    n = sum(d.numel() for d in probe.deltas.values())
    bins = rank_bins(torch.float32)
    sq_counts = torch.zeros(1 << RANK_BITS, dtype=torch.int64)
    f_counts = torch.zeros_like(sq_counts)
    new_total = 0.0
    for name in names:
        sum_sq, fisher = scorer.sums(name)
        bin_counts(bins, sum_sq, into=sq_counts)
        bin_counts(bins, fisher, into=f_counts)
        new_total += float(fisher.double().sum())
    sq_ranks, f_ranks = mean_ranks(sq_counts, n), mean_ranks(f_counts, n)
    guard = FisherGuard(earlier, names, sizes, {m: math.prod(shapes[m]) for m in names}, cfg.protect,
                        new_total) if cfg.protect > 0 else None
    # pass 2: the scores, the report's numbers, and the candidates for the k largest
    budget = blocks_in_budget(1, cfg.budget * sum(math.prod(s) for s in shapes.values()))
    top = TopScores(budget)
    finite_total, info, summary = 0, {}, {}
    for name in names:
        sum_sq, fisher = scorer.sums(name)
        factors = [guard.factor(name, fisher)] if guard is not None else []
        spec = scorer.cosines(name)
        excluded, down, info[name] = scorer.exclusions(name, spec)
        if down is not None:
            factors.append(down.double())
        found = ops.rank_scores(sum_sq, fisher, sq_ranks, f_ranks, factors=tuple(factors), excluded=excluded,
                                floor=top.floor)
        summary[name] = tensor_summary(sum_sq, fisher, spec)
        finite_total += top.add(name, found.index, found.value, found.finite)
        del found, spec, excluded, factors
    k = min(budget, finite_total)
    picked = top.chosen(k) if k else {}
    chosen, report = {}, []
    for name in names:
        c = torch.zeros(math.prod(shapes[name]), dtype=torch.bool)
        idx, vals = picked.get(name, (None, torch.zeros(0, dtype=torch.float64)))
        if idx is not None:
            c[idx] = True
        # (the chosen scores in index order, as s[c] gives them)
        report.append(report_row(name, 1, c, vals, summary[name], info[name]))
        chosen[name] = c
    mask = CoreMask.from_blocks({m: (shapes[m], 1, chosen[m]) for m in names})
    return Selection(mask=mask, report=report, scores={}, config=cfg)
