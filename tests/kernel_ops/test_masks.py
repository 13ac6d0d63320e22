"""CoreMask: construction, validation, statistics, set operations, files."""

import pytest
import torch

from trace_kernels import CoreMask, MaskEntry
from trace_kernels.masks import block_size_for, index_dtype


def test_from_dense_round_trip(gen):
    dense = {"a": torch.rand(7, 13, generator=gen) < 0.3, "b": torch.rand(5, generator=gen) < 0.5,
             "empty": torch.zeros(0, 4, dtype=torch.bool)}
    m = CoreMask.from_dense(dense)
    for name, d in dense.items():
        assert torch.equal(m.to_dense(name), d)
        assert m[name].block_size == 1
        assert m[name].indices.dtype == torch.int32
    assert m.numel_selected == sum(int(d.sum()) for d in dense.values())
    assert m.density == pytest.approx(m.numel_selected / (91 + 5))


def test_from_blocks_rows_and_tensor_granularity(gen):
    rows = torch.rand(6, generator=gen) < 0.5
    rows[0] = True
    m = CoreMask.from_blocks({"w": ((6, 10), 10, rows), "n": ((4,), 4, torch.tensor([True]))})
    assert torch.equal(m.to_dense("w"), rows[:, None].expand(6, 10))
    assert m["w"].numel_selected == int(rows.sum()) * 10
    assert m.to_dense("n").all()
    full = CoreMask.full({"w": (6, 10), "b": (3,)}, "row")
    assert full.density == 1.0 and full["w"].block_size == 10 and full["w"].num_selected == 6


@pytest.mark.parametrize("indices,block,pattern", [
    ([3, 1], 1, "unsorted index 1"),
    ([1, 1], 1, "duplicate index 1"),
    ([0, 12], 1, "out of range"),
    ([-1], 1, "out of range"),
    ([0], 5, "does not divide"),
    ([0], 0, "block_size must be >= 1"),
])
def test_validation_errors(indices, block, pattern):
    with pytest.raises(ValueError, match=pattern):
        CoreMask.from_indices({"w": ((3, 4), block, torch.tensor(indices))})


def test_validation_types():
    with pytest.raises(TypeError, match="int32 or int64"):
        MaskEntry((4,), 1, torch.tensor([0.0]))
    with pytest.raises(TypeError, match="bool tensor"):
        CoreMask.from_dense({"w": torch.ones(3)})
    with pytest.raises(ValueError, match="block flags"):
        CoreMask.from_blocks({"w": ((4, 4), 4, torch.ones(3, dtype=torch.bool))})


def test_unknown_name_is_a_clear_error():
    m = CoreMask.full({"a": (2, 2)})
    with pytest.raises(KeyError, match="no parameter named 'b'"):
        m.to_dense("b")


def test_int64_past_2_31_blocks():
    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64
    e = MaskEntry((2**31 + 6,), 1, torch.tensor([0, 2**31 + 5]))
    assert e.indices.dtype == torch.int64 and e.num_blocks == 2**31 + 6


def test_set_operations_across_block_sizes(gen):
    a = CoreMask.from_blocks({"w": ((4, 6), 6, torch.tensor([True, False, True, False])),
                              "only_a": ((3,), 1, torch.tensor([True, False, True]))})
    b = CoreMask.from_dense({"w": torch.rand(4, 6, generator=gen) < 0.5,
                             "only_b": torch.tensor([True, True])})
    da, db = a.to_dense("w"), b.to_dense("w")
    assert torch.equal((a | b).to_dense("w"), da | db)
    assert torch.equal((a & b).to_dense("w"), da & db)
    assert torch.equal((a - b).to_dense("w"), da & ~db)
    assert set(a | b) == {"w", "only_a", "only_b"}
    assert set(a & b) == {"w"}
    assert set(a - b) == {"w", "only_a"}
    assert (a | a) == a
    with pytest.raises(ValueError, match="shapes"):
        a | CoreMask.full({"w": (6, 4)})


def test_block_size_for():
    assert block_size_for((3, 7), "element") == 1
    assert block_size_for((3, 7), "row") == 7
    assert block_size_for((3, 7), "tensor") == 21
    assert block_size_for((3, 7), 3) == 3
    with pytest.raises(ValueError, match="granularity"):
        block_size_for((3,), "column")


def test_save_load(tmp_path, gen):
    m = CoreMask.from_dense({"layer.0.w": torch.rand(9, 5, generator=gen) < 0.4,
                             "none": torch.zeros(3, dtype=torch.bool)})
    m = m | CoreMask.full({"big": (4, 8)}, "row")
    path = tmp_path / "mask.safetensors"
    m.save(path)
    back = CoreMask.load(path)
    assert back == m
    assert all(back[n].indices.dtype == m[n].indices.dtype for n in m)


def test_load_damaged_files(tmp_path):
    m = CoreMask.full({"w": (64, 64)}, "element")
    path = tmp_path / "m.safetensors"
    m.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        CoreMask.load(tmp_path / "trunc.safetensors")
    with pytest.raises(FileNotFoundError):
        CoreMask.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.tensor([0, 1])}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a CoreMask file"):
        CoreMask.load(tmp_path / "other.safetensors")
    # indices that fail validation are refused too
    save_file({"w": torch.tensor([5, 1], dtype=torch.int32)}, str(tmp_path / "bad.safetensors"),
              metadata={"format": "trace_kernels.CoreMask", "version": "1",
                        "layout": '{"w": {"shape": [8], "block_size": 1}}'})
    with pytest.raises(ValueError, match="bad.safetensors.*unsorted"):
        CoreMask.load(tmp_path / "bad.safetensors")


def test_check_shapes_names_the_first_misfit():
    mask = CoreMask.from_dense({"a": torch.ones(2, 3, dtype=torch.bool)})
    mask.check_shapes({"a": (2, 3), "b": (4,)})
    with pytest.raises(ValueError, match="names parameter 'a', which the model does not have"):
        mask.check_shapes({"b": (2, 3)}, "the core")
    with pytest.raises(ValueError, match=r"'a' has shape \[2, 3\] in the mask, \[3, 2\] in the model"):
        mask.check_shapes({"a": (3, 2)})


@pytest.mark.parametrize("seed", range(6))
def test_coarsest_keeps_the_selection_and_its_order(seed):
    g = torch.Generator().manual_seed(seed)
    rows, cols = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 13, (1,), generator=g))
    kind = seed % 3
    if kind == 0:    # whole rows, picked element by element
        keep = torch.rand(rows, generator=g) < 0.5
        dense = keep[:, None].expand(rows, cols)
    elif kind == 1:  # scattered elements
        dense = torch.rand(rows, cols, generator=g) < 0.3
    else:            # everything
        dense = torch.ones(rows, cols, dtype=torch.bool)
    e = MaskEntry.from_bool(dense)
    c = e.coarsest()
    assert torch.equal(c.element_indices(), e.element_indices())
    assert c.shape == e.shape and c.block_size % e.block_size == 0
    if kind == 2:
        assert c.block_size == rows * cols and c.indices.tolist() == [0]
    if kind == 0 and keep.any():
        assert c.block_size % cols == 0
    # nothing coarser holds it: doubling any factor breaks it
    for f in (2, 3, 5):
        b = c.block_size * f
        if e.numel % b == 0:
            blocks = dense.reshape(-1, b)
            assert not (blocks.all(1) | ~blocks.any(1)).all()
