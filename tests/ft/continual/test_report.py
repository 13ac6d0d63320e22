"""trace_ft.continual.report: the table, the matrices and the figure of a run."""

import json

import pytest

from trace_ft.continual import metrics
from trace_ft.continual.report import markdown, summary_table, write_outputs


def _results():
    seq = [[90.0, 0.0, 0.0], [10.0, 80.0, 0.0], [5.0, 20.0, 70.0]]
    joint = [[90.0, 0.0, 0.0], [None, None, None], [40.0, 60.0, 65.0]]
    strategies = {}
    for name, m in (("seqft", seq), ("mtl", joint)):
        strategies[name] = {"config": {"lr": None}, "matrix": m, "metrics": metrics.summarize(m, 1),
                            "costs": {"trainable_fraction": 1.0, "state_bytes": 3 * 2**20,
                                      "seconds": 12.3, "peak_memory_bytes": 40 * 2**20}}
    return {"config": {"steps": 10, "batch_size": 4, "lr": 1e-3, "schedule": "cosine",
                       "warmup": 0.1, "seed": 0},
            "versions": {"torch": "x", "transformers": "y", "trace_kernels": "z"},
            "model": "m", "total_params": 1000, "columns": ["base", "a", "b"],
            "first_task_column": 1, "seconds": 30.0, "memory_note": "peak memory: counted here",
            "strategies": strategies}


def test_table_and_matrices():
    res = _results()
    table = summary_table(res)
    assert "| seqft | 45.0 | -60.0 |" in table and "| 3.0 MiB | 12 | 40.0 MiB |" in table
    assert "| mtl | 62.5 | – |" in table
    md = markdown(res)
    assert "### mtl" in md and "| 2: b | 40.0 | 60.0 | 65.0 |" in md
    assert "| 1: a |" not in md.split("### mtl")[1]  # joint training: no row per task
    assert "peak memory: counted here" in md


def test_outputs_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    write_outputs(_results(), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["model"] == "m"
    assert (tmp_path / "out" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["accuracy.png", "report.md",
                                                                     "results.json"]


def test_the_benchmark_table_gives_the_mean_without_those_near_the_tasks():
    from trace_ft.benchmarks.results import mean_change
    from trace_ft.continual.report import bench_table

    change = {"arc_easy": {"acc": {"delta": 12.0, "se": 3.0}, "primary": "acc"},
              "piqa": {"acc_per_char": {"delta": -1.0, "se": 2.0}, "primary": "acc_per_char"},
              "hellaswag": {"acc_per_char": {"delta": -3.0, "se": 1.0}, "primary": "acc_per_char"}}
    row = {"arc_easy": {"acc": 40.0, "primary": "acc"}, "piqa": {"acc_per_char": 60.0, "primary": "acc_per_char"},
           "hellaswag": {"acc_per_char": 35.0, "primary": "acc_per_char"}}
    mean, se = mean_change(change)
    assert mean == pytest.approx(8 / 3) and se == pytest.approx(14 ** 0.5 / 3)
    assert mean_change(change, ["arc_easy"]) == (pytest.approx(-2.0), pytest.approx(5 ** 0.5 / 2))
    assert mean_change(change, list(change)) == (None, None)
    res = _results()
    res["strategies"]["seqft"]["general_bench"] = {"rows": [row, row, row], "change": change,
                                                   "mean_change": mean, "mean_change_se": se}
    res["config"]["tasks"] = ["sciq", "arith"]   # SciQ trains science exams: ARC-Easy is near
    table = bench_table(res)
    assert "| mean Δ | without arc_easy |" in table and "| +2.7 ± 1.2 | -2.0 ± 1.1 |" in table
    res["config"]["tasks"] = ["arith", "jeopardy"]
    assert "without" not in bench_table(res) and "| +2.7 ± 1.2 |" in bench_table(res)
