"""`trace-ft adapt`: one new task into an existing model and its on-disk task history.

The steps are those of the `trace` strategy in `trace-ft run` (same probe, selection,
batches and schedule for the task's position in the history), so a sequence of `adapt`
runs gives the numbers of one `run` over the same tasks. Between the steps the run
checkpoints (the selection once, then the core values and optimizer state every N
steps); `resume=True` continues an interrupted run from its newest checkpoint and ends
with the same model and history as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trace_kernels import CoreMask

from ..benchmarks.results import bench_entry
from ..config import RunConfig, RunSetup
from ..config.plan import TRACE_STEP, time_step
from ..continual.strategies.base import Context
from ..evaluate import Evaluator
from ..lm.model import save_model, weights_sha256
from ..lm.parallel import DataParallel, is_main
from ..method.pipeline import CoreStart
from ..method.routing import core_values, full_core_values, set_core_values
from ..store.atomic import sha256_file
from ..store.checkpoint import AdaptCheckpoint, CheckpointError
from ..store.history import TaskHistory, TaskRecord, data_fingerprint, model_fingerprint


def default_checkpoint_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


def adapt(cfg: RunConfig, model: str, task: str, history: str | Path, out: str | Path, *,
          eval_history: bool = False, resume: bool = False, checkpoint_every: int = 50,
          checkpoint_dir: str | Path | None = None, core: str | Path | None = None,
          overwrite: bool = False, ignore_dtype: bool = False, progress: bool = True,
          log: Callable[[str], None] | None = None,
          on_step: Callable[[int], None] | None = None) -> dict:
    """Add `task` (a task directory or built-in skill) to the model at `model` (a
    directory, or "builtin") with TRACE; save the result to `out` and append the task to
    the history at `history` (created if absent). Returns a summary.

    core: a CoreMask file (e.g. from `transfer`) to train instead of probing and selecting.
    on_step(done): called after every training step (after any checkpoint of that step).
    With ``cfg.parallel`` (under torchrun) every rank trains its share of each batch; rank 0
    alone scores and writes the model, the history and the checkpoints (the others return
    None).
    """
    cfg.validate()
    parallel = DataParallel(cfg.device, cfg.parallel) if cfg.parallel else None
    try:
        return _adapt(cfg, model, task, history, out, eval_history=eval_history, resume=resume,
                      checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir, core=core,
                      overwrite=overwrite, ignore_dtype=ignore_dtype, progress=progress, log=log,
                      on_step=on_step, parallel=parallel)
    finally:
        if parallel is not None:
            parallel.close()


def _adapt(cfg: RunConfig, model, task, history, out, *, eval_history, resume, checkpoint_every,
           checkpoint_dir, core, overwrite, ignore_dtype, progress, log, on_step,
           parallel: DataParallel | None) -> dict | None:
    from tqdm.auto import tqdm

    main = is_main(parallel)
    log = (log or (lambda msg: tqdm.write(msg))) if main else (lambda msg: None)
    progress = progress and main
    t0 = time.perf_counter()
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if cfg.trace.continue_probe and core is not None:
        if "trace_continue_probe" not in cfg.defaulted:
            raise ValueError("--probe-continue continues from the probe, and --core skips it: pass one of them")
        cfg = cfg.replaced(trace_continue_probe=False)  # (the default's: no probe to continue from)
    if cfg.trace.continue_probe and parallel is not None and parallel.sharded:
        raise ValueError("--probe-continue needs unsharded weights: use --parallel ddp, or leave it off")
    if cfg.trace.protect_base:
        raise ValueError("trace_protect_base is for `trace-ft run` only: an adapt history "
                         "guards the tasks it holds")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    ckpt = AdaptCheckpoint(checkpoint_dir or default_checkpoint_dir(out))
    if ckpt.exists() and not resume:
        raise ValueError(f"an interrupted run left a checkpoint at {ckpt.path}: pass --resume to "
                         "continue it, or delete it to start over")
    if resume and not ckpt.exists():
        raise ValueError(f"--resume: no checkpoint at {ckpt.path}")
    if out.exists() and not overwrite and not resume:
        raise ValueError(f"--out {out} already exists (pass --overwrite to replace it)")
    core_mask = CoreMask.load(core) if core is not None else None
    if str(model) != cfg.model:  # the defaults follow the model adapted
        cfg = cfg.replaced(model=str(model))
    setup = RunSetup.open(cfg, parallel=parallel, progress=False, task_specs=[task])  # bad data fails first
    (new_task,), net, codec, model_dir = setup.tasks, setup.base, setup.codec, setup.model_dir
    if core_mask is not None:
        core_mask.check_shapes({n: tuple(p.shape) for n, p in net.named_parameters()},
                               f"--core {core}")
    fingerprint = model_fingerprint(net)
    hist = TaskHistory.open(history, fingerprint, create=True, ignore_dtype=ignore_dtype)
    if parallel is not None:
        parallel.barrier()  # every rank has read its inputs before rank 0 writes anything
    with hist.hold() if main else contextlib.nullcontext():  # rank 0: the only writer until the end
        data = data_fingerprint(new_task)
        if resume and len(hist) and hist.entries[-1]["data"] == data and \
                hist.entries[-1]["summary"].get("checkpoint") == str(ckpt.path) and \
                ckpt.state()["inputs"]["history_tasks"] == len(hist) - 1:
            if parallel is not None:
                parallel.barrier()  # every rank has read the checkpoint
            if main:
                ckpt.remove()  # killed after the history was written: nothing left to do
            log(f"task {new_task.name!r} was already added to {history}; removed the checkpoint")
            return {"task": new_task.name, "index": len(hist), "already_done": True,
                    **hist.entries[-1]["summary"]}
        if new_task.name in hist.names:
            raise ValueError(f"task {new_task.name!r} is already in history {history} "
                             f"(task {hist.names.index(new_task.name) + 1}); tasks need distinct names")
        model_in = weights_sha256(model_dir)
        if len(hist) and model_in and hist.entries[-1]["summary"].get("model_out") not in (None, model_in):
            log(f"warning: {model_dir} is not the model the history's last task "
                f"({hist.names[-1]!r}) produced; continuing")

        # the standard benchmarks before training (`--general-bench`; kept across runs)
        bench = setup.benchmarks if main else None
        bench_before = None if bench is None else setup.score_cache.get_or(bench.signature(), lambda: bench(net))
        strategy = setup.strategy("trace")
        strategy.history = hist.earlier()
        step_s, _ = time_step(setup)
        probe = 0 if core is not None else strategy.pipeline.probe_steps
        log(f"plan: add {new_task.name!r} to {model_dir} (history of {len(hist)} tasks): "
            + (f"a {probe}-step probe and the selection, then " if probe else "the given core, ")
            + f"{cfg.steps} training steps of the core at batch {cfg.batch_size}, then scoring. One training "
            f"step here: {step_s:.1f} s; estimated about {(probe + TRACE_STEP * cfg.steps) * step_s * 1.3:.0f} s.")
        index = len(hist) + 1
        torch.manual_seed(cfg.seed)
        ctx = Context(model=net, codec=codec, train=cfg.train_config(), seed=cfg.seed,
                      progress=progress, max_len=cfg.max_len, num_tasks=index, parallel=parallel)
        sharded = parallel is not None and parallel.sharded
        inputs = {"model_fingerprint": fingerprint["sha256"], "model_weights": model_in,
                  "task": data, "history_tasks": len(hist),
                  "core": None if core is None else sha256_file(core), "config": cfg.flat()}

        # 1. probe and select (or take the given core), checkpointed once. With --parallel
        # fsdp2 the ranks train a sharded copy; `net` stays whole (rank 0 scores and saves it)
        if resume:
            state = ckpt.check_inputs(inputs)
            mask, updates, info = ckpt.selection(state)
            start, tensors, opt_state, losses = ckpt.load_step(state)
            saved_start = ckpt.continue_from(state)
            # killed before the first checkpointed step: continue from the probe as it left off
            resume_from = CoreStart.from_tensors(saved_start) if saved_start and opt_state is None else None
            log(f"resuming {new_task.name!r} from {ckpt.path} at step {start}/{cfg.steps}")
            before = core_values(net, mask)  # the input model, as the interrupted run had it
            if tensors:  # only core elements ever change: put them back
                set_core_values(net, mask, tensors)
        if sharded:
            ctx.model = parallel.prepare(copy.deepcopy(net))
        if not resume:
            if core_mask is not None:
                mask, updates, info = core_mask, {}, {"probe_loss": None, "source": str(core)}
            else:
                found = strategy.find_core(ctx, index, new_task, gather=parallel.gather_tensors if sharded else None)
                mask, updates, info = found.core, found.updates, {"probe_loss": found.probe_loss}
            resume_from = None if core_mask is not None else found.start  # (--probe-continue)
            if main:
                ckpt.start(inputs, mask, updates, info,
                           continue_from=None if resume_from is None else resume_from.to_tensors())
            start, opt_state, losses = 0, None, []
            before = core_values(net, mask)

        # 2. train the core, checkpointing every `checkpoint_every` steps and at the end
        # a checkpoint holds the core elements' values, not whole tensors
        def save(done: int, run_losses: list[float], opt) -> None:
            if done % checkpoint_every == 0 or done == cfg.steps:
                if sharded:  # every rank takes part in gathering
                    values, opt_state = full_core_values(ctx.model, mask), parallel.optimizer_state(ctx.model, opt)
                elif main:
                    values, opt_state = core_values(net, mask), opt.state_dict()
                if main:
                    ckpt.save_step(done, values, opt_state, losses + run_losses)
            if on_step is not None:
                on_step(done)

        run_losses, state_bytes = strategy.train_core(ctx, index, new_task, mask, start_step=start,
                                                      optimizer_state=opt_state, on_step=save,
                                                      start=resume_from)
        losses = losses + run_losses
        fisher = strategy.trained_fisher(ctx, index, new_task)
        if sharded:
            fisher = parallel.gather_tensors(fisher)
            parallel.gather_into(ctx.model, net if main else None)
        if not main:
            parallel.barrier()  # rank 0 scores and writes
            return None

        # 3. score, save the model, then append to the history (the manifest is written last)
        earlier_tasks = hist.tasks() if eval_history else []
        if eval_history and hist.untested:
            log(f"not scored (recorded without a test split): {', '.join(hist.untested)}")
        evaluator = Evaluator(earlier_tasks + [new_task], codec)
        names = [t.name for t in evaluator.tasks]
        by_metric = evaluator(net)
        scores = dict(zip(names, by_metric["exact"]))
        save_model(net, codec, out, overwrite=overwrite or resume)
        cost = strategy.cost(mask, state_bytes, losses)
        summary = {"core_elements": cost.trainable, "eligible_elements": mask.numel,
                   "state_bytes": state_bytes, "seconds": time.perf_counter() - t0,
                   "final_loss": cost.final_loss, "probe_loss": info.get("probe_loss"),
                   "scores": scores, "scores_edit": dict(zip(names, by_metric["edit"])),
                   "scores_loglik": dict(zip(names, by_metric["loglik"])), "model_in": model_in,
                   "model_out": weights_sha256(out),
                   "out": str(out), "checkpoint": str(ckpt.path), "resumed": resume}
        if bench is not None:
            summary["general_bench"] = bench_entry([bench_before, bench(net)])
        record = TaskRecord(name=new_task.name, core=mask, updates=updates, fisher=fisher,
                            before=before, after=core_values(net, mask),
                            test=new_task.test, scorer=new_task.scorer, data=data,
                            hyperparameters={"trace": strategy.config(),
                                             "train": dataclasses.asdict(strategy.train_config(ctx)),
                                             "seed": cfg.seed, "index": index,
                                             "core_file": None if core is None else str(core)},
                            summary=summary)
        hist.append(record, fingerprint)
        ckpt.remove()
        if parallel is not None:
            parallel.barrier()
        log(format_summary(new_task.name, index, summary, history))
        return {"task": new_task.name, "index": index, "already_done": False, **summary}


def format_summary(name: str, index: int, s: dict, history) -> str:
    share = s["core_elements"] / s["eligible_elements"] if s["eligible_elements"] else 0.0
    scores = ", ".join(f"{k}={v:.1f}" for k, v in s["scores"].items())
    b = s.get("general_bench")
    bench = "" if not b else ("\n  standard benchmarks: " + ", ".join(
        f"{n} {c[c['primary']]['delta']:+.1f} ± {c[c['primary']]['se']:.1f}" for n, c in b["change"].items())
        + f" (mean {b['mean_change']:+.1f} ± {b['mean_change_se']:.1f} points)")
    return (f"task {index} {name!r}: trained {s['core_elements']:,} of {s['eligible_elements']:,} "
            f"eligible elements ({share:.2%}); optimizer state {s['state_bytes']:,} bytes; "
            f"{s['seconds']:.1f} s\n  scores: {scores}{bench}\n  model: {s['out']}   history: {history}")


__all__ = ["adapt", "default_checkpoint_dir", "CheckpointError"]
