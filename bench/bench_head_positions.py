"""What the output head costs where no label is: a training step with the head on every
position from the batch's first label on, against the head on the labelled positions only.

    python bench/bench_head_positions.py [--model smollm2-135m] [--tasks sciq,arith,jeopardy,json,keyval]
        [--rounds 6] [--batch-size 8]

Per task, on its training batches as a run frames them: the share of the batch's tokens
that are labels and the share from the first label on (where `label_logits` makes
logits); then the loss and backward of a full fine-tuning step (every weight's gradient,
the tied head's too) and of a probe step's (the head and embeddings frozen, every
eligible weight's gradient) with each way of making the logits, paired in one process
(the ratio of adjacent runs, median over rounds; `common.paired_ratios`), and the largest
difference between the two losses. The optimizer step is the same either way and is left
out. Writes bench/results/head_positions_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def measure(args) -> dict:
    import torch
    from torch import nn

    from common import paired_ratios
    from trace_ft.config import RunConfig, RunSetup
    from trace_ft.continual.strategies.base import Context
    from trace_ft.lm.batches import IGNORE, _first_label, label_logits
    from trace_ft.lm.train import causal_lm_loss
    from trace_ft.method.probe import eligible_parameters

    torch.set_num_threads(args.threads)
    cfg = RunConfig.from_dict(dict(model=args.model, tasks=args.tasks.split(","),
                                   batch_size=args.batch_size, n_train=args.n_train, n_test=20, seed=0))
    setup = RunSetup.open(cfg, progress=False)
    model = setup.base
    ctx = Context(model=model, codec=setup.codec, train=cfg.train_config(), seed=0, progress=False,
                  max_len=cfg.max_len)

    def before(m, batch):  # the head on every position from the first label on
        logits, labels = label_logits(m, batch)
        return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=IGNORE)

    eligible = {id(p) for _, p in eligible_parameters(model)}
    settings = {"full": lambda p: True, "probe": lambda p: id(p) in eligible}
    out = {}
    for task in setup.tasks:
        batches = list(ctx.batches([task], args.rounds + 2, salt=5))
        tokens = sum(b["labels"].numel() for b in batches)
        labelled = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        # where label_logits starts the logits (None: every position)
        span = sum(b["labels"].shape[0] * (b["labels"].shape[1] - (_first_label(model, b["labels"][:, 1:]) or 0))
                   for b in batches)
        with torch.no_grad():
            diff = max(abs(float(before(model, b)) - float(causal_lm_loss(model, b))) for b in batches)
        row = {"tokens": tokens, "labelled": labelled, "from_first_label": span, "loss_max_abs_diff": diff}
        for setting, trains in settings.items():
            for p in model.parameters():
                p.requires_grad_(trains(p))
            turn = {"old": 0, "new": 0}

            def step(loss_fn, key):
                b = batches[turn[key] % len(batches)]
                turn[key] += 1
                loss_fn(model, b).backward()
                model.zero_grad(set_to_none=True)

            res = paired_ratios(lambda: step(before, "old"), {"labelled": lambda: step(causal_lm_loss, "new")},
                                rounds=args.rounds)["labelled"]
            row[setting] = {"before_s": res["baseline_median_s"], "after_s": res["median_s"],
                            "ratio": res["ratio"], "ratio_min": res["ratio_min"], "ratio_max": res["ratio_max"]}
        for p in model.parameters():
            p.requires_grad_(True)
        out[task.name] = row
        print(task.name, row, flush=True)
    return out


def table(results: dict, args, machine: dict) -> list[str]:
    lines = ["# The output head on the labelled positions only", "",
             f"Model `{args.model}`, batch {args.batch_size}; machine: {machine['cpu']}, {args.threads} threads; "
             f"loss and backward per step (no optimizer), medians of {args.rounds} adjacent pairs. Before: the head "
             "on every position from the batch's first label on (`label_logits`); after: on the labelled positions "
             "only (`labelled_logits`, what `causal_lm_loss` uses).", "",
             "| task | labels / tokens | from the first label / tokens | full step before → after s | ratio (range) "
             "| probe step before → after s | ratio (range) | loss |Δ| max |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        cells = [f"{r['labelled'] / r['tokens']:.0%}", f"{r['from_first_label'] / r['tokens']:.0%}"]
        for s in ("full", "probe"):
            x = r[s]
            cells += [f"{x['before_s']:.2f} → {x['after_s']:.2f}",
                      f"**{x['ratio']:.2f}×** ({x['ratio_min']:.2f}–{x['ratio_max']:.2f})"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['loss_max_abs_diff']:.1e} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="sciq,arith,jeopardy,json,keyval")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from common import machine, write_report

    results = measure(args)
    info = machine()
    lines = table(results, args, info)
    write_report(f"head_positions_{args.model}", {"machine": info, "args": vars(args),
                                                              "results": results}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
