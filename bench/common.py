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


def copy_bandwidth(numel: int, rounds: int = 9) -> float:
    """Measured bytes/s of a large fp32 copy (read + write counted): the memory ceiling."""
    src = torch.randn(numel)
    dst = torch.empty_like(src)
    t = interleaved_medians({"copy": lambda: dst.copy_(src)}, rounds)["copy"]["median_s"]
    return 2 * 4 * numel / t


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
