"""The file format of updates and per-parameter tensors, shared by the task history and the
adapt checkpoints: safetensors, one tensor per parameter name; an update is exact (a
tensor) or a count sketch (`BlockSketch`), told apart by the file's layout metadata."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from torch import Tensor

from ..method.offload import TensorsOnDisk
from ..method.sketch import BlockSketch


def save_updates(updates: Mapping[str, Tensor | BlockSketch], path: Path) -> None:
    from safetensors.torch import save_file

    tensors, layout = {}, {}
    for n, u in updates.items():
        if isinstance(u, BlockSketch):
            tensors[n] = u.values.detach().cpu().contiguous()
            layout[n] = {"kind": "sketch", "block_size": u.block_size, "seed": u.seed, "exact": u.exact}
        else:
            tensors[n] = u.detach().cpu().contiguous()
            layout[n] = {"kind": "tensor"}
    save_file(tensors, str(path), metadata={"layout": json.dumps(layout)})


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
