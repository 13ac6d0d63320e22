"""What selection computes of each tensor, written once for both drivers (the materialised
`select_core` and the streamed `select_streamed`): its block sums, its cosine with earlier
tasks' updates per specificity unit, the interference guard's factor, the trace rule's
exclusions, and its row of the report."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from trace_kernels import ops
from trace_kernels.sharding import is_dtensor, local_tensor

from ..probe import ProbeResult
from ..sketch import BlockSketch, sketch_cosine
from .config import EarlierTask, SelectConfig
from .stats import block_stats


class TensorScorer:
    """Per tensor of a probe, against the earlier tasks: `sums`, `cosines`, `exclude`.
    `cos_dtype`: the dtype cosines are compared in (fp32 where a selection past 2^24 blocks
    keeps them, as the streamed path does; else fp64)."""

    def __init__(self, probe: ProbeResult, earlier: Sequence[EarlierTask], sizes: dict[str, int],
                 units: dict[str, int], cfg: SelectConfig, cos_dtype: torch.dtype = torch.float64) -> None:
        self.probe, self.earlier, self.sizes, self.units, self.cfg = probe, earlier, sizes, units, cfg
        self.exact = [t for t in earlier if t.has_exact()]
        self.cos_dtype = cos_dtype

    def sums(self, name: str) -> tuple[Tensor, Tensor]:
        """Σ Δ² and Σ F per block (fp32 as delta_stats gives them; fp64 when sharded), on
        the CPU: whatever device the probe ran on, the selection's per-block work is here."""
        s = block_stats(self.probe.deltas[name], self.probe.fisher[name], [], self.sizes[name], name)
        return s[0].cpu(), s[1].cpu()

    def _ref(self, task: EarlierTask, name: str) -> Tensor:
        """An earlier task's exact update of `name` as delta_stats reads it (zeros where it
        kept none: no similarity)."""
        d = self.probe.deltas[name]
        u = task.updates.get(name)
        if isinstance(u, Tensor):
            if u.numel() != d.numel():
                raise ValueError(f"earlier update of {name!r} has {u.numel()} elements, "
                                 f"the parameter has {d.numel()}")
            if is_dtensor(u):  # kept sharded like the parameter
                return u
            return u.reshape(-1).to(local_tensor(d).device).contiguous()
        return torch.zeros(d.numel(), dtype=d.dtype, device=local_tensor(d).device)

    def cosines(self, name: str, max_only: bool = True) -> Tensor | None:
        """Per block, the cosine of this task's update with each earlier task's, measured
        per specificity unit and given to every block inside it: (blocks × tasks, fp64), or
        with `max_only` their maximum (blocks, in `cos_dtype`). None when no earlier task
        kept an update (exact or sketched) of any tensor."""
        d, unit = self.probe.deltas[name], self.units[name]
        columns: list[Tensor] = []
        best = None

        def add_max(top: Tensor) -> None:  # top: (units,) fp64, the largest over some tasks
            nonlocal best
            top = top.to(self.cos_dtype)
            best = top if best is None else torch.maximum(best, top)

        def add(cos: Tensor) -> None:  # cos: (units × tasks) fp64
            if not max_only:
                columns.append(cos)
                return
            add_max(cos.max(1).values)

        # one element a unit: every task's update read once, one native pass if all are plain fp32
        loaded = [self._ref(t, name) for t in self.exact] if max_only and unit == 1 and self.exact else None
        native = loaded is not None and _plain_fp32(d, loaded)
        if native:
            add_max(ops.element_max_cosine(d.reshape(-1), loaded))
        for g0 in range(0, 0 if native else len(self.exact), ops.MAX_REFS):
            refs = (loaded[g0:g0 + ops.MAX_REFS] if loaded is not None
                    else [self._ref(t, name) for t in self.exact[g0:g0 + ops.MAX_REFS]])
            ss, _, dots, ref_sq = (t.double() for t in block_stats(d, None, refs, unit, name))
            denom = (ss.unsqueeze(1) * ref_sq).sqrt()
            add(torch.where(denom > 0, dots / denom.clamp_min(1e-300), torch.zeros_like(denom)))
        for task in self.earlier:
            u = task.updates.get(name)
            if isinstance(u, BlockSketch):
                if is_dtensor(d):
                    raise ValueError(f"{name!r}: sketched earlier updates are not supported for a sharded "
                                     "selection yet; keep exact updates (sketch_dim None)")
                if u.block_size != unit:
                    raise ValueError(f"sketch of {name!r} has block size {u.block_size}, specificity "
                                     f"uses {unit}")
                add(sketch_cosine(d, name, u).double().unsqueeze(1))
        out = best if max_only else (torch.cat(columns, 1) if columns else None)
        if out is None:
            return None
        out = out.cpu()  # (as `sums`)
        k = unit // self.sizes[name]  # one value per unit -> one per block
        return out if k == 1 else out.repeat_interleave(k, 0)

    def earlier_cores(self, name: str) -> Tensor | None:
        """Per block, whether it is core for an earlier task (None: no earlier core has it)."""
        hit = None
        for task in self.earlier:
            if task.core is None or name not in task.core:
                continue
            dense = task.core.to_dense(name).reshape(-1, self.sizes[name]).any(1)
            hit = dense if hit is None else hit | dense
        return hit

    def exclusions(self, name: str, spec: Tensor | None) -> tuple[Tensor | None, Tensor | None, dict[str, int]]:
        """The trace rule's exclusions, given the blocks' max cosines `spec`: (the blocks set
        to -inf, or None; the factor scores are multiplied by first, or None; the report's
        counts). Blocks whose cosine reaches the threshold are excluded ("exclude") or
        down-weighted by 1 − cos ("downweight"); blocks core for an earlier task are
        excluded unless cores are shared."""
        cfg = self.cfg
        hit = None if cfg.share_earlier_cores else self.earlier_cores(name)
        shared = factor = None
        if spec is not None:
            if cfg.shared_rule == "exclude":
                shared = spec >= cfg.specificity_threshold
            else:
                factor = 1 - spec.clamp_min(0)
        excluded = shared if hit is None else hit if shared is None else shared | hit
        info = {"shared": 0 if shared is None else int(shared.sum() if hit is None else (shared & ~hit).sum()),
                "earlier_core": 0 if hit is None else int(hit.sum())}
        return excluded, factor, info

    def exclude(self, s: Tensor, name: str, spec: Tensor | None) -> dict[str, int]:
        """`exclusions` applied to scores `s` in place; returns the report's counts."""
        excluded, factor, info = self.exclusions(name, spec)
        if factor is not None:
            s.mul_(factor)
        if excluded is not None:
            s[excluded] = -math.inf
        return info


class FisherGuard:
    """The interference guard: per block, the share of Fisher mass that is the new task's,
    F_t / (F_t + protect·Σ_τ F_τ), each task's Fisher normalised to unit total (its total
    over every tensor) so tasks with larger losses do not dominate. At first order a
    converged earlier task loses ½·Δᵀ F_τ Δ, so blocks where earlier tasks are sensitive are
    the ones whose training makes them forget. `new_total`: the new task's Fisher total."""

    def __init__(self, earlier: Sequence[EarlierTask], names: list[str], sizes: dict[str, int],
                 numels: dict[str, int], protect: float, new_total: float) -> None:
        self.earlier, self.sizes, self.numels, self.protect = earlier, sizes, numels, protect
        self.new_total = new_total or 1.0
        self.totals: list[float | None] = []
        for task in earlier:
            if not task.fisher:
                self.totals.append(None)
                continue
            total = sum(float(v.sum()) for v in (self._blocks(task, n) for n in names) if v is not None)
            self.totals.append(total or 1.0)

    def _blocks(self, task: EarlierTask, name: str) -> Tensor | None:
        """An earlier task's Fisher summed per block of `name` (fp64; None: it kept none)."""
        f = task.fisher.get(name)
        if f is None:
            return None
        if f.numel() != self.numels[name]:
            raise ValueError(f"earlier Fisher of {name!r} has {f.numel()} elements, the parameter "
                             f"has {self.numels[name]}")
        B = self.sizes[name]
        if is_dtensor(f):  # sharded like the parameter: block sums over the ranks
            return block_stats(f, f, [], B, name)[1].double().cpu()
        return f.detach().reshape(-1, B).double().sum(1).cpu()

    def factor(self, name: str, fisher_sum: Tensor) -> Tensor:
        """The guard's factor per block of `name`, from the new task's block Fisher sums."""
        old = torch.zeros(fisher_sum.numel(), dtype=torch.float64)
        for task, total in zip(self.earlier, self.totals):
            v = self._blocks(task, name) if total is not None else None
            if v is not None:
                old += v / total
        mine = fisher_sum.double() / self.new_total
        denom = mine + self.protect * old
        return torch.where(denom > 0, mine / denom.clamp_min(1e-300), torch.ones_like(mine))


def _plain_fp32(d: Tensor, refs: list[Tensor]) -> bool:
    """Whether `element_max_cosine` reads these as they are: unsharded fp32 on one device."""
    return (not is_dtensor(d) and d.dtype == torch.float32
            and all(not is_dtensor(r) and r.dtype == torch.float32 and r.device == d.device for r in refs))


def tensor_summary(sum_sq: Tensor, fisher_sum: Tensor, spec: Tensor | None) -> dict[str, float]:
    """A tensor's means in the report: block L2, block Fisher and max cosine."""
    empty = not sum_sq.numel()
    return {"mean_l2": 0.0 if empty else float(sum_sq.double().sqrt().mean()),
            "mean_fisher": 0.0 if empty else float(fisher_sum.double().mean()),
            "mean_specificity": 0.0 if empty or spec is None else float(spec.mean())}


def report_row(name: str, block_size: int, chosen: Tensor, chosen_scores: Tensor, summary: dict,
               info: dict) -> dict:
    """A tensor's row of the selection's report. `chosen`: its blocks' flags; `chosen_scores`:
    the chosen blocks' scores in index order."""
    return {"name": name, "block_size": block_size, "blocks": int(chosen.numel()),
            "chosen": int(torch.count_nonzero(chosen)), "mean_l2": summary["mean_l2"],
            "mean_fisher": summary["mean_fisher"],
            "mean_score_chosen": float(chosen_scores.mean()) if chosen_scores.numel() else float("nan"),
            "mean_specificity": summary["mean_specificity"],
            "excluded_shared": int(info["shared"]), "excluded_earlier_core": int(info["earlier_core"])}
