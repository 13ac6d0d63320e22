"""The CUDA backend (trace_kernels._cuda). Inputs are already validated by `ops`.

Kernels launch on torch's current stream of the tensors' device. grad_scale and found_inf
are read on the device (no host synchronisation). Per-parameter steps kept on the host (as
MaskedAdamW keeps them) are advanced there and turned into per-tensor AdamW scalars by the
same C++ function the CPU kernels use; steps in device memory and an lr tensor on the GPU
are read by the kernel, which calls that function itself, so nothing waits for the GPU.
"""

from __future__ import annotations

import math

import torch

from .. import _native
from ._common import adamw_entry_points, advance_steps, host_lr, split_stats
from ._layout import masked_row, stats_row

STATS_SHORT_BLOCK = 32      # blocks up to this size: one thread sums a whole block
STATS_SEGMENT = 1 << 14     # longer blocks: one thread block per segment, then stage two
_plans: dict[tuple, list[int]] = {}


def _ext():
    ext = _native.load("_cuda")
    if ext is None:
        raise RuntimeError(f"trace_kernels._cuda is not available: {_native.error('_cuda')}")
    return ext


def unavailable_reason() -> str | None:
    ext = _native.load("_cuda")
    if ext is None:
        return f"the CUDA extension trace_kernels._cuda is not built or failed to load ({_native.error('_cuda')})"
    if ext.device_count() == 0:
        return "the CUDA extension is built but no CUDA device is visible"
    return None


def _stream(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.current_stream(index).cuda_stream, index


def _tiles(block_sizes, counts, tile) -> list[int]:
    """(tensor, contiguous, start) triples; tiles never cross a block when blocks are long."""
    key = (tuple(block_sizes), tuple(counts), tile)
    hit = _plans.get(key)
    if hit is not None:
        return hit
    out: list[int] = []
    for t, (b, k) in enumerate(zip(block_sizes, counts)):
        if b >= tile:
            for j in range(k):
                for w in range(0, b, tile):
                    out += [t, 1, j * b + w]
        else:
            for c in range(0, k * b, tile):
                out += [t, 0, c]
    if len(_plans) > 64:
        _plans.clear()
    _plans[key] = out
    return out


def _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes,
           steps, fishers, fisher_scale, *, lr, beta1, beta2, eps, weight_decay, amsgrad,
           maximize, grad_scale, found_inf):
    ext = _ext()
    device = params[0].device
    # Steps in this device's memory (fp32/fp64) and an lr tensor on the GPU are read by the
    # kernel itself: no host synchronisation. Host steps are advanced and read here.
    device_steps = bool(steps) and all(s.device == device and s.dtype in (torch.float32, torch.float64)
                                       for s in steps)
    if device_steps:
        torch._foreach_add_(steps, 1)
        step_values = [0.0] * len(steps)
    else:
        step_values = advance_steps(steps)  # found_inf is applied on the device
    lr_device = None
    if isinstance(lr, torch.Tensor) and lr.device.type == "cuda":
        lr_device = lr.detach().to(device, torch.float64).reshape(1)
    if found_inf is not None:
        # torch's fused AdamW takes the same approach: step back the counters of a skipped
        # step (only a host read of found_inf could avoid counting it)
        found = found_inf.to(device, torch.float32)
    table: list[int] = []
    for i, p in enumerate(params):
        table += masked_row(p, grads[i], exp_avgs[i], exp_avg_sqs[i],
                            max_exp_avg_sqs[i] if amsgrad else None, fishers[i] if fishers else None,
                            block_indices[i], block_sizes[i], steps[i] if device_steps else None)
    tiles = _tiles(block_sizes, [i.numel() for i in block_indices], ext.TILE)
    stream, index = _stream(device)
    scale = grad_scale.to(device, torch.float32) if grad_scale is not None else None
    ext.masked_adamw(
        table, step_values, tiles, 0.0 if lr_device is not None else host_lr(lr),
        lr_device.data_ptr() if lr_device is not None else 0, beta1, beta2, eps, weight_decay,
        amsgrad, maximize, scale.data_ptr() if scale is not None else 0,
        found.data_ptr() if found_inf is not None else 0, fisher_scale, bool(fishers), stream, index,
    )
    if found_inf is not None:
        torch._foreach_sub_(steps, [found.to(s.device) for s in steps])


masked_adamw_, adamw_fisher_ = adamw_entry_points(_adamw)


def delta_stats(post, pre, fishers, refs, block_sizes, num_refs, outputs):
    ext = _ext()
    device = post[0].device
    R = num_refs
    width = 2 + 2 * R
    table: list[int] = []
    items: list[int] = []
    splits: list[int] = []
    row = 0
    partials = 0
    for i, t in enumerate(post):
        b = block_sizes[i]
        table += stats_row(t, pre[i] if pre else None, fishers[i] if fishers else None, b, row,
                           refs[i * R:(i + 1) * R])
        nb = t.numel() // b
        if b <= STATS_SHORT_BLOCK:
            span = 256 * b  # one thread per block, 256 threads per item
            for e in range(0, t.numel(), span):
                items += [i, e, min(e + span, t.numel()), -1]
        else:
            pieces = math.ceil(b / STATS_SEGMENT)
            for j in range(nb):
                splits += [row + j, partials, pieces]
                for s in range(pieces):
                    start = j * b + s * STATS_SEGMENT
                    items += [i, start, min(start + STATS_SEGMENT, (j + 1) * b), partials]
                    partials += 1
        row += nb
    final = torch.zeros(row, width, dtype=torch.float64, device=device)
    part = torch.zeros(max(partials, 1), width, dtype=torch.float64, device=device)
    stream, index = _stream(device)
    ext.delta_stats(table, len(post), R, items, splits, part.data_ptr(), final.data_ptr(), stream, index)
    split_stats(final, outputs, R)
