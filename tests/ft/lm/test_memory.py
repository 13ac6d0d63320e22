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
