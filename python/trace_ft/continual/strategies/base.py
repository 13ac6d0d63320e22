"""The strategy interface: a strategy trains one model through a sequence of tasks.

The runner gives every strategy the same `Context` (model, codec, training config, seed)
and the same data; a strategy decides only what is trained and how. `fit` calls
``evaluate(j)`` after it has trained through task j (1-based), which fills row j of the
accuracy matrix; the default trains the tasks one by one with `learn`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from trace_kernels.sharding import local_tensor

from ...lm.batches import EncodedSet, sample_batches
from ...lm.memory import PhaseLog
from ...lm.parallel import DataParallel, is_main
from ...lm.text import Codec
from ...lm.train import TrainConfig, causal_lm_loss, train_loop
from ...tasks import Task


@dataclass
class TaskCost:
    """What learning one task cost."""

    trainable: int = 0            # elements the optimizer may change
    state_bytes: int = 0          # optimizer state at the end of the task
    seconds: float = 0.0
    final_loss: float | None = None   # mean training loss over the last 10 % of steps
    extra: dict = field(default_factory=dict)


@dataclass
class Context:
    model: nn.Module
    codec: Codec
    train: TrainConfig
    seed: int = 0
    progress: bool = True
    max_len: int | None = None
    num_tasks: int = 0
    parallel: DataParallel | None = None   # data parallel ranks (`--parallel ddp`), or one process
    phases: PhaseLog | None = None         # where a task's time and memory go (None: not recorded)
    log: Callable[[str], None] = lambda msg: None   # a line for a phase without a progress bar
    _encoded: dict = field(default_factory=dict)

    def phase(self, name: str):
        """``with ctx.phase("probe"): ...`` records the block's time and peak memory."""
        return self.phases.phase(name) if self.phases is not None else contextlib.nullcontext()

    @property
    def is_main(self) -> bool:
        """The rank that scores, reports and writes (the only one without `parallel`)."""
        return is_main(self.parallel)

    def whole_batch_loss(self) -> Callable[[nn.Module, dict], torch.Tensor]:
        """The loss of a pass over whole batches outside training (Fisher estimates): on
        every rank as it is, or on a sharded model (whose backward sums the ranks'
        gradients) each rank's rows, weighted, so the summed gradient is the batch's."""
        return self.parallel.loss(causal_lm_loss) if self.parallel is not None and self.parallel.sharded \
            else causal_lm_loss

    def encoded(self, task: Task) -> EncodedSet:
        if task.name not in self._encoded:
            text = task.meta.get("kind") == "text"  # prose for language modelling
            max_len = task.meta.get("max_len", self.max_len) if text else self.max_len
            with self.phase("tokenize"):
                self._encoded[task.name] = EncodedSet(task.train, self.codec, max_len, text=text)
        return self._encoded[task.name]

    def batches(self, tasks: Sequence[Task], steps: int, salt: int, weights=None,
                sets: Sequence[EncodedSet] | None = None):
        """Seeded batches of the training sets; `salt` separates streams (probe, training)."""
        sets = list(sets) if sets is not None else [self.encoded(t) for t in tasks]
        return sample_batches(sets, self.train.batch_size, steps, self.seed * 1_000_003 + salt, weights)


def final_loss(losses: list[float]) -> float | None:
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail) if tail else None


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps as state on this rank (moments, steps,
    mask indices)."""
    if hasattr(opt, "state_bytes"):
        return int(opt.state_bytes()["total"])
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                v = local_tensor(v)  # this rank's shard of a sharded state
                total += v.numel() * v.element_size()
    return total


def train_adamw(ctx: Context, model: nn.Module, batches, cfg: TrainConfig, desc: str,
                penalty=None) -> TaskCost:
    """Plain AdamW over every parameter of `model` that requires grad, through the shared
    loop: what every baseline trains with."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    with ctx.phase("train steps"):
        losses = train_loop(model, opt, batches, cfg, penalty=penalty, desc=desc, progress=ctx.progress,
                            parallel=ctx.parallel)
    return TaskCost(trainable=sum(p.numel() for p in params), state_bytes=optimizer_state_bytes(opt),
                    final_loss=final_loss(losses))


class Strategy:
    name: str = "strategy"

    def __init__(self, lr: float | None = None) -> None:
        self.lr = lr

    def config(self) -> dict:
        """What the report records about this strategy's settings."""
        return {"lr": self.lr}

    def train_config(self, ctx: Context) -> TrainConfig:
        return replace(ctx.train, lr=self.lr) if self.lr is not None else ctx.train

    def learn(self, ctx: Context, index: int, task: Task, seen: Sequence[Task]) -> TaskCost:
        """Train `ctx.model` on `task` (the index-th, 1-based; `seen` are the earlier ones)."""
        raise NotImplementedError

    def fit(self, ctx: Context, tasks: Sequence[Task],
            evaluate: Callable[[int], None]) -> list[TaskCost]:
        costs = []
        for i, task in enumerate(tasks, 1):
            t0 = time.perf_counter()
            cost = self.learn(ctx, i, task, tasks[:i - 1])
            cost.seconds = time.perf_counter() - t0
            costs.append(cost)
            evaluate(i)
        return costs

    def report(self, entry: dict, model: nn.Module, base: nn.Module, seq, phases) -> dict[str, dict]:
        """After the sequence: add what this strategy reports beyond the common results to
        `entry` (its results entry), and return any further rows it makes (name → entry).
        `model` is the trained model, done with (it may be changed)."""
        return {}

    def desc(self, ctx: Context, index: int, task: Task) -> str:
        return f"{self.name} {index}/{ctx.num_tasks} {task.name}"
