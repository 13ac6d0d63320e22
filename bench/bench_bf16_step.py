"""The masked step on bf16 parameters with fp32 master values of the core against without
(plain rounding), at 5 % row and element level, on the LLM-shaped tensors of
bench_adamw.py (scaled by --scale): paired ratios in one run, and the state bytes.

    python bench/bench_bf16_step.py [--scale 0.5] [--rounds 15]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_adamw import random_mask  # noqa: E402
from common import machine, numel_of, paired_ratios, scaled_shapes, write_report  # noqa: E402

from trace_kernels import MaskedAdamW  # noqa: E402


def optimizer(shapes, mask, masters: bool, rounding: str = "nearest"):
    gen = torch.Generator().manual_seed(0)
    params = {n: torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).bfloat16()) for n, s in shapes.items()}
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen).bfloat16()
    opt = MaskedAdamW(list(params.items()), lr=2e-5, masks=mask, master_weights=masters, rounding=rounding,
                      seed=1 if rounding == "stochastic" else None)
    opt.step()  # state made
    return opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    shapes = scaled_shapes(args.scale)
    numel = numel_of(shapes)
    rows = []
    for granularity in ("row", "element"):
        mask = random_mask(shapes, 0.05, granularity, torch.Generator().manual_seed(1))
        plain = optimizer(shapes, mask, False)
        masters = optimizer(shapes, mask, True)
        sr = optimizer(shapes, mask, False, "stochastic")
        r = paired_ratios(plain.step, {"masters": masters.step, "stochastic": sr.step}, args.rounds)
        rows.append({"granularity": granularity, "core_elements": mask.numel_selected,
                     "plain_s": r["masters"]["baseline_median_s"], "masters_s": r["masters"]["median_s"],
                     "masters_ratio": r["masters"]["ratio"], "stochastic_ratio": r["stochastic"]["ratio"],
                     "plain_state": plain.state_bytes(), "masters_state": masters.state_bytes()})
    info = machine()
    table = ["# Masked step on bf16 parameters: fp32 masters of the core against plain rounding", "",
             f"{numel / 1e6:.1f}M bf16 elements in LLM shapes, 5 % cores; ratios are medians of "
             f"paired runs ({args.rounds} rounds) against the plain-rounding step; {info['cpu']}, "
             f"{info['threads']} threads.", "",
             "| core | plain step (ms) | masters (ms) | masters × plain | stochastic rounding × plain | "
             "state, plain (MiB) | state, masters (MiB) | extra bytes per core element |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = (r["masters_state"]["total"] - r["plain_state"]["total"]) / r["core_elements"]
        table.append(f"| {r['granularity']} 5 % | {r['plain_s'] * 1e3:.1f} | {r['masters_s'] * 1e3:.1f} | "
                     f"{r['masters_ratio']:.2f} | {r['stochastic_ratio']:.2f} | "
                     f"{r['plain_state']['total'] / 2**20:.1f} | {r['masters_state']['total'] / 2**20:.1f} | "
                     f"{extra:.2f} |")
    write_report("bf16_step_cpu", {"machine": info, "rows": rows}, table)
    print("\n".join(table))


if __name__ == "__main__":
    main()
