"""The one training loop every strategy uses: same schedule, clipping and progress bar."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .batches import IGNORE, labelled_logits

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.1            # fraction of steps with a linear ramp
    schedule: str = "cosine"       # after warmup: cosine or linear to 0, or constant
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at `step` (0-based)."""
    warm = int(cfg.warmup * cfg.steps)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    t = (step - warm) / max(1, cfg.steps - warm)
    return 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1.0 - t


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The mean cross-entropy of the labelled tokens given what precedes them, as
    ``model(**batch).loss`` computes it, with logits made only where a label is predicted
    when a large vocabulary would make the full ones costly (`labelled_logits`)."""
    logits, labels = labelled_logits(model, batch)
    return nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, parallel=None,
                         model: nn.Module | None = None) -> None:
    """Load a state_dict saved during `train_loop` (whose groups then held a scheduled lr)
    and keep the groups' base lr, which `train_loop` schedules from. A sharded run loads
    the whole state its `parallel.optimizer_state` gathered."""
    base = [g["lr"] for g in optimizer.param_groups]
    if parallel is not None and parallel.sharded:
        parallel.load_optimizer_state(model, optimizer, state)
    else:
        optimizer.load_state_dict(state)
    _restore_base_lr(optimizer, base)


def _restore_base_lr(optimizer: torch.optim.Optimizer, base: list) -> None:
    for g, lr in zip(optimizer.param_groups, base):
        g["lr"] = lr
        g.pop("initial_lr", None)


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[dict[str, Tensor]],
    cfg: TrainConfig,
    *,
    loss_fn: Callable[[nn.Module, dict], Tensor] = causal_lm_loss,
    penalty: Callable[[], Tensor] | None = None,
    desc: str = "train",
    progress: bool = True,
    start_step: int = 0,
    on_step: Callable[[int, list[float]], None] | None = None,
    parallel=None,
) -> list[float]:
    """Steps `start_step` … `cfg.steps − 1` with the schedule applied to every group's lr;
    returns the loss per step run (without the penalty).

    To resume, restore the model and optimizer state of step `start_step`, keep the groups'
    lr at the base value, and pass batches that start at that step.
    `on_step(done, losses)` runs after each step (`done` steps completed in all), e.g. to
    save a checkpoint. `parallel` (a `lm.parallel.DataParallel`): each rank trains on its rows
    of every batch and the gradients are summed over ranks before clipping. Clipping measures
    what the optimizer trains: every gradient, or with `MaskedAdamW` the core elements'
    (`MaskedAdamW.clip_grad_norm_`; the same with full or core-only weight gradients)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    base = [g["lr"] for g in optimizer.param_groups]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not 0 <= start_step <= cfg.steps:
        raise ValueError(f"start_step must be in [0, {cfg.steps}], got {start_step}")
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s + start_step, cfg))
    if parallel is not None:
        loss_fn = parallel.loss(loss_fn)
    losses: list[float] = []
    model.train()
    bar = tqdm(total=cfg.steps, initial=start_step, desc=desc, disable=not progress, leave=False,
               dynamic_ncols=True)
    try:
        for step, batch in zip(range(start_step, cfg.steps), batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = loss_fn(model, batch)
            total = loss
            if penalty is not None:  # its gradient, summed over ranks, counted once: each
                # rank's share of a whole-model penalty, or on a sharded model its shards' part
                whole = parallel is not None and not parallel.sharded
                total = loss + penalty() / (parallel.world if whole else 1)
            total.backward()
            if parallel is not None:
                parallel.sync_grads(params)
            if cfg.max_grad_norm is not None:
                if hasattr(optimizer, "clip_grad_norm_"):  # MaskedAdamW: the core's gradient
                    optimizer.clip_grad_norm_(cfg.max_grad_norm)
                else:
                    nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            if step % 10 == 0 or step == cfg.steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
            if on_step is not None:
                on_step(step + 1, losses)
    finally:
        bar.close()
        _restore_base_lr(optimizer, base)
    if len(losses) < cfg.steps - start_step:
        raise ValueError(f"batches ran out after {start_step + len(losses)} of {cfg.steps} steps")
    return losses
