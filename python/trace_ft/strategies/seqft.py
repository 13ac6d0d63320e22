"""Sequential full fine-tuning: every parameter, AdamW, task after task (the lower bound)."""

from __future__ import annotations

from ..train import train_loop
from .base import Context, Strategy, TaskCost, final_loss, adamw_for, optimizer_state_bytes


class SeqFT(Strategy):
    name = "seqft"

    def learn(self, ctx: Context, index, task, seen) -> TaskCost:
        cfg = self.train_config(ctx)
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        opt = adamw_for(ctx, params, cfg.lr)
        losses = train_loop(ctx.model, opt, ctx.batches([task], cfg.steps, salt=index), cfg,
                            desc=self.desc(ctx, index, task), progress=ctx.progress)
        return TaskCost(final_loss=final_loss(losses), trainable=sum(p.numel() for p in params), state_bytes=optimizer_state_bytes(opt))
