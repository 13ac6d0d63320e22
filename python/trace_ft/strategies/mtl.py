"""Multi-task learning: one joint run over all tasks (the upper bound). It has the same total
steps as the sequence (steps × tasks) and yields only the final row of the matrix."""

from __future__ import annotations

import time
from dataclasses import replace

from ..train import train_loop
from .base import Context, Strategy, TaskCost, final_loss, adamw_for, optimizer_state_bytes


class MTL(Strategy):
    name = "mtl"

    def fit(self, ctx: Context, tasks, evaluate):
        cfg = self.train_config(ctx)
        cfg = replace(cfg, steps=cfg.steps * len(tasks))
        t0 = time.perf_counter()
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        opt = adamw_for(ctx, params, cfg.lr)
        weights = [1.0] * len(tasks)
        losses = train_loop(ctx.model, opt, ctx.batches(tasks, cfg.steps, salt=0, weights=weights), cfg,
                            desc=f"mtl joint ({len(tasks)} tasks)", progress=ctx.progress)
        cost = TaskCost(final_loss=final_loss(losses), trainable=sum(p.numel() for p in params), state_bytes=optimizer_state_bytes(opt),
                        seconds=time.perf_counter() - t0)
        evaluate(len(tasks))
        return [cost]
