"""`element_max_cosine`: specificity where a block is one element, the largest cosine of each
element of an update with the same element of earlier updates.

`delta_stats` gives per block Σ d·ref and Σ ref²; at element level those are single products
and the cosine follows elementwise, but done with torch ops it is a dozen element-sized fp64
temporaries per reference. This computes the same numbers (the products in fp32, as
`delta_stats` rounds them, the rest in fp64) in one pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ._checks import check_float32


def element_max_cosine(d: Tensor, refs: list[Tensor], *, backend: str | None = None) -> Tensor:
    """fp64 ``out[i] = max_r c_r`` for 1-D fp32 `d` and fp32 `refs` of its length, where
    c_r = (d·ref_r) / max(den, 1e-300) if den = sqrt(d² · ref_r²) > 0, else 0; d·ref_r, d²
    and ref_r² rounded to fp32 (delta_stats' element sums), the rest in fp64; NaN where any
    c_r is NaN."""
    op = "element_max_cosine"
    check_float32(op, "d", d, 1)
    if not refs:
        raise ValueError(f"{op}: refs must hold at least one reference")
    for i, r in enumerate(refs):
        if not isinstance(r, Tensor) or r.dtype != torch.float32 or r.numel() != d.numel() or r.device != d.device:
            raise ValueError(f"{op}: refs[{i}] must be a float32 tensor of {d.numel()} elements on {d.device}")
    name = backends.choose(d.device, backend).name
    return backends.kernel(op, name)(d.contiguous(), [r.reshape(-1).contiguous() for r in refs])
