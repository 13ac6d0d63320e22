"""Masked AdamW step vs torch.optim.AdamW(fused=True) and vs the naive masked way.

On ~64M fp32 elements in LLM-shaped tensors, for densities 1/5/25/100 % at element and
row granularity, times (interleaved rounds, medians):
- torch fused dense: ``torch.optim.AdamW(fused=True).step()`` over all elements;
- masked: ``MaskedAdamW.step()`` updating only the selected elements;
- naive: the usual workaround, a full fused AdamW step, then ``torch.where`` to put the
  frozen elements back (the copy it needs included);
- DeepSpeed's CPUAdam (dense) where deepspeed is installed.
Reports ratios to torch fused dense, achieved bytes/s against a measured stream add, and
optimizer-state bytes against torch AdamW's 8 per element.

    python bench/bench_adamw.py            # full run, writes bench/results/adamw_cpu.{json,md}
    python bench/bench_adamw.py --quick    # small sizes, a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    fmt_bytes,
    naive_masked_step,
    paired_ratios,
    stream_bandwidth,
    machine,
    numel_of,
    scaled_shapes,
    write_report,
)

from trace_kernels import CoreMask, MaskedAdamW  # noqa: E402

DENSITIES = (0.01, 0.05, 0.25, 1.0)
GRANULARITIES = ("element", "row")
DENSE_BYTES_PER_ELEMENT = 28  # read p, g, m, v; write p, m, v (fp32)


def random_mask(shapes, density: float, granularity: str, gen: torch.Generator) -> CoreMask:
    if granularity == "element":
        return CoreMask.from_dense(
            {n: torch.rand(s, generator=gen) < density for n, s in shapes.items()}
        )
    blocks = {}
    for n, (rows, cols) in shapes.items():
        k = max(1, round(rows * density))
        sel = torch.zeros(rows, dtype=torch.bool)
        sel[torch.randperm(rows, generator=gen)[:k]] = True
        blocks[n] = ((rows, cols), cols, sel)
    return CoreMask.from_blocks(blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1/16 of the size, 3 rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default="adamw_cpu", help="file stem under bench/results/")
    args = ap.parse_args()
    shapes = scaled_shapes(1 / 16 if args.quick else 1.0)
    rounds = args.rounds or (3 if args.quick else 9)
    numel = numel_of(shapes)
    gen = torch.Generator().manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for n, s in shapes.items()}
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    named = list(params.items())

    dense = torch.optim.AdamW(list(params.values()), lr=1e-4, weight_decay=0.01, fused=True)
    cases = {}
    masked = {}
    for gran in GRANULARITIES:
        for d in DENSITIES:
            mask = random_mask(shapes, d, gran, gen)
            opt = MaskedAdamW(named, lr=1e-4, weight_decay=0.01, masks=mask)
            masked[(gran, d)] = (mask, opt)
            cases[f"masked_{gran}_{d:g}"] = opt.step

    for gran in GRANULARITIES:
        mask = masked[(gran, 0.05)][0]
        naive_opt = torch.optim.AdamW(list(params.values()), lr=1e-4, weight_decay=0.01, fused=True)
        cases[f"naive_where_{gran}_0.05"] = naive_masked_step(
            list(params.values()), naive_opt, [mask.to_dense(n) for n in params])
    try:  # optional comparison, only where deepspeed is installed
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        ds = DeepSpeedCPUAdam(list(params.values()), lr=1e-4, weight_decay=0.01, adamw_mode=True)
        cases["deepspeed_cpuadam_dense"] = ds.step
    except Exception:  # noqa: BLE001 - not installed or not buildable here
        pass

    bw = stream_bandwidth(numel)
    timings = paired_ratios(dense.step, cases, rounds)
    base = statistics.median(t["baseline_median_s"] for t in timings.values())
    torch_state = 8 * numel
    rows = [{"case": "torch_fused_dense", "median_s": base, "ratio": 1.0, "state_bytes": torch_state,
             "achieved_GBps": DENSE_BYTES_PER_ELEMENT * numel / base / 1e9}]
    for name, t in timings.items():
        row = {"case": name, **t}
        if name.startswith("masked_"):
            _, gran, d = name.split("_")
            mask, opt = masked[(gran, float(d))]
            sb = opt.state_bytes()
            row.update(
                density=mask.density, granularity=gran, state_bytes=sb["total"],
                state_moment_bytes=sb["moments"], state_index_bytes=sb["indices"],
                state_fraction_of_torch=sb["total"] / torch_state,
                moment_fraction_of_torch=sb["moments"] / torch_state,
            )
            if gran == "row":  # exactly the selected bytes move
                moved = DENSE_BYTES_PER_ELEMENT * mask.numel_selected
                row["achieved_GBps"] = moved / t["median_s"] / 1e9
        elif name == "deepspeed_cpuadam_dense":
            row["achieved_GBps"] = DENSE_BYTES_PER_ELEMENT * numel / t["median_s"] / 1e9
            row["state_bytes"] = torch_state
        rows.append(row)

    def ratio(name):
        return timings[name]["ratio"]

    summary = {
        "row_5pct_vs_torch": ratio("masked_row_0.05"),
        "element_5pct_vs_torch": ratio("masked_element_0.05"),
        "row_100pct_vs_torch": ratio("masked_row_1"),
        "element_100pct_vs_torch": ratio("masked_element_1"),
        "naive_over_masked_row_5pct": ratio("naive_where_row_0.05") / ratio("masked_row_0.05"),
        "naive_over_masked_element_5pct": ratio("naive_where_element_0.05") / ratio("masked_element_0.05"),
        "state_fraction_row_5pct": next(r for r in rows if r["case"] == "masked_row_0.05")["state_fraction_of_torch"],
        "state_fraction_element_5pct": next(r for r in rows if r["case"] == "masked_element_0.05")["state_fraction_of_torch"],
    }
    info = machine()
    payload = {
        "benchmark": "masked AdamW step (CPU)", "numel": numel, "shapes": shapes,
        "rounds": rounds, "machine": info, "stream_GBps": bw / 1e9, "results": rows,
        "summary": summary,
    }
    table = [
        f"# Masked AdamW step on CPU ({numel / 1e6:.1f}M fp32 elements)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, "
        f"torch {info['torch']}, ISA clone {info.get('isa_clone')}; measured stream bandwidth "
        f"{bw / 1e9:.1f} GB/s. Each case is timed right after a torch.optim.AdamW(fused=True) "
        f"step over all elements, {rounds} rounds; '× torch fused' is the median of those "
        "paired ratios (the machine's speed drifts, adjacent runs compare fairly).",
        "",
        "| case | median ms | × torch fused | GB/s | state | state / torch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gbps = f"{r['achieved_GBps']:.1f}" if "achieved_GBps" in r else ""
        sb = fmt_bytes(r["state_bytes"]) if "state_bytes" in r else ""
        frac = f"{r['state_fraction_of_torch']:.3f}" if "state_fraction_of_torch" in r else ""
        table.append(
            f"| {r['case']} | {r['median_s'] * 1e3:.1f} | {r['ratio']:.3f} | {gbps} | {sb} | {frac} |"
        )
    table += ["", "Summary: " + ", ".join(f"{k} = {v:.3f}" for k, v in summary.items())]
    write_report(args.out, payload, table)
    print("\n".join(table))


if __name__ == "__main__":
    main()
