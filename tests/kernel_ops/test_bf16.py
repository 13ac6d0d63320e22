"""bf16 parameters that really learn: fp32 master values of the core (on by default for
16-bit parameters) and stochastic rounding, the same bits on every backend."""

import pytest
import torch

from helpers import assert_bits_equal, clone_problem, make_problem
from trace_kernels import MaskedAdamW, ops
from trace_kernels.backends._common import round_bits, round_key, to_param

CPU_BACKENDS = ["reference", "cpu", "triton"]


def _fine_tuning_run(master_weights, rounding="nearest", dtype=torch.bfloat16, backend=None, steps=50):
    """The issue's measurement: a 256×256 parameter, weights ~N(0, 0.02), a 5 % element
    core, lr 2e-5, 50 steps of gradients N(0.5, 1) given in bf16."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(256, 256, generator=g) * 0.02
    mask = torch.rand(256, 256, generator=g) < 0.05
    p = torch.nn.Parameter(w0.to(torch.bfloat16).to(dtype))
    opt = MaskedAdamW([p], lr=2e-5, weight_decay=0.0, masks={p: mask}, master_weights=master_weights,
                      rounding=rounding, seed=3, backend=backend)
    for _ in range(steps):
        p.grad = (torch.randn(256, 256, generator=g) + 0.5).to(torch.bfloat16).to(dtype)
        opt.step()
    return p.detach(), mask, w0.to(torch.bfloat16), opt


def test_masters_end_where_fp32_ends():
    """With the default masters, ≥ 99.9 % of core elements equal the fp32 run rounded to
    bf16; plain rounding leaves most of them where they started."""
    fp32, mask, start, _ = _fine_tuning_run(None, dtype=torch.float32)
    target = fp32.to(torch.bfloat16)
    masters, _, _, opt = _fine_tuning_run(None)
    plain, _, _, _ = _fine_tuning_run(False)
    assert (masters == target)[mask].float().mean() >= 0.999
    assert (plain == target)[mask].float().mean() < 0.2
    assert (plain == start)[mask].float().mean() > 0.5      # most never moved
    for out in (masters, plain):
        assert torch.equal(out[~mask].view(torch.int16), start[~mask].view(torch.int16))
    # the masters cost exactly 4 bytes per core element
    assert opt.state_bytes()["masters"] == 4 * int(mask.sum())


def test_stochastic_rounding_moves_most_core_elements_without_masters():
    sr, mask, start, opt = _fine_tuning_run(False, "stochastic")
    assert (sr != start)[mask].float().mean() > 0.9
    assert opt.state_bytes()["masters"] == 0


def test_masters_survive_a_state_dict_round_trip_bit_for_bit():
    _, _, _, opt = _fine_tuning_run(None, steps=5)
    p = opt.param_groups[0]["params"][0]
    sd = opt.state_dict()
    twin = torch.nn.Parameter(p.detach().clone())
    topt = MaskedAdamW([twin], lr=2e-5, weight_decay=0.0, masks={twin: opt._layout[p].entry})
    topt.load_state_dict(sd)
    assert torch.equal(topt.state[twin]["master"], opt.state[p]["master"])
    assert topt.state[twin]["master"].dtype == torch.float32
    # a new mask drops them with the rest of the parameter's state
    other = torch.zeros(256, 256, dtype=torch.bool)
    other[0, :3] = True
    topt.set_masks({twin: other})
    assert twin not in topt.state


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("granularity", [1, "row"])
def test_masters_and_stochastic_rounding_match_the_reference(backend, gen, granularity):
    if backend == "triton":
        pytest.importorskip("triton")
    shapes = [(37, 129), (5, 17), (1001,)]
    prob = make_problem(shapes, [granularity] * 3, 0.4, torch.bfloat16, gen)
    sizes = [i.numel() * b for i, b in zip(prob["idx"], prob["sizes"])]
    masters = [torch.randn(n, generator=gen) * 0.5 for n in sizes]
    for rounding in ("nearest", "stochastic"):
        ref, mine = clone_problem(prob), clone_problem(prob)
        mref, mmine = [m.clone() for m in masters], [m.clone() for m in masters]
        for P, M, b in ((ref, mref, "reference"), (mine, mmine, backend)):
            for _ in range(2):
                ops.masked_adamw_(P["params"], P["grads"], P["m"], P["v"], [], P["idx"], P["sizes"],
                                  P["steps"], lr=1e-2, masters=M, elem_bases=[0, 100, 7],
                                  rounding=rounding, seed=11, backend=b)
        for key in ("params", "m", "v", "steps"):
            for i, (a, x) in enumerate(zip(mine[key], ref[key])):
                assert_bits_equal(a, x, f"{rounding} {key}[{i}]")
        for i, (a, x) in enumerate(zip(mmine, mref)):
            assert_bits_equal(a, x, f"{rounding} masters[{i}]")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_probe_step_matches_the_reference(backend, gen):
    if backend == "triton":
        pytest.importorskip("triton")
    from helpers import fisher_problem

    prob = fisher_problem(gen, torch.bfloat16)
    ref, mine = clone_problem(prob), clone_problem(prob)
    for P, b in ((ref, "reference"), (mine, backend)):
        ops.adamw_fisher_(P["params"], P["grads"], P["m"], P["v"], [], P["f"], P["steps"], lr=1e-3,
                          rounding="stochastic", seed=5, backend=b)
    for key in prob:
        for i, (a, x) in enumerate(zip(mine[key], ref[key])):
            assert_bits_equal(a, x, f"{key}[{i}]")


def test_stochastic_rounding_is_unbiased():
    """Values between two bf16 neighbours, rounded with many keys: the mean of the results
    is the value (within 4 standard errors), where rounding to nearest is off by up to
    half a step."""
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    step = 2.0 ** -7                      # bf16 spacing in [1, 2)
    for frac in (0.1, 0.37, 0.5, 0.93):
        x = torch.full((20000,), 1.0 + frac * step)
        e = torch.arange(x.numel())
        outs = torch.stack([to_param(x, torch.bfloat16, round_bits(round_key(seed, 1.0), e)).float()
                            for seed in range(5)])
        got = (outs.mean() - float(lo)) / step
        stderr = (frac * (1 - frac) / outs.numel()) ** 0.5
        assert abs(float(got) - frac) < 4 * stderr + 1e-6, (frac, float(got))
        assert set(outs.unique().tolist()) <= {1.0, 1.0 + step}


def test_bad_rounding_settings_are_refused():
    p = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.float16))
    with pytest.raises(TypeError, match="fp16: stochastic rounding supports bf16"):
        MaskedAdamW([p], masks={p: torch.ones(4, 4, dtype=torch.bool)}, rounding="stochastic")
    with pytest.raises(ValueError, match="rounding must be one of"):
        MaskedAdamW([p], masks={p: torch.ones(4, 4, dtype=torch.bool)}, rounding="up")
    q = torch.zeros(8, dtype=torch.float32)
    with pytest.raises(TypeError, match="is its own master"):
        ops.masked_adamw_([q], [torch.ones(8)], [torch.zeros(8)], [torch.zeros(8)], [],
                          [torch.arange(8, dtype=torch.int32)], [1], [torch.tensor(0.0)], lr=1e-3,
                          masters=[torch.zeros(8)])


def test_tensors_of_one_shape_round_with_independent_bits():
    """Issue #35: the stochastic-rounding bits hashed only the seed, the step and the
    element's index, so element (i, j) of every tensor of one shape rounded with the same
    bits (unbiased each, correlated across layers). Each parameter now has its own range of
    element indices (`ops.element_base` of its name): two identical parameters with
    identical gradients round apart (the probe's dense step passes the same bases)."""
    torch.manual_seed(0)
    w = (torch.randn(64, 64) * 0.02).to(torch.bfloat16)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = MaskedAdamW([("layers.0.q", a), ("layers.1.q", b)], lr=1e-4, weight_decay=0.0, rounding="stochastic",
                      seed=7, masks={a: torch.ones(64, 64, dtype=torch.bool), b: torch.ones(64, 64, dtype=torch.bool)})
    g = torch.randn(64, 64).to(torch.bfloat16)
    a.grad, b.grad = g.clone(), g.clone()
    opt.step()
    differ = (a != b).float().mean()
    assert 0.05 < float(differ) < 0.95, float(differ)
    assert ops.element_base("layers.0.q") != ops.element_base("layers.1.q")
    assert ops.element_base("x", 5) == ops.element_base("x") + 5  # a shard's offset within its range
