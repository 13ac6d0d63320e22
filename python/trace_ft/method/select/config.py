"""What selection takes and gives: its settings (`SelectConfig`), what it needs of an
earlier task (`EarlierTask`) and its result (`Selection`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

from trace_kernels import CoreMask
from trace_kernels.masks import block_size_for
from trace_kernels.sharding import is_dtensor

from ..offload import TensorsOnDisk
from ..sketch import BlockSketch

IMPORTANCE = ("rank", "product", "weighted", "l2", "fisher")
METHODS = ("trace", "paper", "paper_specificity")
SPECIFICITY_UNITS = ("block", "row", "tensor")
GRANULARITIES = ("element", "row", "tensor")


def specificity_size(shape: tuple[int, ...], block_size: int, unit: str) -> int:
    """Elements per specificity unit: the selection block, or the row or tensor holding it
    (never finer than the block, and always a whole number of blocks)."""
    if unit == "block":
        return block_size
    size = block_size_for(shape, unit)
    return size if size >= block_size and size % block_size == 0 else block_size


@dataclass(frozen=True)
class SelectConfig:
    method: str = "trace"
    budget: float = 0.05              # fraction of eligible elements (paper: of tensors)
    granularity: str | int = "element"  # "element", "row", "tensor" or a block size
    scope: str = "global"             # budget over all tensors, or "per_tensor"
    importance: str = "rank"
    weights: tuple[float, float] = (0.5, 0.5)   # (L2, Fisher) for "weighted"
    normalize: str = "global"         # ranks/maxima over all blocks, or "per_tensor"
    specificity_threshold: float = 0.5
    # Where the cosine is measured: "block" (each selection block) or a coarser unit whose
    # value every block inside it shares: "row" or "tensor". A one-element block's cosine
    # is only the sign agreement of two numbers (±1), so element-level selection needs a
    # coarser unit for specificity to mean anything.
    specificity_unit: str = "block"
    shared_rule: str = "exclude"      # or "downweight"
    share_earlier_cores: bool = False
    # Interference guard: weight importance by the share of each block's (normalised)
    # Fisher mass that belongs to the new task, F_t / (F_t + protect·Σ_τ F_τ), using the
    # earlier tasks' Fisher diagonals (EarlierTask.fisher). 0 turns it off.
    protect: float = 0.0

    def __post_init__(self) -> None:
        self.validate()  # (frozen: `replace` builds anew, so every variant is checked)

    @classmethod
    def paper(cls, budget: float = 0.10, specificity: bool = False) -> SelectConfig:
        return cls(method="paper_specificity" if specificity else "paper", budget=budget,
                   granularity="tensor")

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"budget must be a fraction in [0, 1], got {self.budget}")
        g = self.granularity
        if not (g in GRANULARITIES or (isinstance(g, int) and not isinstance(g, bool) and g >= 1)):
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)} or a block "
                             f"size >= 1, got {g!r}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {IMPORTANCE}, got {self.importance!r}")
        if self.scope not in ("global", "per_tensor"):
            raise ValueError(f"scope must be 'global' or 'per_tensor', got {self.scope!r}")
        if self.normalize not in ("global", "per_tensor"):
            raise ValueError(f"normalize must be 'global' or 'per_tensor', got {self.normalize!r}")
        if self.specificity_unit not in SPECIFICITY_UNITS:
            raise ValueError(f"specificity_unit must be one of {SPECIFICITY_UNITS}, "
                             f"got {self.specificity_unit!r}")
        if self.shared_rule not in ("exclude", "downweight"):
            raise ValueError(f"shared_rule must be 'exclude' or 'downweight', got {self.shared_rule!r}")
        if not (math.isfinite(self.protect) and self.protect >= 0):
            raise ValueError(f"protect must be >= 0 and finite, got {self.protect}")
        if not math.isfinite(self.specificity_threshold):  # NaN would silently exclude nothing
            raise ValueError(f"specificity_threshold must be a finite number, got {self.specificity_threshold}")
        if len(self.weights) != 2 or not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"weights must be two finite numbers, got {self.weights}")


@dataclass
class EarlierTask:
    """What selection needs of an earlier task: its updates (exact tensors or sketches, by
    parameter name), its core mask, and optionally its Fisher diagonal (by parameter name,
    any float dtype) for the interference guard (`SelectConfig.protect`)."""

    updates: Mapping[str, Tensor | BlockSketch] = field(default_factory=dict)
    core: CoreMask | None = None
    fisher: Mapping[str, Tensor] = field(default_factory=dict)

    def has_exact(self) -> bool:
        """Whether any update is an exact tensor (not a sketch); reads none from disk."""
        if isinstance(self.updates, TensorsOnDisk):
            return len(self.updates) > 0
        return any(isinstance(u, Tensor) for u in self.updates.values())

    def has_sharded(self) -> bool:
        """Whether any update is a DTensor (kept sharded like its parameter)."""
        return not isinstance(self.updates, TensorsOnDisk) and any(is_dtensor(u) for u in self.updates.values())


@dataclass
class Selection:
    mask: CoreMask
    report: list[dict]                 # one row per tensor
    scores: dict[str, Tensor]          # final per-block score per tensor (-inf: excluded);
                                       # empty for a large element-level selection (streamed)
    config: SelectConfig | None = None  # the settings it was made with

    def summary(self) -> str:
        lines = [f"{'tensor':40s} {'chosen':>8s} {'blocks':>8s} {'mean L2':>10s} "
                 f"{'mean F':>10s} {'spec':>6s} {'shared':>6s} {'earlier':>7s}"]
        for r in self.report:
            lines.append(
                f"{r['name'][:40]:40s} {r['chosen']:8d} {r['blocks']:8d} {r['mean_l2']:10.3e} "
                f"{r['mean_fisher']:10.3e} {r['mean_specificity']:6.2f} {r['excluded_shared']:6d} "
                f"{r['excluded_earlier_core']:7d}")
        lines.append(f"core: {self.mask.numel_selected:,} of {self.mask.numel:,} elements "
                     f"({self.mask.density:.2%})")
        return "\n".join(lines)
