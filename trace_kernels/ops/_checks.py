"""Argument checks shared by the ops: run before any backend, so bad input raises a
ValueError/TypeError that names the argument and leaves every tensor untouched."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_REFS = 16
INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(kind: type[Exception], op: str, msg: str) -> None:
    raise kind(f"{op}: {msg}")


def check_float32(op: str, name: str, t: Tensor, dims: int) -> None:
    """ValueError naming `name` unless `t` is a `dims`-D float32 tensor."""
    if not isinstance(t, Tensor) or t.dim() != dims or t.dtype != torch.float32:
        _fail(ValueError, op, f"{name} must be a {dims}-D float32 tensor, got "
              f"{getattr(t, 'dtype', type(t))} of shape {tuple(getattr(t, 'shape', ()))}")


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


def check_rounding(op, params, masters, elem_bases, stochastic, seed, sizes) -> None:
    """fp32 masters (none, or one per parameter: its selected elements, `sizes[i]` values,
    or an empty tensor for a parameter without), element bases, and stochastic rounding
    (bf16 parameters only: fp16 has no unbiased rounding here yet) with a 63-bit seed."""
    n = len(params)
    if masters:
        _check_tensor_list(op, "masters", masters, n)
        for i, p in enumerate(params):
            if masters[i].numel() == 0:
                continue
            if p.dtype == torch.float32:
                _fail(TypeError, op, f"masters[{i}]: fp32 params[{i}] is its own master")
            _check_fp32(op, "masters", i, masters[i], sizes[i], p.device, "the selected elements")
    if elem_bases:
        if len(elem_bases) != n or any(not isinstance(b, int) or isinstance(b, bool) or b < 0
                                       for b in elem_bases):
            _fail(ValueError, op, f"elem_bases must hold one int >= 0 per parameter ({n})")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        _fail(ValueError, op, f"seed must be an int in [0, 2**63), got {seed!r}")
    if stochastic:
        for i, p in enumerate(params):
            if p.dtype == torch.float16:
                _fail(TypeError, op, f"params[{i}] is fp16: stochastic rounding supports bf16 "
                                     "(and fp32, which is not rounded)")


def validate_masked_adamw(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes, steps,
    lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, grad_scale, found_inf,
    index_checker,
) -> None:
    """`index_checker(indices, num_blocks)`: None if valid, else (position, reason); None
    skips the O(k) index check (callers that checked the indices once already)."""
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
        if index_checker is not None and k:
            bad = index_checker(idx, p.numel() // b)
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




def int_sizes(op: str, block_sizes: Sequence[int]) -> list[int]:
    """block_sizes as a list, each a plain int (a bool or float is refused)."""
    sizes = list(block_sizes)
    for i, b in enumerate(sizes):
        if not isinstance(b, int) or isinstance(b, bool):
            raise TypeError(f"{op}: block_sizes[{i}] must be an int, got {b!r}")
    return sizes


ROUNDINGS = ("nearest", "stochastic")


def stochastic_flag(op: str, rounding: str) -> bool:
    if rounding not in ROUNDINGS:
        _fail(ValueError, op, f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding == "stochastic"


def split_lr(lr: float | Tensor) -> tuple[float, Tensor | None]:
    """The (float, tensor) pair a torch.library schema needs for ``lr: float | Tensor``."""
    return (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)


def bump_versions(tensors: list[Tensor]) -> None:
    """Native kernels write through raw pointers; bump version counters as in-place torch
    ops would, so autograd still notices a parameter changed under a saved graph."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)
