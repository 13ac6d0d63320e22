"""What a linear layer's weight gradient costs on each path `install_core_grads` can take,
against the full product gy^T x, and the fit of `trace_kernels.core_grads.PathCosts` to it.

    python bench/bench_core_grad_paths.py [--tokens 1000] [--rounds 7]

For SmolLM2-135M's linear shapes, at several core sizes: the full weight gradient, the row
path (k rows: gy[:, R]^T x) and the element path (n strided dot products,
`ops.sampled_dot`), timed interleaved in one process; each as a ratio to the full product
of its shape. Then the cost model's constants fitted by least squares (rows: ratio ≈
row_factor · k/out; elements: ratio · out · in ≈ floor · (out + in) + factor · n), and
each point's path as the fitted model and as the model in the code choose it, with the
measured best. Writes bench/results/core_grad_paths_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine, write_report  # noqa: E402

from trace_kernels.core_grads import PathCosts  # noqa: E402
from trace_kernels.ops.sampled_dot import sampled_dot_trusted  # noqa: E402

COSTS = PathCosts.for_device("cpu")  # what install_core_grads uses on this CPU

# SmolLM2-135M: q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536
SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
ROW_FRACTIONS = (0.05, 0.1, 0.25, 0.5)
DENSITIES = (0.005, 0.01, 0.02, 0.04, 0.08)


def measure(tokens: int, rounds: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    points = []
    for name, (out, inp) in SHAPES.items():
        gy = torch.randn(tokens, out, generator=gen)
        x = torch.randn(tokens, inp, generator=gen)
        cases = {"full": lambda gy=gy, x=x: gy.t().matmul(x)}
        for f in ROW_FRACTIONS:
            rows = torch.randperm(out, generator=gen)[:max(1, int(f * out))].sort().values
            cases[f"rows:{f}"] = lambda gy=gy, x=x, rows=rows: gy.index_select(1, rows).t().matmul(x)
        for d in DENSITIES:
            flat = torch.randperm(out * inp, generator=gen)[:max(1, int(d * out * inp))].sort().values
            r, c = flat // inp, flat % inp
            cases[f"elements:{d}"] = lambda gy=gy, x=x, r=r, c=c: sampled_dot_trusted(gy.t(), x.t(), r, c)
        times = interleaved_medians(cases, rounds)
        full = times["full"]["median_s"]
        for case, t in times.items():
            if case == "full":
                continue
            path, frac = case.split(":")
            frac = float(frac)
            n = max(1, int(frac * (out if path == "rows" else out * inp)))
            points.append({"shape": name, "out": out, "in": inp, "path": path, "fraction": frac, "count": n,
                           "seconds": t["median_s"], "full_seconds": full, "ratio": t["median_s"] / full})
    return points


def fit(points: list[dict]) -> PathCosts:
    rows = [p for p in points if p["path"] == "rows"]
    row_factor = statistics.median(p["ratio"] / (p["count"] / p["out"]) for p in rows)
    # elements: ratio · out · in = floor · (out + in) + factor · n, least squares in two unknowns
    els = [p for p in points if p["path"] == "elements"]
    a = torch.tensor([[float(p["out"] + p["in"]), float(p["count"])] for p in els], dtype=torch.float64)
    b = torch.tensor([p["ratio"] * p["out"] * p["in"] for p in els], dtype=torch.float64)
    floor, factor = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1).tolist()
    return PathCosts(row_factor=round(row_factor, 2), element_floor=round(floor, 0), element_factor=round(factor, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1000,
                    help="not a multiple of 64: a real batch of 8 rows ends its last token block in a tail")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    points = measure(args.tokens, args.rounds)
    fitted = fit(points)
    lines = ["# Core-gradient paths: cost against the full weight gradient", "",
             f"Machine: {machine()['cpu']}. Tokens {args.tokens}, {args.threads} threads, medians of {args.rounds} interleaved rounds; "
             "ratio: the path's time / the full weight gradient's of the same shape.", "",
             f"Fitted: row_factor {fitted.row_factor}, element_floor {fitted.element_floor:.0f}, "
             f"element_factor {fitted.element_factor}; in the code: row_factor {COSTS.row_factor}, "
             f"element_floor {COSTS.element_floor:.0f}, element_factor {COSTS.element_factor}.", "",
             "| shape | path | fraction | ratio | model (code) |", "|---|---|---:|---:|---:|"]
    for p in points:
        model = (COSTS.row_factor * p["count"] / p["out"] if p["path"] == "rows" else
                 (COSTS.element_floor * (p["out"] + p["in"]) + COSTS.element_factor * p["count"]) / (p["out"] * p["in"]))
        lines.append(f"| {p['shape']} {p['out']}×{p['in']} | {p['path']} | {p['fraction']:g} | {p['ratio']:.2f} | "
                     f"{model:.2f} |")
    write_report("core_grad_paths_cpu", {"machine": machine(), "tokens": args.tokens, "points": points,
                                         "fitted": vars(fitted), "code": vars(COSTS)}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
