"""Experience replay: a small buffer of every earlier task's training examples, mixed into
each batch of the new task (a reference point: it stores data, which TRACE avoids)."""

from __future__ import annotations

import random

from ...lm.batches import EncodedSet
from .base import Context, Strategy, TaskCost, train_adamw


class Replay(Strategy):
    name = "replay"

    def __init__(self, lr: float | None = None, buffer_per_task: int = 50, ratio: float = 0.25) -> None:
        super().__init__(lr)
        if buffer_per_task < 1:
            raise ValueError(f"replay buffer_per_task must be >= 1, got {buffer_per_task}")
        if not 0 <= ratio < 1:
            raise ValueError(f"replay ratio must be in [0, 1), got {ratio}")
        self.buffer_per_task, self.ratio = buffer_per_task, ratio
        self.buffers: list[EncodedSet] = []

    def config(self) -> dict:
        return {"lr": self.lr, "buffer_per_task": self.buffer_per_task, "ratio": self.ratio}

    def learn(self, ctx: Context, index, task, seen) -> TaskCost:
        cfg = self.train_config(ctx)
        sets = [ctx.encoded(task), *self.buffers]
        weights = None
        if self.buffers:  # the new task gets 1 − ratio of the rows, the buffers share the rest
            weights = [1.0 - self.ratio] + [self.ratio / len(self.buffers)] * len(self.buffers)
        cost = train_adamw(ctx, ctx.model, ctx.batches([task], cfg.steps, salt=index,
                                                       weights=weights, sets=sets),
                           cfg, self.desc(ctx, index, task))
        rng = random.Random(ctx.seed * 7919 + index)
        keep = rng.sample(task.train, min(self.buffer_per_task, len(task.train)))
        self.buffers.append(EncodedSet(keep, ctx.codec, ctx.max_len))
        cost.extra["buffer_examples"] = sum(len(b) for b in self.buffers)
        return cost
