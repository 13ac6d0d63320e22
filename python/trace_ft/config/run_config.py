"""`RunConfig`: every setting of `trace-ft run` (and of `adapt`, `frontier` and `eval`
where they apply), as given by flags, a TOML file or Python, with every setting left unset
filled in once from the model's defaults (`defaults.DEFAULTS`) when it is built."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..benchmarks.data import benchmark_names
from ..continual.strategies import strategy_names_ok
from ..lm.parallel import MODES as PARALLEL_MODES, check_launch
from ..lm.precision import native_bf16
from ..lm.train import TrainConfig
from ..tasks import SUITES
from ..tasks.builtin import PRETRAINED_SUITES
from ..tasks.real import DATASETS as REAL_DATASETS
from .defaults import defaults_for, model_kind
from .sections import (SECTIONS, EWCSettings, LoRASettings, ReplaySettings, SweepSettings, TraceSettings,
                       granularity, section_field, section_flat)

DEFAULT_STRATEGIES = ("trace", "seqft", "lora", "ewc", "replay", "mtl")
DTYPES = ("float32", "bfloat16", "float16")
# strategies that cannot run on a model sharded by --parallel fsdp2, and why
FSDP2_REFUSED = {"lora": "lora inserts adapter modules into the model after it is sharded"}
# the flat names `RunConfig` fills in from the model's defaults when they are unset
RESOLVED = ("lr", "steps", "batch_size", "n_train", "n_test", "general_every", "routed", "score_unseen", "trace_lr",
            "trace_probe_lr", "trace_probe_steps", "trace_core_grads", "trace_probe_autocast",
            "trace_continue_probe")


@dataclass
class RunConfig:
    """Every setting of a run: the run's own, then each strategy's as a nested,
    self-validating section. Unset (None) settings take the model's defaults when the
    config is built; `from_dict` and `flat`/`replaced` speak the flat names flags and result
    files use, and `replaced` lets the defaults follow a changed model or lr."""

    suite: str = "skills"             # built-in suite: skills, formats; instruct or real (for a real chat model)
    tasks: list[str] = field(default_factory=list)   # empty: the suite's tasks
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    model: str = "builtin"            # "builtin", a known model (smollm2-135m), a .gguf file or a HF directory
    chat: bool | None = None          # tasks in the tokenizer's chat template (None: where it has one)
    general: str | None = None        # a task directory of general-ability items (default: the built-in probe)
    general_every: str | None = None  # general ability scored after every "task" or at the "end"
    score_unseen: str | None = None   # tasks not yet trained scored after each task: "all" or the "next" only
    general_bench: list[str] = field(default_factory=list)  # standard benchmarks scored with it (none: off)
    general_bench_limit: int | None = 500  # the first N questions of each (None: whole splits)
    size: str = "small"               # built-in model size (tiny, small, medium)
    dtype: str = "float32"
    device: str = "cpu"
    cache_dir: str | None = None
    steps: int | None = None          # per task
    batch_size: int | None = None
    lr: float | None = None
    warmup: float = 0.1
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    n_train: int | None = None
    n_test: int | None = None
    max_len: int | None = None
    seed: int = 0
    threads: int | None = None
    parallel: str | None = None       # "ddp"/"fsdp2" under torchrun: data parallel ranks (None: one process)
    routed: bool | None = None        # keep trace's core values: the task-routed row
    trace: TraceSettings = field(default_factory=TraceSettings)
    lora: LoRASettings = field(default_factory=LoRASettings)
    ewc: EWCSettings = field(default_factory=EWCSettings)
    replay: ReplaySettings = field(default_factory=ReplaySettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    # the flat names that were unset and took the model's defaults (`replaced` sets them anew)
    defaulted: frozenset = field(default=frozenset(), compare=False, repr=False)
    # the flat names given as "auto" and resolved for this machine and dtype (`replaced`
    # resolves them anew, as it does the defaulted ones)
    auto: frozenset = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        d = defaults_for(self.kind, self.suite, self.model)
        unset = set()
        for name in ("lr", "steps", "batch_size", "n_train", "n_test", "general_every", "routed", "score_unseen"):
            if getattr(self, name) is None:
                unset.add(name)
                setattr(self, name, getattr(d, name))
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}")
        t = self.trace
        if t.lr is None:
            unset.add("trace_lr")
            t.lr = float(f"{self.lr * d.core_lr_factor:.12g}")  # 3e-4, not 3.0000000000000003e-4
        if t.probe_lr is None:
            unset.add("trace_probe_lr")
            t.probe_lr = self.lr
        if t.probe_steps is None:
            unset.add("trace_probe_steps")
            t.probe_steps = d.probe_steps
        if t.core_grads is None:
            unset.add("trace_core_grads")
            t.core_grads = self.parallel != "fsdp2"  # fsdp2 shards the weights
        if t.probe_autocast is None:
            unset.add("trace_probe_autocast")
            t.probe_autocast = d.probe_autocast
        if t.continue_probe is None:
            unset.add("trace_continue_probe")
            t.continue_probe = self.probe_continues(t.probe_steps, d)
        if t.probe_autocast == "auto":  # recorded as what it resolved to, on this machine
            if "trace_probe_autocast" not in unset:  # given as "auto": `replaced` asks again
                self.auto = self.auto | {"trace_probe_autocast"}
            t.probe_autocast = "bf16" if self.dtype == "float32" and native_bf16(self.device) else "off"
        self.defaulted = frozenset(unset) | self.defaulted

    def probe_continues(self, probe_steps: int, d=None) -> bool:
        """Whether a probe of `probe_steps` counts toward the task: as given, or by the
        model's default (`continue_probe_share` of the task's steps; never with sharded
        weights, which continuing cannot restrict to the core)."""
        if "trace_continue_probe" not in self.defaulted and self.trace.continue_probe is not None:
            return self.trace.continue_probe
        d = d or defaults_for(self.kind, self.suite, self.model)
        return self.parallel != "fsdp2" and probe_steps <= d.continue_probe_share * self.steps

    @property
    def kind(self) -> str:
        """"builtin" or "pretrained" (`defaults.model_kind`): what the defaults are for."""
        return model_kind(self.model)

    @property
    def builtin(self) -> bool:
        return self.kind == "builtin"

    def validate(self) -> None:
        """The settings that depend on each other or on the machine, checked at once before
        anything slow or visible happens (each section checked itself when built)."""
        from ..lm.model import SIZES

        if self.suite not in SUITES:
            raise ValueError(f"suite must be one of {', '.join(SUITES)}, got {self.suite!r}")
        if not self.strategies:
            raise ValueError("strategies: give at least one strategy")
        for s in self.strategies:
            strategy_names_ok(s)
        self.train_config().validate()
        if self.model == "builtin" and self.size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, got {self.size!r}")
        if self.builtin and not self.tasks and self.suite in PRETRAINED_SUITES:
            raise ValueError(f"suite {self.suite} is for a pretrained chat model (e.g. --model smollm2-135m); "
                             "the built-in model reads no English")
        if self.general is not None and self.builtin:
            raise ValueError("general: the built-in model's general ability is its base skill; "
                             "--general is for other models")
        if self.general_every not in ("task", "end"):
            raise ValueError(f"general_every must be 'task' or 'end', got {self.general_every!r}")
        if self.score_unseen not in ("all", "next"):
            raise ValueError(f"score_unseen must be 'all' or 'next', got {self.score_unseen!r}")
        if self.general is not None and not Path(self.general).is_dir():
            raise ValueError(f"general: {self.general} is not a task directory")
        if self.general_bench:
            if self.builtin:
                raise ValueError("general_bench: standard benchmarks are for a pretrained model; the built-in "
                                 "model reads no English")
            shared = {REAL_DATASETS[t]: t for t in self.task_names if t in REAL_DATASETS}
            for b in benchmark_names(self.general_bench):  # (raises, naming the choices)
                if b in shared:
                    raise ValueError(f"general_bench: {b} is the source of task {shared[b]!r}; a benchmark "
                                     "scoring general ability may not be one of the sequence's datasets")
        if self.general_bench_limit is not None and self.general_bench_limit < 2:
            raise ValueError(f"general_bench_limit must be >= 2, got {self.general_bench_limit}")
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

    def check_sharded_strategies(self, names) -> None:
        """Raise, naming them, if `names` hold strategies --parallel fsdp2 cannot run."""
        refused = [n for n in names if n in FSDP2_REFUSED]
        if refused and self.parallel == "fsdp2":
            raise ValueError(f"--parallel fsdp2 does not run {', '.join(refused)}: "
                             + "; ".join(FSDP2_REFUSED[n] for n in refused)
                             + " (leave it out with --strategies, or use --parallel ddp)")

    @property
    def task_names(self) -> list[str]:
        """The tasks in order: `tasks`, or the suite's."""
        return list(self.tasks) or list(SUITES[self.suite])

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                           warmup=self.warmup, schedule=self.schedule,
                           weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm)

    def flat(self) -> dict:
        """Every setting under its flat name (``trace_budget``), as the run uses it: what
        result files record."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in SECTIONS and f.name not in ("defaulted", "auto")}
        for section in SECTIONS:
            out.update(section_flat(section, getattr(self, section)))
        return out

    def replaced(self, **flat) -> RunConfig:
        """A copy with settings replaced by flat name (a frontier point, a sweep). Settings
        that took the model's defaults take them again (so a point's lr moves its core lr and
        probe lr, unless those were given)."""
        given = {k: "auto" if k in self.auto else v for k, v in self.flat().items() if k not in self.defaulted}
        return RunConfig.from_dict({**given, **flat})

    @classmethod
    def flat_names(cls) -> set[str]:
        return set(cls().flat())

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """Flat names (``trace_budget``), or TOML tables of a section (``[trace] budget``);
        each section validates its values as it is built."""
        top = {f.name for f in fields(cls)} - set(SECTIONS) - {"defaulted", "auto"}
        given: dict = {}
        nested: dict[str, dict] = {s: {} for s in (*SECTIONS, "trace.select")}
        unknown = []
        for k, v in data.items():
            items = ([(f"{k}_{kk}", vv) for kk, vv in v.items()] if isinstance(v, dict) else [(k, v)])
            for name, value in items:
                where = section_field(name)
                if where is not None:
                    nested[where[0]][where[1]] = value
                elif name in top:
                    given[name] = value
                else:
                    unknown.append(name)
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        select = nested.pop("trace.select")
        if "granularity" in select:
            select["granularity"] = granularity(select["granularity"])
        if "weights" in select:  # (a list, from JSON or TOML)
            select["weights"] = tuple(select["weights"])
        if select:
            nested["trace"]["select"] = dataclasses.replace(TraceSettings().select, **select)
        return cls(**given, **{s: SECTIONS[s](**kw) for s, kw in nested.items()})


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
