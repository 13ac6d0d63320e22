"""Bad input to masked_adamw_ raises a clear error naming the argument, before any change."""

import pytest
import torch

from helpers import clone_problem, make_problem
from trace_kernels import backends, ops

SHAPES = [(8, 16), (31,)]


def call(prob, backend, **kw):
    args = dict(lr=1e-2)
    args.update(kw)
    ops.masked_adamw_(prob["params"], prob["grads"], prob["m"], prob["v"], prob["vmax"],
                      prob["idx"], prob["sizes"], prob["steps"], backend=backend, **args)


def _mutations():
    def idx(fn):
        def apply(p):
            p["idx"][1] = fn(p["idx"][1])
        return apply

    return {
        "unsorted indices": (idx(lambda i: i.flip(0)), ValueError, "block_indices\\[1\\].*increasing"),
        "duplicate indices": (idx(lambda i: i.new_tensor([2, 5, 5])), ValueError, "block_indices\\[1\\].*increasing"),
        "out of range index": (idx(lambda i: torch.cat([i[:-1], i.new_tensor([31])])), ValueError, "block_indices\\[1\\].*out of range"),
        "negative index": (idx(lambda i: torch.cat([i.new_tensor([-1]), i[1:]])), ValueError, "block_indices\\[1\\].*out of range"),
        "float indices": (idx(lambda i: i.float()), TypeError, "block_indices\\[1\\]"),
        "2-D indices": (idx(lambda i: i.reshape(1, -1)), TypeError, "block_indices\\[1\\]"),
        "grad shape": (lambda p: p["grads"].__setitem__(0, torch.zeros(8, 17)), ValueError, "grads\\[0\\]"),
        "grad dtype": (lambda p: p["grads"].__setitem__(0, p["grads"][0].double()), ValueError, "grads\\[0\\]"),
        "param dtype": (lambda p: (p["params"].__setitem__(1, p["params"][1].double()),
                                   p["grads"].__setitem__(1, p["grads"][1].double())), TypeError, "params\\[1\\]"),
        "non-contiguous param": (lambda p: p["params"].__setitem__(0, torch.zeros(16, 8).t()), ValueError, "params\\[0\\]"),
        "state too short": (lambda p: p["m"].__setitem__(0, p["m"][0][:-1]), ValueError, "exp_avgs\\[0\\]"),
        "bf16 state": (lambda p: p["v"].__setitem__(1, p["v"][1].bfloat16()), TypeError, "exp_avg_sqs\\[1\\]"),
        "block size not dividing": (lambda p: p["sizes"].__setitem__(1, 2), ValueError, "block_sizes\\[1\\]"),
        "block size zero": (lambda p: p["sizes"].__setitem__(1, 0), ValueError, "block_sizes\\[1\\]"),
        "block size float": (lambda p: p["sizes"].__setitem__(1, 1.0), TypeError, "block_sizes\\[1\\]"),
        "missing grad": (lambda p: p["grads"].pop(), ValueError, "grads has 1 entries"),
        "step not a tensor": (lambda p: p["steps"].__setitem__(0, 3), TypeError, "steps\\[0\\]"),
    }


MUTATIONS = _mutations()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_bad_input_raises_before_any_change(backend, case, gen):
    if backend == "cpu":
        pytest.importorskip("trace_kernels._C")
    prob = make_problem(SHAPES, ["row", 1], 0.5, torch.float32, gen, nan_frozen=False)
    # make sure both tensors have selected blocks to corrupt (a random row selection can be empty)
    prob["idx"][0] = torch.tensor([0, 2], dtype=torch.int32)
    n0 = 2 * prob["sizes"][0]
    prob["m"][0], prob["v"][0] = torch.zeros(n0), torch.zeros(n0)
    prob["idx"][1] = torch.tensor([2, 5, 9], dtype=torch.int32)
    prob["m"][1], prob["v"][1] = torch.zeros(3), torch.zeros(3)
    mutate, exc, pattern = MUTATIONS[case]
    mutate(prob)
    before = clone_problem(prob)
    with pytest.raises(exc, match=pattern):
        call(prob, backend)
    for key in ("params", "m", "v", "steps"):
        for x, y in zip(prob[key], before[key]):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), f"{key} changed although the call was refused"


@pytest.mark.parametrize("kw,pattern", [
    (dict(lr=-1.0), "lr"), (dict(beta1=1.0), "beta1"), (dict(beta2=-0.1), "beta2"),
    (dict(eps=float("nan")), "eps"), (dict(weight_decay=-1.0), "weight_decay"),
    (dict(grad_scale=torch.tensor([1.0, 2.0])), "grad_scale"),
    (dict(amsgrad=True), "max_exp_avg_sqs"),
])
def test_bad_hyperparameters(kw, pattern, gen):
    prob = make_problem(SHAPES, ["row", 1], 0.5, torch.float32, gen)
    before = clone_problem(prob)
    with pytest.raises((ValueError, TypeError), match=pattern):
        call(prob, None, **kw)
    assert all(torch.equal(a, b) for a, b in zip(prob["steps"], before["steps"]))


def test_unknown_backend_is_a_clear_error(gen):
    prob = make_problem(SHAPES, ["row", 1], 0.5, torch.float32, gen)
    with pytest.raises(RuntimeError, match="unknown backend 'bogus'"):
        call(prob, "bogus")


def test_env_var_forces_backend(monkeypatch, gen):
    monkeypatch.setenv("TRACE_KERNELS_BACKEND", "bogus")
    prob = make_problem(SHAPES, ["row", 1], 0.5, torch.float32, gen)
    with pytest.raises(RuntimeError, match="TRACE_KERNELS_BACKEND=bogus"):
        call(prob, None)
    monkeypatch.setenv("TRACE_KERNELS_BACKEND", "reference")
    assert backends.choose("cpu").name == "reference"
