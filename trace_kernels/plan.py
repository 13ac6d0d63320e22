"""What MaskedAdamW plans once and checks every step: each parameter's selection on the
storage this rank holds (`_Layout`), and a group's step over its parameters (`_GroupPlan`:
the lists the kernels read, a backend's own plan, the weights stepped from core rows),
valid while the live parameters, carriers and state objects are the ones it was built
from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .masks import MaskEntry
from .sharding import ShardLayout, local_tensor, localize, shard_layout

# compact per-element state, in mask order ("master": fp32 values of a 16-bit parameter's core)
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master")


@dataclass(frozen=True)
class _Layout:
    """A parameter's selection: global (what the user gave and checkpoints record) and on
    the storage this rank holds (what the kernels see; the same unless sharded)."""

    entry: MaskEntry
    local: MaskEntry
    indices: Tensor             # local.indices on the parameter's device
    offset: int                 # the first local core element's place in the global compact order
    shard: ShardLayout | None
    kernel: MaskEntry           # `local` at its coarsest block size: what the kernels step
    kernel_indices: Tensor      # kernel.indices on the parameter's device

    @property
    def block_size(self) -> int:
        return self.local.block_size

    @property
    def numel_selected(self) -> int:
        """Core elements on this rank (what its state holds)."""
        return self.local.numel_selected

    @classmethod
    def of(cls, entry: MaskEntry, p: Tensor, what: str) -> _Layout:
        shard = shard_layout(p, what)
        storage = local_tensor(p)
        if shard is None:
            local, offset = entry, 0
        else:
            local, offset = localize(entry, shard.lo, shard.hi, tuple(storage.shape))
        kernel = local.coarsest()
        return cls(entry, local, local.indices.to(storage.device), offset, shard, kernel,
                   kernel.indices.to(storage.device))


def _storage_key(p: Tensor) -> tuple:
    s = local_tensor(p)
    return s.data_ptr(), s.dtype, s.device


def _carrier(p: Tensor) -> Tensor | None:
    """The carrier of `p`'s compact (core rows only) gradient when it has one this step
    (see `core_grads`); None when `p`'s gradient is its own ``.grad``."""
    c = getattr(p, "trace_core_grad", None)
    if c is None or c.grad is None:
        return None
    if p.grad is not None:
        raise ValueError("a parameter with a core-rows gradient (install_core_grads) also has a "
                         "full gradient: something else computed one; remove one of the two")
    return c


@dataclass
class _Compact:
    """A weight stepped from its core rows: gathered into `rows_buffer`, stepped there with
    the entry moved onto those rows (`indices`), and written back."""

    weight: Tensor      # the weight's rows, 2-D
    carrier: Tensor     # the parameter whose .grad holds the rows' gradient
    rows: Tensor
    rows_buffer: Tensor
    indices: Tensor     # the core's blocks in the rows buffer, at their coarsest block size
    block_size: int


@dataclass
class _DevicePlan:
    params: list[Tensor]   # the parameters (their gradients are read at each step)
    lists: dict            # the trusted op's lists, but for the gradients
    native: Any            # the backend's own plan, or None
    compact: list          # per parameter, its _Compact or None


@dataclass
class _GroupPlan:
    """One group's planned step (see `MaskedAdamW.step`)."""

    version: int
    params: list[Tensor]
    amsgrad: bool
    devices: dict          # device -> _DevicePlan
    storages: list[tuple]  # each parameter's storage address, dtype and device when planned
    carriers: list         # each parameter's compact-gradient carrier when planned, or None
    states: list[tuple]    # each parameter's state dict and tensors when planned (`_state_refs`)

    def fits(self, version: int, active: list[Tensor], carriers: list, amsgrad: bool, state) -> bool:
        """Whether the plan still describes the live objects: the same parameters on the same
        storage, the same carriers, and the very state dicts and tensors (torch's optimizers
        re-read ``self.state`` every step; a user or helper may replace or clear it)."""
        return (version == self.version and amsgrad == self.amsgrad and len(active) == len(self.params)
                and all(a is b for a, b in zip(active, self.params))
                and all(_storage_key(p) == k for p, k in zip(active, self.storages))
                and all(a is b for a, b in zip(carriers, self.carriers))
                and all(_same_refs(_state_refs(state.get(p)), r) for p, r in zip(active, self.states)))


def _state_refs(st: dict | None) -> tuple:
    return (st,) if st is None else (st, *(st.get(k) for k in ("step", *_MOMENTS)))


def _same_refs(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _recorded_mask(lay: _Layout) -> tuple[Tensor, int]:
    """The mask a parameter's state records: the global one for a sharded parameter (the
    same on every rank, so a checkpoint keeps it once), else the indices on its device."""
    if lay.shard is not None:
        return lay.entry.indices, lay.entry.block_size
    return lay.indices, lay.block_size
