"""The "push the frontier" tries against a suite's full frontier: each try's points (mean ±
sample std over its seeds) placed against seqft's and lora's curves of the same seeds, with
the BWT gap at equal plasticity (the try's BWT minus the curve's upper envelope, linear
between Pareto points, at the try's plasticity; empty outside the curve's range).

    bench/frontier_tries.sh formats runs/tries-formats      # the runs (trace only, 2 seeds)
    python bench/frontier_tries.py --base bench/results/trace_ft_frontier_formats.json \\
        --tries runs/tries-formats --out bench/results/trace_ft_frontier_tries_formats
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from trace_ft.continual.frontier import pareto, point_label, summaries


def learned(entries: list[dict], first: int, threshold: float = 50.0) -> float:
    """Mean over seeds of how many tasks scored >= `threshold` right after their own
    training: a point that learns only its last task has no earlier task to forget, and
    sits above every curve with plasticity 1/T of the others'."""
    counts = [sum(1 for i in range(1, len(e["matrix"])) if (e["matrix"][i][first + i - 1] or 0) >= threshold)
              for e in entries]
    return sum(counts) / len(counts)


def at(curve: list[tuple[float, float]], x: float) -> float | None:
    env = pareto(curve)
    if not env or not env[0][0] <= x <= env[-1][0]:
        return None
    return float(np.interp(x, [p[0] for p in env], [p[1] for p in env]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the suite's full frontier results.json")
    ap.add_argument("--tries", required=True, help="a directory of tries, one results.json each")
    ap.add_argument("--out", required=True, help="output stem (.md, .json, .png)")
    ap.add_argument("--metric", default="exact")
    args = ap.parse_args()
    base = json.loads(Path(args.base).read_text())
    tries = {d.name: json.loads((d / "results.json").read_text())
             for d in sorted(Path(args.tries).iterdir()) if (d / "results.json").is_file()}
    seeds = sorted({e["seed"] for t in tries.values() for es in t["frontier"].values() for e in es})
    same = {"frontier": {k: [e for e in v if e["seed"] in seeds] for k, v in base["frontier"].items()}}
    curves = summaries(same, args.metric)
    lines = {name: [(p["plasticity"], p["bwt"]) for p in curves[name]] for name in ("seqft", "lora", "trace")}
    rows = []
    for tname, t in tries.items():
        first = t.get("first_task_column", 1)
        for strategy, points in summaries(t, args.metric).items():
            if strategy == "trace_routed":
                continue
            for p in points:
                x, y = p["plasticity"], p["bwt"]
                runs = [e for e in t["frontier"][strategy] if e["params"] == p["params"]]
                rows.append({"try": tname, "strategy": strategy, "point": point_label(p["params"]), **p,
                             "tasks_learned": learned(runs, first), "tasks": len(runs[0]["matrix"]) - 1,
                             **{f"gap_{c}": None if (v := at(lines[c], x)) is None else y - v
                                for c in ("seqft", "lora", "trace")}})
    suite = base["config"].get("suite", "?")
    md = [f"# Pushing the frontier: tries on the `{suite}` suite", "",
          f"Trace-only frontiers changing one thing from the default trace (budget 0.02 unless "
          f"the point says otherwise), seeds {seeds}; metric `{args.metric}`; curves of seqft, "
          f"lora and the default trace grid from `{Path(args.base).name}`, restricted to the same "
          "seeds. gap: the point's BWT minus the curve's upper envelope at the point's "
          "plasticity (positive: retains more at equal plasticity; — : outside the curve's "
          "range).", "",
          "| try | point | plasticity | BWT | AP | base Δ | tasks learned (≥ 50 right after) | gap vs seqft | vs lora | vs default trace |",
          "|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, s=None):
        return "—" if v is None else (f"{v:+.1f}" if s is None else f"{v:.1f} ± {s:.1f}")

    for r in rows:
        md.append(f"| {r['try']} ({r['strategy']}) | {r['point']} | {f(r['plasticity'], r['plasticity_std'])} | "
                  f"{f(r['bwt'], r['bwt_std'])} | {f(r['ap'], r['ap_std'])} | {f(r['base_delta'], r['base_delta_std'])} | "
                  f"{r['tasks_learned']:.1f} of {r['tasks']} | "
                  f"{f(r['gap_seqft'])} | {f(r['gap_lora'])} | {f(r['gap_trace'])} |")
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"seeds": seeds, "metric": args.metric, "rows": rows,
                                                    "curves": lines}, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    for name, style in (("seqft", "k-o"), ("lora", "b-s"), ("trace", "g-^")):
        pts = sorted(lines[name])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, alpha=0.6, label=f"{name} (grid)")
    markers = "vD*PXhp<>"
    for i, tname in enumerate(tries):
        rs = [r for r in rows if r["try"] == tname]
        ax.errorbar([r["plasticity"] for r in rs], [r["bwt"] for r in rs],
                    xerr=[r["plasticity_std"] for r in rs], yerr=[r["bwt_std"] for r in rs],
                    fmt=markers[i % len(markers)], ms=8, capsize=2, label=tname)
    ax.set_xlabel(f"plasticity ({args.metric}, mean over seeds)")
    ax.set_ylabel("BWT (higher: less forgetting)")
    ax.set_title(f"{suite}: tries against the frontier (seeds {seeds})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print("\n".join(md))


if __name__ == "__main__":
    main()
