"""What a run will do and about how long it will take, said before any work: from a quick
timing of one training step's forward and backward on a batch of the first task, the
training and probe steps and the scoring of every strategy are counted up."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..continual.strategies import Strategy, Trace
from ..lm.batches import EncodedSet
from ..lm.train import causal_lm_loss
from .setup import RunSetup

# cost factors against a full fine-tuning step, measured on SmolLM2-135M (docs/performance.md):
# a trace step (core-only gradients) and a LoRA step; decoding runs about half as many tokens a
# second as a training step's forward pass
TRACE_STEP, LORA_STEP, DECODE_SLOWDOWN = 0.8, 0.85, 2.0


def time_step(setup: RunSetup) -> tuple[float, int]:
    """Seconds of one training step's forward and backward pass on a batch of the first task
    (the faster of two: the first warms up) and the tokens in that batch. The model is left
    as it was (no optimizer step; its gradients dropped)."""
    cfg, model = setup.cfg, setup.base
    task = setup.tasks[0]
    enc = EncodedSet(task.train[:cfg.batch_size] or task.test[:cfg.batch_size], setup.codec, cfg.max_len)
    batch = {k: v.to(next(model.parameters()).device) for k, v in enc.batch(range(len(enc))).items()}
    was_training = model.training
    model.train()
    times = []
    try:
        for _ in range(2):
            t0 = time.perf_counter()
            causal_lm_loss(model, batch).backward()
            times.append(time.perf_counter() - t0)
            for p in model.parameters():
                p.grad = None
    finally:
        model.train(was_training)
    return min(times), int(batch["attention_mask"].sum())


def estimate(setup: RunSetup, strategies: Sequence[Strategy], step_s: float, tokens: int) -> float:
    """Seconds a run of `strategies` should take: each one's training (and trace's probes),
    and the scoring of every task after every task, of general ability and the benchmarks."""
    cfg = setup.cfg
    T = len(setup.tasks)
    token_s = step_s / (3 * max(1, tokens))  # a forward pass is about a third of a step
    # scoring one example: its prompt and answer once to decode (slower per token) and once
    # for the answer's log-likelihood
    per_example = sum(len(e.prompt) + 2 * len(e.answer) for e in setup.tasks[0].test[:50]) / \
        max(1, min(50, len(setup.tasks[0].test))) / 4  # ~4 characters a token
    task_scoring = cfg.n_test * per_example * token_s * (1 + DECODE_SLOWDOWN)
    general = len(setup.general.test) * 60 * token_s * (1 + DECODE_SLOWDOWN)
    if setup.perplexity is not None:
        general += setup.perplexity.tokens * token_s
    if setup.benchmarks is not None:  # (about 150 tokens a question, half the rate of training)
        general += len(setup.benchmarks.names) * (cfg.general_bench_limit or 2000) * 150 * token_s * 2
    total = (T + 1) * task_scoring + general  # the base, once
    for s in strategies:
        factor = TRACE_STEP if isinstance(s, Trace) else LORA_STEP if s.name == "lora" else 1.0
        total += T * cfg.steps * step_s * factor
        if isinstance(s, Trace):
            total += T * s.pipeline.probe_steps * step_s
            if s.routes is not None:
                total += T * task_scoring
        scored = T * T if cfg.score_unseen == "all" else sum(min(T, j + 1) for j in range(1, T + 1))
        total += scored * task_scoring + general * (T if cfg.general_every == "task" else 1)
    return total


def plan_line(setup: RunSetup, strategies: Sequence[Strategy], what: str | None = None) -> str:
    """The plan, said before any work: tasks, strategies, steps, what is scored when, and the
    estimated duration. `what`: how to name the strategies' runs (a frontier's points)."""
    cfg = setup.cfg
    step_s, tokens = time_step(setup)
    seconds = estimate(setup, strategies, step_s, tokens)
    probe = {s.pipeline.probe_steps for s in strategies if isinstance(s, Trace)}
    general = "after every task" if cfg.general_every == "task" else "at the start and the end"
    measures = "the base skill" if cfg.builtin else "the knowledge probe, perplexity" + (
        f", {', '.join(setup.benchmarks.names)}" if setup.benchmarks is not None else "")
    return (f"plan: {len(setup.tasks)} tasks ({', '.join(t.name for t in setup.tasks)}) × "
            + (what or f"{len(strategies)} strategies ({', '.join(s.name for s in strategies)})")
            + f"; {cfg.steps} steps per task at batch {cfg.batch_size}"
            + (f" (trace: a {'/'.join(map(str, sorted(probe)))}-step probe first)" if probe else "")
            + f"; {cfg.n_test} test examples per task scored after every task; general ability ({measures}) "
            f"{general}. One training step here: {step_s:.1f} s; estimated {_duration(seconds)}.")


def _duration(seconds: float) -> str:
    return f"about {seconds / 60:.0f} min" if seconds >= 90 else f"about {seconds:.0f} s"


__all__ = ["plan_line", "time_step", "estimate"]
