"""masked_adamw_: every backend against the reference, and the reference against torch."""

import math

import pytest
import torch

from helpers import assert_bits_equal, bits, clone_problem, make_problem
from trace_kernels import backends, ops

SHAPES = [(37, 129), (1001,), (0, 16), (3, 5, 17), (64, 33)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run(prob, backend, steps=1, **hyper):
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    kw.update(hyper)
    for _ in range(steps):
        ops.masked_adamw_(
            prob["params"], prob["grads"], prob["m"], prob["v"], prob["vmax"], prob["idx"],
            prob["sizes"], prob["steps"], backend=backend, **kw,
        )


def assert_same(a, b):
    for key in ("params", "m", "v", "vmax", "steps"):
        for i, (x, y) in enumerate(zip(a[key], b[key])):
            assert_bits_equal(x, y, f"{key}[{i}]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
@pytest.mark.parametrize("granularity", [1, "row", 4, "tensor"])
def test_native_matches_reference(native_backend, gen, dtype, density, granularity):
    sizes = [granularity if not (isinstance(granularity, int) and math.prod(s) % granularity)
             else 1 for s in SHAPES]
    prob = make_problem(SHAPES, sizes, density, dtype, gen, amsgrad=density == 0.3)
    ref, nat = clone_problem(prob), clone_problem(prob)
    hyper = dict(amsgrad=density == 0.3)
    run(ref, "reference", steps=3, **hyper)
    run(nat, native_backend, steps=3, **hyper)
    assert_same(nat, ref)
    # frozen elements (NaN/inf sentinels) are bit-for-bit untouched
    for p0, p1, idx, b in zip(prob["params"], nat["params"], prob["idx"], prob["sizes"]):
        sel = torch.zeros(p0.numel(), dtype=torch.bool)
        if idx.numel():
            sel.view(-1, b)[idx.long()] = True
        assert torch.equal(bits(p0).reshape(-1)[~sel], bits(p1).reshape(-1)[~sel])
        if sel.any():
            assert torch.isfinite(p1.reshape(-1)[sel].float()).all()


@pytest.mark.parametrize("variant", [
    dict(maximize=True), dict(weight_decay=0.0), dict(beta1=0.3, beta2=0.5),
    dict(amsgrad=True, maximize=True), dict(lr=torch.tensor(3e-3)),
    dict(grad_scale=torch.tensor(1024.0)), dict(grad_scale=torch.tensor(3.0), maximize=True),
])
def test_native_matches_reference_flags(native_backend, gen, variant):
    prob = make_problem(SHAPES, [1, "row", 1, 17, 3], 0.4, torch.float32, gen,
                        amsgrad=variant.get("amsgrad", False))
    ref, nat = clone_problem(prob), clone_problem(prob)
    run(ref, "reference", steps=2, **variant)
    run(nat, native_backend, steps=2, **variant)
    assert_same(nat, ref)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_found_inf_changes_nothing(backend, gen):
    if backend == "cpu":
        pytest.importorskip("trace_kernels._C")
    prob = make_problem(SHAPES, [1] * 5, 0.5, torch.float32, gen)
    before = clone_problem(prob)
    run(prob, backend, found_inf=torch.tensor(1.0), grad_scale=torch.tensor(2.0))
    assert_same(prob, before)
    run(prob, backend, found_inf=torch.tensor(0.0), grad_scale=torch.tensor(2.0))
    assert all(int(s) == int(s0) + 1 for s, s0 in zip(prob["steps"], before["steps"]))


def test_large_block_sizes_and_tails(native_backend, gen):
    # vector bodies and every tail length of a 16-wide loop, int64 indices
    shapes = [(n,) for n in range(1, 40)] + [(3, 1031)]
    prob = make_problem(shapes, [1] * 39 + ["row"], 0.7, torch.float32, gen)
    prob["idx"] = [i.to(torch.int64) for i in prob["idx"]]
    ref, nat = clone_problem(prob), clone_problem(prob)
    run(ref, "reference")
    run(nat, native_backend)
    assert_same(nat, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_sparse_gathers_past_every_prefetch_distance(native_backend, gen, dtype, index_dtype):
    # ~5,000 indices about 50 elements apart: stretches long and sparse enough that the CPU
    # kernel prefetches far ahead (into L2) as well as near, up to the stretch's last index
    prob = make_problem([(257, 1001), (3, 4099)], [1, 1], 0.02, dtype, gen)
    prob["idx"] = [i.to(index_dtype) for i in prob["idx"]]
    assert prob["idx"][0].numel() > 4000
    ref, nat = clone_problem(prob), clone_problem(prob)
    run(ref, "reference", steps=2)
    run(nat, native_backend, steps=2)
    assert_same(nat, ref)
    for p0, p1, idx in zip(prob["params"], nat["params"], prob["idx"]):
        sel = torch.zeros(p0.numel(), dtype=torch.bool)
        sel[idx.long()] = True
        assert torch.equal(bits(p0).reshape(-1)[~sel], bits(p1).reshape(-1)[~sel])


def test_empty_selection_is_a_noop(gen):
    for backend in ["reference"] + (["cpu"] if backends.choose("cpu").name == "cpu" else []):
        prob = make_problem(SHAPES, [1] * 5, 0.0, torch.float32, gen)
        before = clone_problem(prob)
        run(prob, backend)
        for key in ("params", "m", "v"):
            for x, y in zip(prob[key], before[key]):
                assert torch.equal(bits(x), bits(y))


def test_reference_full_selection_matches_torch_adamw(gen):
    """Dense selection through the reference equals torch.optim.AdamW (rel. error < 1e-6)."""
    shape = (33, 65)
    p0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(7)]
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    mine = p0.clone()
    m, v = torch.zeros(p0.numel()), torch.zeros(p0.numel())
    step = torch.tensor(0.0)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
        ops.masked_adamw_([mine], [g], [m], [v], [], [torch.tensor([0], dtype=torch.int32)],
                          [p0.numel()], [step], lr=1e-2, weight_decay=0.1, backend="reference")
    rel = (mine - ref.detach()).norm() / ref.detach().norm()
    assert rel < 1e-6
    st = opt.state[ref]
    assert (m - st["exp_avg"].reshape(-1)).norm() / st["exp_avg"].norm() < 1e-6
    assert (v - st["exp_avg_sq"].reshape(-1)).norm() / st["exp_avg_sq"].norm() < 1e-6
    assert float(step) == float(st["step"]) == 7.0
