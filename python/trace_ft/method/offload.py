"""Tensors kept on disk instead of in memory: the pre-probe weights during a probe
(`DiskCopy`) and earlier tasks' updates between tasks (`DiskTensors`). Both live in an
anonymous temporary file, gone when closed, collected or on a crash; the operating system's
page cache, not the process, holds what was read recently."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor


class DiskCopy:
    """Tensors' bytes in an anonymous temporary file, read back exactly into any tensor of
    the same size: the pre-probe weights of a model whose memory should hold only the
    probe's state (`probe(offload_device="disk")`). CPU tensors; on an accelerator, offload
    to "cpu" instead."""

    def __init__(self, tensors: Iterable[Tensor], directory: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=directory)
        self._spans: list[tuple[int, int]] = []
        for t in tensors:
            raw = self._bytes(t.detach().contiguous())
            self._spans.append((self._file.tell(), raw.nbytes))
            self._file.write(memoryview(raw))
            del raw
        self._file.flush()

    @staticmethod
    def _bytes(t: Tensor):
        if t.device.type != "cpu":
            raise ValueError(f"offload to disk holds CPU tensors, got one on {t.device} (offload to 'cpu')")
        return t.reshape(-1).view(torch.uint8).numpy()

    def read_into(self, i: int, out: Tensor) -> None:
        """Write the i-th saved tensor's bytes into `out` (contiguous, the same size)."""
        start, size = self._spans[i]
        raw = self._bytes(out)
        if raw.nbytes != size or not out.is_contiguous():
            raise ValueError(f"tensor {i}: {raw.nbytes} contiguous bytes to restore into, saved {size}")
        self._file.seek(start)
        if self._file.readinto(memoryview(raw)) != size:
            raise OSError(f"tensor {i}: short read from the offload file")

    def close(self) -> None:
        self._file.close()


class TensorsOnDisk(Mapping[str, Tensor]):
    """A read-only mapping of named, exact CPU tensors whose bytes are on disk: each lookup
    reads a fresh tensor (the caller's to keep or drop), so memory holds only what is in
    use. Selection asks it whether it holds exact or sharded updates without reading any;
    `spec` gives a tensor's shape and dtype without reading it (a file is written header
    first)."""

    def spec(self, name: str) -> tuple[torch.Size, torch.dtype]:
        raise NotImplementedError


class DiskTensors(TensorsOnDisk):
    """Tensors written once to an anonymous temporary file (`TensorsOnDisk`): what a run
    keeps of a large model's earlier tasks, whose 2 bytes per parameter per task (bf16)
    would otherwise stay resident for the whole sequence. `items` may be a generator, so
    each tensor can be made (e.g. cast to bf16) just before it is written."""

    def __init__(self, items: Iterable[tuple[str, Tensor]], directory: str | None = None) -> None:
        self._index: dict[str, tuple[int, torch.Size, torch.dtype]] = {}

        def tensors() -> Iterator[Tensor]:
            for name, t in items:
                if name in self._index:
                    raise ValueError(f"tensor {name!r} given twice")
                self._index[name] = (len(self._index), t.shape, t.dtype)
                yield t

        self._copy = DiskCopy(tensors(), directory)

    def __getitem__(self, name: str) -> Tensor:
        i, shape, dtype = self._index[name]
        out = torch.empty(shape, dtype=dtype)
        self._copy.read_into(i, out)
        return out

    def spec(self, name: str) -> tuple[torch.Size, torch.dtype]:
        _, shape, dtype = self._index[name]
        return shape, dtype

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def nbytes(self) -> int:
        return sum(s.numel() * d.itemsize for _, s, d in self._index.values())

    def __repr__(self) -> str:
        return f"DiskTensors({len(self)} tensors, {self.nbytes():,} bytes on disk)"


__all__ = ["DiskCopy", "DiskTensors", "TensorsOnDisk"]
