"""A group's planned masked step: what MaskedAdamW builds once and checks every step.

`GroupPlan` holds, per device, the lists the kernels read (all but the gradients), the
backend's own plan (the cpu backend's native table) and the weights stepped from core rows.
It is a pure function of what it was built from, and `fits` checks that against the live
objects each step: the same parameters on the same storage, the same carriers, and the very
state dicts and tensors (torch's optimizers re-read ``self.state`` every step; a user or an
offload helper may replace or clear it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import backends
from .layout import MOMENTS, ParamLayout
from .sharding import local_tensor

NO_MASTER = torch.empty(0)  # a parameter without fp32 masters (fp32, or master_weights=False)


def storage_key(p: Tensor) -> tuple:
    s = local_tensor(p)
    return s.data_ptr(), s.dtype, s.device


def _state_refs(st: dict | None) -> tuple:
    return (st,) if st is None else (st, *(st.get(k) for k in ("step", *MOMENTS)))


def _same_refs(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


@dataclass
class DevicePlan:
    params: list[Tensor]   # the parameters (their gradients are read at each step)
    lists: dict            # the trusted op's lists, but for the gradients
    native: Any            # the backend's own plan, or None
    compact: list          # per parameter, its CoreRowsStep or None


@dataclass
class GroupPlan:
    version: int
    params: list[Tensor]
    amsgrad: bool
    devices: dict          # device -> DevicePlan
    storages: list[tuple]  # each parameter's storage address, dtype and device when planned
    carriers: list         # each parameter's compact-gradient carrier when planned, or None
    states: list[tuple]    # each parameter's state dict and tensors when planned

    @classmethod
    def build(cls, version: int, active: list[Tensor], carriers: list, compact: list,
              layout: dict[Tensor, ParamLayout], state: dict, amsgrad: bool, backend: str | None) -> GroupPlan:
        """The plan over `active` (whose state exists and is checked); `compact`: each
        parameter's CoreRowsStep or None."""
        buckets: dict[torch.device, list[int]] = {}
        for i, p in enumerate(active):
            buckets.setdefault(local_tensor(p).device, []).append(i)
        devices = {}
        for device, where in buckets.items():
            params = [active[i] for i in where]
            rows = [compact[i] for i in where]
            states = [state[p] for p in params]
            lays = [layout[p] for p in params]
            masters = [st.get("master", NO_MASTER) for st in states]
            lists = {
                "params": [local_tensor(p) if c is None else c.rows_buffer for p, c in zip(params, rows)],
                "m": [st["exp_avg"] for st in states],
                "v": [st["exp_avg_sq"] for st in states],
                "vmax": [st["max_exp_avg_sq"] for st in states] if amsgrad else [],
                "idx": [lay.kernel_indices if c is None else c.indices for lay, c in zip(lays, rows)],
                "sizes": [lay.kernel.block_size if c is None else c.block_size for lay, c in zip(lays, rows)],
                "steps": [st["step"] for st in states],
                "masters": masters if any(m.numel() for m in masters) else [],
                # stochastic rounding keys on the element's place in what the kernel steps
                # (for a core-rows weight: in its rows buffer, so its bits differ from the
                # full-gradient path's; the rounding is as unbiased)
                "bases": [lay.shard.lo if lay.shard is not None else 0 for lay in lays]}
            native = backends.plan_masked_adamw(backends.choose(device, backend).name, lists, amsgrad)
            devices[device] = DevicePlan(params, lists, native, rows)
        return cls(version, active, amsgrad, devices, [storage_key(p) for p in active], carriers,
                   [_state_refs(state.get(p)) for p in active])

    def fits(self, version: int, active: list[Tensor], carriers: list, amsgrad: bool, state) -> bool:
        """Whether the plan still describes the live objects."""
        return (version == self.version and amsgrad == self.amsgrad and len(active) == len(self.params)
                and all(a is b for a, b in zip(active, self.params))
                and all(storage_key(p) == k for p, k in zip(active, self.storages))
                and all(a is b for a, b in zip(carriers, self.carriers))
                and all(_same_refs(_state_refs(state.get(p)), r) for p, r in zip(active, self.states)))
