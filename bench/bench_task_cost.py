"""Where a TRACE task's time and memory go, phase by phase, against a sequential full
fine-tuning (seqft) task on the same model, tasks and settings.

    python bench/bench_task_cost.py --model smollm2-135m [--tasks json,keyval] [--steps 10]
    python bench/bench_task_cost.py --model builtin --size medium

Each strategy runs in its own process (its peak resident memory is its own) through the
same code as `trace-ft run` (`run_strategy`), which records every phase: the model copy,
tokenisation, the probe, the Fisher passes, selection, core values (routing), history,
training setup and steps, scoring. Per phase: seconds (summed over tasks) and the peak
resident memory above the loaded base model. Per training step: seconds, and its ratio to
seqft's step (a full fine-tuning step with torch's AdamW). Writes
bench/results/task_cost_<model>.{json,md} and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

PHASE_ORDER = ("model copy", "tokenize", "guard fisher", "probe", "selection", "core values", "train setup",
               "train steps", "history", "scoring", "scoring: perplexity", "scoring: routed")


def one(args) -> dict:
    """Run one strategy through the tasks (in this process) and return its costs."""
    import torch

    from trace_ft.config import RunConfig, build_strategy, general_tasks
    from trace_ft.continual.sequence import TaskSequence, run_strategy
    from trace_ft.evaluate import general_perplexity
    from trace_ft.lm.memory import _rss
    from trace_ft.lm.model import open_model
    from trace_ft.tasks import resolve_tasks

    torch.set_num_threads(args.threads)
    cfg = RunConfig(model=args.model, size=args.size, tasks=args.tasks.split(","), steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, trace_lr=args.trace_lr,
                    trace_probe_steps=args.probe_steps, n_train=args.n_train, n_test=args.n_test,
                    trace_core_grads=args.core_grads, seed=0)
    cfg.validate()
    rss_start = _rss()
    base, codec, path = open_model(cfg.model, size=cfg.size, progress=False)
    general, guard = general_tasks(cfg)
    tasks = resolve_tasks(cfg.task_names, cfg.seed, cfg.n_train, cfg.n_test)
    ppl = None if cfg.model == "builtin" else general_perplexity(codec, base)
    seq = TaskSequence.build(tasks, general, base, codec, perplexity=ppl)
    rss_base = _rss()
    strategy = build_strategy(args.one, cfg, guard)
    entry = run_strategy(strategy, seq, base, codec, cfg.train_config(), seed=0)
    c = entry["costs"]
    return {"strategy": args.one, "model": str(path), "params": sum(p.numel() for p in base.parameters()),
            "seconds": c["seconds"], "peak_bytes": c["peak_memory_bytes"], "phases": c["phases"],
            "rss_model_bytes": rss_base - rss_start, "train_steps": args.steps * len(tasks),
            "probe_steps": args.probe_steps * len(tasks) if args.one.startswith("trace") else 0,
            "state_bytes": c["state_bytes"]}


def table(results: dict, args) -> str:
    from common import machine

    seq, tr = results["seqft"], results["trace"]
    step = {k: r["phases"]["train steps"]["seconds"] / r["train_steps"] for k, r in results.items()}
    gib = 2 ** 30
    lines = [f"Model `{args.model}`{f' ({args.size})' if args.model == 'builtin' else ''}, "
             f"{seq['params']:,} parameters; tasks {args.tasks}; {args.steps} steps per task, batch "
             f"{args.batch_size}; trace: probe {args.probe_steps} steps, core grads {args.core_grads}. "
             f"Machine: {machine()['cpu']}, {args.threads} threads. Peak: resident memory above the loaded "
             "base model (the base itself: "
             f"{seq['rss_model_bytes'] / gib:.2f} GiB).", "",
             "| phase | seqft s | seqft peak GiB | trace s | trace peak GiB |", "|---|---:|---:|---:|---:|"]
    names = [p for p in PHASE_ORDER if p in seq["phases"] or p in tr["phases"]]
    names += sorted((set(seq["phases"]) | set(tr["phases"])) - set(names))
    for p in names:
        cells = []
        for r in (seq, tr):
            row = r["phases"].get(p)
            cells += ["–", "–"] if row is None else [f"{row['seconds']:.1f}", f"{row['peak_bytes'] / gib:.2f}"]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines.append(f"| **whole run** | {seq['seconds']:.0f} | {seq['peak_bytes'] / gib:.2f} | "
                 f"{tr['seconds']:.0f} | {tr['peak_bytes'] / gib:.2f} |")
    probe = tr["phases"].get("probe", {"seconds": 0.0})["seconds"] / max(1, tr["probe_steps"])
    fixed = tr["seconds"] - sum(tr["phases"].get(p, {"seconds": 0})["seconds"] for p in
                                ("train steps", "probe", "scoring", "scoring: perplexity", "scoring: routed"))
    allowed = seq["seconds"] + tr["probe_steps"] * 1.1 * step["seqft"]
    lines += ["", f"- training step: trace {step['trace']:.2f} s, seqft (full fine-tuning) {step['seqft']:.2f} s: "
              f"**{step['trace'] / step['seqft']:.2f}×**",
              f"- probe step: {probe:.2f} s, **{probe / step['seqft']:.2f}×** a full fine-tuning step",
              f"- peak memory: trace / seqft **{tr['peak_bytes'] / seq['peak_bytes']:.2f}×**",
              f"- trace's fixed costs (all but training, probe and scoring): {fixed:.1f} s, "
              f"{100 * fixed / tr['seconds']:.1f} % of its run",
              f"- trace's time {tr['seconds']:.0f} s against seqft's plus its probe steps at 1.1× a full "
              f"step, {allowed:.0f} s: **{tr['seconds'] / allowed:.2f}×**",
              f"- optimizer state: trace {tr['state_bytes'] / 2**20:.1f} MiB, seqft {seq['state_bytes'] / 2**20:.1f} MiB"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--size", default="medium", help="with --model builtin")
    ap.add_argument("--tasks", default=None, help="default: json,keyval (real model), rev,sub (builtin)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--probe-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--trace-lr", type=float, default=None)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--core-grads", type=lambda s: s.lower() in ("1", "true", "yes"), default=False)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="default bench/results/task_cost_<model>")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this strategy and print JSON
    args = ap.parse_args()
    real = args.model != "builtin"
    args.tasks = args.tasks or ("json,keyval" if real else "rev,sub")
    args.lr = args.lr or (2e-5 if real else 1e-3)
    args.trace_lr = args.trace_lr or (2e-4 if real else 1e-2)
    if args.one:
        print("RESULT " + json.dumps(one(args)))
        return
    results = {}
    for name in ("seqft", "trace"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", name]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode != 0 or not line:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(line[-1][7:])
    text = table(results, args)
    print(text)
    stem = args.out or str(ROOT / "bench" / "results" / f"task_cost_{'builtin_' + args.size if not real else args.model}")
    Path(stem + ".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    Path(stem + ".md").write_text(f"# Cost of a task, phase by phase\n\n{text}\n")


if __name__ == "__main__":
    main()
