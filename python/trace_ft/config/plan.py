"""What a run will do and about how long it will take, said before any work: from a quick
timing of one training step's forward and backward on a batch of the first task, scaled to
each task by the tokens of its batches (a suite's tasks differ: a SQuAD batch is 4x a
trivia batch), the training and probe steps and the scoring of every strategy are counted up."""

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
# a probe step with its products in bf16 and attention in fp32 (`--probe-autocast bf16`, the
# default where bf16 is native; AMD EPYC, avx512_bf16:
# bench/results/probe_length_smollm2-135m_bfloat16.md) against one in fp32
PROBE_AUTOCAST_STEP = 0.65
# a benchmark question costs about as much as 60 tokens of a training step's forward pass (its
# context runs once, its choices share it through the KV cache): SmolLM2's headline four at 500
# questions each took 238 s at 2.9 s a step of ~500 tokens (bench/results/benchmarks_smollm2.md);
# the 150 tokens at half the rate assumed before made a frontier's plan 2x too long
BENCH_QUESTION = 60


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


def batch_tokens(setup: RunSetup, task, n_batches: int = 4) -> float:
    """Tokens a training step of `task` computes (padding included: it is computed too), the
    mean over its first batches."""
    cfg = setup.cfg
    examples = task.train[:cfg.batch_size * n_batches] or task.test[:cfg.batch_size]
    enc = EncodedSet(examples, setup.codec, cfg.max_len)
    sizes = [int(enc.batch(range(i, min(i + cfg.batch_size, len(enc))))["input_ids"].numel())
             for i in range(0, len(enc), cfg.batch_size)]
    return sum(sizes) / max(1, len(sizes))


def task_step_seconds(setup: RunSetup, step_s: float) -> list[float]:
    """Each task's training step: the timed step of the first task's first batch, scaled by
    the tokens of the task's batches against that batch's."""
    first = batch_tokens(setup, setup.tasks[0], n_batches=1)
    return [step_s * batch_tokens(setup, t) / max(1.0, first) for t in setup.tasks]


def estimate(setup: RunSetup, strategies: Sequence[Strategy], step_s: float, tokens: int,
             task_steps: Sequence[float]) -> float:
    """Seconds a run of `strategies` should take: each one's training (and trace's probes),
    and the scoring of every task after every task, of general ability and the benchmarks.
    `step_s`, `tokens`: one step of the first task's first batch and its (unpadded) tokens;
    `task_steps`: each task's step (`task_step_seconds`)."""
    cfg = setup.cfg
    T = len(setup.tasks)
    token_s = step_s / (3 * max(1, tokens))  # a forward pass is about a third of a step
    # scoring one example: its prompt and answer once to decode (slower per token) and once
    # for the answer's log-likelihood (~4 characters a token), averaged over the tasks
    per_example = sum(sum(len(e.prompt) + 2 * len(e.answer) for e in t.test[:50]) / max(1, min(50, len(t.test)))
                      for t in setup.tasks) / T / 4
    task_scoring = cfg.n_test * per_example * token_s * (1 + DECODE_SLOWDOWN)
    general = len(setup.general.test) * 60 * token_s * (1 + DECODE_SLOWDOWN)
    if setup.perplexity is not None:
        general += setup.perplexity.tokens * token_s
    if setup.benchmarks is not None:
        general += len(setup.benchmarks.names) * (cfg.general_bench_limit or 2000) * BENCH_QUESTION * token_s
    total = (T + 1) * task_scoring + general  # the base, once
    for s in strategies:
        if isinstance(s, Trace):  # its probe at a full step's cost, then the core's steps
            probe = PROBE_AUTOCAST_STEP if s.pipeline.probe_autocast is not None else 1.0
            total += (s.core_steps(cfg.steps) * TRACE_STEP + s.pipeline.probe_steps * probe) * sum(task_steps)
            if s.pipeline.guarded:  # the guard's Fisher passes, about a step a batch: after each
                # task but the last, and over the guarded prose once (a first task's step)
                fisher = sum(task_steps[:-1]) + (task_steps[0] if s.general is not None else 0.0)
                total += s.pipeline.fisher_batches * fisher
            if s.routes is not None:
                total += T * task_scoring
        else:
            total += cfg.steps * (LORA_STEP if s.name == "lora" else 1.0) * sum(task_steps)
        scored = T * T if cfg.score_unseen == "all" else sum(min(T, j + 1) for j in range(1, T + 1))
        total += scored * task_scoring + general * (T if cfg.general_every == "task" else 1)
    return total


def plan_line(setup: RunSetup, strategies: Sequence[Strategy], what: str | None = None) -> str:
    """The plan, said before any work: tasks, strategies, steps, what is scored when, and the
    estimated duration. `what`: how to name the strategies' runs (a frontier's points)."""
    cfg = setup.cfg
    step_s, tokens = time_step(setup)
    task_steps = task_step_seconds(setup, step_s)
    seconds = estimate(setup, strategies, step_s, tokens, task_steps)
    probe = {s.pipeline.probe_steps for s in strategies if isinstance(s, Trace)}
    first = "the first {} of them a probe" if all(s.continue_probe for s in strategies if isinstance(s, Trace)) \
        else "a {}-step probe first"
    general = "after every task" if cfg.general_every == "task" else "at the start and the end"
    measures = "the base skill" if cfg.builtin else "the knowledge probe, perplexity" + (
        f", {', '.join(setup.benchmarks.names)}" if setup.benchmarks is not None else "")
    return (f"plan: {len(setup.tasks)} tasks ({', '.join(t.name for t in setup.tasks)}) × "
            + (what or f"{len(strategies)} strategies ({', '.join(s.name for s in strategies)})")
            + f"; {cfg.steps} steps per task at batch {cfg.batch_size}"
            + (f" (trace: {first.format('/'.join(map(str, sorted(probe))))})" if probe else "")
            + f"; {cfg.n_test} test examples per task scored after every task; general ability ({measures}) "
            f"{general}. One training step here: {_step(task_steps)}; estimated {_duration(seconds)}.")


def _step(steps: Sequence[float]) -> str:
    """The tasks' mean step, and their range where they differ by more than a fifth (the
    timed batch alone can lie outside it: a task's step is the mean over its batches)."""
    mean = sum(steps) / len(steps)
    if max(steps) > 1.2 * min(steps):
        return f"{mean:.1f} s on average ({min(steps):.1f}-{max(steps):.1f} s by task)"
    return f"{mean:.1f} s"


def _duration(seconds: float) -> str:
    return f"about {seconds / 60:.0f} min" if seconds >= 90 else f"about {seconds:.0f} s"


__all__ = ["plan_line", "time_step", "estimate"]
