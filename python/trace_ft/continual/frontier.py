"""The learning–forgetting frontier: what a strategy retains (BWT) against what it learns
(plasticity) as its strength knob turns, over several seeds, and how two strategies'
frontiers compare at equal plasticity. One point = one full continual run."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..benchmarks.results import mean_change
from ..evaluate import METRICS
from ..tasks.real import near_benchmarks
from ..store.atomic import write_bytes

# Each strategy's strength knob(s) (RunConfig fields) and the default grid: chosen so the
# default frontier (3 seeds) takes under an hour on the project's 2-core machine.
GRIDS: dict[str, dict[str, list]] = {
    "seqft": {"lr": [1e-4, 3e-4, 1e-3, 3e-3]},
    "trace": {"trace_lr": [1e-3, 3e-3, 1e-2], "trace_budget": [0.02, 0.1]},
    "lora": {"lora_lr": [1e-3, 3e-3, 1e-2], "lora_rank": [4, 16]},
    "ewc": {"ewc_lambda": [1e2, 1e3, 1e4, 1e5]},
    "replay": {"replay_buffer": [10, 50, 200]},
    # on request (--frontier-strategies): the authors' whole-tensor rule; trace with the
    # general-ability guard
    "trace_paper": {"trace_lr": [1e-4, 3e-4, 1e-3, 3e-3]},
    "trace_guard": {"trace_lr": [1e-3, 3e-3, 1e-2]},
}
DEFAULT_STRATEGIES = ("seqft", "trace", "lora", "ewc", "replay")
# A real pretrained model (any --model but builtin) fine-tunes at lr 1e-5..1e-4: the grids
# span that (one full continual run per point costs minutes, not seconds), and the general
# ability guard is one of the frontiers.
REAL_GRIDS: dict[str, dict[str, list]] = {
    "seqft": {"lr": [1e-5, 3e-5]},
    "lora": {"lora_lr": [3e-4, 1e-3]},
    "trace": {"trace_lr": [1e-4, 3e-4]},
    "trace_guard": {"trace_lr": [1e-4, 3e-4]},
    "ewc": {"ewc_lambda": [1e3, 1e5]},
    "replay": {"replay_buffer": [20]},
    "trace_paper": {"trace_lr": [3e-5, 1e-4]},
}
REAL_STRATEGIES = ("seqft", "lora", "trace", "trace_guard")
# --quick: the same knobs, fewer points (2 seeds: about 15 minutes)
QUICK_GRIDS: dict[str, dict[str, list]] = {
    "seqft": {"lr": [3e-4, 1e-3, 3e-3]},
    "trace": {"trace_lr": [3e-3, 1e-2]},
    "lora": {"lora_lr": [3e-3, 1e-2]},
    "ewc": {"ewc_lambda": [1e3, 1e4]},
    "replay": {"replay_buffer": [50]},
    "trace_paper": {"trace_lr": [3e-4, 1e-3]},
    "trace_guard": {"trace_lr": [3e-3, 1e-2]},
}


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, in order (the first key turns slowest)."""
    points = [{}]
    for key, values in grid.items():
        points = [{**p, key: v} for p in points for v in values]
    return points


def parse_grid(spec: str) -> tuple[str, str, list]:
    """``"trace:trace_lr=1e-3,3e-3"`` → ("trace", "trace_lr", [0.001, 0.003]); true/false are
    booleans (``trace:trace_continue_probe=true``)."""
    try:
        strategy, rest = spec.split(":", 1)
        key, values = rest.split("=", 1)
    except ValueError:
        raise ValueError(f"--grid {spec!r}: expected STRATEGY:KEY=V1,V2,...") from None

    def value(text: str):
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text

    return strategy.strip(), key.strip(), [value(v.strip()) for v in values.split(",") if v.strip()]


def point_label(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def summarise_point(entries: list[dict], metric: str, near: Sequence[str] = ()) -> dict:
    """Mean and spread (sample std; min–max) over seeds of one grid point's runs. With `near`
    (the standard benchmarks near the sequence's tasks), also the benchmarks' change without
    them ("bench_far_delta")."""
    out = {"seeds": [e["seed"] for e in entries], "params": entries[0]["params"]}
    far = [mean_change(e["bench_change"], near) if near and e.get("bench_change") else (None, None)
           for e in entries]
    for key in ("plasticity", "bwt", "ap", "fwt", "base_delta", "ppl_delta", "bench_delta", "bench_far_delta"):
        # the perplexity's and the benchmarks' changes do not depend on the metric (a real model's only)
        if key == "bench_far_delta":
            vals = [m for m, _ in far]
        else:
            vals = [e.get(key) if key in ("ppl_delta", "bench_delta") else e["metrics_by"][metric][key]
                    for e in entries]
        vals = [v for v in vals if v is not None]
        if not vals:
            out[key] = out[key + "_std"] = out[key + "_min"] = out[key + "_max"] = None
            continue
        out[key] = float(np.mean(vals))
        out[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        out[key + "_min"], out[key + "_max"] = float(min(vals)), float(max(vals))
    # the benchmarks' paired standard error of one run's change (its range over seeds), and
    # each benchmark's change in its primary metric
    for key, ses in (("bench_delta_se", [e.get("bench_delta_se") for e in entries]),
                     ("bench_far_delta_se", [se for _, se in far])):
        ses = [se for se in ses if se is not None]
        out[key] = (float(min(ses)), float(max(ses))) if ses else None
    each: dict[str, list[float]] = {}
    for e in entries:
        for bench, change in (e.get("bench_change") or {}).items():
            each.setdefault(bench, []).append(change[change["primary"]]["delta"])
    out["bench_each"] = {b: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
                         for b, v in each.items()}
    return out


def pareto(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (plasticity, BWT) points no other point beats on both, by plasticity."""
    pts = sorted({(float(x), float(y)) for x, y in points}, key=lambda p: (-p[0], -p[1]))
    out, best = [], -math.inf
    for x, y in pts:
        if y > best:
            out.append((x, y))
            best = y
    return sorted(out)


def envelope_gap(mine: list[tuple[float, float]], theirs: list[tuple[float, float]],
                 samples: int = 50) -> dict | None:
    """How far `mine`'s upper envelope (linear between Pareto points) lies above `theirs`
    over the plasticity range both cover: mean, smallest and largest gap in BWT points.
    When the ranges do not overlap (one point each, say 100.0 against 99.3), the gap between
    the two Pareto points nearest in plasticity, with both plasticities ("nearest"). None
    when either side has no point."""
    a, b = pareto(mine), pareto(theirs)
    if not a or not b:
        return None
    lo, hi = max(a[0][0], b[0][0]), min(a[-1][0], b[-1][0])
    if hi < lo:
        pa, pb = min(((pa, pb) for pa in a for pb in b), key=lambda ab: abs(ab[0][0] - ab[1][0]))
        gap = pa[1] - pb[1]
        return {"nearest": [pa[0], pb[0]], "mean": gap, "min": gap, "max": gap}
    xs = np.linspace(lo, hi, samples) if hi > lo else np.array([lo])
    ya = np.interp(xs, [p[0] for p in a], [p[1] for p in a])
    yb = np.interp(xs, [p[0] for p in b], [p[1] for p in b])
    gap = ya - yb
    return {"range": [float(lo), float(hi)], "mean": float(gap.mean()), "min": float(gap.min()),
            "max": float(gap.max())}


# ---- the report -----------------------------------------------------------------------

def summaries(results: dict, metric: str) -> dict[str, list[dict]]:
    """Per strategy, one summary per grid point (mean and spread over seeds)."""
    near = near_scored(results)
    out = {}
    for name, entries in results["frontier"].items():
        by_point: dict[str, list[dict]] = {}
        for e in entries:
            by_point.setdefault(json.dumps(e["params"], sort_keys=True), []).append(e)
        out[name] = [summarise_point(es, metric, near) for es in by_point.values()]
    return out


def near_scored(results: dict) -> list[str]:
    """The scored standard benchmarks near the sequence's tasks (see `tasks.real`)."""
    scored = dict.fromkeys(b for entries in results["frontier"].values() for e in entries
                           for b in e.get("bench_change") or {})
    return near_benchmarks(results["config"].get("tasks") or [], scored)


def comparisons(points: dict[str, list[dict]], key: str = "bwt", mine: str = "trace") -> dict[str, dict | None]:
    """`mine`'s envelope of `key` (bwt, base_delta; ppl_delta negated, so higher is better
    for all) against each other strategy's, at equal plasticity."""
    if mine not in points:
        return {}
    sign = -1.0 if key == "ppl_delta" else 1.0

    def pairs(pts):
        return [(p["plasticity"], sign * p[key]) for p in pts if p[key] is not None and p["plasticity"] is not None]

    return {name: envelope_gap(pairs(points[mine]), pairs(pts))
            for name, pts in points.items() if name != mine and not name.startswith("trace")}


def _fmt(v, std=None, digits: int = 1) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if std is None else f"{v:.{digits}f} ± {std:.{digits}f}"


def markdown(results: dict, metric: str) -> str:
    cfg = results["config"]
    # the seeds the runs hold (a resumed frontier's last call may have asked for fewer)
    seeds = len({e["seed"] for runs in results.get("frontier", {}).values() for e in runs}) or cfg["seeds"]
    lines = ["# trace-ft frontier", "",
             f"Model `{results.get('model')}`; suite `{cfg['suite']}` "
             f"({', '.join(results.get('columns', [])[results.get('first_task_column', 0):])}); "
             f"{cfg['steps']} steps per task, batch {cfg['batch_size']}; {seeds} seed(s); "
             f"metric `{metric}`; {results.get('seconds', 0) / 60:.0f} min of training and scoring.",
             "",
             "Each point is a full continual run; values are the mean ± sample std over seeds. "
             "plasticity: mean score right after each task's own training; BWT: mean change of "
             "earlier tasks from just after learning them to the end; base Δ: change of the base "
             "skill (task 0). trace_routed scores each task with the model as it stood right after "
             "it (rebuilt from the final model and the core values): BWT 0 when routing is exact.",
             ""]
    points = summaries(results, metric)
    ppl = any(p["ppl_delta"] is not None for pts in points.values() for p in pts)
    bench = any(p["bench_delta"] is not None for pts in points.values() for p in pts)
    near = near_scored(results)
    measures = [("bwt", "task BWT", "retains more of the earlier tasks"),
                ("base_delta", "general-ability (task 0) change", "keeps more of task 0")]
    if ppl:
        measures.append(("ppl_delta", "perplexity rise on general prose (sign flipped)",
                         "raises the perplexity less"))
    if bench:
        measures.append(("bench_delta", "standard benchmarks' mean change (points)",
                         "keeps more of the standard benchmarks"))
    if near:
        measures.append(("bench_far_delta", f"standard benchmarks' mean change without {', '.join(near)} "
                         "(near the tasks; points)", "keeps more of the standard benchmarks the tasks do not train"))
    lines += side_by_side(points, ppl, bench, near)
    for mine in [n for n in points if n.startswith("trace") and n != "trace_routed"]:
        for key, label, meaning in measures:
            gaps = comparisons(points, key, mine)
            if not gaps:
                continue
            lines += [f"## {mine} against the others at equal plasticity: {label}", "",
                      "| against | plasticity range both cover | mean gap | smallest | largest |",
                      "|---|---|---|---|---|"]
            digits = 2 if key == "ppl_delta" else 1
            for name, g in gaps.items():
                if g is None:
                    lines.append(f"| {name} | no points | – | – | – |")
                elif "nearest" in g:
                    lines.append(f"| {name} | none; nearest points {g['nearest'][0]:.1f} and {g['nearest'][1]:.1f} | "
                                 f"{g['mean']:+.{digits}f} | – | – |")
                else:
                    lines.append(f"| {name} | {g['range'][0]:.1f}–{g['range'][1]:.1f} | {g['mean']:+.{digits}f} | "
                                 f"{g['min']:+.{digits}f} | {g['max']:+.{digits}f} |")
            lines += ["", f"A positive gap: {mine}'s upper envelope (linear between its Pareto points) "
                      f"lies above the other's, i.e. it {meaning} at the same plasticity.", ""]
    cols = [("plasticity", "plasticity"), ("BWT", "bwt"), ("AP", "ap"), ("base Δ", "base_delta")] \
        + [("ppl Δ", "ppl_delta")] * ppl + [("bench Δ", "bench_delta")] * bench \
        + [("bench Δ without the tasks' kind", "bench_far_delta")] * bool(near)
    for name, pts in points.items():
        lines += [f"## {name}", ""] + _table([("point", None)] + cols + [("seeds", None)], {name: pts}, False) + [""]
    other = [m for m in METRICS if m != metric]
    lines += ["## The other metrics", "", "| strategy | point | " + " | ".join(
        f"{m} plasticity | {m} BWT" for m in other) + " |", "|---|---|" + "---|" * (2 * len(other))]
    by_metric = {m: summaries(results, m) for m in other}  # (once per metric, not per strategy)
    for name in points:
        per = {m: by_metric[m][name] for m in other}
        for k, p in enumerate(per[other[0]]):
            cells = " | ".join(f"{_fmt(per[m][k]['plasticity'])} | {_fmt(per[m][k]['bwt'])}" for m in other)
            lines.append(f"| {name} | {point_label(p['params'])} | {cells} |")
    return "\n".join(lines) + "\n"


def by_plasticity(pts: list[dict]) -> list[dict]:
    """A strategy's points by plasticity, those without one last."""
    return sorted(pts, key=lambda p: (p["plasticity"] is None, p["plasticity"]))


def _table(cols: list[tuple[str, str | None]], points: dict[str, list[dict]], name_column: bool) -> list[str]:
    """A markdown table of `points` (each strategy's, by plasticity) in the columns `cols`:
    (header, the summary's key of a mean ± std cell, of a standard error's range over seeds
    (ending in "_se"), or None for the point's label or its seeds); the strategy's name first
    when `name_column`."""
    head = ["strategy"] * name_column + [h for h, _ in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, pts in points.items():
        for p in by_plasticity(pts):
            cells = [name] * name_column
            for header, key in cols:
                if key is not None and key.endswith("_se"):
                    se = p[key]
                    cells.append("–" if se is None else f"{se[0]:.1f}" if round(se[0], 1) == round(se[1], 1)
                                 else f"{se[0]:.1f}–{se[1]:.1f}")
                elif key is None:
                    cells.append(point_label(p["params"]) if header == "point" else str(len(p["seeds"])))
                else:
                    cells.append(_fmt(p[key], p.get(f"{key}_std"), 2 if key == "ppl_delta" else 1))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def side_by_side(points: dict[str, list[dict]], ppl: bool, bench: bool, near: Sequence[str] = ()) -> list[str]:
    """Every strategy's points in one table, in the TRACE paper's layout: OP (the mean
    score over all tasks after the last, our AP), BWT, then the general-ability changes
    (the benchmarks' also without those `near` the tasks)."""
    cols = [("point", None), ("seeds", None), ("OP", "ap"), ("BWT", "bwt"), ("plasticity", "plasticity"),
            ("FWT", "fwt"), ("probe Δ", "base_delta")] + [("ppl Δ", "ppl_delta")] * ppl \
        + [("benchmarks Δ", "bench_delta"), ("SE per run", "bench_delta_se")] * bench \
        + [("without the tasks' kind Δ", "bench_far_delta"), ("SE per run", "bench_far_delta_se")] * bool(near)
    return (["## Side by side (the TRACE paper's layout)", ""] + _table(cols, points, True)
            + ["", "OP: mean task score after the last task; probe Δ: the general-ability probe "
               "(task 0) from start to end; mean ± sample std over seeds."
               + (" SE per run: the paired standard error of one run's benchmarks Δ over the questions "
                  "(its range over the seeds); every seed scores the same questions, so averaging "
                  "seeds does not shrink it." if bench else "")
               + (f" Without the tasks' kind: the benchmarks' mean change leaving out {', '.join(near)}, "
                  "which ask the kind of question one of the sequence's tasks trains (from another "
                  "source), so that training lifts them by transfer." if near else ""), ""]
            + (benchmarks_one_by_one(points) if bench else []))


def benchmarks_one_by_one(points: dict[str, list[dict]]) -> list[str]:
    """Each standard benchmark's change (its primary metric, points) per strategy and point."""
    names = list(dict.fromkeys(b for pts in points.values() for p in pts for b in p["bench_each"]))
    lines = ["## The standard benchmarks one by one", "",
             "| strategy | point | seeds | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for name, pts in points.items():
        for p in by_plasticity(pts):
            cells = [_fmt(*p["bench_each"][b]) if b in p["bench_each"] else "–" for b in names]
            lines.append(f"| {name} | {point_label(p['params'])} | {len(p['seeds'])} | " + " | ".join(cells) + " |")
    return lines + ["", "Change from the start to the end in each benchmark's primary metric "
                    "(points; mean ± sample std over seeds).", ""]


def plot(results: dict, path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = summaries(results, metric)
    keys = ["bwt", "base_delta"]
    if any(p["ppl_delta"] is not None for pts in points.values() for p in pts):
        keys.append("ppl_delta")
    if any(p["bench_delta"] is not None for pts in points.values() for p in pts):
        keys.append("bench_delta")
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.4), constrained_layout=True)
    for name, pts in points.items():
        pts = sorted((p for p in pts if p["plasticity"] is not None and p["bwt"] is not None),
                     key=lambda p: p["plasticity"])
        if not pts:
            continue
        x = [p["plasticity"] for p in pts]
        for ax, key in zip(axes, keys):
            y = [p[key] for p in pts]
            if any(v is None for v in y):
                continue
            ax.errorbar(x, y, xerr=[p["plasticity_std"] for p in pts], yerr=[p[key + "_std"] for p in pts],
                        marker="o", ms=4, capsize=2, lw=1.2, label=name,
                        ls="--" if name == "trace_routed" else "-")
    axes[0].set_xlabel(f"plasticity ({metric})")
    axes[0].set_ylabel(f"BWT ({metric})")
    axes[0].set_title("learning against forgetting (mean ± std over seeds)", fontsize=9)
    axes[1].set_xlabel(f"plasticity ({metric})")
    axes[1].set_ylabel(f"general ability (task 0) change ({metric})")
    axes[1].set_title("learning against general ability", fontsize=9)
    titles = {"ppl_delta": ("perplexity change on general prose", "learning against language (lower is better)"),
              "bench_delta": ("standard benchmarks, mean change (points)", "learning against benchmarks")}
    for ax, key in zip(axes[2:], keys[2:]):
        ax.set_xlabel(f"plasticity ({metric})")
        ax.set_ylabel(titles[key][0])
        ax.set_title(titles[key][1], fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict, out: Path, metric: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / "results.json", json.dumps(results, indent=1).encode())
    write_bytes(out / "report.md", markdown(results, metric).encode())
    plot(results, out / "frontier.png", metric)
