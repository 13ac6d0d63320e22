"""`sampled_dot`, the element path's kernel of core-only gradients: against the dense
product on odd sizes and both operand layouts, the same bits for an entry whatever its
neighbours, a registered op torch.compile traces, refusals by name."""

import numpy as np
import pytest
import torch

from trace_kernels import ops

pytest.importorskip("trace_kernels._C")


def _operand(gen, vectors: int, length: int, layout: str) -> torch.Tensor:
    """vectors × length: rows in memory, or the transpose of a token-major (length ×
    vectors) matrix as a linear layer's backward holds its activations."""
    if layout == "rows":
        return torch.randn(vectors, length, generator=gen)
    return torch.randn(length, vectors, generator=gen).t()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("layout,sizes", [
    (("rows", "rows"), (37, 53, 1031)),
    (("tokens", "tokens"), (37, 53, 1031)),        # one token block
    (("tokens", "tokens"), (37, 2053, 300)),       # a wide b: many token blocks
    (("tokens", "rows"), (37, 53, 301)),           # mixed: made contiguous
])
def test_sampled_dot_equals_the_dense_product_on_odd_sizes(backend, layout, sizes):
    gen = torch.Generator().manual_seed(9)
    R, C, n = sizes
    a, b = _operand(gen, R, n, layout[0]), _operand(gen, C, n, layout[1])
    rows = torch.randint(0, R, (5001,), generator=gen)
    cols = torch.randint(0, C, (5001,), generator=gen)
    rows = rows.sort().values if layout[0] == "tokens" else rows  # (sorted, as a core's are; any order works)
    got = ops.sampled_dot(a, b, rows, cols, backend=backend)
    torch.testing.assert_close(got, (a.double() @ b.double().t())[rows, cols].float(), rtol=1e-5, atol=1e-4)
    if backend == "cpu":  # one summation order whatever the thread count
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert torch.equal(ops.sampled_dot(a, b, rows, cols, backend=backend), got)
        finally:
            torch.set_num_threads(threads)
    assert ops.sampled_dot(a, b, rows[:0], cols[:0], backend=backend).shape == (0,)


def test_sampled_dot_token_major_gives_each_entry_the_same_bits_in_any_order():
    """The token-major kernel groups entries of one row and caches tiles of rows: an entry's
    value must not depend on its neighbours (order, repeats, groups cut at a thread's edge)."""
    gen = torch.Generator().manual_seed(21)
    R, C, n = 45, 70, 517   # rows not a multiple of the 16-row tile; a tail after 64-token lanes
    a, b = _operand(gen, R, n, "tokens"), _operand(gen, C, n, "tokens")
    rows = torch.randint(0, R, (3001,), generator=gen).sort().values
    cols = torch.randint(0, C, (3001,), generator=gen)
    want = ops.sampled_dot(a, b, rows, cols, backend="cpu")
    perm = torch.randperm(rows.numel(), generator=gen)
    assert torch.equal(ops.sampled_dot(a, b, rows[perm], cols[perm], backend="cpu"), want[perm])
    for lo, hi in ((0, 1), (5, 8), (100, 1103)):   # alone, a short group, a slice
        assert torch.equal(ops.sampled_dot(a, b, rows[lo:hi], cols[lo:hi], backend="cpu"), want[lo:hi])


def _token_major_order(a: np.ndarray, b: np.ndarray, rows, cols) -> np.ndarray:
    """The CPU kernel's summation order written out in float32 numpy (csrc/cpu/sampled_dot.cpp):
    tokens in blocks of ~1 MiB of b (a multiple of 64 tokens, or all of them); per block, lane
    l of 64 sums tokens t ≡ l (mod 64) in order, the tail's too; the lanes fold 32 and 16
    apart, then 8, 4, 2, 1; the blocks' sums are added in order from 0."""
    n = a.shape[1]
    block = (1 << 20) // (4 * b.shape[0])
    block = min(64 if block < 64 else block - block % 64, n)
    x, y = a[rows], b[cols]
    out = np.zeros(len(rows), np.float32)
    for t0 in range(0, n, block):
        part = np.zeros((len(rows), 64), np.float32)
        for t in range(t0, min(t0 + block, n)):
            part[:, (t - t0) % 64] += x[:, t] * y[:, t]
        v = (part[:, 0:16] + part[:, 32:48]) + (part[:, 16:32] + part[:, 48:64])
        for half in (8, 4, 2, 1):
            v = v[:, :half] + v[:, half:2 * half]
        out += v[:, 0]
    return out


@pytest.mark.parametrize("R,C,n", [(45, 70, 517), (37, 2053, 300), (9, 33, 37), (20, 4100, 640)])
def test_sampled_dot_token_major_sums_in_its_stated_order(R, C, n):
    """Bit for bit the order the kernel states (whatever the ISA clone): one block with a
    5-token tail, 64-token blocks ending in a 44-token tail, all tail, whole lanes only."""
    gen = torch.Generator().manual_seed(R + C + n)
    a, b = _operand(gen, R, n, "tokens"), _operand(gen, C, n, "tokens")
    rows = torch.randint(0, R, (701,), generator=gen).sort().values
    cols = torch.randint(0, C, (701,), generator=gen)
    got = ops.sampled_dot(a, b, rows, cols, backend="cpu")
    want = _token_major_order(a.contiguous().numpy(), b.contiguous().numpy(), rows.numpy(), cols.numpy())
    assert torch.equal(got, torch.from_numpy(want))


def test_sampled_dot_is_a_registered_op_torch_compile_traces():
    """`trace_kernels::sampled_dot` passes torch's op checks (schema, fake, autograd
    registration) and a compiled function calling it equals the eager result."""
    from trace_kernels.ops.sampled_dot import _sampled_dot_op, sampled_dot_trusted

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(7, 13, generator=g), torch.randn(5, 13, generator=g)
    rows, cols = torch.tensor([0, 3, 6, 6]), torch.tensor([4, 0, 2, 4])
    torch.library.opcheck(_sampled_dot_op, (a, b, rows, cols, ""))
    compiled = torch.compile(lambda x, y: sampled_dot_trusted(x, y, rows, cols) * 2, backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(compiled(a, b), ops.sampled_dot(a, b, rows, cols) * 2)


def test_sampled_dot_refuses_bad_input_by_name():
    a, b = torch.randn(4, 8), torch.randn(5, 8)
    ok = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="rows holds an index outside"):
        ops.sampled_dot(a, b, torch.tensor([0, 4]), ok)
    with pytest.raises(ValueError, match="cols holds an index outside"):
        ops.sampled_dot(a, b, ok, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="b must be a 2-D float32"):
        ops.sampled_dot(a, b.double(), ok, ok)
    with pytest.raises(ValueError, match="second dimension"):
        ops.sampled_dot(a, torch.randn(5, 9), ok, ok)
    with pytest.raises(ValueError, match="rows must be a 1-D int64"):
        ops.sampled_dot(a, b, ok.int(), ok)
    with pytest.raises(ValueError, match="differ in length"):
        ops.sampled_dot(a, b, ok, ok[:1])
