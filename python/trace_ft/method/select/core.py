"""`select_core`: a task's core from its probe, against the earlier tasks (the rules are the
package's doc). This is the driver that holds every tensor's scores at once; a large model's
element level goes to the streamed driver (`streamed`), which computes the same core and
report tensor by tensor. Both score each tensor through `scorer.TensorScorer`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from trace_kernels import CoreMask
from trace_kernels.masks import block_size_for

from ..probe import ProbeResult
from .budget import take_budget
from .config import EarlierTask, Selection, SelectConfig, specificity_size
from .paper import paper_scores
from . import ranks
from .ranks import importance
from .scorer import FisherGuard, TensorScorer, report_row, tensor_summary
from .streamed import select_streamed, streamable


def select_core(
    probe: ProbeResult,
    earlier: Sequence[EarlierTask] = (),
    config: SelectConfig | None = None,
    **overrides,
) -> Selection:
    """Choose the task's core blocks from a probe (see the package doc for the rules).

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
    if streamable(probe, earlier, sizes, cfg):  # a large model's element level, in bounded memory
        return select_streamed(probe, earlier, sizes, units, cfg)
    names = list(shapes)
    trace = cfg.method == "trace"
    blocks = sum(math.prod(shapes[n]) // sizes[n] for n in names)
    # past EXACT_RANKS_UP_TO blocks cosines are compared in fp32, as the binned ranks and the
    # streamed selection do (a cosine within 1e-7 of the threshold may flip)
    scorer = TensorScorer(probe, earlier, sizes, units, cfg,
                          torch.float32 if trace and blocks > ranks.EXACT_RANKS_UP_TO else torch.float64)
    sums = {n: scorer.sums(n) for n in names}
    summary, info = {}, {}
    if trace:
        scores, flat = _importance(sums, names, cfg)
        guard = FisherGuard(earlier, names, sizes, {n: math.prod(shapes[n]) for n in names}, cfg.protect,
                            sum(float(sums[n][1].double().sum()) for n in names)) if cfg.protect > 0 else None
        for n in names:
            if guard is not None:
                scores[n].mul_(guard.factor(n, sums[n][1]))
            spec = scorer.cosines(n)
            info[n] = scorer.exclude(scores[n], n, spec)
            summary[n] = tensor_summary(*sums[n], spec)
    else:
        cosines = {n: scorer.cosines(n, max_only=False) for n in names}
        cosines = {n: torch.zeros(sums[n][0].numel(), 0, dtype=torch.float64) if c is None else c
                   for n, c in cosines.items()}
        scores = paper_scores(sums, cosines, shapes, cfg)
        flat = torch.cat([scores[n] for n in names])
        for n in names:
            info[n] = {"shared": 0, "earlier_core": 0}
            c = cosines[n]
            summary[n] = tensor_summary(*sums[n], c.max(1).values if c.shape[1] else None)
    del sums
    chosen = _budget(scores, flat, sizes, shapes, names, cfg)
    mask = CoreMask.from_blocks({n: (shapes[n], sizes[n], chosen[n]) for n in names})
    report = [report_row(n, sizes[n], chosen[n], scores[n][chosen[n]], summary[n], info[n]) for n in names]
    return Selection(mask=mask, report=report, scores=scores, config=cfg)


def _importance(sums: dict[str, tuple[Tensor, Tensor]], names: list[str],
                cfg: SelectConfig) -> tuple[dict[str, Tensor], Tensor]:
    """Per tensor, its blocks' importance, as views of one flat fp64 buffer in name order
    (what the global budget reads; made in place, so an element-level selection holds one
    score per element): ranks or maxima over all blocks, or within each tensor."""
    if cfg.normalize == "global":
        flat = importance([sums[n][0] for n in names], [sums[n][1] for n in names], cfg)
    else:
        flat = torch.cat([importance([sums[n][0]], [sums[n][1]], cfg) for n in names])
    scores, start = {}, 0
    for n in names:
        scores[n] = flat[start:start + sums[n][0].numel()]
        start += sums[n][0].numel()
    return scores, flat


def _budget(scores: dict[str, Tensor], flat: Tensor, sizes: dict[str, int], shapes, names: list[str],
            cfg: SelectConfig) -> dict[str, Tensor]:
    """Per tensor, its chosen blocks: the paper's budget counts tensors; the trace rule's
    counts elements, over all tensors (`flat`: every block's score, in name order) or within
    each."""
    if cfg.method != "trace":
        k = max(1, round(cfg.budget * len(names))) if cfg.budget > 0 else 0
        chosen_flat = take_budget(flat, 1, k)
        return {n: chosen_flat[i:i + 1] for i, n in enumerate(names)}
    if cfg.scope == "per_tensor":
        return {n: take_budget(scores[n], sizes[n], cfg.budget * math.prod(shapes[n])) for n in names}
    total = sum(math.prod(s) for s in shapes.values())
    one_size = len({sizes[n] for n in names}) == 1
    elems = sizes[names[0]] if one_size else torch.cat(
        [torch.full((scores[n].numel(),), sizes[n], dtype=torch.float64) for n in names])
    chosen_flat = take_budget(flat, elems, cfg.budget * total)
    chosen, start = {}, 0
    for n in names:
        chosen[n] = chosen_flat[start:start + scores[n].numel()]
        start += scores[n].numel()
    return chosen
