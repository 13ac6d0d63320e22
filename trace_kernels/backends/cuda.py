"""The CUDA backend (trace_kernels._cuda). Inputs are already validated by `ops`.

Kernels launch on torch's current stream of the tensors' device. What a launch reads is
planned once and kept on the device, in tensors from torch's caching allocator:
- the tile list of a mask layout (block sizes and counts), built by the extension;
- the per-tensor table (addresses, sizes), rebuilt only when an address changes (a
  gradient reallocated at another address, new state).
A step then copies no planning data. The AdamW coefficients are made on the device from
lr and each tensor's step, so nothing waits for the GPU:
- no AMP: no host synchronisation. Steps kept on the device are read there; steps kept on
  the host (as `MaskedAdamW` keeps them) travel as one small array per step, copied
  asynchronously from pinned memory;
- AMP: grad_scale and found_inf are read on the device. With steps on the device the step
  counters advance by ``found_inf == 0`` on the device too (no synchronisation); with
  steps on the host, found_inf is read once (one synchronisation), as every backend must
  to leave host counters unchanged on a skipped step.
Counters are advanced only after a launch succeeded, so a failed launch changes nothing.

The same code runs on the CPU with the extension built over csrc/cuda/host/ (tests only):
`_ext` and `_stream` are the two points where the device comes in.
"""

from __future__ import annotations

import torch

from .. import _native
from .registry import register_kernel
from ._common import advance_steps, host_lr, register_adamw, split_stats
from ._layout import masked_row, stats_row
from ._plan_cache import PLANS



def _ext():
    ext = _native.load("_cuda")
    if ext is None:
        raise RuntimeError(f"trace_kernels._cuda is not available: {_native.error('_cuda')}")
    return ext


def _stream(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.current_stream(index).cuda_stream, index


def supported_capability(archs: str, capability: tuple[int, int]) -> bool:
    """Whether a build for `archs` (e.g. "80;90": machine code for each, PTX for the
    newest) runs on a device of `capability`: machine code of the same major version and a
    lower or equal minor one ("90a" only on 9.0), or PTX of a lower or equal version, which
    the driver compiles."""
    major, minor = capability
    codes = [a for a in archs.split(";") if a]
    for a in codes:
        exact = a.endswith("a")
        n = int(a.rstrip("a"))
        if (exact and (major, minor) == divmod(n, 10)) or (
                not exact and major == n // 10 and minor >= n % 10):
            return True
    ptx = int(codes[-1].rstrip("a")) if codes else None
    return ptx is not None and not codes[-1].endswith("a") and major * 10 + minor >= ptx


def unavailable_reason(index: int | None = None) -> str | None:
    ext = _native.load("_cuda")
    if ext is None:
        return f"the CUDA extension trace_kernels._cuda is not built or failed to load ({_native.error('_cuda')})"
    if ext.device_count() == 0:
        return "the CUDA extension is built but no CUDA device is visible"
    index = torch.cuda.current_device() if index is None else index
    capability = torch.cuda.get_device_capability(index)
    if not supported_capability(ext.ARCHS, capability):
        built = ", ".join(f"sm_{a}" for a in ext.ARCHS.split(";"))
        return (f"cuda:{index} has compute capability {capability[0]}.{capability[1]}, and this "
                f"build holds code for {built} (+PTX of the newest) only; rebuild with "
                "TRACE_KERNELS_CUDA_ARCHS including it")
    return None


def _on_device(data: bytes, device: torch.device) -> torch.Tensor:
    """Bytes made by the extension, as a uint8 tensor on `device` (at least one byte)."""
    host = torch.frombuffer(bytearray(data or b"\0"), dtype=torch.uint8)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _per_step(steps: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Host step counters as one fp64 array on `device`, copied without a host sync."""
    host = torch.stack([s.detach().reshape(()).to("cpu", torch.float64) for s in steps])
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def tile_plan(ext, block_sizes: list[int], counts: list[int], device: torch.device) -> tuple[torch.Tensor, int]:
    """The tiles of a mask layout on `device`, planned on its first use and kept."""
    tiles = PLANS.get(("cuda", "tiles", device, tuple(block_sizes), tuple(counts)),
                      lambda: _on_device(ext.plan_tiles(list(block_sizes), list(counts)), device))
    return tiles, tiles.numel() // ext.TILE_BYTES


def _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes,
           steps, fishers, fisher_scale, *, lr, beta1, beta2, eps, weight_decay, amsgrad,
           maximize, grad_scale, found_inf, masters=(), elem_bases=(), stochastic=False, seed=0):
    ext = _ext()
    device = params[0].device
    # Steps in this device's memory (fp32/fp64) are read by the kernel; others by value.
    device_steps = all(s.device == device and s.dtype in (torch.float32, torch.float64) for s in steps)
    if not device_steps and found_inf is not None and bool(found_inf.item() != 0):
        return  # host counters: the one synchronisation of an AMP step
    tiles, num_tiles = tile_plan(ext, block_sizes, [i.numel() for i in block_indices], device)
    rows: list[int] = []
    for i, p in enumerate(params):
        rows += masked_row(p, grads[i], exp_avgs[i], exp_avg_sqs[i],
                           max_exp_avg_sqs[i] if amsgrad else None, fishers[i] if fishers else None,
                           masters[i] if masters and masters[i].numel() else None, block_indices[i],
                            block_sizes[i],
                           elem_bases[i] if elem_bases else 0, steps[i] if device_steps else None)
    table = PLANS.get(("cuda", "adamw", device, amsgrad, tuple(rows)),
                      lambda: _on_device(ext.pack_masked(rows, len(params), amsgrad), device))
    step_values = None if device_steps else _per_step(steps, device)
    lr_device = None
    if isinstance(lr, torch.Tensor) and lr.device.type == device.type:
        lr_device = lr.detach().to(device, torch.float64).reshape(1)
    scale = grad_scale.to(device, torch.float32) if grad_scale is not None else None
    found = found_inf.to(device, torch.float32) if found_inf is not None else None
    stream, index = _stream(device)
    ext.masked_adamw(
        table.data_ptr(), len(params), tiles.data_ptr(), num_tiles,
        step_values.data_ptr() if step_values is not None else 0,
        0.0 if lr_device is not None else host_lr(lr),
        lr_device.data_ptr() if lr_device is not None else 0, beta1, beta2, eps, weight_decay,
        amsgrad, maximize, scale.data_ptr() if scale is not None else 0,
        found.data_ptr() if found is not None else 0, fisher_scale, bool(fishers),
        stochastic, seed, stream, index,
    )
    # the launch succeeded: advance the counters (by 0 where the step was skipped)
    if not device_steps:
        advance_steps(steps)
    elif found is None:
        torch._foreach_add_(steps, 1)
    else:
        keep = (found == 0)
        torch._foreach_add_(steps, [keep.to(s.dtype) for s in steps])


masked_adamw_, adamw_fisher_ = register_adamw("cuda", _adamw)


@register_kernel("delta_stats", "cuda")
def delta_stats(post, pre, fishers, refs, block_sizes, num_refs, outputs):
    ext = _ext()
    device = post[0].device
    R = num_refs
    numels = [t.numel() for t in post]
    def build():
        items, splits, num_partials, num_rows = ext.plan_stats(numels, list(block_sizes))
        return (_on_device(items, device), len(items) // ext.STATS_ITEM_BYTES,
                _on_device(splits, device), len(splits) // ext.STATS_SPLIT_BYTES, num_partials, num_rows)

    plan = PLANS.get(("cuda", "stats", device, tuple(numels), tuple(block_sizes)), build)
    items, num_items, splits, num_splits, num_partials, num_rows = plan
    rows: list[int] = []
    first_row = 0
    for i, t in enumerate(post):
        rows += stats_row(t, pre[i] if pre else None, fishers[i] if fishers else None,
                          block_sizes[i], first_row, refs[i * R:(i + 1) * R])
        first_row += t.numel() // block_sizes[i]
    table = _on_device(ext.pack_stats(rows, len(post), R), device)
    width = 2 + 2 * R
    final = torch.zeros(num_rows, width, dtype=torch.float64, device=device)
    partials = torch.zeros(max(num_partials, 1), width, dtype=torch.float64, device=device)
    stream, index = _stream(device)
    ext.delta_stats(table.data_ptr(), items.data_ptr(), num_items, R, partials.data_ptr(),
                    splits.data_ptr(), num_splits, final.data_ptr(), stream, index)
    split_stats(final, outputs, R)
