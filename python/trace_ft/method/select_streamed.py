"""Element-level selection of a large model in bounded memory: `select_core`'s core, bit
for bit, without holding a score per element.

Past `EXACT_RANKS_UP_TO` blocks the materialised path keeps, beside the probe's Δ and
Fisher, fp32 block sums (8 bytes per element at element level), a max cosine (4) and an
fp64 score (8): 20 bytes per eligible element, 2 GB for SmolLM2-135M and 160 GB at 8B.
Every score is a function of one tensor's Δ, Fisher and earlier updates and of two rank
tables (2^RANK_BITS bins each), so here it is computed tensor by tensor instead of kept:
1. histograms of the binned Σ Δ² and Σ F, giving each bin's mean percentile rank;
2. the scores, of which only those that can still be among the k largest are kept
   (`_TopScores`: at most 2k and one tensor's, with their positions); the k-th largest of
   those is the threshold, and the chosen blocks are those above it, then the first of
   those equal to it in tensor order.
Beyond Δ and Fisher it holds one tensor's temporaries, the chosen blocks' flags and at most
2k candidates (16 bytes each: a 5 % core of 106M elements, 170 MB at most).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from trace_kernels import CoreMask, ops
from trace_kernels.sharding import is_dtensor

from .probe import ProbeResult
from .select import (EXACT_RANKS_UP_TO, RANK_BITS, EarlierTask, Selection, SelectConfig, _earlier_core_blocks, _stats,
                     bin_counts, blocks_in_budget, exclude_blocks, mean_ranks, rank_bins)
from .sketch import BlockSketch, sketch_cosine


def streamable(probe: ProbeResult, earlier: Sequence[EarlierTask], sizes: dict[str, int],
               cfg: SelectConfig) -> bool:
    """Whether `select_core` takes this path: the trace rule at element level with percentile
    ranks and a budget over all tensors, past `EXACT_RANKS_UP_TO` blocks, unsharded."""
    return (cfg.method == "trace" and cfg.importance == "rank" and cfg.normalize == "global"
            and cfg.scope == "global" and all(b == 1 for b in sizes.values())
            and sum(d.numel() for d in probe.deltas.values()) > EXACT_RANKS_UP_TO
            and not any(is_dtensor(d) for d in probe.deltas.values())
            and not any(t.has_sharded() for t in earlier))


class _Scorer:
    """The final score of each element of one tensor at a time, as `_trace_scores` makes it
    on the whole model (same operations, same order, same dtypes)."""

    def __init__(self, probe: ProbeResult, earlier: Sequence[EarlierTask], unit_sizes: dict[str, int],
                 cfg: SelectConfig) -> None:
        self.probe, self.earlier, self.units, self.cfg = probe, earlier, unit_sizes, cfg
        self.names = probe.names
        self.exact = [t for t in earlier if t.has_exact()]
        self._unit_cos: dict[str, Tensor | None] = {}   # per-unit max cosines of coarse units
        # pass 1: the two rank tables (and the new task's Fisher total for the guard)
        self.n = sum(d.numel() for d in probe.deltas.values())
        self.bins32 = rank_bins(torch.float32)
        sq_counts = torch.zeros(1 << RANK_BITS, dtype=torch.int64)
        f_counts = torch.zeros_like(sq_counts)
        new_total = 0.0
        for name in self.names:
            sum_sq, fisher = self._sums(name)
            bin_counts(self.bins32, sum_sq, into=sq_counts)
            bin_counts(self.bins32, fisher, into=f_counts)
            new_total += float(fisher.double().sum())
        self.sq_ranks, self.f_ranks = mean_ranks(sq_counts, self.n), mean_ranks(f_counts, self.n)
        self.new_total = new_total or 1.0
        self.old_totals = self._old_fisher_totals() if cfg.protect > 0 else []

    def _sums(self, name: str) -> tuple[Tensor, Tensor]:
        """Σ Δ² and Σ F per element, fp32, as delta_stats gives them."""
        d, f = self.probe.deltas[name], self.probe.fisher[name]
        s = _stats([d], [f], None, [1], [name])[0]
        return s[0], s[1]

    def _old_fisher_totals(self) -> list[float | None]:
        """Each earlier task's Fisher total over the tensors (None: it kept no Fisher)."""
        out = []
        for task in self.earlier:
            if not task.fisher:
                out.append(None)
                continue
            total = 0.0
            for name in self.names:
                f = task.fisher.get(name)
                if f is not None:
                    self._check_fisher(name, f)
                    total += float(f.detach().reshape(-1, 1).double().sum(1).sum())
            out.append(total or 1.0)
        return out

    def _check_fisher(self, name: str, f: Tensor) -> None:
        if f.numel() != self.probe.deltas[name].numel():
            raise ValueError(f"earlier Fisher of {name!r} has {f.numel()} elements, the parameter "
                             f"has {self.probe.deltas[name].numel()}")

    def _ref(self, task: EarlierTask, name: str) -> Tensor:
        d = self.probe.deltas[name]
        u = task.updates.get(name)
        if isinstance(u, Tensor):
            if u.numel() != d.numel():
                raise ValueError(f"earlier update of {name!r} has {u.numel()} elements, "
                                 f"the parameter has {d.numel()}")
            return u.reshape(-1).to(d.device).contiguous()
        return torch.zeros(d.numel(), dtype=d.dtype, device=d.device)

    def cosine(self, name: str) -> Tensor | None:
        """The max cosine with earlier tasks per element (fp32; None: no earlier update)."""
        unit = self.units[name]
        if unit > 1 and name in self._unit_cos:
            cos = self._unit_cos[name]
        else:
            cos = self._unit_cosine(name)
            if unit > 1:  # one value per row or tensor: small enough to keep for later passes
                self._unit_cos[name] = cos
        return None if cos is None else (cos if unit == 1 else cos.repeat_interleave(unit, 0))

    def _unit_cosine(self, name: str) -> Tensor | None:
        d, unit = self.probe.deltas[name], self.units[name]
        best = None
        for g0 in range(0, len(self.exact), ops.MAX_REFS):
            refs = [self._ref(t, name) for t in self.exact[g0:g0 + ops.MAX_REFS]]
            ss, _, dots, ref_sq = (t.double() for t in _stats([d], None, [refs], [unit], [name])[0])
            denom = (ss.unsqueeze(1) * ref_sq).sqrt()
            cos = torch.where(denom > 0, dots / denom.clamp_min(1e-300), torch.zeros_like(denom)).float()
            best = cos.max(1).values if best is None else torch.maximum(best, cos.max(1).values)
        for task in self.earlier:
            u = task.updates.get(name)
            if isinstance(u, BlockSketch):
                if u.block_size != unit:
                    raise ValueError(f"sketch of {name!r} has block size {u.block_size}, specificity "
                                     f"uses {unit}")
                cos = sketch_cosine(d, name, u).double().float()
                best = cos if best is None else torch.maximum(best, cos)
        return best

    def scores(self, name: str) -> tuple[Tensor, dict]:
        """The tensor's final scores (fp64, -inf: excluded) and its report numbers."""
        cfg = self.cfg
        sum_sq, fisher = self._sums(name)
        s = self.sq_ranks[self.bins32(sum_sq)]
        s += self.f_ranks[self.bins32(fisher)]
        s.mul_(0.5)
        if cfg.protect > 0:
            s.mul_(self._guard(name, fisher))
        spec = self.cosine(name)
        hit = None if cfg.share_earlier_cores else _earlier_core_blocks(
            self.earlier, name, self.probe.deltas[name].shape, 1)
        info = exclude_blocks(s, spec, hit, cfg)
        empty = not sum_sq.numel()
        info |= {"mean_l2": 0.0 if empty else float(sum_sq.double().sqrt().mean()),
                 "mean_fisher": 0.0 if empty else float(fisher.double().mean()),
                 "mean_specificity": 0.0 if empty or spec is None else float(spec.mean())}
        return s, info

    def _guard(self, name: str, fisher: Tensor) -> Tensor:
        """F_t / (F_t + protect·Σ_τ F_τ) per element, each task's Fisher over its total."""
        old = torch.zeros(fisher.numel(), dtype=torch.float64)
        for task, total in zip(self.earlier, self.old_totals):
            f = task.fisher.get(name) if total is not None else None
            if f is not None:
                self._check_fisher(name, f)
                old += f.detach().reshape(-1, 1).double().sum(1).cpu() / total
        mine = fisher.double() / self.new_total
        denom = mine + self.cfg.protect * old
        return torch.where(denom > 0, mine / denom.clamp_min(1e-300), torch.ones_like(mine))


class _TopScores:
    """The scores that can still be among the k largest, with their positions, kept in scan
    order: each tensor's scores at or above a floor are added, and once more than 2k are
    kept the floor rises to the k-th largest kept (no score below it can be among the k
    largest of all) and those below it go. At most 2k plus one tensor's are held."""

    def __init__(self, k: int) -> None:
        self.k, self.floor = k, -math.inf
        self.where: list[tuple[str, Tensor]] = []   # (tensor, its kept indices)
        self.values: list[Tensor] = []

    def add(self, name: str, s: Tensor) -> int:
        """Keep `s`'s candidates; returns how many of its scores are finite."""
        finite = torch.isfinite(s)
        count = int(torch.count_nonzero(finite))
        if self.k == 0:
            return count
        keep = finite.logical_and_(s >= self.floor)
        idx = torch.nonzero(keep).reshape(-1)
        self.where.append((name, idx))
        self.values.append(s[idx])
        if sum(v.numel() for v in self.values) > 2 * self.k:
            allv = torch.cat(self.values)
            self.floor = float(torch.kthvalue(allv, allv.numel() - self.k + 1).values)
            del allv
            for i, v in enumerate(self.values):
                up = v >= self.floor
                self.where[i] = (self.where[i][0], self.where[i][1][up])
                self.values[i] = v[up]
        return count

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


def select_streamed(probe: ProbeResult, earlier: Sequence[EarlierTask], unit_sizes: dict[str, int],
                    cfg: SelectConfig) -> Selection:
    """The core of `select_core` for a `streamable` selection (see the module doc);
    `Selection.scores` is empty (no score is kept)."""
    shapes = probe.shapes
    names = list(shapes)
    scorer = _Scorer(probe, earlier, unit_sizes, cfg)
    # pass 2: the scores, the report's numbers, and the candidates for the k largest
    budget = blocks_in_budget(1, cfg.budget * sum(math.prod(s) for s in shapes.values()))
    top = _TopScores(budget)
    finite_total, info = 0, {}
    for name in names:
        s, info[name] = scorer.scores(name)
        finite_total += top.add(name, s)
        del s
    k = min(budget, finite_total)
    picked = top.chosen(k) if k else {}
    chosen, report = {}, []
    for name in names:
        c = torch.zeros(math.prod(shapes[name]), dtype=torch.bool)
        idx, vals = picked.get(name, (None, None))
        if idx is not None:
            c[idx] = True
        r = info[name]
        report.append({"name": name, "block_size": 1, "blocks": int(c.numel()), "chosen": int(torch.count_nonzero(c)),
                       "mean_l2": r["mean_l2"], "mean_fisher": r["mean_fisher"],
                       # the chosen scores in index order, as s[c] gives them
                       "mean_score_chosen": float(vals.mean()) if idx is not None and idx.numel() else float("nan"),
                       "mean_specificity": r["mean_specificity"], "excluded_shared": r["shared"],
                       "excluded_earlier_core": r["earlier_core"]})
        chosen[name] = c
    mask = CoreMask.from_blocks({n: (shapes[n], 1, chosen[n]) for n in names})
    return Selection(mask=mask, report=report, scores={}, config=cfg)
