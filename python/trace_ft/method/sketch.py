"""Fixed-size sketches of earlier tasks' updates, so a long task history does not cost a
model copy per task.

Each block of B elements is mapped to `dim` values by a count sketch (a sparse
Johnson–Lindenstrauss projection): element e of a block goes to bucket h(e) with sign s(e),
``sketch[b, j] = Σ_{e: h(e)=j} s(e)·Δ[b, e]``. Inner products, and so cosines, are
preserved in expectation with error ~1/√dim. The hash depends only on (seed, parameter
name, block size), so an earlier task's sketch and the new task's update are projected
alike. Blocks no longer than `dim` are kept exactly.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BlockSketch:
    """A (num_blocks, dim) sketch of one parameter's update at a block size."""

    values: Tensor
    block_size: int
    seed: int
    exact: bool  # block_size <= dim: values are the blocks themselves

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])


def _hash(name: str, block_size: int, dim: int, seed: int, device) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
    buckets = torch.randint(0, dim, (block_size,), generator=g, dtype=torch.int64)
    signs = torch.randint(0, 2, (block_size,), generator=g, dtype=torch.int8).float().mul_(2).sub_(1)
    return buckets.to(device), signs.to(device)


def sketch_update(delta: Tensor, name: str, block_size: int, dim: int = 1024, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> BlockSketch:
    """Sketch `delta` (a parameter's update) block by block, `dim` values per block."""
    n = delta.numel()
    if block_size < 1 or n % block_size:
        raise ValueError(f"{name}: block size {block_size} does not divide {n} elements")
    blocks = delta.detach().reshape(-1, block_size) if n else delta.new_zeros(0, block_size)
    if block_size <= dim:
        return BlockSketch(blocks.to(dtype, copy=True), block_size, seed, exact=True)
    buckets, signs = _hash(name, block_size, dim, seed, delta.device)
    out = torch.zeros(blocks.shape[0], dim, dtype=torch.float32, device=delta.device)
    # a slice of blocks at a time bounds the temporary to ~16M elements
    step = max(1, (1 << 24) // block_size)
    for b0 in range(0, blocks.shape[0], step):
        part = blocks[b0:b0 + step].float() * signs
        out[b0:b0 + step].index_add_(1, buckets, part)
    return BlockSketch(out.to(dtype), block_size, seed, exact=False)


def sketch_cosine(delta: Tensor, name: str, sketch: BlockSketch) -> Tensor:
    """Per-block cosine between `delta` and the update a sketch was made from (0 where
    either is zero), estimated in sketch space."""
    mine = sketch_update(delta, name, sketch.block_size, sketch.dim, sketch.seed).values
    theirs = sketch.values.float()
    dot = (mine * theirs).sum(1)
    norm = mine.norm(dim=1) * theirs.norm(dim=1)
    return torch.where(norm > 0, dot / norm.clamp_min(1e-30), torch.zeros_like(dot))
