"""trace_ft.metrics against hand computations."""

import pytest

from trace_ft.continual import metrics

# rows: start, after task 1, 2, 3; column 0 is the base skill
A = [
    [50, 0, 10, 5],
    [48, 80, 12, 6],
    [45, 60, 90, 9],
    [40, 50, 70, 95],
]


def test_metrics_by_hand():
    s = metrics.summarize(A, first=1)
    assert s["AP"] == pytest.approx((50 + 70 + 95) / 3)
    assert s["plasticity"] == pytest.approx((80 + 90 + 95) / 3)
    assert s["BWT"] == pytest.approx(((50 - 80) + (70 - 90)) / 2)
    assert s["FWT"] == pytest.approx(((12 - 10) + (9 - 5)) / 2)
    assert s["forgetting"] == pytest.approx(((80 - 50) + (90 - 70)) / 2)
    assert s["base_change"] == -10
    assert s["base_final"] == 40


def test_metrics_without_base_and_with_missing_rows():
    a = [row[1:] for row in A]
    assert metrics.average_performance(a, first=0) == pytest.approx((50 + 70 + 95) / 3)
    assert metrics.base_change(a, first=0) is None
    joint = [A[0], [None] * 4, [None] * 4, A[3]]
    s = metrics.summarize(joint)
    assert s["AP"] == pytest.approx((50 + 70 + 95) / 3)
    assert s["BWT"] is None and s["plasticity"] is None and s["forgetting"] is None


def test_metrics_reject_ragged_matrices():
    with pytest.raises(ValueError, match="columns"):
        metrics.average_performance([[1, 2], [1]], first=1)
    with pytest.raises(ValueError, match="row 0"):
        metrics.average_performance([[1, 2]], first=1)
    assert metrics.backward_transfer([[0, 1], [0, 2]], first=1) is None
