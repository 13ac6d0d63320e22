"""The learning–forgetting frontier of TRACE and its baselines on a real pretrained chat
model: SmolLM2-135M-Instruct, three tasks of the instruct suite, general ability measured
at the start and the end. Writes bench/results/frontier_smollm2/{results.json,report.md,frontier.png}.

    python bench/frontier_real.py [--regime gentle|hot|hot-bench|hot-bench-gemma[-lower]|real|real-short|real-100] [--out DIR]
        [--stage 1|2|all|levers|continue] [--seeds N] [--strategies seqft,trace,...] [--levers K=V,...]

Stage 1: every point of each strategy's real-model grid (`continual.frontier.REAL_GRIDS`:
seqft and lora lr, trace and trace_guard core lr), seed 0. Stage 2: seeds 1..N-1 at each
strategy's point nearest the plasticity the strategies share (the median over stage 1's
points), into the same results with `--resume`. Both stages are the `trace-ft frontier`
command a user runs; this script only picks stage 2's points. Resumable: run it again.

Stage "levers": the method's levers at trace's stage-2 core lr, seed 0, into the same results:
the guard on general text (trace_guard), then each of `--levers` (default: a smaller budget,
2 %, and row granularity; any `trace_<field>=value`, one run each).
Stage "continue": trace at the same core lr (the regime's point where it has no stage 1), with
and without `--probe-continue` (the probe's steps count toward the task, core training goes
on from the probe's state), `--seeds` seeds, seed by seed, into the same results: does
continuing change forgetting and general ability?

Regimes: "gentle" (lr 3e-5, 12 steps per task: full fine-tuning keeps general ability),
"hot" (lr 1e-4, 16 steps: the regime where full fine-tuning loses it, and where TRACE's
claim is tested), each with its own grids and results directory, and "hot-bench": hot's
points of equal plasticity, every seed at once, general ability also on the standard
benchmarks (`--general-bench headline`, 250 questions each), and "hot-bench-gemma" the same
on Gemma 3 270M ("hot-bench-gemma-lower": each knob a notch lower, into the same results); "real": the real suite
(SQuAD, SciQ, code, arithmetic, Jeopardy; ~50 min a point here), one point per
strategy, seed 0 in stage 1 and `--seeds` at the points of `--stage2-strategies` in stage 2
(with trace's routed row);
"real-short": the same with MedMCQA, arithmetic and Jeopardy only (~11 min a point);
"real-100": SciQ, arithmetic and Jeopardy at 100 steps and 200 test examples (~20 min a point);
"real-30": the same tasks at 30 steps (~16-17 min a point here), where the probe's 8 steps are a
quarter of the task: the middle length for probe continuation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("seqft", "lora", "trace", "trace_guard")
KNOB = {"seqft": "lr", "lora": "lora_lr", "trace": "trace_lr", "trace_guard": "trace_lr"}
# Three of the suite's tasks (keyval rewrites json's inputs in a conflicting format), 12
# steps each at batch 8 (the formats are learned in about 10 at lr 1e-4), 16 test examples
# per task, general ability at the start and the end: a point is one continual run of
# 5-9 minutes on 2 CPU cores
SETTINGS = ["--model", "smollm2-135m", "--suite", "instruct", "--tasks", "json,keyval,intro",
            "--steps", "12", "--batch-size", "8", "--n-train", "400", "--n-test", "16",
            "--probe-steps", "8", "--probe-lr", "3e-5", "--lr", "3e-5", "--general-every", "end", "--quiet",
            # every study here was run with the probe in the weights' dtype (before round 15's
            # bf16 default), so it resumes so; the bf16 probe is a lever (trace_probe_autocast=bf16)
            "--probe-autocast", "off",
            # and with core training from the task's start (before round 20's default, which
            # continues from the probe where it is at most a tenth of the task); continuing is
            # the lever of stage "continue"
            "--probe-continue", "false"]


# per regime: settings that replace SETTINGS' values, the stage-1 grids (None: the
# defaults, `continual.frontier.REAL_GRIDS`) and the results directory
HOT = {"--steps": "16", "--lr": "1e-4", "--probe-lr": "1e-4"}
# general ability also on the standard benchmarks: the headline four, the first 250 questions of each
BENCH = {"--general-bench": "headline", "--general-bench-limit": "250"}
GEMMA = {**HOT, "--model": "gemma3-270m", **BENCH}
# the real suite (tasks.real) at the hot regime's lr; the routed row only in stage 2
REAL = {"--suite": "real", "--n-train": "1000", "--lr": "1e-4", "--probe-lr": "1e-4", **BENCH, "--routed": "false"}
# the hot regime's points of equal plasticity (stage 2 of "hot")
HOT_POINTS = {"seqft": "lr=1e-4", "lora": "lora_lr=1e-3", "trace": "trace_lr=3e-4"}
REAL_POINTS = {**HOT_POINTS, "trace_guard": "trace_lr=3e-4"}
REGIMES = {
    "gentle": ({}, None, "frontier_smollm2"),
    "hot": (HOT, {"seqft": "lr=1e-4", "lora": "lora_lr=1e-3", "trace": "trace_lr=3e-4,1e-3",
                  "trace_guard": "trace_lr=1e-3"}, "frontier_smollm2_hot"),
    # the hot regime's points of equal plasticity with the standard benchmarks: stage 1 runs
    # every seed there at once
    "hot-bench": ({**HOT, **BENCH}, HOT_POINTS, "frontier_smollm2_hot_bench"),
    # the same on the second family: Gemma 3 270M, the pre-trained base model (plain framing,
    # no chat template), at the same settings and knob values (seed 0: plasticity 97.9-100
    # for all three, so these are points of equal plasticity there too) ...
    "hot-bench-gemma": (GEMMA, HOT_POINTS, "frontier_gemma3_hot_bench"),
    # ... where every method wrecks Gemma (full fine-tuning: perplexity 24 -> 11,653), so each
    # knob a notch lower (a third; trace's core lr at the run's lr), into the same results
    "hot-bench-gemma-lower": (GEMMA, {"seqft": "lr=3e-5", "lora": "lora_lr=3e-4", "trace": "trace_lr=1e-4"},
                              "frontier_gemma3_hot_bench"),
    # five real tasks, general ability on the knowledge probe, the perplexity and the headline
    # benchmarks; one point per strategy (the hot regime's equal-plasticity settings), seed 0
    # in stage 1, more seeds in stage 2 (a step of SQuAD's ~200-token prompts takes 6-13 s
    # here, so ~50 min a point at 24 steps per task and 100 test examples)
    "real": ({**REAL, "--tasks": "squad,sciq,code,arith,jeopardy", "--steps": "24", "--n-test": "100"},
             REAL_POINTS, "frontier_smollm2_real"),
    # three of the real tasks with short prompts (medicine, arithmetic, trivia; ~11 min a
    # point here): the first real-task comparison, while the full sequence needs ~50 min a point
    "real-short": ({**REAL, "--tasks": "medmcqa,arith,jeopardy", "--steps": "24", "--n-test": "100"},
                   REAL_POINTS, "frontier_smollm2_real_short"),
    # the real tasks sized to be learned (round 8): science, arithmetic and trivia, short
    # prompts, 100 steps each (arithmetic went 8 -> 27 in 100 steps of full fine-tuning, 8 -> 7
    # in 24; MedMCQA stayed at chance and left the suite), 200 test examples (SE <= 3.5
    # points); ~20 min a point here
    "real-100": ({**REAL, "--tasks": "sciq,arith,jeopardy", "--steps": "100", "--n-test": "200"},
                 REAL_POINTS, "frontier_smollm2_real_100"),
    # the same tasks at 30 steps, the cost tables' short length, for probe continuation at a
    # middle task length (the probe's 8 steps are 8 % of a real-100 task, half a hot one)
    "real-30": ({**REAL, "--tasks": "sciq,arith,jeopardy", "--steps": "30", "--n-test": "200"},
                REAL_POINTS, "frontier_smollm2_real_30"),
}


def settings(regime: str) -> list[str]:
    out = list(SETTINGS)
    for flag, value in REGIMES[regime][0].items():
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def frontier(out: Path, regime: str, *extra: str) -> None:
    cmd = [sys.executable, "-m", "trace_ft", "frontier", *settings(regime), "--out", str(out), "--resume", *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def stage2_points(results: dict) -> dict[str, float]:
    """Each strategy's knob value whose seed-0 plasticity is nearest the median of all."""
    # (seed-0 points of the strategy's own knob only: the levers' points set more)
    seed0 = {s: [e for e in results["frontier"].get(s, []) if e["seed"] == 0 and set(e["params"]) == {KNOB[s]}]
             for s in STRATEGIES}
    target = statistics.median(e["plasticity"] for es in seed0.values() for e in es)
    return {s: min(es, key=lambda e: abs(e["plasticity"] - target))["params"][KNOB[s]]
            for s, es in seed0.items() if es}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regime", default="gentle", choices=tuple(REGIMES))
    ap.add_argument("--out", default=None, help="default: bench/results/<the regime's directory>")
    ap.add_argument("--levers", default="trace_budget=0.02,trace_granularity=row",
                    help="--stage levers: trace's settings to try, one run each (KEY=VALUE,...)")
    ap.add_argument("--stage", default="all", choices=("1", "2", "all", "levers", "continue"))
    ap.add_argument("--seeds", type=int, default=3, help="stage 2: seeds at each chosen point (seed 0 is stage 1's)")
    ap.add_argument("--strategies", default=None, help="stage 1: the strategies run, in this order (default all)")
    ap.add_argument("--stage2-strategies", default=",".join(STRATEGIES),
                    help="stage 2: the strategies given more seeds (default all)")
    args = ap.parse_args()
    _, grids, directory = REGIMES[args.regime]
    out = Path(args.out or ROOT / "bench" / "results" / directory)
    if args.stage in ("1", "all"):
        every_seed = args.regime.startswith("hot-bench")
        seeds = str(args.seeds) if every_seed else "1"
        names = list(grids) if every_seed else list(STRATEGIES)
        if args.strategies:
            names = [n for n in args.strategies.split(",") if n in names]
        frontier(out, args.regime, "--seeds", seeds, "--frontier-strategies", ",".join(names),
                 *[a for s, g in (grids or {}).items() if s in names for a in ("--grid", f"{s}:{g}")])
        if every_seed:
            return
    if args.regime.startswith("real") and args.stage in ("2", "all"):  # one point per strategy: more seeds there
        names = [n for n in args.stage2_strategies.split(",") if n in grids]
        # trace's routed row (each task scored with the model as it stood after it) from here on
        frontier(out, args.regime, "--seeds", str(args.seeds), "--frontier-strategies", ",".join(names),
                 *[a for n in names for a in ("--grid", f"{n}:{grids[n]}")], "--routed", "true")
        return
    if args.stage in ("2", "all"):
        points = stage2_points(json.loads((out / "results.json").read_text()))
        points = {s: v for s, v in points.items() if s in args.stage2_strategies.split(",")}
        print("stage 2 points:", points, flush=True)
        frontier(out, args.regime, "--seeds", str(args.seeds), "--frontier-strategies", ",".join(points),
                 *[a for s, v in points.items() for a in ("--grid", f"{s}:{KNOB[s]}={v:g}")])
    if args.stage in ("levers", "continue"):  # at trace's stage-2 core lr, or the regime's point
        results = out / "results.json"
        points = stage2_points(json.loads(results.read_text())) if results.exists() else {}
        lr = points["trace"] if "trace" in points else float(grids["trace"].split("=")[1])
    if args.stage == "levers":
        frontier(out, args.regime, "--seeds", "1", "--frontier-strategies", "trace_guard",
                 "--grid", f"trace_guard:trace_lr={lr:g}")
        for knob in args.levers.split(","):
            frontier(out, args.regime, "--seeds", "1", "--frontier-strategies", "trace",
                     "--grid", f"trace:trace_lr={lr:g}", "--grid", f"trace:{knob}")
    if args.stage == "continue":  # both arms seed by seed, so a stopped study stays paired (--resume skips done runs)
        for n in range(1, args.seeds + 1):
            frontier(out, args.regime, "--seeds", str(n), "--frontier-strategies", "trace",
                     "--grid", f"trace:trace_lr={lr:g}")
            frontier(out, args.regime, "--seeds", str(n), "--frontier-strategies", "trace",
                     "--grid", f"trace:trace_lr={lr:g}", "--grid", "trace:trace_continue_probe=true")


if __name__ == "__main__":
    main()
