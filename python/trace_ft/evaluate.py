"""Scoring tasks: greedy decoding of each test prompt, scored by the task's scorer. What
`run` fills its accuracy matrices with and `adapt` scores a task and its history with."""

from __future__ import annotations

from torch import nn

from .lm.batches import EncodedSet, greedy_decode
from .lm.text import Codec
from .tasks import Task


class Evaluator:
    """Greedy decoding and scoring of a fixed list of tasks' test sets (encoded once)."""

    def __init__(self, tasks: list[Task], codec: Codec) -> None:
        self.tasks, self.codec = tasks, codec
        self.sets = [EncodedSet(t.test, codec) for t in tasks]

    def __call__(self, model: nn.Module) -> list[float]:
        scores = []
        for task, enc in zip(self.tasks, self.sets):
            ids = greedy_decode(model, enc, eos_id=self.codec.eos_id)
            scores.append(task.score([self.codec.decode(x) for x in ids]))
        return scores
