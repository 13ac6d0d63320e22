"""Updates kept on disk (`DiskTensors`, `FileUpdates`) give selection exactly what the same
updates in memory give it, read one tensor at a time and none just to ask what they are."""

import math

import pytest
import torch

from helpers import same_report_rows
from trace_kernels import CoreMask
from trace_ft import EarlierTask, ProbeResult, select_core, sketch_update
from trace_ft.method import offload
from trace_ft.method.offload import DiskTensors
from trace_ft.method.pipeline import record_updates
from trace_ft.store.updates import FileUpdates, load_updates, save_updates

SHAPES = {"a.weight": (7, 13), "b.weight": (31, 5), "c.weight": (3, 17, 2)}


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def test_disk_tensors_read_back_bit_for_bit_and_fresh(tmp_path):
    gen = torch.Generator().manual_seed(0)
    src = {"x": torch.randn(5, 3, generator=gen), "y": torch.randn(17, generator=gen).bfloat16(),
           "empty": torch.zeros(0, 4)}
    disk = DiskTensors(iter(src.items()), directory=str(tmp_path))
    assert list(disk) == list(src) and len(disk) == 3
    assert disk.nbytes() == 5 * 3 * 4 + 17 * 2
    for n, t in src.items():
        got = disk[n]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(_bits(got), _bits(t)), n
    disk["x"].fill_(7.0)  # a lookup is the caller's own tensor
    assert torch.equal(disk["x"], src["x"])
    with pytest.raises(KeyError):
        disk["z"]
    with pytest.raises(ValueError, match="'x' given twice"):
        DiskTensors([("x", torch.zeros(2)), ("x", torch.zeros(2))])


def _probe(gen) -> ProbeResult:
    deltas = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    fisher = {n: torch.rand(s, generator=gen) for n, s in SHAPES.items()}
    return ProbeResult(deltas=deltas, fisher=fisher, steps=3)


def _core(gen) -> CoreMask:
    return CoreMask.from_blocks({n: (s, 1, torch.rand(math.prod(s), generator=gen) < 0.1) for n, s in SHAPES.items()})


@pytest.mark.parametrize("granularity", ["element", "row"])
def test_updates_on_disk_select_the_same_core_and_are_not_read_to_be_classified(monkeypatch, tmp_path, granularity):
    gen = torch.Generator().manual_seed(hash(granularity) % 2**31)
    first, core = _probe(gen), _core(gen)
    mem = record_updates(first.deltas, core, None, dtype=torch.bfloat16, to_disk=False)
    disk = record_updates(first.deltas, core, None, dtype=torch.bfloat16, to_disk=True)
    assert isinstance(disk, DiskTensors) and isinstance(mem, dict)
    save_updates(disk, tmp_path / "u.safetensors")
    lazy = load_updates(tmp_path / "u.safetensors", lazy=True)
    assert isinstance(lazy, FileUpdates) and list(lazy) == list(SHAPES)
    reads = []
    real = offload.DiskCopy.read_into
    monkeypatch.setattr(offload.DiskCopy, "read_into", lambda self, i, out: (reads.append(i), real(self, i, out)))
    for kept in (disk, lazy):
        task = EarlierTask(updates=kept, core=core)
        assert task.has_exact() and not task.has_sharded()
    assert reads == []
    new = _probe(gen)
    want = select_core(new, [EarlierTask(updates=mem, core=core)], granularity=granularity, budget=0.2)
    for kept in (disk, lazy):
        got = select_core(new, [EarlierTask(updates=kept, core=core)], granularity=granularity, budget=0.2)
        for n in SHAPES:
            assert torch.equal(got.mask[n].indices, want.mask[n].indices), n
        assert same_report_rows(got.report, want.report)
    assert sorted(set(reads)) == [0, 1, 2]  # read when selection looked them up


def test_record_updates_goes_to_disk_only_past_the_large_model_size(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    probe, core = _probe(gen), _core(gen)
    assert isinstance(record_updates(probe.deltas, core, None), dict)
    from trace_ft.method import pipeline

    monkeypatch.setattr(pipeline, "LARGE_MODEL", 100)
    out = record_updates(probe.deltas, core, None)
    assert isinstance(out, DiskTensors) and all(out[n].dtype == torch.bfloat16 for n in SHAPES)
    assert all(torch.equal(out[n], probe.deltas[n].bfloat16()) for n in SHAPES)


def test_updates_on_disk_are_saved_one_tensor_at_a_time(tmp_path):
    """Issue #35: saving a history read a whole DiskTensors into memory first. The file is
    written header first, then tensor by tensor: at most one read tensor alive at a time,
    and it reads back exactly (exact updates, bf16, sketches, an empty tensor)."""
    import gc
    import weakref

    from trace_ft.method.offload import DiskTensors
    from trace_ft.store.updates import load_updates, save_updates

    g = torch.Generator().manual_seed(3)
    want = {"a": torch.randn(5, 7, generator=g).to(torch.bfloat16), "b": torch.randn(33, generator=g),
            "c": torch.zeros(0, 4)}
    alive, most = [], [0]

    class Watched(DiskTensors):
        def __getitem__(self, name):
            t = super().__getitem__(name)
            gc.collect()
            alive[:] = [r for r in alive if r() is not None]
            alive.append(weakref.ref(t))
            most[0] = max(most[0], len(alive))
            return t

    save_updates(Watched(want.items()), tmp_path / "u.safetensors")
    assert most[0] == 1
    got = load_updates(tmp_path / "u.safetensors")
    assert list(got) == list(want) and all(torch.equal(got[n], want[n]) and got[n].dtype == want[n].dtype for n in want)
    lazy = load_updates(tmp_path / "u.safetensors", lazy=True)
    assert [lazy.spec(n) for n in want] == [(t.shape, t.dtype) for t in want.values()]
    sk = {"s": sketch_update(torch.randn(64, generator=g), "s", 16, dim=4), "e": torch.randn(3, generator=g)}
    save_updates(sk, tmp_path / "s.safetensors")
    back = load_updates(tmp_path / "s.safetensors")
    assert torch.equal(back["s"].values, sk["s"].values) and back["s"].block_size == 16 and torch.equal(back["e"], sk["e"])
