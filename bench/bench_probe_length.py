"""How short may the warm-start probe be? The core a probe of each length chooses, against
the core of a longer probe on other batches, with the noise floor of the probe's own data.

    python bench/bench_probe_length.py [--model smollm2-135m] [--suite real] [--tasks sciq,arith,jeopardy]
        [--lengths 2,4,8] [--reference 16] [--budget 0.05] [--batch-size 8] [--lr 1e-4] [--autocast bf16]

Per task, from the base model (no earlier task, so importance alone decides): probes of
each of `--lengths` steps on stream A of the task's batches (a shorter probe sees the
first batches of a longer one, as in a run), one probe of the longest of them on stream B
(other batches: how much of the core is the data's noise) and a reference probe of
`--reference` steps on stream B. Each chooses a core at `--budget` (the run's selection:
element level, ranks of |Δ| and Fisher). Reported per length: the share of the
reference's core it recovers, the share of its own core that the same-length probe on
stream B also chose (its stability), and its seconds. The probe is the fixed cost a short
task pays (#38): a length whose core matches the longer probe's as well as the longer
probe matches itself on other data costs nothing in what is selected. With `--autocast
bf16`, each length's probe on stream A runs once more with its products in bf16 (the
reference and stream B stay in the weights' dtype): its share of the reference core, its
agreement with the same probe unrounded, and its seconds. Writes
bench/results/probe_length_<model>[_<autocast>].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

STREAM = {"A": 10_001, "B": 20_001}  # batch stream salts (a run's probe of task 1 uses 10_001)


def recovered(core, reference) -> float:
    """Share of `reference`'s selected elements that `core` selects too."""
    return core.intersection(reference).numel_selected / max(1, reference.numel_selected)


def measure(args) -> dict:
    import torch

    from trace_ft.config import RunConfig, RunSetup
    from trace_ft.continual.strategies.base import Context
    from trace_ft.lm.precision import with_fp32_attention
    from trace_ft.lm.train import causal_lm_loss

    torch.set_num_threads(args.threads)
    cfg = RunConfig.from_dict(dict(model=args.model, size=args.size, suite=args.suite, tasks=args.tasks.split(","),
                                   batch_size=args.batch_size, lr=args.lr, n_train=args.n_train, n_test=20,
                                   trace_budget=args.budget, seed=0))
    setup = RunSetup.open(cfg, progress=False)
    ctx = Context(model=setup.base, codec=setup.codec, train=cfg.train_config(), seed=0, progress=False,
                  max_len=cfg.max_len)
    pipe = setup.strategy("trace").pipeline
    lengths = sorted(int(x) for x in args.lengths.split(","))
    rounded = getattr(torch, args.autocast) if args.autocast else None
    out = {}
    for task in setup.tasks:
        def core(steps: int, stream: str, autocast=None):
            pipe.probe_steps, pipe.probe_autocast = steps, autocast
            batches = list(ctx.batches([task], steps, salt=STREAM[stream]))
            t0 = time.perf_counter()
            train = ctx.train  # as the run's probe steps (`Trace.find_core`)
            result = pipe.probe(setup.base, batches, lr=cfg.lr, betas=train.betas, weight_decay=train.weight_decay,
                                max_grad_norm=train.max_grad_norm,
                                loss_fn=with_fp32_attention(causal_lm_loss))  # (as `Trace.find_core`)
            seconds = time.perf_counter() - t0
            return pipe.select(result).mask, seconds

        reference, ref_s = core(args.reference, "B")
        floor, _ = core(lengths[-1], "B")
        rows = []
        for n in lengths:
            mask, seconds = core(n, "A")
            other = floor if n == lengths[-1] else core(n, "B")[0]
            rows.append({"steps": n, "seconds": seconds, "recovered": recovered(mask, reference),
                         "stable": recovered(mask, other), "selected": mask.numel_selected})
            print(f"{task.name}: {n} steps, {seconds:.0f} s: {rows[-1]['recovered']:.1%} of the reference core, "
                  f"{rows[-1]['stable']:.1%} stable", flush=True)
            if rounded is not None:
                low, low_s = core(n, "A", rounded)
                rows[-1].update(rounded_seconds=low_s, rounded_recovered=recovered(low, reference),
                                rounded_agrees=recovered(low, mask))
                print(f"{task.name}: {n} steps in {args.autocast}, {low_s:.0f} s: "
                      f"{rows[-1]['rounded_recovered']:.1%} of the reference core, "
                      f"{rows[-1]['rounded_agrees']:.1%} of the unrounded probe's", flush=True)
        out[task.name] = {"rows": rows, "reference_steps": args.reference, "reference_seconds": ref_s}
    return out


def markdown(results: dict, args) -> str:
    lengths = [r["steps"] for r in next(iter(results.values()))["rows"]]
    lines = [f"Model `{args.model}`, tasks {args.tasks} (each from the base model), batch {args.batch_size}, "
             f"lr {args.lr:g}, core {args.budget:.0%} of the eligible elements (element level). Reference: a "
             f"{args.reference}-step probe on other batches (stream B). Machine: {args.machine}, "
             f"{args.threads} threads.", "",
             "Share of the reference core recovered (and, in brackets, the share of the core that a probe of "
             "the same length on stream B chose too: what the data alone moves):", "",
             "| task | " + " | ".join(f"{n} steps" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{x['recovered']:.1%} ({x['stable']:.1%})" for x in r["rows"]) + " |")
    def mean_seconds(key: str) -> list[float]:  # per length, over the tasks
        return [sum(r["rows"][i][key] for r in results.values()) / len(results) for i in range(len(lengths))]

    secs = mean_seconds("seconds")
    lines.append("| probe seconds (mean) | " + " | ".join(f"{s:.0f}" for s in secs) + " |")
    if not getattr(args, "autocast", None):
        return "\n".join(lines)
    lines += ["", f"The same probes on stream A with their products in {args.autocast} (`probe(autocast=)`): "
              "the share of the reference core recovered, and, in brackets, the share of the unrounded "
              "probe's core it chose too:", "",
              "| task | " + " | ".join(f"{n} steps" for n in lengths) + " |",
              "|---|" + "---:|" * len(lengths)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{x['rounded_recovered']:.1%} ({x['rounded_agrees']:.1%})"
                                                   for x in r["rows"]) + " |")
    low = mean_seconds("rounded_seconds")
    lines.append(f"| probe seconds (mean), {args.autocast} | " + " | ".join(f"{s:.0f}" for s in low) + " |")
    ratios = " | ".join(f"{a / b:.2f}×" for a, b in zip(low, secs))
    lines.append(f"| {args.autocast} / unrounded seconds | {ratios} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--size", default="medium", help="with --model builtin")
    ap.add_argument("--suite", default="real")
    ap.add_argument("--tasks", default="sciq,arith,jeopardy")
    ap.add_argument("--lengths", default="2,4,8", help="probe lengths to compare (steps)")
    ap.add_argument("--reference", type=int, default=16, help="the reference probe's steps (stream B)")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--autocast", choices=["bfloat16", "float16"], default=None,
                    help="also run each length's stream-A probe with its products in this dtype")
    ap.add_argument("--out", default=None, help="default bench/results/probe_length_<model>")
    ap.add_argument("--render", help="re-render a saved JSON result (no run)")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        print(markdown(saved["results"], argparse.Namespace(**saved["args"])))
        return
    from common import machine

    args.machine = machine()["cpu"]
    results = measure(args)
    suffix = f"_{args.autocast}" if args.autocast else ""
    stem = args.out or str(ROOT / "bench" / "results" / f"probe_length_{args.model}{suffix}")
    Path(stem + ".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    text = markdown(results, args)
    print(text)
    Path(stem + ".md").write_text(f"# How short may the probe be?\n\n{text}\n")


if __name__ == "__main__":
    main()
