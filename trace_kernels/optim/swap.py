"""`swap_optimizer`: a running torch.optim.AdamW handed over to a MaskedAdamW, its state
compacted onto the core (the thin wrapper that swaps TRACE's optimizer in)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..masks import CoreMask
from ..sharding import local_tensor
from .layout import MOMENTS
from .optimizer import MaskedAdamW


def swap_optimizer(
    optimizer: torch.optim.AdamW,
    masks: CoreMask | Mapping[Tensor, Any],
    *,
    model: torch.nn.Module | None = None,
    unmasked: str = "freeze",
    backend: str | None = None,
) -> MaskedAdamW:
    """A MaskedAdamW with `optimizer`'s groups and hyperparameters, its state compacted onto
    the masks (moments gathered at the selected elements, steps kept).

    For a CoreMask, parameter names come from `model` or from the optimizer's own
    ``param_names`` (torch >= 2.6 records them when built from named_parameters()).
    An LR scheduler holds the old optimizer: create schedulers after swapping.
    """
    if not isinstance(optimizer, torch.optim.AdamW):
        raise TypeError(f"swap_optimizer expects a torch.optim.AdamW, got {type(optimizer).__name__}")
    name_of = {p: n for n, p in model.named_parameters()} if model is not None else {}
    groups = []
    for g in optimizer.param_groups:
        if g.get("capturable") or g.get("differentiable"):
            raise ValueError("swap_optimizer: capturable/differentiable AdamW cannot be swapped")
        new = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        ps = list(g["params"])
        names = g.get("param_names") or [name_of.get(p) for p in ps]
        if isinstance(masks, CoreMask):
            missing = [i for i, n in enumerate(names) if n is None]
            if missing:
                raise ValueError(
                    "swap_optimizer: a CoreMask needs parameter names; pass model= or build the "
                    "AdamW from model.named_parameters()"
                )
            new["params"] = list(zip(names, ps))
        else:
            new["params"] = ps
        groups.append(new)
    d = optimizer.defaults
    out = MaskedAdamW(
        groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"],
        amsgrad=d["amsgrad"], maximize=d.get("maximize", False), masks=masks,
        unmasked=unmasked, backend=backend,
    )
    for p, st in optimizer.state.items():
        entry = out.mask_of(p)
        if entry is None or entry.numel_selected == 0 or "exp_avg" not in st:
            continue
        ns = out.init_state(p)
        step = st["step"]
        ns["step"] = (step.detach().to("cpu", torch.float32).clone() if isinstance(step, Tensor)
                      else torch.tensor(float(step), dtype=torch.float32))
        ei = out.core_elements(p)
        for k in MOMENTS:
            if k in ns and k in st:
                ns[k] = local_tensor(st[k]).reshape(-1)[ei].to(torch.float32).contiguous()
    return out
