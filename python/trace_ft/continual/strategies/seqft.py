"""Sequential full fine-tuning: every parameter, AdamW, task after task (the lower bound)."""

from __future__ import annotations

from .base import Context, Strategy, TaskCost, train_adamw


class SeqFT(Strategy):
    name = "seqft"

    def learn(self, ctx: Context, index, task, seen) -> TaskCost:
        cfg = self.train_config(ctx)
        return train_adamw(ctx, ctx.model, ctx.batches([task], cfg.steps, salt=index), cfg,
                           self.desc(ctx, index, task))
