"""Continual-learning metrics over an accuracy matrix.

``a[j][i]`` is the score (percent) on task i after training through task j: row 0 is the
model before any training, rows 1…T follow the tasks. Column 0 may be the base skill
("task 0", the general ability the built-in model was pretrained on); `first` is then 1
and the task metrics cover columns first…T only, while `base_change` reports task 0.
Missing entries (a strategy that trains jointly has only rows 0 and T) are None, and a
metric that needs them is None.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def _mean(xs: list[float | None]) -> float | None:
    if not xs or any(x is None for x in xs):
        return None
    return sum(xs) / len(xs)


def _tasks(a: Matrix, first: int) -> int:
    T = len(a) - 1
    if T < 1:
        raise ValueError("the matrix needs row 0 (before training) and at least one task row")
    if any(len(row) != T + first for row in a):
        raise ValueError(f"every row needs {T + first} columns ({T} tasks"
                         f"{' plus task 0' if first else ''})")
    return T


def average_performance(a: Matrix, first: int = 1) -> float | None:
    """AP: the mean score over the tasks after the last one."""
    T = _tasks(a, first)
    return _mean([a[T][first + i] for i in range(T)])


def plasticity(a: Matrix, first: int = 1) -> float | None:
    """Mean of a[i][i]: what each task reached right after its own training."""
    T = _tasks(a, first)
    return _mean([a[i + 1][first + i] for i in range(T)])


def backward_transfer(a: Matrix, first: int = 1) -> float | None:
    """BWT: mean over i < T of a[T][i] − a[i][i] (0 is no forgetting, negative forgets)."""
    T = _tasks(a, first)
    if T < 2:
        return None
    return _mean([None if a[i + 1][first + i] is None else a[T][first + i] - a[i + 1][first + i]
                  for i in range(T - 1)])


def forward_transfer(a: Matrix, first: int = 1) -> float | None:
    """FWT: mean over i ≥ 2 of a[i−1][i] − a[0][i], the score on a task before its own
    training against the untrained model's."""
    T = _tasks(a, first)
    if T < 2:
        return None
    return _mean([None if a[i][first + i] is None else a[i][first + i] - a[0][first + i]
                  for i in range(1, T)])


def forgetting(a: Matrix, first: int = 1) -> float | None:
    """Mean over i < T of max_{i ≤ k < T} a[k][i] − a[T][i]."""
    T = _tasks(a, first)
    if T < 2:
        return None
    vals = []
    for i in range(T - 1):
        seen = [a[k][first + i] for k in range(i + 1, T)]
        vals.append(None if any(x is None for x in seen) else max(seen) - a[T][first + i])
    return _mean(vals)


def base_change(a: Matrix, first: int = 1) -> float | None:
    """Task 0 (the base skill) at the end minus before training; None without task 0."""
    if not first:
        return None
    T = _tasks(a, first)
    return None if a[T][0] is None or a[0][0] is None else a[T][0] - a[0][0]


def summarize(a: Matrix, first: int = 1) -> dict[str, float | None]:
    return {
        "AP": average_performance(a, first),
        "BWT": backward_transfer(a, first),
        "FWT": forward_transfer(a, first),
        "forgetting": forgetting(a, first),
        "plasticity": plasticity(a, first),
        "base_change": base_change(a, first),
        "base_final": a[-1][0] if first else None,
    }
