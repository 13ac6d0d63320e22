"""`trace-ft run`: one continual sequence of tasks, every chosen strategy on identical data,
steps, batch size, schedule and seed, and the accuracy matrices and costs that compare them."""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path

import torch

from . import metrics
from .data import EncodedSet, greedy_decode
from .memory import PeakMemory, memory_note
from .model import builtin_model, load_model
from .select import GRANULARITIES, SelectConfig
from .strategies import EWC, MTL, NAMES, LoRA, Replay, SeqFT, Strategy, Trace
from .strategies.base import Context
from .tasks import BASE, DEFAULT_ORDER, Task, builtin_task, resolve_tasks
from .train import TrainConfig

DEFAULT_STRATEGIES = ("trace", "seqft", "lora", "ewc", "replay", "mtl")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class RunConfig:
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_ORDER))
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    model: str = "builtin"            # "builtin" or a local Hugging Face model directory
    size: str = "small"               # built-in model size (tiny, small, medium)
    dtype: str = "float32"
    device: str = "cpu"
    cache_dir: str | None = None
    steps: int = 200                  # per task
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.1
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    n_train: int = 2000
    n_test: int = 200
    max_len: int | None = None
    seed: int = 0
    threads: int | None = None
    # trace
    trace_budget: float = 0.05
    trace_granularity: str = "element"
    trace_probe_steps: int = 50
    trace_probe_lr: float | None = None
    trace_lr: float | None = 1e-2     # the core is small: it takes a larger step (see README)
    trace_scope: str = "global"
    trace_importance: str = "rank"
    trace_threshold: float = 0.5
    trace_specificity_unit: str = "block"   # where cosines are measured: block, row, tensor
    trace_shared_rule: str = "exclude"
    trace_share_cores: bool = False
    trace_sketch_dim: int | None = None
    trace_protect: float = 0.0        # interference guard strength (0: off)
    trace_protect_base: bool = False  # guard the base skill too (a Fisher probe of its data)
    # baselines
    lora_lr: float | None = 3e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    ewc_lambda: float = 1e4
    ewc_lr: float | None = None
    replay_buffer: int = 50
    replay_ratio: float = 0.25
    # --sweep: granularity × budget × probe steps of the trace strategy
    sweep_granularity: list[str] = field(default_factory=lambda: list(GRANULARITIES))
    sweep_budget: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1])
    sweep_probe_steps: list[int] = field(default_factory=lambda: [10, 50])

    def __post_init__(self) -> None:
        # "--granularity 64" arrives as a string: a block size
        self.trace_granularity = _granularity(self.trace_granularity)
        self.sweep_granularity = [_granularity(g) for g in self.sweep_granularity]

    def validate(self) -> None:
        """Every setting checked at once, before anything slow or visible happens."""
        from .model import SIZES

        if not self.tasks:
            raise ValueError("tasks: give at least one task")
        if not self.strategies:
            raise ValueError("strategies: give at least one strategy")
        for s in self.strategies:
            strategy_names_ok(s)
        self.train_config().validate()
        self.select_config().validate()
        for g in self.sweep_granularity:
            self.select_config(granularity=g).validate()
        if self.model == "builtin" and self.size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, got {self.size!r}")
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
        if self.trace_probe_steps < 1:
            raise ValueError(f"trace_probe_steps must be >= 1, got {self.trace_probe_steps}")
        for name in ("trace_probe_lr", "trace_lr", "lora_lr", "ewc_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.trace_sketch_dim is not None and self.trace_sketch_dim < 1:
            raise ValueError(f"trace_sketch_dim must be >= 1, got {self.trace_sketch_dim}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.ewc_lambda < 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {self.ewc_lambda}")
        if self.replay_buffer < 0 or not 0 <= self.replay_ratio < 1:
            raise ValueError("replay_buffer must be >= 0 and replay_ratio in [0, 1)")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                           warmup=self.warmup, schedule=self.schedule,
                           weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm)

    def select_config(self, **over) -> SelectConfig:
        base = SelectConfig(budget=self.trace_budget, granularity=self.trace_granularity,
                            scope=self.trace_scope, importance=self.trace_importance,
                            specificity_threshold=self.trace_threshold,
                            specificity_unit=self.trace_specificity_unit,
                            shared_rule=self.trace_shared_rule,
                            share_earlier_cores=self.trace_share_cores,
                            protect=self.trace_protect)
        return dataclasses.replace(base, **over)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """Flat keys, or TOML tables whose keys are prefixed by the table name
        (``[trace] budget = 0.05`` is ``trace_budget``)."""
        known = {f.name for f in fields(cls)}
        flat = {}
        for k, v in data.items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    flat[f"{k}_{kk}"] = vv
            else:
                flat[k] = v
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**flat)


def _granularity(g: str | int) -> str | int:
    return int(g) if isinstance(g, str) and g.isdigit() else g


def strategy_names_ok(name: str) -> None:
    if name in NAMES or (name.startswith("trace_") and name[6:] in GRANULARITIES):
        return
    raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(NAMES)} "
                     f"or trace_<{'|'.join(GRANULARITIES)}>")


def _trace_kwargs(cfg: RunConfig, general: Task | None) -> dict:
    return dict(probe_steps=cfg.trace_probe_steps, probe_lr=cfg.trace_probe_lr, lr=cfg.trace_lr,
                sketch_dim=cfg.trace_sketch_dim,
                general=general if cfg.trace_protect_base else None)


def build_strategy(name: str, cfg: RunConfig, general: Task | None = None) -> Strategy:
    """`general`: the base skill's task, protected by trace when `trace_protect_base`."""
    trace_kw = _trace_kwargs(cfg, general)
    if name == "trace":
        return Trace(cfg.select_config(), name="trace", **trace_kw)
    if name == "trace_paper":
        return Trace(SelectConfig.paper(), name="trace_paper", **trace_kw)
    if name.startswith("trace_") and name[6:] in GRANULARITIES:
        return Trace(cfg.select_config(granularity=name[6:]), name=name, **trace_kw)
    if name == "seqft":
        return SeqFT()
    if name == "lora":
        return LoRA(lr=cfg.lora_lr, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    if name == "ewc":
        return EWC(lr=cfg.ewc_lr, lam=cfg.ewc_lambda)
    if name == "replay":
        return Replay(buffer_per_task=cfg.replay_buffer, ratio=cfg.replay_ratio)
    if name == "mtl":
        return MTL()
    strategy_names_ok(name)
    raise AssertionError(name)


def sweep_strategies(cfg: RunConfig, general: Task | None = None) -> list[Strategy]:
    out = []
    for g in cfg.sweep_granularity:
        for b in cfg.sweep_budget:
            for ps in cfg.sweep_probe_steps:
                kw = {**_trace_kwargs(cfg, general), "probe_steps": ps}
                out.append(Trace(cfg.select_config(granularity=g, budget=b),
                                 name=f"trace[{g},{b:g},p{ps}]", **kw))
    return out


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


class Evaluator:
    """Greedy decoding and exact-match scoring of a fixed list of tasks' test sets."""

    def __init__(self, tasks: list[Task], codec) -> None:
        self.tasks, self.codec = tasks, codec
        self.sets = [EncodedSet(t.test, codec) for t in tasks]

    def __call__(self, model) -> list[float]:
        scores = []
        for task, enc in zip(self.tasks, self.sets):
            ids = greedy_decode(model, enc, eos_id=self.codec.eos_id)
            scores.append(task.score([self.codec.decode(x) for x in ids]))
        return scores


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
    if cfg.model == "builtin":
        base, codec, model_dir = builtin_model(cfg.size, cfg.cache_dir, progress=progress)
        base = base.to(cfg.device)
    else:
        base, codec = load_model(cfg.model, cfg.dtype, cfg.device)
        model_dir = Path(cfg.model)
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
    from .report import summary_table, write_outputs

    write_outputs(results, out)
    log("\n" + summary_table(results) + "\n")
    log(f"wrote {out}/results.json, report.md, accuracy.png ({results['seconds']:.0f} s)")
    return results


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


__all__ = ["RunConfig", "run", "build_strategy", "sweep_strategies", "load_config_file",
           "Evaluator", "versions", "default_threads"]
