"""GPU benchmarks: the masked step and delta_stats on CUDA, for every GPU backend built.

On ~64M fp32 elements in LLM-shaped tensors (CUDA-event timing, each case right after its
baseline, medians of paired ratios):
- masked step (MaskedAdamW, per GPU backend) at 1/5/25/100 % density, element and row
  level, vs torch.optim.AdamW(fused=True) over all elements, and the naive torch.where way;
- delta_stats (R=2, row blocks) vs the eager torch composition;
- achieved bytes/s of each against a measured device-to-device copy.
Prints a table last and writes bench/results/gpu_<device>.{json,md}. Run through
bench/gpu_check.sh; sized to finish in a few minutes on an H100.

    python bench/bench_gpu.py [--quick]
    TRITON_INTERPRET=1 python bench/bench_gpu.py --smoke   # tiny CPU run of this script
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_adamw import DENSE_BYTES_PER_ELEMENT, DENSITIES, GRANULARITIES, random_mask  # noqa: E402
from bench_scores import NUM_REFS, eager_stats  # noqa: E402
from common import machine, naive_masked_step, numel_of, scaled_shapes, write_report  # noqa: E402

from trace_kernels import MaskedAdamW, backends, ops  # noqa: E402


DEVICE = "cuda"


def cuda_time(fn) -> float:
    if DEVICE != "cuda":  # --smoke: CPU wall clock
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def paired(baseline, cases: dict, rounds: int, warmup: int = 3) -> dict:
    for fn in (baseline, *cases.values()):
        for _ in range(warmup):
            fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    pairs = {n: [] for n in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            b = cuda_time(baseline)
            pairs[name].append((b, cuda_time(fn)))
    return {n: {"median_s": statistics.median(m for _, m in ps),
                "baseline_median_s": statistics.median(b for b, _ in ps),
                "ratio": statistics.median(m / b for b, m in ps)} for n, ps in pairs.items()}


def copy_bandwidth(numel: int) -> float:
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    return 2 * 4 * numel / statistics.median(cuda_time(lambda: dst.copy_(src)) for _ in range(20))


def gpu_backends() -> list[str]:
    out = []
    for name in ("cuda", "triton"):
        if name in backends.BACKENDS:
            try:
                backends.choose(DEVICE, name)
                out.append(name)
            except backends.BackendUnavailableError:
                pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny run on CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    rounds = args.rounds or (1 if args.smoke else 3 if args.quick else 15)
    shapes = scaled_shapes(1 / 1024 if args.smoke else 1 / 16 if args.quick else 1.0)
    numel = numel_of(shapes)
    gen = torch.Generator().manual_seed(0)
    params = {n: torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(DEVICE)) for n, s in shapes.items()}
    for p in params.values():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(DEVICE)
    named = list(params.items())
    dense = torch.optim.AdamW(list(params.values()), lr=1e-4, weight_decay=0.01, fused=True)
    copy_bw = copy_bandwidth(numel)
    rows = []
    masks = {(g, d): random_mask(shapes, d, g, gen) for g in GRANULARITIES for d in DENSITIES}
    cases = {}
    for b in gpu_backends():
        for (g, d), mask in masks.items():
            cases[f"{b}_masked_{g}_{d:g}"] = MaskedAdamW(named, lr=1e-4, weight_decay=0.01, masks=mask,
                                                        backend=b).step
    naive_opt = torch.optim.AdamW(list(params.values()), lr=1e-4, weight_decay=0.01, fused=True)
    naive = naive_masked_step(list(params.values()), naive_opt,
                              [masks[("row", 0.05)].to_dense(n).to(DEVICE) for n in params])
    cases["naive_where_row_0.05"] = naive
    t = paired(dense.step, cases, rounds)
    base = statistics.median(v["baseline_median_s"] for v in t.values())
    rows.append({"case": "torch_fused_dense", "median_s": base, "ratio": 1.0,
                 "GBps": DENSE_BYTES_PER_ELEMENT * numel / base / 1e9})
    for name, v in t.items():
        row = {"case": name, **v}
        m = re.match(r"\w+_masked_(row|element)_([\d.]+)$", name)
        if m and m.group(1) == "row":
            sel = masks[("row", float(m.group(2)))].numel_selected
            row["GBps"] = DENSE_BYTES_PER_ELEMENT * sel / v["median_s"] / 1e9
        rows.append(row)

    post = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes.values()]
    pre = [p + 0.01 for p in post]
    fisher = [torch.rand(p.numel(), generator=gen).to(DEVICE) for p in post]
    refs = [[torch.randn(p.shape, generator=gen).to(DEVICE) for _ in range(NUM_REFS)] for p in post]
    sizes = [s[-1] for s in shapes.values()]
    stats_cases = {f"{b}_delta_stats_R2_row": (lambda b=b: ops.delta_stats(post, pre, fisher, refs, sizes, backend=b))
                   for b in gpu_backends()}
    st = paired(lambda: eager_stats(post, pre, [f.view(p.shape) for f, p in zip(fisher, post)], refs, sizes),
                stats_cases, rounds)
    for name, v in st.items():
        rows.append({"case": name, **v, "baseline": "eager torch",
                     "GBps": 4 * numel * (3 + NUM_REFS) / v["median_s"] / 1e9})

    info = machine()
    info["gpu"] = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu-smoke"
    stem = "gpu_" + re.sub(r"[^A-Za-z0-9]+", "_", info["gpu"]).strip("_").lower()
    table = [f"# GPU benchmarks on {info['gpu']} ({numel / 1e6:.1f}M fp32 elements)", "",
             f"Device copy: {copy_bw / 1e9:.0f} GB/s (read + write). Ratios: median of paired "
             f"CUDA-event timings against the baseline ({rounds} rounds); masked steps against "
             "torch.optim.AdamW(fused=True) over all elements, delta_stats against eager torch.", "",
             "| case | median ms | ratio | GB/s | % of copy |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        gbps = r.get("GBps")
        table.append(f"| {r['case']} | {r['median_s'] * 1e3:.3f} | {r['ratio']:.3f} | "
                     f"{'' if gbps is None else f'{gbps:.0f}'} | "
                     f"{'' if gbps is None else f'{100 * gbps * 1e9 / copy_bw:.0f}'} |")
    if args.smoke:
        print("\n".join(table))
        return
    write_report(stem, {"benchmark": "GPU", "numel": numel, "machine": info, "copy_GBps": copy_bw / 1e9,
                        "rounds": rounds, "results": rows}, table)
    print("\n".join(table))


if __name__ == "__main__":
    main()
