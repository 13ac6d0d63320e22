"""GPU-only checks (`pytest -m gpu` on a machine with CUDA; skipped elsewhere): each GPU
backend against the reference and against each other, and MaskedAdamW with a full mask
against torch.optim.AdamW(fused=True)."""

import copy
import pytest
import torch

from helpers import (assert_bits_equal, block_sizes_for, clone_problem, make_problem,
                     train_side_by_side)
from helpers import assert_stats_close, fisher_problem, stats_problem
from trace_kernels import CoreMask, MaskedAdamW, backends, ops

pytestmark = pytest.mark.gpu
SHAPES = [(37, 129), (1001,), (0, 16), (5, 17), (3, 2050)]


def gpu_backend(name):
    try:
        backends.choose("cuda", name)
    except backends.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    return name


@pytest.fixture(params=["cuda", "triton"])
def backend(request):
    return gpu_backend(request.param)


def on_gpu(prob):
    return {k: [t.cuda() for t in v] if k not in ("sizes", "steps") else v for k, v in prob.items()}


def run(prob, name, **kw):
    args = dict(lr=1e-2, weight_decay=0.01)
    args.update(kw)
    for _ in range(3):
        ops.masked_adamw_(prob["params"], prob["grads"], prob["m"], prob["v"], prob["vmax"],
                          prob["idx"], prob["sizes"], prob["steps"], backend=name, **args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
@pytest.mark.parametrize("granularity", [1, "row", "tensor"])
def test_masked_adamw_matches_reference(backend, gen, dtype, density, granularity):
    prob = on_gpu(make_problem(SHAPES, [granularity] * 5, density, dtype, gen, amsgrad=density == 0.3))
    ref, mine = clone_problem(prob), clone_problem(prob)
    run(ref, "reference", amsgrad=density == 0.3)
    run(mine, backend, amsgrad=density == 0.3)
    for key in ("params", "m", "v", "vmax", "steps"):
        for i, (a, b) in enumerate(zip(mine[key], ref[key])):
            assert_bits_equal(a.cpu(), b.cpu(), f"{key}[{i}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_vector_path_matches_reference(backend, gen, dtype, amsgrad):
    """Rows and tensors whose length is a multiple of 4 take the CUDA kernel's 16-byte
    vector path; lengths with a tail of 1-3 and misaligned rows mix it with the scalar one."""
    shapes = [(9, 256), (5, 1028), (3, 1027), (2, 4099), (6150,)]
    prob = on_gpu(make_problem(shapes, ["row", "row", "row", "tensor", "tensor"], 0.6, dtype, gen,
                               amsgrad=amsgrad))
    ref, mine = clone_problem(prob), clone_problem(prob)
    run(ref, "reference", amsgrad=amsgrad)
    run(mine, backend, amsgrad=amsgrad)
    for key in ("params", "m", "v", "vmax", "steps"):
        for i, (a, b) in enumerate(zip(mine[key], ref[key])):
            assert_bits_equal(a.cpu(), b.cpu(), f"{key}[{i}]")


@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lr_on_gpu", [False, True])
def test_lr_and_steps_in_device_memory(gen, step_dtype, lr_on_gpu):
    """Steps kept on the GPU and an lr tensor there are read by the CUDA kernel (no host
    synchronisation) and give the bits of host steps and a float lr."""
    gpu_backend("cuda")
    prob = on_gpu(make_problem(SHAPES, [1, "row", 1, 17, "tensor"], 0.5, torch.float32, gen,
                               amsgrad=True))
    ref, mine = clone_problem(prob), clone_problem(prob)
    mine["steps"] = [st.to("cuda", step_dtype) for st in mine["steps"]]
    lr = torch.tensor(1e-2, dtype=torch.float64, device="cuda") if lr_on_gpu else 1e-2
    run(ref, "reference", amsgrad=True, lr=1e-2)
    run(mine, "cuda", amsgrad=True, lr=lr)
    for key in ("params", "m", "v", "vmax"):
        for i, (a, b) in enumerate(zip(mine[key], ref[key])):
            assert_bits_equal(a.cpu(), b.cpu(), f"{key}[{i}]")
    assert [float(st) for st in mine["steps"]] == [float(st) for st in ref["steps"]]
    found = clone_problem(mine)
    run(found, "cuda", amsgrad=True, lr=lr, found_inf=torch.tensor(1.0, device="cuda"))
    assert [float(st) for st in found["steps"]] == [float(st) for st in mine["steps"]]


@pytest.mark.parametrize("variant", [dict(maximize=True), dict(grad_scale=torch.tensor(64.0)),
                                     dict(found_inf=torch.tensor(1.0), grad_scale=torch.tensor(2.0))])
def test_masked_adamw_flags(backend, gen, variant):
    variant = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in variant.items()}
    prob = on_gpu(make_problem(SHAPES, [1, "row", 1, 17, 2050], 0.5, torch.float32, gen))
    ref, mine = clone_problem(prob), clone_problem(prob)
    run(ref, "reference", **variant)
    run(mine, backend, **variant)
    for key in ("params", "m", "v", "steps"):
        for i, (a, b) in enumerate(zip(mine[key], ref[key])):
            assert_bits_equal(a.cpu(), b.cpu(), f"{key}[{i}]")


def test_cuda_and_triton_agree(gen):
    gpu_backend("cuda")
    gpu_backend("triton")
    prob = on_gpu(make_problem(SHAPES, [1, "row", 3, 17, "tensor"], 0.4, torch.bfloat16, gen))
    a, b = clone_problem(prob), clone_problem(prob)
    run(a, "cuda")
    run(b, "triton")
    for key in ("params", "m", "v"):
        for i, (x, y) in enumerate(zip(a[key], b[key])):
            assert_bits_equal(x.cpu(), y.cpu(), f"{key}[{i}]")


def test_adamw_fisher_matches_reference(backend, gen):
    prob = fisher_problem(gen, torch.float32, amsgrad=True)
    prob = {k: [t.cuda() if k != "steps" else t for t in v] for k, v in prob.items()}
    ref = {k: [t.clone() for t in v] for k, v in prob.items()}
    mine = {k: [t.clone() for t in v] for k, v in prob.items()}
    for P, name in ((ref, "reference"), (mine, backend)):
        ops.adamw_fisher_(P["params"], P["grads"], P["m"], P["v"], P["vmax"], P["f"], P["steps"],
                          lr=1e-2, amsgrad=True, fisher_scale=0.5, backend=name)
    for key in prob:
        for i, (a, b) in enumerate(zip(mine[key], ref[key])):
            assert_bits_equal(a.cpu(), b.cpu(), f"{key}[{i}]")


@pytest.mark.parametrize("num_refs", [0, 2])
@pytest.mark.parametrize("granularity", [1, 7, "row", "tensor"])
def test_delta_stats_matches_reference(backend, gen, num_refs, granularity):
    shapes = [(37, 129), (0, 8), (3, 40000), (7,)]
    post, pre, fishers, refs = stats_problem(gen, shapes, num_refs)
    sizes = block_sizes_for(shapes, granularity)
    ref = ops.delta_stats(post, pre, fishers, refs, sizes, backend="reference")
    g = [[x.cuda() for x in xs] for xs in (post, pre, fishers)]
    mine = ops.delta_stats(*g, [[r.cuda() for r in rs] for rs in refs], sizes, backend=backend)
    again = ops.delta_stats(*g, [[r.cuda() for r in rs] for rs in refs], sizes, backend=backend)
    assert_stats_close([t.cpu() for t in mine[:4]], ref, exact=granularity == 1)
    assert_stats_close(mine, again, exact=True)


@pytest.mark.parametrize("name", ["cuda", "triton", "reference"])
def test_full_mask_matches_torch_fused_adamw_on_cuda(name):
    if name != "reference":
        gpu_backend(name)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 64)).cuda()
    ref = copy.deepcopy(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    opt = MaskedAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.01,
                      masks=CoreMask.full(shapes, "row"), backend=name)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    x = torch.randn(32, 256, device="cuda")
    train_side_by_side(((model, opt), (ref, ropt)), x, 7)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert ((p - q).norm() / q.norm()).item() < 1e-6


def test_backend_choice_on_cuda():
    assert backends.choose("cuda").name in ("cuda", "triton", "reference")


def _mlp(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 8)).to(device)


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_a_step_without_amp_never_waits_for_the_gpu(name):
    """After the first step (which plans), a MaskedAdamW step makes no host synchronisation;
    with AMP, at most one (found_inf, for host step counters)."""
    gpu_backend(name)
    import warnings

    model = _mlp("cuda")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    opt = MaskedAdamW(model.named_parameters(), lr=1e-3, masks=CoreMask.full(shapes, "row"), backend=name)
    x = torch.randn(16, 64, device="cuda")
    model(x).square().mean().backward()
    opt.step()  # plans and caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    scaler = torch.amp.GradScaler("cuda")
    scaler.scale(model(x).square().mean()).backward()
    scaler.unscale_(opt)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            opt.grad_scale, opt.found_inf = None, torch.zeros((), device="cuda")
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        del opt.grad_scale, opt.found_inf
    assert sum("synchroniz" in str(w.message) for w in seen) <= 1


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_tensors_on_another_device_than_the_current_one(gen, name):
    """Parameters on cuda:1 while cuda:0 is current: the kernels run there, on its stream."""
    gpu_backend(name)
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    prob = make_problem(SHAPES, [1, "row", 1, 17, 2050], 0.5, torch.float32, gen)
    ref = clone_problem(prob)
    mine = {k: [t.to("cuda:1") for t in v] if k not in ("sizes", "steps") else v for k, v in prob.items()}
    run(ref, "reference")
    with torch.cuda.device(0):
        run(mine, name)
    for key in ("params", "m", "v"):
        for i, (a, b) in enumerate(zip(mine[key], ref[key])):
            assert_bits_equal(a.cpu(), b, f"{key}[{i}]")


def test_found_inf_of_two_devices_skips_and_keeps_device_steps(gen):
    """GradScaler's found_inf is a sum over devices (2.0): the step is skipped and steps kept
    on the GPU stay where they were."""
    gpu_backend("cuda")
    prob = on_gpu(make_problem(SHAPES, ["row"] * 5, 0.5, torch.float32, gen))
    prob["steps"] = [s.cuda() for s in prob["steps"]]
    before = clone_problem(prob)
    run(prob, "cuda", found_inf=torch.tensor(2.0, device="cuda"))
    for key in ("params", "m", "v", "steps"):
        for i, (a, b) in enumerate(zip(prob[key], before[key])):
            assert_bits_equal(a.cpu(), b.cpu(), f"{key}[{i}]")


def test_sampled_dot_on_cuda_equals_the_dense_product():
    gen = torch.Generator().manual_seed(11)
    a, b = torch.randn(37, 1031, generator=gen), torch.randn(53, 1031, generator=gen)
    rows, cols = torch.randint(0, 37, (5001,), generator=gen), torch.randint(0, 53, (5001,), generator=gen)
    got = ops.sampled_dot(a.cuda(), b.cuda(), rows.cuda(), cols.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), (a.double() @ b.double().t())[rows, cols].float(), rtol=1e-5, atol=1e-4)
