"""`element_max_cosine`: the block path's cosine (`delta_stats` sums, then fp64) at one element
per block, the largest over the references, bit for bit on every backend (a zero's sign and a
NaN's aside); refusals by name."""

import math

import numpy as np
import pytest
import torch

from trace_kernels import ops

def _values(gen, n):
    v = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-80, 30, (n,), generator=gen).float())
    special = torch.tensor([0.0, -0.0, 1e-45, 1e-25, -1e-22, 1e30, math.inf, math.nan])
    at = torch.randint(0, max(n, 1), (min(n, 40),), generator=gen)
    v[at] = special[torch.randint(0, len(special), (at.numel(),), generator=gen)]
    return v


def _block_path(d, refs, exact: bool):
    """What selection computes through delta_stats with one-element blocks; `exact`: each
    fp64 operation correctly rounded (numpy's; torch's vectorised fp64 sqrt is within an ulp
    but not always the rounded square root)."""
    s = ops.delta_stats([d], None, None, [refs], [1])
    ss, dots, ref_sq = s.sum_sq.double(), s.dots.double(), s.ref_sq.double()
    prod = ss.unsqueeze(1) * ref_sq
    den = torch.from_numpy(np.sqrt(prod.numpy())) if exact else prod.sqrt()
    cos = torch.where(den > 0, dots / den.clamp_min(1e-300), torch.zeros_like(den))
    return cos.max(1).values


@pytest.mark.parametrize("n,refs", [(0, 1), (1, 1), (7, 3), (70_001, 2), (200_003, 4)])
def test_element_max_cosine_is_the_block_paths_cosine_bit_for_bit(any_backend, n, refs, gen):
    d = _values(gen, n)
    rs = [_values(gen, n) for _ in range(refs)]
    if n > 3:
        rs[0][:3] = d[:3] * 2.5     # the same signs: cosine 1 (to rounding)
    before = [t.clone() for t in (d, *rs)]
    got = ops.element_max_cosine(d, rs, backend=any_backend)
    want = _block_path(d, rs, exact=any_backend == "cpu")   # the reference is torch's ops
    assert got.dtype == torch.float64 and got.shape == (n,)
    # the same numbers: NaN where it is NaN (its sign means nothing), and where the largest is
    # a zero of either sign (a d whose square overflows), either zero (torch's max picks one)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    nonzero = ~nan & (want != 0)
    assert torch.equal(got[nonzero].view(torch.int64), want[nonzero].view(torch.int64))
    assert torch.equal(got[~nan] == 0, want[~nan] == 0)
    for t, b in zip((d, *rs), before):
        assert torch.equal(t.view(torch.int32), b.view(torch.int32))


def test_element_max_cosine_refuses_bad_input_by_name():
    d = torch.rand(5)
    with pytest.raises(ValueError, match="d must be a 1-D float32"):
        ops.element_max_cosine(d.double(), [d])
    with pytest.raises(ValueError, match="refs must hold at least one"):
        ops.element_max_cosine(d, [])
    with pytest.raises(ValueError, match=r"refs\[1\] must be a float32 tensor of 5"):
        ops.element_max_cosine(d, [d, torch.rand(4)])
