"""MaskedAdamW: a drop-in torch.optim.AdamW that trains only the selected (core) elements.

The class keeps what torch's optimizers keep, param groups and lazily made state, and the
masks (`binding`); its `step` gathers each group's lists and calls the functional core
(`functional.masked_adamw`), which plans and runs the step. The state and its state_dict
mapping are in `state`, clipping in `clip`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import backends, ops
from ..masks import CoreMask, MaskEntry
from ..sharding import local_tensor
from .args import checked_defaults
from .binding import Binding, describe, flat_params, named_groups, param_names
from .clip import clip_core_grad_norm_
from .core_rows import carrier_of
from .functional import StepPlan, masked_adamw
from .layout import MOMENTS
from .state import (NO_MASTER, Masters, export_state, follow_device, new_state, ready_state, restore_compact,
                    split_saved_state)


class MaskedAdamW(Optimizer):
    """AdamW over core elements only: a selected element gets exactly AdamW's update (fp32
    math, torch's order of operations); any other element is bit-for-bit unchanged, gets no
    weight decay and has no state. Arguments are torch.optim.AdamW's, plus:

    masks: a `CoreMask` keyed by parameter names (pass ``model.named_parameters()`` as
        params so names are known), or a dict ``{parameter: bool tensor | element-index
        tensor | MaskEntry}``.
    unmasked: "freeze" (default): parameters without a mask are never updated;
        "dense": they get plain AdamW.
    backend: force a backend ("cpu", "reference"); default picks the best per device
        (see ``python -m trace_kernels``).
    master_weights: keep an fp32 copy of each core element of a bf16/fp16 parameter (its
        state "master", in mask order), apply the update to it and write it rounded to the
        parameter. Default (None): on for 16-bit parameters, off with stochastic rounding.
        Without it an update smaller than about 1/256 of a weight rounds away in bf16; it
        costs 4 bytes per core element (a 5 % core: 0.2 bytes per parameter, against 4 for
        full master weights). The weight stays the source of truth: a weight written by
        anything else, ``.data`` writes included, keeps what was written.
    rounding: how an fp32 result is written to a 16-bit parameter: "nearest" (even) or
        "stochastic" (bf16; unbiased, its random bits a hash of `seed`, the step, the
        parameter's name and the element, the same on every backend and sharding). seed: None
        draws one from torch's generator.

    ``foreach`` and ``fused`` are accepted for drop-in compatibility (the step is always one
    fused multi-tensor call); ``capturable``, ``differentiable`` and sparse gradients are
    rejected.

    A parameter replaced in ``param_groups`` (accelerate swaps each for its FSDP2 shard
    after the optimizer is built) hands its mask and state to the one that replaces it.
    """

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale/found_inf to the kernel

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        masks: CoreMask | Mapping[Tensor, Any],
        unmasked: str = "freeze",
        backend: str | None = None,
        master_weights: bool | None = None,
        rounding: str = "nearest",
        seed: int | None = None,
    ) -> None:
        defaults = checked_defaults(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            unmasked=unmasked, backend=backend, rounding=rounding, seed=seed, master_weights=master_weights)
        super().__init__(named_groups(params), defaults)
        self._backend = backend
        self._binding = Binding(self.param_groups, masks, unmasked, rounding == "stochastic")
        self._masters = Masters(master_weights, rounding == "stochastic")
        self._plans: dict[int, StepPlan] = {}        # each group's plan of its last step
        self._carrier_rows: dict[Tensor, tuple] = {}  # clip_grad_norm_'s core in each carrier
        for device in {p.device for p in self._layout}:
            backends.choose(device, backend)  # fail now, not at the first step

    # torch's Optimizer pickles only defaults, state and groups; the masks and settings go
    # too (plans are rebuilt at the next step: they hold native tables)
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in ("_backend", "_binding", "_masters")}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plans, self._carrier_rows = {}, {}

    @property
    def _layout(self):
        return self._binding.layout

    def _describe(self, p: Tensor) -> str:
        return describe(self.param_groups, p)

    def _rebind(self) -> None:
        """Follow parameters replaced in ``param_groups`` since the last look (accelerate
        swaps each for its FSDP2 shard after the optimizer is built)."""
        self._binding.rebind(self.param_groups, self.state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as torch's optimizers do). Its parameters have no mask yet: they are
        frozen with unmasked="freeze", trained densely with "dense"; `set_masks` assigns
        masks to them."""
        if hasattr(self, "_binding"):
            self._rebind()
        super().add_param_group(named_groups([param_group])[0])
        if hasattr(self, "_binding"):  # after construction: extend the layout
            self._binding.extend(self.param_groups)

    def set_masks(self, masks: CoreMask | Mapping[Tensor, Any]) -> None:
        """Switch to new masks (a new task). Parameters whose selection changed lose their
        state (moments and step); unchanged ones keep it."""
        self._rebind()
        new = self._binding.resolve(self.param_groups, masks)
        for device in {p.device for p in new}:
            backends.choose(device, self._backend)
        for p in param_names(self.param_groups):
            old, cur = self._layout.get(p), new.get(p)
            if old is None or cur is None or not old.entry.same_selection(cur.entry):
                self.state.pop(p, None)
        self._binding.layout = new

    def mask_of(self, p: Tensor) -> MaskEntry | None:
        """`p`'s core, as a global `MaskEntry` (None: no mask: frozen)."""
        lay = self._layout.get(p)
        return None if lay is None else lay.entry

    def core_elements(self, p: Tensor) -> Tensor:
        """The flat indices of `p`'s core elements in the storage this rank holds, in the
        order its state keeps them (int64, on `p`'s device)."""
        lay = self._layout[p]
        return lay.local.element_indices().to(lay.indices.device)

    def init_state(self, p: Tensor) -> dict[str, Any]:
        """A fresh state for `p` (step 0, zero moments; masters from the weight where it keeps
        them), replacing any it had: to fill from another optimizer (`swap_optimizer`)."""
        self.state.pop(p, None)
        amsgrad = next(g["amsgrad"] for g in self.param_groups if any(q is p for q in g["params"]))
        return new_state(self.state[p], p, self._layout[p], amsgrad, self._masters)

    @property
    def trainable_elements(self) -> int:
        """Core elements over all parameters (global, whatever the sharding)."""
        return sum(lay.entry.numel_selected for lay in self._layout.values())

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state now held on this rank: moments, fp32 masters (4 per
        core element of a 16-bit parameter) and the mask indices."""
        def size(keys):
            return sum(st[k].numel() * st[k].element_size() for st in self.state.values() for k in keys if k in st)

        moments, masters = size(MOMENTS[:3]), size(MOMENTS[3:])
        indices = sum(lay.indices.numel() * lay.indices.element_size()
                      for p, lay in self._layout.items() if p in self.state)
        return {"moments": moments, "masters": masters, "indices": indices, "total": moments + masters + indices}

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, eps: float = 1e-6) -> Tensor:
        """Clip the gradient of what is trained, the core elements, to `max_norm` (L2, over
        every parameter together), and return its norm before clipping, as
        ``torch.nn.utils.clip_grad_norm_`` does over whole tensors. The norm reads only the
        core elements' gradients, so it is the same whether a weight's gradient is full or
        core-only (`install_core_grads`); the scaling applies to the whole gradient tensors."""
        self._rebind()
        return clip_core_grad_norm_(self._layout, max_norm, eps, self._carrier_rows)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over the core elements. GradScaler's grad_scale/found_inf are
        honoured (set on the optimizer by torch.amp.GradScaler.step).

        Each group's lists go to `functional.masked_adamw` with the group's plan of the last
        step: what stays the same from step to step (the parameters stepped, their storage,
        masks and state tensors, the native tables) is planned once and kept until it
        changes (`set_masks`, `add_param_group`, `load_state_dict`, state replaced or cleared
        in ``self.state``, `model.to(...)`, which parameters have a gradient); a step then
        reads only the gradients. A 16-bit weight written by something else since the last
        step keeps what was written (see `state`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._rebind()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        rounding = "stochastic" if self._binding.stochastic else "nearest"
        for gi, group in enumerate(self.param_groups):
            active, carriers = [], []
            for p in group["params"]:
                lay = self._layout.get(p)
                if lay is None or not lay.entry.numel_selected:
                    continue
                c = carrier_of(p)
                if p.grad is not None or c is not None:
                    active.append(p)
                    carriers.append(c)
            if not active:
                continue
            amsgrad = group["amsgrad"]
            states = [self._ready(p, amsgrad) for p in active]
            plan = self._plans.get(gi)
            beta1, beta2 = group["betas"]
            self._plans[gi] = masked_adamw(
                active, [p.grad if c is None else c.grad for p, c in zip(active, carriers)],
                [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                [st["max_exp_avg_sq"] for st in states] if amsgrad else None, [st["step"] for st in states],
                [self._layout[p] for p in active], masters=[st.get("master", NO_MASTER) for st in states],
                carriers=carriers, amsgrad=amsgrad, lr=group["lr"], beta1=beta1, beta2=beta2,
                eps=group["eps"], weight_decay=group["weight_decay"], maximize=group["maximize"],
                grad_scale=grad_scale, found_inf=found_inf, rounding=rounding, seed=group["rounding_seed"],
                backend=self._backend, plan=plan, describe=self._describe,
                all_params=flat_params(self.param_groups), element_base=self._element_base)
        return loss

    def _element_base(self, p: Tensor) -> int:
        """The base of `p`'s element indices in stochastic rounding: a hash of its name (else
        its place in the optimizer), so tensors of one shape draw independent bits."""
        name = param_names(self.param_groups).get(p)
        return ops.element_base(name if name is not None else self._describe(p))

    def _ready(self, p: Tensor, amsgrad: bool) -> dict:
        """`p`'s state, fit for a step: made if missing (lazily, as torch's optimizers do) or
        cleared, completed for the group's options, on the device `p` is on now."""
        st = self.state.get(p)
        lay = self._layout[p]
        if (not st or "exp_avg" not in st or (amsgrad and "max_exp_avg_sq" not in st)
                or ("master" in st) != self._masters.keeps(p) or lay.indices.device != local_tensor(p).device):
            lay = self._layout[p] = follow_device(p, lay, self.state[p], self._describe(p))
            ready_state(self.state, p, lay, amsgrad, self._masters)
            st = self.state[p]
        return st

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state_dict. For a sharded parameter the moments are the global
        compact state as a ShardedTensor split evenly over the ranks, whatever slice each
        steps (`sharding.sharded_state`; collective): `torch.distributed.checkpoint` saves
        it once and loads it at any world size, gathered it is the one-process state; the
        mask is the global one."""
        self._rebind()
        return export_state(super().state_dict(), flat_params(self.param_groups), self._layout)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict saved by a MaskedAdamW with the same masks.

        Moments stay fp32 and indices keep their integer dtype (torch's default loader
        would cast both to the parameter dtype). A saved state whose mask differs from
        this optimizer's raises ValueError before anything is loaded. For a sharded
        parameter a moment may come as this rank's slice (a ShardedTensor filled by
        `torch.distributed.checkpoint`, or a tensor of the rank's length) or as the whole
        global compact state (a full state dict, any world size), of which the rank keeps
        its slice.
        """
        self._rebind()
        state, kept = split_saved_state(state_dict, self.param_groups, self._layout, self._describe)
        super().load_state_dict({**state_dict, "state": state})
        for group in self.param_groups:  # a checkpoint from before the seed was saved
            group.setdefault("rounding_seed", self.defaults["rounding_seed"])
        restore_compact(self.state, kept, self._layout)


# Optimizers (not MaskedAdamW) whose state object was found free of compact state: torch
# replaces an optimizer's ``state`` when it loads a state_dict, so each load is checked once.
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def refuse_compact_state(optimizer, args, kwargs) -> None:
    """A global optimizer step pre-hook: another optimizer (torch.optim.AdamW) that loaded a
    MaskedAdamW state_dict would step full-size parameters with core-sized moments and fail
    on a size mismatch; stop it first, saying what to do. O(1) per step once checked."""
    if isinstance(optimizer, MaskedAdamW) or _CHECKED.get(optimizer) is optimizer.state:
        return
    for st in optimizer.state.values():
        if isinstance(st, dict) and "block_indices" in st and "block_size" in st:
            raise ValueError(
                f"{type(optimizer).__name__} holds a state saved by trace_kernels.MaskedAdamW (moments "
                "of the core elements only, in mask order), which it cannot step; load it into a "
                "MaskedAdamW with the same masks instead")
    _CHECKED[optimizer] = optimizer.state
