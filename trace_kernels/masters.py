"""fp32 master copies of a 16-bit parameter's core elements.

A bf16 weight cannot hold an update smaller than about 1/256 of itself; MaskedAdamW applies
the update to an fp32 master of each core element (the state "master", in mask order) and
writes it rounded to the weight. The weight stays the source of truth: the kernels start an
element's update from its master only while the weight holds exactly what the last step
wrote from it, and from the weight otherwise (`rounding.h`'s `master_or_weight`), so a write
by anything else (``p.data.copy_``, ``vector_to_parameters``, the model's ``load_state_dict``,
an EMA swap) is never undone by a stale master, however it was made.
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
    """Which parameters keep fp32 masters: `wanted` True or False for every 16-bit parameter,
    or None for the default: 16-bit parameters keep them, unless their rounding is stochastic
    (whose point is an unbiased weight without the 4 bytes per core element)."""

    def __init__(self, wanted: bool | None, stochastic: bool = False) -> None:
        self.wanted = wanted
        self.stochastic = stochastic

    def keeps(self, p: Tensor) -> bool:
        if p.dtype == torch.float32:
            return False
        return self.wanted if self.wanted is not None else not self.stochastic

    @staticmethod
    def init(p: Tensor, lay: ParamLayout, state: dict) -> None:
        """Masters from the parameter's core elements as they are now."""
        state["master"] = core_values(p, lay).to(torch.float32)
