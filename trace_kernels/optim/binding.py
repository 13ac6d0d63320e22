"""Which core mask each of MaskedAdamW's parameters has, on the storage it has now.

`Binding` turns what a user passes as ``masks`` (a CoreMask by parameter name, or a dict of
bool masks, index tensors or MaskEntries by parameter) into a `ParamLayout` per parameter, and
follows parameters replaced in ``param_groups`` after construction (accelerate swaps each
for its FSDP2 shard), handing each replacement its predecessor's mask and state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..masks import CoreMask, MaskEntry
from ..sharding import rank_state
from .layout import MOMENTS, ParamLayout


def named_groups(params: Any) -> list[dict[str, Any]]:
    """Normalise params into groups, splitting (name, tensor) pairs into 'param_names'."""
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts")
    items = list(params)
    if not items:
        raise ValueError("MaskedAdamW got an empty parameter list")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out = []
    for group in groups:
        if not isinstance(group, dict):
            raise TypeError("param groups must all be dicts once one is")
        group = dict(group)
        ps = group["params"]
        ps = [ps] if isinstance(ps, Tensor) else list(ps)
        if ps and all(isinstance(p, tuple) and len(p) == 2 for p in ps):
            group["param_names"] = [str(n) for n, _ in ps]
            ps = [p for _, p in ps]
        group["params"] = ps
        out.append(group)
    return out


def flat_params(groups: list[dict]) -> list[Tensor]:
    """Every parameter of every group, in order (torch's state_dict numbering)."""
    return [p for g in groups for p in g["params"]]


def param_names(groups: list[dict]) -> dict[Tensor, str | None]:
    return {p: (g["param_names"][i] if "param_names" in g else None)
            for g in groups for i, p in enumerate(g["params"])}


def describe(groups: list[dict], p: Tensor) -> str:
    """How errors name `p`: its name, else its place in the optimizer."""
    name = param_names(groups).get(p)
    if name is not None:
        return repr(name)
    return f"params[{next(i for i, q in enumerate(flat_params(groups)) if q is p)}]"


class Binding:
    """The parameters' layouts (``layout``) and the parameter list they were made for."""

    def __init__(self, groups: list[dict], masks: Any, unmasked: str, stochastic: bool) -> None:
        self.unmasked, self.stochastic = unmasked, stochastic
        self.layout: dict[Tensor, ParamLayout] = self.resolve(groups, masks)
        self.bound = flat_params(groups)

    def resolve(self, groups: list[dict], masks: Any) -> dict[Tensor, ParamLayout]:
        """Each parameter's layout under `masks` (parameters without one: frozen, or whole
        with unmasked="dense"); compact-gradient carriers are stepped with their weight."""
        names = param_names(groups)
        entries: dict[Tensor, MaskEntry] = {}
        if isinstance(masks, CoreMask):
            if any(n is None for n in names.values()):
                raise ValueError(
                    "masks is a CoreMask keyed by parameter names: pass model.named_parameters() "
                    "(or (name, tensor) pairs) as params so MaskedAdamW knows the names")
            by_name = {n: p for p, n in names.items()}
            unknown = [n for n in masks if n not in by_name]
            if unknown:
                shown = ", ".join(repr(n) for n in unknown[:5])
                raise ValueError(f"masks names {len(unknown)} parameter(s) not in this optimizer: {shown}")
            entries = {by_name[n]: e for n, e in masks.items()}
        elif isinstance(masks, Mapping):
            for p, m in masks.items():
                if not isinstance(p, Tensor) or p not in names:
                    raise ValueError("masks dict keys must be parameters given to this optimizer")
                entries[p] = entry_from_value(p, m, describe(groups, p))
        else:
            raise TypeError(f"masks must be a CoreMask or a dict {{parameter: mask}}, got {type(masks).__name__}")
        layout = {}
        for p in names:
            if getattr(p, "trace_rows", None) is not None:
                continue
            e = entries.get(p)
            if e is None and self.unmasked == "dense":
                n = p.numel()
                e = MaskEntry(tuple(p.shape), max(n, 1), torch.arange(1 if n else 0, dtype=torch.int32))
            if e is not None:
                layout[p] = self.layout_of(e, p, describe(groups, p))
        return layout

    def layout_of(self, e: MaskEntry, p: Tensor, what: str) -> ParamLayout:
        """`e` on `p`'s storage, after checking that the kernels can step `p`."""
        if e.shape != tuple(p.shape):
            raise ValueError(f"mask for {what} has shape {e.shape}, parameter has {tuple(p.shape)}")
        if not p.is_contiguous():
            raise ValueError(f"parameter {what} is not contiguous; masks need flat storage")
        if p.dtype not in ops.PARAM_DTYPES:
            raise TypeError(f"parameter {what} has unsupported dtype {p.dtype}")
        if self.stochastic and p.dtype == torch.float16:
            raise TypeError(f"parameter {what} is fp16: stochastic rounding supports bf16 "
                            "parameters (use master_weights for fp16)")
        return ParamLayout.of(e, p, what)

    def rebind(self, groups: list[dict], state: dict) -> bool:
        """Follow parameters replaced in `groups` since the last look; True if any was. A
        replacement takes over the parameter at its place: its mask (global, so it is mapped
        onto the new shard) and its state (global compact moments cut to the new slice)."""
        flat = flat_params(groups)
        if len(flat) == len(self.bound) and all(a is b for a, b in zip(flat, self.bound)):
            return False
        if len(flat) != len(self.bound):
            raise ValueError("parameters were added to or removed from param_groups directly; "
                             "use add_param_group (MaskedAdamW maps masks by a parameter's place)")
        for old, new in zip(self.bound, flat):
            if old is new:
                continue
            lay, st = self.layout.pop(old, None), state.pop(old, None)
            if lay is None:
                if st:
                    state[new] = st
                continue
            what = describe(groups, new)
            if tuple(new.shape) != tuple(old.shape):
                raise ValueError(f"parameter {what} was replaced by one of shape {tuple(new.shape)}; "
                                 f"its mask is for {tuple(old.shape)}")
            new_lay = self.layout[new] = self.layout_of(lay.entry, new, what)
            if st:
                if lay.shard is not None and not new_lay.local.same_selection(lay.local):
                    raise ValueError(f"parameter {what} was resharded after its state was made; "
                                     "save and load a checkpoint instead")
                for k in MOMENTS:
                    if k in st:
                        st[k] = rank_state(st[k], new_lay.entry, new_lay.shard, new_lay.offset,
                                           new_lay.numel_selected, f"state {k} of {what}"
                                           ).to(new_lay.indices.device).contiguous()
                st["block_indices"], st["block_size"] = new_lay.recorded_mask()
                state[new] = st
        self.bound = flat
        return True

    def extend(self, groups: list[dict]) -> None:
        """Layouts for a group just added (no masks yet: frozen, or whole when dense)."""
        for p, lay in self.resolve(groups, {}).items():
            self.layout.setdefault(p, lay)
        self.bound = flat_params(groups)


def entry_from_value(p: Tensor, m: Any, what: str) -> MaskEntry:
    """A MaskEntry from one value of a dict of masks: an entry, a bool mask of `p`'s shape or
    flat element indices."""
    if isinstance(m, MaskEntry):
        return m
    if isinstance(m, Tensor) and m.dtype == torch.bool:
        if m.shape != p.shape:
            raise ValueError(f"bool mask for {what} has shape {tuple(m.shape)}, parameter has {tuple(p.shape)}")
        return MaskEntry.from_bool(m)
    if isinstance(m, Tensor) and m.dtype in ops.INDEX_DTYPES:
        try:
            return MaskEntry(tuple(p.shape), 1, m.cpu())
        except ValueError as exc:
            raise ValueError(f"mask for {what}: {exc}") from None
    raise TypeError(f"mask for {what} must be a bool tensor, an index tensor or a MaskEntry")
