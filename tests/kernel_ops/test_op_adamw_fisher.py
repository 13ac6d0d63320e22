"""adamw_fisher_: native against the reference, and its contract (Fisher of the unscaled
gradients, the masked step's numerics, found_inf, bad input)."""

import pytest
import torch

from helpers import assert_bits_equal, clone_problem, fisher_problem
from trace_kernels import ops


def run_fisher(prob, backend, steps=2, **kw):
    for _ in range(steps):
        ops.adamw_fisher_(prob["params"], prob["grads"], prob["m"], prob["v"], prob["vmax"],
                          prob["f"], prob["steps"], lr=1e-2, backend=backend, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", [{}, dict(amsgrad=True, maximize=True),
                                     dict(grad_scale=torch.tensor(8.0), fisher_scale=0.25)])
def test_adamw_fisher_native_matches_reference(native_backend, gen, dtype, variant):
    prob = fisher_problem(gen, dtype, variant.get("amsgrad", False))
    ref, nat = clone_problem(prob), clone_problem(prob)
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
    masked = clone_problem(prob)
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
    before = clone_problem(prob)
    run_fisher(prob, None, found_inf=torch.tensor(1.0))
    for key in prob:
        for a, b in zip(prob[key], before[key]):
            assert torch.equal(a, b)


def test_adamw_fisher_bad_input(gen):
    prob = fisher_problem(gen, torch.float32)
    prob["f"][1] = prob["f"][1][:-1]
    before = clone_problem(prob)
    with pytest.raises(ValueError, match="fishers\\[1\\]"):
        run_fisher(prob, None)
    for key in prob:
        for a, b in zip(prob[key], before[key]):
            assert torch.equal(a, b)
