"""MaskedAdamW as a drop-in torch.optim.AdamW, and swap_optimizer."""

import copy
import io

import pytest
import torch

from helpers import bits
from trace_kernels import CoreMask, MaskedAdamW, swap_optimizer

BACKENDS = ["reference", "cpu"]


def make_model(gen, dtype=torch.float32):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = torch.nn.Sequential(torch.nn.Linear(13, 33), torch.nn.ReLU(), torch.nn.Linear(33, 7))
    return model.to(dtype)


def grads_for(model, gen, n):
    return [[torch.randn(p.shape, generator=gen).to(p.dtype) for p in model.parameters()]
            for _ in range(n)]


def set_grads(model, grads, none_index=None):
    for i, (p, g) in enumerate(zip(model.parameters(), grads)):
        p.grad = None if i == none_index else g.clone()


def step_in_lockstep(model, opt, ref, ropt, gen, n):
    """`n` steps of both optimizers on the same random gradients."""
    for grads in grads_for(model, gen, n):
        set_grads(model, grads)
        set_grads(ref, grads)
        opt.step()
        ropt.step()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "cpu":
        pytest.importorskip("trace_kernels._C")
    return request.param


@pytest.mark.parametrize("granularity", ["row", "element", "tensor"])
def test_full_mask_equals_torch_adamw(backend, gen, granularity):
    model = make_model(gen)
    ref = copy.deepcopy(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    opt = MaskedAdamW(model.named_parameters(), lr=3e-2, weight_decay=0.05,
                      masks=CoreMask.full(shapes, granularity), backend=backend)
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-2, weight_decay=0.05)
    for step, grads in enumerate(grads_for(model, gen, 7)):
        none = 1 if step == 3 else None  # one parameter has no grad on one step
        set_grads(model, grads, none)
        set_grads(ref, grads, none)
        opt.step()
        ropt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel(p, q) < 1e-6, name
        st, rst = opt.state[p], ropt.state[q]
        assert float(st["step"]) == float(rst["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert st[key].numel() == p.numel()
            assert rel(st[key], rst[key].reshape(-1)) < 1e-6, (name, key)


def test_partial_mask_selected_follow_adamw_frozen_untouched(backend, gen):
    model = make_model(gen)
    ref = copy.deepcopy(model)
    p0 = [p.detach().clone() for p in model.parameters()]
    dense = {n: torch.rand(p.shape, generator=gen) < 0.2 for n, p in model.named_parameters()}
    dense["2.bias"][:] = False  # one parameter fully frozen
    mask = CoreMask.from_dense(dense)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=mask, backend=backend)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    step_in_lockstep(model, opt, ref, ropt, gen, 4)
    for (name, p), q, before in zip(model.named_parameters(), ref.parameters(), p0):
        sel = dense[name]
        assert torch.equal(bits(p[~sel]), bits(before[~sel])), name
        if sel.any():
            assert rel(p[sel], q[sel]) < 1e-6, name
            assert opt.state[p]["exp_avg"].numel() == int(sel.sum())
        else:
            assert p not in opt.state  # no state for a frozen parameter ("2.bias")
    assert opt.trainable_elements == mask.numel_selected
    sb = opt.state_bytes()
    assert sb["moments"] == 8 * mask.numel_selected


def test_param_groups_and_lr_scheduler(backend, gen):
    model = make_model(gen)
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    named = dict(model.named_parameters())
    groups = [{"params": [(n, named[n]) for n in names[:2]], "lr": 1e-2},
              {"params": [(n, named[n]) for n in names[2:]], "lr": 3e-3, "weight_decay": 0.0}]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    opt = MaskedAdamW(groups, masks=CoreMask.full(shapes, "row"), backend=backend)
    rp = list(ref.parameters())
    ropt = torch.optim.AdamW([{"params": rp[:2], "lr": 1e-2},
                              {"params": rp[2:], "lr": 3e-3, "weight_decay": 0.0}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    rsched = torch.optim.lr_scheduler.StepLR(ropt, step_size=2, gamma=0.5)
    for grads in grads_for(model, gen, 5):
        set_grads(model, grads)
        set_grads(ref, grads)
        opt.step()
        ropt.step()
        sched.step()
        rsched.step()
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    assert opt.param_groups[0]["lr"] == ropt.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel(p, q) < 1e-6


def test_tensor_lr(backend, gen):
    model = make_model(gen)
    ref = copy.deepcopy(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    opt = MaskedAdamW(model.named_parameters(), lr=torch.tensor(1e-2),
                      masks=CoreMask.full(shapes), backend=backend)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    step_in_lockstep(model, opt, ref, ropt, gen, 3)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel(p, q) < 1e-6


def test_state_dict_round_trip(backend, gen):
    model = make_model(gen, torch.bfloat16)
    mask = CoreMask.from_dense({n: torch.rand(p.shape, generator=gen) < 0.3
                                for n, p in model.named_parameters()})
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, amsgrad=True, masks=mask, backend=backend)
    grads = grads_for(model, gen, 5)
    for g in grads[:3]:
        set_grads(model, g)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    twin = copy.deepcopy(model)
    topt = MaskedAdamW(twin.named_parameters(), lr=1e-2, amsgrad=True, masks=mask, backend=backend)
    buf.seek(0)
    topt.load_state_dict(torch.load(buf))
    assert len(topt.state) == len(opt.state)  # parameters with an empty mask have no state
    for st in topt.state.values():
        assert st["exp_avg"].dtype == torch.float32  # not cast to the bf16 param dtype
        assert st["block_indices"].dtype == torch.int32  # never cast to float
    for g in grads[3:]:
        set_grads(model, g)
        set_grads(twin, g)
        opt.step()
        topt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(bits(p), bits(q))
        assert (p in opt.state) == (q in topt.state)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step") if p in opt.state else ():
            assert torch.equal(opt.state[p][key], topt.state[q][key])


def test_load_state_dict_with_other_mask_refused(gen):
    model = make_model(gen)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    opt = MaskedAdamW(model.named_parameters(), masks=CoreMask.full(shapes, "row"))
    set_grads(model, grads_for(model, gen, 1)[0])
    opt.step()
    sd = opt.state_dict()
    other = MaskedAdamW(model.named_parameters(), masks=CoreMask.full(shapes, "element"))
    with pytest.raises(ValueError, match="different mask"):
        other.load_state_dict(sd)
    assert len(other.state) == 0


def test_set_masks_resets_only_changed(gen):
    model = make_model(gen)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    full = CoreMask.full(shapes, "row")
    opt = MaskedAdamW(model.named_parameters(), masks=full)
    set_grads(model, grads_for(model, gen, 1)[0])
    opt.step()
    p0, p1 = list(model.parameters())[:2]
    kept = opt.state[p1]["exp_avg"]
    changed = CoreMask.from_indices({"0.weight": (shapes["0.weight"], 13, torch.tensor([0, 2]))})
    new = CoreMask({**{n: full[n] for n in full if n != "0.weight"}, **changed})
    opt.set_masks(new)
    assert p0 not in opt.state
    assert opt.state[p1]["exp_avg"] is kept
    opt.step()
    assert opt.state[p0]["exp_avg"].numel() == 26 and float(opt.state[p0]["step"]) == 1.0


def test_dict_masks_and_dense_unmasked(backend, gen):
    model = make_model(gen)
    ref = copy.deepcopy(model)
    w0, b0, w2, b2 = model.parameters()
    bool_mask = torch.rand(w0.shape, generator=gen) < 0.5
    idx_mask = torch.tensor([1, 4, 6], dtype=torch.int64)
    opt = MaskedAdamW(model.parameters(), lr=1e-2, masks={w0: bool_mask, b2: idx_mask},
                      unmasked="dense", backend=backend)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    step_in_lockstep(model, opt, ref, ropt, gen, 3)
    r0, _, r2, rb2 = ref.parameters()
    assert rel(b0, list(ref.parameters())[1]) < 1e-6 and rel(w2, r2) < 1e-6  # dense
    assert rel(w0[bool_mask], r0[bool_mask]) < 1e-6
    assert rel(b2[idx_mask], rb2[idx_mask]) < 1e-6
    assert opt.state[b2]["exp_avg"].numel() == 3


def test_constructor_errors(gen):
    model = make_model(gen)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    full = CoreMask.full(shapes)
    with pytest.raises(ValueError, match="capturable"):
        MaskedAdamW(model.named_parameters(), capturable=True, masks=full)
    with pytest.raises(ValueError, match="differentiable"):
        MaskedAdamW(model.named_parameters(), differentiable=True, masks=full)
    with pytest.raises(ValueError, match="named_parameters"):
        MaskedAdamW(model.parameters(), masks=full)
    with pytest.raises(ValueError, match="'nope'"):
        MaskedAdamW(model.named_parameters(), masks=full | CoreMask.full({"nope": (2,)}))
    with pytest.raises(ValueError, match="shape"):
        MaskedAdamW(model.named_parameters(), masks=CoreMask.full({"0.weight": (13, 33)}))
    with pytest.raises(ValueError, match="unmasked"):
        MaskedAdamW(model.named_parameters(), masks=full, unmasked="train")
    with pytest.raises(ValueError, match="betas"):
        MaskedAdamW(model.named_parameters(), betas=(0.9, 1.0), masks=full)
    with pytest.raises(ValueError, match="sorted"):
        MaskedAdamW(model.parameters(), masks={next(model.parameters()): torch.tensor([3, 1])})
    with pytest.raises(ValueError, match="backend"):
        MaskedAdamW(model.named_parameters(), masks=full, backend="gpu")


def test_sparse_grad_rejected(gen):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = MaskedAdamW(emb.named_parameters(), masks=CoreMask.full({"weight": (10, 4)}))
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_swap_optimizer_compacts_state(backend, gen):
    model = make_model(gen)
    ref = copy.deepcopy(model)
    adam = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.02)
    radam = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.02)
    grads = grads_for(model, gen, 5)
    for g in grads[:3]:
        set_grads(model, g)
        set_grads(ref, g)
        adam.step()
        radam.step()
    dense = {n: torch.rand(p.shape, generator=gen) < 0.4 for n, p in model.named_parameters()}
    mask = CoreMask.from_dense(dense)
    opt = swap_optimizer(adam, mask, model=model, backend=backend)
    assert isinstance(opt, MaskedAdamW)
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["weight_decay"] == 0.02
    before = [p.detach().clone() for p in model.parameters()]
    for g in grads[3:]:
        set_grads(model, g)
        set_grads(ref, g)
        opt.step()
        radam.step()
    for (n, p), q, b in zip(model.named_parameters(), ref.parameters(), before):
        sel = dense[n]
        assert rel(p[sel], q[sel]) < 1e-6, n  # continued exactly where AdamW left off
        assert torch.equal(p[~sel], b[~sel])
        if sel.any():  # a parameter whose random mask came out empty keeps no state
            assert float(opt.state[p]["step"]) == 5.0


def test_swap_optimizer_needs_names(gen):
    model = make_model(gen)
    adam = torch.optim.AdamW(model.parameters())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="names"):
        swap_optimizer(adam, CoreMask.full(shapes))
    with pytest.raises(TypeError, match="AdamW"):
        swap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), CoreMask.full(shapes))
    named = torch.optim.AdamW(model.named_parameters())
    assert isinstance(swap_optimizer(named, CoreMask.full(shapes)), MaskedAdamW)


def test_grad_scaler(backend, gen):
    model = make_model(gen)
    twin = copy.deepcopy(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    mask = CoreMask.full(shapes, "row")
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=mask, backend=backend)
    topt = MaskedAdamW(twin.named_parameters(), lr=1e-2, masks=mask, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(8, 13, generator=gen)
    for _ in range(3):
        opt.zero_grad()
        topt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        scaler.step(opt)  # the scale is divided out inside the kernel
        scaler.update()
        twin(x).square().mean().backward()
        topt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert rel(p, q) < 1e-6
    # an inf gradient skips the whole step
    before = [p.detach().clone() for p in model.parameters()]
    steps = [float(opt.state[p]["step"]) for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(x).sum() * float("inf")).backward()
    scaler.step(opt)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert [float(opt.state[p]["step"]) for p in model.parameters()] == steps


def test_add_param_group_after_construction(gen):
    model = make_model(gen)
    first, rest = list(model.named_parameters())[:2], list(model.named_parameters())[2:]
    for unmasked, trains in (("freeze", False), ("dense", True)):
        m = copy.deepcopy(model)
        named = dict(m.named_parameters())
        opt = MaskedAdamW([(n, named[n]) for n, _ in first], lr=1e-2, unmasked=unmasked,
                          masks=CoreMask.full({n: tuple(p.shape) for n, p in first}))
        opt.add_param_group({"params": [(n, named[n]) for n, _ in rest], "lr": 1e-3})
        before = named["2.weight"].detach().clone()
        set_grads(m, grads_for(m, gen, 1)[0])
        opt.step()
        assert (not torch.equal(named["2.weight"], before)) == trains
        assert opt.param_groups[1]["param_names"] == [n for n, _ in rest]
