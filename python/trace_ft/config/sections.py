"""Each strategy's settings, a dataclass that checks itself when built. Their flat names
(flags, TOML tables, result files) are ``<section>_<field>``: ``trace_probe_steps``,
``lora_rank``; the trace selection's fields (`SelectConfig`, nested in `TraceSettings`) are
``trace_<field>`` too: ``trace_budget``, ``trace_specificity_threshold``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..method.probe import PROBE_AUTOCAST
from ..method.select import GRANULARITIES, SelectConfig


def check_positive(section: str, **values) -> None:
    """Each value None (unset) or a finite number > 0, else ValueError naming it."""
    for name, value in values.items():
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{section}_{name} must be > 0 and finite, got {value}")


def granularity(g: str | int) -> str | int:
    """"--granularity 64" arrives as a string: a block size."""
    return int(g) if isinstance(g, str) and g.isdigit() else g


@dataclass
class TraceSettings:
    """The trace strategy's settings. None: the model's default, filled in by `RunConfig`."""

    probe_steps: int | None = None
    probe_lr: float | None = None     # the probe is a short full fine-tuning: the run's lr
    # the core is small: it takes a larger step than full fine-tuning's (the run's lr times
    # the model's core factor; see `defaults`)
    lr: float | None = None
    exclude: list[str] | None = None  # name patterns never eligible (None: the default)
    master_weights: bool | None = None  # fp32 masters of 16-bit cores (None: on for 16-bit)
    # linear layers with a few core rows or elements compute only those weight gradients
    # (None: on, but with --parallel fsdp2, whose weights are sharded)
    core_grads: bool | None = None
    sketch_dim: int | None = None
    protect_base: bool = False        # guard general ability too (the Fisher of the base skill / general text)
    # the probe's steps count toward the task: the core trains on from the probe's state on it
    # (None: the model's default, by the probe's share of the task; see `RunConfig`)
    continue_probe: bool | None = None
    # the dtype of the probe's products ("bf16", "fp16": under autocast; "off": the weights';
    # "auto": bf16 where the device multiplies it natively and the weights are fp32, else off;
    # None: the model's default, resolved by `RunConfig`)
    probe_autocast: str | None = None
    select: SelectConfig = field(default_factory=SelectConfig)

    def __post_init__(self) -> None:
        if isinstance(self.select, dict):  # (from a nested TOML table)
            self.select = SelectConfig(**self.select)
        if not dataclasses.is_dataclass(self.select) or not isinstance(self.select, SelectConfig):
            raise TypeError(f"trace select must be a SelectConfig, got {type(self.select).__name__}")
        self.select = dataclasses.replace(self.select, granularity=granularity(self.select.granularity))
        if self.probe_steps is not None and self.probe_steps < 1:
            raise ValueError(f"trace_probe_steps must be >= 1, got {self.probe_steps}")
        if self.probe_autocast is not None and self.probe_autocast not in (*PROBE_AUTOCAST, "auto"):
            raise ValueError(f"trace_probe_autocast must be one of {', '.join(PROBE_AUTOCAST)}, auto, "
                             f"got {self.probe_autocast!r}")
        check_positive("trace", probe_lr=self.probe_lr, lr=self.lr)
        if self.sketch_dim is not None and self.sketch_dim < 1:
            raise ValueError(f"trace_sketch_dim must be >= 1, got {self.sketch_dim}")


@dataclass
class LoRASettings:
    lr: float | None = 3e-3
    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self) -> None:
        check_positive("lora", lr=self.lr, alpha=self.alpha)
        if self.rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.rank}")


@dataclass
class EWCSettings:
    lam: float = 1e4                  # flag/TOML name: ewc_lambda, [ewc] lambda
    lr: float | None = None

    def __post_init__(self) -> None:
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"ewc_lambda must be >= 0 and finite, got {self.lam}")
        check_positive("ewc", lr=self.lr)


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
        self.granularity = [granularity(g) for g in self.granularity]
        for g in self.granularity:
            SelectConfig(granularity=g)
        for b in self.budget:
            SelectConfig(budget=b)
        if any(ps < 1 for ps in self.probe_steps):
            raise ValueError(f"sweep_probe_steps must be >= 1, got {self.probe_steps}")


# each strategy's settings: RunConfig's field and the section of the flat names
SECTIONS = {"trace": TraceSettings, "lora": LoRASettings, "ewc": EWCSettings, "replay": ReplaySettings,
            "sweep": SweepSettings}
# flat names that are not `<section>_<field>` (the second ones: earlier names, still read)
RENAMED = {("ewc", "lambda"): "lam", ("trace", "threshold"): "specificity_threshold",
           ("trace", "share_cores"): "share_earlier_cores"}
SELECT_FIELDS = {f.name for f in dataclasses.fields(SelectConfig)}


def flat_name(section: str, name: str) -> str:
    back = {v: k for (s, k), v in RENAMED.items() if s == section and k == "lambda"}
    return f"{section}_{back.get(name, name)}"


def section_field(flat: str) -> tuple[str, str] | None:
    """(section, field) of a flat name, or None if it names no section's field; the trace
    selection's fields come as ("trace.select", field)."""
    for section, kind in SECTIONS.items():
        if flat.startswith(section + "_"):
            name = flat[len(section) + 1:]
            name = RENAMED.get((section, name), name)
            if section == "trace" and name in SELECT_FIELDS:
                return "trace.select", name
            if name in {f.name for f in dataclasses.fields(kind)} and name != "select":
                return section, name
    return None


def section_flat(section: str, settings) -> dict:
    """A section's settings under their flat names (the trace selection's included)."""
    out = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if section == "trace" and f.name == "select":  # (JSON's types: a tuple as a list)
            out.update({f"trace_{k}": list(v) if isinstance(v, tuple) else v
                        for k, v in dataclasses.asdict(value).items()})
        else:
            out[flat_name(section, f.name)] = value
    return out
