"""How close trace's training step is to the least a core-only step can cost, on a real model
and the core a real probe chooses.

    python bench/bench_step_floor.py [--model smollm2-135m] [--task json] [--rounds 6]

The task's probe and selection run as in `trace-ft run` (its defaults for the model). Then,
on one batch of the task and in one process, the cases take turns, `--steps` steps each a
round (the first of each turn not counted: it pays for the other case's memory); per round
each case's median step is divided by the full fine-tuning step's (torch AdamW over every
weight, the baseline) of that round, and the median of those ratios is reported:

- trace: the core step as the run takes it (frozen tensors outside the core, core-only
  weight gradients, `MaskedAdamW`, clipping);
- floor: the forward and every input gradient, with every weight frozen: no weight
  gradient and no optimizer. No step that trains weights inside the layers costs less;
  what trace pays above it is its core's gradients and its optimizer;
- forward: the forward alone, without autograd.

What lies between trace and the floor is the part of the step that kernels can still win;
the floor's own share of the full step is what the training steps of a whole run can save at
most (#38). Writes bench/results/step_floor_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def floor_model(base):
    """A copy of `base` with every weight frozen whose embedding's output asks for a
    gradient: its backward computes every layer's input gradient and no weight gradient."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.detach().requires_grad_())
    return model


def measure(args) -> dict:
    import torch

    from trace_ft.config import RunConfig, RunSetup
    from trace_ft.continual.strategies.base import Context
    from trace_ft.lm.train import causal_lm_loss

    torch.set_num_threads(args.threads)
    extra = {k: getattr(args, k, None) for k in ("batch_size", "size", "suite")}
    cfg = RunConfig.from_dict(dict(model=args.model, tasks=[args.task], n_test=4, seed=0,
                                   **{k: v for k, v in extra.items() if v}))
    setup = RunSetup.open(cfg, progress=False)
    task = setup.tasks[0]
    train = cfg.train_config()
    trace = setup.strategy("trace")
    model = copy.deepcopy(setup.base)
    ctx = Context(model=model, codec=setup.codec, train=train, seed=0, progress=False, max_len=cfg.max_len)
    core = trace.find_core(ctx, 1, task).core
    batch = next(iter(ctx.batches([task], 1, salt=1)))
    lr = trace.train_config(ctx).lr

    def stepper(m, opt, clip):
        def step():
            loss = causal_lm_loss(m, batch)
            loss.backward()
            clip()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    full = copy.deepcopy(setup.base)
    full_params = [p for p in full.parameters() if p.requires_grad]
    full_opt = torch.optim.AdamW(full_params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    full_step = stepper(full, full_opt, lambda: torch.nn.utils.clip_grad_norm_(
        [p for p in full_params if p.grad is not None], train.max_grad_norm))

    floor = floor_model(setup.base)

    def floor_step():
        causal_lm_loss(floor, batch).backward()

    def forward():
        with torch.no_grad():
            causal_lm_loss(floor, batch)

    with trace.pipeline.train_setup(model, core, lr=lr, betas=train.betas, weight_decay=train.weight_decay,
                                    master_weights=trace.master_weights, core_grads=trace.core_grads) as ts:
        opt = ts.optimizer
        trace_step = stepper(model, opt, lambda: opt.clip_grad_norm_(train.max_grad_norm))
        cases = {"full": full_step, "trace": trace_step, "floor": floor_step, "forward": forward}
        per_round: dict[str, list[float]] = {name: [] for name in cases}  # each turn's median step
        for _ in range(args.rounds):
            for name, fn in cases.items():
                turn = []
                for _ in range(args.steps + 1):
                    t0 = time.perf_counter()
                    fn()
                    turn.append(time.perf_counter() - t0)
                per_round[name].append(statistics.median(turn[1:]))
        paths = ts.core_grads.names if ts.core_grads is not None else []
    return {"model": args.model, "task": task.name, "tokens": int(batch["input_ids"].numel()),
            "core_elements": core.numel_selected, "eligible_elements": core.numel,
            "core_grad_layers": len(paths), "rounds": args.rounds, "steps_per_turn": args.steps,
            "cases": {name: _case(medians, per_round["full"]) for name, medians in per_round.items()}}


def _case(medians: list[float], full: list[float]) -> dict:
    """A case's round medians, each round's ratio to the full step and their median."""
    ratios = [t / f for t, f in zip(medians, full)]
    return {"median_s": statistics.median(medians), "round_medians_s": medians, "ratios": ratios,
            "ratio": statistics.median(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="json")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the model's run default")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="steps a case takes in a turn, after the one not counted")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from common import machine, write_report

    res = measure(args)
    info = machine()
    cases = res["cases"]
    full_s = cases["full"]["median_s"]
    lines = [f"# Trace's training step against its floor: {res['model']}", "",
             f"Task {res['task']}, one batch of {res['tokens']} tokens; the core of the run's probe and "
             f"selection: {res['core_elements']:,} of {res['eligible_elements']:,} eligible elements, "
             f"{res['core_grad_layers']} layers with core-only gradients. {info['cpu']}, {info['threads']} "
             f"threads, one process; the cases take turns of {res['steps_per_turn']} steps (after one not counted), "
             f"{res['rounds']} rounds; the median of each round's ratio to its full fine-tuning step.", "",
             "| step | median s | × full fine-tuning step (range) |", "|---|---:|---:|",
             f"| full fine-tuning (torch AdamW) | {full_s:.2f} | 1.00 |"]
    for name, label in (("trace", "trace: the core step"), ("floor", "floor: forward + input gradients"),
                        ("forward", "forward only")):
        c = cases[name]
        lines.append(f"| {label} | {c['median_s']:.2f} | {c['ratio']:.3f} ({min(c['ratios']):.2f}–{max(c['ratios']):.2f}) |")
    gap = cases["trace"]["median_s"] - cases["floor"]["median_s"]
    lines += ["", f"Trace above its floor: {gap:.2f} s a step ({cases['trace']['ratio'] - cases['floor']['ratio']:.3f} "
              "of a full step): the core's weight gradients, its optimizer and clipping."]
    write_report(f"step_floor_{res['model']}", {"machine": info, **res}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
