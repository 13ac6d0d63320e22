"""CoreMask: which blocks of which parameters a task trains.

For each parameter name a mask holds the parameter's shape, a block size ``B`` and the
sorted, unique indices of the selected blocks, block ``i`` being the flat elements
``[i*B, (i+1)*B)`` of the contiguous parameter. ``B=1`` is element level,
``B=shape[-1]`` row level (one output unit's weights), ``B=numel`` the whole tensor:
one format for every granularity, so one kernel family serves all.

Indices are int32, or int64 once a parameter has 2**31 blocks or more. Masks live on the
CPU; the optimizer copies indices to the parameters' device once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "trace_kernels.CoreMask"
FORMAT_VERSION = 1
_INT32_LIMIT = 2**31 - 1


def index_dtype(num_blocks: int) -> torch.dtype:
    """The narrowest index dtype able to address `num_blocks` blocks."""
    return torch.int32 if num_blocks <= _INT32_LIMIT else torch.int64


def expand_blocks(indices: torch.Tensor, factor: int) -> torch.Tensor:
    """int64 indices of the `factor` consecutive sub-items of each index, in order:
    block i of `factor` elements covers i*factor .. i*factor + factor - 1."""
    base = indices.to(torch.int64).unsqueeze(1) * factor
    return (base + torch.arange(factor, dtype=torch.int64, device=indices.device)).reshape(-1)


def check_indices(indices: torch.Tensor, num_blocks: int, what: str) -> None:
    """Raise ValueError unless `indices` are 1-D integers, strictly increasing, in range."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor of block indices, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{what}: block indices must be int32 or int64, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{what}: block indices must be 1-D, got shape {tuple(indices.shape)}")
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= num_blocks:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what}: block index {bad} out of range [0, {num_blocks})")
    if indices.numel() > 1:
        steps = indices[1:] - indices[:-1]
        bad = torch.nonzero(steps <= 0)
        if bad.numel():
            j = int(bad[0, 0]) + 1
            kind = "duplicate" if int(steps[j - 1]) == 0 else "unsorted"
            raise ValueError(
                f"{what}: block indices must be sorted and unique; {kind} index "
                f"{int(indices[j])} at position {j} (after {int(indices[j - 1])})"
            )


@dataclass(frozen=True)
class MaskEntry:
    """The selected blocks of one parameter."""

    shape: tuple[int, ...]
    block_size: int
    indices: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if any(s < 0 for s in self.shape):
            raise ValueError(f"shape {self.shape} has a negative size")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool):
            raise TypeError(f"block_size must be an int, got {type(self.block_size).__name__}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.numel % self.block_size:
            raise ValueError(
                f"block_size {self.block_size} does not divide the {self.numel} elements of shape {self.shape}"
            )
        check_indices(self.indices, self.num_blocks, "indices")
        idx = self.indices.detach().to("cpu", index_dtype(self.num_blocks)).contiguous()
        object.__setattr__(self, "indices", idx)

    @classmethod
    def from_bool(cls, mask: torch.Tensor) -> MaskEntry:
        """Element level (B=1): the True elements of a bool tensor shaped like the parameter."""
        idx = torch.nonzero(mask.reshape(-1).cpu()).reshape(-1)
        return cls(tuple(mask.shape), 1, idx.to(index_dtype(mask.numel())))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        """Blocks in the whole parameter."""
        return self.numel // self.block_size

    @property
    def num_selected(self) -> int:
        """Selected blocks (k)."""
        return int(self.indices.numel())

    @property
    def numel_selected(self) -> int:
        return self.num_selected * self.block_size

    @property
    def density(self) -> float:
        return self.numel_selected / self.numel if self.numel else 0.0

    def element_indices(self) -> torch.Tensor:
        """Flat int64 element indices of the selected blocks, in mask order."""
        return expand_blocks(self.indices, self.block_size)

    def block_mask(self) -> torch.Tensor:
        """Bool per block."""
        out = torch.zeros(self.num_blocks, dtype=torch.bool)
        out[self.indices.to(torch.int64)] = True
        return out

    def to_dense(self) -> torch.Tensor:
        """Bool tensor of the parameter's shape, True on selected elements."""
        return self.block_mask().repeat_interleave(self.block_size).reshape(self.shape)

    def coarsest(self) -> MaskEntry:
        """The same selection, in the same element order, at the largest block size that
        holds it exactly (e.g. a full element mask as one whole-tensor block; whole rows
        picked element by element as row blocks). Kernels step coarse blocks as contiguous
        runs, without reading an index per element."""
        k = self.num_selected
        if k == 0:
            return self
        idx = self.indices.to(torch.int64)
        starts = torch.ones(k, dtype=torch.bool)
        starts[1:] = idx[1:] != idx[:-1] + 1
        first = torch.nonzero(starts).reshape(-1)
        lengths = torch.diff(first, append=torch.tensor([k]))
        vals = torch.cat([idx[first], lengths, torch.tensor([self.num_blocks])])
        while vals.numel() > 1:  # gcd of all values, pairwise
            if vals.numel() % 2:
                vals = torch.cat([vals, vals[-1:]])
            vals = torch.gcd(vals[0::2], vals[1::2])
            if int(vals.min()) == 1:
                return self
        g = int(vals[0])
        if g <= 1:
            return self
        coarse = idx[idx % g == 0] // g
        return MaskEntry(self.shape, self.block_size * g, coarse.to(index_dtype(self.num_blocks // g)))

    def with_block_size(self, block_size: int) -> MaskEntry:
        """The same selection at a finer block size that divides this one."""
        if self.block_size % block_size:
            raise ValueError(f"block size {block_size} does not divide {self.block_size}")
        return MaskEntry(self.shape, block_size, expand_blocks(self.indices, self.block_size // block_size))

    def same_selection(self, other: MaskEntry) -> bool:
        return (
            self.shape == other.shape
            and self.block_size == other.block_size
            and torch.equal(self.indices.to(torch.int64), other.indices.to(torch.int64))
        )


def _combine(a: MaskEntry, b: MaskEntry, name: str, op: str) -> MaskEntry:
    if a.shape != b.shape:
        raise ValueError(f"{name!r}: cannot {op} masks of shapes {a.shape} and {b.shape}")
    g = math.gcd(a.block_size, b.block_size)
    ia = a.with_block_size(g).indices.to(torch.int64)
    ib = b.with_block_size(g).indices.to(torch.int64)
    if op == "union":
        idx = torch.unique(torch.cat([ia, ib]), sorted=True)
    elif op == "intersection":
        idx = ia[torch.isin(ia, ib)]
    else:
        idx = ia[~torch.isin(ia, ib)]
    return MaskEntry(a.shape, g, idx)


class CoreMask(Mapping[str, MaskEntry]):
    """Per parameter name, the selected blocks. Immutable; set operations return new masks."""

    def __init__(self, entries: Mapping[str, MaskEntry] | None = None) -> None:
        self._entries: dict[str, MaskEntry] = {}
        for name, entry in (entries or {}).items():
            if not isinstance(name, str):
                raise TypeError(f"parameter names must be str, got {type(name).__name__}")
            if not isinstance(entry, MaskEntry):
                raise TypeError(f"{name!r}: expected a MaskEntry, got {type(entry).__name__}")
            self._entries[name] = entry

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense: Mapping[str, torch.Tensor]) -> CoreMask:
        """Element-level mask (B=1) from bool tensors shaped like the parameters."""
        entries = {}
        for name, m in dense.items():
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise TypeError(f"{name!r}: expected a bool tensor")
            entries[name] = MaskEntry.from_bool(m)
        return cls(entries)

    @classmethod
    def from_blocks(
        cls, blocks: Mapping[str, tuple[tuple[int, ...], int, torch.Tensor]]
    ) -> CoreMask:
        """From ``{name: (shape, block_size, bool per block)}``."""
        entries = {}
        for name, (shape, block_size, selected) in blocks.items():
            numel = math.prod(shape)
            if not isinstance(selected, torch.Tensor) or selected.dtype != torch.bool:
                raise TypeError(f"{name!r}: expected a bool tensor with one value per block")
            if block_size < 1 or numel % block_size:
                raise ValueError(f"{name!r}: block_size {block_size} does not divide {numel} elements")
            if selected.numel() != numel // block_size:
                raise ValueError(
                    f"{name!r}: {selected.numel()} block flags for {numel // block_size} blocks "
                    f"of size {block_size}"
                )
            idx = torch.nonzero(selected.reshape(-1).cpu()).reshape(-1)
            entries[name] = MaskEntry(tuple(shape), int(block_size), idx)
        return cls(entries)

    @classmethod
    def from_indices(
        cls, indices: Mapping[str, tuple[tuple[int, ...], int, torch.Tensor]]
    ) -> CoreMask:
        """From ``{name: (shape, block_size, sorted unique block indices)}``."""
        entries = {}
        for name, (shape, block_size, idx) in indices.items():
            try:
                entries[name] = MaskEntry(tuple(shape), int(block_size), idx)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{name!r}: {exc}") from None
        return cls(entries)

    @classmethod
    def full(cls, shapes: Mapping[str, tuple[int, ...]], granularity: str = "tensor") -> CoreMask:
        """Everything selected, at "element", "row" or "tensor" granularity."""
        entries = {}
        for name, shape in shapes.items():
            b = block_size_for(shape, granularity)
            n = math.prod(shape) // b if b else 0
            entries[name] = MaskEntry(tuple(shape), b, torch.arange(n, dtype=index_dtype(n)))
        return cls(entries)

    # ---- mapping ------------------------------------------------------------------
    def __getitem__(self, name: str) -> MaskEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"no parameter named {name!r} in this CoreMask ({len(self._entries)} names)"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (
            f"CoreMask({len(self)} tensors, {self.numel_selected}/{self.numel} elements, "
            f"density {self.density:.4%})"
        )

    # ---- statistics ---------------------------------------------------------------
    @property
    def numel(self) -> int:
        return sum(e.numel for e in self._entries.values())

    @property
    def numel_selected(self) -> int:
        return sum(e.numel_selected for e in self._entries.values())

    @property
    def density(self) -> float:
        """Selected fraction of all elements of the named parameters."""
        n = self.numel
        return self.numel_selected / n if n else 0.0

    def nonempty(self) -> CoreMask:
        """The entries that select at least one block (what an optimizer trains)."""
        return CoreMask({n: e for n, e in self.items() if e.num_selected})

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]], what: str = "the mask") -> None:
        """Raise ValueError unless every entry names a key of `shapes` (e.g. a model's
        parameter shapes) with that shape."""
        for n, e in self.items():
            if n not in shapes:
                raise ValueError(f"{what} names parameter {n!r}, which the model does not have")
            if tuple(shapes[n]) != e.shape:
                raise ValueError(f"{what}: {n!r} has shape {list(e.shape)} in the mask, "
                                 f"{list(shapes[n])} in the model")

    def to_dense(self, name: str) -> torch.Tensor:
        return self[name].to_dense()

    # ---- set operations -----------------------------------------------------------
    def union(self, other: CoreMask) -> CoreMask:
        out = dict(self._entries)
        for name, e in other.items():
            out[name] = _combine(out[name], e, name, "union") if name in out else e
        return CoreMask(out)

    def intersection(self, other: CoreMask) -> CoreMask:
        return CoreMask(
            {n: _combine(e, other[n], n, "intersection") for n, e in self.items() if n in other}
        )

    def difference(self, other: CoreMask) -> CoreMask:
        return CoreMask(
            {n: (_combine(e, other[n], n, "difference") if n in other else e) for n, e in self.items()}
        )

    __or__ = union
    __and__ = intersection
    __sub__ = difference

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CoreMask):
            return NotImplemented
        return self.keys() == other.keys() and all(
            e.same_selection(other[n]) for n, e in self.items()
        )

    __hash__ = None  # type: ignore[assignment]

    # ---- files --------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (indices as tensors, layout in the metadata)."""
        from safetensors.torch import save_file

        layout = {n: {"shape": list(e.shape), "block_size": e.block_size} for n, e in self.items()}
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "layout": json.dumps(layout)}
        save_file({n: e.indices for n, e in self.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> CoreMask:
        """Read a file written by `save`, validating everything in it."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no CoreMask file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path}: not a readable CoreMask file ({exc})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a CoreMask file (format {meta.get('format')!r})")
        if meta.get("version") != str(FORMAT_VERSION):
            raise ValueError(f"{path}: CoreMask format version {meta.get('version')} is not supported")
        try:
            layout = json.loads(meta["layout"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: damaged CoreMask layout metadata ({exc})") from None
        if set(layout) != set(tensors):
            raise ValueError(f"{path}: layout and index tensors name different parameters")
        try:
            return cls.from_indices(
                {n: (tuple(v["shape"]), int(v["block_size"]), tensors[n]) for n, v in layout.items()}
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None


def block_size_for(shape: tuple[int, ...], granularity: str | int) -> int:
    """Block size of a granularity: "element" (1), "row" (last dim), "tensor" (numel) or an int."""
    numel = math.prod(shape)
    if isinstance(granularity, int) and not isinstance(granularity, bool):
        return granularity
    if granularity == "element":
        return 1
    if granularity == "row":
        return max(int(shape[-1]), 1) if shape else 1
    if granularity == "tensor":
        return max(numel, 1)
    raise ValueError(f"granularity must be 'element', 'row', 'tensor' or an int, got {granularity!r}")
