"""`trace-ft run`: one continual sequence of tasks, every chosen strategy on identical data,
steps, batch size, schedule and seed, and the accuracy matrices and costs that compare them."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import torch

from ..config import RunConfig, check_sharded_strategies, general_tasks
from ..continual.strategies.factory import build_strategy, sweep_strategies
from ..continual.report import summary_table, versions, write_outputs
from ..continual.sequence import TaskSequence, routed_entry, run_strategy
from ..evaluate import general_perplexity
from ..lm.memory import memory_note
from ..lm.model import open_model
from ..lm.parallel import DataParallel, is_main, main_first
from ..tasks import resolve_tasks


def run(cfg: RunConfig, out: str | Path | None = None, sweep: bool = False,
        progress: bool = True, log=None) -> dict:
    """Run every strategy of `cfg` (or the sweep) and write results.json, report.md and
    accuracy.png to `out` (default runs/<timestamp>/). Returns the results (None on the
    ranks other than 0 of a `--parallel` run, which train but neither score nor write)."""
    cfg.validate()
    if cfg.parallel == "fsdp2" and not sweep:  # before any rank starts
        check_sharded_strategies(cfg.strategies)
    parallel = DataParallel(cfg.device, cfg.parallel) if cfg.parallel else None
    try:
        return _run(cfg, out, sweep, progress, log, parallel)
    finally:
        if parallel is not None:
            parallel.close()


def _run(cfg: RunConfig, out, sweep: bool, progress: bool, log, parallel: DataParallel | None) -> dict | None:
    from tqdm.auto import tqdm

    main = is_main(parallel)
    log = (log or (lambda msg: tqdm.write(msg))) if main else (lambda msg: None)
    progress = progress and main
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out) if out is not None else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    t_start = time.perf_counter()
    tasks = resolve_tasks(cfg.task_names, cfg.seed, cfg.n_train, cfg.n_test)  # bad tasks fail first
    # task 0: general ability (the built-in base skill, or a real model's knowledge probe);
    # `guard`: what trace's --protect-base guards
    general, guard = general_tasks(cfg)
    strategies = (sweep_strategies(cfg, guard) if sweep
                  else [build_strategy(s, cfg, guard) for s in cfg.strategies])
    base, codec, model_dir = main_first(parallel, lambda: open_model(  # rank 0 fills a fresh cache
        cfg.model, size=cfg.size, cache_dir=cfg.cache_dir, dtype=cfg.dtype, device=cfg.device,
        progress=progress, chat=cfg.chat))
    perplexity = None if cfg.model == "builtin" else general_perplexity(codec, base)
    seq = TaskSequence.build(tasks, general, base, codec, score=main, perplexity=perplexity)
    total_params = sum(p.numel() for p in base.parameters())
    log(f"model: {model_dir} ({total_params:,} parameters); tasks: {', '.join(t.name for t in tasks)}; "
        f"strategies: {', '.join(s.name for s in strategies)}")
    results = {
        "config": cfg.flat(), "sweep": sweep, "versions": versions(), "seed": cfg.seed,
        "model": str(model_dir), "total_params": total_params,
        "columns": seq.columns, "first_task_column": seq.first, "chat": getattr(codec, "chat", False),
        "memory_note": memory_note(cfg.device),
        "strategies": {},
    }
    for strategy in strategies:
        if hasattr(strategy, "routes") and not (cfg.routed and strategy.name == "trace"):
            strategy.routes = None  # no values kept: no routed row
        entry = run_strategy(strategy, seq, base, codec, cfg.train_config(), seed=cfg.seed,
                             device=cfg.device, max_len=cfg.max_len, progress=progress, log=log,
                             lora_rank=cfg.lora.rank, parallel=parallel,
                             general_every=cfg.general_every)
        if not main:
            continue
        results["strategies"][strategy.name] = entry
        if strategy.name == "trace" and "routed" in entry:
            results["strategies"]["trace_routed"] = routed_entry(entry, seq.first)
        log(f"{strategy.name:>10s}: " + ", ".join(
            f"{k}={'-' if v is None else f'{v:.1f}'}" for k, v in entry["metrics"].items())
            + f" ({entry['costs']['seconds']:.0f} s)")
    results["seconds"] = time.perf_counter() - t_start
    if not main:
        parallel.barrier()  # rank 0 writes
        return None
    results["parallel"] = None if parallel is None else {"mode": cfg.parallel, "world": parallel.world}
    write_outputs(results, out)
    if parallel is not None:
        parallel.barrier()
    log("\n" + summary_table(results) + "\n")
    log(f"wrote {out}/results.json, report.md, accuracy.png ({results['seconds']:.0f} s)")
    return results


__all__ = ["run"]
