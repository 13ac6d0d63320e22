"""TRACE: probe the task, select its core against the earlier tasks, train only the core.

Per task: a warm-start probe (`probe`, Δ and Fisher) from the current weights; a core
chosen by importance and specificity (`select_core`) that avoids earlier tasks' cores;
then the task's full schedule with `MaskedAdamW` on the core only. Tensors without a core
element get ``requires_grad=False`` for the task, so backward does not compute their
gradients. Δ of every task (exact, or count-sketched when `sketch_dim` is set) and its
core are kept for the next task's specificity and exclusion.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from trace_kernels import CoreMask, MaskedAdamW

from ..probe import DEFAULT_EXCLUDE, eligible_parameters, empirical_fisher, probe
from ..select import EarlierTask, SelectConfig, select_core
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
        cfg = self.train_config(ctx)
        model = ctx.model
        guard = self.select.method == "trace" and self.select.protect > 0
        if guard and index == 1 and self.general is not None:
            self.history.append(EarlierTask(fisher=self._fisher(ctx, self.general, salt=30_000)))
        result = probe(model, ctx.batches([task], self.probe_steps, salt=10_000 + index),
                       self.probe_steps, self.probe_lr or cfg.lr, betas=cfg.betas,
                       weight_decay=cfg.weight_decay, exclude=self.exclude,
                       max_grad_norm=cfg.max_grad_norm)
        sel = select_core(result, self.history, self.select)
        mask = CoreMask({n: e for n, e in sel.mask.items() if e.num_selected})
        named = [(n, p) for n, p in model.named_parameters() if n in mask]
        flags = [(p, p.requires_grad) for p in model.parameters()]
        losses: list[float] = []
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            for _, p in named:
                p.requires_grad_(True)
            if named:
                opt = MaskedAdamW(named, lr=cfg.lr, betas=cfg.betas,
                                  weight_decay=cfg.weight_decay, masks=mask)
                losses = train_loop(model, opt, ctx.batches([task], cfg.steps, salt=index), cfg,
                                    desc=self.desc(ctx, index, task), progress=ctx.progress)
                state = optimizer_state_bytes(opt)
            else:
                state = 0
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        fisher = self._fisher(ctx, task, salt=20_000 + index) if guard else {}
        self.history.append(EarlierTask(updates=self._record(result.deltas, sel.mask),
                                        core=sel.mask, fisher=fisher))
        self.selections.append({"task": task.name, "core_elements": mask.numel_selected,
                                "eligible_elements": sel.mask.numel,
                                "tensors": len(mask), "probe_loss": result.losses[-1]})
        return TaskCost(trainable=mask.numel_selected, state_bytes=state, final_loss=final_loss(losses),
                        extra={"eligible": sel.mask.numel})

    def _record(self, deltas, mask: CoreMask):
        if self.sketch_dim is None:
            return deltas
        return {n: sketch_update(d, n, mask[n].block_size, self.sketch_dim) for n, d in deltas.items()}


def paper(**kw) -> Trace:
    """The authors' released rule: whole tensors, top 10 % by 0.5·L2 + 0.5·Fisher."""
    budget = kw.pop("budget", 0.10)
    return Trace(select=SelectConfig.paper(budget=budget), name=kw.pop("name", "trace_paper"), **kw)
