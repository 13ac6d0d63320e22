"""A task: a name, train and test examples (prompt → answer) and a scorer."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass
class Task:
    name: str
    train: list[Example]
    test: list[Example]
    scorer: str = "exact"          # "exact": answer must match exactly (after strip)
    # train may be empty: a task kept only for scoring (e.g. read back from a history)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise ValueError(f"task {self.name!r}: scorer must be one of {sorted(SCORERS)}, "
                             f"got {self.scorer!r}")
        if not self.test:
            raise ValueError(f"task {self.name!r} has no test examples")

    def score(self, predictions: Sequence[str], examples: Sequence[Example] | None = None) -> float:
        """Accuracy in percent of `predictions` against `examples` (default: the test set)."""
        examples = self.test if examples is None else examples
        if len(predictions) != len(examples):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
        match = SCORERS[self.scorer]
        return 100.0 * sum(match(p, e.answer) for p, e in zip(predictions, examples)) / len(examples)


def _exact(pred: str, answer: str) -> bool:
    return pred.strip() == answer.strip()


def _first_token(pred: str, answer: str) -> bool:
    """Classification: the first whitespace-separated word of the prediction is the label."""
    words = pred.split()
    return bool(words) and words[0] == answer.strip()


_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}


def _words(text: str) -> list[str]:
    """Lower-case words and numbers (number words as digits), punctuation dropped."""
    return [_NUMBER_WORDS.get(w, w) for w in re.sub(r"[^0-9a-z]+", " ", text.lower()).split()]


def _mentions(pred: str, answer: str) -> bool:
    """Open answers of a chat model: the answer's words appear, in order, among the
    prediction's ("The capital of France is Paris." gives "Paris"; "eight" gives "8")."""
    a, p = _words(answer), _words(pred)
    return bool(a) and any(p[i:i + len(a)] == a for i in range(len(p) - len(a) + 1))


SCORERS: dict[str, Callable[[str, str], bool]] = {"exact": _exact, "label": _first_token,
                                                  "mentions": _mentions}
