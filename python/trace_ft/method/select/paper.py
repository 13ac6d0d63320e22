"""The authors' released selection (the `paper` preset, METHOD.md): whole tensors, ranked
by 0.5·minmax(RMS of Δ) + 0.5·minmax(mean Fisher), or, for their separate specificity
selector, by the mean cosine with earlier tasks' updates, least similar first."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import SelectConfig


def paper_scores(sums: dict[str, tuple[Tensor, Tensor]], cosines: dict[str, Tensor], shapes,
                 cfg: SelectConfig) -> dict[str, Tensor]:
    """Whole tensors: minmax(RMS Δ) and minmax(mean Fisher), 0.5 each; or, for the
    specificity selector, minus the mean cosine with earlier tasks (least similar first).
    `sums`: each tensor's (Σ Δ², Σ F); `cosines`: its cosines with each earlier task
    (paper_specificity only)."""
    names = list(shapes)
    numel = torch.tensor([max(math.prod(shapes[n]), 1) for n in names], dtype=torch.float64)
    if cfg.method == "paper_specificity":
        cos = [cosines[n] for n in names]
        if not any(c.numel() for c in cos):
            raise ValueError("paper_specificity needs earlier tasks' updates")
        flat = -torch.stack([c.mean() if c.numel() else torch.tensor(0.0, dtype=torch.float64) for c in cos])
    else:
        rms = torch.stack([sums[n][0].double().sum() for n in names]).div(numel).sqrt()
        mean_f = torch.stack([sums[n][1].double().sum() for n in names]).div(numel)

        def minmax(x):
            span = x.max() - x.min()
            return (x - x.min()) / span if span > 0 else torch.zeros_like(x)

        flat = 0.5 * minmax(rms) + 0.5 * minmax(mean_f)
    return {n: flat[i:i + 1] for i, n in enumerate(names)}
