"""TRACE: probe the task, select its core against the earlier tasks, train only the core.

Per task: a warm-start probe (`probe`, Δ and Fisher) from the current weights; a core
chosen by importance and specificity (`select_core`) that avoids earlier tasks' cores;
then the task's full schedule with `MaskedAdamW` on the core only. Tensors without a core
element get ``requires_grad=False`` for the task, so backward does not compute their
gradients. Δ of every task (exact, or count-sketched when `sketch_dim` is set) and its
core are kept for the next task's specificity and exclusion.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict

import torch

from trace_kernels import CoreMask, MaskedAdamW

from ..probe import DEFAULT_EXCLUDE, ProbeResult, eligible_parameters, empirical_fisher, probe
from ..select import EarlierTask, Selection, SelectConfig, select_core, specificity_size
from ..sketch import sketch_update
from ..train import train_loop
from .base import Context, Strategy, TaskCost, final_loss, optimizer_state_bytes


class Trace(Strategy):
    name = "trace"

    def __init__(self, select: SelectConfig | None = None, probe_steps: int = 50,
                 probe_lr: float | None = None, lr: float | None = None,
                 sketch_dim: int | None = None, exclude=DEFAULT_EXCLUDE,
                 fisher_batches: int = 20, general=None, name: str = "trace") -> None:
        super().__init__(lr)
        self.select = select or SelectConfig()
        self.select.validate()
        if probe_steps < 1:
            raise ValueError(f"probe_steps must be >= 1, got {probe_steps}")
        self.probe_steps = probe_steps
        self.probe_lr = probe_lr
        self.sketch_dim = sketch_dim
        self.exclude = tuple(exclude)
        self.fisher_batches = fisher_batches
        self.general = general   # a Task of general ability whose Fisher is protected too
        self.name = name
        self.history: list[EarlierTask] = []
        self.selections: list[dict] = []

    def config(self) -> dict:
        return {"lr": self.lr, "probe_steps": self.probe_steps, "probe_lr": self.probe_lr,
                "sketch_dim": self.sketch_dim, "fisher_batches": self.fisher_batches,
                "protect_general": None if self.general is None else self.general.name,
                "select": asdict(self.select)}

    def _fisher(self, ctx: Context, task, salt: int) -> dict:
        """The task's Fisher diagonal at the current weights, over the eligible tensors:
        what the interference guard of later tasks protects."""
        names = [n for n, _ in eligible_parameters(ctx.model, exclude=self.exclude)]
        return {n: f.to(torch.bfloat16) for n, f in empirical_fisher(
            ctx.model, ctx.batches([task], self.fisher_batches, salt=salt),
            self.fisher_batches, names=names).items()}

    def learn(self, ctx: Context, index, task, seen) -> TaskCost:
        self.protect_general(ctx, index)
        result, sel = self.probe_and_select(ctx, index, task)
        losses, state = self.train_core(ctx, index, task, sel.mask)
        self.remember(ctx, index, task, sel.mask, result)
        return self.cost(sel.mask, state, losses)

    # The steps of `learn`, also used one by one by `trace-ft adapt` (which checkpoints
    # between them), so both give the same numbers.
    @property
    def guarded(self) -> bool:
        return self.select.method == "trace" and self.select.protect > 0

    def protect_general(self, ctx: Context, index: int) -> None:
        if self.guarded and index == 1 and self.general is not None:
            self.history.append(EarlierTask(fisher=self._fisher(ctx, self.general, salt=30_000)))

    def probe_and_select(self, ctx: Context, index: int, task) -> tuple[ProbeResult, Selection]:
        """The warm-start probe from the current weights, and the core chosen against
        `self.history`."""
        cfg = self.train_config(ctx)
        result = probe(ctx.model, ctx.batches([task], self.probe_steps, salt=10_000 + index),
                       self.probe_steps, self.probe_lr or cfg.lr, betas=cfg.betas,
                       weight_decay=cfg.weight_decay, exclude=self.exclude,
                       max_grad_norm=cfg.max_grad_norm,
                       progress=ctx.progress and f"{self.desc(ctx, index, task)} (probe)")
        return result, select_core(result, self.history, self.select)

    def train_core(self, ctx: Context, index: int, task, core: CoreMask, *, start_step: int = 0,
                   optimizer_state: dict | None = None,
                   on_step: Callable[[int, list[float], MaskedAdamW], None] | None = None,
                   ) -> tuple[list[float], int]:
        """The task's schedule with MaskedAdamW on `core` only; returns the losses of the
        steps run and the optimizer's state bytes. To resume, restore the weights of step
        `start_step` and pass the optimizer's state_dict of that step."""
        cfg = self.train_config(ctx)
        model = ctx.model
        mask = CoreMask({n: e for n, e in core.items() if e.num_selected})
        named = [(n, p) for n, p in model.named_parameters() if n in mask]
        if not named:
            return [], 0
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            for _, p in named:
                p.requires_grad_(True)
            opt = MaskedAdamW(named, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                              masks=mask)
            if optimizer_state is not None:
                opt.load_state_dict(optimizer_state)
                for g in opt.param_groups:  # the schedule restarts from the base lr
                    g["lr"] = cfg.lr
                    g.pop("initial_lr", None)
            batches = itertools.islice(ctx.batches([task], cfg.steps, salt=index), start_step, None)
            losses = train_loop(model, opt, batches, cfg, desc=self.desc(ctx, index, task),
                                progress=ctx.progress, start_step=start_step,
                                on_step=None if on_step is None else
                                (lambda done, ls: on_step(done, ls, opt)))
            return losses, optimizer_state_bytes(opt)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def trained_fisher(self, ctx: Context, index: int, task) -> dict:
        """With the guard on, the task's Fisher after its training (what later tasks'
        selection protects); otherwise nothing."""
        return self._fisher(ctx, task, salt=20_000 + index) if self.guarded else {}

    def remember(self, ctx: Context, index: int, task, core: CoreMask, result: ProbeResult) -> EarlierTask:
        """Record the task for later tasks' selection: its update (exact or sketched), its
        core and, with the guard on, its Fisher after training."""
        earlier = EarlierTask(updates=self.recorded_updates(result.deltas, core), core=core,
                              fisher=self.trained_fisher(ctx, index, task))
        self.history.append(earlier)
        self.selections.append({"task": task.name, "core_elements": core.numel_selected,
                                "eligible_elements": core.numel,
                                "tensors": sum(1 for e in core.values() if e.num_selected),
                                "probe_loss": result.losses[-1]})
        return earlier

    @staticmethod
    def cost(core: CoreMask, state_bytes: int, losses: list[float]) -> TaskCost:
        return TaskCost(trainable=core.numel_selected, state_bytes=state_bytes,
                        final_loss=final_loss(losses), extra={"eligible": core.numel})

    def recorded_updates(self, deltas, core: CoreMask) -> dict:
        """What the history keeps of the probe's update (see `record_updates`)."""
        return record_updates(deltas, core, self.sketch_dim, self.select.specificity_unit)

def record_updates(deltas, core: CoreMask, sketch_dim: int | None, unit: str = "block") -> dict:
    """What the history keeps of a task's probe update: exact, or count-sketched per
    specificity unit (so later tasks' cosines are measured on the same units)."""
    if sketch_dim is None:
        return dict(deltas)
    return {n: sketch_update(d, n, specificity_size(core[n].shape, core[n].block_size, unit), sketch_dim)
            for n, d in deltas.items()}


def paper(**kw) -> Trace:
    """The authors' released rule: whole tensors, top 10 % by 0.5·L2 + 0.5·Fisher."""
    budget = kw.pop("budget", 0.10)
    return Trace(select=SelectConfig.paper(budget=budget), name=kw.pop("name", "trace_paper"), **kw)
