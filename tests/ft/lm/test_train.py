"""trace_ft.lm.train: the schedule, the loop's resume contract and the base-lr rule."""

import math

import pytest
import torch
from torch import nn

from trace_ft.lm.train import TrainConfig, load_optimizer_state, lr_factor, train_loop


def test_schedule_shapes():
    cfg = TrainConfig(steps=100, warmup=0.1, schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_factor(50, TrainConfig(steps=100, warmup=0.0, schedule="linear")) == pytest.approx(0.5)
    assert lr_factor(80, TrainConfig(steps=100, schedule="constant")) == 1.0
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="step").validate()


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Linear(6, 3)

    def forward(self, x):
        return self.w(x).square().mean()


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(4, 6, generator=g)} for _ in range(n)]


def test_resumed_loop_equals_the_uninterrupted_one():
    """Stopped after step 4 (state saved), resumed from there: the same weights, and the
    optimizer's groups keep their base lr outside the loop."""
    cfg = TrainConfig(steps=8, warmup=0.25, lr=0.05, max_grad_norm=1.0)
    loss = lambda m, b: m(b["x"])  # noqa: E731
    full = Linear()
    opt = torch.optim.AdamW(full.parameters(), lr=cfg.lr)
    train_loop(full, opt, _batches(8), cfg, loss_fn=loss, progress=False)
    assert all(g["lr"] == cfg.lr and "initial_lr" not in g for g in opt.param_groups)

    part = Linear()
    opt = torch.optim.AdamW(part.parameters(), lr=cfg.lr)
    saved = {}

    def stop(done, losses):
        if done == 4:
            saved["opt"] = opt.state_dict()
            saved["model"] = {k: v.clone() for k, v in part.state_dict().items()}
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_loop(part, opt, _batches(8), cfg, loss_fn=loss, progress=False, on_step=stop)
    resumed = Linear()
    resumed.load_state_dict(saved["model"])
    opt = torch.optim.AdamW(resumed.parameters(), lr=cfg.lr)
    load_optimizer_state(opt, saved["opt"])
    assert opt.param_groups[0]["lr"] == cfg.lr   # the scheduled lr of step 4 is not the base
    train_loop(resumed, opt, _batches(8)[4:], cfg, loss_fn=loss, progress=False, start_step=4)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_batches_running_out_is_an_error():
    model = Linear()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="batches ran out after 3 of 5"):
        train_loop(model, opt, _batches(3), TrainConfig(steps=5), loss_fn=lambda m, b: m(b["x"]),
                   progress=False)
