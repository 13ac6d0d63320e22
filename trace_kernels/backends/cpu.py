"""The C++/OpenMP CPU backend (trace_kernels._C). Inputs are already validated by `ops`."""

from __future__ import annotations

import torch

from .. import _native
from .registry import register_kernel
from ._common import advance_steps, host_lr, inf_found, register_adamw
from ._layout import masked_row, stats_row


def _ext():
    ext = _native.load("_C")
    if ext is None:  # backends.choose() refuses this case first; keep a clear message anyway
        raise RuntimeError(f"trace_kernels._C is not available: {_native.error('_C')}")
    return ext


@register_kernel("check_block_indices", "cpu")
def check_block_indices(indices: torch.Tensor, limit: int) -> tuple[int, str] | None:
    return _ext().check_block_indices(
        indices.data_ptr(), indices.dtype == torch.int64, indices.numel(), limit,
        torch.get_num_threads(),
    )


def _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes,
           steps, fishers, fisher_scale, *, lr, beta1, beta2, eps, weight_decay, amsgrad,
           maximize, grad_scale, found_inf, masters=(), elem_bases=(), stochastic=False, seed=0):
    ext = _ext()
    if inf_found(found_inf):
        return
    # fp32 CPU step counters (what the optimizers keep) are incremented natively; any
    # other kind is advanced here and passed by value.
    native_steps = all(s.dtype == torch.float32 and s.device.type == "cpu" for s in steps)
    step_values = [0.0] * len(steps) if native_steps else advance_steps(steps)
    table: list[int] = []
    for i, p in enumerate(params):
        table += masked_row(p, grads[i], exp_avgs[i], exp_avg_sqs[i],
                            max_exp_avg_sqs[i] if amsgrad else None, fishers[i] if fishers else None,
                            masters[i] if masters and masters[i].numel() else None, block_indices[i],
                            block_sizes[i],
                            elem_bases[i] if elem_bases else 0, steps[i] if native_steps else None)
    ext.masked_adamw(
        table, step_values, host_lr(lr), beta1, beta2, eps, weight_decay, amsgrad,
        maximize, float(grad_scale.item()) if grad_scale is not None else None, fisher_scale,
        stochastic, seed, torch.get_num_threads(),
    )


masked_adamw_, adamw_fisher_ = register_adamw("cpu", _adamw)


class NativePlan:
    """A masked step planned in the extension (rows parsed and checked once): a step hands
    over only the gradients' addresses. It holds the tensors it points into."""

    def __init__(self, lists: dict, amsgrad: bool) -> None:
        table: list[int] = []
        masters = lists["masters"]
        for i, p in enumerate(lists["params"]):
            table += masked_row(p, p, lists["m"][i], lists["v"][i], lists["vmax"][i] if amsgrad else None,
                                None, masters[i] if masters and masters[i].numel() else None,
                                lists["idx"][i], lists["sizes"][i], lists["bases"][i], lists["steps"][i])
        self.native = _ext().AdamWPlan(table, len(lists["params"]), amsgrad)
        self.keep = dict(lists)  # the addresses in the plan stay valid while it lives

    def step(self, grads, *, lr, beta1, beta2, eps, weight_decay, maximize, grad_scale, found_inf,
             stochastic, seed) -> None:
        if inf_found(found_inf):
            return
        self.native.step([g.data_ptr() for g in grads], host_lr(lr), beta1, beta2, eps, weight_decay,
                         maximize, float(grad_scale.item()) if grad_scale is not None else None,
                         stochastic, seed, torch.get_num_threads())


@register_kernel("plan_masked_adamw", "cpu")
def plan_masked_adamw(lists: dict, amsgrad: bool) -> NativePlan | None:
    """The native plan when the step counters are fp32 on the CPU (as MaskedAdamW keeps
    them; the extension counts them); None otherwise."""
    if not all(s.dtype == torch.float32 and s.device.type == "cpu" for s in lists["steps"]):
        return None
    return NativePlan(lists, amsgrad)


@register_kernel("delta_stats", "cpu")
def delta_stats(post, pre, fishers, refs, block_sizes, num_refs, outputs):
    ext = _ext()
    table: list[int] = []
    row = 0
    for i, t in enumerate(post):
        table += stats_row(t, pre[i] if pre else None, fishers[i] if fishers else None,
                           block_sizes[i], row, refs[i * num_refs:(i + 1) * num_refs])
        row += t.numel() // block_sizes[i]
    ext.delta_stats(table, len(post), num_refs, *(o.data_ptr() for o in outputs),
                    torch.get_num_threads())


def _token_major(t: torch.Tensor) -> bool:
    """Whether `t` (vectors × length) is the transpose of a contiguous (length × vectors)
    matrix: a linear layer's activations or output gradient, as its backward holds them."""
    return t.dim() == 2 and t.stride(0) == 1 and (t.stride(1) == t.shape[0] or t.shape[1] <= 1)


@register_kernel("sampled_dot", "cpu")
def sampled_dot(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    out = torch.empty(rows.numel(), dtype=torch.float32)
    if _token_major(a) and _token_major(b):  # transposed in cache-sized blocks, never in memory
        _ext().sampled_dot_token_major(a.data_ptr(), a.shape[0], b.data_ptr(), b.shape[0], a.shape[1],
                                       rows.data_ptr(), cols.data_ptr(), rows.numel(), out.data_ptr(),
                                       torch.get_num_threads())
        return out
    a, b = a.contiguous(), b.contiguous()
    _ext().sampled_dot(a.data_ptr(), b.data_ptr(), a.shape[1], rows.data_ptr(), cols.data_ptr(),
                       rows.numel(), out.data_ptr(), torch.get_num_threads())
    return out


@register_kernel("rank_scores", "cpu")
def rank_scores(x: torch.Tensor, y: torch.Tensor, x_ranks: torch.Tensor, y_ranks: torch.Tensor, bits: int,
                factors: tuple[torch.Tensor, ...], excluded: torch.Tensor | None, floor: float):
    from ..ops.rank_scores import RankScores

    n = x.numel()
    index = torch.empty(n, dtype=torch.int64)   # room for every element; trimmed below
    value = torch.empty(n, dtype=torch.float64)
    f = [t.data_ptr() for t in factors] + [0] * (2 - len(factors))
    finite, kept = _ext().rank_scores(x.data_ptr(), y.data_ptr(), x_ranks.data_ptr(), y_ranks.data_ptr(), bits,
                                      f[0], f[1], 0 if excluded is None else excluded.data_ptr(), n, floor,
                                      index.data_ptr(), value.data_ptr(), torch.get_num_threads())
    return RankScores(finite, index[:kept].clone(), value[:kept].clone())


@register_kernel("rank_counts", "cpu")
def rank_counts(x: torch.Tensor, bits: int, counts: torch.Tensor) -> None:
    _ext().rank_counts(x.data_ptr(), x.numel(), bits, counts.data_ptr())


@register_kernel("element_max_cosine", "cpu")
def element_max_cosine(d: torch.Tensor, refs: list[torch.Tensor]) -> torch.Tensor:
    out = torch.empty(d.numel(), dtype=torch.float64)
    _ext().element_max_cosine(d.data_ptr(), [r.data_ptr() for r in refs], d.numel(), out.data_ptr(),
                              torch.get_num_threads())
    return out
