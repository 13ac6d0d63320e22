"""The CUDA kernels' own source, run on the CPU: csrc/cuda/kernels.cu and the binding built
over csrc/cuda/host/ (tools/build_cuda_host.py) and driven by the CUDA backend's own Python
planning code on CPU tensors, bit-compared with the reference with frozen elements
poisoned. What the interpreter-free GPU tests would catch, caught without a GPU: tiles
that run past their block (row lengths 1027, 1028, 2050, 11008), found_inf sums, steps and
lr read from "device" memory, the vector path, a failed launch."""

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import (assert_bits_equal, assert_stats_close, block_sizes_for, clone_problem,
                     fisher_problem, make_problem, stats_problem)
from trace_kernels.backends import cuda as cuda_backend
from trace_kernels.backends import reference
from trace_kernels.backends._plan_cache import PLANS

sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))
from build_cuda_host import build  # noqa: E402

# odd sizes (SIMD and tile tails), rows of 1027/1028/2050 (tiles that end inside a block),
# and an LLM MLP row (11008) at few rows
SHAPES = [(5, 1027), (4, 1028), (3, 2050), (2, 11008), (37, 129), (1001,), (0, 16), (1,)]


@pytest.fixture(scope="session")
def host_ext(tmp_path_factory):
    path = build(tmp_path_factory.mktemp("cuda_host"))
    spec = importlib.util.spec_from_file_location("_cuda_host", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cuda_on_cpu(host_ext, monkeypatch):
    """The CUDA backend with the host build of its extension: CPU tensors are its device."""
    monkeypatch.setattr(cuda_backend, "_ext", lambda: host_ext)
    monkeypatch.setattr(cuda_backend, "_stream", lambda device: (0, 0))
    PLANS.clear()
    yield host_ext
    PLANS.clear()


HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, maximize=False)


def run(prob, impl, steps=3, **kw):
    args = {**HYPER, "lr": 1e-2, "amsgrad": False, "grad_scale": None, "found_inf": None, **kw}
    for _ in range(steps):
        impl.masked_adamw_(prob["params"], prob["grads"], prob["m"], prob["v"], prob["vmax"],
                           prob["idx"], prob["sizes"], prob["steps"], **args)


def assert_same(mine, ref, keys=("params", "m", "v", "vmax", "steps")):
    for key in keys:
        for i, (a, b) in enumerate(zip(mine[key], ref[key])):
            assert_bits_equal(a, b, f"{key}[{i}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
@pytest.mark.parametrize("granularity", [1, "row", "tensor"])
def test_masked_adamw_matches_reference(cuda_on_cpu, gen, dtype, density, granularity):
    amsgrad = density == 0.3
    prob = make_problem(SHAPES, [granularity] * len(SHAPES), density, dtype, gen, amsgrad=amsgrad)
    ref, mine = clone_problem(prob), clone_problem(prob)
    run(ref, reference, amsgrad=amsgrad)
    run(mine, cuda_backend, amsgrad=amsgrad)
    assert_same(mine, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_vector_path_matches_reference(cuda_on_cpu, gen, dtype, amsgrad):
    """Rows and tensors whose length is a multiple of 4 take the 16-byte vector path;
    tails of 1-3 and misaligned rows mix it with the scalar one."""
    shapes = [(9, 256), (5, 1028), (3, 1027), (2, 4099), (6150,)]
    prob = make_problem(shapes, ["row", "row", "row", "tensor", "tensor"], 0.6, dtype, gen,
                        amsgrad=amsgrad)
    ref, mine = clone_problem(prob), clone_problem(prob)
    run(ref, reference, amsgrad=amsgrad)
    run(mine, cuda_backend, amsgrad=amsgrad)
    assert_same(mine, ref)


@pytest.mark.parametrize("steps_in_device_memory", [True, False])
@pytest.mark.parametrize("lr_tensor", [False, True])
def test_steps_and_lr_in_device_memory(cuda_on_cpu, gen, steps_in_device_memory, lr_tensor):
    """Steps the kernel reads itself (fp32/fp64 on the tensors' device) or passes by value
    (any other kind), an lr tensor read by the kernel or a float: the same bits."""
    prob = make_problem(SHAPES, [1, "row", 1, 2, "tensor", 1, 1, 1], 0.5, torch.float32, gen,
                        amsgrad=True)
    ref, mine = clone_problem(prob), clone_problem(prob)
    kind = torch.float64 if steps_in_device_memory else torch.float16
    mine["steps"] = [s.to(kind) for s in mine["steps"]]
    lr = torch.tensor(1e-2, dtype=torch.float64) if lr_tensor else 1e-2
    run(ref, reference, amsgrad=True)
    run(mine, cuda_backend, amsgrad=True, lr=lr)
    assert_same(mine, ref, ("params", "m", "v", "vmax"))
    assert [float(s) for s in mine["steps"]] == [float(s) for s in ref["steps"]]


@pytest.mark.parametrize("found", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("steps_in_device_memory", [True, False])
def test_found_inf_skips_the_step_for_any_nonzero_value(cuda_on_cpu, gen, found, steps_in_device_memory):
    """GradScaler passes the sum of per-device found_inf (2.0 when two devices overflow):
    any non-zero value skips the step and leaves every counter where it was."""
    prob = make_problem(SHAPES, ["row"] * len(SHAPES), 0.5, torch.float32, gen)
    if not steps_in_device_memory:
        prob["steps"] = [s.to(torch.float16) for s in prob["steps"]]
    ref, mine = clone_problem(prob), clone_problem(prob)
    flags = dict(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(found))
    run(ref, reference, steps=2, **flags)
    run(mine, cuda_backend, steps=2, **flags)
    assert_same(mine, ref, ("params", "m", "v"))
    assert [float(s) for s in mine["steps"]] == [float(s) for s in ref["steps"]]
    if found:
        assert_same(mine, prob, ("params", "m", "v", "steps"))


def test_a_failed_launch_changes_no_counter(cuda_on_cpu, gen, monkeypatch):
    prob = make_problem(SHAPES, ["row"] * len(SHAPES), 0.5, torch.float32, gen)
    prob["steps"][0] = prob["steps"][0].to(torch.float16)  # one host counter: all by value
    before = clone_problem(prob)

    class Failing:
        def __getattr__(self, name):
            return getattr(cuda_on_cpu, name)

        def masked_adamw(self, *args, **kw):
            raise RuntimeError("trace_kernels._cuda: masked_adamw launch: out of resources")

    monkeypatch.setattr(cuda_backend, "_ext", lambda: Failing())
    with pytest.raises(RuntimeError, match="out of resources"):
        run(prob, cuda_backend, steps=1)
    assert_same(prob, before, ("params", "m", "v", "steps"))


def test_adamw_fisher_matches_reference(cuda_on_cpu, gen):
    prob = fisher_problem(gen, torch.bfloat16, amsgrad=True)
    ref, mine = clone_problem(prob), clone_problem(prob)
    for P, impl in ((ref, reference), (mine, cuda_backend)):
        for _ in range(2):
            impl.adamw_fisher_(P["params"], P["grads"], P["m"], P["v"], P["vmax"], P["f"],
                               P["steps"], fisher_scale=0.5, lr=1e-2, amsgrad=True,
                               grad_scale=None, found_inf=None, **HYPER)
    assert_same(mine, ref, tuple(prob))


@pytest.mark.parametrize("num_refs", [0, 2])
@pytest.mark.parametrize("granularity", [1, 7, "row", "tensor"])
def test_delta_stats_matches_reference(cuda_on_cpu, gen, num_refs, granularity):
    shapes = [(37, 129), (0, 8), (3, 40000), (7,)]
    post, pre, fishers, refs = stats_problem(gen, shapes, num_refs)
    sizes = block_sizes_for(shapes, granularity)
    flat = [r for rs in refs for r in rs]

    def outputs():
        n = sum(t.numel() // b for t, b in zip(post, sizes))
        return (torch.full((n,), float("nan")), torch.full((n,), float("nan")),
                torch.full((n, num_refs), float("nan")), torch.full((n, num_refs), float("nan")))

    ref, mine, again = outputs(), outputs(), outputs()
    reference.delta_stats(post, pre, fishers, flat, sizes, num_refs, ref)
    cuda_backend.delta_stats(post, pre, fishers, flat, sizes, num_refs, mine)
    cuda_backend.delta_stats(post, pre, fishers, flat, sizes, num_refs, again)
    assert_stats_close(mine, ref, exact=granularity == 1)
    assert_stats_close(mine, again, exact=True)


def test_the_plan_of_a_7b_model_is_built_once(cuda_on_cpu, monkeypatch):
    """Full row mask of a 7B-shaped model (32 layers of 4096×4096 ×4 and 4096×11008 ×3):
    the first step plans its 6.4M tiles; the second finds them and plans nothing."""
    sizes = [4096] * (32 * 4) + [11008] * (32 * 2) + [4096] * 32
    counts = [4096] * (32 * 4) + [4096] * (32 * 2) + [11008] * 32
    calls = []
    real = cuda_on_cpu.plan_tiles

    class Counting:
        def __getattr__(self, name):
            return getattr(cuda_on_cpu, name)

        def plan_tiles(self, *args):
            calls.append(1)
            return real(*args)

    ext = Counting()
    t0 = time.perf_counter()
    tiles, n = cuda_backend.tile_plan(ext, sizes, counts, torch.device("cpu"))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again, n2 = cuda_backend.tile_plan(ext, sizes, counts, torch.device("cpu"))
    second = time.perf_counter() - t0
    elements = sum(b * k for b, k in zip(sizes, counts))
    assert elements > 6e9 and n == n2 and again is tiles and len(calls) == 1
    assert n == sum(k * -(-b // 1024) for b, k in zip(sizes, counts))
    assert second < first / 100, (first, second)
    print(f"7B plan: {n:,} tiles, first step {first * 1e3:.0f} ms, second {second * 1e6:.0f} µs")


def test_capability_check():
    ok = cuda_backend.supported_capability
    assert ok("80;90", (8, 0)) and ok("80;90", (8, 6)) and ok("80;90", (8, 9))
    assert ok("80;90", (9, 0)) and ok("80;90", (10, 0))      # PTX of 9.0, compiled by the driver
    assert not ok("80;90", (7, 5)) and not ok("80;90", (7, 0))
    assert ok("80;90a", (9, 0)) and not ok("80;90a", (10, 0)) and not ok("90a", (8, 0))


def test_a_gpu_without_code_in_the_build_is_refused(monkeypatch):
    class Built:
        ARCHS = "80;90"

        @staticmethod
        def device_count():
            return 1

    from trace_kernels import _native

    monkeypatch.setattr(_native, "load", lambda name: Built() if name == "_cuda" else None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    why = cuda_backend.unavailable_reason()
    assert "compute capability 7.5" in why and "sm_80, sm_90" in why


def test_the_host_build_lays_out_the_tables_as_the_device_build(host_ext):
    """The structs the host build packs are the ones the nvcc build reads."""
    from trace_kernels import _native

    ext = _native.load("_cuda")
    if ext is None:
        pytest.skip("trace_kernels._cuda not built (no nvcc)")
    for name in ("MASKED_TENSOR_BYTES", "TILE_BYTES", "STATS_TENSOR_BYTES", "STATS_ITEM_BYTES",
                 "STATS_SPLIT_BYTES", "MASKED_FIELDS", "STATS_FIELDS", "MAX_REFS", "TILE"):
        assert getattr(ext, name) == getattr(host_ext, name), name


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("granularity", [1, "row"])
def test_masters_and_stochastic_rounding(cuda_on_cpu, gen, rounding, granularity):
    """fp32 masters of bf16 cores (the scalar and the vector path) and stochastic rounding
    keyed by seed, step and element: the reference's bits."""
    shapes = [(5, 1028), (3, 1027), (37, 129), (1001,)]
    prob = make_problem(shapes, [granularity] * 4, 0.5, torch.bfloat16, gen)
    sizes = [i.numel() * b for i, b in zip(prob["idx"], prob["sizes"])]
    masters = [torch.randn(n, generator=gen) * 0.5 for n in sizes]
    ref, mine = clone_problem(prob), clone_problem(prob)
    mref, mmine = [m.clone() for m in masters], [m.clone() for m in masters]
    for P, M, impl in ((ref, mref, reference), (mine, mmine, cuda_backend)):
        run(P, impl, masters=M, elem_bases=[0, 9, 0, 3], stochastic=rounding == "stochastic", seed=7)
    assert_same(mine, ref, ("params", "m", "v", "steps"))
    for i, (a, b) in enumerate(zip(mmine, mref)):
        assert_bits_equal(a, b, f"masters[{i}]")
