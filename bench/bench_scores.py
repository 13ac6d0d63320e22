"""The probe's fused passes against the same quantities composed from eager PyTorch ops.

On ~64M fp32 elements in LLM-shaped tensors:
- `delta_stats` with R = 2 references (row blocks and whole tensors) against the eager
  composition a user would write (``d = post - pre``, then per-block sums of ``d*d``,
  ``fisher``, ``d*ref`` and ``ref*ref``), time ratio (paired per round) and peak extra
  memory (resident-set high-water mark of a fresh process running the pass once);
- `adamw_fisher_` against ``torch.optim.AdamW(fused=True).step()`` alone and against the
  unfused way (that step, then ``fisher.addcmul_(g, g)``).

    python bench/bench_scores.py [--quick]    # writes bench/results/scores_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import fmt_bytes, machine, numel_of, paired_ratios, scaled_shapes, write_report  # noqa: E402

from trace_kernels import ops  # noqa: E402

NUM_REFS = 2


def stats_inputs(shapes, gen):
    post = [torch.randn(s, generator=gen) for s in shapes.values()]
    pre = [p + 0.01 * torch.randn(p.shape, generator=gen) for p in post]
    fisher = [torch.rand(p.shape, generator=gen) for p in post]
    refs = [[torch.randn(p.shape, generator=gen) for _ in range(NUM_REFS)] for p in post]
    return post, pre, fisher, refs


def block_sizes(shapes, granularity):
    return [s[-1] if granularity == "row" else s[0] * s[1] for s in shapes.values()]


def eager_stats(post, pre, fisher, refs, sizes):
    """The scores composed from eager ops, as a user would write them."""
    out = []
    for p0, p1, f, rs, b in zip(pre, post, fisher, refs, sizes):
        d = p1 - p0
        row = [d.square().view(-1, b).sum(1), f.view(-1, b).sum(1)]
        for r in rs:
            row += [(d * r).view(-1, b).sum(1), r.square().view(-1, b).sum(1)]
        out.append(row)
    return out


def fused_stats(post, pre, fisher, refs, sizes):
    return ops.delta_stats(post, pre, [f.view(-1) for f in fisher], refs, sizes)


def memory_child(case: str, scale: float) -> None:
    """Run one pass once in this fresh process and print its peak extra resident memory."""
    gen = torch.Generator().manual_seed(0)
    shapes = scaled_shapes(scale)
    inputs = stats_inputs(shapes, gen)
    gran = case.split(":")[1]
    sizes = block_sizes(shapes, gran)
    fn = fused_stats if case.startswith("fused") else eager_stats
    # Hand freed heap pages (from building the inputs) back to the OS, so temporaries of the
    # pass must fault in new pages and show in the high-water mark.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    # Reset the kernel's resident high-water mark (VmHWM) to the current size, run, read it.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fn(*inputs, sizes)
    after = _status_kib("VmHWM")
    print(json.dumps({"peak_extra_bytes": max(0, after - before) * 1024}))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra(case: str, scale: float) -> int:
    out = subprocess.run([sys.executable, __file__, "--memory-child", case, "--scale", str(scale)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def bench_delta_stats(shapes, gen, rounds: int, scale: float) -> list[dict]:
    """delta_stats vs the eager composition, row blocks and whole tensors."""
    numel = numel_of(shapes)
    post, pre, fisher, refs = stats_inputs(shapes, gen)
    input_bytes = 4 * numel * (3 + NUM_REFS)
    rows = []
    for gran in ("row", "tensor"):
        sizes = block_sizes(shapes, gran)
        t = paired_ratios(lambda s=sizes: eager_stats(post, pre, fisher, refs, s),
                          {"fused": lambda s=sizes: fused_stats(post, pre, fisher, refs, s)}, rounds)["fused"]
        rows.append({
            "case": f"delta_stats R={NUM_REFS} {gran} blocks", "ours_median_s": t["median_s"],
            "baseline": "eager torch composition", "baseline_median_s": t["baseline_median_s"],
            "ratio": t["ratio"], "speedup": 1 / t["ratio"],
            "ours_GBps": input_bytes / t["median_s"] / 1e9,
            "ours_peak_extra_bytes": peak_extra(f"fused:{gran}", scale),
            "baseline_peak_extra_bytes": peak_extra(f"eager:{gran}", scale),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1/16 of the size, 3 rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default="scores_cpu")
    ap.add_argument("--scale", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    scale = args.scale or (1 / 16 if args.quick else 1.0)
    if args.memory_child:
        memory_child(args.memory_child, scale)
        return
    rounds = args.rounds or (3 if args.quick else 9)
    shapes = scaled_shapes(scale)
    numel = numel_of(shapes)
    gen = torch.Generator().manual_seed(0)
    rows = []

    rows += bench_delta_stats(shapes, gen, rounds, scale)

    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes.values()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    torch_opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    unfused_opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    unfused_fisher = [torch.zeros_like(p) for p in params]
    state = {
        "m": [torch.zeros(p.numel()) for p in params], "v": [torch.zeros(p.numel()) for p in params],
        "f": [torch.zeros(p.numel()) for p in params], "steps": [torch.tensor(0.0) for _ in params],
    }

    def unfused():
        unfused_opt.step()
        for f, p in zip(unfused_fisher, params):
            f.addcmul_(p.grad, p.grad)

    def fused():
        ops.adamw_fisher_(params, [p.grad for p in params], state["m"], state["v"], [], state["f"],
                          state["steps"], lr=1e-4, weight_decay=0.01)

    t = paired_ratios(torch_opt.step, {"adamw_fisher_": fused, "unfused": unfused}, rounds)
    for name, label in (("adamw_fisher_", "adamw_fisher_ (fused step + Fisher)"),
                        ("unfused", "AdamW(fused=True) step, then fisher.addcmul_(g, g)")):
        rows.append({
            "case": label, "ours_median_s": t[name]["median_s"],
            "baseline": "torch.optim.AdamW(fused=True) step alone",
            "baseline_median_s": t[name]["baseline_median_s"], "ratio": t[name]["ratio"],
            "ours_GBps": 36 * numel / t[name]["median_s"] / 1e9,
        })
    summary = {
        "delta_stats_row_speedup": rows[0]["speedup"],
        "delta_stats_tensor_speedup": rows[1]["speedup"],
        "delta_stats_row_peak_extra_over_param_bytes": rows[0]["ours_peak_extra_bytes"] / (4 * numel),
        "adamw_fisher_vs_fused_step": t["adamw_fisher_"]["ratio"],
        "unfused_vs_fused_step": t["unfused"]["ratio"],
    }
    info = machine()
    payload = {"benchmark": "scoring passes (CPU)", "numel": numel, "shapes": shapes, "rounds": rounds,
               "machine": info, "results": rows, "summary": summary}
    table = [
        f"# Probe and scoring passes on CPU ({numel / 1e6:.1f}M fp32 elements)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, torch "
        f"{info['torch']}, ISA clone {info.get('isa_clone')}. Each case timed right after its "
        f"baseline, {rounds} rounds; ratio = median of the paired ratios. Peak extra memory: "
        "resident high-water mark of a fresh process running the pass once, beyond its inputs.",
        "",
        "| case | ms | baseline | baseline ms | ratio | peak extra (ours) | peak extra (baseline) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ours_mem = fmt_bytes(r["ours_peak_extra_bytes"]) if "ours_peak_extra_bytes" in r else ""
        base_mem = fmt_bytes(r["baseline_peak_extra_bytes"]) if "baseline_peak_extra_bytes" in r else ""
        table.append(f"| {r['case']} | {r['ours_median_s'] * 1e3:.1f} | {r['baseline']} | "
                     f"{r['baseline_median_s'] * 1e3:.1f} | {r['ratio']:.3f} | {ours_mem} | {base_mem} |")
    table += ["", "Summary: " + ", ".join(f"{k} = {v:.3f}" for k, v in summary.items())]
    write_report(args.out, payload, table)
    print("\n".join(table))


if __name__ == "__main__":
    main()
