"""`trace-ft run`: one continual sequence of tasks, every chosen strategy on identical data,
steps, batch size, schedule and seed, and the accuracy matrices and costs that compare them."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import torch

from ..config import RunConfig, RunSetup
from ..config.plan import plan_line
from ..continual.report import summary_table, versions, write_outputs
from ..continual.sequence import run_strategy
from ..lm.memory import memory_note
from ..lm.parallel import DataParallel, is_main
from ..store.atomic import check_out, claim_dir


def run(cfg: RunConfig, out: str | Path | None = None, sweep: bool = False,
        progress: bool = True, log=None, overwrite: bool = False) -> dict:
    """Run every strategy of `cfg` (or the sweep) and write results.json, report.md and
    accuracy.png to `out` (default a new runs/<timestamp>/; an `out` that holds files is
    refused unless `overwrite`). Returns the results (None on the ranks other than 0 of a
    `--parallel` run, which train but neither score nor write)."""
    cfg.validate()
    if out is not None:
        check_out(out, overwrite)
    if not sweep:  # before any rank starts
        cfg.check_sharded_strategies(cfg.strategies)
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
    t_start = time.perf_counter()
    setup = RunSetup.open(cfg, parallel=parallel, progress=progress)  # bad tasks fail before the model opens
    strategies = setup.strategies(sweep)
    log(f"model: {setup.model_dir} ({setup.total_params:,} parameters)")
    if main:
        log(plan_line(setup, strategies))
    seq = setup.sequence(score=main)
    results = {
        "config": cfg.flat(), "sweep": sweep, "versions": versions(), "seed": cfg.seed,
        "model": str(setup.model_dir), "total_params": setup.total_params,
        "columns": seq.columns, "first_task_column": seq.first, "chat": getattr(setup.codec, "chat", False),
        "memory_note": memory_note(cfg.device),
        "strategies": {},
    }
    for strategy in strategies:
        entry, extra = run_strategy(strategy, seq, setup.base, setup.codec, cfg.train_config(), seed=cfg.seed,
                                    device=cfg.device, max_len=cfg.max_len, progress=progress, log=log,
                                    parallel=parallel, general_every=cfg.general_every,
                                    score_unseen=cfg.score_unseen)
        if not main:
            continue
        results["strategies"][strategy.name] = entry
        results["strategies"].update(extra)
        log(f"{strategy.name:>10s}: " + ", ".join(
            f"{k}={'-' if v is None else f'{v:.1f}'}" for k, v in entry["metrics"].items())
            + f" ({entry['costs']['seconds']:.0f} s)")
    results["seconds"] = time.perf_counter() - t_start
    if not main:
        parallel.barrier()  # rank 0 writes
        return None
    results["parallel"] = None if parallel is None else {"mode": cfg.parallel, "world": parallel.world}
    out = Path(out) if out is not None else claim_dir(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    write_outputs(results, out)
    if parallel is not None:
        parallel.barrier()
    log("\n" + summary_table(results) + "\n")
    log(f"wrote {out}/results.json, report.md, accuracy.png ({results['seconds']:.0f} s)")
    return results


__all__ = ["run"]
