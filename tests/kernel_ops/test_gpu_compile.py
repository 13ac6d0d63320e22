"""GPU code proven as far as a machine without a GPU allows (tools/gpu_compile_report.py):
every Triton variant the backend launches, from a representative set, compiled for sm_80
and sm_90 through the backend's own launch code; the CUDA kernels through nvcc with the
spill and local-memory warnings. No compile error, no spill, no local memory, no fused
multiply-add in the bit-exact AdamW step."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))

pytest.importorskip("triton")
import gpu_compile_report as report  # noqa: E402

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


@pytest.mark.slow
def test_every_triton_variant_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    # A fresh process: this one imported triton in interpreter mode (tests/conftest.py).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, str(report.__file__), "--quick", "--no-cuda", "--archs", "80,90",
                          "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    variants = [report.Variant(**{k: v for k, v in row.items() if k != "keys"})
                for row in json.loads(out.with_suffix(".json").read_text())["triton"]]
    kernels = {v.kernel for v in variants}
    assert kernels == {"masked_adamw_kernel", "delta_stats_kernel", "sum_partials_kernel"}, run.stderr[-3000:]
    assert {v.arch for v in variants} == {80, 90}
    assert len(variants) >= 150
    bad = [(v.kernel, v.arch, v.constants, v.error, v.spill_stores, v.fma) for v in variants if not v.ok]
    assert not bad, bad
    assert all(v.registers for v in variants)
    assert run.returncode == 0, run.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="no nvcc")
def test_cuda_kernels_compile_without_spills_or_local_memory():
    rows, log = report.cuda_report([80, 90])
    assert rows, log[-3000:]
    assert {r["arch"] for r in rows} == {80, 90}
    bad = [r for r in rows if not report.cuda_ok(r)]
    assert not bad, bad
    names = " ".join(r["kernel"] for r in rows)
    assert "masked_adamw_kernel" in names and "delta_stats_kernel<16>" in names


def test_the_report_counts_fma_and_reads_ptxas():
    ptx = "fma.rn.f32 %f1, %f2, %f3, %f4;\nmul.rn.f32 %f5, %f6, %f7;\nfma.rn.f64 %fd1, %fd2, %fd3, %fd4;"
    assert report.count_fma(ptx) == 2
    v = report.Variant("masked_adamw_kernel", 90, {}, {}, registers=40, fma=1)
    assert not v.ok  # the bit-exact step may not contract
    assert report.Variant("delta_stats_kernel", 90, {}, {}, registers=40, fma=3).ok
