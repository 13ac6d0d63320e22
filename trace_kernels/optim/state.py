"""MaskedAdamW's per-parameter state: fp32 moments (and masters) of the core elements only,
in mask order. Which parameters keep fp32 masters; creating a state and making it fit a
step; mapping it to and from a state_dict (a sharded parameter's moments saved as the global
compact vector, so a checkpoint loads at any world size).

fp32 masters: a bf16 weight cannot hold an update smaller than about 1/256 of itself, so a
16-bit parameter keeps an fp32 copy of each core element (the state "master"); the update is
applied to it and the weight receives it rounded. The weight stays the source of truth: the
kernels start an element's update from its master only while the weight holds exactly what
the last step wrote from it (`rounding.h`'s `master_or_weight`), so a write by anything else
(``p.data.copy_``, ``vector_to_parameters``, the model's ``load_state_dict``, an EMA swap) is
never undone by a stale master, however it was made.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from torch import Tensor

from ..sharding import local_tensor, rank_state, sharded_state
from .layout import MOMENTS, ParamLayout

NO_MASTER = torch.empty(0)  # in a list of masters: a parameter without (fp32, or not kept)


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


def core_values(p: Tensor, lay: ParamLayout) -> Tensor:
    """The parameter's core elements on this rank, in mask order (a copy)."""
    where = lay.local.element_indices().to(lay.indices.device)
    return local_tensor(p).detach().reshape(-1)[where]


def new_state(st: dict, p: Tensor, lay: ParamLayout, amsgrad: bool, masters: Masters) -> dict:
    """Fill `st` (the parameter's state dict) with a fresh state: step 0, zero moments, and
    masters from the weight's core values where it keeps them."""
    st["step"] = torch.tensor(0.0, dtype=torch.float32)
    for key in MOMENTS[: 3 if amsgrad else 2]:
        st[key] = torch.zeros(lay.numel_selected, dtype=torch.float32, device=lay.indices.device)
    if masters.keeps(p):
        st["master"] = core_values(p, lay).to(torch.float32)
    st["block_indices"], st["block_size"] = lay.recorded_mask()
    return st


def follow_device(p: Tensor, lay: ParamLayout, st: dict, what: str) -> ParamLayout:
    """The layout (and state) on the device `p`'s storage is on now (`model.to(...)`)."""
    device = local_tensor(p).device
    if lay.indices.device == device:
        return lay
    for k, v in st.items():
        if isinstance(v, Tensor) and v.dim():
            st[k] = v.to(device)
    return ParamLayout.of(lay.entry, p, what)


def ready_state(state: dict, p: Tensor, lay: ParamLayout, amsgrad: bool, masters: Masters) -> None:
    """Make `p`'s state fit a step: create it if missing (new, or cleared by the user), add
    what an option needs, drop masters a parameter no longer keeps (a bf16 parameter cast to
    fp32). What is there is checked by the step (`functional.check_state`)."""
    st = state.get(p)
    if not st or "exp_avg" not in st:
        st = new_state(state[p], p, lay, amsgrad, masters)
    if amsgrad and "max_exp_avg_sq" not in st:
        st["max_exp_avg_sq"] = torch.zeros_like(st["exp_avg_sq"])
    if not masters.keeps(p):
        st.pop("master", None)
    elif "master" not in st:  # e.g. loaded without
        st["master"] = core_values(p, lay).to(torch.float32)
    if not isinstance(st["step"], Tensor):  # a number put there by hand
        st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)


def export_state(sd: dict, params: list[Tensor], layout: dict[Tensor, ParamLayout]) -> dict:
    """torch's state_dict `sd` with each sharded parameter's moments as the global compact
    state split evenly over the ranks (`sharding.sharded_state`; collective)."""
    for pid, st in sd["state"].items():
        lay = layout.get(params[pid]) if isinstance(pid, int) and pid < len(params) else None
        if lay is not None and lay.shard is not None:
            st = sd["state"][pid] = dict(st)  # torch's state_dict shares the live dicts
            for k in MOMENTS:
                if k in st:
                    st[k] = sharded_state(st[k], lay.entry, lay.shard)
    return sd


def split_saved_state(state_dict: dict, groups: list[dict], layout: dict[Tensor, ParamLayout],
                      describe) -> tuple[dict, dict[Tensor, dict[str, Tensor]]]:
    """A saved state_dict's state for torch's loader (without the compact tensors, which it
    would cast to the parameter's dtype) and, per parameter, its compact tensors as this
    rank's slice. Raises before anything is loaded if a saved mask differs from ours, or if
    the state is a dense one (torch.optim.AdamW's)."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, groups)):
        raise ValueError("loaded state dict has different parameter groups than this optimizer")
    id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                      chain.from_iterable(g["params"] for g in groups)))
    kept: dict[Tensor, dict[str, Tensor]] = {}
    state: dict[Any, Any] = {}
    for pid, st in state_dict["state"].items():
        p = id_map.get(pid)
        if p is None:
            state[pid] = st
            continue
        st = dict(st)
        moved = {k: st.pop(k) for k in (*MOMENTS, "block_indices") if k in st}
        lay = layout.get(p)
        saved_idx = moved.pop("block_indices", None)
        if saved_idx is None and "exp_avg" in moved and "block_size" not in st:
            raise ValueError(
                f"load_state_dict: the state of {describe(p)} is a dense AdamW state (no mask: "
                "torch.optim.AdamW's); load it into a torch.optim.AdamW and hand that over with "
                "trace_kernels.swap_optimizer(adamw, masks), which compacts it onto the core")
        if lay is None or saved_idx is None or st.get("block_size") != lay.entry.block_size or not (
                torch.equal(saved_idx.cpu().to(torch.int64), lay.entry.indices.to(torch.int64))):
            raise ValueError(f"load_state_dict: state for {describe(p)} was saved with a different "
                             "mask than this optimizer has; construct it (or call set_masks) with "
                             "the checkpoint's masks first")
        st.pop("shards", None)  # (written by versions whose layout depended on the world size)
        kept[p] = {k: rank_state(v, lay.entry, lay.shard, lay.offset, lay.numel_selected,
                                 f"load_state_dict: {k} of {describe(p)}") for k, v in moved.items()}
        state[pid] = st
    return state, kept


def restore_compact(state: dict, kept: dict[Tensor, dict[str, Tensor]], layout: dict[Tensor, ParamLayout]) -> None:
    """Put the compact tensors `split_saved_state` kept back into the loaded state."""
    for p, moved in kept.items():
        st, lay = state[p], layout[p]
        for k, v in moved.items():
            st[k] = v.to(device=lay.indices.device, dtype=torch.float32, copy=True)
        st["block_indices"], st["block_size"] = lay.recorded_mask()

