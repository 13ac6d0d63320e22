"""`trace-ft export HISTORY --after TASK --out DIR`: the model exactly as it stood right
after TASK, rebuilt from a later model of the history by setting every later task's core
back to its values before that task (the task-routed bound as a file: one model per task
from one model and the history's core values)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..lm.model import open_model, save_model, weights_sha256
from ..method.routing import TaskValues, core_values, set_back
from ..store.history import HistoryError, TaskHistory


def _task_index(hist: TaskHistory, task: str) -> int:
    """0-based index of `task`: its name, or its 1-based number in the history."""
    if task in hist.names:
        return hist.names.index(task)
    if task.isdigit() and 1 <= int(task) <= len(hist):
        return int(task) - 1
    raise ValueError(f"task {task!r} is not in history {hist.path} (it has {hist.names})")


def export(history: str | Path, after: str, out: str | Path, model: str | Path | None = None,
           overwrite: bool = False) -> str:
    """Write the model as it stood after task `after` to `out`; return a summary. `model`:
    the output of this task or a later one (default: the newest task's output)."""
    hist = TaskHistory.open(history)
    if not len(hist):
        raise ValueError(f"history {history} holds no task")
    i = _task_index(hist, after)
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} already exists (pass --overwrite to replace it)")
    source = Path(model) if model is not None else Path(hist.entries[-1]["summary"].get("out", ""))
    if not (source / "config.json").is_file():
        raise ValueError(f"no model at {source}: pass --model, the output of task "
                         f"{hist.names[i]!r} or a later one")
    sha = weights_sha256(source)
    produced = [k for k, e in enumerate(hist.entries) if e["summary"].get("model_out") == sha]
    if not produced:
        raise ValueError(f"{source} is not a model this history's tasks produced (its weights "
                         "match no task's recorded output)")
    k = max(produced)
    if k < i:
        raise ValueError(f"{source} is the output of task {k + 1} ({hist.names[k]!r}), earlier than "
                         f"{hist.names[i]!r}: pass the output of that task or a later one")
    net, codec, _ = open_model(source)
    hist.check_model(net)
    records = [hist.record(j) for j in range(len(hist))]
    later = []
    for j in range(i + 1, k + 1):
        r = records[j]
        if r.core is None or not r.before:
            raise HistoryError(f"task {j + 1} ({r.name!r}) was recorded without its core values; "
                               "the model before it cannot be rebuilt")
        later.append(TaskValues(r.core, dict(r.before), dict(r.after)))
    set_back(net, later)
    # tasks up to `after` keep the values they trained to: a check that no later task
    # moved an element of theirs (cores disjoint, nothing outside a core)
    for j in range(i + 1):
        r = records[j]
        if r.core is not None and r.after:
            now = core_values(net, r.core)
            if any(not torch.equal(now[n], r.after[n]) for n in r.after):
                raise HistoryError(f"the core of task {j + 1} ({r.name!r}) changed after it was "
                                   "trained: the model after it cannot be rebuilt exactly")
    save_model(net, codec, out, overwrite=overwrite)
    same = weights_sha256(out) == hist.entries[i]["summary"].get("model_out")
    return (f"wrote {out}: the model after task {i + 1} ({hist.names[i]!r}), rebuilt from {source} "
            f"(the output of task {k + 1}) by setting back {len(later)} later core(s)"
            + ("; bit-identical to the model that task produced" if same else ""))
