"""MaskedAdamW: a drop-in torch.optim.AdamW that trains only the selected (core) elements.

The class keeps the masks (`binding`), the compact state (`compact_state`) and the fp32
masters (`masters`), and steps each group through one cached plan (`plan`); clipping is in
`clip`, the stepping of weights with core-rows gradients in `core_rows_step`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends, ops
from .binding import Binding, describe, flat_params, named_groups, param_names
from .clip import clip_core_grad_norm_
from .compact_state import export_state, follow_device, ready_state, restore_compact, split_saved_state
from .core_rows_step import CoreRowsStep, carrier_of
from .layout import MOMENTS
from .masks import CoreMask
from .masters import Masters
from .ops._checks import bump_versions
from .optim_args import checked_defaults
from .plan import GroupPlan
from .sharding import is_dtensor, local_tensor


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
        "stochastic" (bf16; unbiased, its random bits a hash of `seed`, the step and the
        element, the same on every backend). seed: None draws one from torch's generator.

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
            unmasked=unmasked, backend=backend, rounding=rounding, seed=seed)
        super().__init__(named_groups(params), defaults)
        self._backend = backend
        self._binding = Binding(self.param_groups, masks, unmasked, rounding == "stochastic")
        self._masters = Masters(master_weights, rounding == "stochastic")
        self._plans: dict[int, GroupPlan] = {}
        self._carrier_rows: dict[Tensor, tuple] = {}  # clip_grad_norm_'s core in each carrier
        self._version = 0  # bumped whenever what a plan holds may have changed
        for device in {p.device for p in self._layout}:
            backends.choose(device, backend)  # fail now, not at the first step

    # torch's Optimizer pickles only defaults, state and groups; the masks and settings go
    # too (plans are rebuilt at the next step: they hold native tables)
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in ("_backend", "_binding", "_masters")}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plans, self._carrier_rows, self._version = {}, {}, 0

    @property
    def _layout(self):
        return self._binding.layout

    def _describe(self, p: Tensor) -> str:
        return describe(self.param_groups, p)

    def _rebind(self) -> None:
        """Follow parameters replaced in ``param_groups`` since the last look (accelerate
        swaps each for its FSDP2 shard after the optimizer is built)."""
        if self._binding.rebind(self.param_groups, self.state):
            self._version += 1

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as torch's optimizers do). Its parameters have no mask yet: they are
        frozen with unmasked="freeze", trained densely with "dense"; `set_masks` assigns
        masks to them."""
        if hasattr(self, "_binding"):
            self._rebind()
        super().add_param_group(named_groups([param_group])[0])
        if hasattr(self, "_binding"):  # after construction: extend the layout
            self._binding.extend(self.param_groups)
            self._version += 1

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
        self._version += 1

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
        return clip_core_grad_norm_(self._layout, max_norm, eps, self._carrier_rows, self._version)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over the core elements. GradScaler's grad_scale/found_inf are
        honoured (set on the optimizer by torch.amp.GradScaler.step).

        What stays the same from step to step (the parameters stepped, their state, mask
        indices, the native tables) is planned once per group and kept until it changes:
        masks, groups or state (`set_masks`, `add_param_group`, `load_state_dict`, state
        tensors replaced or cleared in ``self.state``), a parameter's storage (moved or cast:
        `model.to(...)`), or which parameters have a gradient. A step then reads only the
        gradients, which may be new tensors every step. A 16-bit weight written by something
        else since the last step keeps what was written (see `masters`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._rebind()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        compiling = torch.compiler.is_compiling()
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
            plan = self._plans.get(gi)
            if plan is None or not plan.fits(self._version, active, carriers, group["amsgrad"], self.state):
                plan = self._plans[gi] = self._plan_group(active, carriers, group["amsgrad"])
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], maximize=group["maximize"],
                         stochastic=self._binding.stochastic, seed=group["rounding_seed"])
            for device, dp in plan.devices.items():
                grads = [self._grad(p, c) for p, c in zip(dp.params, dp.compact)]
                scale = grad_scale.to(device) if grad_scale is not None else None
                inf = found_inf.to(device) if found_inf is not None else None
                if dp.native is not None and not compiling:
                    dp.native.step(grads, grad_scale=scale, found_inf=inf, **hyper)
                    bump_versions(dp.lists["params"])
                else:  # the registered op: traceable by torch.compile
                    l = dp.lists
                    ops.masked_adamw_trusted_(
                        l["params"], grads, l["m"], l["v"], l["vmax"], l["idx"], l["sizes"], l["steps"],
                        amsgrad=plan.amsgrad, grad_scale=scale, found_inf=inf, backend=self._backend,
                        masters=l["masters"], elem_bases=l["bases"], **hyper)
                for c in dp.compact:
                    if c is not None:
                        c.scatter()
        return loss

    def _grad(self, p: Tensor, c: CoreRowsStep | None) -> Tensor:
        """`p`'s gradient as the kernels read it (a core-rows weight's: its carrier's, its
        rows gathered into the buffer the kernels step)."""
        g = p.grad if c is None else c.carrier.grad
        if g.is_sparse:
            raise ValueError(f"MaskedAdamW does not support sparse gradients ({self._describe(p)})")
        g, want = local_tensor(g), local_tensor(p).dtype
        if g.dtype != want:  # the kernels read a gradient as its parameter's dtype
            raise TypeError(f"gradient of {self._describe(p)} is {g.dtype}, its parameter {want}: "
                            "they must match (as torch.optim.AdamW requires)")
        if c is not None:
            c.gather()
        return g if g.is_contiguous() else g.contiguous()

    def _plan_group(self, active: list[Tensor], carriers: list, amsgrad: bool) -> GroupPlan:
        """Check every parameter stepped and its gradient, make its state ready (created
        here if new) and plan the group's step. `carriers`: each parameter's compact-gradient
        carrier, or None (its gradient is its own)."""
        compact = []
        for p, c in zip(active, carriers):
            what = self._describe(p)
            lay = self._layout[p] = follow_device(p, self._layout[p], self.state.get(p, {}), what)
            g = p.grad if c is None else c.grad
            if is_dtensor(p) != is_dtensor(g):
                raise ValueError(f"parameter {what} and its gradient are not sharded alike")
            g, storage = local_tensor(g), local_tensor(p)
            want = storage.shape if c is None else c.shape
            if g.shape != want or g.device != storage.device:
                raise ValueError(f"gradient of {what} is {tuple(g.shape)} on {g.device}, its "
                                 f"parameter's storage {tuple(want)} on {storage.device}")
            compact.append(None if c is None else
                           CoreRowsStep.plan(p, c, lay, what, flat_params(self.param_groups)))
            if ready_state(self.state, p, lay, amsgrad, self._masters, what):
                self._version += 1
        return GroupPlan.build(self._version, active, carriers, compact, self._layout, self.state,
                               amsgrad, self._backend)

    def _init_state(self, p: Tensor, amsgrad: bool) -> dict[str, Any]:
        """A fresh state for `p` (step 0, zero moments), e.g. to fill from another optimizer."""
        self.state.pop(p, None)
        ready_state(self.state, p, self._layout[p], amsgrad, self._masters, self._describe(p))
        self._version += 1
        return self.state[p]

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
        self._version += 1
        restore_compact(self.state, kept, self._layout, self._masters)
