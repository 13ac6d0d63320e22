"""Every GPU kernel variant the project launches, compiled for real GPU targets on a machine
without a GPU, with its registers, spills, stack and shared memory.

Triton: the Triton backend's own launch code runs on CPU tensors with a stand-in driver
that only names the target (sm_80 or sm_90); Triton's compile hook turns each launch into
an ahead-of-time compile with exactly the types, specialisations and constexprs the
backend passes, and ptxas (Triton's own, with Triton's flags) reports resources.
CUDA: csrc/cuda/kernels.cu through nvcc with --resource-usage and the spill and
local-memory warnings.

    python tools/gpu_compile_report.py [--quick] [--archs 80,90] [--out bench/results/gpu_compile]

A variant fails the check on a compile error, any spill, any local memory (CUDA), or a
fused multiply-add in the PTX of a kernel that promises bit-exactness (the AdamW step).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BIT_EXACT = {"masked_adamw_kernel"}   # no FMA contraction allowed in their PTX


@dataclass
class Variant:
    kernel: str
    arch: int
    constants: dict
    signature: dict
    registers: int | None = None
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    fma: int = 0
    error: str | None = None
    keys: set = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return (self.error is None and self.spill_stores == 0 and self.spill_loads == 0
                and not (self.kernel in BIT_EXACT and self.fma))


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for `arch` (it picks a newer one from sm_90 on)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


PTXAS_USED = re.compile(r"Used (\d+) registers")
PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spills and stack of a PTX module, by ptxas with Triton's own flags."""
    name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([_ptxas(arch), "-lineinfo", "--fmad=false", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={name}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    log = out.stderr + out.stdout
    used, spill, stack = PTXAS_USED.search(log), PTXAS_SPILL.search(log), PTXAS_STACK.search(log)
    return {"registers": int(used.group(1)) if used else None,
            "spill_stores": int(spill.group(1)) if spill else 0,
            "spill_loads": int(spill.group(2)) if spill else 0,
            "stack": int(stack.group(1)) if stack else 0}


def count_fma(ptx: str) -> int:
    return len(re.findall(r"\bfma\.rn\.f32\b|\bfma\.rn\.f64\b", ptx))


class StandInDriver:
    """Only what a launch asks of the driver before it compiles: device 0, stream 0, and
    the target to compile for."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


@contextlib.contextmanager
def compiling_for(arch: int, found: list[Variant]):
    """Launches of the Triton backend become compiles for `arch`, recorded in `found`."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.runtime.driver import driver

    from trace_kernels.backends.triton import kernels

    seen: set = set()

    target = StandInDriver(arch).target

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        jit = fn.jit_function
        name = fn.name
        if (name, str(key), arch) in seen:
            return True
        seen.add((name, str(key), arch))
        constexprs = compile["constants"]
        named = {jit.arg_names[p[0]] if isinstance(p, tuple) else p: x for p, x in constexprs.items()}
        v = Variant(name, arch, {k: str(x) for k, x in named.items()}, dict(compile["signature"]))
        options = {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion",
                                           "launch_cooperative_grid") if compile.get(k) is not None}
        v.constants["num_warps"] = str(options.get("num_warps"))
        try:
            src = ASTSource(jit, compile["signature"], constexprs, compile["configs"][0])
            compiled = triton.compile(src, target=target, options=options)
            ptx = compiled.asm["ptx"]
            for k2, val in ptxas_report(ptx, arch).items():
                setattr(v, k2, val)
            v.shared = int(compiled.metadata.shared)
            v.fma = count_fma(ptx)
        except Exception as exc:  # noqa: BLE001 - every failure is a result
            v.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        found.append(v)
        return True  # compiled here: the runtime neither compiles nor launches

    old_hook, old_driver = knobs.runtime.jit_cache_hook, driver._active
    knobs.runtime.jit_cache_hook = hook
    driver.set_active(StandInDriver(arch))
    for jit in (kernels.masked_adamw_kernel, kernels.delta_stats_kernel, kernels.sum_partials_kernel):
        jit.device_caches.clear()
    try:
        yield
    finally:
        knobs.runtime.jit_cache_hook = old_hook
        driver._active = old_driver  # reset_active() would look for a real GPU driver
        for jit in (kernels.masked_adamw_kernel, kernels.delta_stats_kernel, kernels.sum_partials_kernel):
            jit.device_caches.clear()


def adamw_cases(quick: bool):
    """(dtype, block size kind, index dtype, amsgrad, fisher, master, rounding) to launch."""
    import torch

    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    grans = ("element", "odd", "row", "tensor")
    for dtype, gran, idx64, ams, fisher, master, sr in itertools.product(
            dtypes, grans, (False, True), (False, True), (False, True), (False, True), (False, True)):
        if master and dtype == torch.float32 or sr and dtype != torch.bfloat16 or fisher and master:
            continue
        if quick and (idx64 and gran != "element" or (ams and fisher) or (master and sr)):
            continue
        yield dtype, gran, idx64, ams, fisher, master, sr


def stats_cases(quick: bool):
    import torch

    for dtype, R, gran, pre, fisher in itertools.product(
            (torch.float32, torch.bfloat16, torch.float16), (0, 1, 3, 16), (1, 7, "row", "tensor", 20000),
            (False, True), (False, True)):
        if quick and (R in (1, 3) and gran not in (1, "tensor") or (pre != fisher)):
            continue
        yield dtype, R, gran, pre, fisher


def launch_all(quick: bool) -> None:
    """Call the Triton backend the way ops does, for every case (CPU tensors stand in)."""
    import torch

    from trace_kernels.backends import triton as tb

    shape = (6, 1030)
    for dtype, gran, idx64, ams, fisher, master, sr in adamw_cases(quick):
        numel = shape[0] * shape[1]
        B = {"element": 1, "odd": 5, "row": shape[1], "tensor": numel}[gran]
        if gran == "odd":
            numel_shape = (5 * 207,)
            B = 5
        else:
            numel_shape = shape
        n = int(torch.tensor(numel_shape).prod())
        p = torch.zeros(numel_shape, dtype=dtype)
        g = torch.zeros_like(p)
        idx = torch.arange(0, n // B, 2, dtype=torch.int64 if idx64 else torch.int32)
        k = idx.numel() * B
        state = [torch.zeros(k) for _ in range(4)]
        steps = [torch.tensor(1.0)]
        if fisher:  # the probe's dense step: one block spanning the tensor
            tb.adamw_fisher_([p], [g], state[:1], state[1:2], state[2:3] if ams else [], [torch.zeros(n)],
                             steps, fisher_scale=1.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                             weight_decay=0.0, amsgrad=ams, maximize=False, grad_scale=None,
                             found_inf=None, masters=[], elem_bases=[], stochastic=sr, seed=1)
        else:
            tb.masked_adamw_([p], [g], state[:1], state[1:2], state[2:3] if ams else [], [idx], [B], steps,
                             lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=ams,
                             maximize=False, grad_scale=torch.tensor(2.0), found_inf=None,
                             masters=[state[3]] if master else [], elem_bases=[0], stochastic=sr, seed=1)
    for dtype, R, gran, pre, fisher in stats_cases(quick):
        shapes = [(37, 129), (3, 40000)]
        post = [torch.zeros(s, dtype=dtype) for s in shapes]
        sizes = []
        for s in shapes:
            n = s[0] * s[1]
            b = {"row": s[1], "tensor": n}.get(gran, gran)
            sizes.append(b if n % b == 0 else 1)
        refs = [torch.zeros(s, dtype=dtype) for s in shapes for _ in range(R)]
        rows = sum(s[0] * s[1] // b for s, b in zip(shapes, sizes))
        outs = (torch.zeros(rows), torch.zeros(rows), torch.zeros(rows, R), torch.zeros(rows, R))
        tb.delta_stats(post, [torch.zeros_like(t) for t in post] if pre else [],
                       [torch.zeros(t.numel()) for t in post] if fisher else [], refs, sizes, R, outs)


def triton_report(archs: list[int], quick: bool) -> list[Variant]:
    os.environ.pop("TRITON_INTERPRET", None)
    found: list[Variant] = []
    for arch in archs:
        with compiling_for(arch, found):
            launch_all(quick)
    return found


NVCC_RESOURCES = re.compile(r"Function properties for (\S+)|Used (\d+) registers|(\d+) bytes lmem|"
                            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def cuda_report(archs: list[int]) -> tuple[list[dict], str]:
    """nvcc --resource-usage of kernels.cu with the spill and local-memory warnings: one row
    per kernel and architecture; the raw log."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        return [], "nvcc not found"
    rows, logs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            cmd = [nvcc, "-O3", "-std=c++17", "-fmad=false", "--resource-usage",
                   "-Xptxas", "-warn-spills,-warn-lmem-usage", f"-I{ROOT / 'csrc' / 'include'}",
                   "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-c",
                   str(ROOT / "csrc" / "cuda" / "kernels.cu"), "-o", str(Path(tmp) / "k.o")]
            out = subprocess.run(cmd, capture_output=True, text=True)
            log = out.stdout + out.stderr
            logs.append(log)
            current = None
            for line in log.splitlines():
                m = re.search(r"Compiling entry function '(\S+)'|Function properties for (\S+)", line)
                if m:
                    current = {"kernel": _demangle(m.group(1) or m.group(2)), "arch": arch, "registers": None,
                               "lmem": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0,
                               "warnings": [], "error": None if out.returncode == 0 else "nvcc failed"}
                    rows.append(current)
                    continue
                if current is None:
                    continue
                if (r := re.search(r"REG:(\d+)", line)) or (r := re.search(r"Used (\d+) registers", line)):
                    current["registers"] = int(r.group(1))
                if s := re.search(r"STACK:(\d+)", line):
                    current["stack"] = int(s.group(1))
                if s := re.search(r"LOCAL:(\d+)", line):
                    current["lmem"] = int(s.group(1))
                if s := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
                    current["spill_stores"], current["spill_loads"] = int(s.group(1)), int(s.group(2))
                if "warning" in line.lower() and ("spill" in line.lower() or "lmem" in line.lower()
                                                  or "local memory" in line.lower()):
                    current["warnings"].append(line.strip())
            if out.returncode:
                rows.append({"kernel": "<nvcc>", "arch": arch, "error": log[-2000:], "registers": None,
                             "lmem": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0, "warnings": []})
    return rows, "\n".join(logs)


def _demangle(name: str) -> str:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return name
    return subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip() or name


def cuda_ok(row: dict) -> bool:
    return (not row.get("error") and row["lmem"] == 0 and row["spill_stores"] == 0
            and row["spill_loads"] == 0 and not row["warnings"])


def markdown(variants: list[Variant], cuda_rows: list[dict]) -> str:
    lines = ["# GPU kernels compiled without a GPU", "",
             "Every Triton variant the backend launches (its own launch code, a stand-in driver "
             "naming the target) compiled ahead of time, resources from ptxas with Triton's flags; "
             "the CUDA kernels through nvcc --resource-usage with the spill and local-memory "
             "warnings. A variant passes with no spill, no local memory and, for the bit-exact "
             "AdamW step, no fused multiply-add in its PTX.", ""]
    bad = [v for v in variants if not v.ok] + [r for r in cuda_rows if not cuda_ok(r)]
    lines.append(f"**{len(variants)} Triton variants, {len(cuda_rows)} CUDA kernels: "
                 f"{len(bad)} failing.**")
    lines += ["", "## Triton", "",
              "| kernel | arch | constexprs | registers | spill st/ld (B) | stack (B) | shared (B) | FMA | ok |",
              "|---|---|---|---|---|---|---|---|---|"]
    for v in sorted(variants, key=lambda v: (v.kernel, v.arch, -(v.registers or 0))):
        consts = ", ".join(f"{k}={x}" for k, x in v.constants.items()
                           if k in ("PDT", "IDT", "GATHER", "AMSGRAD", "FISHER", "HAS_MASTER", "STOCHASTIC",
                                    "R", "ROWS", "COLS", "HAS_PRE", "HAS_FISHER", "RDT", "WIDTH", "num_warps"))
        lines.append(f"| {v.kernel} | sm_{v.arch} | {consts} | {v.registers} | {v.spill_stores}/{v.spill_loads} "
                     f"| {v.stack} | {v.shared} | {v.fma} | {'yes' if v.ok else 'NO: ' + (v.error or 'spills/fma')} |")
    lines += ["", "## CUDA", "", "| kernel | arch | registers | local (B) | spill st/ld (B) | stack (B) | ok |",
              "|---|---|---|---|---|---|---|"]
    for r in cuda_rows:
        lines.append(f"| `{r['kernel'][:90]}` | sm_{r['arch']} | {r['registers']} | {r['lmem']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {'yes' if cuda_ok(r) else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--quick", action="store_true", help="a representative subset (CI)")
    ap.add_argument("--out", help="write <out>.md (and .json)")
    ap.add_argument("--no-cuda", action="store_true")
    args = ap.parse_args()
    archs = [int(a) for a in args.archs.split(",")]
    variants = triton_report(archs, args.quick)
    cuda_rows = [] if args.no_cuda else cuda_report(archs)[0]
    text = markdown(variants, cuda_rows)
    if args.out:
        import json

        Path(args.out + ".md").write_text(text)
        Path(args.out + ".json").write_text(json.dumps(
            {"triton": [v.__dict__ | {"keys": None} for v in variants], "cuda": cuda_rows}, indent=1, default=str))
    bad = [v for v in variants if not v.ok] + [r for r in cuda_rows if not cuda_ok(r)]
    print(text if len(text) < 20000 else text[:3000] + "\n…")
    print(f"{len(variants)} Triton variants, {len(cuda_rows)} CUDA kernels; {len(bad)} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
