"""PeakMemory on the CPU: the kernel's high-water mark, so the same work reads the same."""

import torch

from trace_ft.lm.memory import PeakMemory, memory_note


def _work(mib: int) -> None:
    x = torch.ones(mib * 2**20 // 4)   # mib MiB of fp32, touched
    y = x * 2                          # and as much again, alive at the same time
    del x, y


def test_peak_counts_what_the_block_held_and_repeats():
    readings = []
    for _ in range(3):
        with PeakMemory("cpu") as m:
            _work(64)
        readings.append(m.peak_bytes)
    if not m.exact:  # no /proc/self/clear_refs here: sampled, not asserted to the MiB
        return
    for r in readings:
        assert 124 * 2**20 <= r < 140 * 2**20, readings
    assert max(readings) - min(readings) < 4 * 2**20, readings


def test_a_later_block_is_not_hidden_by_an_earlier_one():
    """Memory freed by an earlier block is given back, so it does not absorb the next
    block's use (what made the sampled RSS read 44, 116 and 77 MiB for one run)."""
    with PeakMemory("cpu") as first:
        _work(96)
    with PeakMemory("cpu") as second:
        _work(32)
    if second.exact:
        assert 60 * 2**20 <= second.peak_bytes < 76 * 2**20, (first.peak_bytes, second.peak_bytes)


def test_the_note_says_what_is_counted():
    assert "peak memory" in memory_note("cpu")


def test_meters_nest_and_phases_add_up():
    """An inner meter's reset does not hide its peak from the outer one (a run's peak covers
    its phases); a PhaseLog sums time and maxes memory over a phase's repeats."""
    from trace_ft.lm.memory import PhaseLog

    log = PhaseLog("cpu")
    with PeakMemory("cpu") as outer:
        with log.phase("big"):
            _work(96)
        with log.phase("small"):
            _work(32)
        with log.phase("small"):
            _work(16)
    if not outer.exact:
        return
    assert outer.peak_bytes >= 188 * 2**20, outer.peak_bytes
    rows = log.rows
    assert rows["small"]["calls"] == 2 and rows["big"]["calls"] == 1
    assert rows["big"]["peak_bytes"] >= 188 * 2**20
    assert 60 * 2**20 <= rows["small"]["peak_bytes"] < 140 * 2**20, rows
    assert rows["big"]["seconds"] > 0 and rows["small"]["seconds"] > 0
