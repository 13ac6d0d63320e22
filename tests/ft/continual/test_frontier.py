"""trace_ft.continual.frontier: grids, Pareto envelopes and the gap between two frontiers."""

import pytest

from trace_ft.continual.frontier import (envelope_gap, grid_points, near_scored, pareto, parse_grid,
                                         side_by_side, summarise_point)


def test_grid_points_and_parsing():
    assert grid_points({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    assert parse_grid("trace:trace_lr=1e-3, 3e-3") == ("trace", "trace_lr", [1e-3, 3e-3])
    assert parse_grid("lora:lora_rank=4,16") == ("lora", "lora_rank", [4, 16])
    assert parse_grid("trace:trace_continue_probe=true,False") == ("trace", "trace_continue_probe", [True, False])
    with pytest.raises(ValueError, match="STRATEGY:KEY"):
        parse_grid("trace_lr=1")


def test_pareto_and_envelope_gap():
    # points below another's plasticity and BWT are dominated
    assert pareto([(10, -5), (20, -10), (15, -20), (30, -30)]) == [(10, -5), (20, -10), (30, -30)]
    seq = [(10, -10), (50, -50), (90, -90)]          # BWT = -plasticity
    better = [(20, -10), (60, -40)]                  # 10 points above it, then 20
    gap = envelope_gap(better, seq, samples=5)
    assert gap["range"] == [20.0, 60.0]
    assert gap["min"] == pytest.approx(10.0) and gap["max"] == pytest.approx(20.0)
    # no common range: the nearest points' gap, with both plasticities
    assert envelope_gap([(95, -1)], [(10, -10), (50, -50)]) == {"nearest": [95.0, 50.0], "mean": 49.0,
                                                                  "min": 49.0, "max": 49.0}
    assert envelope_gap([], seq) is None


def test_summaries_over_seeds():
    entries = [{"seed": s, "params": {"lr": 1e-3},
                "metrics_by": {"exact": {"plasticity": p, "bwt": b, "ap": 1.0, "fwt": None, "base_delta": -1.0}}}
               for s, (p, b) in enumerate([(40.0, -30.0), (50.0, -40.0)])]
    s = summarise_point(entries, "exact")
    assert s["plasticity"] == 45.0 and s["bwt"] == -35.0 and s["bwt_min"] == -40.0
    assert s["plasticity_std"] == pytest.approx(7.0710678) and s["fwt"] is None and s["seeds"] == [0, 1]


def test_summaries_carry_the_benchmarks_change_whatever_the_metric():
    entries = [{"seed": s, "params": {"lr": 1e-4}, "bench_delta": d, "ppl_delta": 0.5,
                "metrics_by": {m: {"plasticity": 90.0, "bwt": -10.0, "ap": 1.0, "fwt": None, "base_delta": -1.0}
                               for m in ("exact", "edit")}}
               for s, d in enumerate([-2.0, -4.0, -3.0])]
    for metric in ("exact", "edit"):
        s = summarise_point(entries, metric)
        assert s["bench_delta"] == -3.0 and s["bench_delta_std"] == pytest.approx(1.0)
        assert (s["bench_delta_min"], s["bench_delta_max"]) == (-4.0, -2.0) and s["ppl_delta"] == 0.5
    no_bench = summarise_point([{**e, "bench_delta": None} for e in entries], "exact")
    assert no_bench["bench_delta"] is None and no_bench["bench_delta_std"] is None


def test_the_side_by_side_table_shows_each_benchmark_and_the_standard_error_per_run():
    def entry(seed, arc, piqa, se):
        change = {"arc_easy": {"acc": {"delta": arc, "se": 3.0}, "acc_per_char": {"delta": 99.0, "se": 3.0},
                               "primary": "acc"},
                  "piqa": {"acc": {"delta": 99.0, "se": 2.0}, "acc_per_char": {"delta": piqa, "se": 2.0},
                           "primary": "acc_per_char"}}
        return {"seed": seed, "params": {"lr": 1e-4}, "bench_delta": (arc + piqa) / 2, "bench_delta_se": se,
                "bench_change": change, "ppl_delta": 0.5,
                "metrics_by": {"exact": {"plasticity": 90.0, "bwt": -10.0, "ap": 1.0, "fwt": None, "base_delta": -1.0}}}

    s = summarise_point([entry(0, -4.0, -1.0, 1.42), entry(1, -6.0, 1.0, 1.61)], "exact")
    # each benchmark in its primary metric, mean and sample std over seeds
    assert s["bench_each"]["arc_easy"] == (-5.0, pytest.approx(2 ** 0.5))
    assert s["bench_each"]["piqa"] == (0.0, pytest.approx(2 ** 0.5))
    assert s["bench_delta_se"] == (1.42, 1.61)
    text = "\n".join(side_by_side({"seqft": [s]}, ppl=True, bench=True))
    assert "| benchmarks Δ | SE per run |" in text and "| -2.5 ± 0.0 | 1.4–1.6 |" in text
    assert "| seqft | lr=0.0001 | 2 | -5.0 ± 1.4 | 0.0 ± 1.4 |" in text
    # one seed: a single standard error, no range
    one = summarise_point([entry(0, -4.0, -1.0, 1.42)], "exact")
    assert "| -2.5 ± 0.0 | 1.4 |" in "\n".join(side_by_side({"seqft": [one]}, ppl=True, bench=True))


def test_the_benchmarks_change_without_those_near_the_tasks():
    def entry(seed, arc, piqa, hella):
        change = {"arc_easy": {"acc": {"delta": arc, "se": 3.0}, "primary": "acc"},
                  "piqa": {"acc_per_char": {"delta": piqa, "se": 2.0}, "primary": "acc_per_char"},
                  "hellaswag": {"acc_per_char": {"delta": hella, "se": 1.0}, "primary": "acc_per_char"}}
        return {"seed": seed, "params": {"lr": 1e-4}, "bench_delta": (arc + piqa + hella) / 3,
                "bench_delta_se": 14 ** 0.5 / 3, "bench_change": change,
                "metrics_by": {"exact": {"plasticity": 90.0, "bwt": -10.0, "ap": 1.0, "fwt": None, "base_delta": -1.0}}}

    entries = [entry(0, 12.0, -1.0, -3.0), entry(1, 10.0, -3.0, -3.0)]
    s = summarise_point(entries, "exact", near=["arc_easy"])
    assert s["bench_far_delta"] == pytest.approx(-2.5) and s["bench_far_delta_std"] == pytest.approx(1 / 2 ** 0.5)
    assert s["bench_far_delta_se"] == (pytest.approx(5 ** 0.5 / 2),) * 2  # piqa's and hellaswag's, independent
    assert s["bench_delta"] == pytest.approx(2.0)                         # the mean of all is unchanged
    assert summarise_point(entries, "exact")["bench_far_delta"] is None   # nothing near: no column
    text = "\n".join(side_by_side({"seqft": [s]}, ppl=False, bench=True, near=["arc_easy"]))
    assert "| without the tasks' kind Δ | SE per run |" in text and "| -2.5 ± 0.7 | 1.1 |" in text
    assert "leaving out arc_easy" in text
    # the report finds the near benchmarks from the run's tasks: SciQ's are the ARCs
    results = {"config": {"tasks": ["sciq", "arith"]}, "frontier": {"seqft": entries}}
    assert near_scored(results) == ["arc_easy"]
    assert near_scored({**results, "config": {"tasks": ["arith"]}}) == []
