"""The `trace-ft` command (also ``python -m trace_ft``)."""

from __future__ import annotations

import argparse
import sys

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
    "--trace-lr": ("trace_lr", float, "trace: learning rate on the core"),
    "--threshold": ("trace_threshold", float, "trace: specificity threshold (max cosine)"),
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="trace-ft", description="Continual fine-tuning with TRACE.")
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
    for flag, (dest, typ, text) in RUN_FLAGS.items():
        r.add_argument(flag, dest=dest, type=typ, default=None, help=text,
                       metavar=flag[2:].upper().replace("-", "_"))
    return ap


def run_command(args: argparse.Namespace) -> int:
    data = load_config_file(args.config) if args.config else {}
    for dest, _, _ in RUN_FLAGS.values():
        value = getattr(args, dest)
        if value is not None:
            data[dest] = value
    cfg = RunConfig.from_dict(data)
    if cfg.threads is None:
        cfg.threads = default_threads()
    run(cfg, out=args.out, sweep=args.sweep, progress=not args.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return run_command(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"trace-ft {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
