"""trace_ft.tasks.general and .instruct: the general-ability probe and prose, and the
instruction suite for a real chat model."""

import json
import re

import pytest

from trace_ft.tasks import SUITES, resolve_tasks
from trace_ft.tasks.base import SCORERS
from trace_ft.tasks.general import KNOWLEDGE, general_text, general_text_task, knowledge_task, text_digest
from trace_ft.tasks.instruct import INSTRUCT, INSTRUCT_SUITE, instruct_task


def test_mentions_scores_open_answers():
    m = SCORERS["mentions"]
    assert m("The capital of France is Paris.", "Paris")
    assert m("A spider has 8 legs.", "eight") and m("eight legs", "8")
    assert m("The largest animal is the blue whale!", "blue whale")
    assert not m("Parisian food", "Paris") and not m("blue, then whale", "blue whale")
    assert not m("anything", "") and not m("", "Paris")


def test_knowledge_probe_is_fixed_large_and_never_gives_its_answer_away():
    task = knowledge_task()
    assert task.scorer == "mentions" and task.train == [] and len(task.test) >= 100
    assert len({e.prompt for e in task.test}) == len(task.test)
    words = SCORERS["mentions"]
    for e in task.test:  # an echo of the question cannot pass
        assert not words(e.prompt, e.answer), e
    assert [(e.prompt, e.answer) for e in knowledge_task().test] == list(KNOWLEDGE)
    # none of it comes from a task
    prompts = {e.prompt for e in task.test}
    for name in INSTRUCT:
        t = instruct_task(name, n_train=200, n_test=20)
        assert not prompts & {e.prompt for e in t.train + t.test}


def test_general_prose_is_fixed_disjoint_and_prose():
    ev, guard = general_text("eval"), general_text("guard")
    assert ev == general_text("eval") and text_digest(ev) == text_digest(general_text("eval"))
    assert len(ev) >= 85_000 and len(guard) >= 45_000
    assert not set(ev.split("\n\n")) & set(guard.split("\n\n"))
    for para in ev.split("\n\n")[:200]:
        assert "\n" not in para and not para.startswith((" ", "+", "|")) and len(para) >= 80
    task = general_text_task()
    assert task.meta["kind"] == "text" and len(task.train) > 100
    assert {e.answer for e in task.train} == set(guard.split("\n\n"))
    with pytest.raises(ValueError, match="part"):
        general_text("test")


def test_instruct_tasks_are_seeded_disjoint_and_correct():
    assert SUITES["instruct"] == INSTRUCT_SUITE and set(INSTRUCT_SUITE) <= set(INSTRUCT)
    for name in INSTRUCT:
        a, b = instruct_task(name, seed=2, n_train=300, n_test=40), instruct_task(name, seed=2, n_train=300, n_test=40)
        assert a.train == b.train and a.test == b.test
        assert instruct_task(name, seed=3, n_train=300, n_test=40).train != a.train
        assert not {e.prompt for e in a.test} & {e.prompt for e in a.train}
        assert len({e.prompt for e in a.train}) == len(a.train)
    # the same inputs, facts written in each task's own format
    for e in instruct_task("json", n_train=100).train:
        rec = json.loads(e.answer)
        sentence = e.prompt.split("\n\n")[1]
        assert rec["name"] in sentence and rec["city"] in sentence and str(rec["age"]) in sentence
    for e in instruct_task("keyval", n_train=100).train:
        job, name, age = (kv.split("=")[1] for kv in e.answer.split("; "))
        assert all(x in e.prompt for x in (job, name, age))
    for e in instruct_task("card", n_train=100).train:
        name, city = e.answer.split(" / ")
        assert name.isupper() and name.capitalize() in e.prompt and city.capitalize() in e.prompt
    assert all(re.fullmatch(r"I am \w+, a \w+ from \w+\.", e.answer) for e in instruct_task("intro", n_train=50).train)
    assert [t.name for t in resolve_tasks(["json", "card"], n_train=20, n_test=5)] == ["json", "card"]
    with pytest.raises(ValueError, match="instruct"):
        instruct_task("nope")
