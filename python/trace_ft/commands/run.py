"""`trace-ft run`: one continual sequence of tasks, every chosen strategy on identical data,
steps, batch size, schedule and seed, and the accuracy matrices and costs that compare them."""

from __future__ import annotations

import copy
import dataclasses
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from ..config import RunConfig, build_strategy, sweep_strategies
from ..continual import metrics
from ..continual.report import summary_table, write_outputs
from ..continual.strategies.base import Context
from ..evaluate import Evaluator
from ..lm.memory import PeakMemory, memory_note
from ..lm.model import open_model
from ..tasks import BASE, builtin_task, resolve_tasks

def versions() -> dict:
    import trace_kernels

    out = {"python": sys.version.split()[0], "platform": platform.platform(),
           "torch": torch.__version__, "trace_kernels": trace_kernels.__version__}
    for mod in ("transformers", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def run(cfg: RunConfig, out: str | Path | None = None, sweep: bool = False,
        progress: bool = True, log=None) -> dict:
    """Run every strategy of `cfg` (or the sweep) and write results.json, report.md and
    accuracy.png to `out` (default runs/<timestamp>/). Returns the results."""
    from tqdm.auto import tqdm

    log = log or (lambda msg: tqdm.write(msg))
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out) if out is not None else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    t_start = time.perf_counter()
    tasks = resolve_tasks(cfg.tasks, cfg.seed, cfg.n_train, cfg.n_test)  # bad tasks fail first
    # task 0: the built-in base skill (its training split only feeds trace's Fisher guard)
    general = builtin_task(BASE, seed=0, n_train=cfg.n_train, n_test=cfg.n_test) if cfg.model == "builtin" else None
    if cfg.trace_protect_base and general is None:
        raise ValueError("trace_protect_base needs the built-in model's base skill")
    strategies = (sweep_strategies(cfg, general) if sweep
                  else [build_strategy(s, cfg, general) for s in cfg.strategies])
    base, codec, model_dir = open_model(cfg.model, size=cfg.size, cache_dir=cfg.cache_dir,
                                        dtype=cfg.dtype, device=cfg.device, progress=progress)
    eval_tasks = ([general] if general is not None else []) + tasks
    first = len(eval_tasks) - len(tasks)
    evaluator = Evaluator(eval_tasks, codec)
    row0 = evaluator(base)
    total_params = sum(p.numel() for p in base.parameters())
    log(f"model: {model_dir} ({total_params:,} parameters); tasks: {', '.join(t.name for t in tasks)}; "
        f"strategies: {', '.join(s.name for s in strategies)}")
    results = {
        "config": dataclasses.asdict(cfg), "sweep": sweep, "versions": versions(), "seed": cfg.seed,
        "model": str(model_dir), "total_params": total_params,
        "columns": [t.name for t in eval_tasks], "first_task_column": first,
        "memory_note": memory_note(cfg.device),
        "strategies": {},
    }
    for strategy in strategies:
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(base)
        T = len(tasks)
        matrix: list[list[float | None]] = [list(row0)] + [[None] * len(eval_tasks) for _ in range(T)]
        ctx = Context(model=model, codec=codec, train=cfg.train_config(), seed=cfg.seed,
                      progress=progress, max_len=cfg.max_len, num_tasks=T)

        def evaluate(j: int) -> None:
            matrix[j] = evaluator(ctx.model)
            log(f"{strategy.name:>10s} after {j}/{T} {tasks[j - 1].name:>8s}: "
                + " ".join(f"{t.name}={s:5.1f}" for t, s in zip(eval_tasks, matrix[j])))

        t0 = time.perf_counter()
        with PeakMemory(cfg.device) as mem:
            costs = strategy.fit(ctx, tasks, evaluate)
        seconds = time.perf_counter() - t0
        summary = metrics.summarize(matrix, first)
        trainable = [c.trainable for c in costs]
        results["strategies"][strategy.name] = {
            "config": strategy.config(),
            "matrix": matrix,
            "metrics": summary,
            "costs": {
                "trainable_per_task": trainable,
                "trainable_fraction": sum(trainable) / len(trainable) / total_params,
                "state_bytes": max(c.state_bytes for c in costs),
                "seconds": seconds,
                "peak_memory_bytes": mem.peak_bytes,
                "per_task": [dataclasses.asdict(c) for c in costs],
            },
            "selections": getattr(strategy, "selections", None),
        }
        log(f"{strategy.name:>10s}: " + ", ".join(
            f"{k}={'-' if v is None else f'{v:.1f}'}" for k, v in summary.items()) + f" ({seconds:.0f} s)")
    results["seconds"] = time.perf_counter() - t_start
    write_outputs(results, out)
    log("\n" + summary_table(results) + "\n")
    log(f"wrote {out}/results.json, report.md, accuracy.png ({results['seconds']:.0f} s)")
    return results


__all__ = ["run", "versions"]
