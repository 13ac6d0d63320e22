"""Tasks: a name, train and test examples (prompt → answer) and a scorer.

Two sources:
- the built-in synthetic suite: text skills in one format, ``"<kw>:<input>="`` → answer,
  generated from a seed, no download. `BASE` is the broad mixture the built-in model is
  pretrained on (eleven keyword-conditioned string and number operations: copy, length,
  next/previous letter, upper case, increment/decrement, first/last character, drop the
  first character, the first two); its retention is
  reported as task 0. `SKILLS` are the continual tasks: each is a fine-tune of primitives
  the base knows (reverse ~ copy, substitution ~ next letter, add ~ increment, count ~
  length), not learning from scratch.
- `load_task_dir`: the TRACE-benchmark layout, per task ``train.json``/``test.json`` (a JSON
  array) or ``.jsonl`` (one object per line) of ``{"prompt", "answer"}`` or
  ``{"input", "output"}`` records.
"""

from __future__ import annotations

import json
import random
import string
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


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


SCORERS: dict[str, Callable[[str, str], bool]] = {"exact": _exact, "label": _first_token}

# ---------------------------------------------------------------------------------------
# The built-in suite

LETTERS = string.ascii_lowercase
DIGITS = string.digits
# A fixed letter substitution (the "sub" skill), the same for every run and seed.
_CIPHER_RNG = random.Random(20260514)
CIPHER = dict(zip(LETTERS, _CIPHER_RNG.sample(LETTERS, len(LETTERS))))


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _gen_copy(rng):
    s = _word(rng, 2, 7, LETTERS + DIGITS)
    return f"cp:{s}=", s


def _gen_len(rng):
    s = _word(rng, 1, 9, LETTERS + DIGITS)
    return f"len:{s}=", str(len(s))


def _gen_next(rng):
    s = _word(rng, 2, 6)
    return f"nx:{s}=", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)


def _gen_inc(rng):
    n = rng.randint(0, 998)
    return f"inc:{n}=", str(n + 1)


def _gen_last(rng):
    s = _word(rng, 2, 8, LETTERS + DIGITS)
    return f"lst:{s}=", s[-1]


def _gen_rev(rng):
    s = _word(rng, 3, 7)
    return f"rev:{s}=", s[::-1]


def _gen_sort(rng):
    s = _word(rng, 2, 5, DIGITS)
    return f"sort:{s}=", "".join(sorted(s))


def _gen_dup(rng):
    s = _word(rng, 2, 5)
    return f"dup:{s}=", "".join(c + c for c in s)


def _gen_rot(rng):
    s = _word(rng, 3, 7)
    return f"rot:{s}=", s[1:] + s[0]


def _gen_add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add:{a}+{b}=", str(a + b)


def _gen_sub(rng):
    s = _word(rng, 3, 6)
    return f"sub:{s}=", "".join(CIPHER[c] for c in s)


def _gen_count(rng):
    c = rng.choice("abcde")
    s = _word(rng, 4, 9, "abcde")
    return f"cnt:{c}|{s}=", str(s.count(c))


def _gen_first(rng):
    s = _word(rng, 2, 8, LETTERS + DIGITS)
    return f"fst:{s}=", s[0]


def _gen_prev(rng):
    s = _word(rng, 2, 6)
    return f"pv:{s}=", "".join(LETTERS[(LETTERS.index(c) - 1) % 26] for c in s)


def _gen_upper(rng):
    s = _word(rng, 2, 6)
    return f"up:{s}=", s.upper()


def _gen_dec(rng):
    n = rng.randint(1, 999)
    return f"dec:{n}=", str(n - 1)


def _gen_drop(rng):
    s = _word(rng, 3, 7, LETTERS + DIGITS)
    return f"drp:{s}=", s[1:]


def _gen_pair(rng):
    s = _word(rng, 3, 8, LETTERS + DIGITS)
    return f"two:{s}=", s[:2]


BASE_OPS: dict[str, Callable] = {
    "copy": _gen_copy, "len": _gen_len, "next": _gen_next, "prev": _gen_prev, "upper": _gen_upper,
    "inc": _gen_inc, "dec": _gen_dec, "first": _gen_first, "last": _gen_last, "drop": _gen_drop,
    "pair": _gen_pair,
}
SKILLS: dict[str, Callable] = {
    "rev": _gen_rev, "sub": _gen_sub, "dup": _gen_dup, "sort": _gen_sort, "count": _gen_count,
    "rot": _gen_rot, "add": _gen_add,
}
BASE = "base"
DEFAULT_ORDER: tuple[str, ...] = ("rev", "sub", "dup", "sort", "count")


def _sample(gens: Sequence[Callable], n: int, rng: random.Random, avoid: set[str]) -> list[Example]:
    """`n` examples, round-robin over the generators, prompts distinct and not in `avoid`.
    A generator that keeps repeating itself (its space is used up) drops out."""
    out, seen, live = [], set(avoid), list(gens)
    misses: dict[int, int] = {}
    turn = 0
    while len(out) < n:
        if not live:
            raise ValueError(f"could not draw {n} distinct examples (got {len(out)})")
        k = turn % len(live)
        prompt, answer = live[k](rng)
        if prompt in seen:
            misses[id(live[k])] = misses.get(id(live[k]), 0) + 1
            if misses[id(live[k])] > 200:
                live.pop(k)
            continue
        misses[id(live[k])] = 0
        turn += 1
        seen.add(prompt)
        out.append(Example(prompt, answer))
    return out


def builtin_task(name: str, seed: int = 0, n_train: int = 2000, n_test: int = 200) -> Task:
    """One task of the built-in suite (`BASE` or a name in `SKILLS`); test prompts never
    occur in the training set."""
    if name == BASE:
        gens = list(BASE_OPS.values())
    elif name in SKILLS:
        gens = [SKILLS[name]]
    else:
        raise ValueError(f"unknown built-in task {name!r}; choose from {[BASE, *SKILLS]}")
    rng = random.Random((seed << 32) ^ zlib.crc32(name.encode()))
    test = _sample(gens, n_test, rng, set())
    train = _sample(gens, n_train, rng, {e.prompt for e in test})
    return Task(name, train, test, meta={"source": "builtin", "seed": seed})


def builtin_suite(names: Sequence[str] = DEFAULT_ORDER, seed: int = 0, n_train: int = 2000,
                  n_test: int = 200) -> list[Task]:
    return [builtin_task(n, seed, n_train, n_test) for n in names]


# ---------------------------------------------------------------------------------------
# The TRACE-benchmark layout


class TaskFormatError(ValueError):
    """A task file is missing or has a malformed record; the message names file and line."""


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _record(obj, path: Path, line: int) -> Example:
    if not isinstance(obj, dict):
        raise TaskFormatError(f"{path}:{line}: expected an object with 'prompt' and 'answer' "
                              f"(or 'input' and 'output'), got {type(obj).__name__}")
    for keys in (("prompt", "answer"), ("input", "output")):
        if keys[0] in obj or keys[1] in obj:
            missing = [k for k in keys if k not in obj]
            if missing:
                raise TaskFormatError(f"{path}:{line}: record has no {missing[0]!r} field")
            prompt, answer = obj[keys[0]], obj[keys[1]]
            for k, v in zip(keys, (prompt, answer)):
                if not isinstance(v, str):
                    raise TaskFormatError(f"{path}:{line}: field {k!r} must be a string, "
                                          f"got {type(v).__name__}")
            return Example(prompt, answer)
    raise TaskFormatError(f"{path}:{line}: record has neither 'prompt'/'answer' nor "
                          f"'input'/'output' fields (keys: {sorted(obj)})")


def read_examples(path: str | Path) -> list[Example]:
    """Records of a ``.json`` array or a ``.jsonl`` file (a ``.json`` file holding one object
    per line is read as JSON lines too)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    decoder = json.JSONDecoder()
    stripped = text.lstrip()
    out: list[Example] = []
    if stripped.startswith("["):
        pos = len(text) - len(stripped) + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise TaskFormatError(f"{path}:{_line_of(text, pos)}: unterminated JSON array")
            if text[pos] == "]":
                break
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise TaskFormatError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
            out.append(_record(obj, path, _line_of(text, pos)))
            pos = end
        if text[pos + 1:].strip():
            raise TaskFormatError(f"{path}:{_line_of(text, pos + 1)}: data after the JSON array")
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFormatError(f"{path}:{i}: invalid JSON: {e.msg}") from None
            out.append(_record(obj, path, i))
    if not out:
        raise TaskFormatError(f"{path}: no records")
    return out


def _find(directory: Path, split: str) -> Path:
    for ext in (".json", ".jsonl"):
        p = directory / f"{split}{ext}"
        if p.is_file():
            return p
    raise TaskFormatError(f"{directory}: no {split}.json or {split}.jsonl")


def load_task_dir(directory: str | Path, name: str | None = None, scorer: str = "exact",
                  max_train: int | None = None, max_test: int | None = None) -> Task:
    """A task from a directory holding ``train.json[l]`` and ``test.json[l]``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TaskFormatError(f"task directory {directory} does not exist")
    train = read_examples(_find(directory, "train"))[:max_train]
    test = read_examples(_find(directory, "test"))[:max_test]
    return Task(name or directory.name, train, test, scorer=scorer,
                meta={"source": str(directory.resolve())})


def resolve_tasks(specs: Sequence[str], seed: int = 0, n_train: int = 2000,
                  n_test: int = 200) -> list[Task]:
    """Task names of the built-in suite or paths to task directories, in order."""
    tasks = []
    for spec in specs:
        if spec in SKILLS or spec == BASE:
            tasks.append(builtin_task(spec, seed, n_train, n_test))
        elif Path(spec).is_dir():
            tasks.append(load_task_dir(spec, max_train=n_train, max_test=n_test))
        else:
            raise ValueError(f"task {spec!r} is neither a built-in skill {list(SKILLS)} "
                             f"nor a directory")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be distinct, got {names}")
    return tasks
