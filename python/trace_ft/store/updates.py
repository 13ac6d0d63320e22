"""The file format of updates and per-parameter tensors, shared by the task history and the
adapt checkpoints: safetensors, one tensor per parameter name; an update is exact (a
tensor) or a count sketch (`BlockSketch`), told apart by the file's layout metadata."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..method.offload import TensorsOnDisk
from ..method.sketch import BlockSketch


# safetensors' names of the dtypes a history holds
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_safetensors(specs: list[tuple[str, tuple, torch.dtype]], tensors: Iterator[Tensor], path: Path,
                      metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written as it goes: the header from each tensor's name, shape and
    dtype (`specs`, in file order), then each of `tensors` (the same order) as it comes, so
    a large model's updates kept on disk are never all in memory at once (safetensors'
    own writer serialises the whole file in memory first)."""
    header, offset = {}, 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        it = iter(tensors)  # (not zip: it holds its last item while it reads the next)
        for name, shape, dtype in specs:
            t = next(it).detach().cpu().contiguous()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"tensor {name!r} is {tuple(t.shape)} {t.dtype}, its header says {tuple(shape)} {dtype}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t  # (before the next is read: one tensor in memory at a time)


def save_updates(updates: Mapping[str, Tensor | BlockSketch], path: Path) -> None:
    """The updates to a safetensors file, one tensor at a time (exact updates kept on disk
    are read one by one)."""
    specs, layout = [], {}
    for n in updates:
        u = updates[n] if not isinstance(updates, TensorsOnDisk) else None
        if isinstance(u, BlockSketch):
            specs.append((n, tuple(u.values.shape), u.values.dtype))
            layout[n] = {"kind": "sketch", "block_size": u.block_size, "seed": u.seed, "exact": u.exact}
        else:
            shape, dtype = updates.spec(n) if u is None else (u.shape, u.dtype)
            specs.append((n, tuple(shape), dtype))
            layout[n] = {"kind": "tensor"}

    def values() -> Iterator[Tensor]:
        for n in updates:
            u = updates[n]
            yield u.values if isinstance(u, BlockSketch) else u
            del u

    write_safetensors(specs, values(), path, {"layout": json.dumps(layout)})


class FileUpdates(TensorsOnDisk):
    """Exact updates left in their safetensors file, each read when it is looked up: a large
    model's earlier tasks cost their history no resident memory between selections."""

    def __init__(self, path: Path, names: list[str]) -> None:
        self.path, self._names = Path(path), names

    def __getitem__(self, name: str) -> Tensor:
        from safetensors import safe_open

        if name not in self._names:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name)

    def spec(self, name: str) -> tuple[torch.Size, torch.dtype]:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            sl = f.get_slice(name)
            return torch.Size(sl.get_shape()), {v: k for k, v in _DTYPES.items()}[sl.get_dtype()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_updates(path: Path, lazy: bool = False) -> Mapping[str, Tensor | BlockSketch]:
    """A file's updates; `lazy`: exact ones stay in the file until looked up (`FileUpdates`;
    a file holding sketches is read whole, they are small)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        layout = json.loads((f.metadata() or {})["layout"])
        if lazy and layout and all(info["kind"] == "tensor" for info in layout.values()):
            return FileUpdates(path, list(layout))
        out: dict[str, Tensor | BlockSketch] = {}
        for n, info in layout.items():
            t = f.get_tensor(n)
            out[n] = (BlockSketch(t, int(info["block_size"]), int(info["seed"]), bool(info["exact"]))
                      if info["kind"] == "sketch" else t)
    return out


def save_tensors(tensors: Mapping[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
