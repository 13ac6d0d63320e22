"""A task: a name, train and test examples (prompt → answer) and a scorer."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str                       # what is trained on, and the first gold answer
    alternatives: tuple[str, ...] = ()  # other gold answers a scorer accepts (SQuAD's annotators')


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
        """The mean credit in percent of `predictions` against `examples` (default: the test
        set): each prediction's best against any of its example's gold answers."""
        examples = self.test if examples is None else examples
        if len(predictions) != len(examples):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
        match = SCORERS[self.scorer]
        return 100.0 * sum(max(float(match(p, a)) for a in (e.answer, *e.alternatives))
                           for p, e in zip(predictions, examples)) / len(examples)


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


def normalize_answer(text: str) -> list[str]:
    """SQuAD's normalisation: lower case, punctuation and the articles a/an/the dropped,
    whitespace collapsed; the words."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return [w for w in text.split() if w not in ("a", "an", "the")]


def _em(pred: str, answer: str) -> bool:
    """Exact match after SQuAD's normalisation."""
    return normalize_answer(pred) == normalize_answer(answer)


def _f1(pred: str, answer: str) -> float:
    """SQuAD's token F1 of the normalised words (1.0 when both are empty)."""
    p, a = normalize_answer(pred), normalize_answer(answer)
    if not p or not a:
        return float(p == a)
    common = sum(min(p.count(w), a.count(w)) for w in set(p) & set(a))
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(a)
    return 2 * precision * recall / (precision + recall)


def _last_number(text: str) -> str | None:
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def _number(pred: str, answer: str) -> bool:
    """GSM8K's rule: the last number in the prediction equals the answer's last number."""
    a, p = _last_number(answer), _last_number(pred)
    if a is None or p is None:
        return False
    try:
        return float(a) == float(p)
    except ValueError:
        return a == p


def _letter(pred: str, answer: str) -> bool:
    """Multiple choice: the letter after the first "answer is" / "answer:" ("I think the
    answer is B."), else the letter standing alone at the start ("B", "B.", "(B) ...")."""
    m = (re.search(r"answer(?:\s+is)?\s*:?\s*[(\[]?([A-Za-z])(?![A-Za-z])", pred, re.IGNORECASE)
         or re.match(r"[\s(\[]*([A-Za-z])(?![A-Za-z])", pred))
    return m is not None and m.group(1).upper() == answer.strip().upper()


def _code(pred: str, answer: str) -> bool:
    """Code: the same characters, whitespace aside (Py150's exact match)."""
    return "".join(pred.split()) == "".join(answer.split())


SCORERS: dict[str, Callable[[str, str], float]] = {"exact": _exact, "label": _first_token,
                                                   "mentions": _mentions, "em": _em, "f1": _f1,
                                                   "number": _number, "letter": _letter, "code": _code}
