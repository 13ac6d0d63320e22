"""fp32 master copies of a 16-bit parameter's core elements, kept in step with the weight.

A bf16 weight cannot hold an update smaller than about 1/256 of itself; MaskedAdamW applies
the update to an fp32 master of each core element (the state "master", in mask order) and
writes it rounded to the weight. Anything else that writes the weight (``load_state_dict``
on the model, `set_core_values`, an EMA swap) moves its version counter; the masters are then
taken from the weight again before the next step, so they never write stale values over it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import ParamLayout
from .sharding import local_tensor


def core_values(p: Tensor, lay: ParamLayout) -> Tensor:
    """The parameter's core elements on this rank, in mask order (a copy)."""
    where = lay.local.element_indices().to(lay.indices.device)
    return local_tensor(p).detach().reshape(-1)[where]


class Masters:
    """Whether a parameter keeps masters (`wanted`: None = every 16-bit parameter), and the
    weight version each parameter's masters last matched."""

    def __init__(self, wanted: bool | None) -> None:
        self.wanted = wanted
        self.written: dict[Tensor, int] = {}

    def keeps(self, p: Tensor) -> bool:
        return p.dtype != torch.float32 and (self.wanted is None or self.wanted)

    def init(self, p: Tensor, lay: ParamLayout, state: dict) -> None:
        """Masters from the parameter's core elements as they are now."""
        state["master"] = core_values(p, lay).to(torch.float32)
        self.mark(p)

    def mark(self, p: Tensor) -> None:
        """The masters and the weight agree now (after a step, or a checkpoint that held both)."""
        self.written[p] = local_tensor(p)._version

    def sync(self, params: list[Tensor], masters: list[Tensor], layout: dict[Tensor, ParamLayout]) -> None:
        """Masters of a weight written since it was last stepped are taken from it again,
        unless they are what the masters round to (a resumed run: saved together)."""
        for p, m in zip(params, masters):
            if not m.numel() or self.written.get(p) == local_tensor(p)._version:
                continue
            now = core_values(p, layout[p])
            if not torch.equal(now, m.to(now.dtype)):
                m.copy_(now)
            self.mark(p)

    def mark_all(self, params: list[Tensor], masters: list[Tensor]) -> None:
        for p, m in zip(params, masters):
            if m.numel():
                self.mark(p)
