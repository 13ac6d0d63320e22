"""The AdamW ops: `masked_adamw_` (the step over selected blocks, compact state) and
`adamw_fisher_` (the dense probe step that accumulates the Fisher diagonal in the same
pass). Both run as one backend function (`backends._common.register_adamw`).

The learning rate is ``float | Tensor``: a torch.library schema cannot say that, so the
registered ops carry it as ``lr: float, lr_tensor: Tensor | None`` and the implementation
joins the pair again before any backend sees it.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import backends
from ._checks import (bump_versions, check_rounding, int_sizes, split_lr, stochastic_flag,
                      validate_adamw_fisher, validate_masked_adamw)


def element_base(name: str, offset: int = 0) -> int:
    """The element base of stochastic rounding (``elem_bases[i]``) for the parameter called
    `name` whose storage starts `offset` elements into it (a shard's): the offset, with a
    hash of the name in the high 32 bits, so tensors of the same shape draw independent
    bits (otherwise element (i, j) of every such tensor rounds with the same bits, and
    rounding errors summed over layers add up coherently). The same on every rank."""
    return ((zlib.crc32(name.encode()) & 0x7FFFFFFF) << 32) + int(offset)


@torch.library.custom_op(
    "trace_kernels::masked_adamw_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "masters"),
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
    masters: list[Tensor],
    elem_bases: list[int],
    stochastic: bool,
    seed: int,
    backend: str,
    check_indices: bool,
) -> None:
    _masked_adamw_impl(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes,
        steps, lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale,
        found_inf, masters, elem_bases, stochastic, seed, backend, validate=True,
        check_indices=check_indices,
    )


@_masked_adamw_op.register_fake
def _masked_adamw_fake(*args, **kwargs) -> None:
    return None


def _masked_adamw_impl(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes, steps,
    lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf,
    masters, elem_bases, stochastic, seed, backend, *, validate, check_indices,
) -> None:
    device = params[0].device if params else torch.device("cpu")
    name = backends.choose(device, backend or None).name
    if validate:
        validate_masked_adamw(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes,
            steps, lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, grad_scale,
            found_inf, backends.kernel("check_block_indices", name) if check_indices else None,
        )
        check_rounding("masked_adamw_", params, masters, elem_bases, stochastic, seed,
                       [i.numel() * b for i, b in zip(block_indices, block_sizes)])
    if not params:
        return
    backends.kernel("masked_adamw_", name)(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes,
        steps, lr=lr if lr_tensor is None else lr_tensor, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale,
        found_inf=found_inf, masters=masters, elem_bases=elem_bases, stochastic=stochastic,
        seed=seed,
    )
    bump_versions(params)


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
    masters: Sequence[Tensor] | None = None,
    elem_bases: Sequence[int] | None = None,
    rounding: str = "nearest",
    seed: int = 0,
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

    ``masters[i]`` (16-bit params): fp32 values of the selected elements in mask order; the
    update is applied to them and the parameter receives them rounded. The parameter stays
    the source of truth: where it no longer holds what the last step wrote from its master
    (rounded to nearest, or stochastically with the last step's bits), something else wrote
    it, and the update starts from its value instead (the master takes it). ``rounding``:
    "nearest" (even) or "stochastic" (bf16: up with probability equal to the dropped
    fraction, unbiased), its random bits a hash of ``seed``, the step and the element's
    index in the whole parameter (``elem_bases[i]``: where the storage starts in it, for a
    shard, and a hash of the parameter's name: `element_base`), so the same seed gives the
    same bits on every backend.
    """
    args = (
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs or []),
        list(block_indices), int_sizes("masked_adamw_", block_sizes), list(steps), *split_lr(lr),
        float(beta1), float(beta2), float(eps), float(weight_decay), bool(amsgrad),
        bool(maximize), grad_scale, found_inf, list(masters or []), list(elem_bases or []),
        stochastic_flag("masked_adamw_", rounding), seed, backend or "",
    )
    if torch.compiler.is_compiling():
        _masked_adamw_op(*args, bool(check_indices))
    else:
        # Eager calls skip the custom-op dispatcher (hundreds of microseconds per call).
        _masked_adamw_impl(*args, validate=True, check_indices=check_indices)


def masked_adamw_trusted_(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes, steps,
    *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf, backend,
    masters=(), elem_bases=(), stochastic=False, seed=0,
) -> None:
    """`masked_adamw_` without the per-call argument checks, for a caller that created the
    state and indices itself and validated the masks once (MaskedAdamW). Grads must match
    their params (torch enforces that when .grad is set) and be contiguous."""
    args = (
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes, steps,
        *split_lr(lr), beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf,
        list(masters), list(elem_bases), bool(stochastic), int(seed), backend or "",
    )
    if torch.compiler.is_compiling():
        _masked_adamw_op(*args, False)
    else:
        _masked_adamw_impl(*args, validate=False, check_indices=False)


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
    elem_bases: list[int],
    stochastic: bool,
    seed: int,
    backend: str,
) -> None:
    _adamw_fisher_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, steps, lr,
                       lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale,
                       found_inf, fisher_scale, elem_bases, stochastic, seed, backend)


@_adamw_fisher_op.register_fake
def _adamw_fisher_fake(*args, **kwargs) -> None:
    return None


def _adamw_fisher_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, steps, lr,
                       lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale,
                       found_inf, fisher_scale, elem_bases, stochastic, seed, backend) -> None:
    validate_adamw_fisher(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, steps,
                          lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, grad_scale,
                          found_inf, fisher_scale)
    check_rounding("adamw_fisher_", params, [], elem_bases, stochastic, seed, [])
    if not params:
        return
    impl = backends.kernel("adamw_fisher_", backends.choose(params[0].device, backend or None).name)
    impl(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, steps,
        fisher_scale=fisher_scale, lr=lr if lr_tensor is None else lr_tensor, beta1=beta1,
        beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
        grad_scale=grad_scale, found_inf=found_inf, masters=[], elem_bases=elem_bases,
        stochastic=stochastic, seed=seed,
    )
    bump_versions(params)


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
    rounding: str = "nearest",
    seed: int = 0,
    elem_bases: Sequence[int] | None = None,
) -> None:
    """Dense AdamW step (the warm-start probe's) that, in the same pass over memory, adds
    ``fisher_scale * g**2`` to ``fishers[i]`` (fp32, one value per element; ``g`` unscaled
    by ``grad_scale``): the empirical Fisher diagonal accumulates while the probe trains.
    State is dense fp32; numerics are exactly those of `masked_adamw_` with a full mask.
    ``rounding="stochastic"`` rounds bf16 parameters stochastically (see `masked_adamw_`):
    full fp32 master weights would cost 4 bytes per parameter for a short probe;
    ``elem_bases`` as `masked_adamw_`'s (see `element_base`)."""
    args = (
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs or []),
        list(fishers), list(steps), *split_lr(lr), float(beta1), float(beta2), float(eps),
        float(weight_decay), bool(amsgrad), bool(maximize), grad_scale, found_inf,
        float(fisher_scale), list(elem_bases or []), stochastic_flag("adamw_fisher_", rounding), seed,
        backend or "",
    )
    if torch.compiler.is_compiling():
        _adamw_fisher_op(*args)
    else:
        _adamw_fisher_impl(*args)
