"""Shared helpers of the microbenchmarks: LLM-shaped tensors, interleaved timing, reports."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"

# One decoder layer of a ~1B-parameter model (hidden 2048, MLP 5632) plus a slice of an
# output head: 64.0M elements in the shapes an LLM optimizer step really sees.
LLM_SHAPES = {
    "attn.q_proj": (2048, 2048),
    "attn.k_proj": (2048, 2048),
    "attn.v_proj": (2048, 2048),
    "attn.o_proj": (2048, 2048),
    "mlp.gate_proj": (5632, 2048),
    "mlp.up_proj": (5632, 2048),
    "mlp.down_proj": (2048, 5632),
    "lm_head.slice": (6144, 2048),
}


def scaled_shapes(scale: float) -> dict[str, tuple[int, int]]:
    """LLM_SHAPES with the row count scaled (for quick runs); row length kept."""
    return {n: (max(1, int(r * scale)), c) for n, (r, c) in LLM_SHAPES.items()}


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from trace_kernels import _native

        ext = _native.load("_C")
        info["isa_clone"] = ext.isa_levels()[0] if ext else "no native build"
    except Exception:  # noqa: BLE001 - the report must not fail on this
        pass
    return info


def interleaved_medians(cases: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict:
    """Run every case once per round, in the same order, and return per case the median
    and spread of its times: drift of a noisy machine hits all cases alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {
        name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "rounds": len(ts)}
        for name, ts in times.items()
    }


def paired_ratios(baseline: Callable[[], None], cases: dict[str, Callable[[], None]], rounds: int,
                  warmup: int = 2) -> dict:
    """Time each case right after a run of `baseline`, every round, and report per case the
    median of those per-pair ratios (plus median times). On a machine whose speed drifts
    from one second to the next, a ratio of two adjacent runs is far steadier than a ratio
    of two medians taken at different moments."""
    for fn in (baseline, *cases.values()):
        for _ in range(warmup):
            fn()
    out = {}
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            baseline()
            t1 = time.perf_counter()
            fn()
            t2 = time.perf_counter()
            pairs[name].append((t1 - t0, t2 - t1))
    for name, ps in pairs.items():
        base = [b for b, _ in ps]
        mine = [m for _, m in ps]
        ratios = [m / b for b, m in ps]
        out[name] = {
            "median_s": statistics.median(mine), "min_s": min(mine), "max_s": max(mine),
            "baseline_median_s": statistics.median(base),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rounds": len(ps),
        }
    return out


def stream_bandwidth(numel: int, rounds: int = 9) -> float:
    """Measured bytes/s of a large parallel fp32 stream ``c = a + b`` (two reads and one
    write counted, as STREAM's add): the memory ceiling of an elementwise step."""
    a, b = torch.randn(numel), torch.randn(numel)
    c = torch.empty_like(a)
    t = interleaved_medians({"add": lambda: torch.add(a, b, out=c)}, rounds)["add"]["median_s"]
    return 3 * 4 * numel / t


def write_report(stem: str, payload: dict, table: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(table) + "\n")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"


def numel_of(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def naive_masked_step(params: list[torch.Tensor], opt: torch.optim.Optimizer,
                      dense_masks: list[torch.Tensor]) -> Callable[[], None]:
    """The usual workaround for training a subset, given its best shot: save the weights
    into preallocated buffers, take a full optimizer step, put the frozen elements back
    with torch.where in place."""
    saved = [torch.empty_like(p) for p in params]

    def step() -> None:
        with torch.no_grad():
            for buf, p in zip(saved, params):
                buf.copy_(p)
        opt.step()
        with torch.no_grad():
            for p, old, m in zip(params, saved, dense_masks):
                torch.where(m, p, old, out=p)

    return step
