"""`rank_scores`, the element-level selection's scoring pass: every backend against the
torch ops written out here, bit for bit, on odd sizes, awkward values (±0, subnormals,
infinities, NaN) and small tables; the same bits whatever the thread count; inputs left
as they were; refusals that name the argument."""

import math

import pytest
import torch

from trace_kernels import ops

def _bins(v: torch.Tensor, bits: int) -> torch.Tensor:
    key = (v + 0.0).view(torch.int32).to(torch.int64)
    key = torch.where(key < 0, key ^ 0x7FFFFFFF, key)        # negative floats mirrored
    return torch.div(key, 1 << (32 - bits), rounding_mode="floor") + (1 << (bits - 1))


def _want(x, y, xr, yr, bits, factors, excluded, floor):
    s = xr[_bins(x, bits)] + yr[_bins(y, bits)]
    s = s * 0.5
    for f in factors:
        s = s * f
    if excluded is not None:
        s = torch.where(excluded, torch.full_like(s, -math.inf), s)
    ok = torch.isfinite(s)
    keep = torch.nonzero(ok & (s >= floor)).reshape(-1)
    return int(ok.sum()), keep, s[keep]


def _values(gen, n: int) -> torch.Tensor:
    """Magnitudes over many octaves, both signs, with ±0, subnormals, ±inf and NaN mixed in."""
    v = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-140, 40, (n,), generator=gen).float())
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, math.inf, -math.inf, math.nan])
    at = torch.randint(0, max(n, 1), (min(n, 64),), generator=gen)
    v[at] = special[torch.randint(0, len(special), (at.numel(),), generator=gen)]
    return v


@pytest.mark.parametrize("n,bits", [(0, 21), (1, 21), (7, 3), (1025, 24), (200_003, 21), (70_001, 5)])
def test_rank_scores_equal_the_torch_ops_bit_for_bit(any_backend, n, bits, gen):
    x, y = _values(gen, n), _values(gen, n)
    xr = torch.rand(1 << bits, generator=gen, dtype=torch.float64)
    yr = torch.rand(1 << bits, generator=gen, dtype=torch.float64)
    xr[torch.randint(0, 1 << bits, (1,), generator=gen)] = math.inf     # a bin whose score is infinite
    guard = torch.rand(n, generator=gen, dtype=torch.float64)
    if n:
        guard[torch.randint(0, n, (min(n, 9),), generator=gen)] = torch.tensor(
            [0.0, math.inf, math.nan, -1.0, 1e300, 0.5, 2.0, -0.0, 1.0], dtype=torch.float64)[:min(n, 9)]
    down = torch.rand(n, generator=gen, dtype=torch.float64)
    excluded = torch.rand(n, generator=gen) < 0.3
    inputs = [x, y, xr, yr, guard, down, excluded]
    before = [t.clone() for t in inputs]
    for factors, exc in (((), None), ((guard,), excluded), ((guard, down), excluded), ((down,), None)):
        for floor in (-math.inf, 0.4, 0.9, math.inf):
            got = ops.rank_scores(x, y, xr, yr, factors=factors, excluded=exc, floor=floor, backend=any_backend)
            finite, index, value = _want(x, y, xr, yr, bits, factors, exc, floor)
            assert got.finite == finite
            assert torch.equal(got.index, index)
            assert torch.equal(got.value.view(torch.int64), value.view(torch.int64))
            assert got.index.dtype == torch.int64 and got.value.dtype == torch.float64
    for t, b in zip(inputs, before):    # nothing written into the inputs
        assert torch.equal(t.view(torch.uint8), b.view(torch.uint8))


def test_rank_scores_native_bits_do_not_depend_on_the_thread_count(native_backend, gen):
    n = 300_007
    x, y = _values(gen, n), _values(gen, n)
    xr, yr = (torch.rand(1 << 21, generator=gen, dtype=torch.float64) for _ in range(2))
    f = torch.rand(n, generator=gen, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.rank_scores(x, y, xr, yr, factors=(f,), floor=0.3, backend=native_backend)
        torch.set_num_threads(max(2, threads))
        many = ops.rank_scores(x, y, xr, yr, factors=(f,), floor=0.3, backend=native_backend)
    finally:
        torch.set_num_threads(threads)
    assert one.finite == many.finite and torch.equal(one.index, many.index)
    assert torch.equal(one.value.view(torch.int64), many.value.view(torch.int64))


def test_rank_scores_refuse_bad_input_by_name():
    x, y = torch.rand(10), torch.rand(10)
    t = torch.rand(1 << 4, dtype=torch.float64)
    cases = [
        (dict(x=x.double()), "x must be a 1-D float32"),
        (dict(y=torch.rand(2, 5)), "y must be a 1-D float32"),
        (dict(y=torch.rand(11)), "y has 11 elements"),
        (dict(x_ranks=t.float()), "x_ranks must be a 1-D float64"),
        (dict(y_ranks=torch.rand(15, dtype=torch.float64)), r"x_ranks and y_ranks must both hold 2\^bits"),
        (dict(x_ranks=torch.rand(1 << 25, dtype=torch.float64), y_ranks=torch.rand(1 << 25, dtype=torch.float64)),
         "1 <= bits <= 24"),
        (dict(factors=(torch.rand(10),)), r"factors\[0\] must be a float64"),
        (dict(factors=(t[:10], t[:10], t[:10])), "at most 2 factors"),
        (dict(excluded=torch.zeros(9, dtype=torch.bool)), "excluded must be a bool tensor of 10"),
        (dict(floor=math.nan), "floor must be a number"),
    ]
    for change, message in cases:
        args = dict(x=x, y=y, x_ranks=t, y_ranks=t)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            ops.rank_scores(**args)


@pytest.mark.parametrize("n,bits", [(0, 21), (1, 4), (1025, 24), (200_003, 21)])
def test_rank_counts_equal_a_bincount_of_the_bins(any_backend, n, bits, gen):
    x = _values(gen, n)
    before = x.clone()
    start = torch.randint(0, 5, (1 << bits,), generator=gen)     # counts are added to
    got = ops.rank_counts(x, start.clone(), backend=any_backend)
    want = start + torch.bincount(_bins(x, bits), minlength=1 << bits)
    assert torch.equal(got, want)
    assert torch.equal(x.view(torch.int32), before.view(torch.int32))


def test_rank_counts_refuse_bad_input_by_name():
    with pytest.raises(ValueError, match="x must be a 1-D float32"):
        ops.rank_counts(torch.rand(4, dtype=torch.float64), torch.zeros(16, dtype=torch.int64))
    for counts in (torch.zeros(15, dtype=torch.int64), torch.zeros(16), torch.zeros(1 << 25, dtype=torch.int64),
                   torch.zeros(32, dtype=torch.int64)[::2]):
        with pytest.raises(ValueError, match="counts must be a contiguous 1-D int64"):
            ops.rank_counts(torch.rand(4), counts)
