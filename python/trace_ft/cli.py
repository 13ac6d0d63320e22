"""The `trace-ft` command (also ``python -m trace_ft``)."""

from __future__ import annotations

import argparse
import sys

from trace_kernels import __version__

from .runner import RunConfig, default_threads, load_config_file, run


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in _list(text)]


def _ints(text: str) -> list[int]:
    return [int(x) for x in _list(text)]


# flag -> (RunConfig field, type, help)
RUN_FLAGS = {
    "--tasks": ("tasks", _list, "comma-separated built-in skills or task directories, in order"),
    "--strategies": ("strategies", _list, "comma-separated: trace, trace_paper, trace_element, "
                     "trace_row, trace_tensor, seqft, lora, ewc, replay, mtl"),
    "--model": ("model", str, "'builtin' or a local Hugging Face causal-LM directory"),
    "--size": ("size", str, "built-in model size: tiny, small, medium"),
    "--dtype": ("dtype", str, "float32, bfloat16 or float16 (--model only)"),
    "--device": ("device", str, "cpu or cuda"),
    "--cache-dir": ("cache_dir", str, "where the built-in base model is cached (default ~/.cache/trace-ft)"),
    "--steps": ("steps", int, "training steps per task"),
    "--batch-size": ("batch_size", int, "examples per step"),
    "--lr": ("lr", float, "peak learning rate (all strategies unless overridden)"),
    "--schedule": ("schedule", str, "cosine, linear or constant after warmup"),
    "--n-train": ("n_train", int, "training examples per task (built-in: generated)"),
    "--n-test": ("n_test", int, "test examples per task"),
    "--seed": ("seed", int, "seed for data, initialisation and sampling"),
    "--threads": ("threads", int, "CPU threads for torch"),
    "--budget": ("trace_budget", float, "trace: core budget, fraction of eligible elements"),
    "--granularity": ("trace_granularity", str, "trace: element, row, tensor or a block size"),
    "--probe-steps": ("trace_probe_steps", int, "trace: warm-start probe steps"),
    "--probe-lr": ("trace_probe_lr", float, "trace: probe learning rate (default: --lr)"),
    "--trace-lr": ("trace_lr", float, "trace: learning rate on the core"),
    "--threshold": ("trace_threshold", float, "trace: specificity threshold (max cosine)"),
    "--specificity-unit": ("trace_specificity_unit", str, "trace: where the cosine with earlier "
                           "tasks is measured: block, row or tensor"),
    "--sketch-dim": ("trace_sketch_dim", int, "trace: keep earlier updates as count sketches of "
                     "this many values per block (default: exact)"),
    "--protect": ("trace_protect", float, "trace: interference guard strength (0 off)"),
    "--protect-base": ("trace_protect_base", lambda x: x.lower() in ("1", "true", "yes", "on"),
                       "trace: also guard the base skill (true/false)"),
    "--lora-lr": ("lora_lr", float, "lora: learning rate"),
    "--lora-rank": ("lora_rank", int, "lora: rank"),
    "--ewc-lambda": ("ewc_lambda", float, "ewc: penalty strength"),
    "--replay-buffer": ("replay_buffer", int, "replay: examples kept per earlier task"),
    "--sweep-granularity": ("sweep_granularity", _list, "--sweep: granularities"),
    "--sweep-budget": ("sweep_budget", _floats, "--sweep: budgets"),
    "--sweep-probe-steps": ("sweep_probe_steps", _ints, "--sweep: probe lengths"),
}


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _add_settings(parser: argparse.ArgumentParser, skip=frozenset()) -> None:
    """The RunConfig flags. Their argparse default is None (unset), so --config and then
    RunConfig's own defaults apply; the help shows RunConfig's default."""
    defaults = RunConfig()
    for flag, (dest, typ, text) in RUN_FLAGS.items():
        if dest not in skip:
            default = getattr(defaults, dest)
            shown = "" if default is None else f" (default: {_shown(default)})"
            parser.add_argument(flag, dest=dest, type=typ, default=None, help=text + shown,
                                metavar=flag[2:].upper().replace("-", "_"))


# Optional packages each command needs, and the extra of trace-kernels that installs them.
NEEDS = {"run": ("transformers", "peft", "matplotlib"), "adapt": ("transformers",),
         "transfer": ("transformers",)}


def require_extras(command: str, modules=None) -> None:
    """A clear error naming the extra to install when an optional package is missing (the
    plain wheel has none of them), instead of a traceback halfway through a run."""
    import importlib

    missing = []
    for mod in modules if modules is not None else NEEDS[command]:
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ValueError(f"this command needs {', '.join(missing)}, which is not installed: "
                         "pip install 'trace-kernels[hf]'")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="trace-ft", description="Continual fine-tuning with TRACE.")
    ap.add_argument("--version", action="version", version=f"trace-ft (trace-kernels) {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a continual sequence with TRACE and the baselines",
                       description="Run a continual sequence of tasks with TRACE and the baselines "
                       "and write results.json, report.md and accuracy.png. With no arguments: "
                       "the built-in model and suite, strategies trace,seqft,lora,ewc,replay,mtl.")
    r.add_argument("--config", help="a TOML file of settings (flags override it)")
    r.add_argument("--out", help="output directory (default runs/<timestamp>/)")
    r.add_argument("--sweep", action="store_true",
                   help="run the trace ablation (granularity × budget × probe steps) instead")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_settings(r)
    a = sub.add_parser("adapt", help="add one task to a model and its task history",
                       description="Probe the task, select its core against the history, train "
                       "only the core, save the model to --out and append the task to --history. "
                       "Settings (flags or --config) are those of `trace-ft run` that concern the "
                       "trace strategy, so a sequence of adapt runs reproduces the trace strategy "
                       "of one run. Not here: --lr (the core's learning rate is --trace-lr, the "
                       "probe's --probe-lr), --protect-base (a history guards the tasks it holds), "
                       "and the other strategies' and sweep's settings.")
    a.add_argument("--task", required=True, help="a task directory (train/test .json[l]) or a built-in skill")
    a.add_argument("--history", required=True, help="the task history directory (created if absent)")
    a.add_argument("--out", required=True, help="where the adapted model is saved (safetensors)")
    a.add_argument("--eval-history", action="store_true", help="also score every earlier task of the history")
    a.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    a.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="save a checkpoint every N training steps (default 50)")
    a.add_argument("--checkpoint-dir", help="where checkpoints go (default <out>.checkpoint)")
    a.add_argument("--core", help="a CoreMask file (e.g. from `trace-ft transfer`) to train instead of probing")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a.add_argument("--ignore-dtype", action="store_true",
                   help="accept a model whose parameter dtypes differ from the history's")
    a.add_argument("--config", help="a TOML file of settings (flags override it)")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_settings(a, skip=ADAPT_SKIPS)
    h = sub.add_parser("history", help="list and verify a task history",
                       description="List the tasks of a history (cores, losses, scores) after "
                       "verifying every file's checksum.")
    h.add_argument("path", help="the history directory")
    h.add_argument("--json", action="store_true", help="print the manifest entries as JSON")
    t = sub.add_parser("transfer", help="map a core found on a small model onto a larger one",
                       description="Map a task's core from a small model (its history entry or a "
                       "CoreMask file) onto a larger model of the same family, per layer and module "
                       "type, and write it as a CoreMask file for `trace-ft adapt --core`.")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--history", help="the small model's task history")
    src.add_argument("--core", help="a CoreMask file found on the small model")
    t.add_argument("--task", help="with --history: the task's name (default: the newest)")
    t.add_argument("--model", required=True, help="the large model: a Hugging Face directory or 'builtin'")
    t.add_argument("--size", default="medium", help="with --model builtin: its size (default medium)")
    t.add_argument("--out", required=True, help="the CoreMask file to write")
    t.add_argument("--positions", default="rescale", choices=("rescale", "random"),
                   help="rescale the small core's positions (default), or keep only its per-layer, "
                   "per-module budget and draw positions at random")
    t.add_argument("--seed", type=int, default=0, help="with --positions random")
    return ap


# `run` flags that mean nothing for one task added to a history
# (--lr too: the core's learning rate is --trace-lr, and the probe's --probe-lr)
ADAPT_SKIPS = {"tasks", "strategies", "lr", "lora_lr", "lora_rank", "ewc_lambda", "replay_buffer",
               "trace_protect_base", "sweep_granularity", "sweep_budget", "sweep_probe_steps"}


def _config(args: argparse.Namespace) -> RunConfig:
    data = load_config_file(args.config) if args.config else {}
    for dest, _, _ in RUN_FLAGS.values():
        value = getattr(args, dest, None)
        if value is not None:
            data[dest] = value
    cfg = RunConfig.from_dict(data)
    if cfg.threads is None:
        cfg.threads = default_threads()
    return cfg


def adapt_command(args: argparse.Namespace) -> int:
    from .adapt import adapt

    cfg = _config(args)
    require_extras("adapt")
    adapt(cfg, cfg.model, args.task, args.history, args.out, eval_history=args.eval_history,
          resume=args.resume, checkpoint_every=args.checkpoint_every,
          checkpoint_dir=args.checkpoint_dir, core=args.core, overwrite=args.overwrite,
          ignore_dtype=args.ignore_dtype, progress=not args.quiet)
    return 0


def history_command(args: argparse.Namespace) -> int:
    import json

    from .history import TaskHistory

    hist = TaskHistory.open(args.path)  # verifies every checksum
    if args.json:
        print(json.dumps(hist.entries, indent=1))
        return 0
    print(f"{args.path}: {len(hist)} task(s), all files verified")
    print(f"{'#':>3s}  {'task':16s} {'added (UTC)':20s} {'core':>12s} {'final loss':>10s}  scores after it")
    for e in hist.entries:
        s = e.get("summary", {})
        core = s.get("core_elements")
        loss = s.get("final_loss")
        scores = ", ".join(f"{k}={v:.1f}" for k, v in s.get("scores", {}).items())
        print(f"{e['index']:3d}  {e['name'][:16]:16s} {e['time'][:19]:20s} "
              f"{'-' if core is None else f'{core:,}':>12s} {'-' if loss is None else f'{loss:.4f}':>10s}  {scores}")
    return 0


def transfer_command(args: argparse.Namespace) -> int:
    from trace_kernels import CoreMask

    from .atomic import write_with
    from .history import TaskHistory
    from .model import model_shapes
    from .transfer import format_report, transfer_core

    require_extras("transfer")
    if args.task and not args.history:
        raise ValueError("--task needs --history")
    if args.history:
        hist = TaskHistory.open(args.history)
        if not len(hist):
            raise ValueError(f"history {args.history} holds no task")
        i = len(hist) - 1 if not args.task else (hist.names.index(args.task) if args.task in hist.names else -1)
        if i < 0:
            raise ValueError(f"task {args.task!r} is not in history {args.history} (it has {hist.names})")
        core = hist.record(i).core
        if core is None:
            raise ValueError(f"task {hist.names[i]!r} of {args.history} has no core")
    else:
        core = CoreMask.load(args.core)
    mask, report = transfer_core(core, model_shapes(args.model, args.size), args.positions, args.seed)
    write_with(args.out, mask.save)
    print(format_report(report))
    print(f"wrote {args.out}")
    return 0


def run_command(args: argparse.Namespace) -> int:
    cfg = _config(args)
    lora = "lora" in cfg.strategies and not args.sweep
    require_extras("run", [m for m in NEEDS["run"] if m != "peft" or lora])
    run(cfg, out=args.out, sweep=args.sweep, progress=not args.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": run_command, "adapt": adapt_command, "history": history_command,
                "transfer": transfer_command}[args.command](args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"trace-ft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
