"""The C++/OpenMP CPU backend (trace_kernels._C). Inputs are already validated by `ops`."""

from __future__ import annotations

import torch

from .. import _native
from ._common import adamw_entry_points, advance_steps, inf_found, resolve_lr

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Row widths of the tables passed to _C (field order in csrc/bindings/cpu_module.cpp).
MASKED_FIELDS = 12
STATS_FIELDS = 7


def _ext():
    ext = _native.load("_C")
    if ext is None:  # backends.choose() refuses this case first; keep a clear message anyway
        raise RuntimeError(f"trace_kernels._C is not available: {_native.error('_C')}")
    return ext


def check_block_indices(indices: torch.Tensor, limit: int) -> tuple[int, str] | None:
    return _ext().check_block_indices(
        indices.data_ptr(), indices.dtype == torch.int64, indices.numel(), limit,
        torch.get_num_threads(),
    )


def _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes,
           steps, fishers, fisher_scale, *, lr, lr_tensor, beta1, beta2, eps, weight_decay,
           amsgrad, maximize, grad_scale, found_inf):
    ext = _ext()
    if inf_found(found_inf):
        return
    # fp32 CPU step counters (what the optimizers keep) are incremented natively; any
    # other kind is advanced here and passed by value.
    native_steps = all(s.dtype == torch.float32 and s.device.type == "cpu" for s in steps)
    step_values = [0.0] * len(steps) if native_steps else advance_steps(steps)
    table: list[int] = []
    for i, p in enumerate(params):
        idx = block_indices[i]
        table += [
            p.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
            max_exp_avg_sqs[i].data_ptr() if amsgrad else 0, idx.data_ptr(),
            int(idx.dtype == torch.int64), idx.numel(), block_sizes[i], DTYPE_CODES[p.dtype],
            steps[i].data_ptr() if native_steps else 0,
            fishers[i].data_ptr() if fishers else 0,
        ]
    ext.masked_adamw(
        table, step_values, resolve_lr(lr, lr_tensor), beta1, beta2, eps, weight_decay, amsgrad,
        maximize, float(grad_scale.item()) if grad_scale is not None else None, fisher_scale,
        torch.get_num_threads(),
    )


masked_adamw_, adamw_fisher_ = adamw_entry_points(_adamw)


def delta_stats(post, pre, fishers, refs, block_sizes, num_refs, outputs):
    ext = _ext()
    sum_sq, fisher_sum, dots, ref_sq = outputs
    table: list[int] = []
    row = 0
    for i, t in enumerate(post):
        rs = refs[i * num_refs:(i + 1) * num_refs]
        table += [
            t.data_ptr(), pre[i].data_ptr() if pre else 0, DTYPE_CODES[t.dtype],
            fishers[i].data_ptr() if fishers else 0, t.numel(), block_sizes[i], row,
            *[r.data_ptr() for r in rs], *[DTYPE_CODES[r.dtype] for r in rs],
        ]
        row += t.numel() // block_sizes[i]
    ext.delta_stats(table, len(post), num_refs, sum_sq.data_ptr(), fisher_sum.data_ptr(),
                    dots.data_ptr(), ref_sq.data_ptr(), torch.get_num_threads())
