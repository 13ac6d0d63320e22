"""adamw_fisher_ and delta_stats: native against the reference, and their contracts."""

import math

import pytest
import torch

from helpers import assert_bits_equal, block_sizes_for
from trace_kernels import ops

SHAPES = [(37, 129), (1001,), (0, 16), (5, 17), (1,)]


def fisher_problem(gen, dtype, amsgrad=False):
    prob = {"params": [], "grads": [], "m": [], "v": [], "vmax": [], "f": [], "steps": []}
    for s in SHAPES:
        n = math.prod(s)
        prob["params"].append(torch.randn(s, generator=gen).to(dtype))
        prob["grads"].append(torch.randn(s, generator=gen).to(dtype))
        prob["m"].append(torch.randn(n, generator=gen) * 0.1)
        prob["v"].append(torch.rand(n, generator=gen) * 0.01)
        prob["vmax"].append(prob["v"][-1] + 0.001)
        prob["f"].append(torch.rand(n, generator=gen))
        prob["steps"].append(torch.tensor(2.0))
    if not amsgrad:
        prob["vmax"] = []
    return prob


def clone(prob):
    return {k: [t.clone() for t in v] for k, v in prob.items()}


def run_fisher(prob, backend, steps=2, **kw):
    for _ in range(steps):
        ops.adamw_fisher_(prob["params"], prob["grads"], prob["m"], prob["v"], prob["vmax"],
                          prob["f"], prob["steps"], lr=1e-2, backend=backend, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", [{}, dict(amsgrad=True, maximize=True),
                                     dict(grad_scale=torch.tensor(8.0), fisher_scale=0.25)])
def test_adamw_fisher_native_matches_reference(native_backend, gen, dtype, variant):
    prob = fisher_problem(gen, dtype, variant.get("amsgrad", False))
    ref, nat = clone(prob), clone(prob)
    run_fisher(ref, "reference", **variant)
    run_fisher(nat, native_backend, **variant)
    for key in prob:
        for i, (a, b) in enumerate(zip(nat[key], ref[key])):
            assert_bits_equal(a, b, f"{key}[{i}]")


def test_adamw_fisher_accumulates_squared_unscaled_grads(gen):
    prob = fisher_problem(gen, torch.float32)
    f0 = [f.clone() for f in prob["f"]]
    run_fisher(prob, None, steps=1, grad_scale=torch.tensor(4.0), fisher_scale=0.5)
    for f, f_before, g in zip(prob["f"], f0, prob["grads"]):
        expected = f_before + 0.5 * (g.reshape(-1) / 4.0) ** 2
        torch.testing.assert_close(f, expected, rtol=1e-6, atol=1e-7)


def test_adamw_fisher_equals_full_masked_step(gen):
    prob = fisher_problem(gen, torch.float32)
    masked = clone(prob)
    run_fisher(prob, None, steps=3)
    for _ in range(3):
        ops.masked_adamw_(
            masked["params"], masked["grads"], masked["m"], masked["v"], [],
            [torch.tensor([0] if p.numel() else [], dtype=torch.int32) for p in masked["params"]],
            [max(p.numel(), 1) for p in masked["params"]], masked["steps"], lr=1e-2)
    for key in ("params", "m", "v", "steps"):
        for a, b in zip(prob[key], masked[key]):
            assert torch.equal(a, b)


def test_adamw_fisher_found_inf_changes_nothing(gen):
    prob = fisher_problem(gen, torch.float32)
    before = clone(prob)
    run_fisher(prob, None, found_inf=torch.tensor(1.0))
    for key in prob:
        for a, b in zip(prob[key], before[key]):
            assert torch.equal(a, b)


def test_adamw_fisher_bad_input(gen):
    prob = fisher_problem(gen, torch.float32)
    prob["f"][1] = prob["f"][1][:-1]
    before = clone(prob)
    with pytest.raises(ValueError, match="fishers\\[1\\]"):
        run_fisher(prob, None)
    for key in prob:
        for a, b in zip(prob[key], before[key]):
            assert torch.equal(a, b)


def stats_problem(gen, shapes, num_refs, dtype=torch.float32, ref_dtype=torch.float32):
    post = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    pre = [(p.float() + 0.01 * torch.randn(p.shape, generator=gen)).to(dtype) for p in post]
    fishers = [torch.rand(p.numel(), generator=gen) for p in post]
    refs = [[torch.randn(p.shape, generator=gen).to(ref_dtype) for _ in range(num_refs)] for p in post]
    return post, pre, fishers, refs


def assert_stats_close(a, b, exact):
    for name, x, y in zip(("sum_sq", "fisher_sum", "dots", "ref_sq"), a[:4], b[:4]):
        assert x.shape == y.shape, name
        if exact:  # same values; the sign of a zero sum carries no meaning
            assert torch.equal(x, y), f"{name}: {int((x != y).sum())} elements differ"
        else:  # fp64 sums in another order, rounded once to fp32
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-30, msg=name)


@pytest.mark.parametrize("num_refs", [0, 1, 3])
@pytest.mark.parametrize("granularity", [1, 3, "row", "tensor", 20000])
def test_delta_stats_native_matches_reference(native_backend, gen, num_refs, granularity):
    shapes = [(37, 129), (0, 8), (3, 40000), (7,), (60000,)]
    post, pre, fishers, refs = stats_problem(gen, shapes, num_refs)
    sizes = block_sizes_for(shapes, granularity)
    ref = ops.delta_stats(post, pre, fishers, refs, sizes, backend="reference")
    nat = ops.delta_stats(post, pre, fishers, refs, sizes, backend=native_backend)
    assert nat.row_offsets == ref.row_offsets
    assert_stats_close(nat, ref, exact=granularity == 1)


@pytest.mark.parametrize("dtype,ref_dtype", [(torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float32),
                                             (torch.float32, torch.bfloat16)])
def test_delta_stats_dtypes_and_optional_inputs(native_backend, gen, dtype, ref_dtype):
    shapes = [(33, 65), (1031,)]
    post, pre, fishers, refs = stats_problem(gen, shapes, 2, dtype, ref_dtype)
    for args in ((post, pre, fishers, refs), (post, None, None, refs), (post, pre, None, None)):
        ref = ops.delta_stats(*args, [65, 1], backend="reference")
        nat = ops.delta_stats(*args, [65, 1], backend=native_backend)
        assert_stats_close(nat, ref, exact=False)
    nofisher = ops.delta_stats(post, pre, None, refs, [65, 1], backend=native_backend)
    assert not nofisher.fisher_sum.any()


def test_delta_stats_values_are_the_method_quantities(gen):
    post, pre, fishers, refs = stats_problem(gen, [(6, 50)], 2)
    s = ops.delta_stats(post, pre, fishers, refs, [50])
    d = (post[0] - pre[0]).double()
    torch.testing.assert_close(s.sum_sq.double(), d.square().sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.fisher_sum.double(), fishers[0].double().view(6, 50).sum(1),
                               rtol=1e-6, atol=0)
    for r in range(2):
        torch.testing.assert_close(s.dots[:, r].double(), (d * refs[0][r].double()).sum(1),
                                   rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(s.ref_sq[:, r].double(), refs[0][r].double().square().sum(1),
                                   rtol=1e-6, atol=0)


def test_delta_stats_deterministic_across_thread_counts(native_backend, gen):
    post, pre, fishers, refs = stats_problem(gen, [(4, 70001), (300, 257)], 2)
    sizes = [70001, 257]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.delta_stats(post, pre, fishers, refs, sizes, backend=native_backend)
        torch.set_num_threads(2)
        two = ops.delta_stats(post, pre, fishers, refs, sizes, backend=native_backend)
    finally:
        torch.set_num_threads(old)
    assert_stats_close(one, two, exact=True)


def test_delta_stats_bad_input(gen):
    post, pre, fishers, refs = stats_problem(gen, [(4, 8)], 1)
    with pytest.raises(ValueError, match="block_sizes\\[0\\]"):
        ops.delta_stats(post, pre, fishers, refs, [5])
    with pytest.raises(ValueError, match="pre\\[0\\]"):
        ops.delta_stats(post, [pre[0].reshape(8, 4)], fishers, refs, [8])
    with pytest.raises(ValueError, match="refs\\[0\\]\\[0\\]"):
        ops.delta_stats(post, pre, fishers, [[torch.zeros(31)]], [8])
    with pytest.raises(ValueError, match="0 to 16 references"):
        ops.delta_stats(post, pre, fishers, [[refs[0][0]] * 17], [8])
    with pytest.raises(ValueError, match="fishers\\[0\\]"):
        ops.delta_stats(post, pre, [torch.zeros(3)], refs, [8])
