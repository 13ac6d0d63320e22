"""The task-routed bound of TRACE: every task scored with the model as it stood right after
it, rebuilt from the final model by setting later tasks' cores back to their earlier values
(exact when the cores are disjoint and nothing moved outside them). What the trace strategy
reports beside its own row."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..evaluate import METRICS
from ..method.routing import check_disjoint, set_back
from . import metrics


def routed_row(model: nn.Module, base: nn.Module, routes, seq: TaskSequence, in_place: bool = False) -> dict:
    """The final row of the task-routed bound: task i scored with the model as it stood
    right after task i, rebuilt from the final model by setting later tasks' cores back;
    the base skill with every core set back. ``exact``: the fully set-back model equals
    the untrained one bit for bit (cores disjoint, nothing moved outside a core).
    `in_place`: set `model` itself back (a model not used afterwards) instead of a copy."""
    disjoint = True
    try:
        check_disjoint(routes)
    except ValueError:
        disjoint = False
    m = model if in_place else copy.deepcopy(model)
    row = {metric: [None] * len(seq.eval_tasks) for metric in METRICS}
    for i in range(len(routes), 0, -1):  # model after task i, newest first
        for metric, v in seq.evaluator.task_scores(m, seq.first + i - 1).items():
            row[metric][seq.first + i - 1] = v
        set_back(m, [routes[i - 1]])
    for k in range(seq.first):  # task 0: the model before any task
        for metric, v in seq.evaluator.task_scores(m, k).items():
            row[metric][k] = v
    exact = all(torch.equal(p, q) for p, q in zip(m.parameters(), base.parameters()))
    return {"row": row, "exact": bool(exact and disjoint), "disjoint": disjoint,
            "bytes_per_task": [r.nbytes for r in routes]}


def routed_entry(trace: dict, first: int) -> dict:
    """`trace`'s entry as the task-routed strategy: its rows, with the final row the routed
    one (so BWT is exactly 0 when routing is exact)."""
    routed = trace["routed"]
    matrices = {m: [list(r) for r in trace["matrices"][m][:-1]] + [routed["row"][m]] for m in METRICS}
    return {
        "config": {**trace["config"], "routed_from": "trace"},
        "matrix": matrices["exact"],
        "matrices": matrices,
        "metrics": metrics.summarize(matrices["exact"], first),
        "metrics_by": {m: metrics.summarize(matrices[m], first) for m in METRICS},
        "costs": {**trace["costs"], "storage_bytes_per_task": routed["bytes_per_task"],
                  "lora_bytes_per_task": routed["lora_bytes_per_task"]},
        "routing_exact": routed["exact"],
        "selections": trace.get("selections"),
    }
