"""delta_stats: native against the reference, dtypes and optional inputs, the method's
quantities, determinism across thread counts, bad input."""

import pytest
import torch

from helpers import assert_stats_close, block_sizes_for, stats_problem
from trace_kernels import ops


@pytest.mark.parametrize("num_refs", [0, 1, 3])
@pytest.mark.parametrize("granularity", [1, 3, "row", "tensor", 20000])
def test_delta_stats_native_matches_reference(native_backend, gen, num_refs, granularity):
    shapes = [(37, 129), (0, 8), (3, 40000), (7,), (60000,)]
    post, pre, fishers, refs = stats_problem(gen, shapes, num_refs)
    sizes = block_sizes_for(shapes, granularity)
    ref = ops.delta_stats(post, pre, fishers, refs, sizes, backend="reference")
    nat = ops.delta_stats(post, pre, fishers, refs, sizes, backend=native_backend)
    assert nat.row_offsets == ref.row_offsets
    assert_stats_close(nat, ref, exact=granularity == 1)


@pytest.mark.parametrize("dtype,ref_dtype", [(torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float32),
                                             (torch.float32, torch.bfloat16)])
def test_delta_stats_dtypes_and_optional_inputs(native_backend, gen, dtype, ref_dtype):
    shapes = [(33, 65), (1031,)]
    post, pre, fishers, refs = stats_problem(gen, shapes, 2, dtype, ref_dtype)
    for args in ((post, pre, fishers, refs), (post, None, None, refs), (post, pre, None, None)):
        ref = ops.delta_stats(*args, [65, 1], backend="reference")
        nat = ops.delta_stats(*args, [65, 1], backend=native_backend)
        assert_stats_close(nat, ref, exact=False)
    nofisher = ops.delta_stats(post, pre, None, refs, [65, 1], backend=native_backend)
    assert not nofisher.fisher_sum.any()


def test_delta_stats_values_are_the_method_quantities(gen):
    post, pre, fishers, refs = stats_problem(gen, [(6, 50)], 2)
    s = ops.delta_stats(post, pre, fishers, refs, [50])
    d = (post[0] - pre[0]).double()
    torch.testing.assert_close(s.sum_sq.double(), d.square().sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.fisher_sum.double(), fishers[0].double().view(6, 50).sum(1),
                               rtol=1e-6, atol=0)
    for r in range(2):
        torch.testing.assert_close(s.dots[:, r].double(), (d * refs[0][r].double()).sum(1),
                                   rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(s.ref_sq[:, r].double(), refs[0][r].double().square().sum(1),
                                   rtol=1e-6, atol=0)


def test_delta_stats_deterministic_across_thread_counts(native_backend, gen):
    post, pre, fishers, refs = stats_problem(gen, [(4, 70001), (300, 257)], 2)
    sizes = [70001, 257]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.delta_stats(post, pre, fishers, refs, sizes, backend=native_backend)
        torch.set_num_threads(2)
        two = ops.delta_stats(post, pre, fishers, refs, sizes, backend=native_backend)
    finally:
        torch.set_num_threads(old)
    assert_stats_close(one, two, exact=True)


def test_delta_stats_bad_input(gen):
    post, pre, fishers, refs = stats_problem(gen, [(4, 8)], 1)
    with pytest.raises(ValueError, match="block_sizes\\[0\\]"):
        ops.delta_stats(post, pre, fishers, refs, [5])
    with pytest.raises(ValueError, match="pre\\[0\\]"):
        ops.delta_stats(post, [pre[0].reshape(8, 4)], fishers, refs, [8])
    with pytest.raises(ValueError, match="refs\\[0\\]\\[0\\]"):
        ops.delta_stats(post, pre, fishers, [[torch.zeros(31)]], [8])
    with pytest.raises(ValueError, match="0 to 16 references"):
        ops.delta_stats(post, pre, fishers, [[refs[0][0]] * 17], [8])
    with pytest.raises(ValueError, match="fishers\\[0\\]"):
        ops.delta_stats(post, pre, [torch.zeros(3)], refs, [8])
