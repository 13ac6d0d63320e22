"""The rows the Python side hands the native bindings: one place for the field order that
csrc/bindings/table_layout.h reads (the extensions export their field names, and a test
holds the two equal), and the dtype codes of csrc/include/trace_kernels/float_convert.h."""

from __future__ import annotations

import torch
from torch import Tensor

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

MASKED_FIELDS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "fisher", "master",
                 "indices", "indices_int64", "num_blocks", "block_size", "numel", "elem_base", "dtype",
                 "step", "step_fp64")
STATS_FIELDS = ("post", "pre", "fisher", "dtype", "numel", "block_size", "first_row")


def _addr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def masked_row(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
               max_exp_avg_sq: Tensor | None, fisher: Tensor | None, master: Tensor | None,
               indices: Tensor, block_size: int, elem_base: int, step: Tensor | None) -> list[int]:
    """One tensor of an AdamW launch. `step`: the step counter the native side reads (or,
    on the CPU, increments), or None when the step is passed by value. `elem_base`: where
    the storage starts in the whole parameter (a shard's offset; 0 unsharded)."""
    return [_addr(param), _addr(grad), _addr(exp_avg), _addr(exp_avg_sq), _addr(max_exp_avg_sq),
            _addr(fisher), _addr(master), _addr(indices), int(indices.dtype == torch.int64),
            indices.numel(), block_size, param.numel(), elem_base, DTYPE_CODES[param.dtype],
            _addr(step), int(step is not None and step.dtype == torch.float64)]


def stats_row(post: Tensor, pre: Tensor | None, fisher: Tensor | None, block_size: int,
              first_row: int, refs: list[Tensor]) -> list[int]:
    """One tensor of a delta_stats launch, then its R reference addresses and dtypes."""
    return [_addr(post), _addr(pre), _addr(fisher), DTYPE_CODES[post.dtype], post.numel(),
            block_size, first_row, *[r.data_ptr() for r in refs],
            *[DTYPE_CODES[r.dtype] for r in refs]]
