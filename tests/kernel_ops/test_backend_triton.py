"""Triton kernels against the reference (under TRITON_INTERPRET=1 on CPU, small sizes)."""

import pytest
import torch

pytest.importorskip("triton")

from helpers import (assert_bits_equal, bits, block_sizes_for, clone_problem,  # noqa: E402
                     make_problem, train_side_by_side)
from helpers import assert_stats_close, fisher_problem, stats_problem  # noqa: E402
from trace_kernels import CoreMask, MaskedAdamW, backends, ops  # noqa: E402

SHAPES = [(37, 129), (1001,), (0, 16), (5, 17), (3, 2050)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def to_device(prob):
    return {k: [t.to(DEVICE) for t in v] if k != "sizes" and k != "steps" else v
            for k, v in prob.items()}


def run(prob, backend, steps=2, **kw):
    args = dict(lr=1e-2, weight_decay=0.01)
    args.update(kw)
    for _ in range(steps):
        ops.masked_adamw_(prob["params"], prob["grads"], prob["m"], prob["v"], prob["vmax"],
                          prob["idx"], prob["sizes"], prob["steps"], backend=backend, **args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("granularity", [1, "row", "tensor"])
def test_masked_adamw_matches_reference(gen, dtype, density, granularity):
    prob = to_device(make_problem(SHAPES, [granularity] * len(SHAPES), density, dtype, gen,
                                  amsgrad=density == 0.3))
    ref, tri = clone_problem(prob), clone_problem(prob)
    run(ref, "reference", amsgrad=density == 0.3)
    run(tri, "triton", amsgrad=density == 0.3)
    for key in ("params", "m", "v", "vmax", "steps"):
        for i, (a, b) in enumerate(zip(tri[key], ref[key])):
            assert_bits_equal(a.cpu(), b.cpu(), f"{key}[{i}]")
    for p0, p1, idx, b in zip(prob["params"], tri["params"], prob["idx"], prob["sizes"]):
        sel = torch.zeros(p0.numel(), dtype=torch.bool)
        if idx.numel():
            sel.view(-1, b)[idx.long().cpu()] = True
        assert torch.equal(bits(p0.cpu()).reshape(-1)[~sel], bits(p1.cpu()).reshape(-1)[~sel])


@pytest.mark.parametrize("variant", [dict(maximize=True, beta1=0.3),
                                     dict(grad_scale=torch.tensor(64.0), lr=torch.tensor(3e-3)),
                                     dict(found_inf=torch.tensor(1.0))])
def test_masked_adamw_flags(gen, variant):
    prob = to_device(make_problem(SHAPES, [1, "row", 1, 17, 2050], 0.5, torch.float32, gen))
    variant = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in variant.items()}
    ref, tri = clone_problem(prob), clone_problem(prob)
    run(ref, "reference", **variant)
    run(tri, "triton", **variant)
    for key in ("params", "m", "v", "steps"):
        for i, (a, b) in enumerate(zip(tri[key], ref[key])):
            assert_bits_equal(a.cpu(), b.cpu(), f"{key}[{i}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_fisher_matches_reference(gen, dtype):
    prob = fisher_problem(gen, dtype, amsgrad=True)
    prob = {k: [t.to(DEVICE) if k != "steps" else t for t in v] for k, v in prob.items()}
    ref = {k: [t.clone() for t in v] for k, v in prob.items()}
    tri = {k: [t.clone() for t in v] for k, v in prob.items()}
    for P, backend in ((ref, "reference"), (tri, "triton")):
        ops.adamw_fisher_(P["params"], P["grads"], P["m"], P["v"], P["vmax"], P["f"], P["steps"],
                          lr=1e-2, amsgrad=True, fisher_scale=0.5, backend=backend)
    for key in prob:
        for i, (a, b) in enumerate(zip(tri[key], ref[key])):
            assert_bits_equal(a.cpu(), b.cpu(), f"{key}[{i}]")


@pytest.mark.parametrize("num_refs", [0, 1, 3])
@pytest.mark.parametrize("granularity", [1, 3, "row", "tensor"])
def test_delta_stats_matches_reference(gen, num_refs, granularity):
    shapes = [(37, 129), (0, 8), (3, 5000), (7,)]
    post, pre, fishers, refs = stats_problem(gen, shapes, num_refs)
    sizes = block_sizes_for(shapes, granularity)
    mv = lambda xs: [x.to(DEVICE) for x in xs]  # noqa: E731
    ref = ops.delta_stats(post, pre, fishers, refs, sizes, backend="reference")
    tri = ops.delta_stats(mv(post), mv(pre), mv(fishers), [mv(r) for r in refs], sizes,
                          backend="triton")
    again = ops.delta_stats(mv(post), mv(pre), mv(fishers), [mv(r) for r in refs], sizes,
                            backend="triton")
    assert tri.row_offsets == ref.row_offsets
    assert_stats_close([t.cpu() for t in tri[:4]], ref, exact=granularity == 1)
    assert_stats_close(tri, again, exact=True)  # deterministic: no atomics


def test_delta_stats_dtypes_and_optional_inputs(gen):
    post, pre, fishers, refs = stats_problem(gen, [(9, 65), (131,)], 2, torch.bfloat16, torch.float16)
    for args in ((post, pre, fishers, refs), (post, None, None, refs), (post, pre, None, None)):
        ref = ops.delta_stats(*args, [65, 1], backend="reference")
        tri = ops.delta_stats(*args, [65, 1], backend="triton")
        assert_stats_close(tri, ref, exact=False)


def test_masked_adamw_optimizer_on_triton(gen):
    model = torch.nn.Linear(40, 24).to(DEVICE)
    twin = torch.nn.Linear(40, 24).to(DEVICE)
    twin.load_state_dict(model.state_dict())
    mask = CoreMask.from_dense({"weight": torch.rand(24, 40, generator=gen) < 0.3,
                                "bias": torch.rand(24, generator=gen) < 0.5})
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=mask, backend="triton")
    ref = MaskedAdamW(twin.named_parameters(), lr=1e-2, masks=mask, backend="reference")
    x = torch.randn(8, 40, generator=gen).to(DEVICE)
    train_side_by_side(((model, opt), (twin, ref)), x, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_triton_backend_errors(monkeypatch):
    from trace_kernels.backends import triton as tb

    backends._choose.cache_clear()
    try:
        if DEVICE == "cpu":
            monkeypatch.delenv("TRITON_INTERPRET")
            with pytest.raises(backends.BackendUnavailableError, match="TRITON_INTERPRET"):
                backends.choose("cpu", "triton")
        monkeypatch.setattr(tb, "_IMPORT_ERROR", "ImportError: simulated")
        with pytest.raises(backends.BackendUnavailableError, match="pip install triton"):
            backends.choose(DEVICE, "triton")
    finally:
        backends._choose.cache_clear()


def test_gpu_benchmark_script_smoke():
    """bench/bench_gpu.py (run by bench/gpu_check.sh on GPU machines) works end to end."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if DEVICE == "cuda":
        pytest.skip("the real run happens in bench/gpu_check.sh")
    script = Path(__file__).parents[2] / "bench" / "bench_gpu.py"
    out = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "triton_masked_row_0.05" in out.stdout and "triton_delta_stats_R2_row" in out.stdout
