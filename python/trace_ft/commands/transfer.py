"""`trace-ft transfer`: a core found on a small model, mapped onto a larger one of the same
family and written as a CoreMask file for `trace-ft adapt --core`."""

from __future__ import annotations

from pathlib import Path

from trace_kernels import CoreMask

from ..lm.model import model_shapes
from ..method.transfer import format_report, transfer_core
from ..store.atomic import write_with
from ..store.history import TaskHistory


def source_core(history: str | Path | None, core: str | Path | None, task: str | None) -> CoreMask:
    """The small model's core: a history's task (default: the newest) or a CoreMask file."""
    if task and not history:
        raise ValueError("--task needs --history")
    if history is None:
        return CoreMask.load(core)
    hist = TaskHistory.open(history)
    if not len(hist):
        raise ValueError(f"history {history} holds no task")
    i = len(hist) - 1 if not task else (hist.names.index(task) if task in hist.names else -1)
    if i < 0:
        raise ValueError(f"task {task!r} is not in history {history} (it has {hist.names})")
    found = hist.record(i).core
    if found is None:
        raise ValueError(f"task {hist.names[i]!r} of {history} has no core")
    return found


def transfer(core: CoreMask, model: str, size: str, out: str | Path, positions: str = "rescale",
             seed: int = 0) -> str:
    """Map `core` onto `model` (a directory, or "builtin" of `size`), write it to `out` and
    return the per-layer report."""
    mask, report = transfer_core(core, model_shapes(model, size), positions, seed)
    write_with(out, mask.save)
    return format_report(report)
