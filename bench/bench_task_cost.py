"""Where a TRACE task's time and memory go, phase by phase, against a sequential full
fine-tuning (seqft) task on the same model, tasks and settings.

    python bench/bench_task_cost.py --model smollm2-135m [--tasks json,keyval] [--steps 30,100] [--probe-continue true|false]
        [--probe-autocast off|bf16|auto]
    python bench/bench_task_cost.py --model builtin --size medium

Each strategy runs in its own process (its peak resident memory is its own) through the
same code as `trace-ft run` (`run_strategy`), which records every phase: the model copy,
tokenisation, the probe, the Fisher passes, selection, core values (routing), history,
training setup and steps, scoring. Per phase: seconds (summed over tasks) and the peak
resident memory above the loaded base model. Per training step: seconds, and its ratio to
seqft's step (a full fine-tuning step with torch's AdamW). The whole run of each (training,
probe, selection, scoring after every task) and trace's ratio, at each step count given;
with two or more, the length from which trace's run is the cheaper. Learning rates are the
model's defaults unless given. Writes bench/results/task_cost_<model>.{json,md} and prints
the tables.
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

    from trace_ft.config import RunConfig, RunSetup
    from trace_ft.continual.sequence import run_strategy
    from trace_ft.continual.strategies import Trace
    from trace_ft.lm.memory import _rss

    torch.set_num_threads(args.threads)
    cfg = RunConfig.from_dict(dict(
        model=args.model, size=args.size, tasks=args.tasks.split(","), steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, trace_lr=args.trace_lr, trace_probe_steps=args.probe_steps,
        n_train=args.n_train, n_test=args.n_test, trace_core_grads=args.core_grads, trace_budget=args.budget,
        trace_granularity=args.granularity, trace_continue_probe=args.probe_continue,
        trace_probe_autocast=args.probe_autocast, seed=0))
    rss_start = _rss()
    setup = RunSetup.open(cfg, progress=False)
    base, path, tasks = setup.base, setup.model_dir, setup.tasks
    seq = setup.sequence()
    rss_base = _rss()
    strategy = setup.strategy(args.one)
    entry, _ = run_strategy(strategy, seq, base, setup.codec, cfg.train_config(), seed=0,
                            general_every=cfg.general_every, score_unseen=cfg.score_unseen)
    from trace_ft.method.probe import eligible_parameters

    c = entry["costs"]
    is_trace = isinstance(strategy, Trace)  # (trace_guard, trace_paper too)
    return {"strategy": args.one, "model": str(path), "params": sum(p.numel() for p in base.parameters()),
            "eligible": sum(p.numel() for _, p in eligible_parameters(base)),
            "core_fraction": args.budget, "tasks": len(tasks),
            "seconds": c["seconds"], "peak_bytes": c["peak_memory_bytes"], "phases": c["phases"],
            "rss_model_bytes": rss_base - rss_start,
            "train_steps": len(tasks) * (strategy.core_steps(args.steps) if is_trace else args.steps),
            "probe_steps": len(tasks) * strategy.pipeline.probe_steps if is_trace else 0,
            "probe_autocast": cfg.trace.probe_autocast if is_trace else None,  # (as "auto" resolved here)
            "probe_continued": strategy.continue_probe if is_trace else None,  # (as the default resolved it)
            "state_bytes": c["state_bytes"]}


def paired_steps(args) -> dict:
    """A trace training step against a full fine-tuning step, in one process, alternating:
    each trace step timed right after a seqft step on an identical copy of the model (the
    ratio of each adjacent pair, median over rounds; `common.paired_ratios`). The core is
    chosen as a task's is (a probe of `--probe-steps` on task batches, then `select_core` at
    `--budget`), so its spread over the layers, which decides where core-only gradients pay,
    is a real one. Steps as `lm.train.train_loop` takes them: loss, backward, clipping at
    1.0 (the core's gradient for trace), the optimizer step, zero_grad."""
    import copy

    import torch
    from torch import nn

    from common import paired_ratios
    from trace_ft.lm.model import open_model
    from trace_ft.lm.train import causal_lm_loss
    from trace_ft.method.pipeline import TracePipeline
    from trace_ft.method.select import SelectConfig

    from trace_ft.config import RunConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    resolved = RunConfig(model=args.model, lr=args.lr)  # the model's defaults where not given
    lr = resolved.lr
    trace_lr = args.trace_lr or resolved.trace.lr
    base, codec, _ = open_model(args.model, size=args.size, progress=False)
    vocab = base.get_input_embeddings().weight.shape[0]
    batches = [{"input_ids": ids, "labels": ids} for ids in
               (torch.randint(0, vocab, (args.batch_size, args.seq_len)) for _ in range(4))]
    pipe = TracePipeline(SelectConfig(budget=args.budget, granularity=args.granularity),
                         probe_steps=args.probe_steps or resolved.trace.probe_steps)
    core = pipe.select(pipe.probe(base, batches, lr=lr)).mask

    full = copy.deepcopy(base)
    full_opt = torch.optim.AdamW(full.parameters(), lr=lr, weight_decay=0.0, fused=True)
    trace = copy.deepcopy(base)
    setup = TracePipeline.train_setup(trace, core, lr=trace_lr, core_grads=args.core_grads)
    turn = {"i": 0}

    def step(model, opt, clip):
        batch = batches[turn["i"] % len(batches)]
        causal_lm_loss(model, batch).backward()
        clip()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def seqft():
        step(full, full_opt, lambda: nn.utils.clip_grad_norm_(full.parameters(), 1.0))

    def trace_step():
        step(trace, setup.optimizer, lambda: setup.optimizer.clip_grad_norm_(1.0))
        turn["i"] += 1

    out = paired_ratios(seqft, {"trace": trace_step}, rounds=args.paired_rounds)["trace"]
    setup.restore()
    return {**out, "core_elements": core.numel_selected, "seq_len": args.seq_len, "batch_size": args.batch_size}


def floors(P: int, E: int, k: float, tasks: int, element: bool) -> dict[str, tuple[str, float]]:
    """The least memory each phase of an fp32 task needs above the loaded base model (its
    working copy included), in bytes, by formula: P parameters, E eligible, core fraction k.
    Activations are not in it."""
    large = E > 1 << 24
    # element level below 2^24 blocks: fp32 block sums (8), max cosine (4), score (8) per
    # element; past it the selection streams (select_streamed): no per-element state, at
    # most 2k candidates of 16 bytes (an index and a score)
    sel = 20 if element and not large else (32 * k if element else 0)
    return {
        "seqft: train steps": ("copy 4P + grads 4P + moments 8P", 16 * P),
        "trace: probe": ("copy 4P + (grads, 2 moments) 12E; past 2^24 elements the Fisher is the second "
                         "moment and the pre-probe copy is on disk (else +8E); Δ into a spent moment",
                         4 * P + (12 if large else 20) * E),
        "trace: selection": (f"copy 4P + probe's Δ, F 8E + per block {sel:g}E", 4 * P + (8 + sel) * E),
        "trace: train steps": ("copy 4P + core moments and gradients 12kE + history: on disk past 2^24 "
                               "elements (else fp32 Δ 4E/task)",
                               4 * P + 12 * k * E + (0 if large else 4 * E * tasks)),
    }


def projection(P: float = 8.03e9, E: float = 6.98e9, k: float = 0.05, ranks: int = 8) -> str:
    """An 8B model (Llama-3-8B shapes: 8.03B parameters, 6.98B in attention and MLP
    matrices) in bf16, by the same formulas with 16-bit parameters: per device, on one 80 GB
    GPU and under FSDP2 over 8 (everything sharded evenly)."""
    rows = [
        ("full fine-tuning (bf16 weights and grads, fp32 masters and moments)", 16 * P),
        ("trace probe (bf16 weights and grads, fp32 moments, the Fisher from the second moment, "
         "bf16 pre-probe copy, stochastic rounding: no masters)", 2 * P + 12 * E),
        ("trace probe, pre-probe copy offloaded to host memory or disk", 2 * P + 10 * E),
        ("trace selection, row level (the probe's Δ in bf16 and Fisher; per-row sums are MBs)", 2 * P + 6 * E),
        ("trace selection, element level, streamed (the probe's fp32 Δ and Fisher; no per-element "
         "state)", 2 * P + 8 * E),
        (f"trace training, {k:.0%} core (bf16 weights, fp32 masters and moments of the core, "
         "core-only gradients)", 2 * P + 14 * k * E),
        ("history: one task's exact update (bf16)", 2 * E),
        ("history: one task's update sketched per row at 1/16", 2 * E / 16),
    ]
    out = ["| phase | one GPU (GB) | fits 80 GB | FSDP2, per GPU of 8 (GB) |", "|---|---:|---|---:|"]
    for name, b in rows:
        out.append(f"| {name} | {b / 1e9:.1f} | {'yes' if b < 80e9 else 'no'} | {b / ranks / 1e9:.1f} |")
    return "\n".join(out)


def _autocast(results: dict, args) -> str:
    """How the probe's products ran, for the table's heading (empty: the weights' dtype)."""
    # as the trace run resolved it; results saved before it was recorded: the flag (before
    # the flag: off)
    mode = results["trace"].get("probe_autocast") or getattr(args, "probe_autocast", None) or "off"
    return "" if mode == "off" else f" (products in {mode})"


def table(results: dict, args) -> str:
    seq, tr = results["seqft"], results["trace"]
    step = {k: r["phases"]["train steps"]["seconds"] / r["train_steps"] for k, r in results.items()
            if k != "paired"}
    gib = 2 ** 30
    lines = [f"Model `{args.model}`{f' ({args.size})' if args.model == 'builtin' else ''}, "
             f"{seq['params']:,} parameters; tasks {args.tasks}; {args.steps} steps per task, batch "
             f"{args.batch_size}; trace: {args.granularity} level, budget {args.budget}, probe "
             f"{tr['probe_steps'] // max(1, tr['tasks'])} steps{_autocast(results, args)}"
             f"{', counted toward the task' if tr.get('probe_continued') else ''}, core-only gradients "
             f"{args.core_grads}. "
             f"Machine: {getattr(args, 'machine', None) or 'not recorded'}, {args.threads} threads. Peak: resident memory above the loaded "
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
    paired = results.get("paired")
    probe = tr["phases"].get("probe", {"seconds": 0.0})["seconds"] / max(1, tr["probe_steps"])
    # fixed costs: every phase but steps and scoring (the routed rescoring is an analysis
    # that runs after the strategy, outside its time, and is not counted either)
    fixed = sum(r["seconds"] for p, r in tr["phases"].items()
                if p not in ("train steps", "probe", "scoring", "scoring: perplexity", "scoring: routed"))
    allowed = seq["seconds"] + tr["probe_steps"] * 1.1 * step["seqft"]
    lines += ["", f"- training step: trace {step['trace']:.2f} s, seqft (full fine-tuning) {step['seqft']:.2f} s: "
              f"**{step['trace'] / step['seqft']:.2f}×** (each run's mean step, in separate processes)",
              *([f"- training step, paired in one process ({paired['rounds']} rounds, each trace step right "
                 f"after a full fine-tuning step on an identical model; batch {paired['batch_size']} × "
                 f"{paired['seq_len']} tokens): trace {paired['median_s']:.2f} s, full "
                 f"{paired['baseline_median_s']:.2f} s, median ratio **{paired['ratio']:.2f}×** "
                 f"(per-pair range {paired['ratio_min']:.2f}–{paired['ratio_max']:.2f})"] if paired else []),
              f"- probe step: {probe:.2f} s, **{probe / step['seqft']:.2f}×** a full fine-tuning step",
              f"- peak memory: trace / seqft **{tr['peak_bytes'] / seq['peak_bytes']:.2f}×**",
              f"- trace's fixed costs (all but training, probe and scoring): {fixed:.1f} s, "
              f"{100 * fixed / tr['seconds']:.1f} % of its run",
              f"- trace's time {tr['seconds']:.0f} s (the routed rescoring, an analysis run after it, not "
              f"included) against seqft's plus its probe steps at 1.1× a full step, {allowed:.0f} s: "
              f"**{tr['seconds'] / allowed:.2f}×**",
              f"- optimizer state: trace {tr['state_bytes'] / 2**20:.1f} MiB, seqft {seq['state_bytes'] / 2**20:.1f} MiB"]
    P, E = seq["params"], seq["eligible"]
    lines += ["", f"Floors (bytes by formula; P = {P:,} parameters, E = {E:,} eligible, k = {args.budget}, "
              f"{tr['tasks']} tasks; activations not included) against the measured peak of the phase:", "",
              "| phase | floor | floor GiB | measured GiB |", "|---|---|---:|---:|"]
    measured = {"seqft: train steps": seq["phases"]["train steps"]["peak_bytes"],
                "trace: probe": tr["phases"]["probe"]["peak_bytes"],
                "trace: selection": tr["phases"]["selection"]["peak_bytes"],
                "trace: train steps": tr["phases"]["train steps"]["peak_bytes"]}
    for name, (formula, b) in floors(P, E, args.budget, tr["tasks"], args.granularity == "element").items():
        lines.append(f"| {name} | {formula} | {b / gib:.2f} | {measured[name] / gib:.2f} |")
    lines += ["", "Projected for an 8B model in bf16 (same formulas, 16-bit weights):", "", projection()]
    return "\n".join(lines)


def whole_run(runs: dict[int, dict]) -> str:
    """Per step count, each strategy's whole run (its training, probe, selection and the
    scoring after every task) and trace's ratio; with two or more step counts, each
    strategy's time as fixed + per-step · steps (least squares) and the length from which
    trace's run is the cheaper."""
    lines = ["| steps per task | seqft s (mean) | trace s (mean) | trace / seqft "
             "| each pair, trace/seqft s (ABBA order) | peak trace / seqft |",
             "|---:|---:|---:|---:|---|---:|"]
    secs = {n: r.get("repeats") or {k: [r[k]["seconds"]] for k in ("seqft", "trace")} for n, r in runs.items()}
    for n, r in sorted(runs.items()):
        s_, t_ = secs[n]["seqft"], secs[n]["trace"]
        each = ", ".join(f"{t:.0f}/{s:.0f}" for s, t in zip(s_, t_))
        lines.append(f"| {n} | {sum(s_) / len(s_):.0f} | {sum(t_) / len(t_):.0f} | "
                     f"**{sum(t_) / sum(s_):.2f}×** | {each} | "
                     f"{r['trace']['peak_bytes'] / r['seqft']['peak_bytes']:.2f}× |")
    if len(runs) >= 2:
        import numpy as np

        xs = sorted(runs)
        (b_s, a_s), (b_t, a_t) = (np.polyfit(xs, [sum(secs[n][name]) / len(secs[n][name]) for n in xs], 1)
                                  for name in ("seqft", "trace"))
        if b_s <= b_t:
            where = "at no length past the fit's fixed parts (its step costs as much)"
        else:
            cross = (a_t - a_s) / (b_s - b_t)
            where = f"from **{cross:.0f} steps per task** on" if cross > 0 else "at **any length**"
        lines += ["", f"Fitted per run: seqft {a_s:.0f} s + {b_s:.1f} s × steps, trace {a_t:.0f} s + {b_t:.1f} s × "
                  f"steps (per task sequence); trace's run is the cheaper {where}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--size", default="medium", help="with --model builtin")
    ap.add_argument("--tasks", default=None, help="default: json,keyval (real model), rev,sub (builtin)")
    ap.add_argument("--steps", default="10", help="steps per task; several (30,100): one pair of runs each, "
                                                  "the whole-run ratio at each and the crossover")
    ap.add_argument("--probe-steps", type=int, default=None, help="default: the model's (trace-ft run's)")
    ap.add_argument("--probe-continue", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                    help="trace continues from its probe, its steps counted toward the task (true/false; "
                         "default: the run's, by the probe's share of the task)")
    ap.add_argument("--probe-autocast", choices=["off", "bf16", "fp16", "auto"],
                    help="trace's probe products in this dtype (trace-ft's --probe-autocast; default: "
                         "the run's, auto for a pretrained model)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="default: the model's (trace-ft run's)")
    ap.add_argument("--trace-lr", type=float, default=None, help="default: the model's (trace-ft run's)")
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--core-grads", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--granularity", default="element")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64, help="the paired step timing's sequence length")
    ap.add_argument("--paired-rounds", type=int, default=8, help="the paired step timing's rounds (0: skip it)")
    ap.add_argument("--out", default=None, help="default bench/results/task_cost_<model>")
    ap.add_argument("--repeats", type=int, default=1,
                    help="whole runs of each strategy per step count, in ABBA order (seqft, trace, trace, "
                         "seqft, ...): the machine's speed drifts ~20 %% within an hour, so one pair's ratio "
                         "moves by as much; the phase tables are the first pair's")
    ap.add_argument("--render", help="re-render the table of a saved JSON result (no run)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this strategy and print JSON
    args = ap.parse_args()
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        if "runs" not in saved:  # saved before round 7: one step count, the paired timing among the results
            results = dict(saved["results"])
            saved = {**saved, "paired": results.pop("paired", None), "runs": {saved["args"]["steps"]: results}}
        print(report(saved["runs"], saved.get("paired"), argparse.Namespace(**{**vars(args), **saved["args"]})))
        return
    from common import machine

    real = args.model != "builtin"
    args.tasks = args.tasks or ("json,keyval" if real else "rev,sub")
    if args.one:
        args.steps = int(args.steps)
        print("RESULT " + json.dumps(paired_steps(args) if args.one == "paired" else one(args)))
        return
    runs, paired = {}, None
    for n in [int(x) for x in args.steps.split(",")]:
        runs[n] = {name: _child(name, n) for name in ("seqft", "trace")}
        if args.repeats > 1:  # then trace before seqft, and so on (ABBA): a linear drift cancels
            order = [("trace", "seqft") if i % 2 else ("seqft", "trace") for i in range(1, args.repeats)]
            more = [{name: _child(name, n)["seconds"] for name in pair} for pair in order]
            runs[n]["repeats"] = {name: [runs[n][name]["seconds"]] + [m[name] for m in more]
                                  for name in ("seqft", "trace")}
    if args.paired_rounds:
        paired = _child("paired", int(args.steps.split(",")[0]))
    stem = args.out or str(ROOT / "bench" / "results" / f"task_cost_{'builtin_' + args.size if not real else args.model}")
    args.machine = machine()["cpu"]  # (saved with the arguments: a re-render names the machine that ran it)
    Path(stem + ".json").write_text(json.dumps({"args": vars(args), "runs": runs, "paired": paired}, indent=1))
    text = report(runs, paired, args)
    print(text)
    Path(stem + ".md").write_text(f"# Cost of a task, phase by phase\n\n{text}\n")


def _child(name: str, steps: int) -> dict:
    """Run one strategy (or the paired timing) in a process of its own and read its JSON."""
    argv = list(sys.argv[1:])
    if "--steps" in argv:
        argv[argv.index("--steps") + 1] = str(steps)
    else:
        argv += ["--steps", str(steps)]
    done = subprocess.run([sys.executable, __file__, *argv, "--one", name], capture_output=True, text=True)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not line:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def report(runs: dict, paired: dict | None, args) -> str:
    """The whole-run table, then each step count's phase table."""
    runs = {int(n): r for n, r in runs.items()}
    out = ["## The whole run", "", whole_run(runs)]
    for n, r in sorted(runs.items()):
        r = {k: v for k, v in r.items() if k != "repeats"}
        out += ["", f"## {n} steps per task", "", table({**r, **({"paired": paired} if paired else {})},
                                                        argparse.Namespace(**{**vars(args), "steps": n}))]
    return "\n".join(out)


if __name__ == "__main__":
    main()
