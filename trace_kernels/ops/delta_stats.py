"""`delta_stats`: one pass over an update (post − pre), its Fisher diagonal and reference
updates, giving per block what L2 importance, Fisher importance and cosine specificity
need."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .. import backends
from ._checks import int_sizes, validate_delta_stats


class DeltaStats(NamedTuple):
    """Per-block sums over a list of tensors, blocks of tensor i at rows
    ``row_offsets[i]:row_offsets[i+1]``. ``dots``/``ref_sq`` have one column per reference."""

    sum_sq: Tensor       # Σ d²                       (num_blocks,)
    fisher_sum: Tensor   # Σ fisher                   (num_blocks,)
    dots: Tensor         # Σ d·ref_r                  (num_blocks, R)
    ref_sq: Tensor       # Σ ref_r²                   (num_blocks, R)
    row_offsets: list[int]


def _row_offsets(post: list[Tensor], block_sizes: list[int]) -> list[int]:
    offsets = [0]
    for t, b in zip(post, block_sizes):
        offsets.append(offsets[-1] + t.numel() // b)
    return offsets


@torch.library.custom_op("trace_kernels::delta_stats", mutates_args=())
def _delta_stats_op(
    post: list[Tensor],
    pre: list[Tensor],
    fishers: list[Tensor],
    refs: list[Tensor],
    block_sizes: list[int],
    num_refs: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _delta_stats_impl(post, pre, fishers, refs, block_sizes, num_refs, backend)


@_delta_stats_op.register_fake
def _delta_stats_fake(post, pre, fishers, refs, block_sizes, num_refs, backend):
    return _delta_stats_outputs(post, block_sizes, num_refs)


def _delta_stats_outputs(post, block_sizes, num_refs):
    n = _row_offsets(post, block_sizes)[-1]
    device = post[0].device if post else torch.device("cpu")
    vec = functools.partial(torch.empty, dtype=torch.float32, device=device)
    return vec(n), vec(n), vec(n, num_refs), vec(n, num_refs)


def _delta_stats_impl(post, pre, fishers, refs, block_sizes, num_refs, backend):
    validate_delta_stats(post, pre, fishers, refs, block_sizes, num_refs)
    outputs = _delta_stats_outputs(post, block_sizes, num_refs)
    device = outputs[0].device
    if outputs[0].numel():
        name = backends.choose(device, backend or None).name
        backends.kernel("delta_stats", name)(post, pre, fishers, refs, block_sizes, num_refs, outputs)
    return outputs


def delta_stats(
    post: Sequence[Tensor],
    pre: Sequence[Tensor] | None,
    fishers: Sequence[Tensor] | None,
    refs: Sequence[Sequence[Tensor]] | None,
    block_sizes: Sequence[int],
    *,
    backend: str | None = None,
) -> DeltaStats:
    """One pass over ``post``, ``pre``, ``fishers`` and R reference vectors per tensor giving,
    per block of ``block_sizes[i]`` flat elements, with ``d = post - pre`` (or ``d = post``
    when ``pre`` is None): ``Σ d²``, ``Σ fisher``, and per reference ``Σ d·ref`` and
    ``Σ ref²`` — what L2 importance, Fisher importance and cosine specificity need. Sums are
    accumulated in fp64 in a fixed order (same bits for any thread count) and returned as
    fp32; no temporary of the tensors' size is made."""
    post = list(post)
    sizes = int_sizes("delta_stats", block_sizes)
    ref_lists = [list(r) for r in refs] if refs else [[] for _ in post]
    if len(ref_lists) != len(post):
        raise ValueError(f"delta_stats: refs has {len(ref_lists)} entries but post has {len(post)}")
    num_refs = len(ref_lists[0]) if ref_lists else 0
    for i, r in enumerate(ref_lists):
        if len(r) != num_refs:
            raise ValueError(f"delta_stats: refs[{i}] has {len(r)} references, refs[0] has {num_refs}")
    flat_refs = [t for r in ref_lists for t in r]
    args = (post, list(pre or []), list(fishers or []), flat_refs, sizes, num_refs, backend or "")
    if torch.compiler.is_compiling():
        out = _delta_stats_op(*args)
    else:
        out = _delta_stats_impl(*args)
    return DeltaStats(*out, row_offsets=_row_offsets(post, sizes))
