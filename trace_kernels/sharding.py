"""Global masks on sharded parameters.

The user always speaks in global terms: a `CoreMask` keyed by the unsharded model's names
and shapes. FSDP2 (`fully_shard`) keeps on each rank a DTensor sharded on dim 0 over a
one-dimensional mesh: the rank's rows, which are one contiguous range ``[lo, hi)`` of the
parameter's flat elements (torch.chunk's split: ``ceil(rows / world)`` rows per rank, the
last ranks possibly short or empty). Everything here maps a global selection onto such a
range exactly, a block that straddles a shard boundary included:

- the local selection is a `MaskEntry` on the local storage, whose block size divides the
  global one and the range's ends, so the kernels see plain local blocks;
- the rank's core elements keep the global mask order, so the rank's compact state is one
  slice ``[offset, offset + k)`` of the global compact state, and the ranks' slices, in
  rank order, are the global state (what checkpoints save and reshard).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .masks import MaskEntry, index_dtype

try:  # torch.distributed may be absent from a build
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = Shard = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The storage this rank holds of `t` (itself for a plain tensor)."""
    return t._local_tensor if is_dtensor(t) else t


@dataclass(frozen=True)
class ShardLayout:
    """Where a rank's shard of a parameter lies in the parameter's flat elements."""

    lo: int                  # first global flat element of this rank's shard
    hi: int                  # one past the last
    ranges: tuple            # (lo, hi) of every mesh position, in mesh order
    ranks: tuple             # the global rank of every mesh position
    index: int               # this rank's mesh position
    group: object            # the process group of the mesh


def chunk_rows(rows: int, world: int) -> list[tuple[int, int]]:
    """torch.chunk's split of `rows` into `world` parts: (first row, end row) each."""
    size = math.ceil(rows / world) if rows else 0
    return [(min(r * size, rows), min((r + 1) * size, rows)) for r in range(world)]


def shard_layout(p: Tensor, what: str) -> ShardLayout | None:
    """The shard layout of a DTensor parameter (None for a plain tensor); a ValueError that
    names the parameter and its placement for a layout the kernels cannot serve."""
    if not is_dtensor(p):
        return None
    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(
            f"parameter {what} is a DTensor with placements {placements} on a {mesh.ndim}-D mesh; "
            "MaskedAdamW serves plain tensors and DTensors sharded on dim 0 over one mesh "
            "dimension (FSDP2's fully_shard); for tensor parallelism, HSDP or other layouts, "
            "train whole-tensor cores with requires_grad=False on the other tensors")
    local = p._local_tensor
    if not local.is_contiguous():
        raise ValueError(f"parameter {what}: its local shard is not contiguous")
    rows = p.shape[0] if p.dim() else 1
    row = p.numel() // rows if rows else 0
    world = mesh.size()
    parts = chunk_rows(rows, world)
    index = mesh.get_local_rank()
    first, end = parts[index]
    if local.numel() != (end - first) * row:
        raise ValueError(f"parameter {what}: its local shard holds {local.numel()} elements, "
                         f"torch.chunk's split of {rows} rows over {world} ranks gives {(end - first) * row}")
    ranks = tuple(int(r) for r in mesh.mesh.reshape(-1).tolist())
    return ShardLayout(first * row, end * row, tuple((a * row, b * row) for a, b in parts), ranks,
                       index, mesh.get_group())


def _range_elements(entry: MaskEntry, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """For the selected blocks meeting [lo, hi): the clipped element ranges (start, end)."""
    B = entry.block_size
    idx = entry.indices.to(torch.int64)
    meet = (idx * B < hi) & ((idx + 1) * B > lo)
    sel = idx[meet]
    return torch.clamp(sel * B, min=lo), torch.clamp((sel + 1) * B, max=hi)


def compact_offset(entry: MaskEntry, lo: int) -> int:
    """How many selected elements lie before flat element `lo` (global mask order)."""
    B = entry.block_size
    idx = entry.indices.to(torch.int64)
    return int(torch.clamp(lo - idx * B, 0, B).sum())


def localize(entry: MaskEntry, lo: int, hi: int, local_shape: tuple[int, ...]) -> tuple[MaskEntry, int]:
    """The selection of `entry` inside flat elements [lo, hi), as a MaskEntry on the local
    storage (shape `local_shape`), and its offset in the global compact order."""
    n = hi - lo
    offset = compact_offset(entry, lo)
    if n == 0:
        return MaskEntry(tuple(local_shape), 1, torch.zeros(0, dtype=torch.int32)), offset
    B = entry.block_size
    b = math.gcd(B, math.gcd(lo, n))  # divides the global blocks and both ends of the range
    start, end = _range_elements(entry, lo, hi)
    first = (start - lo) // b
    counts = (end - start) // b
    if counts.numel():
        local = torch.repeat_interleave(first, counts) + (
            torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts))
    else:
        local = torch.zeros(0, dtype=torch.int64)
    return MaskEntry(tuple(local_shape), b, local.to(index_dtype(n // b))), offset


def local_selection(entry: MaskEntry, p: Tensor, what: str = "the parameter") -> tuple[MaskEntry, int]:
    """`entry` (global) on the storage this rank holds of `p`, and its offset in the global
    compact order (`entry` itself and 0 for a plain tensor)."""
    shard = shard_layout(p, what)
    if shard is None:
        return entry, 0
    return localize(entry, shard.lo, shard.hi, tuple(p._local_tensor.shape))


def like(p: Tensor, local: Tensor) -> Tensor:
    """`local` (shaped like this rank's storage of `p`) as a tensor laid out like `p`: a
    DTensor with p's mesh and placements for a sharded `p`, else `local` itself."""
    if not is_dtensor(p):
        return local
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def all_reduce_sum(t: Tensor, p: Tensor) -> Tensor:
    """Sum `t` over the ranks `p` is sharded over (in place; `t` itself for a plain `p`)."""
    if is_dtensor(p):
        import torch.distributed as dist

        dist.all_reduce(t, group=p.device_mesh.get_group())
    return t


# ---- checkpoints: a sharded parameter's compact state, laid out independently of the world size
#
# The global compact state of a parameter (its core elements in mask order, `total` of them)
# is one vector whatever the number of ranks. A rank steps the slice its rows hold, whose
# length varies from rank to rank; a checkpoint stores the vector in torch.chunk's even
# split instead (``ceil(total / world)`` values per rank), the layout torch's full-state
# gathering assumes. `torch.distributed.checkpoint` then reshards by offsets, so a state
# saved by some number of ranks loads into any other, and a full state is the vector.


def compact_ranges(entry: MaskEntry, shard: ShardLayout) -> list[tuple[int, int]]:
    """The [start, end) of the global compact state each mesh position steps."""
    out = []
    for lo, hi in shard.ranges:
        start = compact_offset(entry, lo)
        out.append((start, compact_offset(entry, hi)))
    return out


def exchange(values: Tensor, have: list[tuple[int, int]], want: list[tuple[int, int]],
             shard: ShardLayout) -> Tensor:
    """A global vector held as ranges `have` (one per mesh position; this rank holds
    `values`, its own), re-held as ranges `want`: this rank's want-range. Point-to-point:
    each rank sends every other the overlap of its range with theirs, nothing more."""
    import torch.distributed as dist

    me = shard.index
    mine, (lo, hi) = have[me], want[me]
    if values.numel() != mine[1] - mine[0]:
        raise ValueError(f"{values.numel()} values held, the layout gives this rank {mine[1] - mine[0]}")
    out = values.new_empty(hi - lo)
    works = []
    for pos, (a, b) in enumerate(have):  # what this rank wants of each rank's holding
        s, e = max(a, lo), min(b, hi)
        if s < e:
            if pos == me:
                out[s - lo:e - lo] = values[s - a:e - a]
            else:
                works.append(dist.irecv(out[s - lo:e - lo], src=shard.ranks[pos], group=shard.group))
    for pos, (a, b) in enumerate(want):  # what each other rank wants of this one's
        s, e = max(a, mine[0]), min(b, mine[1])
        if s < e and pos != me:
            works.append(dist.isend(values[s - mine[0]:e - mine[0]].contiguous(), dst=shard.ranks[pos],
                                    group=shard.group))
    for w in works:
        w.wait()
    return out


def sharded_state(t: Tensor, entry: MaskEntry, shard: ShardLayout):
    """This rank's compact state (`t`, the slice it steps) as its even shard of the global
    vector: a ShardedTensor, which `torch.distributed.checkpoint` saves once per value and
    reshards on load, and torch's full-state gathering joins into the vector. Collective:
    every rank of the mesh calls it. A parameter without core elements keeps `t`."""
    import warnings

    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard as TensorShard
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    have = compact_ranges(entry, shard)
    total = have[-1][1]
    if total == 0:
        return t
    want = chunk_rows(total, len(have))  # torch.chunk's split of the vector
    chunk = exchange(t.reshape(-1), have, want, shard)
    # every rank holds a shard, an empty one too: DCP drops a key that a rank holds none of
    metas = [ShardMetadata(shard_offsets=[lo], shard_sizes=[hi - lo],
                           placement=f"rank:{shard.ranks[pos]}/"
                                     f"{t.device if pos == shard.index else torch.device(t.device.type)}")
             for pos, (lo, hi) in enumerate(want)]
    props = TensorProperties(dtype=t.dtype, layout=t.layout, requires_grad=False,
                             memory_format=torch.contiguous_format, pin_memory=False)
    with warnings.catch_warnings():  # the legacy ShardedTensor: DTensor cannot shard unevenly
        warnings.simplefilter("ignore", FutureWarning)
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            [TensorShard(tensor=chunk, metadata=metas[shard.index])],
            ShardedTensorMetadata(shards_metadata=metas, size=torch.Size([total]), tensor_properties=props),
            process_group=shard.group)


def rank_state(value, entry: MaskEntry, shard: ShardLayout | None, offset: int, k: int, what: str) -> Tensor:
    """The compact state this rank steps (`k` values from `offset` of the global order) of
    a loaded value: a ShardedTensor `sharded_state` made and `torch.distributed.checkpoint`
    filled (collective), the whole global vector (a full state, from any world size), or
    the rank's own slice as a plain tensor."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    total = entry.numel_selected
    if isinstance(value, ShardedTensor):
        if shard is None or tuple(value.size()) != (total,):
            raise ValueError(f"{what}: a sharded state of {tuple(value.size())} values for a mask that "
                             f"selects {total}" + ("" if shard is not None else " on an unsharded parameter"))
        local = value.local_shards()
        have = chunk_rows(total, len(shard.ranges))
        chunk = local[0].tensor.reshape(-1) if local else torch.zeros(0, dtype=value.dtype)
        return exchange(chunk, have, compact_ranges(entry, shard), shard)
    flat = value.reshape(-1)
    if flat.numel() == total:
        return flat[offset:offset + k]
    if shard is not None and flat.numel() == k:
        return flat
    raise ValueError(f"{what} has {flat.numel()} values; the mask selects {total}"
                     + (f", {k} of them on this rank" if shard is not None else ""))
