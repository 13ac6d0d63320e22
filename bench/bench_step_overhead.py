"""The fixed cost of one optimizer step: 1, 100 and 1,000 tiny parameters (64 elements,
half of them in the core), where the arithmetic is nothing and what is left is Python and
dispatch. MaskedAdamW (its plan kept from step to step) against the same optimizer
re-planning every step (what each step paid before plans were kept) and torch's fused
AdamW.

    python bench/bench_step_overhead.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved_medians, machine, write_report  # noqa: E402

from trace_kernels import MaskedAdamW  # noqa: E402


def setup(n: int):
    g = torch.Generator().manual_seed(n)
    params = [torch.nn.Parameter(torch.randn(64, generator=g)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(64, generator=g)
    masks = {p: torch.rand(64, generator=g) < 0.5 for p in params}
    return params, masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    rows = []
    for n in (1, 100, 1000):
        params, masks = setup(n)
        planned = MaskedAdamW(params, lr=1e-4, masks=masks, backend="cpu")
        p2, m2 = setup(n)
        replanned = MaskedAdamW(p2, lr=1e-4, masks=m2, backend="cpu")
        p3, _ = setup(n)
        fused = torch.optim.AdamW(p3, lr=1e-4, fused=True)

        def replan():
            replanned._plans.clear()
            replanned.step()

        rounds = max(20, args.rounds // max(1, n // 100))
        times = interleaved_medians({"planned": planned.step, "replanned": replan, "fused": fused.step}, rounds)
        rows.append({"params": n, "rounds": rounds,
                     **{k: v["median_s"] * 1e6 for k, v in times.items()}})
    info = machine()
    table = ["# Fixed cost of an optimizer step (CPU)", "",
             f"Parameters of 64 fp32 elements, half of each in the core (element level); median "
             f"microseconds per step over interleaved rounds; {info['cpu']}, {info['threads']} threads.", "",
             "| parameters | MaskedAdamW, planned (µs) | per parameter (µs) | re-planned every step (µs) | "
             "torch fused AdamW (µs) |", "|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['params']:,} | {r['planned']:.1f} | {r['planned'] / r['params']:.2f} | "
                     f"{r['replanned']:.1f} | {r['fused']:.1f} |")
    write_report("step_overhead_cpu", {"machine": info, "rows": rows}, table)
    print("\n".join(table))


if __name__ == "__main__":
    main()
