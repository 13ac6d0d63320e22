"""The warm-start probe: a short fine-tune that reveals which parameters a task moves.

`probe` trains the eligible parameters in place for a few steps with the fused
`adamw_fisher_` step, which accumulates the empirical Fisher diagonal (mean of g² over the
steps) in the same pass as the update. It then records the adaptation trace
Δ = θ_probe − θ⁰ and restores θ⁰ bit for bit, together with every parameter's
``requires_grad`` flag, its ``.grad`` and the module's train/eval mode. On an FSDP2 model
each rank steps its own shards: Δ and Fisher stay sharded (DTensors), no rank gathers a
parameter.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from trace_kernels import ops
from trace_kernels.sharding import is_dtensor, like, local_tensor, shard_layout

from .offload import DiskCopy

# Embeddings, output heads, norms and biases are left out by default (METHOD.md: the
# weight matrices of attention and MLP layers are eligible).
DEFAULT_EXCLUDE: tuple[str, ...] = (
    r"embed", r"(^|\.)wte\.", r"(^|\.)wpe\.", r"lm_head", r"norm", r"(^|\.)ln_?\w*\.", r"\.bias$",
)

# the probe's products by name (settings, flags): under autocast to this dtype, or "off"
PROBE_AUTOCAST: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ProbeMoments:
    """The probe's AdamW state at its end, per eligible parameter (the storage each rank
    holds): the first moment, the second moment (or, where the Fisher was read from it, the
    Fisher and the factor that turns it back: v = fisher · v_scale[name], within rounding),
    and the step count."""

    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    v_scale: dict[str, float]
    step: dict[str, float]


@dataclass
class ProbeResult:
    """Per eligible parameter: the update Δ and the mean squared gradient (Fisher). Those
    the probe computed in place are views of one buffer (`zeros_in_one`), whose memory is
    returned when the last of them is dropped."""

    deltas: dict[str, Tensor]
    fisher: dict[str, Tensor]
    steps: int
    losses: list[float] = field(default_factory=list)
    # with `probe(keep_moments=True)`: the optimizer's state at the end, per parameter, to
    # continue training from (`ProbeMoments`); else None
    moments: ProbeMoments | None = None

    @property
    def names(self) -> list[str]:
        return list(self.deltas)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(d.shape) for n, d in self.deltas.items()}

    @property
    def numel(self) -> int:
        return sum(d.numel() for d in self.deltas.values())


def eligible_parameters(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters whose name matches any `include` pattern (all if None) and no
    `exclude` pattern (regular expressions, searched anywhere in the name)."""
    inc = [re.compile(p) for p in include] if include is not None else None
    exc = [re.compile(p) for p in exclude]
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if inc is not None and not any(r.search(name) for r in inc):
            continue
        if any(r.search(name) for r in exc):
            continue
        out.append((name, p))
    return out


def default_loss(model: nn.Module, batch) -> Tensor:
    """``model(**batch).loss`` for dict batches (Hugging Face style), else ``model(batch)``."""
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = getattr(out, "loss", out)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise TypeError("the model did not return a scalar loss; pass loss_fn=")
    return loss


def zeros_in_one(sizes: Sequence[tuple[int, torch.device]]) -> list[Tensor]:
    """Zeroed fp32 vectors of the given (numel, device), views of one buffer per device.

    State that lives through every step, made as hundreds of parameter-sized tensors, sits
    in the C heap among each step's activations and keeps the heap from reusing their
    space: on SmolLM2 (CPU) the probe's resident peak was 0.6 GiB higher that way. One
    large buffer is mapped apart from the heap and returned whole once no view is left."""
    out: list[Tensor | None] = [None] * len(sizes)
    for device in dict.fromkeys(d for _, d in sizes):
        mine = [i for i, (_, d) in enumerate(sizes) if d == device]
        flat = torch.zeros(sum(sizes[i][0] for i in mine), dtype=torch.float32, device=device)
        for i, view in zip(mine, flat.split([sizes[i][0] for i in mine])):
            out[i] = view
    return out


def probe(
    model: nn.Module,
    batches: Iterable,
    steps: int,
    lr: float,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    loss_fn: Callable[[nn.Module, object], Tensor] = default_loss,
    offload_device: torch.device | str | None = None,
    delta_dtype: torch.dtype = torch.float32,
    max_grad_norm: float | None = None,
    backend: str | None = None,
    progress: bool | str = False,
    rounding: str = "auto",
    seed: int | None = None,
    sync_grads: Callable[[list[Tensor]], None] | None = None,
    fisher: str = "mean",
    keep_moments: bool = False,
    autocast: torch.dtype | None = None,
) -> ProbeResult:
    """Warm-start probe of `steps` AdamW steps on the eligible parameters.

    batches: an iterable of batches, cycled if shorter than `steps`.
    offload_device: where the pre-probe copy, Δ and Fisher live (e.g. "cpu" for a model
        that does not fit twice on its accelerator); default: each parameter's device.
        "disk": the pre-probe copy only, in a temporary file (CPU parameters), so memory
        holds the probe's state and no second copy of the weights.
    delta_dtype: dtype of the stored Δ (bf16 halves its memory).
    progress: show a progress bar (a string is its label).
    rounding: how the step writes bf16 parameters: "stochastic" (unbiased: a probe at a
        fine-tuning lr otherwise loses most of its updates to rounding, and full fp32
        masters would cost 4 bytes per parameter), "nearest", or "auto" (stochastic when
        a parameter is bf16 and none is fp16). seed: of the stochastic rounding (None:
        drawn from torch's generator).
    sync_grads: called with the eligible parameters after each backward, before clipping
        (data parallelism: sums the ranks' gradients; `loss_fn` then gives each rank's share).
    fisher: "mean", the mean of g² over the steps in a buffer of its own (accumulated by
        the fused step), or "adam", the probe's bias-corrected second moment
        v̂ = v / (1 − β2^t) read at the end: the same g² weighted by β2^(T−t) (within
        1 − β2^T of the mean: 1 % over 10 steps, 5 % over 50 at β2 = 0.999), and no
        fourth model-sized buffer. The update, Δ, is identical either way.
    keep_moments: keep the optimizer's state at the end (`ProbeResult.moments`), so training
        can continue from it; Δ then takes a buffer of its own instead of the first moment's.
    autocast: run each forward and backward under `torch.autocast` to this dtype (bf16: on
        a CPU with native bf16 products a probe of an fp32 model costs about 0.7 of its fp32
        time, docs/performance.md round 14). Gradients, moments, Δ, Fisher and the weights keep their dtypes;
        only the products are rounded. None: the weights' own dtype throughout.
    """
    if fisher not in ("mean", "adam"):
        raise ValueError(f"fisher must be 'mean' or 'adam', got {fisher!r}")
    if autocast not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    named = eligible_parameters(model, include, exclude)
    if not named:
        raise ValueError("no eligible parameters: check include/exclude patterns and requires_grad")
    if rounding == "auto":
        dtypes = {p.dtype for _, p in named}
        rounding = "stochastic" if torch.bfloat16 in dtypes and torch.float16 not in dtypes else "nearest"
    if rounding == "stochastic" and seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    eligible = {id(p) for _, p in named}
    params = [p for _, p in named]
    device_type = local_tensor(params[0]).device.type
    if autocast is not None and not torch.amp.is_autocast_available(device_type):
        raise ValueError(f"autocast: torch has no autocast on {device_type!r} parameters")

    def rounded():  # (a fresh context per step: torch.autocast is not reentrant)
        return torch.autocast(device_type, dtype=autocast, enabled=autocast is not None)
    # each parameter's element indices for stochastic rounding: in the whole parameter (a
    # shard's offset), in a range of its own (its name), as MaskedAdamW keys them
    bases_of = [ops.element_base(n, shard_layout(p, n).lo if is_dtensor(p) else 0) for n, p in named]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    grads = [(p, p.grad) for p in model.parameters()]
    was_training = model.training
    disk = offload_device == "disk"
    home = [p.device if disk or offload_device is None else offload_device for p in params]
    with torch.no_grad():
        saved = DiskCopy([local_tensor(p) for p in params]) if disk else \
            [p.detach().to(d, copy=True) for p, d in zip(params, home)]
    # state for the storage each rank holds (a sharded parameter's local shard)
    sizes = [(local_tensor(p).numel(), local_tensor(p).device) for p in params]
    exp_avgs, exp_avg_sqs = zeros_in_one(sizes), zeros_in_one(sizes)
    fishers = zeros_in_one(sizes) if fisher == "mean" else None
    step_counts = [torch.tensor(0.0) for _ in params]
    losses: list[float] = []
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in eligible)  # backward skips everything else
            p.grad = None
        model.train()
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=progress if isinstance(progress, str) else "probe",
                   disable=not progress, leave=False, dynamic_ncols=True)
        for _, batch in zip(range(steps), itertools.cycle(batches)):
            with rounded():
                loss = loss_fn(model, batch)
            loss.backward()
            losses.append(float(loss.detach()))
            bar.update(1)
            if sync_grads is not None:
                sync_grads(params)
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, max_grad_norm)
            live = [i for i, p in enumerate(params) if p.grad is not None]
            step = dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
                        backend=backend, rounding=rounding, seed=seed or 0)
            live_params = [local_tensor(params[i]) for i in live]
            bases = [bases_of[i] for i in live]
            live_grads = [local_tensor(params[i].grad).contiguous() for i in live]
            if fishers is not None:
                ops.adamw_fisher_(live_params, live_grads, [exp_avgs[i] for i in live],
                                  [exp_avg_sqs[i] for i in live], [], [fishers[i] for i in live],
                                  [step_counts[i] for i in live], fisher_scale=1.0 / steps,
                                  elem_bases=bases, **step)
            else:  # the same step (a mask of one whole-tensor block), no Fisher buffer
                full = [j for j, p in enumerate(live_params) if p.numel()]  # (a rank's shard may be empty)
                ops.masked_adamw_([live_params[j] for j in full], [live_grads[j] for j in full],
                                  [exp_avgs[live[j]] for j in full], [exp_avg_sqs[live[j]] for j in full], [],
                                  [torch.zeros(1, dtype=torch.int64, device=live_params[j].device) for j in full],
                                  [live_params[j].numel() for j in full],
                                  [step_counts[live[j]] for j in full], elem_bases=[bases[j] for j in full],
                                  **step)
            del live_params, live_grads  # the gradients go before the next forward
            for p in params:
                p.grad = None
        bar.close()
        if len(losses) < steps:
            raise ValueError(f"batches ran out after {len(losses)} of {steps} probe steps")
        # Δ = θ_probe − θ⁰ in fp32 (exact for 16-bit parameters too), written into the spent
        # first-moment buffer where it can be (same device, fp32 Δ): no model-sized allocation
        # beyond the pre-probe copy; the second moments are freed first, or become the Fisher
        moments = None
        if keep_moments:  # Δ in a buffer of its own, the moments kept
            v_scale = {n: 1.0 for n, _ in named}
            moments = ProbeMoments({n: m for (n, _), m in zip(named, exp_avgs)}, {}, v_scale,
                                   {n: float(t) for (n, _), t in zip(named, step_counts)})
            exp_avgs = zeros_in_one(sizes)
        if fishers is None:
            with torch.no_grad():
                for (n, _), v, t in zip(named, exp_avg_sqs, step_counts):
                    scale = 1 - betas[1] ** float(t)
                    v.div_(scale) if float(t) > 0 else v.zero_()
                    if moments is not None:
                        moments.v_scale[n] = scale if float(t) > 0 else 0.0
            fishers = exp_avg_sqs
        elif moments is not None:
            moments.exp_avg_sq.update({n: v for (n, _), v in zip(named, exp_avg_sqs)})
        del exp_avg_sqs
        deltas, fisher = {}, {}
        with torch.no_grad():
            for i, ((name, p), d, f) in enumerate(zip(named, home, fishers)):
                storage = local_tensor(p)
                if disk:  # the probed weights into the buffer, θ⁰ back from disk, the difference
                    buf = exp_avgs[i].view(storage.shape).copy_(storage)
                    saved.read_into(i, storage)
                    deltas[name] = like(p, buf.sub_(storage).to(delta_dtype))
                elif delta_dtype == torch.float32 and local_tensor(saved[i]).device == storage.device:
                    buf = exp_avgs[i].view(storage.shape)
                    buf.copy_(storage).sub_(local_tensor(saved[i]))
                    deltas[name] = like(p, buf)
                else:
                    deltas[name] = (p.detach().to(d, torch.float32) - saved[i].float()).to(delta_dtype)
                exp_avgs[i] = None
                fisher[name] = like(p, f.view(storage.shape)).to(d)
    finally:
        with torch.no_grad():
            for i, p in enumerate(params):
                if disk:
                    saved.read_into(i, local_tensor(p))
                else:
                    p.copy_(saved[i])
        if disk:
            saved.close()
        for p, flag in flags:
            p.requires_grad_(flag)
        for p, g in grads:
            p.grad = g
        model.train(was_training)
    return ProbeResult(deltas=deltas, fisher=fisher, steps=steps, losses=losses, moments=moments)


def empirical_fisher(model: nn.Module, batches: Iterable, steps: int,
                     loss_fn: Callable[[nn.Module, object], Tensor] = default_loss,
                     names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Mean over `steps` batches of the squared gradient of the batch loss, per trainable
    parameter (or those in `names`), in fp32. Leaves parameters and their grads untouched."""
    wanted = None if names is None else set(names)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()
              if p.requires_grad and (wanted is None or n in wanted)}
    grads = [(p, p.grad) for p in model.parameters()]
    was_training = model.training
    device = next(model.parameters()).device
    done = 0
    try:
        model.train()
        for _, batch in zip(range(steps), batches):
            for p, _ in grads:
                p.grad = None
            if isinstance(batch, dict):
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            loss_fn(model, batch).backward()
            for n, p in model.named_parameters():
                if n in fisher and p.grad is not None:
                    fisher[n] += p.grad.detach().float().square()
            done += 1
    finally:
        for p, g in grads:
            p.grad = g
        model.train(was_training)
    if done == 0:
        raise ValueError("no batches for the Fisher estimate")
    return {n: f / done for n, f in fisher.items()}
