"""Core values, read and written: what a checkpoint keeps of a task being trained, and
what makes TRACE task-routable.

Only a task's core elements change while it trains, and with disjoint cores no later task
touches them. So the model as it stood after task i is the newest model with every later
task's core set back to the values it had before that task trained: keep, per task, its
core's values before and after training (density × parameters each), and any earlier
model can be rebuilt exactly (`set_back`). A rebuilt model that differs from the original
by one bit means a later task moved an element outside its core, or two cores overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trace_kernels import CoreMask
from trace_kernels.sharding import is_dtensor, local_selection, local_tensor


def core_values(model: nn.Module, core: CoreMask) -> dict[str, Tensor]:
    """The core elements of each tensor, in mask order (1-D, the parameter's dtype, CPU).
    For a sharded parameter: this rank's core elements (its slice of the global order)."""
    params = dict(model.named_parameters())
    out = {}
    for n, e in core.nonempty().items():
        local, _ = local_selection(e, params[n], repr(n))
        storage = local_tensor(params[n])
        where = local.element_indices().to(storage.device)
        out[n] = storage.detach().reshape(-1)[where].cpu()
    return out


def full_core_values(model: nn.Module, core: CoreMask) -> dict[str, Tensor]:
    """`core_values` of the whole tensors, whatever the sharding: a sharded parameter is
    gathered one tensor at a time, so every rank must call this together."""
    params = dict(model.named_parameters())
    out = {}
    for n, e in core.nonempty().items():
        p = params[n]
        whole = p.full_tensor() if is_dtensor(p) else p
        out[n] = whole.detach().reshape(-1)[e.element_indices().to(whole.device)].cpu()
    return out


@torch.no_grad()
def set_core_values(model: nn.Module, core: CoreMask, values: dict[str, Tensor]) -> None:
    """Write `values` (as `core_values` gives them) into the core elements of `model`."""
    params = dict(model.named_parameters())
    for n, e in core.nonempty().items():
        local, _ = local_selection(e, params[n], repr(n))
        storage = local_tensor(params[n])
        v = values[n]
        if v.numel() != local.numel_selected:
            raise ValueError(f"{n!r}: {v.numel()} values for a core of {local.numel_selected} elements")
        where = local.element_indices().to(storage.device)
        storage.view(-1).index_copy_(0, where, v.to(storage.device, storage.dtype))


@dataclass
class TaskValues:
    """One task's core and its values before and after the task trained."""

    core: CoreMask
    before: dict[str, Tensor]
    after: dict[str, Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes to keep the task routable: both value sets and the core's indices."""
        vals = sum(t.numel() * t.element_size() for d in (self.before, self.after) for t in d.values())
        return vals + sum(e.indices.numel() * e.indices.element_size() for e in self.core.values())


def set_back(model: nn.Module, later: Sequence[TaskValues]) -> None:
    """Turn the model after the last of `later` into the model before the first of them:
    each task's core set back to its values before it trained, newest first."""
    for task in reversed(list(later)):
        set_core_values(model, task.core, task.before)


def check_disjoint(tasks: Sequence[TaskValues]) -> None:
    """Raise if two tasks' cores share an element (routing would then not be exact)."""
    for i, a in enumerate(tasks):
        for j in range(i):
            shared = a.core.intersection(tasks[j].core).numel_selected
            if shared:
                raise ValueError(f"the cores of tasks {j + 1} and {i + 1} share {shared} elements: "
                                 "a model before one of them cannot be rebuilt")
