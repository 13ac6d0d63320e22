"""One task through TRACE, assembled once: `find_core` (the probe, the selection, and what
the history keeps of the probe) → `train_setup` (the core's optimizer, everything else
frozen) → training → `remember` (the task recorded for later tasks' selection).

`TracePipeline` holds the method's settings and what it knows of earlier tasks
(`history`). Whoever trains calls those steps in that order:
- the `trace` strategy of `trace-ft run` trains the core with the project's loop;
- `trace-ft adapt` drives the same strategy and checkpoints between the steps;
- `trace_ft.integrations.hf.trace_optimizer` hands the core optimizer to a Trainer, and
  `TraceCallback` records the task when the Trainer is done.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from trace_kernels import CoreMask, MaskedAdamW
from trace_kernels.core_grads import CoreGrads, install_core_grads
from trace_kernels.sharding import is_dtensor, local_tensor

from .offload import DiskTensors
from .probe import DEFAULT_EXCLUDE, ProbeResult, default_loss, eligible_parameters, empirical_fisher, probe
from .select import EarlierTask, Selection, SelectConfig, select_core, specificity_size
from .sketch import BlockSketch, sketch_update


# Past this many eligible elements a model is "large": its exact updates are kept in bf16
# (half the bytes per task; a cosine against a bf16 update moves by about 1e-3 at most), the
# probe's Fisher is its bias-corrected second moment (`probe(fisher="adam")`, within 1–5 %
# of the mean of g²) and, on the CPU, the probe keeps its pre-probe copy on disk: memory
# then holds the probe's gradients and two moments and one copy of the weights, less than
# full fine-tuning's gradients and moments of every weight.
LARGE_MODEL = 1 << 24


def record_updates(deltas: dict[str, Tensor], core: CoreMask, sketch_dim: int | None,
                   unit: str = "block", dtype: torch.dtype | None = None,
                   to_disk: bool | None = None) -> Mapping[str, Tensor | BlockSketch]:
    """What a history keeps of a task's probe update: exact (in `dtype`; None: fp32, or
    bf16 past `LARGE_MODEL` eligible elements), or count-sketched per specificity
    unit (so later tasks' cosines are measured on the same units). `to_disk` (None: past
    `LARGE_MODEL` unless Δ is sharded): exact updates go to a temporary file
    (`DiskTensors`), read back one tensor at a time by later selections (which move each to
    Δ's device), so neither host nor accelerator memory grows by 2 bytes per parameter with
    every task."""
    if sketch_dim is None:
        large = sum(d.numel() for d in deltas.values()) > LARGE_MODEL
        if dtype is None:
            dtype = torch.bfloat16 if large else torch.float32
        if to_disk is None:
            to_disk = large and not any(is_dtensor(d) for d in deltas.values())
        if to_disk:  # each cast just before it is written: no second copy of the update
            return DiskTensors((n, d.detach().to("cpu", dtype)) for n, d in deltas.items())
        return {n: d.to(dtype) for n, d in deltas.items()}
    return {n: sketch_update(d, n, specificity_size(core[n].shape, core[n].block_size, unit), sketch_dim)
            for n, d in deltas.items()}


def freeze_outside(model: nn.Module, core: CoreMask) -> list[tuple[nn.Parameter, bool]]:
    """``requires_grad`` only on the tensors that hold core elements, so backward computes
    no other weight gradient. Returns the previous flags (for `restore_flags`)."""
    live = core.nonempty()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for n, p in model.named_parameters():
        p.requires_grad_(n in live)
    return flags


def restore_flags(flags: Sequence[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


@dataclass
class CoreStart:
    """Where training a core continues from when the probe's steps count toward the task: per
    core tensor, its core elements' values after the probe (θ⁰ + Δ, fp32, in mask order) and
    the probe's AdamW moments there, and the probe's step count."""

    values: dict[str, Tensor]
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    steps: int

    _PARTS = ("values", "exp_avg", "exp_avg_sq")

    def to_tensors(self) -> dict[str, Tensor]:
        """One flat dict of tensors (for a safetensors file): `<part>/<name>`, and the step count."""
        out = {f"{part}/{n}": t for part in self._PARTS for n, t in getattr(self, part).items()}
        return {**out, "steps": torch.tensor([self.steps], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> CoreStart:
        parts = {part: {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith(part + "/")}
                 for part in cls._PARTS}
        return cls(**parts, steps=int(tensors["steps"][0]))


def core_start(model: nn.Module, result: ProbeResult, core: CoreMask) -> CoreStart:
    """The probe's state on the core (the model holds θ⁰ again): see `CoreStart`."""
    m = result.moments
    if m is None:
        raise ValueError("the probe kept no moments: probe with keep_moments=True to continue from it")
    params = dict(model.named_parameters())
    values, exp_avg, exp_avg_sq = {}, {}, {}
    with torch.no_grad():
        for name, entry in core.nonempty().items():
            if is_dtensor(params[name]):
                raise ValueError(f"{name!r}: continuing from the probe needs unsharded weights")
            idx = entry.element_indices().to(params[name].device)
            values[name] = params[name].detach().reshape(-1)[idx].float() + result.deltas[name].reshape(-1)[idx].float()
            exp_avg[name] = m.exp_avg[name].reshape(-1)[idx].clone()
            v = m.exp_avg_sq.get(name)
            exp_avg_sq[name] = (v.reshape(-1)[idx].clone() if v is not None
                                else result.fisher[name].reshape(-1)[idx].float() * m.v_scale[name])
    return CoreStart(values, exp_avg, exp_avg_sq, max(int(t) for t in m.step.values()))


def continue_from(opt: MaskedAdamW, model: nn.Module, start: CoreStart) -> None:
    """Put the probe's state on the core into `model` (the core's values) and into `opt`'s
    state (moments, fp32 masters, step), so training continues where the probe left off."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, values in start.values.items():
            p = params[name]
            p.view(-1)[opt.core_elements(p)] = values.to(p.dtype)
            st = opt.init_state(p)
            st["exp_avg"].copy_(start.exp_avg[name])
            st["exp_avg_sq"].copy_(start.exp_avg_sq[name])
            if "master" in st:
                st["master"].copy_(values)
            st["step"] = torch.tensor(float(start.steps))


@dataclass
class FoundCore:
    """A task's core and what its probe leaves for the history: the update in the history's
    form (`record_updates`: exact, bf16 or on disk for a large model, or sketched) and the
    probe's last loss. The probe result and selection themselves only when asked to be kept
    (`find_core(keep=True)`), since they hold two model-sized tensors."""

    core: CoreMask
    updates: Mapping[str, Tensor | BlockSketch]
    probe_loss: float | None = None
    probe: ProbeResult | None = None
    selection: Selection | None = None
    start: CoreStart | None = None   # the probe's state on the core (`find_core(keep_moments=True)`)


@dataclass
class CoreTraining:
    """What `TracePipeline.train_setup` did to a model to train its core: the optimizer,
    the ``requires_grad`` flags it changed and the core-gradient layers it installed.
    `restore` undoes the changes to the model (the optimizer keeps its state); a `with`
    block restores on its way out."""

    optimizer: MaskedAdamW
    flags: list[tuple[nn.Parameter, bool]] | None
    core_grads: CoreGrads | None

    def restore(self) -> None:
        if self.core_grads is not None:
            self.core_grads.remove()
            self.core_grads = None
        if self.flags is not None:
            restore_flags(self.flags)
            self.flags = None

    def __enter__(self) -> CoreTraining:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


class TracePipeline:
    """The TRACE method for one task after another.

    select: the selection rule (`SelectConfig`); probe_steps / probe_lr: the warm-start
    probe (None: the lr its caller passes, the run's); probe_autocast: the dtype the probe's
    products run in (`probe(autocast=)`; None: the weights'); sketch_dim: keep earlier
    updates as count sketches of this many values per unit (None: exact); exclude: name
    patterns that are never eligible; fisher_batches: batches of the Fisher estimate the
    guard stores.
    """

    def __init__(self, select: SelectConfig | None = None, *, probe_steps: int = 50,
                 probe_lr: float | None = None, sketch_dim: int | None = None,
                 exclude: Sequence[str] = DEFAULT_EXCLUDE, fisher_batches: int = 20,
                 probe_autocast: torch.dtype | None = None) -> None:
        self.select_config = select or SelectConfig()  # (checked when it was made)
        if probe_steps < 1:
            raise ValueError(f"probe_steps must be >= 1, got {probe_steps}")
        if sketch_dim is not None and sketch_dim < 1:
            raise ValueError(f"sketch_dim must be >= 1, got {sketch_dim}")
        self.probe_steps = probe_steps
        self.probe_lr = probe_lr
        self.probe_autocast = probe_autocast
        self.sketch_dim = sketch_dim
        self.exclude = tuple(exclude)
        self.fisher_batches = fisher_batches
        self.history: list[EarlierTask] = []

    def config(self) -> dict:
        return {"probe_steps": self.probe_steps, "probe_lr": self.probe_lr,
                "probe_autocast": str(self.probe_autocast).removeprefix("torch.") if self.probe_autocast else None,
                "sketch_dim": self.sketch_dim, "fisher_batches": self.fisher_batches,
                "select": asdict(self.select_config)}

    @property
    def guarded(self) -> bool:
        """Whether selection uses earlier tasks' Fisher diagonals (the interference guard)."""
        return self.select_config.method == "trace" and self.select_config.protect > 0

    # -- 1. probe and select --
    def probe_and_select(self, model: nn.Module, batches: Iterable, *, lr: float,
                         betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                         weight_decay: float = 0.0, max_grad_norm: float | None = None,
                         loss_fn: Callable[[nn.Module, object], Tensor] = default_loss,
                         backend: str | None = None, progress: bool | str = False,
                         sync_grads: Callable[[list[Tensor]], None] | None = None,
                         ) -> tuple[ProbeResult, Selection]:
        """The warm-start probe from the model's current weights (left exactly as they
        were), and the core chosen against `history`. `lr` is the training lr; the probe
        uses `probe_lr` when set."""
        result = self.probe(model, batches, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            max_grad_norm=max_grad_norm, loss_fn=loss_fn, backend=backend,
                            progress=progress, sync_grads=sync_grads)
        return result, self.select(result)

    def probe(self, model: nn.Module, batches: Iterable, *, lr: float, **kw) -> ProbeResult:
        """The warm-start probe alone (`probe_and_select`'s first half). A large model's
        (`LARGE_MODEL`) Fisher is the probe's bias-corrected second moment (no buffer of
        its own), and its pre-probe copy goes to disk when its weights are on the CPU."""
        params = [p for _, p in eligible_parameters(model, exclude=self.exclude)]
        large = sum(p.numel() for p in params) > LARGE_MODEL
        kw.setdefault("fisher", "adam" if large else "mean")
        kw.setdefault("autocast", self.probe_autocast)
        if "offload_device" not in kw and large and all(local_tensor(p).device.type == "cpu" for p in params):
            kw["offload_device"] = "disk"
        return probe(model, batches, self.probe_steps, self.probe_lr or lr, exclude=self.exclude, **kw)

    def select(self, result: ProbeResult) -> Selection:
        """The core chosen from a probe against `history` (`probe_and_select`'s second half)."""
        return select_core(result, self.history, self.select_config)

    def find_core(self, model: nn.Module, batches: Iterable, *, lr: float, keep: bool = False,
                  gather: Callable[[dict], dict] | None = None, phase=None, keep_moments: bool = False,
                  **probe_kw) -> FoundCore:
        """Step 1 of a task: the probe from the model's current weights (left as they were),
        the core chosen against `history`, and the probe's update as the history keeps it
        (`gather`: whole tensors from a sharded probe's, for a history on disk). `lr`: the
        probe's when `probe_lr` is unset. `phase(name)`: a context timing each part.
        `keep_moments`: also the probe's state on the core (`FoundCore.start`), to continue
        training from."""
        phase = phase or (lambda name: contextlib.nullcontext())
        with phase("probe"):
            result = self.probe(model, batches, lr=lr, keep_moments=keep_moments, **probe_kw)
        with phase("selection"):
            sel = self.select(result)
        start = core_start(model, result, sel.mask) if keep_moments else None
        result.moments = None  # (the probe's moments are let go with it)
        with phase("history"):
            deltas = gather(result.deltas) if gather is not None else result.deltas
            updates = self.recorded_updates(deltas, sel.mask)
        loss = result.losses[-1] if result.losses else None
        return FoundCore(sel.mask, updates, loss, result if keep else None, sel if keep else None, start)

    # -- 2. the optimizer over the core --
    @staticmethod
    def check(model: nn.Module, core: CoreMask) -> CoreMask:
        """Raise if the core does not fit the model or is empty; its non-empty entries."""
        core.check_shapes({n: tuple(p.shape) for n, p in model.named_parameters()}, "the core")
        live = core.nonempty()
        if not live:
            raise ValueError("the core is empty: nothing would be trained (raise the budget)")
        return live

    @staticmethod
    def optimizer(model: nn.Module, core: CoreMask, *, lr: float,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                  weight_decay: float = 0.0, backend: str | None = None,
                  master_weights: bool | None = None, core_grads: CoreGrads | None = None,
                  checked: bool = False) -> MaskedAdamW:
        """`MaskedAdamW` over the tensors that hold core elements (raises if the core is
        empty or does not fit the model, unless `checked` says that was done), and the
        carriers of `core_grads` (the layers whose backward computes the core rows' weight
        gradients only). Freezing the others is `freeze_outside`'s."""
        live = core.nonempty() if checked else TracePipeline.check(model, core)
        params = dict(model.named_parameters())
        carriers = core_grads.named_parameters() if core_grads is not None else []
        return MaskedAdamW([(n, p) for n, p in params.items() if n in live] + carriers, lr=lr, betas=betas,
                           eps=eps, weight_decay=weight_decay, masks=live, backend=backend,
                           master_weights=master_weights)

    @staticmethod
    def train_setup(model: nn.Module, core: CoreMask, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, weight_decay: float = 0.0, backend: str | None = None,
                    master_weights: bool | None = None, freeze: bool = True,
                    core_grads: bool = False) -> CoreTraining:
        """Everything training a core needs, in order: the core checked against the model
        (before anything changes), the other tensors frozen (`freeze`), core-only weight
        gradients installed (`core_grads`), the optimizer built; undone by the result's
        `restore` (or its `with` block), and on a failure midway."""
        TracePipeline.check(model, core)
        setup = CoreTraining(None, freeze_outside(model, core) if freeze else None,  # type: ignore[arg-type]
                             None)
        try:
            if core_grads:
                setup.core_grads = install_core_grads(model, core)
            setup.optimizer = TracePipeline.optimizer(
                model, core, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, backend=backend,
                master_weights=master_weights, core_grads=setup.core_grads, checked=True)
        except BaseException:
            setup.restore()
            raise
        return setup

    # -- 3. after training --
    def fisher(self, model: nn.Module, batches: Iterable,
               loss_fn: Callable[[nn.Module, object], Tensor] = default_loss) -> dict[str, Tensor]:
        """The Fisher diagonal at the current weights over the eligible tensors, in bf16:
        what the guard of later tasks protects."""
        names = [n for n, _ in eligible_parameters(model, exclude=self.exclude)]
        return {n: f.to(torch.bfloat16) for n, f in empirical_fisher(
            model, batches, self.fisher_batches, loss_fn=loss_fn, names=names).items()}

    def recorded_updates(self, deltas: dict[str, Tensor], core: CoreMask) -> dict:
        """What the history keeps of the probe's update (see `record_updates`)."""
        return record_updates(deltas, core, self.sketch_dim, self.select_config.specificity_unit)

    def remember(self, core: CoreMask, updates: dict, fisher: dict | None = None) -> EarlierTask:
        """Record a finished task for later tasks' selection: its core, its update (as
        `recorded_updates` gives it) and, with the guard on, its Fisher diagonal."""
        earlier = EarlierTask(updates=updates, core=core, fisher=fisher or {})
        self.history.append(earlier)
        return earlier
