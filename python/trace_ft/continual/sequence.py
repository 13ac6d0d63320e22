"""One continual sequence for one strategy: the same tasks, data, steps and seed for every
strategy, an accuracy matrix per metric (row j: every task scored after training through
task j), the costs, and what the strategy reports beside them (TRACE: the task-routed
bound). What `trace-ft run` and `trace-ft frontier` both run."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..benchmarks.results import BenchmarkSet, bench_entry
from ..evaluate import METRICS, Evaluator, TextPerplexity
from ..lm.memory import PeakMemory, PhaseLog
from ..lm.parallel import is_main
from ..lm.text import Codec
from ..lm.train import TrainConfig
from ..store.scores import ScoreCache
from ..tasks import Task
from . import metrics
from .strategies.base import Context, Strategy


@dataclass
class TaskSequence:
    """The tasks of a run in order, task 0 (the general ability: the built-in model's base
    skill, or a real model's knowledge probe) first among the scored columns, the
    untrained model's scores, and, for a real model, its perplexity on fixed prose and the
    standard benchmarks chosen (`--general-bench`): each measured on the base once and shared
    by every strategy."""

    tasks: list[Task]
    eval_tasks: list[Task]
    first: int                      # column of the first task (1 with task 0, else 0)
    evaluator: Evaluator
    row0: dict[str, list[float]]    # per metric, the untrained model's scores
    perplexity: TextPerplexity | None = None
    ppl0: float | None = None       # the untrained model's perplexity
    bench: BenchmarkSet | None = None
    bench0: dict | None = None      # the untrained model's benchmark results

    @classmethod
    def build(cls, tasks: list[Task], general: Task | None, base: nn.Module, codec: Codec,
              score: bool = True, perplexity: TextPerplexity | None = None,
              bench: BenchmarkSet | None = None, progress: bool = False,
              cache: ScoreCache | None = None) -> TaskSequence:
        """`score=False` (the ranks other than 0 of a parallel run): no scores. `cache`: the
        untrained model's scores kept across runs, read from it or measured and put there."""
        eval_tasks = ([general] if general is not None else []) + tasks
        evaluator = Evaluator(eval_tasks, codec, progress=progress)

        def measured(what: dict, compute):
            return compute() if cache is None else cache.get_or(what, compute)

        row0: dict[str, list] = {m: [None] * len(eval_tasks) for m in METRICS}
        for k in range(len(eval_tasks) if score else 0):
            for m, v in measured(evaluator.signature(k), lambda: evaluator.task_scores(base, k)).items():
                row0[m][k] = v
        ppl0 = measured(perplexity.signature(), lambda: perplexity(base)) if score and perplexity else None
        bench0 = measured(bench.signature(), lambda: bench(base)) if score and bench is not None else None
        return cls(tasks, eval_tasks, len(eval_tasks) - len(tasks), evaluator, row0, perplexity, ppl0,
                   bench, bench0)

    @property
    def columns(self) -> list[str]:
        return [t.name for t in self.eval_tasks]


def run_strategy(strategy: Strategy, seq: TaskSequence, base: nn.Module, codec: Codec,
                 train: TrainConfig, *, seed: int, device: str = "cpu", max_len: int | None = None,
                 progress: bool = False, log: Callable[[str], None] = lambda msg: None,
                 parallel=None, general_every: str = "task",
                 score_unseen: str = "all") -> tuple[dict | None, dict[str, dict]]:
    """Train a copy of `base` through `seq` with `strategy`: its results entry and the further
    rows it reports (`Strategy.report`: TRACE's task-routed row). With `parallel` (data
    parallel ranks) every rank trains; rank 0 alone scores and returns them, the others
    return (None, {}). `general_every="end"`: task 0 and the perplexity are scored after
    the last task only (None in the rows between). `score_unseen="next"`: of the tasks not
    yet trained only the next is scored after each task (all FWT needs; None above it)."""
    torch.manual_seed(seed)
    T = len(seq.tasks)
    rows = {m: [list(seq.row0[m])] + [[None] * len(seq.eval_tasks) for _ in range(T)] for m in METRICS}
    ppl = [seq.ppl0] + [None] * T
    bench = [seq.bench0] + [None] * T
    phases = PhaseLog(device)
    with phases.phase("model copy"):
        ctx = Context(model=copy.deepcopy(base), codec=codec, train=train, seed=seed,
                      progress=progress and is_main(parallel), max_len=max_len,
                      num_tasks=T, parallel=parallel, phases=phases, log=log if progress else (lambda msg: None))
        sharded = parallel is not None and parallel.sharded
        # a sharded model is scored through rank 0's whole copy, gathered after each task
        whole = copy.deepcopy(base) if sharded and ctx.is_main else None
        if sharded:
            parallel.prepare(ctx.model)

    def scored_model() -> nn.Module | None:
        if sharded:
            parallel.gather_into(ctx.model, whole)  # every rank takes part
            return whole
        return ctx.model

    def evaluate(j: int) -> None:
        model = scored_model()
        if not ctx.is_main:
            return
        general = general_every == "task" or j == T
        with phases.phase("scoring"):
            last = len(seq.eval_tasks) if score_unseen == "all" else min(len(seq.eval_tasks), seq.first + j + 1)
            for k in range(0 if general else seq.first, last):
                for m, v in seq.evaluator.task_scores(model, k).items():
                    rows[m][j][k] = v
        scores = rows["exact"][j]
        if seq.perplexity is not None and general:
            with phases.phase("scoring: perplexity"):
                ppl[j] = seq.perplexity(model)
        if seq.bench is not None and general:
            with phases.phase("scoring: benchmarks"):
                bench[j] = seq.bench(model)
        log(f"{strategy.name:>10s} after {j}/{T} {seq.tasks[j - 1].name:>8s}: "
            + " ".join(f"{t.name}={s:5.1f}" for t, s in zip(seq.eval_tasks, scores) if s is not None)
            + ("" if ppl[j] is None else f" ppl={ppl[j]:.2f}"))

    t0 = time.perf_counter()
    with PeakMemory(device) as mem:
        costs = strategy.fit(ctx, seq.tasks, evaluate)
    seconds = time.perf_counter() - t0
    if not ctx.is_main:
        return None, {}
    total_params = sum(p.numel() for p in base.parameters())
    trainable = [c.trainable for c in costs]
    entry = {
        "config": strategy.config(),
        "matrix": rows["exact"],
        "matrices": rows,
        "metrics": metrics.summarize(rows["exact"], seq.first),
        "metrics_by": {m: metrics.summarize(rows[m], seq.first) for m in METRICS},
        "costs": {
            "trainable_per_task": trainable,
            "trainable_fraction": sum(trainable) / len(trainable) / total_params,
            "state_bytes": max(c.state_bytes for c in costs),
            "seconds": seconds,
            "peak_memory_bytes": mem.peak_bytes,
            "per_task": [dataclasses.asdict(c) for c in costs],
            "phases": phases.rows,
        },
    }
    if seq.perplexity is not None:
        entry["general"] = general_entry(ppl, seq.perplexity)
        entry["metrics"]["ppl_change"] = entry["general"]["perplexity_change"]
    if seq.bench is not None:
        entry["general_bench"] = bench_entry(bench)
        entry["metrics"]["bench_change"] = entry["general_bench"]["mean_change"]
    # what the strategy reports beyond the common entry (its model is done with)
    extra = strategy.report(entry, whole if sharded else ctx.model, base, seq, phases)
    return entry, extra


def general_entry(ppl: list[float | None], measure: TextPerplexity) -> dict:
    """The perplexity row of a run (before any task, then after each) and its change."""
    last = next((p for p in reversed(ppl) if p is not None), None)
    return {"perplexity": ppl, "tokens": measure.tokens, "text": measure.name,
            "perplexity_change": None if last is None or ppl[0] is None else last - ppl[0]}
