"""`trace-ft run` with the model in bf16: trace with fp32 masters of the core (the default),
without (plain rounding), and the same run in fp32, side by side.

    python bench/bench_bf16_run.py [--steps 200] [--seed 0]

Writes bench/results/trace_ft_bf16.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_report  # noqa: E402

from trace_ft.commands.run import run  # noqa: E402
from trace_ft.config import RunConfig  # noqa: E402

CASES = {
    "bf16, masters (default)": dict(dtype="bfloat16", trace_master_weights=None),
    "bf16, plain rounding": dict(dtype="bfloat16", trace_master_weights=False),
    "fp32": dict(dtype="float32"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    for name, over in CASES.items():
        cfg = RunConfig(strategies=["trace"], steps=args.steps, seed=args.seed, **over)
        with tempfile.TemporaryDirectory() as tmp:
            res = run(cfg, Path(tmp) / "run", progress=False, log=lambda msg: None)
        e = res["strategies"]["trace"]
        rows.append({"case": name, **{k: e["metrics"][k] for k in ("AP", "BWT", "plasticity")},
                     "final_losses": [c["final_loss"] for c in e["costs"]["per_task"]],
                     "state_bytes": e["costs"]["state_bytes"], "seconds": e["costs"]["seconds"],
                     "matrix": e["matrix"]})
    info = machine()
    table = ["# trace-ft run on a bf16 model: fp32 masters of the core against plain rounding", "",
             f"Built-in small model, the default suite and settings, trace only, {args.steps} steps per "
             f"task, seed {args.seed}; {info['cpu']}, {info['threads']} threads. Final loss: mean "
             "training loss over the last 10 % of each task's steps.", "",
             "| case | plasticity | BWT | AP | final loss per task | optimizer state | time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        losses = ", ".join(f"{x:.3f}" for x in r["final_losses"])
        table.append(f"| {r['case']} | {r['plasticity']:.1f} | {r['BWT']:.1f} | {r['AP']:.1f} | {losses} | "
                     f"{r['state_bytes'] / 2**10:.1f} KiB | {r['seconds']:.0f} |")
    write_report("trace_ft_bf16", {"machine": info, "steps": args.steps, "seed": args.seed, "rows": rows}, table)
    print("\n".join(table))


if __name__ == "__main__":
    main()
