"""The masked AdamW step as one function over a group's lists: `masked_adamw`, what
`MaskedAdamW.step` calls (as torch.optim.AdamW's ``step`` calls its functional ``adamw``)
and anyone can call without the class.

It owns what a step needs beyond the kernel:
- per-device buckets: parameters on several devices are stepped device by device;
- weights whose gradient is compact (`trace_kernels.install_core_grads`): their core rows are
  gathered into a buffer, stepped there from the carrier's gradient and written back;
- the choice of kernel: the backend for the device (`backends.choose`) and its prepared
  launch (the cpu backend's native table, `backends.kernel("plan_masked_adamw", name)`), or,
  for a backend without one and under torch.compile, the registered op at every step;
- the plan (`StepPlan`): all of the above worked out once and returned. Passed back with
  the same parameters on the same storage, carriers, masks and state tensors, a call reads
  only the gradients; anything else is planned (and checked) again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import backends, ops
from ..masks import MaskEntry
from ..ops._checks import bump_versions, check_rounding, stochastic_flag
from ..sharding import is_dtensor, local_tensor
from .core_rows import CoreRowsStep
from .layout import ParamLayout
from .state import NO_MASTER


def storage_key(p: Tensor) -> tuple:
    s = local_tensor(p)
    return s.data_ptr(), s.dtype, s.device


@dataclass
class DevicePlan:
    params: list[Tensor]   # the parameters (their gradients are read at each step)
    lists: dict            # the op's lists, but for the gradients
    launch: Any            # the backend's prepared launch, or None: the op at every step
    rows: list             # per parameter, its CoreRowsStep or None


@dataclass
class StepPlan:
    """A group's planned step: a pure function of what it was built from (`refs`), which
    `fits` compares with a call's objects, by identity."""

    refs: tuple
    storages: list[tuple]  # each parameter's storage address, dtype and device when planned
    amsgrad: bool
    backend: str | None
    devices: dict          # device -> DevicePlan

    def fits(self, refs: tuple, params: list[Tensor], amsgrad: bool, backend: str | None) -> bool:
        return (amsgrad == self.amsgrad and backend == self.backend
                and all(len(a) == len(b) and all(x is y for x, y in zip(a, b)) for a, b in zip(refs, self.refs))
                and all(storage_key(p) == k for p, k in zip(params, self.storages)))


def masked_adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    state_steps: Sequence[Tensor],
    masks: Sequence[ParamLayout | MaskEntry],
    *,
    masters: Sequence[Tensor] | None = None,
    carriers: Sequence[Tensor | None] | None = None,
    amsgrad: bool = False,
    lr: float | Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    rounding: str = "nearest",
    seed: int = 0,
    backend: str | None = None,
    plan: StepPlan | None = None,
    describe: Callable[[Tensor], str] | None = None,
    all_params: Sequence[Tensor] | None = None,
    element_base: Callable[[Tensor], int] | None = None,
) -> StepPlan:
    """One AdamW step over the core elements of `params`, in place; returns the plan to pass
    back next time.

    Per parameter ``i``: ``masks[i]`` its core (a `MaskEntry` of the whole parameter, or the
    `ParamLayout` MaskedAdamW keeps), ``exp_avgs[i]``/``exp_avg_sqs[i]`` (and
    ``max_exp_avg_sqs[i]`` with amsgrad) its fp32 state of the core's ``k·B`` elements in mask
    order, ``state_steps[i]`` its step counter, ``masters[i]`` the fp32 masters of a 16-bit
    parameter's core (or an empty tensor), ``grads[i]`` its gradient: the parameter's, or,
    where ``carriers[i]`` is the carrier of a core-only gradient (`install_core_grads`), the
    carrier's (its core rows). A selected element gets exactly torch.optim.AdamW's update;
    anything else is left bit for bit. ``all_params``: every parameter of the optimizer (a
    carrier must be among them, so zero_grad and clipping see it); `describe(p)`: how errors
    name a parameter (default ``params[i]``); `element_base(p)`: the base of `p`'s element
    indices for stochastic rounding (`ops.element_base` of its name; default 0), to which a
    shard's offset is added."""
    params = list(params)
    n = len(params)
    carriers = list(carriers) if carriers is not None else [None] * n
    masters = list(masters) if masters is not None else [NO_MASTER] * n
    vmax = list(max_exp_avg_sqs or [])
    refs = (params, carriers, list(masks), list(exp_avgs), list(exp_avg_sqs), vmax, list(state_steps), masters)
    stochastic = stochastic_flag("masked_adamw", rounding)
    if plan is None or not plan.fits(refs, params, amsgrad, backend):
        what = [describe(p) if describe is not None else f"params[{i}]" for i, p in enumerate(params)]
        plan = _plan(refs, grads, amsgrad, backend, what, all_params if all_params is not None else params,
                     element_base)
        for dp in plan.devices.values():
            lst = dp.lists
            check_rounding("masked_adamw", lst["params"], lst["masters"], lst["bases"], stochastic, seed,
                           [i.numel() * b for i, b in zip(lst["idx"], lst["sizes"])])
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize,
                 stochastic=stochastic, seed=seed)
    compiling = torch.compiler.is_compiling()
    grad_of = {id(p): g for p, g in zip(params, grads)}
    for device, dp in plan.devices.items():
        gs = [_grad(p, grad_of[id(p)], r) for p, r in zip(dp.params, dp.rows)]
        scale = grad_scale.to(device) if grad_scale is not None else None
        inf = found_inf.to(device) if found_inf is not None else None
        if dp.launch is not None and not compiling:
            dp.launch.step(gs, grad_scale=scale, found_inf=inf, **hyper)
            bump_versions(dp.lists["params"])
        else:  # the registered op: traceable by torch.compile
            lst = dp.lists
            ops.masked_adamw_trusted_(
                lst["params"], gs, lst["m"], lst["v"], lst["vmax"], lst["idx"], lst["sizes"], lst["steps"],
                amsgrad=amsgrad, grad_scale=scale, found_inf=inf, backend=backend,
                masters=lst["masters"], elem_bases=lst["bases"], **hyper)
        for r in dp.rows:
            if r is not None:
                r.scatter()
    return plan


def _grad(p: Tensor, g: Tensor, rows: CoreRowsStep | None) -> Tensor:
    """`p`'s gradient as the kernels read it (for a core-rows weight, its carrier's, after its
    rows were gathered into the buffer the kernels step)."""
    g = local_tensor(g)
    if rows is not None:
        rows.gather()
    return g if g.is_contiguous() else g.contiguous()


def _plan(refs: tuple, grads, amsgrad: bool, backend: str | None, what: list[str], all_params,
          element_base: Callable[[Tensor], int] | None) -> StepPlan:
    """Check every parameter, its gradient and state, and plan the step, device by device."""
    params, carriers, masks, m, v, vmax, steps, masters = refs
    if amsgrad and len(vmax) != len(params):
        raise ValueError(f"amsgrad: max_exp_avg_sqs has {len(vmax)} entries for {len(params)} parameters")
    layouts, rows = [], []
    for i, p in enumerate(params):
        lay = masks[i] if isinstance(masks[i], ParamLayout) else ParamLayout.of(masks[i], p, what[i])
        layouts.append(lay)
        g, c = grads[i], carriers[i]
        check_grad(p, g, c, what[i])
        check_state(lay, what[i], local_tensor(p).device, m[i], v[i], vmax[i] if amsgrad else None,
                    masters[i] if masters[i].numel() else None, steps[i])
        rows.append(None if c is None else CoreRowsStep.plan(p, c, lay, what[i], list(all_params)))
    buckets: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault(local_tensor(p).device, []).append(i)
    devices = {}
    for device, where in buckets.items():
        lays = [layouts[i] for i in where]
        kept = [masters[i] for i in where]
        lists = {
            "params": [local_tensor(params[i]) if rows[i] is None else rows[i].rows_buffer for i in where],
            "m": [m[i] for i in where], "v": [v[i] for i in where],
            "vmax": [vmax[i] for i in where] if amsgrad else [],
            "idx": [lay.kernel_indices if rows[i] is None else rows[i].indices for i, lay in zip(where, lays)],
            "sizes": [lay.kernel.block_size if rows[i] is None else rows[i].block_size for i, lay in zip(where, lays)],
            "steps": [steps[i] for i in where],
            "masters": kept if any(x.numel() for x in kept) else [],
            # stochastic rounding keys on the element's place in what the kernel steps (for a
            # core-rows weight: in its rows buffer, so its bits differ from the full-gradient
            # path's; the rounding is as unbiased), in the parameter's own range of indices
            "bases": [(lay.shard.lo if lay.shard is not None else 0)
                      + (element_base(params[i]) if element_base is not None else 0)
                      for i, lay in zip(where, lays)]}
        name = backends.choose(device, backend).name
        planner = backends.kernel("plan_masked_adamw", name)
        devices[device] = DevicePlan([params[i] for i in where], lists,
                                     planner(lists, amsgrad) if planner is not None else None,
                                     [rows[i] for i in where])
    return StepPlan(refs, [storage_key(p) for p in params], amsgrad, backend, devices)


def check_grad(p: Tensor, g: Tensor | None, carrier: Tensor | None, what: str) -> None:
    """The gradient the kernels will read for `p`: present, dense, of its parameter's dtype,
    sharded alike, and shaped as its storage (or its carrier, for core-only gradients)."""
    if g is None:
        raise ValueError(f"parameter {what} has no gradient to step")
    if g.is_sparse:
        raise ValueError(f"MaskedAdamW does not support sparse gradients ({what})")
    if is_dtensor(p) != is_dtensor(g):
        raise ValueError(f"parameter {what} and its gradient are not sharded alike")
    gl, storage = local_tensor(g), local_tensor(p)
    if gl.dtype != storage.dtype:  # the kernels read a gradient as its parameter's dtype
        raise TypeError(f"gradient of {what} is {gl.dtype}, its parameter {storage.dtype}: "
                        "they must match (as torch.optim.AdamW requires)")
    want = storage.shape if carrier is None else carrier.shape
    if gl.shape != want or gl.device != storage.device:
        raise ValueError(f"gradient of {what} is {tuple(gl.shape)} on {gl.device}, its "
                         f"parameter's storage {tuple(want)} on {storage.device}")


def check_state(lay: ParamLayout, what: str, device: torch.device, *tensors: Tensor | None) -> None:
    """Each state tensor a contiguous fp32 tensor of the core's elements on the parameter's
    device (a user or helper may have replaced any of them); the step one number."""
    *compact, step = tensors
    for key, t in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master"), compact):
        if t is not None and (not isinstance(t, Tensor) or t.dtype != torch.float32
                              or t.numel() != lay.numel_selected or t.device != device
                              or not t.is_contiguous()):
            shown = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"state {key!r} of {what} is {shown}; it must be a contiguous float32 "
                             f"tensor of the core's {lay.numel_selected} elements on {device}")
    if not isinstance(step, Tensor) or step.numel() != 1:
        raise ValueError(f"state 'step' of {what} must hold one number")
