"""`trace-ft run` with the model in bf16: trace with fp32 masters of the core (the default),
without (plain rounding), and the same run in fp32, side by side, over several seeds.

    python bench/bench_bf16_run.py [--steps 200] [--seeds 3]

Writes bench/results/trace_ft_bf16.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
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
KEYS = ("plasticity", "BWT", "AP")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    runs = []
    for seed in range(args.seeds):
        for name, over in CASES.items():
            cfg = RunConfig.from_dict(dict(strategies=["trace"], steps=args.steps, seed=seed, **over))
            with tempfile.TemporaryDirectory() as tmp:
                res = run(cfg, Path(tmp) / "run", progress=False, log=lambda msg: None)
            e = res["strategies"]["trace"]
            runs.append({"case": name, "seed": seed, **{k: e["metrics"][k] for k in KEYS},
                         "final_losses": [c["final_loss"] for c in e["costs"]["per_task"]],
                         "state_bytes": e["costs"]["state_bytes"], "matrix": e["matrix"]})
    info = machine()

    def cell(vals):
        return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"

    table = ["# trace-ft run on a bf16 model: fp32 masters of the core against plain rounding", "",
             f"Built-in small model, the default suite and settings, trace only, {args.steps} steps per "
             f"task, seeds 0–{args.seeds - 1} (mean ± sample std); {info['cpu']}, {info['threads']} "
             "threads. Tasks not learned: tasks whose final training loss (mean of the last 10 % of "
             "its steps) stayed above 1.5, over all seeds.", "",
             "| case | plasticity | BWT | AP | tasks not learned | optimizer state |", "|---|---|---|---|---|---|"]
    for name in CASES:
        rs = [r for r in runs if r["case"] == name]
        stuck = sum(1 for r in rs for x in r["final_losses"] if x is not None and x > 1.5)
        table.append(f"| {name} | " + " | ".join(cell([r[k] for r in rs]) for k in KEYS)
                     + f" | {stuck} of {sum(len(r['final_losses']) for r in rs)} | {rs[0]['state_bytes'] / 2**10:.1f} KiB |")
    write_report("trace_ft_bf16", {"machine": info, "steps": args.steps, "runs": runs}, table)
    print("\n".join(table))


if __name__ == "__main__":
    main()
