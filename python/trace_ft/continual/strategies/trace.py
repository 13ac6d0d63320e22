"""TRACE as a strategy of the continual bench: the steps of `TracePipeline` on the task's
batches, the core trained with the project's training loop.

Per task: a warm-start probe (Δ and Fisher) from the current weights; a core chosen by
importance and specificity that avoids earlier tasks' cores; then the task's full
schedule with `MaskedAdamW` on the core only. Tensors without a core element get
``requires_grad=False`` for the task, so backward does not compute their gradients. Δ of
every task (exact, or count-sketched when `sketch_dim` is set) and its core are kept for
the next task's specificity and exclusion.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import torch

from trace_kernels import CoreMask, MaskedAdamW

from ...lm.precision import with_fp32_attention
from ...lm.train import causal_lm_loss, load_optimizer_state, train_loop
from ...method.pipeline import CoreStart, FoundCore, TracePipeline, continue_from
from ...method.probe import DEFAULT_EXCLUDE
from ...method.routing import TaskValues, full_core_values
from ...method.select import EarlierTask, SelectConfig
from ..routed import routed_entry, routed_row
from .base import Context, Strategy, TaskCost, final_loss, optimizer_state_bytes
from .lora import adapter_bytes


class Trace(Strategy):
    name = "trace"

    def __init__(self, select: SelectConfig | None = None, probe_steps: int = 50,
                 probe_lr: float | None = None, lr: float | None = None,
                 sketch_dim: int | None = None, exclude=DEFAULT_EXCLUDE,
                 fisher_batches: int = 20, general=None, name: str = "trace",
                 master_weights: bool | None = None, core_grads: bool = False,
                 keep_routes: bool = True, lora_rank: int = 8, continue_probe: bool = False,
                 probe_autocast: torch.dtype | None = None) -> None:
        super().__init__(lr)
        # the probe's steps count toward the task: the core trains on from the probe's state
        # on it (its values and moments) for the rest of the task's steps
        self.continue_probe = continue_probe
        self.master_weights = master_weights
        self.core_grads = core_grads
        self.pipeline = TracePipeline(select, probe_steps=probe_steps, probe_lr=probe_lr,
                                      sketch_dim=sketch_dim, exclude=exclude,
                                      fisher_batches=fisher_batches, probe_autocast=probe_autocast)
        self.general = general   # a Task of general ability whose Fisher is protected too
        self.name = name
        self.selections: list[dict] = []
        # each task's core values before and after it, for the task-routed row (None: not kept)
        self.routes: list[TaskValues] | None = [] if keep_routes else None
        self.lora_rank = lora_rank  # what the routed row's storage is compared with

    def core_steps(self, steps: int) -> int:
        """The core's training steps in a task of `steps`: all of them, or, continuing from
        the probe, those after it (the probe's steps are the task's first)."""
        return steps - min(self.pipeline.probe_steps, steps) if self.continue_probe else steps

    @property
    def history(self) -> list[EarlierTask]:
        return self.pipeline.history

    @history.setter
    def history(self, earlier: list[EarlierTask]) -> None:
        self.pipeline.history = list(earlier)

    def config(self) -> dict:
        return {"lr": self.lr, **self.pipeline.config(), "master_weights": self.master_weights,
                "core_grads": self.core_grads, "continue_probe": self.continue_probe,
                "protect_general": None if self.general is None else self.general.name}

    def learn(self, ctx: Context, index, task, seen) -> TaskCost:
        self.protect_general(ctx, index)
        found = self.find_core(ctx, index, task)  # the probe's Δ and Fisher are let go here
        core = found.core
        with ctx.phase("core values"):  # whole tensors (gathered on every rank when sharded)
            before = full_core_values(ctx.model, core) if self.routes is not None else None
        losses, state = self.train_core(ctx, index, task, core, start=found.start)
        with ctx.phase("core values"):
            if self.routes is not None:
                self.routes.append(TaskValues(core, before, full_core_values(ctx.model, core)))
        self.remember(ctx, index, task, found)
        return self.cost(core, state, losses)

    def report(self, entry: dict, model, base, seq, phases) -> dict[str, dict]:
        """The cores chosen, and the task-routed row: each task scored with the model as it
        stood right after it (`model`, done with, is set back in place)."""
        entry["selections"] = self.selections
        if not self.routes:
            return {}
        with phases.phase("scoring: routed"):
            entry["routed"] = routed_row(model, base, self.routes, seq, in_place=True)
        entry["routed"]["lora_bytes_per_task"] = adapter_bytes(base, self.lora_rank)
        return {f"{self.name}_routed": routed_entry(entry, seq.first)}

    # The steps of `learn`, also used one by one by `trace-ft adapt` (which checkpoints
    # between them), so both give the same numbers.
    def protect_general(self, ctx: Context, index: int) -> None:
        if self.pipeline.guarded and index == 1 and self.general is not None:
            self.history.append(EarlierTask(fisher=self._fisher(ctx, self.general, salt=30_000)))

    def _fisher(self, ctx: Context, task, salt: int) -> dict:
        batches = ctx.batches([task], self.pipeline.fisher_batches, salt=salt)
        with ctx.phase("guard fisher"):
            return self.pipeline.fisher(ctx.model, batches, loss_fn=ctx.whole_batch_loss())

    def find_core(self, ctx: Context, index: int, task, gather=None) -> FoundCore:
        """The warm-start probe from the current weights, the core chosen against
        `self.history`, and the probe's update as the history keeps it (`TracePipeline.find_core`).
        The probe runs at the run's lr unless `probe_lr` is set."""
        cfg = self.train_config(ctx)
        par = ctx.parallel
        loss = with_fp32_attention(causal_lm_loss)  # (under a bf16 probe on a CPU: the faster kernel)
        dp = ({"loss_fn": loss} if par is None else {"loss_fn": par.loss(loss), "sync_grads": par.sync_grads})
        batches = ctx.batches([task], self.pipeline.probe_steps, salt=10_000 + index)
        t0 = time.perf_counter()
        found = self.pipeline.find_core(
            ctx.model, batches, lr=ctx.train.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm, gather=gather, phase=lambda name: self._phase(ctx, index, task, name),
            keep_moments=self.continue_probe,
            progress=ctx.progress and f"{self.desc(ctx, index, task)} (probe)", **dp)
        core = found.core
        ctx.log(f"{self.desc(ctx, index, task)}: core of {core.numel_selected:,} of {core.numel:,} eligible "
                f"elements ({core.density:.2%}) after the probe and selection ({time.perf_counter() - t0:.0f} s)")
        if par is not None:  # every rank must train the same core
            par.check_same(f"the core of {task.name}", b"".join(
                n.encode() + e.block_size.to_bytes(8, "little") + e.indices.to(torch.int64).numpy().tobytes()
                for n, e in found.core.items()))
        return found

    def _phase(self, ctx: Context, index: int, task, name: str):
        """A phase of finding the core, timed; the selection (no progress bar) says it starts."""
        if name == "selection":
            ctx.log(f"{self.desc(ctx, index, task)}: selecting the core")
        return ctx.phase(name)

    def train_core(self, ctx: Context, index: int, task, core: CoreMask, *, start_step: int = 0,
                   optimizer_state: dict | None = None,
                   on_step: Callable[[int, list[float], MaskedAdamW], None] | None = None,
                   start: CoreStart | None = None) -> tuple[list[float], int]:
        """The task's schedule with MaskedAdamW on `core` only; returns the losses of the
        steps run and the optimizer's state bytes. To resume, restore the weights of step
        `start_step` and pass the optimizer's state_dict of that step. `start`: continue from
        the probe's state on the core, its steps counted among the task's."""
        cfg = self.train_config(ctx)
        if not core.nonempty():
            return [], 0
        model = ctx.model
        if start is not None:
            start_step = min(start.steps, cfg.steps)
        batches = itertools.islice(ctx.batches([task], cfg.steps, salt=index), start_step, None)
        with ctx.phase("train setup"):
            # linear layers whose core is a few rows: backward computes only those rows' gradients
            setup = self.pipeline.train_setup(model, core, lr=cfg.lr, betas=cfg.betas,
                                              weight_decay=cfg.weight_decay, master_weights=self.master_weights,
                                              core_grads=self.core_grads)
        with setup:
            opt = setup.optimizer
            if optimizer_state is not None:
                with ctx.phase("train setup"):
                    load_optimizer_state(opt, optimizer_state, ctx.parallel, model)
            elif start is not None:
                with ctx.phase("train setup"):
                    continue_from(opt, model, start)
            with ctx.phase("train steps"):
                losses = train_loop(model, opt, batches, cfg, desc=self.desc(ctx, index, task),
                                    progress=ctx.progress, start_step=start_step, parallel=ctx.parallel,
                                    on_step=None if on_step is None else
                                    (lambda done, ls: on_step(done, ls, opt)))
            return losses, optimizer_state_bytes(opt)

    def trained_fisher(self, ctx: Context, index: int, task) -> dict:
        """With the guard on, the task's Fisher after its training (what later tasks'
        selection protects); otherwise nothing."""
        return self._fisher(ctx, task, salt=20_000 + index) if self.pipeline.guarded else {}

    def remember(self, ctx: Context, index: int, task, found: FoundCore) -> EarlierTask:
        """Record the task for later tasks' selection: its update (as `find_core` kept it),
        its core and, with the guard on, its Fisher after training: not after a run's last
        task (`ctx.num_tasks`; 0: not known), which no later selection reads (a run keeps
        no history past its end; `trace-ft adapt` takes it through `trained_fisher`)."""
        last = 0 < ctx.num_tasks <= index
        fisher = {} if last else self.trained_fisher(ctx, index, task)
        core = found.core
        with ctx.phase("history"):
            earlier = self.pipeline.remember(core, found.updates, fisher)
        self.selections.append({"task": task.name, "core_elements": core.numel_selected,
                                "eligible_elements": core.numel,
                                "tensors": sum(1 for e in core.values() if e.num_selected),
                                "probe_loss": found.probe_loss})
        return earlier

    @staticmethod
    def cost(core: CoreMask, state_bytes: int, losses: list[float]) -> TaskCost:
        return TaskCost(trainable=core.numel_selected, state_bytes=state_bytes,
                        final_loss=final_loss(losses), extra={"eligible": core.numel})
