"""MaskedAdamW when its user touches what torch lets them touch: the weights (loaded, cast,
swapped), the optimizer's state (replaced, cleared), its gradients' dtype, copies and
pickles of the optimizer, and checkpoints of a stochastically rounded run. Each of these
went wrong silently or crashed before (see issue #25)."""

import copy
import pickle

import pytest
import torch

from trace_kernels import MaskedAdamW


def _linear(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(24, 10).to(dtype)


def _masks(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {p: torch.rand(p.shape, generator=g) < 0.5 for p in model.parameters()}


def _grads(model, n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(p.dtype) for p in model.parameters()] for _ in range(n)]


def _step(model, opt, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()


def _optimizer_like(model, masks, **kw):
    """A copy of `model` and a MaskedAdamW over it with the same masks."""
    twin = copy.deepcopy(model)
    return twin, MaskedAdamW(twin.parameters(), masks=dict(zip(twin.parameters(), masks.values())), **kw)


def _assert_same(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def _core(model, masks):
    return torch.cat([p.detach()[masks[p]].float() for p in model.parameters()])


def test_masters_follow_weights_written_from_outside():
    model = _linear(torch.bfloat16)
    masks = _masks(model)
    opt = MaskedAdamW(model.parameters(), lr=1e-3, masks=masks)
    grads = _grads(model, 4)
    for g in grads[:2]:
        _step(model, opt, g)
    model.load_state_dict({k: torch.full_like(v, 5.0) for k, v in model.state_dict().items()})
    _step(model, opt, grads[2])
    # the step starts from the loaded 5.0, not from the masters of before (which gave ~0)
    core = _core(model, masks)
    assert (core - 5.0).abs().max() < 0.05, core
    with torch.no_grad():  # set_core_values, an EMA swap: any in-place write
        model.weight.fill_(-2.0)
    _step(model, opt, grads[3])
    assert (model.weight.float()[masks[model.weight]] + 2.0).abs().max() < 0.05


@pytest.mark.parametrize("write", ["data_copy", "data_assign", "vector_to_parameters"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_masters_follow_weights_written_through_data(write, backend):
    """Writes through ``.data`` do not move torch's version counter; the weight must still
    win over its masters (issue #35: a bf16 weight set to 5.0 came back at -0.136)."""
    model = _linear(torch.bfloat16)
    masks = _masks(model)
    opt = MaskedAdamW(model.parameters(), lr=1e-3, masks=masks, backend=backend)
    grads = _grads(model, 2)
    _step(model, opt, grads[0])
    if write == "data_copy":
        for p in model.parameters():
            p.data.copy_(torch.full_like(p, 5.0))
    elif write == "data_assign":
        for p in model.parameters():
            p.data = torch.full_like(p, 5.0)
    else:
        n = sum(p.numel() for p in model.parameters())
        torch.nn.utils.vector_to_parameters(torch.full((n,), 5.0, dtype=torch.bfloat16), model.parameters())
    _step(model, opt, [torch.zeros_like(g) for g in grads[1]])
    core = _core(model, masks)
    assert (core - 5.0).abs().max() < 0.05, core


def test_masters_keep_the_precision_of_untouched_elements():
    """Only the elements written from outside take the weight's value: the others keep
    their masters (a bf16 weight cannot hold their sub-rounding part)."""
    model = _linear(torch.bfloat16)
    masks = _masks(model)
    opt = MaskedAdamW(model.parameters(), lr=1e-3, masks=masks)
    twin, topt = _optimizer_like(model, masks, lr=1e-3)
    grads = _grads(model, 3)
    for g in grads[:2]:
        _step(model, opt, g)
        _step(twin, topt, g)
    with torch.no_grad():
        model.weight.data[0, 0] = 7.0     # one element, through .data
        twin.weight.data[0, 0] = 7.0
    w, tw = model.weight, twin.weight
    flat = masks[w].reshape(-1).nonzero().reshape(-1)
    pos = int((flat == 0).nonzero()[0, 0]) if bool(masks[w][0, 0]) else None
    _step(model, opt, grads[2])
    _step(twin, topt, grads[2])
    m, tm = opt.state[w]["master"], topt.state[tw]["master"]
    assert torch.equal(m, tm)
    if pos is not None:
        assert abs(float(m[pos]) - 7.0) < 0.05
        keep = torch.ones_like(m, dtype=torch.bool)
        keep[pos] = False
        assert not torch.equal(m[keep], m[keep].to(torch.bfloat16).float())  # sub-bf16 precision kept


def test_stochastic_rounding_keeps_no_masters_unless_asked():
    model = _linear(torch.bfloat16)
    masks = _masks(model)
    opt = MaskedAdamW(model.parameters(), lr=1e-3, masks=masks, rounding="stochastic", seed=3)
    _step(model, opt, _grads(model, 1)[0])
    assert all("master" not in st for st in opt.state.values())
    opt2 = MaskedAdamW(model.parameters(), lr=1e-3, masks=masks, rounding="stochastic", seed=3,
                       master_weights=True)
    _step(model, opt2, _grads(model, 1)[0])
    assert all("master" in st for st in opt2.state.values())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_stochastic_masters_survive_a_model_reload_and_either_load_order(backend):
    """With masters asked for and stochastic rounding, the weight holds the master rounded
    with the last step's random bits: reloading the model changes no master, and a resumed
    run equals the uninterrupted one whichever is loaded first (issue #35: 256 of 256
    masters and 87 of 256 weights differed)."""
    kw = dict(lr=1e-3, rounding="stochastic", seed=5, master_weights=True, backend=backend)
    model = _linear(torch.bfloat16)
    masks = _masks(model)
    opt = MaskedAdamW(model.parameters(), masks=masks, **kw)
    twin, topt = _optimizer_like(model, masks, **kw)
    grads = _grads(model, 6)
    for g in grads[:3]:
        _step(model, opt, g)
        _step(twin, topt, g)
    twin.load_state_dict(twin.state_dict())   # moves every version counter
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for g in grads[3:]:
        _step(model, opt, g)
        _step(twin, topt, g)
    _assert_same(model, twin)
    for st, tst in zip(opt.state.values(), topt.state.values()):
        assert torch.equal(st["master"], tst["master"])
    for optimizer_first in (True, False):
        again = _linear(torch.bfloat16, seed=9)
        opt2 = MaskedAdamW(again.parameters(), masks=dict(zip(again.parameters(), masks.values())), **kw)
        if optimizer_first:
            opt2.load_state_dict(copy.deepcopy(saved_opt))
            again.load_state_dict(saved_model)
        else:
            again.load_state_dict(saved_model)
            opt2.load_state_dict(copy.deepcopy(saved_opt))
        for g in grads[3:]:
            _step(again, opt2, g)
        _assert_same(model, again)


def test_masters_are_dropped_when_the_weight_becomes_fp32():
    model = _linear(torch.bfloat16)
    masks = _masks(model)
    opt = MaskedAdamW(model.parameters(), lr=1e-3, masks=masks)
    grads = _grads(model, 2)
    _step(model, opt, grads[0])
    model.float()
    with torch.no_grad():
        model.weight.fill_(3.0)
    _step(model, opt, [g.float() for g in grads[1]])
    assert "master" not in opt.state[model.weight]
    assert (model.weight[masks[model.weight]] - 3.0).abs().max() < 0.01


def test_a_resumed_run_keeps_its_masters_whichever_is_loaded_first():
    model = _linear(torch.bfloat16)
    masks = _masks(model)
    opt = MaskedAdamW(model.parameters(), lr=1e-3, masks=masks)
    grads = _grads(model, 5)
    for g in grads[:3]:
        _step(model, opt, g)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for g in grads[3:]:
        _step(model, opt, g)
    again = _linear(torch.bfloat16, seed=9)
    masks2 = dict(zip(again.parameters(), masks.values()))
    opt2 = MaskedAdamW(again.parameters(), lr=1e-3, masks=masks2)
    opt2.load_state_dict(saved_opt)
    again.load_state_dict(saved_model)  # after the optimizer: the weights are what the masters round to
    for g in grads[3:]:
        _step(again, opt2, g)
    _assert_same(model, again)


def test_replaced_state_tensors_are_the_ones_stepped():
    model = _linear()
    masks = _masks(model)
    opt = MaskedAdamW(model.parameters(), lr=1e-2, masks=masks)
    grads = _grads(model, 2)
    _step(model, opt, grads[0])
    twin, twin_opt = _optimizer_like(model, masks, lr=1e-2)
    st = opt.state[model.weight]
    st["exp_avg"] = torch.full_like(st["exp_avg"], 0.5)
    st["step"] = torch.tensor(5.0)
    sd = opt.state_dict()  # what a checkpoint of the replaced state holds
    twin_opt.load_state_dict(copy.deepcopy(sd))
    _step(model, opt, grads[1])
    _step(twin, twin_opt, grads[1])
    assert opt.state[model.weight]["step"].item() == 6.0
    _assert_same(model, twin)


def test_cleared_state_starts_again():
    model = _linear()
    masks = _masks(model)
    opt = MaskedAdamW(model.parameters(), lr=1e-2, masks=masks)
    grads = _grads(model, 2)
    _step(model, opt, grads[0])
    opt.state.clear()
    twin, twin_opt = _optimizer_like(model, masks, lr=1e-2)
    _step(model, opt, grads[1])
    _step(twin, twin_opt, grads[1])  # a fresh optimizer's first step
    assert len(opt.state_dict()["state"]) == 2
    _assert_same(model, twin)


def test_state_of_the_wrong_size_is_refused_naming_the_parameter():
    model = _linear()
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=_masks(model))
    grads = _grads(model, 2)
    _step(model, opt, grads[0])
    opt.state[model.weight]["exp_avg"] = torch.zeros(3)
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match="'weight'.*exp_avg|exp_avg.*'weight'"):
        _step(model, opt, grads[1])
    assert torch.equal(model.weight, before)


def test_a_gradient_of_another_dtype_is_refused():
    model = _linear(torch.bfloat16)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=_masks(model))
    for p in model.parameters():
        p.grad_dtype = None  # torch allows other gradient dtypes once asked (mixed-precision wrappers)
        p.grad = torch.randn(p.shape)  # fp32 gradients of bf16 parameters
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="'weight'.*float32.*bfloat16"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_steps_as_the_original(how):
    model = _linear(torch.bfloat16)
    opt = MaskedAdamW(model.parameters(), lr=1e-2, masks=_masks(model))
    grads = _grads(model, 3)
    _step(model, opt, grads[0])
    pair = (model, opt)
    model2, opt2 = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    for g in grads[1:]:
        _step(model, opt, g)
        _step(model2, opt2, g)
    _assert_same(model, model2)


def test_stochastic_rounding_resumes_bit_for_bit():
    model = _linear(torch.bfloat16)
    masks = _masks(model)
    opt = MaskedAdamW(model.parameters(), lr=1e-3, masks=masks, rounding="stochastic", master_weights=False)
    grads = _grads(model, 4)
    for g in grads[:2]:
        _step(model, opt, g)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for g in grads[2:]:
        _step(model, opt, g)
    again = _linear(torch.bfloat16, seed=5)
    again.load_state_dict(saved_model)
    opt2 = MaskedAdamW(again.parameters(), lr=1e-3, masks=dict(zip(again.parameters(), masks.values())),
                       rounding="stochastic", master_weights=False)  # draws another seed
    opt2.load_state_dict(saved_opt)
    for g in grads[2:]:
        _step(again, opt2, g)
    _assert_same(model, again)


def test_a_dtensor_replaced_by_one_of_the_same_layout_keeps_its_state():
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already up")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        w = torch.randn(12, 5)
        mask = torch.rand(12, 5) < 0.4
        p = torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)]))
        opt = MaskedAdamW([p], lr=1e-2, masks={p: mask})
        g = torch.randn(12, 5)
        p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
        q = torch.nn.Parameter(distribute_tensor(p.detach().full_tensor().clone(), mesh, [Shard(0)]))
        opt.param_groups[0]["params"][0] = q  # what accelerate's FSDP2 preparation does
        q.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
        assert opt.state[q]["step"].item() == 2.0
        ref = torch.nn.Parameter(w.clone())
        ropt = MaskedAdamW([ref], lr=1e-2, masks={ref: mask})
        for _ in range(2):
            ref.grad = g.clone()
            ropt.step()
        assert torch.equal(q.full_tensor(), ref.detach())
    finally:
        dist.destroy_process_group()


def test_a_dense_adamw_state_is_refused_pointing_to_swap_optimizer():
    model = _linear()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, adamw, _grads(model, 1)[0])
    opt = MaskedAdamW(model.parameters(), lr=1e-2, masks=_masks(model))
    with pytest.raises(ValueError, match="swap_optimizer"):
        opt.load_state_dict(adamw.state_dict())
    assert not opt.state


def test_torch_adamw_refuses_a_masked_state_before_stepping():
    model = _linear()
    masks = _masks(model)
    opt = MaskedAdamW(model.parameters(), lr=1e-2, masks=masks)
    grads = _grads(model, 2)
    _step(model, opt, grads[0])
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    adamw.load_state_dict(opt.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="saved by trace_kernels.MaskedAdamW"):
        _step(model, adamw, grads[1])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)  # an ordinary AdamW still steps
    _step(model, plain, grads[1])
