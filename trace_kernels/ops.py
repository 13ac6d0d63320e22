"""The op set, registered with torch.library and dispatched to a backend by device.

`masked_adamw_` is the AdamW step over the selected blocks of many parameters at once,
with optimizer state stored for the selected elements only. Every argument is checked
here, before any backend runs, so bad input raises a ValueError/TypeError that names the
argument and leaves every tensor untouched.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import backends

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_REFS = 16
INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(kind: type[Exception], op: str, msg: str) -> None:
    raise kind(f"{op}: {msg}")


def _check_tensor_list(op: str, name: str, tensors: Sequence[Tensor], n: int) -> None:
    if not isinstance(tensors, (list, tuple)):
        _fail(TypeError, op, f"{name} must be a list of tensors, got {type(tensors).__name__}")
    if len(tensors) != n:
        _fail(ValueError, op, f"{name} has {len(tensors)} entries but params has {n}")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            _fail(TypeError, op, f"{name}[{i}] must be a tensor, got {type(t).__name__}")
        if t.is_sparse:
            _fail(ValueError, op, f"{name}[{i}] is sparse; sparse tensors are not supported")


def _check_scalar_tensor(op: str, name: str, t: Tensor | None) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or t.numel() != 1 or not t.is_floating_point():
        _fail(TypeError, op, f"{name} must be a one-element floating-point tensor")


def _check_hyper(op, lr, lr_tensor, beta1, beta2, eps, weight_decay, grad_scale, found_inf):
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not math.isfinite(value) or value < 0:
            _fail(ValueError, op, f"{name} must be a finite number >= 0, got {value}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= value < 1.0:
            _fail(ValueError, op, f"{name} must be in [0, 1), got {value}")
    _check_scalar_tensor(op, "lr_tensor", lr_tensor)
    _check_scalar_tensor(op, "grad_scale", grad_scale)
    if found_inf is not None and (not isinstance(found_inf, Tensor) or found_inf.numel() != 1):
        _fail(TypeError, op, "found_inf must be a one-element tensor")


def _check_param_and_grad(op, i, p, g, device):
    if p.dtype not in PARAM_DTYPES:
        _fail(TypeError, op, f"params[{i}] has dtype {p.dtype}; supported: fp32, bf16, fp16")
    if p.device != device:
        _fail(ValueError, op, f"params[{i}] is on {p.device} but params[0] is on {device}")
    if not p.is_contiguous():
        _fail(ValueError, op, f"params[{i}] is not contiguous")
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        _fail(ValueError, op,
              f"grads[{i}] is {tuple(g.shape)} {g.dtype} on {g.device}, but params[{i}] is "
              f"{tuple(p.shape)} {p.dtype} on {p.device}")
    if not g.is_contiguous():
        _fail(ValueError, op, f"grads[{i}] is not contiguous")
    if g.data_ptr() == p.data_ptr() and p.numel():
        _fail(ValueError, op, f"grads[{i}] aliases params[{i}]")


def _check_fp32(op, name, i, s, numel, device, what):
    if s.dtype != torch.float32 or s.device != device or not s.is_contiguous():
        _fail(TypeError, op, f"{name}[{i}] must be a contiguous float32 tensor on {device}")
    if s.numel() != numel:
        _fail(ValueError, op, f"{name}[{i}] has {s.numel()} elements; {what} need {numel}")


def _check_step(op, i, st):
    if st.numel() != 1 or not st.is_floating_point():
        _fail(TypeError, op, f"steps[{i}] must be a one-element floating-point tensor")


def _check_lists(op, n, lists, amsgrad, max_exp_avg_sqs, params):
    _check_tensor_list(op, "params", params, n)
    for name, lst in lists:
        _check_tensor_list(op, name, lst, n)
    _check_tensor_list(op, "max_exp_avg_sqs", max_exp_avg_sqs, n if amsgrad else len(max_exp_avg_sqs))


def validate_masked_adamw(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes, steps,
    lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, grad_scale, found_inf,
    check_indices, backend_module,
) -> None:
    op = "masked_adamw_"
    n = len(params)
    _check_lists(op, n, (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                         ("block_indices", block_indices), ("steps", steps)),
                 amsgrad, max_exp_avg_sqs, params)
    if len(block_sizes) != n:
        _fail(ValueError, op, f"block_sizes has {len(block_sizes)} entries but params has {n}")
    _check_hyper(op, lr, lr_tensor, beta1, beta2, eps, weight_decay, grad_scale, found_inf)
    if n == 0:
        return
    device = params[0].device
    for i, p in enumerate(params):
        _check_param_and_grad(op, i, p, grads[i], device)
        b = block_sizes[i]
        if not isinstance(b, int) or b < 1 or p.numel() % b:
            _fail(ValueError, op, f"block_sizes[{i}]={b} must be an int >= 1 dividing {p.numel()}")
        idx = block_indices[i]
        if idx.dtype not in INDEX_DTYPES or idx.dim() != 1 or not idx.is_contiguous():
            _fail(TypeError, op, f"block_indices[{i}] must be a contiguous 1-D int32/int64 tensor")
        if idx.device != device:
            _fail(ValueError, op, f"block_indices[{i}] is on {idx.device}, params on {device}")
        k = idx.numel()
        what = f"{k} blocks of {b}"
        _check_fp32(op, "exp_avgs", i, exp_avgs[i], k * b, device, what)
        _check_fp32(op, "exp_avg_sqs", i, exp_avg_sqs[i], k * b, device, what)
        if amsgrad:
            _check_fp32(op, "max_exp_avg_sqs", i, max_exp_avg_sqs[i], k * b, device, what)
        _check_step(op, i, steps[i])
        if check_indices and k:
            bad = backend_module.check_block_indices(idx, p.numel() // b)
            if bad is not None:
                pos, reason = bad
                _fail(ValueError, op,
                      f"block_indices[{i}] {reason} at position {pos} (value {int(idx[pos])}, "
                      f"{p.numel() // b} blocks); indices must be sorted, unique and in range")


def validate_adamw_fisher(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, steps, lr, lr_tensor,
    beta1, beta2, eps, weight_decay, amsgrad, grad_scale, found_inf, fisher_scale,
) -> None:
    op = "adamw_fisher_"
    n = len(params)
    _check_lists(op, n, (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                         ("fishers", fishers), ("steps", steps)),
                 amsgrad, max_exp_avg_sqs, params)
    _check_hyper(op, lr, lr_tensor, beta1, beta2, eps, weight_decay, grad_scale, found_inf)
    if not math.isfinite(fisher_scale):
        _fail(ValueError, op, f"fisher_scale must be finite, got {fisher_scale}")
    if n == 0:
        return
    device = params[0].device
    for i, p in enumerate(params):
        _check_param_and_grad(op, i, p, grads[i], device)
        what = "the parameter's elements"
        _check_fp32(op, "exp_avgs", i, exp_avgs[i], p.numel(), device, what)
        _check_fp32(op, "exp_avg_sqs", i, exp_avg_sqs[i], p.numel(), device, what)
        if amsgrad:
            _check_fp32(op, "max_exp_avg_sqs", i, max_exp_avg_sqs[i], p.numel(), device, what)
        _check_fp32(op, "fishers", i, fishers[i], p.numel(), device, what)
        _check_step(op, i, steps[i])


def validate_delta_stats(post, pre, fishers, refs, block_sizes, num_refs) -> None:
    op = "delta_stats"
    n = len(post)
    _check_tensor_list(op, "post", post, n)
    if pre:
        _check_tensor_list(op, "pre", pre, n)
    if fishers:
        _check_tensor_list(op, "fishers", fishers, n)
    if not 0 <= num_refs <= MAX_REFS:
        _fail(ValueError, op, f"each tensor takes 0 to {MAX_REFS} references, got {num_refs}")
    _check_tensor_list(op, "refs", refs, n * num_refs)
    if len(block_sizes) != n:
        _fail(ValueError, op, f"block_sizes has {len(block_sizes)} entries but post has {n}")
    if n == 0:
        return
    device = post[0].device
    for i, t in enumerate(post):
        if t.dtype not in PARAM_DTYPES or not t.is_contiguous() or t.device != device:
            _fail(TypeError, op, f"post[{i}] must be a contiguous fp32/bf16/fp16 tensor on {device}")
        b = block_sizes[i]
        if not isinstance(b, int) or b < 1 or t.numel() % b:
            _fail(ValueError, op, f"block_sizes[{i}]={b} must be an int >= 1 dividing {t.numel()}")
        if pre and (pre[i].shape != t.shape or pre[i].dtype != t.dtype or pre[i].device != device
                    or not pre[i].is_contiguous()):
            _fail(ValueError, op, f"pre[{i}] must match post[{i}] in shape, dtype and device "
                                  "and be contiguous")
        if fishers:
            _check_fp32(op, "fishers", i, fishers[i], t.numel(), device, f"post[{i}]'s elements")
        for r in range(num_refs):
            ref = refs[i * num_refs + r]
            if (ref.numel() != t.numel() or ref.dtype not in PARAM_DTYPES
                    or not ref.is_contiguous() or ref.device != device):
                _fail(ValueError, op, f"refs[{i}][{r}] must be a contiguous fp32/bf16/fp16 tensor "
                                      f"of {t.numel()} elements on {device}")


@torch.library.custom_op(
    "trace_kernels::masked_adamw_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"),
)
def _masked_adamw_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    block_indices: list[Tensor],
    block_sizes: list[int],
    steps: list[Tensor],
    lr: float,
    lr_tensor: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    backend: str,
    check_indices: bool,
) -> None:
    _masked_adamw_impl(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes,
        steps, lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale,
        found_inf, backend, validate=True, check_indices=check_indices,
    )


def _masked_adamw_impl(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes, steps,
    lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf,
    backend, *, validate, check_indices,
) -> None:
    device = params[0].device if params else torch.device("cpu")
    impl = backends.module(backends.choose(device, backend or None).name)
    if validate:
        validate_masked_adamw(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes,
            steps, lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, grad_scale,
            found_inf, check_indices, impl,
        )
    if not params:
        return
    impl.masked_adamw_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes,
        steps, lr=lr, lr_tensor=lr_tensor, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale,
        found_inf=found_inf,
    )
    _bump_versions(params)


def _bump_versions(tensors: list[Tensor]) -> None:
    """Native kernels write through raw pointers; bump version counters as in-place torch
    ops would, so autograd still notices a parameter changed under a saved graph."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


@_masked_adamw_op.register_fake
def _masked_adamw_fake(*args, **kwargs) -> None:
    return None


def masked_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    block_indices: Sequence[Tensor],
    block_sizes: Sequence[int],
    steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    backend: str | None = None,
    check_indices: bool = True,
) -> None:
    """AdamW over the selected blocks of each parameter, in place.

    For parameter ``i``, ``block_indices[i]`` (sorted, unique) selects blocks of
    ``block_sizes[i]`` flat elements; ``exp_avgs[i]``/``exp_avg_sqs[i]`` (and
    ``max_exp_avg_sqs[i]`` with amsgrad) hold ``k*B`` fp32 values in mask order.
    ``steps[i]`` is incremented, then every selected element gets exactly
    torch.optim.AdamW's update; unselected elements are not touched. With ``grad_scale``
    the grads are divided by it; if ``found_inf`` is non-zero nothing changes at all.
    ``check_indices=False`` skips the O(k) index check for callers that validated the
    indices once already (MaskedAdamW does, when masks are set).
    """
    lr_tensor = lr if isinstance(lr, Tensor) else None
    sizes = list(block_sizes)
    for i, b in enumerate(sizes):
        if not isinstance(b, int) or isinstance(b, bool):
            raise TypeError(f"masked_adamw_: block_sizes[{i}] must be an int, got {b!r}")
    args = (
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs or []),
        list(block_indices), sizes, list(steps), 0.0 if lr_tensor is not None else float(lr),
        lr_tensor, float(beta1), float(beta2), float(eps), float(weight_decay), bool(amsgrad),
        bool(maximize), grad_scale, found_inf, backend or "",
    )
    if torch.compiler.is_compiling():
        _masked_adamw_op(*args, bool(check_indices))
    else:
        # Eager calls skip the custom-op dispatcher (hundreds of microseconds per call).
        _masked_adamw_impl(*args, validate=True, check_indices=check_indices)


def masked_adamw_trusted_(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes, steps,
    *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf, backend,
) -> None:
    """`masked_adamw_` without the per-call argument checks, for a caller that created the
    state and indices itself and validated the masks once (MaskedAdamW). Grads must match
    their params (torch enforces that when .grad is set) and be contiguous."""
    lr_tensor = lr if isinstance(lr, Tensor) else None
    args = (
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes, steps,
        0.0 if lr_tensor is not None else float(lr), lr_tensor, beta1, beta2, eps, weight_decay,
        amsgrad, maximize, grad_scale, found_inf, backend or "",
    )
    if torch.compiler.is_compiling():
        _masked_adamw_op(*args, False)
    else:
        _masked_adamw_impl(*args, validate=False, check_indices=False)


# ---- adamw_fisher_ ----------------------------------------------------------------------

@torch.library.custom_op(
    "trace_kernels::adamw_fisher_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "fishers", "steps"),
)
def _adamw_fisher_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    fishers: list[Tensor],
    steps: list[Tensor],
    lr: float,
    lr_tensor: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    fisher_scale: float,
    backend: str,
) -> None:
    _adamw_fisher_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, steps, lr,
                       lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale,
                       found_inf, fisher_scale, backend)


@_adamw_fisher_op.register_fake
def _adamw_fisher_fake(*args, **kwargs) -> None:
    return None


def _adamw_fisher_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, steps, lr,
                       lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale,
                       found_inf, fisher_scale, backend) -> None:
    validate_adamw_fisher(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, steps,
                          lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, grad_scale,
                          found_inf, fisher_scale)
    if not params:
        return
    impl = backends.module(backends.choose(params[0].device, backend or None).name)
    impl.adamw_fisher_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, steps,
        fisher_scale=fisher_scale, lr=lr, lr_tensor=lr_tensor, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale,
        found_inf=found_inf,
    )
    _bump_versions(params)


def adamw_fisher_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    fishers: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    fisher_scale: float = 1.0,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    backend: str | None = None,
) -> None:
    """Dense AdamW step (the warm-start probe's) that, in the same pass over memory, adds
    ``fisher_scale * g**2`` to ``fishers[i]`` (fp32, one value per element; ``g`` unscaled
    by ``grad_scale``): the empirical Fisher diagonal accumulates while the probe trains.
    State is dense fp32; numerics are exactly those of `masked_adamw_` with a full mask."""
    lr_tensor = lr if isinstance(lr, Tensor) else None
    args = (
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs or []),
        list(fishers), list(steps), 0.0 if lr_tensor is not None else float(lr), lr_tensor,
        float(beta1), float(beta2), float(eps), float(weight_decay), bool(amsgrad),
        bool(maximize), grad_scale, found_inf, float(fisher_scale), backend or "",
    )
    if torch.compiler.is_compiling():
        _adamw_fisher_op(*args)
    else:
        _adamw_fisher_impl(*args)


# ---- delta_stats ------------------------------------------------------------------------

class DeltaStats(NamedTuple):
    """Per-block sums over a list of tensors, blocks of tensor i at rows
    ``row_offsets[i]:row_offsets[i+1]``. ``dots``/``ref_sq`` have one column per reference."""

    sum_sq: Tensor       # Σ d²                       (num_blocks,)
    fisher_sum: Tensor   # Σ fisher                   (num_blocks,)
    dots: Tensor         # Σ d·ref_r                  (num_blocks, R)
    ref_sq: Tensor       # Σ ref_r²                   (num_blocks, R)
    row_offsets: list[int]


def _num_rows(post: list[Tensor], block_sizes: list[int]) -> int:
    return sum(t.numel() // b for t, b in zip(post, block_sizes))


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
    n = _num_rows(post, block_sizes)
    device = post[0].device if post else torch.device("cpu")
    vec = functools.partial(torch.empty, dtype=torch.float32, device=device)
    return vec(n), vec(n), vec(n, num_refs), vec(n, num_refs)


def _delta_stats_impl(post, pre, fishers, refs, block_sizes, num_refs, backend):
    validate_delta_stats(post, pre, fishers, refs, block_sizes, num_refs)
    outputs = _delta_stats_outputs(post, block_sizes, num_refs)
    device = outputs[0].device
    if outputs[0].numel():
        impl = backends.module(backends.choose(device, backend or None).name)
        impl.delta_stats(post, pre, fishers, refs, block_sizes, num_refs, outputs)
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
    sizes = list(block_sizes)
    for i, b in enumerate(sizes):
        if not isinstance(b, int) or isinstance(b, bool):
            raise TypeError(f"delta_stats: block_sizes[{i}] must be an int, got {b!r}")
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
    offsets = [0]
    for t, b in zip(post, sizes):
        offsets.append(offsets[-1] + t.numel() // b)
    return DeltaStats(*out, row_offsets=offsets)
