"""trace_ft.method.pipeline: one task after another through probe → select → core
optimizer → remember; the second task's core avoids the first's; flags are restored."""

import pytest
import torch
from torch import nn

from trace_ft import SelectConfig, TracePipeline
from trace_ft.method.pipeline import freeze_outside, restore_flags
from trace_kernels import CoreMask, MaskedAdamW


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))


def _batches(gen, shift):
    out = []
    for _ in range(4):
        x = torch.randn(8, 12, generator=gen)
        out.append((x, x[:, :4] * shift))
    return out


def _loss(model, batch):
    x, y = batch
    return (model(x) - y).square().mean()


def test_two_tasks_through_the_pipeline(gen):
    model = _model()
    pipe = TracePipeline(SelectConfig(granularity="row", budget=0.25), probe_steps=3, sketch_dim=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cores = []
    for k, shift in enumerate((1.0, -2.0)):
        result, sel = pipe.probe_and_select(model, _batches(gen, shift), lr=1e-2, loss_fn=_loss)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # probe restores
        core = sel.mask
        opt = pipe.optimizer(model, core, lr=1e-2)
        assert isinstance(opt, MaskedAdamW) and opt.trainable_elements == core.numel_selected
        flags = freeze_outside(model, core)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == set(core.nonempty())
        restore_flags(flags)
        assert all(p.requires_grad for p in model.parameters())
        updates = pipe.recorded_updates(result.deltas, core)
        assert all(u.values.shape[-1] == 4 for u in updates.values())  # sketched to 4 values
        pipe.remember(core, updates)
        cores.append(core)
    assert len(pipe.history) == 2
    # the second task's core never takes a block of the first's
    assert cores[0].intersection(cores[1]).numel_selected == 0


def test_optimizer_refuses_empty_or_foreign_cores_before_anything_changes():
    model = _model()
    empty = CoreMask.from_dense({"0.weight": torch.zeros(16, 12, dtype=torch.bool)})
    with pytest.raises(ValueError, match="the core is empty"):
        TracePipeline.optimizer(model, empty, lr=1e-3)
    foreign = CoreMask.from_dense({"0.weight": torch.ones(12, 16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="has shape"):
        TracePipeline.optimizer(model, foreign, lr=1e-3)
    assert all(p.requires_grad for p in model.parameters())


def test_settings_are_checked():
    with pytest.raises(ValueError, match="probe_steps"):
        TracePipeline(probe_steps=0)
    with pytest.raises(ValueError, match="granularity must be one of"):
        TracePipeline(SelectConfig(granularity="page"))
    assert not TracePipeline().guarded and TracePipeline(SelectConfig(protect=1.0)).guarded


@pytest.mark.parametrize("fisher", ["mean", "adam"])
def test_continuing_from_the_probe_is_one_uninterrupted_adamw_run(gen, fisher):
    """With the whole model as the core, a probe of 3 steps continued for 2 on the core is
    torch's AdamW run for 5 steps on the same batches: the probe's values, moments and step
    count carry over (with fisher="adam" the second moment is read back from the Fisher,
    equal within rounding)."""
    from trace_ft import probe
    from trace_ft.method.pipeline import continue_from, core_start

    batches = _batches(gen, 1.5) + _batches(gen, 1.5)[:1]
    model, ref = _model(), _model()
    result = probe(model, batches[:3], steps=3, lr=1e-2, loss_fn=_loss, keep_moments=True, fisher=fisher,
                   include=[r"weight", r"bias"], exclude=())
    core = CoreMask.full({n: tuple(p.shape) for n, p in model.named_parameters()}, "element")
    start = core_start(model, result, core)
    assert start.steps == 3
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.0, masks=core)
    continue_from(opt, model, start)
    for b in batches[3:5]:
        opt.zero_grad()
        _loss(model, b).backward()
        opt.step()
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    for b in batches[:5]:
        torch_opt.zero_grad()
        _loss(ref, b).backward()
        torch_opt.step()
    tol = dict(rtol=1e-5, atol=1e-6) if fisher == "mean" else dict(rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=n)
    plain = probe(_model(), batches[:3], steps=3, lr=1e-2, loss_fn=_loss)
    with pytest.raises(ValueError, match="keep_moments=True"):
        core_start(_model(), plain, core)
