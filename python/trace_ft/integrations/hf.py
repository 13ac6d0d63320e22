"""TRACE inside a Hugging Face `Trainer` run, in two added lines::

    opt = trace_optimizer(model, probe_batches, lr=args.learning_rate)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=(opt, None), callbacks=[TraceCallback(opt)])

Under FSDP the Trainer refuses a ready optimizer; hand it the recipe instead, and it
builds the optimizer on the model before accelerate shards it (MaskedAdamW then follows
its parameters onto the shards)::

    recipe = trace_optimizer_recipe(probe_batches, lr=args.learning_rate, budget=0.05)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=recipe, callbacks=[TraceCallback(recipe)])

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
from trace_kernels.core_grads import CoreGrads
from trace_kernels.sharding import is_dtensor

from ..method.pipeline import TracePipeline, record_updates
from ..method.probe import DEFAULT_EXCLUDE, ProbeResult, default_loss
from ..method.routing import full_core_values
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
    updates: dict | None = None     # the probe's update as a history keeps it (None: core given)
    before: dict | None = None      # the core's values before training (for the history)
    core_grads: CoreGrads | None = None  # the layers computing their core's gradients only


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
    core_grads: linear layers whose core lies in a few rows (or is a few scattered
        elements) compute only those rows' (elements') weight gradients (`trace_kernels.core_grads`; `TraceCallback` removes them when
        training ends, or call ``opt.trace.core_grads.remove()``). Off by default: the
        Trainer's clipping then measures the core's gradients instead of the whole
        tensors', which changes the training (see the README).
    The result's ``.trace`` holds the core, probe result and selection.

    Distributed runs (torch.distributed initialised, world > 1): every rank must train the
    same core, and GPU backward passes are not bit-deterministic, so separate probes could
    break ties differently. On an unsharded model rank 0 probes alone (on its
    `probe_batches`; the others may pass None) and sends the core to the others, who wait.
    On an FSDP2-sharded model every rank probes its shards together and all derive the
    same core.
    """
    if isinstance(history, (str, Path)):
        history = TaskHistory.open(history, model, create=True)
    elif history is not None:
        history.check_model(model)
    if core is not None:
        core = core if isinstance(core, CoreMask) else CoreMask.load(core)
        state = TraceState(core=core)
    else:
        def probe_here() -> TraceState:
            if probe_batches is None:
                raise ValueError("trace_optimizer needs probe_batches (or a core to reuse)")
            pipeline = TracePipeline(replace(select or SelectConfig(), **select_overrides),
                                     probe_steps=probe_steps, probe_lr=probe_lr, exclude=exclude)
            pipeline.history = history.earlier() if history is not None else []
            device = next(model.parameters()).device
            found = pipeline.find_core(
                model, probe_batches, lr=lr, keep=True, betas=betas, eps=eps, weight_decay=weight_decay,
                max_grad_norm=max_grad_norm, loss_fn=_on_device(loss_fn, device), backend=backend)
            return TraceState(core=found.core, probe=found.probe, selection=found.selection, updates=found.updates)

        state = _probe_once(model, probe_here)
    setup = TracePipeline.train_setup(model, state.core, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      backend=backend, freeze=freeze_others, core_grads=core_grads)
    opt, state.core_grads = setup.optimizer, setup.core_grads
    state.before = full_core_values(model, state.core)  # collective when sharded
    opt.trace = state
    return opt


def _probe_once(model: nn.Module, probe_here: Callable[[], TraceState]) -> TraceState:
    """`probe_here()` on every rank of a sharded model (its probe is collective) or in one
    process; on rank 0 alone for an unsharded model in a distributed run, whose core the
    other ranks receive. A failure on rank 0 reaches every rank as an error, not a hang."""
    import torch.distributed as dist

    sharded = any(is_dtensor(p) for p in model.parameters())
    if sharded or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return probe_here()
    sent: list = [None]  # rank 0's core, or its error as text
    failure = None
    if dist.get_rank() == 0:
        try:
            state = probe_here()
            sent[0] = state.core
        except Exception as exc:
            failure, sent[0] = exc, f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(sent, src=0)
    if failure is not None:
        raise failure
    if isinstance(sent[0], str):
        raise RuntimeError(f"trace_optimizer: the probe failed on rank 0: {sent[0]}")
    return state if dist.get_rank() == 0 else TraceState(core=sent[0])


class _Builder:
    """An optimizer factory as the Trainer uses one: called with no arguments, then the
    result with the model and the keywords."""

    def __init__(self) -> None:
        self.optimizer: MaskedAdamW | None = None

    def __call__(self) -> Callable[..., MaskedAdamW]:
        return self.build

    def build(self, model: nn.Module, **kwargs) -> MaskedAdamW:
        self.optimizer = trace_optimizer(model, **kwargs)
        return self.optimizer


class TraceOptimizerRecipe(tuple):
    """``(factory, keywords)`` for ``Trainer(optimizer_cls_and_kwargs=...)``; ``.optimizer``
    is the `MaskedAdamW` once the Trainer has built it (in ``train()``)."""

    @property
    def optimizer(self) -> MaskedAdamW:
        if self[0].optimizer is None:
            raise RuntimeError("the Trainer has not built the optimizer yet (it does in train())")
        return self[0].optimizer


def trace_optimizer_recipe(probe_batches: Iterable | None = None, **kwargs) -> TraceOptimizerRecipe:
    """`trace_optimizer`'s arguments, less the model, for ``Trainer(optimizer_cls_and_kwargs=
    ...)``: the way when the Trainer builds the optimizer itself, which it must under FSDP.
    It builds it on the model before accelerate wraps or shards it; under FSDP2 accelerate
    then swaps the optimizer's parameters for their shards, and `MaskedAdamW` maps the core
    onto them. Pass the recipe to `TraceCallback` in place of the optimizer."""
    return TraceOptimizerRecipe((_Builder(), {"probe_batches": probe_batches, **kwargs}))


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

    def __init__(self, optimizer: MaskedAdamW | TraceOptimizerRecipe,
                 history: TaskHistory | str | Path | None = None, task: str | None = None, test=(),
                 sketch_dim: int | None = None, hyperparameters: dict | None = None) -> None:
        if not (hasattr(optimizer, "trace") or isinstance(optimizer, TraceOptimizerRecipe)):
            raise TypeError("TraceCallback takes the optimizer returned by trace_optimizer "
                            "(or the recipe from trace_optimizer_recipe)")
        if (history is None) != (task is None):
            raise ValueError("give both history and task (the name to record), or neither")
        self._optimizer, self.history, self.task = optimizer, history, task
        self.test, self.sketch_dim, self.hyperparameters = list(test), sketch_dim, hyperparameters or {}

    @property
    def optimizer(self) -> MaskedAdamW:
        opt = self._optimizer
        return opt.optimizer if isinstance(opt, TraceOptimizerRecipe) else opt

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
        if self.history is None:
            return control
        after = full_core_values(model, trace.core)  # collective when sharded: every rank
        if not state.is_world_process_zero:
            return control
        updates = trace.updates or {}
        if updates and self.sketch_dim is not None:  # the recorded update, sketched
            unit = trace.selection.config.specificity_unit if trace.selection else "block"
            updates = record_updates(updates, trace.core, self.sketch_dim, unit)
        history = self.history
        if not isinstance(history, TaskHistory):
            history = TaskHistory.open(history, model, create=True)
        history.append(TaskRecord(
            name=self.task, core=trace.core, updates=updates, test=self.test, before=trace.before or {},
            after=after, hyperparameters={**self.hyperparameters, "trainer_steps": state.global_step},
            summary={"core_elements": trace.core.numel_selected, "eligible_elements": trace.core.numel,
                     "state_bytes": int(self.optimizer.state_bytes()["total"])},
        ), model_fingerprint(model))
        return control


__all__ = ["trace_optimizer", "trace_optimizer_recipe", "TraceOptimizerRecipe", "TraceCallback", "TraceState", "load_core", "CORE_FILE"]
