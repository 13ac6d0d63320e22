"""How MaskedAdamW steps a weight whose gradient is compact (see `core_grads`): the weight's
core rows are gathered into a buffer, stepped there from the carrier's gradient with the mask
moved onto those rows, and written back. State stays in mask order, the same as when the
weight has a full gradient."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core_grads import core_rows
from ..sharding import local_tensor
from .layout import ParamLayout


def carrier_of(p: Tensor) -> Tensor | None:
    """The carrier of `p`'s compact gradient when it has one this step; None when `p`'s
    gradient is its own ``.grad``."""
    c = getattr(p, "trace_core_grad", None)
    if c is None or c.grad is None:
        return None
    if p.grad is not None:
        raise ValueError("a parameter with a core-rows gradient (install_core_grads) also has a "
                         "full gradient: something else computed one; remove one of the two")
    return c


@dataclass
class CoreRowsStep:
    """A weight stepped from its core rows."""

    weight: Tensor      # the weight's rows, 2-D: (out, in) for rows, (numel, 1) for elements
    carrier: Tensor     # the parameter whose .grad holds the rows' gradient
    rows: Tensor
    rows_buffer: Tensor
    indices: Tensor     # the core's blocks in the rows buffer, at their coarsest block size
    block_size: int

    @classmethod
    def plan(cls, p: Tensor, carrier: Tensor, lay: ParamLayout, what: str, optimizer_params: list[Tensor]) -> CoreRowsStep:
        if lay.shard is not None:
            raise ValueError(f"{what}: core-rows gradients need an unsharded weight")
        if not any(carrier is q for q in optimizer_params):
            raise ValueError(
                f"{what} has a core-rows gradient whose carrier is not in this optimizer: pass it "
                "too (model.named_parameters() includes it), so zero_grad, GradScaler and "
                "gradient clipping see it")
        rows = carrier.trace_rows
        weight = local_tensor(p).view(-1, carrier.shape[1])
        found = core_rows(lay.entry, weight.shape[1])
        if found is None or not torch.equal(found[0], rows.cpu()):
            raise ValueError("the core-rows gradient was installed for another core than the "
                             "optimizer's mask (install_core_grads after set_masks)")
        kernel = found[1].coarsest()
        return cls(weight, carrier, rows.to(weight.device),
                   torch.empty((rows.numel(), weight.shape[1]), dtype=weight.dtype, device=weight.device),
                   kernel.indices.to(weight.device), kernel.block_size)

    def gather(self) -> None:
        torch.index_select(self.weight, 0, self.rows, out=self.rows_buffer)

    def scatter(self) -> None:
        self.weight.index_copy_(0, self.rows, self.rows_buffer)


def core_in_carrier(cache: dict, p: Tensor, lay: ParamLayout, c: Tensor) -> tuple[Tensor, int]:
    """The core's blocks in a carrier's compact rows (int64 indices, block size), kept in
    `cache` while the parameter's layout and carrier stay the same: finding the rows sorts
    the core's indices, too slow to repeat every step."""
    hit = cache.get(p)
    if hit is None or hit[0] is not lay or hit[1] is not c:
        kernel = core_rows(lay.entry, c.shape[1])[1].coarsest()
        hit = cache[p] = (lay, c, kernel.indices.to(c.device, torch.int64), kernel.block_size)
    return hit[2], hit[3]
