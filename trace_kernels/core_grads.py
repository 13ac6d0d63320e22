"""Core-only weight gradients for linear layers.

A linear layer y = x Wᵀ + b whose core lies in a few rows of W needs only those rows of the
weight gradient: gW[R] = gy[:, R]ᵀ x, a k × in matrix instead of out × in. A core of a few
scattered elements, spread over most rows, needs only those elements: gW[r, c] is the dot
product of gy's column r with x's column c (`ops.sampled_dot`), k dot products instead of
out × in. `install_core_grads` makes each such layer's backward compute the input gradient
in full and the weight gradient for its core rows (k × in) or core elements (k × 1) only,
into a small *carrier* parameter registered next to the weight (``weight_core_grad``). The
carrier's values are never used (its storage is one element); autograd accumulates its
``.grad`` like any parameter's, so gradient accumulation, ``model.zero_grad()``,
``clip_grad_norm_(model.parameters(), …)`` and
``torch.amp.GradScaler`` see the compact gradients. `MaskedAdamW` steps the weight from its
carrier's gradient; no full-size weight gradient is made. The weight itself gets no
``.grad`` and ``requires_grad=False`` while installed (so DDP and FSDP wait for no gradient
of it; `remove` restores the flag).

Under torch's ``DistributedDataParallel``: install on the module before wrapping it. The
carriers are named in the module's ``_ddp_params_and_buffers_to_ignore`` (DDP neither
broadcasts their one-element storage nor buckets them) and each carrier's accumulated
gradient is averaged over DDP's process group when DDP syncs (not under ``no_sync``), as
DDP averages the gradients it buckets.

An installed layer is a `CoreGradLinear` (an `nn.Linear` subclass) that keeps everything it
needs in itself, so ``copy.deepcopy``, ``torch.save``/``torch.load`` of the whole model and
``model.to`` keep it working. The carriers and index buffers are not part of the model's
``state_dict`` (saved and loaded models are unchanged). ``CoreGrads.remove()`` (or leaving
its ``with`` block) restores the layers; `remove_core_grads(model)` restores every installed
layer of a model (a copy's, say).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .masks import CoreMask, MaskEntry
from .ops.sampled_dot import sampled_dot_trusted
from .sharding import is_dtensor

CARRIER = "weight_core_grad"  # the carrier's name in its module


def core_rows(entry: MaskEntry, cols: int) -> tuple[Tensor, MaskEntry] | None:
    """The rows of a (rows × `cols`) weight that hold core elements, ascending, and the
    entry moved onto the compact (k × cols) matrix of those rows: the same blocks in the
    same order, so state kept in mask order is the same for both. None when the blocks
    neither lie inside rows nor cover whole rows."""
    bs = entry.block_size
    if cols % bs and bs % cols:
        return None
    starts = entry.indices.to(torch.int64) * bs
    first = starts // cols
    if bs > cols:  # a block covers bs/cols whole rows
        span = torch.arange(bs // cols, dtype=torch.int64)
        rows = (first[:, None] + span).reshape(-1)
    else:
        rows = first
    rows = torch.unique(rows, sorted=True)
    place = torch.searchsorted(rows, first)
    compact = (place * cols + starts % cols) // bs
    return rows, MaskEntry((int(rows.numel()), cols), bs, compact)


class _CoreLinear(torch.autograd.Function):
    """F.linear whose backward gives the weight gradient of `rows` only (to the carrier), or
    with `cols` of the elements (rows[i], cols[i]) only."""

    @staticmethod
    def forward(ctx, x, weight, bias, carrier, rows, cols, compute_dtype):
        xc = x if compute_dtype is None else x.to(compute_dtype)
        wc = weight if compute_dtype is None else weight.to(compute_dtype)
        bc = bias if compute_dtype is None or bias is None else bias.to(compute_dtype)
        ctx.save_for_backward(xc, wc, rows, cols)
        ctx.x_dtype, ctx.carrier_dtype = x.dtype, carrier.dtype
        ctx.has_bias = bias is not None
        return F.linear(xc, wc, bc)

    @staticmethod
    def backward(ctx, gy):
        x, w, rows, cols = ctx.saved_tensors
        gy = gy.to(w.dtype)
        gx = gb = gc = None
        if ctx.needs_input_grad[0]:
            gx = gy.matmul(w).to(ctx.x_dtype)
        gy2 = gy.reshape(-1, gy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[3] and cols is None:
            gc = gy2.index_select(1, rows).t().matmul(x2).to(ctx.carrier_dtype)
        elif ctx.needs_input_grad[3]:  # fp32 sums, whatever the compute dtype
            gc = sampled_dot_trusted(gy2.t().float(), x2.t().float(), rows, cols).view(-1, 1).to(ctx.carrier_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)
        return gx, None, gb, gc, None, None, None


CARRIER_INDEX = "weight_core_index"  # buffer: the carrier's rows in the weight viewed as (-1, cols)
CARRIER_PICK = "weight_core_pick"    # buffer: element path, (2, k) rows and columns; else empty
# carriers whose DDP-averaging hook is registered, by id (a copied or loaded carrier has none:
# torch keeps tensor hooks through neither deepcopy nor torch.save)
_HOOKED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class CoreGradLinear(nn.Linear):
    """An `nn.Linear` whose backward computes the weight gradient of its core only, into its
    carrier (`install_core_grads` turns a layer into one; `remove` turns it back). Everything
    it needs lives in the module (the carrier parameter, two non-persistent index buffers, its
    name), so a deepcopy, ``torch.save`` of the whole model and ``model.to`` keep it working;
    the links the optimizer reads (``weight.trace_core_grad``, ``carrier.trace_rows``) are
    set again at every forward, before any gradient exists."""

    def forward(self, x: Tensor) -> Tensor:
        carrier = getattr(self, CARRIER)
        if not (torch.is_grad_enabled() and carrier.requires_grad):
            return F.linear(x, self.weight, self.bias)
        self._link(carrier)
        carrier.trace_ddp_group = _ddp_sync_group(carrier, self._core_grad_name)
        dtype = None
        kind = x.device.type
        if torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
        pick = getattr(self, CARRIER_PICK)
        rows, cols = (getattr(self, CARRIER_INDEX), None) if not pick.numel() else (pick[0], pick[1])
        return _CoreLinear.apply(x, self.weight, self.bias, carrier, rows, cols, dtype)

    def _link(self, carrier: nn.Parameter) -> None:
        """The weight and carrier as the optimizer finds them; the carrier back to one
        element of the weight's dtype on its device (a deepcopy or ``model.to`` makes it a
        full k × in tensor); the DDP hook on this carrier object."""
        weight = self.weight
        if carrier.dtype != weight.dtype or carrier.device != weight.device or any(carrier.stride()):
            carrier.data = torch.empty_strided(carrier.shape, (0,) * carrier.dim(), dtype=weight.dtype,
                                               device=weight.device)
        weight.trace_core_grad = carrier
        carrier.trace_rows = getattr(self, CARRIER_INDEX)
        if _HOOKED.get(id(carrier)) is not carrier:
            carrier.register_post_accumulate_grad_hook(_average_over_ddp)
            _HOOKED[id(carrier)] = carrier

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + CARRIER, None)  # a saved model is the plain model

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + CARRIER in missing_keys:
            missing_keys.remove(prefix + CARRIER)


def _ddp_sync_group(carrier: nn.Parameter, name: str):
    """The process group to average the carrier's gradient over after this forward's
    backward: DDP's when this forward runs inside a DDP forward that syncs, else None."""
    ddp = DistributedDataParallel._active_ddp_module
    if ddp is None:
        return None
    if name not in ddp.parameters_to_ignore:
        raise RuntimeError(
            f"{name}: DistributedDataParallel was built before install_core_grads "
            "(it waits for the weight's full gradient and never averages the compact one); "
            "install on the module first, then wrap it")
    return ddp.process_group if ddp.require_backward_grad_sync else None


def _average_over_ddp(carrier: nn.Parameter) -> None:
    group = carrier.__dict__.pop("trace_ddp_group", None)
    if group is not None and carrier.grad is not None:
        import torch.distributed as dist

        dist.all_reduce(carrier.grad, group=group)
        carrier.grad.div_(dist.get_world_size(group))


def _install(module: nn.Linear, name: str, index: Tensor, pick: Tensor, cols: int) -> None:
    weight = module.weight
    carrier = nn.Parameter(torch.empty_strided((index.numel(), cols), (0, 0), dtype=weight.dtype,
                                               device=weight.device))
    module.register_parameter(CARRIER, carrier)
    module.register_buffer(CARRIER_INDEX, index, persistent=False)
    module.register_buffer(CARRIER_PICK, pick, persistent=False)
    module._core_grad_name = f"{name}.{CARRIER}" if name else CARRIER
    module._core_grad_weight_flag = weight.requires_grad
    module.__class__ = CoreGradLinear
    module._link(carrier)
    weight.requires_grad_(False)


def _uninstall(module: CoreGradLinear) -> None:
    """The layer as it was: a plain nn.Linear, its weight's flag restored."""
    weight = module.weight
    weight.__dict__.pop("trace_core_grad", None)
    weight.requires_grad_(module.__dict__.pop("_core_grad_weight_flag", True))
    del module._parameters[CARRIER]
    for b in (CARRIER_INDEX, CARRIER_PICK):
        del module._buffers[b]
    module.__dict__.pop("_core_grad_name", None)
    module.__class__ = nn.Linear


def remove_core_grads(model: nn.Module) -> int:
    """Turn every installed layer of `model` back into a plain `nn.Linear` (a copy of a model
    with core gradients installed, say); returns how many there were."""
    found = [m for m in model.modules() if isinstance(m, CoreGradLinear)]
    for m in found:
        _uninstall(m)
    return len(found)


class CoreGrads:
    """The layers `install_core_grads` changed (a context manager: leaving it removes them)."""

    def __init__(self, installed: list[tuple[str, CoreGradLinear]], model: nn.Module | None = None,
                 ignored: list | None = None) -> None:
        self._installed = installed
        self._model, self._ignored = model, ignored  # DDP's ignore list before (None: none)

    @property
    def names(self) -> list[str]:
        """The weights whose gradients are compact."""
        return [f"{name}.weight" if name else "weight" for name, _ in self._installed]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The carriers, named as the model names them."""
        return [(m._core_grad_name, getattr(m, CARRIER)) for _, m in self._installed]

    def remove(self) -> None:
        """Restore the layers (the carriers and their gradients are dropped)."""
        if self._model is not None:
            if self._ignored is None:
                self._model.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)
            else:
                self._model._ddp_params_and_buffers_to_ignore = self._ignored
            self._model = None
        for _, m in self._installed:
            if isinstance(m, CoreGradLinear):
                _uninstall(m)
        self._installed = []

    def __enter__(self) -> CoreGrads:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass(frozen=True)
class PathCosts:
    """What a layer's weight gradient costs per token on each path, in multiply-adds of the
    full product (out × in for an out × in weight):

    - rows: ``row_factor · k · in`` for k core rows (a smaller product, a little less
      efficient, plus the gather of k gradient columns);
    - elements: ``element_floor · (out + in) + element_factor · n`` for n core elements (both
      operands read once, then one strided dot product per element).

    A compact path is taken only where it costs at most `margin` of the full product. The
    element path's constants differ fivefold between CPUs (`bench/bench_core_grad_paths.py`,
    SmolLM2-135M's shapes): its dot products are bound by the L2's latency, the full product
    by the FMA units. The defaults are the slower machine's (a 2-core Intel Xeon, floor ≈
    160, factor ≈ 14), so the element path is never chosen where it loses; `for_device`
    gives the constants measured on a CPU like the one running. The choice depends on shapes,
    cores and the CPU's make only, never on a timing, so a run repeats bit for bit on a
    machine."""

    row_factor: float = 1.2
    element_floor: float = 160.0
    element_factor: float = 14.0
    margin: float = 0.9

    def choose(self, out: int, inp: int, rows: int | None, elements: int) -> str:
        """ "rows", "elements" or "full" for an out × inp weight whose core spans `rows` rows
        (None: blocks that straddle rows, no row path) and holds `elements` elements."""
        full = float(out) * inp
        costs = {"elements": self.element_floor * (out + inp) + self.element_factor * elements}
        if rows is not None:
            costs["rows"] = self.row_factor * rows * inp
        path = min(costs, key=costs.get)
        return path if costs[path] <= self.margin * full else "full"

    @staticmethod
    def for_device(device: torch.device | str) -> PathCosts:
        """The constants measured on a CPU of this make (`MEASURED`, by the vendor in
        /proc/cpuinfo), else the conservative defaults (other CPUs, other devices)."""
        if torch.device(device).type != "cpu":
            return COSTS
        return MEASURED.get(cpu_vendor(), COSTS)


COSTS = PathCosts()
# Fitted by bench/bench_core_grad_paths.py (bench/results/core_grad_paths_cpu.md) on 2 cores,
# 512–1024 tokens: the EPYC twice (floor 39 and 27, factor 2.9 and 3.0; the larger floor kept).
# Its element path at 4 % of up_proj costs 0.16–0.19× the full product, where the defaults
# predict 0.94×; with them a SmolLM2 trace step took the full product in 147 of 210 layers,
# with these none, at 0.91× the step's time (one process, interleaved). Refitted at 1000
# tokens (a 40-token tail, round 17, another EPYC): floor 72, factor 3.4; on a real SmolLM2
# core no layer's full product beat its element path, so the choices stand. Round 18 (same
# EPYC), with the row tiles and packed columns transposed through registers: floor 30,
# factor 3.4 (up_proj at 4 %: 0.16×, was 0.28×); the constants, and so the choices, stay.
MEASURED: dict[str, PathCosts] = {"AuthenticAMD": PathCosts(element_floor=40.0, element_factor=3.0)}


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, …); "" where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def install_core_grads(model: nn.Module, core: CoreMask, *, max_row_fraction: float | None = None,
                       max_element_fraction: float | None = None, costs: PathCosts | None = None) -> CoreGrads:
    """Give every `nn.Linear` of `model` whose core makes it cheaper a backward that computes
    only its core rows' weight gradient, or only its core elements' (see the module's
    docstring); which one, or neither, is chosen per layer by the estimated cost of each path
    (`costs`; None: `PathCosts.for_device` of each weight's device). Given `max_row_fraction`
    and/or `max_element_fraction`, fixed rules decide instead: rows where the core lies in at
    most that fraction of the rows (default 0.5), else elements where it is at most that
    fraction of the elements (default 0.04). Weights shared between modules and sharded
    (DTensor) weights keep the full gradient. Returns the handle that removes it.

    Measured against the full product of the same weight, the element path on 1536 × 576 at
    1 / 2 / 4 / 8 % of the elements: 0.49 / 0.57 / 0.71 / 1.42× on 2 Intel Xeon cores (512
    tokens, before round 5's faster kernel), 0.09 / 0.11 / 0.16 / 0.26× on 2 AMD EPYC cores
    (1024 tokens; `PathCosts.for_device`)."""
    fixed = max_row_fraction is not None or max_element_fraction is not None
    max_row_fraction = 0.5 if max_row_fraction is None else max_row_fraction
    max_element_fraction = 0.04 if max_element_fraction is None else max_element_fraction
    if not 0.0 < max_row_fraction <= 1.0:
        raise ValueError(f"max_row_fraction must be in (0, 1], got {max_row_fraction}")
    if not 0.0 <= max_element_fraction <= 1.0:
        raise ValueError(f"max_element_fraction must be in [0, 1], got {max_element_fraction}")
    if isinstance(model, DistributedDataParallel):
        raise TypeError("install_core_grads on the module before wrapping it in "
                        "DistributedDataParallel (DDP must be built knowing the carriers)")
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    installed = []
    try:
        for name, module in model.named_modules():
            key = f"{name}.weight" if name else "weight"
            entry = core.get(key)
            if (type(module) is not nn.Linear or entry is None or not entry.num_selected
                    or CARRIER in module._parameters):  # (a CoreGradLinear is not an nn.Linear)
                continue
            weight = module.weight
            if is_dtensor(weight) or counts.get(id(weight), 0) != 1 or entry.shape != tuple(weight.shape):
                continue
            out, cols = weight.shape
            found = core_rows(entry, cols)
            if fixed:
                path = ("rows" if found is not None and found[0].numel() <= max_row_fraction * out
                        else "elements" if entry.density <= max_element_fraction else "full")
            else:
                path = (costs or PathCosts.for_device(weight.device)).choose(
                    out, cols, None if found is None else int(found[0].numel()), entry.numel_selected)
            if path == "rows":
                rows = found[0].to(weight.device)
                pick = rows.new_empty((0,))
            elif path == "elements":
                rows = core_rows(entry, 1)[0].to(weight.device)  # the core's elements
                pick = torch.stack([rows // cols, rows % cols])
                cols = 1
            else:
                continue
            _install(module, name, rows, pick, cols)
            installed.append((name, module))
    except BaseException:
        CoreGrads(installed).remove()
        raise
    handle = CoreGrads(installed)
    if installed:  # DDP built on `model` later leaves the carriers to `_average_over_ddp`
        ignored = getattr(model, "_ddp_params_and_buffers_to_ignore", None)
        handle = CoreGrads(installed, model, None if ignored is None else list(ignored))
        # (the index buffers are the same on every rank: nothing to broadcast either)
        buffers = [f"{name}.{b}" if name else b for name, _ in installed for b in (CARRIER_INDEX, CARRIER_PICK)]
        model._ddp_params_and_buffers_to_ignore = [*(ignored or []), *(n for n, _ in handle.named_parameters()),
                                                   *buffers]
    return handle
