"""Multi-task learning: one joint run over all tasks (the upper bound). It has the same total
steps as the sequence (steps × tasks) and yields only the final row of the matrix."""

from __future__ import annotations

import time
from dataclasses import replace

from .base import Context, Strategy, train_adamw


class MTL(Strategy):
    name = "mtl"

    def fit(self, ctx: Context, tasks, evaluate):
        cfg = self.train_config(ctx)
        cfg = replace(cfg, steps=cfg.steps * len(tasks))
        t0 = time.perf_counter()
        batches = ctx.batches(tasks, cfg.steps, salt=0, weights=[1.0] * len(tasks))
        cost = train_adamw(ctx, ctx.model, batches, cfg, f"mtl joint ({len(tasks)} tasks)")
        cost.seconds = time.perf_counter() - t0
        evaluate(len(tasks))
        return [cost]
