"""A parameter's core selection as MaskedAdamW holds it: global (what the user gave and
checkpoints record) and on the storage this rank holds (what the kernels step)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..masks import MaskEntry
from ..sharding import ShardLayout, local_tensor, localize, shard_layout

# compact per-element state, in mask order ("master": fp32 values of a 16-bit parameter's core)
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master")


@dataclass(frozen=True)
class ParamLayout:
    """A parameter's selection, global and local (the same unless sharded)."""

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
    def of(cls, entry: MaskEntry, p: Tensor, what: str) -> ParamLayout:
        shard = shard_layout(p, what)
        storage = local_tensor(p)
        if shard is None:
            local, offset = entry, 0
        else:
            local, offset = localize(entry, shard.lo, shard.hi, tuple(storage.shape))
        kernel = local.coarsest()
        return cls(entry, local, local.indices.to(storage.device), offset, shard, kernel,
                   kernel.indices.to(storage.device))

    def recorded_mask(self) -> tuple[Tensor, int]:
        """The mask a parameter's state records: the global one for a sharded parameter (the
        same on every rank, so a checkpoint keeps it once), else the indices on its device."""
        if self.shard is not None:
            return self.entry.indices, self.entry.block_size
        return self.indices, self.block_size
