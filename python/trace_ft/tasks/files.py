"""Tasks from files, in the TRACE-benchmark layout: per task ``train.json``/``test.json``
(a JSON array) or ``.jsonl`` (one object per line) of ``{"prompt", "answer"}`` or
``{"input", "output"}`` records; and `resolve_tasks`, which takes built-in names and
directories alike."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from .base import Example, Task
from .builtin import BASE, FORMATS, SKILLS, builtin_task
from .instruct import INSTRUCT, instruct_task
from .real import REAL



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
            alternatives = obj.get("alternatives", [])
            if not isinstance(alternatives, list) or not all(isinstance(a, str) for a in alternatives):
                raise TaskFormatError(f"{path}:{line}: field 'alternatives' must be a list of strings")
            return Example(prompt, answer, tuple(alternatives))
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
        # JSON Lines are separated by "\n" alone: str.splitlines() would also split on
        # U+2028, U+2029 and U+0085, which JSON strings may hold unescaped
        for i, line in enumerate(text.split("\n"), 1):
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
                  n_test: int = 200, real: Callable[[str, int, int], Task] | None = None) -> list[Task]:
    """Task names of the built-in suites or paths to task directories, in order. The real
    tasks (`tasks.real`) are read from downloaded data by `real(name, n_train, n_test)`."""
    tasks = []
    for spec in specs:
        if spec in SKILLS or spec in FORMATS or spec == BASE:
            tasks.append(builtin_task(spec, seed, n_train, n_test))
        elif spec in INSTRUCT:
            tasks.append(instruct_task(spec, seed, n_train, n_test))
        elif spec in REAL:
            if real is None:
                raise ValueError(f"task {spec!r} is read from the benchmarks' wheel: build it through "
                                 "RunSetup (or pass `real`)")
            tasks.append(real(spec, n_train, n_test))
        elif Path(spec).is_dir():
            tasks.append(load_task_dir(spec, max_train=n_train, max_test=n_test))
        else:
            raise ValueError(f"task {spec!r} is neither a built-in task "
                             f"{[*SKILLS, *FORMATS, *INSTRUCT, *REAL]} nor a directory")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be distinct, got {names}")
    return tasks
