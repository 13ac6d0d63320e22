"""EWC (online, diagonal): full fine-tuning plus (λ/2)·Σ F·(θ − θ*)², where F sums the
empirical Fisher diagonals of the earlier tasks and θ* are the weights after the last one."""

from __future__ import annotations

from torch import Tensor, nn

from trace_kernels.sharding import is_dtensor

from ...method.probe import empirical_fisher
from .base import Context, Strategy, TaskCost, train_adamw


def _local(t: Tensor) -> Tensor:
    """A sharded tensor's shard on this rank (differentiable), else the tensor."""
    return t.to_local() if is_dtensor(t) else t


class EWCPenalty:
    """(λ/2)·Σ_p Σ F_p (θ_p − θ*_p)² over the parameters with a Fisher estimate. On a
    sharded model each rank sums over its own shards: the ranks' values add up to the
    penalty, and each shard's gradient is the penalty's."""

    def __init__(self, model: nn.Module, fisher: dict[str, Tensor], anchor: dict[str, Tensor],
                 lam: float) -> None:
        named = dict(model.named_parameters())
        self.terms = [(named[n], _local(fisher[n]), _local(anchor[n])) for n in fisher]
        self.lam = lam

    def __call__(self) -> Tensor:
        total = sum(((_local(p) - a).square() * f).sum() for p, f, a in self.terms)
        return 0.5 * self.lam * total


class EWC(Strategy):
    name = "ewc"

    def __init__(self, lr: float | None = None, lam: float = 1e4, fisher_batches: int = 20) -> None:
        super().__init__(lr)
        if lam < 0:
            raise ValueError(f"ewc lambda must be >= 0, got {lam}")
        self.lam, self.fisher_batches = lam, fisher_batches
        self.fisher: dict[str, Tensor] | None = None

    def config(self) -> dict:
        return {"lr": self.lr, "lambda": self.lam, "fisher_batches": self.fisher_batches}

    def learn(self, ctx: Context, index, task, seen) -> TaskCost:
        cfg = self.train_config(ctx)
        model = ctx.model
        penalty = None
        if self.fisher is not None:
            anchor = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.fisher}
            penalty = EWCPenalty(model, self.fisher, anchor, self.lam)
        cost = train_adamw(ctx, model, ctx.batches([task], cfg.steps, salt=index), cfg,
                           self.desc(ctx, index, task), penalty=penalty)
        f = empirical_fisher(model, ctx.batches([task], self.fisher_batches, salt=20_000 + index),
                             self.fisher_batches, loss_fn=ctx.whole_batch_loss())
        self.fisher = f if self.fisher is None else {n: self.fisher[n] + f[n] for n in f}
        extra_state = 2 * sum(_local(t).numel() * t.element_size() for t in self.fisher.values())
        cost.state_bytes += extra_state
        cost.extra["ewc_bytes"] = extra_state
        return cost
