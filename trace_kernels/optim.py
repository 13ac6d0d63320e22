"""MaskedAdamW: a drop-in torch.optim.AdamW that trains only the selected (core) elements.

A selected element gets exactly AdamW's update (decoupled weight decay, bias correction,
torch's order of operations, fp32 math). An element outside the mask is bit-for-bit
unchanged, gets no weight decay and has no optimizer state: ``exp_avg``/``exp_avg_sq``
(and ``max_exp_avg_sq``) hold ``k*B`` fp32 values in mask order, so state memory scales
with the mask, not the model.

Masks are set at construction or with `set_masks`. Changing a parameter's mask resets that
parameter's state (moments and step), because compact moments of one selection mean
nothing for another; parameters whose mask is unchanged keep their state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends, ops
from .core_grads import core_rows
from .masks import CoreMask, MaskEntry
from .ops._checks import bump_versions
from .plan import (_MOMENTS, _carrier, _Compact, _DevicePlan, _GroupPlan, _Layout, _recorded_mask,
                   _state_refs, _storage_key)
from .sharding import is_dtensor, local_tensor, rank_state, sharded_state

_UNMASKED = ("freeze", "dense")
_ROUNDINGS = ("nearest", "stochastic")
_NO_MASTER = torch.empty(0)  # a parameter without fp32 masters (fp32, or master_weights=False)


def _named_groups(params: Any) -> list[dict[str, Any]]:
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


class MaskedAdamW(Optimizer):
    """AdamW over core elements only. Arguments are torch.optim.AdamW's, plus:

    masks: a `CoreMask` keyed by parameter names (pass ``model.named_parameters()`` as
        params so names are known), or a dict ``{parameter: bool tensor | element-index
        tensor | MaskEntry}``.
    unmasked: "freeze" (default): parameters without a mask are never updated;
        "dense": they get plain AdamW.
    backend: force a backend ("cpu", "reference"); default picks the best per device
        (see ``python -m trace_kernels``).
    master_weights: keep an fp32 copy of each core element of a bf16/fp16 parameter (its
        state "master", in mask order), apply the update to it and write it rounded to the
        parameter. Default (None): on for 16-bit parameters. Without it an update smaller
        than about 1/256 of a weight rounds away in bf16; it costs 4 bytes per core element
        (a 5 % core: 0.2 bytes per parameter, against 4 for full master weights).
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
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError("lr as a Tensor must have one element")
        elif not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid betas: {betas}; each must be in [0, 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if capturable:
            raise ValueError("MaskedAdamW does not support capturable=True (CUDA graph capture)")
        if differentiable:
            raise ValueError("MaskedAdamW does not support differentiable=True")
        if unmasked not in _UNMASKED:
            raise ValueError(f"unmasked must be one of {_UNMASKED}, got {unmasked!r}")
        if rounding not in _ROUNDINGS:
            raise ValueError(f"rounding must be one of {_ROUNDINGS}, got {rounding!r}")
        if seed is not None and (not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        if backend is not None and backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {backends.BACKENDS} or None, got {backend!r}")
        if seed is None:  # drawn only when used: a nearest-rounding run draws nothing
            seed = int(torch.randint(0, 2**62, ()).item()) if rounding == "stochastic" else 0
        # the rounding seed is a group setting, so state_dict saves it and a resumed run
        # rounds bit for bit as the uninterrupted one
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=False, differentiable=False,
            fused=fused, rounding_seed=seed,
        )
        super().__init__(_named_groups(params), defaults)
        self._unmasked = unmasked
        self._backend = backend
        self._master_weights = master_weights
        self._stochastic = rounding == "stochastic"
        self._layout: dict[Tensor, _Layout] = self._resolve(masks)
        self._bound = self._flat_params()  # the parameters the layout and state are keyed by
        self._plans: dict[int, _GroupPlan] = {}
        self._carrier_rows: dict[Tensor, tuple] = {}  # clip_grad_norm_'s core in each carrier
        self._version = 0  # bumped whenever what a plan holds may have changed
        self._written: dict[Tensor, int] = {}  # a 16-bit weight's version when its masters last matched it
        for device in {p.device for p in self._layout}:
            backends.choose(device, backend)  # fail now, not at the first step

    # torch's Optimizer pickles only defaults, state and groups; the masks and settings
    # go too (plans are rebuilt at the next step: they hold native tables)
    _PICKLED = ("_unmasked", "_backend", "_master_weights", "_stochastic", "_layout", "_bound", "_written")

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in self._PICKLED}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plans, self._carrier_rows, self._version = {}, {}, 0

    # ---- masks --------------------------------------------------------------------
    def _param_names(self) -> dict[Tensor, str]:
        names = {}
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                names[p] = group["param_names"][i] if "param_names" in group else None
        return names

    def _describe(self, p: Tensor) -> str:
        name = self._param_names().get(p)
        if name is not None:
            return repr(name)
        return f"params[{next(i for i, q in enumerate(self._flat_params()) if q is p)}]"

    def _resolve(self, masks: Any) -> dict[Tensor, _Layout]:
        names = self._param_names()
        entries: dict[Tensor, MaskEntry] = {}
        if isinstance(masks, CoreMask):
            if any(n is None for n in names.values()):
                raise ValueError(
                    "masks is a CoreMask keyed by parameter names: pass model.named_parameters() "
                    "(or (name, tensor) pairs) as params so MaskedAdamW knows the names"
                )
            by_name = {n: p for p, n in names.items()}
            unknown = [n for n in masks if n not in by_name]
            if unknown:
                shown = ", ".join(repr(n) for n in unknown[:5])
                raise ValueError(
                    f"masks names {len(unknown)} parameter(s) not in this optimizer: {shown}"
                )
            for n, e in masks.items():
                entries[by_name[n]] = e
        elif isinstance(masks, Mapping):
            for p, m in masks.items():
                if not isinstance(p, Tensor) or p not in names:
                    raise ValueError("masks dict keys must be parameters given to this optimizer")
                entries[p] = self._entry_from_value(p, m)
        else:
            raise TypeError(
                f"masks must be a CoreMask or a dict {{parameter: mask}}, got {type(masks).__name__}"
            )
        layout = {}
        for p in names:
            if getattr(p, "trace_rows", None) is not None:
                continue  # a compact-gradient carrier (core_grads): stepped with its weight
            e = entries.get(p)
            if e is None and self._unmasked == "dense":
                n = p.numel()
                e = MaskEntry(tuple(p.shape), max(n, 1), torch.arange(1 if n else 0, dtype=torch.int32))
            if e is not None:
                layout[p] = self._layout_of(e, p)
        return layout

    def _layout_of(self, e: MaskEntry, p: Tensor) -> _Layout:
        """`e` on `p`'s storage, after checking that the kernels can step `p`."""
        if e.shape != tuple(p.shape):
            raise ValueError(
                f"mask for {self._describe(p)} has shape {e.shape}, parameter has {tuple(p.shape)}"
            )
        if not p.is_contiguous():
            raise ValueError(f"parameter {self._describe(p)} is not contiguous; masks need flat storage")
        if p.dtype not in ops.PARAM_DTYPES:
            raise TypeError(f"parameter {self._describe(p)} has unsupported dtype {p.dtype}")
        if self._stochastic and p.dtype == torch.float16:
            raise TypeError(f"parameter {self._describe(p)} is fp16: stochastic rounding "
                            "supports bf16 parameters (use master_weights for fp16)")
        return _Layout.of(e, p, self._describe(p))

    def _flat_params(self) -> list[Tensor]:
        """Every parameter of every group, in order (torch's state_dict numbering)."""
        return [p for g in self.param_groups for p in g["params"]]

    def _rebind(self) -> None:
        """Follow parameters replaced in ``param_groups`` since the optimizer last looked.
        accelerate's FSDP2 preparation does this: the optimizer is built on the full model,
        then each parameter in its groups is swapped for its sharded DTensor. A replacement
        takes over the parameter at its place: its mask (global, so it is mapped onto the new
        shard) and its state (global compact moments are cut to the new shard's slice)."""
        flat = self._flat_params()
        bound = self._bound
        if len(flat) == len(bound) and all(a is b for a, b in zip(flat, bound)):
            return
        if len(flat) != len(bound):
            raise ValueError("parameters were added to or removed from param_groups directly; "
                             "use add_param_group (MaskedAdamW maps masks by a parameter's place)")
        for old, new in zip(bound, flat):
            if old is new:
                continue
            lay = self._layout.pop(old, None)
            state = self.state.pop(old, None)
            if lay is None:
                if state:
                    self.state[new] = state
                continue
            if tuple(new.shape) != tuple(old.shape):
                raise ValueError(f"parameter {self._describe(new)} was replaced by one of shape "
                                 f"{tuple(new.shape)}; its mask is for {tuple(old.shape)}")
            new_lay = self._layout[new] = self._layout_of(lay.entry, new)
            if state:
                if lay.shard is not None and not new_lay.local.same_selection(lay.local):
                    raise ValueError(f"parameter {self._describe(new)} was resharded after its state "
                                     "was made; save and load a checkpoint instead")
                device = new_lay.indices.device
                for k in _MOMENTS:
                    if k in state:
                        state[k] = rank_state(state[k], new_lay.entry, new_lay.shard, new_lay.offset,
                                              new_lay.numel_selected, f"state {k} of {self._describe(new)}"
                                              ).to(device).contiguous()
                state["block_indices"], state["block_size"] = _recorded_mask(new_lay)
                self.state[new] = state
        self._bound = flat
        self._version += 1

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as torch's optimizers do). Its parameters have no mask yet: they are
        frozen with unmasked="freeze", trained densely with "dense"; `set_masks` assigns
        masks to them."""
        if hasattr(self, "_layout"):
            self._rebind()
        super().add_param_group(_named_groups([param_group])[0])
        if hasattr(self, "_layout"):  # after construction: extend the layout
            for p, lay in self._resolve({}).items():
                self._layout.setdefault(p, lay)
            self._bound = self._flat_params()
            self._version += 1

    def _entry_from_value(self, p: Tensor, m: Any) -> MaskEntry:
        if isinstance(m, MaskEntry):
            return m
        if isinstance(m, Tensor) and m.dtype == torch.bool:
            if m.shape != p.shape:
                raise ValueError(
                    f"bool mask for {self._describe(p)} has shape {tuple(m.shape)}, "
                    f"parameter has {tuple(p.shape)}"
                )
            return MaskEntry.from_bool(m)
        if isinstance(m, Tensor) and m.dtype in ops.INDEX_DTYPES:
            try:
                return MaskEntry(tuple(p.shape), 1, m.cpu())
            except ValueError as exc:
                raise ValueError(f"mask for {self._describe(p)}: {exc}") from None
        raise TypeError(
            f"mask for {self._describe(p)} must be a bool tensor, an index tensor or a MaskEntry"
        )

    def set_masks(self, masks: CoreMask | Mapping[Tensor, Any]) -> None:
        """Switch to new masks (a new task). Parameters whose selection changed lose their
        state (moments and step); unchanged ones keep it."""
        self._rebind()
        new = self._resolve(masks)
        for device in {p.device for p in new}:
            backends.choose(device, self._backend)
        for p in self._param_names():
            old, cur = self._layout.get(p), new.get(p)
            if old is None or cur is None or not old.entry.same_selection(cur.entry):
                self.state.pop(p, None)
        self._layout = new
        self._version += 1

    @property
    def trainable_elements(self) -> int:
        """Core elements over all parameters (global, whatever the sharding)."""
        return sum(lay.entry.numel_selected for lay in self._layout.values())

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state now held on this rank: moments, fp32 masters (4 per
        core element of a 16-bit parameter) and the mask indices."""
        def size(keys):
            return sum(st[k].numel() * st[k].element_size()
                       for st in self.state.values() for k in keys if k in st)

        moments, masters = size(_MOMENTS[:3]), size(_MOMENTS[3:])
        indices = sum(lay.indices.numel() * lay.indices.element_size()
                      for p, lay in self._layout.items() if p in self.state)
        return {"moments": moments, "masters": masters, "indices": indices,
                "total": moments + masters + indices}

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, eps: float = 1e-6) -> Tensor:
        """Clip the gradient of what is trained, the core elements, to `max_norm` (L2, over
        every parameter together), and return its norm before clipping, as
        ``torch.nn.utils.clip_grad_norm_`` does over whole tensors. The norm reads only the
        core elements' gradients, so it is the same whether a weight's gradient is full
        (its frozen elements' entries are never used) or core-only (`install_core_grads`);
        the scaling applies to the whole gradient tensors. A sharded parameter's squares
        are summed over its ranks, so every rank clips alike."""
        self._rebind()
        plain, sharded, grads, group = [], [], [], None
        for p, lay in self._layout.items():
            if not lay.entry.numel_selected:
                continue
            c = _carrier(p)
            if c is not None:  # core rows (or elements) of the weight, in the carrier
                g, (idx, bs) = c.grad, self._rows_in_carrier(p, lay, c)
            elif p.grad is not None:
                g, idx, bs = local_tensor(p.grad), lay.kernel_indices, lay.kernel.block_size
            else:
                continue
            sq = g.reshape(-1, bs).index_select(0, idx.to(torch.int64)).float().square().sum()
            (sharded if lay.shard is not None else plain).append(sq)
            group = lay.shard.group if lay.shard is not None else group
            grads.append(g)
        if not grads:
            return torch.tensor(0.0)
        device = grads[0].device
        total = torch.zeros((), dtype=torch.float32, device=device)
        if sharded:
            total += torch.stack([s.to(device) for s in sharded]).sum()
            import torch.distributed as dist

            dist.all_reduce(total, group=group)
        if plain:
            total += torch.stack([s.to(device) for s in plain]).sum()
        total = total.sqrt()
        coef = (max_norm / (total + eps)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
        return total

    def _rows_in_carrier(self, p: Tensor, lay: _Layout, c: Tensor) -> tuple[Tensor, int]:
        """The core's blocks in a carrier's compact rows (indices, block size), kept until
        the masks or carriers change (finding the rows sorts the core's indices)."""
        hit = self._carrier_rows.get(p)
        if hit is None or hit[0] != self._version or hit[1] is not c:
            kernel = core_rows(lay.entry, c.shape[1])[1].coarsest()
            hit = self._carrier_rows[p] = (self._version, c, kernel.indices.to(c.device, torch.int64),
                                           kernel.block_size)
        return hit[2], hit[3]

    # ---- step ---------------------------------------------------------------------
    def _keeps_master(self, p: Tensor) -> bool:
        wanted = self._master_weights
        return p.dtype != torch.float32 and (wanted is None or wanted)

    @staticmethod
    def _core_values(p: Tensor, lay: _Layout) -> Tensor:
        """The parameter's core elements on this rank, in mask order (a copy)."""
        where = lay.local.element_indices().to(lay.indices.device)
        return local_tensor(p).detach().reshape(-1)[where]

    def _init_master(self, p: Tensor, lay: _Layout, state: dict) -> None:
        """fp32 masters from the parameter's core elements as they are now."""
        state["master"] = self._core_values(p, lay).to(torch.float32)
        self._written[p] = local_tensor(p)._version

    def _sync_masters(self, params: list[Tensor], masters: list[Tensor]) -> None:
        """Masters follow their weight. A weight written since this optimizer last stepped it
        (its version counter moved: ``load_state_dict`` on the model, `set_core_values`, an
        EMA swap) gets masters from its values again, unless they are what the masters round
        to (a resumed run: weights and masters saved together)."""
        for p, m in zip(params, masters):
            storage = local_tensor(p)
            if not m.numel() or self._written.get(p) == storage._version:
                continue
            now = self._core_values(p, self._layout[p])
            if not torch.equal(now, m.to(now.dtype)):
                m.copy_(now)
            self._written[p] = storage._version

    def _mark_written(self, params: list[Tensor], masters: list[Tensor]) -> None:
        for p, m in zip(params, masters):
            if m.numel():
                self._written[p] = local_tensor(p)._version

    def _init_state(self, p: Tensor, lay: _Layout, amsgrad: bool) -> dict[str, Any]:
        self._version += 1
        state = self.state[p]
        n = lay.numel_selected
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for key in _MOMENTS[: 3 if amsgrad else 2]:
            state[key] = torch.zeros(n, dtype=torch.float32, device=lay.indices.device)
        if self._keeps_master(p):
            self._init_master(p, lay, state)
        state["block_indices"], state["block_size"] = _recorded_mask(lay)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over the core elements. GradScaler's grad_scale/found_inf are
        honoured (set on the optimizer by torch.amp.GradScaler.step).

        What stays the same from step to step (the parameters stepped, their state, mask
        indices, the native tables) is planned once per group and kept until it changes:
        masks, groups or state (`set_masks`, `add_param_group`, `load_state_dict`, state
        tensors replaced or cleared in ``self.state``), a parameter's storage (moved or cast:
        `model.to(...)`), or which parameters have a gradient. A step then reads only the
        gradients, which may be new tensors every step. fp32 masters are taken again from a
        16-bit weight that something else wrote since the last step (its version counter)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._rebind()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for gi, group in enumerate(self.param_groups):
            active, carriers = [], []
            for p in group["params"]:
                lay = self._layout.get(p)
                if lay is None or not lay.entry.numel_selected:
                    continue
                c = _carrier(p)
                if p.grad is not None or c is not None:
                    active.append(p)
                    carriers.append(c)
            plan = self._plans.get(gi)
            if plan is None or not plan.fits(self._version, active, carriers, group["amsgrad"], self.state):
                plan = self._plans[gi] = self._plan_group(active, carriers, group["amsgrad"])
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], maximize=group["maximize"],
                         stochastic=self._stochastic, seed=group["rounding_seed"])
            for device, dp in plan.devices.items():
                tracked = bool(dp.lists["masters"]) and not torch.compiler.is_compiling()
                if tracked:
                    self._sync_masters(dp.params, dp.lists["masters"])
                grads = []
                for p, c in zip(dp.params, dp.compact):
                    g = p.grad if c is None else c.carrier.grad
                    if g.is_sparse:
                        raise ValueError(f"MaskedAdamW does not support sparse gradients ({self._describe(p)})")
                    g = local_tensor(g)
                    want = local_tensor(p).dtype
                    if g.dtype != want:  # the kernels read a gradient as its parameter's dtype
                        raise TypeError(f"gradient of {self._describe(p)} is {g.dtype}, its parameter "
                                        f"{want}: they must match (as torch.optim.AdamW requires)")
                    grads.append(g if g.is_contiguous() else g.contiguous())
                    if c is not None:
                        torch.index_select(c.weight, 0, c.rows, out=c.rows_buffer)
                scale = grad_scale.to(device) if grad_scale is not None else None
                inf = found_inf.to(device) if found_inf is not None else None
                if dp.native is not None and not torch.compiler.is_compiling():
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
                        c.weight.index_copy_(0, c.rows, c.rows_buffer)
                if tracked:
                    self._mark_written(dp.params, dp.lists["masters"])
        return loss

    def _plan_group(self, active: list[Tensor], carriers: list, amsgrad: bool) -> _GroupPlan:
        """State for every parameter stepped (created here if new), checked, bucketed by
        device, and each bucket's backend plan. `carriers`: each parameter's compact-gradient
        carrier, or None (its gradient is its own)."""
        for p, c in zip(active, carriers):
            lay = self._layout[p]
            storage = local_tensor(p)
            if lay.indices.device != storage.device:  # the parameter moved: so do its mask and state
                self._layout[p] = lay = _Layout.of(lay.entry, p, self._describe(p))
                for k, v in self.state.get(p, {}).items():
                    if isinstance(v, Tensor) and v.dim():
                        self.state[p][k] = v.to(storage.device)
            if c is not None:
                self._check_carrier(p, c, lay)
            g = p.grad if c is None else c.grad
            if is_dtensor(p) != is_dtensor(g):
                raise ValueError(f"parameter {self._describe(p)} and its gradient are not sharded alike")
            g = local_tensor(g)
            want = storage.shape if c is None else c.shape
            if g.shape != want or g.device != storage.device:
                raise ValueError(
                    f"gradient of {self._describe(p)} is {tuple(g.shape)} on {g.device}, its "
                    f"parameter's storage {tuple(want)} on {storage.device}")
            state = self.state.get(p)
            if not state or "exp_avg" not in state:  # new, or cleared by the user
                state = self._init_state(p, lay, amsgrad)
            if amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
            if not self._keeps_master(p):  # e.g. a bf16 parameter cast to fp32
                state.pop("master", None)
            elif "master" not in state:  # e.g. loaded without
                self._init_master(p, lay, state)
            self._check_state(p, lay, state)
        buckets: dict[torch.device, list[tuple[Tensor, Tensor | None]]] = {}
        for p, c in zip(active, carriers):
            buckets.setdefault(local_tensor(p).device, []).append((p, c))
        devices = {}
        for device, pairs in buckets.items():
            params = [p for p, _ in pairs]
            states = [self.state[p] for p in params]
            lays = [self._layout[p] for p in params]
            masters = [st.get("master", _NO_MASTER) for st in states]
            compact = [self._compact(p, c, lay) if c is not None else None
                       for (p, c), lay in zip(pairs, lays)]
            lists = {
                "params": [local_tensor(p) if c is None else c.rows_buffer for p, c in zip(params, compact)],
                "m": [st["exp_avg"] for st in states],
                "v": [st["exp_avg_sq"] for st in states],
                "vmax": [st["max_exp_avg_sq"] for st in states] if amsgrad else [],
                "idx": [lay.kernel_indices if c is None else c.indices for lay, c in zip(lays, compact)],
                "sizes": [lay.kernel.block_size if c is None else c.block_size for lay, c in zip(lays, compact)],
                "steps": [st["step"] for st in states],
                "masters": masters if any(m.numel() for m in masters) else [],
                # stochastic rounding keys on the element's place in what the kernel steps
                # (for a core-rows weight: in its rows buffer, so its bits differ from the
                # full-gradient path's; the rounding is as unbiased)
                "bases": [lay.shard.lo if lay.shard is not None else 0 for lay in lays]}
            native = backends.plan_masked_adamw(backends.choose(device, self._backend).name, lists, amsgrad)
            devices[device] = _DevicePlan(params, lists, native, compact)
        return _GroupPlan(self._version, active, amsgrad, devices,
                          [_storage_key(p) for p in active], carriers,
                          [_state_refs(self.state.get(p)) for p in active])

    def _check_state(self, p: Tensor, lay: _Layout, state: dict) -> None:
        """The state a user or helper may have replaced must still fit the kernels: compact
        fp32 moments (and masters) of the core's length on the parameter's device."""
        if not isinstance(state["step"], Tensor):  # a number put there by hand
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
        device = local_tensor(p).device
        for k in _MOMENTS:
            v = state.get(k)
            if v is not None and (not isinstance(v, Tensor) or v.dtype != torch.float32
                                  or v.numel() != lay.numel_selected or v.device != device
                                  or not v.is_contiguous()):
                shown = f"{tuple(v.shape)} {v.dtype} on {v.device}" if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"state {k!r} of {self._describe(p)} is {shown}; it must be a "
                                 f"contiguous float32 tensor of the core's {lay.numel_selected} "
                                 f"elements on {device}")
        if state["step"].numel() != 1:
            raise ValueError(f"state 'step' of {self._describe(p)} must hold one number")

    def _check_carrier(self, p: Tensor, c: Tensor, lay: _Layout) -> None:
        if lay.shard is not None:
            raise ValueError(f"{self._describe(p)}: core-rows gradients need an unsharded weight")
        if not any(c is q for q in self._flat_params()):
            raise ValueError(
                f"{self._describe(p)} has a core-rows gradient whose carrier is not in this "
                "optimizer: pass it too (model.named_parameters() includes it), so zero_grad, "
                "GradScaler and gradient clipping see it")

    @staticmethod
    def _compact(p: Tensor, carrier: Tensor, lay: _Layout) -> _Compact:
        rows = carrier.trace_rows
        weight = local_tensor(p).view(-1, carrier.shape[1])  # (out, in) for rows, (numel, 1) for elements
        found = core_rows(lay.entry, weight.shape[1])
        if found is None or not torch.equal(found[0], rows.cpu()):
            raise ValueError("the core-rows gradient was installed for another core than the "
                             "optimizer's mask (install_core_grads after set_masks)")
        kernel = found[1].coarsest()
        return _Compact(weight, carrier, rows.to(weight.device),
                        torch.empty((rows.numel(), weight.shape[1]), dtype=weight.dtype, device=weight.device),
                        kernel.indices.to(weight.device), kernel.block_size)

    # ---- checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state_dict. For a sharded parameter the moments are the global
        compact state as a ShardedTensor split evenly over the ranks, whatever slice each
        steps (`sharding.sharded_state`; collective): `torch.distributed.checkpoint` saves
        it once and loads it at any world size, gathered it is the one-process state; the
        mask is the global one."""
        self._rebind()
        sd = super().state_dict()
        params = self._flat_params()
        for pid, st in sd["state"].items():
            lay = self._layout.get(params[pid]) if isinstance(pid, int) and pid < len(params) else None
            if lay is not None and lay.shard is not None:
                st = sd["state"][pid] = dict(st)  # torch's state_dict shares the live dicts
                for k in _MOMENTS:
                    if k in st:
                        st[k] = sharded_state(st[k], lay.entry, lay.shard)
        return sd

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
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            raise ValueError("loaded state dict has different parameter groups than this optimizer")
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups), self._flat_params()))
        kept: dict[Tensor, dict[str, Tensor]] = {}
        state = {}
        for pid, st in state_dict["state"].items():
            p = id_map.get(pid)
            if p is None:
                state[pid] = st
                continue
            st = dict(st)
            moved = {k: st.pop(k) for k in (*_MOMENTS, "block_indices") if k in st}
            lay = self._layout.get(p)
            saved_idx = moved.get("block_indices")
            if lay is None or saved_idx is None or st.get("block_size") != lay.entry.block_size or not (
                torch.equal(saved_idx.cpu().to(torch.int64), lay.entry.indices.to(torch.int64))
            ):
                raise ValueError(
                    f"load_state_dict: state for {self._describe(p)} was saved with a different "
                    "mask than this optimizer has; construct it (or call set_masks) with the "
                    "checkpoint's masks first"
                )
            st.pop("shards", None)  # (written by versions whose layout depended on the world size)
            for k in _MOMENTS:
                if k in moved:
                    moved[k] = rank_state(moved[k], lay.entry, lay.shard, lay.offset, lay.numel_selected,
                                          f"load_state_dict: {k} of {self._describe(p)}")
            kept[p] = moved
            state[pid] = st
        super().load_state_dict({**state_dict, "state": state})
        for group in self.param_groups:  # a checkpoint from before the seed was saved
            group.setdefault("rounding_seed", self.defaults["rounding_seed"])
        self._version += 1
        for p, moved in kept.items():
            st = self.state[p]
            lay = self._layout[p]
            for k in _MOMENTS:
                if k in moved:
                    st[k] = moved[k].to(device=lay.indices.device, dtype=torch.float32, copy=True)
            st["block_indices"], st["block_size"] = _recorded_mask(lay)
            if "master" in moved:
                self._written[p] = local_tensor(p)._version
