"""TRACE inside a Hugging Face `Trainer` run, in two added lines::

    opt = trace_optimizer(model, probe_batches, lr=args.learning_rate)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=(opt, None), callbacks=[TraceCallback(opt)])

`trace_optimizer` probes the task on `probe_batches`, selects its core (against a task
history, if given) and returns a `MaskedAdamW` over the core. The Trainer keeps
everything else: it builds its LR scheduler on this optimizer, clips gradients, accumulates
them, saves `optimizer.pt` with each checkpoint and loads it on resume. `TraceCallback`
writes the core next to each checkpoint (``trace_core.safetensors``), so a resumed script
passes ``core=load_core(checkpoint)`` instead of probing again, and on the end of training
appends the task to the history when one is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from trace_kernels import CoreMask, MaskedAdamW
from trace_kernels.core_grads import CoreGrads, install_core_grads

from ..method.pipeline import TracePipeline, freeze_outside, record_updates
from ..method.probe import DEFAULT_EXCLUDE, ProbeResult, default_loss
from ..method.routing import core_values
from ..method.select import Selection, SelectConfig
from ..store.atomic import write_with
from ..store.history import TaskHistory, TaskRecord, model_fingerprint

CORE_FILE = "trace_core.safetensors"


@dataclass
class TraceState:
    """What `trace_optimizer` found: the core, and the probe and selection it came from
    (None when the core was given)."""

    core: CoreMask
    probe: ProbeResult | None = None
    selection: Selection | None = None
    before: dict | None = None      # the core's values before training (for the history)
    core_grads: CoreGrads | None = None  # the layers computing core-rows gradients only


def load_core(checkpoint: str | Path) -> CoreMask:
    """The core `TraceCallback` saved with a Trainer checkpoint directory."""
    path = Path(checkpoint) / CORE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {CORE_FILE}: was it saved with TraceCallback?")
    return CoreMask.load(path)


def _on_device(loss_fn: Callable, device: torch.device) -> Callable:
    def run(model: nn.Module, batch) -> Tensor:
        if isinstance(batch, Mapping):
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        return loss_fn(model, batch)
    return run


def trace_optimizer(
    model: nn.Module,
    probe_batches: Iterable | None = None,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    probe_steps: int = 50,
    probe_lr: float | None = None,
    select: SelectConfig | None = None,
    history: TaskHistory | str | Path | None = None,
    core: CoreMask | str | Path | None = None,
    max_grad_norm: float | None = 1.0,
    freeze_others: bool = True,
    core_grads: bool = False,
    exclude=DEFAULT_EXCLUDE,
    loss_fn: Callable[[nn.Module, object], Tensor] = default_loss,
    backend: str | None = None,
    **select_overrides,
) -> MaskedAdamW:
    """A `MaskedAdamW` over the task's core, for ``Trainer(optimizers=(opt, None))``.

    probe_batches: batches of the task (dicts for ``model(**batch)``, e.g. from
        ``trainer.get_train_dataloader()``), cycled for `probe_steps` probe steps.
    lr, weight_decay, betas, eps: the optimizer's (pass the TrainingArguments' values).
    select / select_overrides: the selection (`SelectConfig` fields, e.g. ``budget=0.05,
        granularity="element"``). Default: element level, 5 % of the eligible elements.
    history: earlier tasks (a `TaskHistory` or its directory) to select against.
    core: a core to use instead of probing (`load_core(checkpoint)` on resume, or a file).
    freeze_others: set ``requires_grad=False`` on tensors without a core element, so
        backward skips their gradients (the probe restores the flags it changes).
    core_grads: linear layers whose core lies in a few rows compute only those rows'
        weight gradients (`trace_kernels.core_grads`; `TraceCallback` removes them when
        training ends, or call ``opt.trace.core_grads.remove()``). Off by default: the
        Trainer's clipping then measures the core rows' gradients instead of the whole
        tensors', which changes the training (see the README).
    The result's ``.trace`` holds the core, probe result and selection.

    Distributed runs: every rank must train the same core. Probe on one rank, save
    ``opt.trace.core``, and pass ``core=`` on every rank (GPU backward passes are not
    bit-deterministic, so separate probes can break ties differently).
    """
    if isinstance(history, (str, Path)):
        history = TaskHistory.open(history, model, create=True)
    elif history is not None:
        history.check_model(model)
    if core is not None:
        core = core if isinstance(core, CoreMask) else CoreMask.load(core)
        state = TraceState(core=core)
    else:
        if probe_batches is None:
            raise ValueError("trace_optimizer needs probe_batches (or a core to reuse)")
        pipeline = TracePipeline(replace(select or SelectConfig(granularity="element"), **select_overrides),
                                 probe_steps=probe_steps, probe_lr=probe_lr, exclude=exclude)
        pipeline.history = history.earlier() if history is not None else []
        device = next(model.parameters()).device
        result, sel = pipeline.probe_and_select(
            model, probe_batches, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            max_grad_norm=max_grad_norm, loss_fn=_on_device(loss_fn, device), backend=backend)
        state = TraceState(core=sel.mask, probe=result, selection=sel)
    TracePipeline.check(model, state.core)  # before any flag changes
    if freeze_others:
        freeze_outside(model, state.core)
    if core_grads:
        state.core_grads = install_core_grads(model, state.core)
    try:
        opt = TracePipeline.optimizer(model, state.core, lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay, backend=backend,
                                      core_grads=state.core_grads)
    except BaseException:
        if state.core_grads is not None:
            state.core_grads.remove()
        raise
    state.before = core_values(model, state.core)
    opt.trace = state
    return opt


def _trainer_callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is what this module is for
        return object
    return TrainerCallback


class TraceCallback(_trainer_callback_base()):
    """Saves the core with every Trainer checkpoint; with `history` and `task`, appends the
    task to the history when training ends (its core and its probe update, exact or
    sketched to `sketch_dim` values per block)."""

    def __init__(self, optimizer: MaskedAdamW, history: TaskHistory | str | Path | None = None,
                 task: str | None = None, test=(), sketch_dim: int | None = None,
                 hyperparameters: dict | None = None) -> None:
        if not hasattr(optimizer, "trace"):
            raise TypeError("TraceCallback takes the optimizer returned by trace_optimizer")
        if (history is None) != (task is None):
            raise ValueError("give both history and task (the name to record), or neither")
        self.optimizer, self.history, self.task = optimizer, history, task
        self.test, self.sketch_dim, self.hyperparameters = list(test), sketch_dim, hyperparameters or {}

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_with(folder / CORE_FILE, self.optimizer.trace.core.save)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        trace = self.optimizer.trace
        if trace.core_grads is not None:  # the model's layers as they were
            trace.core_grads.remove()
            trace.core_grads = None
        if self.history is None or not state.is_world_process_zero:
            return control
        updates = {}
        if trace.probe is not None:
            unit = trace.selection.config.specificity_unit if trace.selection else "block"
            updates = record_updates(trace.probe.deltas, trace.core, self.sketch_dim, unit)
        history = self.history
        if not isinstance(history, TaskHistory):
            history = TaskHistory.open(history, model, create=True)
        history.append(TaskRecord(
            name=self.task, core=trace.core, updates=updates, test=self.test, before=trace.before or {},
            after=core_values(model, trace.core),
            hyperparameters={**self.hyperparameters, "trainer_steps": state.global_step},
            summary={"core_elements": trace.core.numel_selected, "eligible_elements": trace.core.numel,
                     "state_bytes": int(self.optimizer.state_bytes()["total"])},
        ), model_fingerprint(model))
        return control


__all__ = ["trace_optimizer", "TraceCallback", "TraceState", "load_core", "CORE_FILE"]
