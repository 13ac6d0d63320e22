"""The real suite's tasks (tasks.real) built from OLMES-style docs the test writes: each
task's framing and gold answers, the fixed split (the same for every run seed, test and
train disjoint, duplicates dropped), SQuAD's passage window rule, the scorers each task
uses, a benchmark that shares a task's dataset refused, and the benchmarks near a task."""

import pytest

from trace_ft.benchmarks.data import BENCHMARKS
from trace_ft.config import RunConfig
from trace_ft.config import run_config as RC
from trace_ft.tasks import SCORERS, SUITES, Task
from trace_ft.tasks.files import resolve_tasks
from trace_ft.tasks.real import REAL, REAL_SUITE, SQUAD_WORDS, answer_window, near_benchmarks, real_task


def real_docs(n: int = 12) -> dict[str, list[dict]]:
    """`n` docs per real task in the layout of its OLMES request file (plus a duplicate)."""
    squad = [{"query": f"Title: T{i}\nBackground: Filler one. The river {i} flows north. Filler two.\n"
                       f"Question: Where does river {i} flow?\nAnswer:",
              "answers_text": ["north", "North", "flows north"]} for i in range(n)]
    med = [{"question": f"Which drug {i}?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": i % 4}
           for i in range(n)]
    code = [{"question": f'def f{i}(x):\n    """Return x plus {i}."""\n    return',
             "choices": ["x", f"x + {i}"], "gold": 1} for i in range(n)]
    arith = [{"question": f"{i} + 1 =", "choices": [str(i), str(i + 1)], "gold": 1} for i in range(n)]
    options = lambda i: sorted([f"cell {i}", "atom", "proton", "gene"])  # noqa: E731
    sciq = [{"question": f"What is unit {i} of life?", "correct_answer": f"cell {i}",
             "query": f"Question: What is unit {i} of life?\n" + "".join(
                 f" {letter}. {o}\n" for letter, o in zip("ABCD", options(i))) + "Answer:"} for i in range(n)]
    jeo = [{"query": f"Category: SCIENCE\nQuestion: Clue number {i}\nAnswer:", "answer": f"thing {i}"}
           for i in range(n)]
    docs = {"squad": squad, "sciq": sciq, "medmcqa": med, "code": code, "arith": arith, "jeopardy": jeo}
    for v in docs.values():
        v.append(dict(v[0]))  # a duplicate prompt, dropped
    return docs


def test_each_task_is_framed_and_scored_by_its_communitys_metric():
    docs = real_docs()
    tasks = {n: real_task(n, docs[n], n_train=100, n_test=4) for n in REAL}
    # MedMCQA is built but not in the suite (at chance after 100 steps of SmolLM2)
    assert SUITES["real"] == REAL_SUITE and set(REAL) - set(REAL_SUITE) == {"medmcqa"}
    for name, t in tasks.items():
        assert isinstance(t, Task) and t.scorer == REAL[name].scorer
        assert len(t.test) == 4 and len(t.train) == 8  # 12 distinct: the duplicate dropped
        assert t.meta["distinct"] == 12 and t.meta["domain"] == REAL[name].domain
        # generation leaves room for a sentence around the answer, not the answer's length
        assert t.meta["max_new_tokens"] == REAL[name].max_new_tokens >= 16
        assert not {e.prompt for e in t.test} & {e.prompt for e in t.train}
    sq = tasks["squad"].test[0]
    assert sq.prompt.startswith("Answer the question with a short phrase from the passage.")
    assert "Passage: Filler one." in sq.prompt and sq.answer == "north" and sq.alternatives == ("North", "flows north")
    assert tasks["squad"].score(["North."], [sq]) == 100.0
    assert tasks["squad"].score(["flows"], [sq]) == pytest.approx(200 / 3)  # F1 against "flows north"
    med = tasks["medmcqa"].test[0]
    assert med.prompt.endswith("A. a\nB. b\nC. c\nD. d") and med.answer in "ABCD"
    sci = tasks["sciq"].test[0]
    assert sci.prompt.startswith("Answer the science question with the correct option, written out.")
    assert sci.prompt.endswith("Options: atom; " + "; ".join(sorted([sci.answer, "gene", "proton"])))
    assert tasks["sciq"].score(["It is " + sci.answer], [sci]) == 0.0  # exact match only
    assert tasks["sciq"].score(["The " + sci.answer.title() + "."], [sci]) == 100.0  # after normalisation
    bad = dict(docs["sciq"][0], correct_answer="nucleus")  # the answer among no option: skipped
    assert real_task("sciq", [bad] + docs["sciq"][1:], n_train=2, n_test=4).meta["skipped"] == 1
    assert tasks["code"].test[0].prompt.endswith("return") and tasks["code"].test[0].answer.startswith("x + ")
    assert tasks["arith"].test[0].prompt.startswith("Compute the value.")
    assert "Category: SCIENCE\nClue: Clue number" in tasks["jeopardy"].test[0].prompt


def test_the_split_is_fixed_whatever_the_run_seed():
    docs = real_docs(40)
    build = lambda name, n_train, n_test: real_task(name, docs[name], n_train, n_test)  # noqa: E731
    a = resolve_tasks(["squad", "arith"], seed=0, n_train=10, n_test=8, real=build)
    b = resolve_tasks(["squad", "arith"], seed=7, n_train=10, n_test=8, real=build)
    assert [t.test for t in a] == [t.test for t in b] and [t.train for t in a] == [t.train for t in b]
    # shuffled, not the file's order
    assert [e.answer for e in a[1].test] != [str(i + 1) for i in range(8)]
    with pytest.raises(ValueError, match="through RunSetup"):
        resolve_tasks(["squad"])
    with pytest.raises(ValueError, match="too few for n_test=40"):
        real_task("arith", docs["arith"], 10, 40)
    with pytest.raises(ValueError, match="unknown real task 'gsm8k'"):
        real_task("gsm8k", [], 1, 1)


def test_squad_passage_window_keeps_the_answer_sentence_and_nearest_neighbours():
    s = [f"Sentence {i} has some words here." for i in range(10)]  # 6 words each
    passage = " ".join(s).replace("Sentence 5 has", "Sentence 5 ANSWER has")
    w = answer_window(passage, "ANSWER", 20)  # 7 + 6 + 6: the answer's and one on each side
    assert w == " ".join([s[4], s[5].replace("5 has", "5 ANSWER has"), s[6]])
    assert answer_window(passage, "ANSWER", 6) is None          # its own sentence is too long
    assert answer_window(passage, "missing", 50) is None
    assert len(answer_window(passage, "ANSWER", SQUAD_WORDS).split()) <= SQUAD_WORDS


@pytest.mark.parametrize("pred,ok", [("B", True), ("B.", True), (" (b) the second", True), ("[B]", True),
                                     ("A", False), ("Because", False), ("", False),
                                     ("The correct answer is B.", True), ("Answer: (b) Heart", True),
                                     ("I think the answer is B", True), ("The answer is A, not B", False),
                                     ("Answers vary", False)])
def test_letter_scorer(pred, ok):
    assert SCORERS["letter"](pred, "B") == ok


def test_code_scorer_ignores_whitespace_only():
    assert SCORERS["code"]("sum( lst )", "sum(lst)")
    assert not SCORERS["code"]("sum(lst) / 2", "sum(lst)")
    assert not SCORERS["code"]("a * b", "a + b")


def test_a_benchmark_sharing_a_tasks_dataset_is_refused(monkeypatch):
    cfg = RunConfig(model="smollm2-135m", suite="real", general_bench=["sciq"])
    with pytest.raises(ValueError, match="general_bench: sciq is the source of task 'sciq'"):
        cfg.validate()
    monkeypatch.setattr(RC, "REAL_DATASETS", {**RC.REAL_DATASETS, "squad": "boolq"})
    with pytest.raises(ValueError, match="general_bench: boolq is the source of task 'squad'"):
        RunConfig(model="smollm2-135m", suite="real", general_bench=["boolq"]).validate()
    assert cfg.n_test == 200 and cfg.steps == 60  # the real suite's defaults
    RunConfig(model="smollm2-135m", suite="real", general_bench=["arc_easy"], device="cpu").validate()
    with pytest.raises(ValueError, match="suite real is for a pretrained chat model"):
        RunConfig(suite="real").validate()


def test_near_benchmarks_are_those_a_task_trains_the_kind_of():
    headline = ["arc_easy", "arc_challenge", "hellaswag", "piqa"]
    # SciQ (science exams) is near both ARCs; arithmetic and trivia are near none
    assert near_benchmarks(["sciq", "arith", "jeopardy"], headline) == ["arc_easy", "arc_challenge"]
    assert near_benchmarks(["arith", "jeopardy", "not-a-real-task"], headline) == []
    assert near_benchmarks(["squad", "sciq"], ["boolq", "piqa", "openbookqa"]) == ["boolq", "openbookqa"]
    # every scored benchmark near a task: nothing is left to set them against
    assert near_benchmarks(["sciq"], ["arc_easy", "arc_challenge"]) == []
    # each named neighbour is a benchmark, and none is the task's own source (that is refused)
    for task in REAL.values():
        assert set(task.near) <= set(BENCHMARKS) and task.dataset not in task.near
