"""The native build, the fallback without it, the report, and torch.library registration."""

import os
import subprocess
import sys

import pytest
import torch

from trace_kernels import _native, backends, ops


def test_cpu_extension_built_when_required():
    # CI sets TRACE_KERNELS_REQUIRE_CPU=1: a silently failed native build must fail the suite.
    if os.environ.get("TRACE_KERNELS_REQUIRE_CPU") == "1":
        assert _native.load("_C") is not None, _native.error("_C")
        assert backends.choose("cpu").name == "cpu"
    ext = _native.load("_C")
    if ext is not None:
        from trace_kernels.backends import _layout

        # the rows Python builds are the rows the binding reads
        assert ext.MASKED_FIELDS == _layout.MASKED_FIELDS
        assert ext.STATS_FIELDS == _layout.STATS_FIELDS
        assert ext.MAX_REFS == ops.MAX_REFS
        assert ext.isa_levels()[-1] == "default"


def test_report_runs():
    out = subprocess.run([sys.executable, "-m", "trace_kernels"], capture_output=True, text=True,
                         check=True).stdout
    assert "trace_kernels" in out and "backend for cpu" in out


def test_fallback_without_native_build(monkeypatch):
    """A checkout whose build failed still imports and says only reference is available."""
    monkeypatch.setitem(_native._modules, "_C", None)
    monkeypatch.setitem(_native._errors, "_C", "ImportError: simulated")
    backends._choose.cache_clear()
    try:
        choice = backends.choose("cpu")
        assert choice.name == "reference" and "simulated" in choice.reason
        with pytest.raises(backends.BackendUnavailableError, match="not built"):
            backends.choose("cpu", "cpu")
        from trace_kernels import report

        assert "only the pure-PyTorch reference backend" in report()
    finally:
        backends._choose.cache_clear()


def test_registered_with_torch_library():
    op = torch.ops.trace_kernels.masked_adamw_.default
    schema = str(op._schema)
    assert "Tensor(a0!)[] params" in schema or "Tensor(a!)[] params" in schema


def test_works_under_torch_compile(gen):
    """The fake implementation lets torch.compile trace a step that calls the op."""
    p = torch.randn(6, 8, generator=gen)
    g = torch.randn(6, 8, generator=gen)
    idx = torch.tensor([1, 4], dtype=torch.int32)
    m, v, step = torch.zeros(16), torch.zeros(16), torch.tensor(0.0)
    expected = [t.clone() for t in (p, m, v, step)]
    ops.masked_adamw_([expected[0]], [g], [expected[1]], [expected[2]], [], [idx], [8],
                      [expected[3]], lr=1e-2)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step_fn(p, g, m, v, step):
        ops.masked_adamw_([p], [g], [m], [v], [], [idx], [8], [step], lr=1e-2)

    step_fn(p, g, m, v, step)
    for a, b in zip((p, m, v, step), expected):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without a GPU")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_require_a_gpu_backend_checks_a_gpu(name):
    out = subprocess.run([sys.executable, "-m", "trace_kernels", "--require", name],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "no CUDA device is visible" in out.stderr


def test_gpu_check_script_parses_and_dry_runs():
    """bench/gpu_check.sh, run once on a lent GPU machine, must not fail on a typo there."""
    from pathlib import Path

    script = Path(__file__).parents[2] / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, check=True).stdout
    for step in ("trace_kernels --require cuda", "pytest -q -m gpu", "bench/bench_gpu.py",
                 "bench/bench_train_step.py --device cuda"):
        assert step in out, step
    for path in ("bench/bench_gpu.py", "bench/bench_train_step.py"):
        assert (script.parents[1] / path).is_file()


def test_every_backend_registers_its_kernels():
    from trace_kernels.backends import registry

    assert set(registry.NAMES) == set(backends.REGISTRY)
    for name in registry.NAMES:  # each finds a kernel of every op (its own or the reference's)
        assert all(registry.kernel(op, name) is not None for op in registry.OPS if op != "plan_masked_adamw")
    assert registry.kernel("plan_masked_adamw", "cpu") is not None
    assert registry.kernel("plan_masked_adamw", "reference") is None
