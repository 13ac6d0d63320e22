"""MaskedAdamW plans a group's step once and keeps the plan while nothing it holds changes.
The oracle: a twin optimizer that re-plans before every step. Both must agree bit for bit
through every change that invalidates a plan, and an unchanged run must plan once."""

import copy

import pytest
import torch

from helpers import bits
from trace_kernels import CoreMask, MaskedAdamW

pytest.importorskip("trace_kernels._C")


def make(gen, dtype=torch.float32):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = torch.nn.Sequential(torch.nn.Linear(13, 33), torch.nn.ReLU(), torch.nn.Linear(33, 7)).to(dtype)
    return model


def random_masks(model, gen, granularity="element", frac=0.3):
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    picked = {}
    for name, entry in CoreMask.full(shapes, granularity).items():
        keep = torch.rand(entry.num_blocks, generator=gen) < frac
        picked[name] = (entry.shape, entry.block_size, entry.indices[keep])
    return CoreMask.from_indices(picked)


class Twins:
    """A planning optimizer and a twin that forgets its plans before each step."""

    def __init__(self, gen, masks_fn, **kw):
        self.gen = gen
        self.model = make(gen, kw.pop("dtype", torch.float32))
        self.twin = copy.deepcopy(self.model)
        masks = masks_fn(self.model)
        self.opt = MaskedAdamW(self.model.named_parameters(), lr=1e-2, weight_decay=0.1, masks=masks,
                               backend="cpu", **kw)
        self.topt = MaskedAdamW(self.twin.named_parameters(), lr=1e-2, weight_decay=0.1, masks=masks,
                                backend="cpu", **kw)

    def step(self, none=(), transpose=False):
        for i, (p, q) in enumerate(zip(self.model.parameters(), self.twin.parameters())):
            if i in none:
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape[::-1] if transpose and p.dim() == 2 else p.shape, generator=self.gen)
            g = (g.t() if transpose and p.dim() == 2 else g).to(p.dtype)  # non-contiguous if transposed
            p.grad, q.grad = g, g.clone()
        self.opt.step()
        self.topt._plans.clear()
        self.topt.step()

    def check(self):
        for (n, p), q in zip(self.model.named_parameters(), self.twin.parameters()):
            assert torch.equal(bits(p), bits(q)), n
        for p, q in zip(self.model.parameters(), self.twin.parameters()):
            a, b = self.opt.state.get(p, {}), self.topt.state.get(q, {})
            assert a.keys() == b.keys()
            for k in a:
                if isinstance(a[k], torch.Tensor):
                    assert torch.equal(bits(a[k]), bits(b[k])), k
                else:
                    assert a[k] == b[k], k


def test_an_unchanged_run_plans_once(gen, monkeypatch):
    t = Twins(gen, lambda m: random_masks(m, gen))
    from trace_kernels.optim import functional

    calls = []
    real = functional._plan
    monkeypatch.setattr(functional, "_plan", lambda *a: calls.append(1) or real(*a))
    for _ in range(5):
        t.step()
    assert len(calls) == 5 + 1  # the twin plans at every step, the optimizer once
    t.check()


def test_plans_follow_masks_groups_and_loaded_state(gen):
    t = Twins(gen, lambda m: random_masks(m, gen), unmasked="dense")
    t.step(); t.step()
    new_masks = random_masks(t.model, gen, frac=0.6)
    t.opt.set_masks(new_masks); t.topt.set_masks(new_masks)
    t.step(); t.check()
    extra = torch.nn.Parameter(torch.randn(5, 3, generator=gen))
    textra = torch.nn.Parameter(extra.detach().clone())
    t.opt.add_param_group({"params": [extra], "param_names": ["extra"], "lr": 3e-2})
    t.topt.add_param_group({"params": [textra], "param_names": ["extra"], "lr": 3e-2})
    g = torch.randn(5, 3, generator=gen)
    extra.grad, textra.grad = g, g.clone()
    t.step(); t.check()
    assert torch.equal(extra, textra) and "exp_avg" in t.opt.state[extra]
    # load another run's state (other tensors for every moment) in the middle of this one
    other = Twins(gen, lambda m: random_masks(m, gen), unmasked="dense")
    other.opt.set_masks(new_masks)
    other.opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(5, 3))], "param_names": ["extra"],
                               "lr": 3e-2})
    for p in other.model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    other.opt.param_groups[1]["params"][0].grad = torch.randn(5, 3, generator=gen)
    other.opt.step()
    sd = other.opt.state_dict()
    t.opt.load_state_dict(copy.deepcopy(sd)); t.topt.load_state_dict(copy.deepcopy(sd))
    t.step(); t.check()


def test_plans_follow_moved_or_cast_storage_and_missing_grads(gen):
    t = Twins(gen, lambda m: random_masks(m, gen, "row"))
    t.step()
    old = t.model[0].weight.data
    frozen_copy = old.clone()
    for m in (t.model, t.twin):
        m[0].weight.data = m[0].weight.data.clone()  # the storage moves
    t.step(); t.check()
    assert torch.equal(old, frozen_copy)  # the old storage is no longer written
    t.step(none=(1,)); t.check()          # a parameter without a gradient on this step
    t.step(transpose=True); t.check()     # non-contiguous gradients
    for m in (t.model, t.twin):
        m.to(torch.bfloat16)              # cast: a new dtype, and fp32 masters appear
    t.step(); t.step(); t.check()
    assert "master" in t.opt.state[t.model[0].weight]


def test_a_skipped_grad_scaler_step_keeps_the_plan_and_the_counters(gen):
    t = Twins(gen, lambda m: random_masks(m, gen))
    t.step()
    for o in (t.opt, t.topt):
        o.found_inf = torch.tensor(1.0)
    before = [p.detach().clone() for p in t.model.parameters()]
    t.step()
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    assert all(s["step"].item() == 1 for s in t.opt.state.values())
    for o in (t.opt, t.topt):
        o.found_inf = torch.tensor(0.0)
        o.grad_scale = torch.tensor(4.0)
    t.step(); t.check()
    assert all(s["step"].item() == 2 for s in t.opt.state.values())


def test_parameters_replaced_in_groups_take_over_mask_and_state(gen):
    """What accelerate's FSDP2 preparation does to an optimizer built on the full model:
    each parameter in the groups is swapped for another tensor. The replacement takes over
    the mask and the state at its place; the run goes on as if nothing was swapped, and the
    old tensor is no longer touched."""
    t = Twins(gen, lambda m: random_masks(m, gen))
    t.step()
    group = t.opt.param_groups[0]
    old = group["params"][0]
    swapped = torch.nn.Parameter(old.detach().clone())
    group["params"][0] = swapped
    kept = old.detach().clone()
    for _ in range(2):
        swapped.grad = torch.randn(swapped.shape, generator=t.gen)
        for p, q in zip(list(t.model.parameters())[1:], list(t.twin.parameters())[1:]):
            p.grad = torch.randn(p.shape, generator=t.gen)
            q.grad = p.grad.clone()
        next(t.twin.parameters()).grad = swapped.grad.clone()
        t.opt.step()
        t.topt.step()
    assert torch.equal(bits(old), bits(kept))
    assert torch.equal(bits(swapped), bits(next(t.twin.parameters())))
    assert old not in t.opt.state and t.opt.state[swapped]["step"].item() == 3
    group["params"].append(torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match="add_param_group"):
        t.opt.step()
