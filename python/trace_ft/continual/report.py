"""What a run leaves behind: results.json, report.md (the comparison table and every
accuracy matrix) and accuracy.png (one heatmap per strategy)."""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path

import torch

from ..benchmarks.results import mean_change
from ..store.atomic import write_bytes
from ..tasks.real import near_benchmarks

COLUMNS = ("AP", "BWT", "FWT", "forgetting", "plasticity", "base_change")


def _fmt(v, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def versions() -> dict:
    """The versions a run was made with (the report says them)."""
    import trace_kernels

    out = {"python": sys.version.split()[0], "platform": platform.platform(),
           "torch": torch.__version__, "trace_kernels": trace_kernels.__version__}
    for mod in ("transformers", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def summary_table(results: dict) -> str:
    ppl = any("general" in r for r in results["strategies"].values())
    bench = any("general_bench" in r for r in results["strategies"].values())
    head = ("| strategy | AP | BWT | FWT | forgetting | plasticity | base Δ " + ("| ppl Δ " if ppl else "")
            + ("| bench Δ " if bench else "") + "| trainable % | optimizer state | time (s) | peak memory |")
    lines = [head, "|" + "|".join(["---"] * (11 + ppl + bench)) + "|"]
    for name, r in results["strategies"].items():
        m, c = r["metrics"], r["costs"]
        lines.append(
            f"| {name} | " + " | ".join(_fmt(m[k]) for k in COLUMNS)
            + (f" | {_fmt(m.get('ppl_change'), 2)}" if ppl else "")
            + (f" | {_fmt(m.get('bench_change'))}" if bench else "")
            + f" | {100 * c['trainable_fraction']:.2f} | {_bytes(c['state_bytes'])} "
            f"| {c['seconds']:.0f} | {_bytes(c['peak_memory_bytes'])} |")
    return "\n".join(lines)


def general_table(results: dict) -> str:
    """Task 0 (general ability) after each task, by every measure: the probe's exact score
    and answer log-likelihood, and the perplexity on general prose where it was measured."""
    first = results["first_task_column"]
    if not first:
        return ""
    tasks = results["columns"][first:]
    head = "| strategy | measure | start | " + " | ".join(f"after {t}" for t in tasks) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(tasks)]
    for name, r in results["strategies"].items():
        matrices = r.get("matrices", {"exact": r["matrix"]})
        rows = [("exact %", [row[0] for row in matrices["exact"]], 1)]
        if "loglik" in matrices:
            rows.append(("answer loglik", [row[0] for row in matrices["loglik"]], 2))
        if "general" in r:
            rows.append(("perplexity", r["general"]["perplexity"], 2))
        for label, values, digits in rows:
            lines.append(f"| {name} | {label} | " + " | ".join(_fmt(v, digits) for v in values) + " |")
    return "\n".join(lines)


def bench_table(results: dict) -> str:
    """Each standard benchmark at the start and the end, per strategy, on its primary metric
    (OLMES's), and the change with its paired standard error; the mean change, and without
    the benchmarks near the sequence's tasks where some are (see `tasks.real`)."""
    rows = [(n, r["general_bench"]) for n, r in results["strategies"].items() if "general_bench" in r]
    if not rows:
        return ""
    names = list(next(iter(rows))[1]["change"] or (next(iter(rows))[1]["rows"][0] or {}))
    near = near_benchmarks(results["config"].get("tasks") or [], names)
    lines = ["| strategy | " + " | ".join(names) + " | mean Δ |" + f" without {', '.join(near)} |" * bool(near),
             "|---|" + "---|" * (len(names) + 1 + bool(near))]
    for strategy, b in rows:
        base, last = b["rows"][0], next((r for r in reversed(b["rows"][1:]) if r is not None), None)
        cells = []
        for n in names:
            if base is None or last is None or n not in b["change"]:
                cells.append("–")
                continue
            primary = b["change"][n]["primary"]
            c = b["change"][n][primary]
            cells.append(f"{base[n][primary]:.1f} → {last[n][primary]:.1f} ({c['delta']:+.1f} ± {c['se']:.1f})")
        means = [(b["mean_change"], b["mean_change_se"])] + [mean_change(b["change"], near)] * bool(near)
        cells += ["–" if m is None else f"{m:+.1f} ± {se:.1f}" for m, se in means]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_table(results: dict) -> str:
    """AP, BWT and plasticity for every metric, side by side."""
    names = [m for m in ("exact", "edit", "loglik")
             if all(m in r.get("metrics_by", {}) for r in results["strategies"].values())]
    if not names:
        return ""
    head = "| strategy | " + " | ".join(f"{m} AP | {m} BWT | {m} plasticity" for m in names) + " |"
    lines = [head, "|---|" + "---|" * (3 * len(names))]
    for name, r in results["strategies"].items():
        cells = []
        for m in names:
            mm = r["metrics_by"][m]
            digits = 2 if m == "loglik" else 1
            cells += [_fmt(mm["AP"], digits), _fmt(mm["BWT"], digits), _fmt(mm["plasticity"], digits)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matrix_table(results: dict, name: str) -> str:
    cols = results["columns"]
    first = results["first_task_column"]
    header = "| after \\ on | " + " | ".join(
        (f"{c} (task 0)" if i < first else c) for i, c in enumerate(cols)) + " |"
    lines = [header, "|" + "|".join(["---"] * (len(cols) + 1)) + "|"]
    tasks = cols[first:]
    for j, row in enumerate(results["strategies"][name]["matrix"]):
        label = "start" if j == 0 else f"{j}: {tasks[j - 1]}"
        if all(v is None for v in row):
            continue
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    cfg = results["config"]
    bench = bench_table(results)
    v = results["versions"]
    parts = [
        "# trace-ft run",
        "",
        f"Model `{results['model']}` ({results['total_params']:,} parameters); tasks in order: "
        f"{', '.join(results['columns'][results['first_task_column']:])}; "
        f"{cfg['steps']} steps per task, batch {cfg['batch_size']}, lr {cfg['lr']:g} "
        f"({cfg['schedule']}, warmup {cfg['warmup']:g}), seed {cfg['seed']}. "
        f"torch {v['torch']}, transformers {v['transformers']}, trace_kernels {v['trace_kernels']}; "
        f"{results['seconds']:.0f} s in all.",
        "",
        "Scores are exact-match accuracy (%) on held-out test examples, greedy decoding. "
        "AP: mean over the tasks after the last one. BWT: mean of (final − just after "
        "learning) over all but the last task. FWT: score before a task's training minus the "
        "untrained model's. forgetting: mean of (best earlier − final). plasticity: mean score "
        "right after each task's own training. base Δ: change of task 0, general ability (the "
        "built-in model's base skill; for other models the probe of knowledge and instruction "
        "following, scored by whether the answer is given). ppl Δ: change of the perplexity on "
        "general prose (Python's documentation; not for the built-in model). trainable %: elements the optimizer may change, of all "
        "parameters, mean over tasks. mtl trains on all tasks jointly, so it has only a final "
        "row. Optimizer state: largest over the tasks (EWC includes its Fisher and anchor). "
        + results.get("memory_note", "") + ". trace_routed scores each task with the model as "
        "it stood right after it, rebuilt from the final model by setting later cores back "
        "(BWT exactly 0 when routing is exact).",
        "",
        summary_table(results),
        "",
        "## Every metric",
        "",
        "exact: exact match (%); edit: partial credit, the normalised edit similarity of the "
        "decoded answer (%); loglik: the teacher-forced mean log-likelihood of the answer "
        "tokens (nats per token; its BWT is a change in nats).",
        "",
        metrics_table(results),
        "",
        "## General ability (task 0)",
        "",
        general_table(results),
        "",
        *(["## Standard benchmarks", "",
           "Zero-shot ranked classification as OLMES scores it (`trace-ft eval`), on each benchmark's "
           "primary metric (acc or acc per character), from the start to the end of each strategy's "
           "run: start → end (change ± paired standard error, in points). bench Δ above: the mean "
           "change. Without: the mean change leaving out the benchmarks that ask the kind of question one "
           "of the tasks trains (from another source), which that training lifts by transfer.", "", bench, ""] if bench else []),
        "## Accuracy matrices",
        "",
    ]
    for name, r in results["strategies"].items():
        parts += [f"### {name}", "", f"settings: `{json.dumps(r['config'])}`", "",
                  matrix_table(results, name), ""]
    return "\n".join(parts)


def heatmaps(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results["strategies"])
    cols = results["columns"]
    n = len(names)
    ncol = min(3, n)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol + 0.8, 3.2 * nrow), squeeze=False,
                             constrained_layout=True)
    for ax, name in zip(axes.flat, names):
        m = np.array([[np.nan if v is None else v for v in row]
                      for row in results["strategies"][name]["matrix"]], dtype=float)
        im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        joint = bool(np.isnan(m[1:-1]).all()) and m.shape[0] > 2
        ax.set_title(name + (" (joint training: start and end only)" if joint else ""), fontsize=8)
        ax.set_xticks(range(len(cols)), cols, rotation=45, fontsize=7)
        ax.set_yticks(range(m.shape[0]), ["start"] + cols[results["first_task_column"]:], fontsize=7)
        ax.set_xlabel("scored on", fontsize=7)
        ax.set_ylabel("after training on", fontsize=7)
        for (j, i), v in np.ndenumerate(m):
            if not np.isnan(v):
                ax.text(i, j, f"{v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 60 else "black")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy (%)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / "results.json", json.dumps(results, indent=1).encode())
    write_bytes(out / "report.md", markdown(results).encode())
    heatmaps(results, out / "accuracy.png")
