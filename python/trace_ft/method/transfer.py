"""Small-to-large: map a core found on a small model onto a larger one of the same family.

A probe on a small model is cheap; what it finds about a task — which layers and module
types need how much of the budget, and which rows within them — is carried to the large
model's shapes, which can then be fine-tuned on that core without a probe of its own
(`trace-ft adapt --core`).

For each tensor of the large model, the source is the small tensor of the same module
type (the name with its layer number taken out) at the same relative depth: large layer j
of L maps to small layer ⌊j·l/L⌋ of l. The large tensor gets the source's density, and
its elements are chosen where the source's were, rescaled: large row i reads small row
⌊i·r/R⌋ and large column c small column ⌊c·k/K⌋ (nearest neighbour). Row-level sources
give row-level cores (the densest rescaled rows); element-level sources give element
cores (the rescaled pattern, topped up or cut to the budget); whole-tensor sources give
whole tensors. Positions carry meaning when the large model's units relate to the small
one's (a grown or distilled family); the per-layer and per-module budget carries over
in any case.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from trace_kernels import CoreMask, MaskEntry
from trace_kernels.masks import index_dtype

_LAYER = re.compile(r"\.(\d+)\.")


def split_layer(name: str) -> tuple[str, int | None]:
    """(module type key, layer number): 'model.layers.3.mlp.up_proj.weight' →
    ('model.layers.#.mlp.up_proj.weight', 3); names without a layer number keep theirs."""
    m = _LAYER.search(name)
    if m is None:
        return name, None
    return name[:m.start()] + ".#." + name[m.end():], int(m.group(1))


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    cols = int(shape[-1]) if shape else 1
    return math.prod(shape) // max(cols, 1), cols


def _kind(entry: MaskEntry) -> str:
    if entry.block_size == entry.numel and entry.numel > 1:
        return "tensor"
    if entry.block_size == _rows_cols(entry.shape)[1] and entry.block_size > 1:
        return "row"
    return "element"


def _map_entry(src: MaskEntry, shape: tuple[int, ...], gen: torch.Generator | None = None) -> MaskEntry:
    """`src`'s density on `shape`, at `src`'s granularity: at the rescaled positions, or at
    random ones when `gen` is given."""
    numel = math.prod(shape)
    rows, cols = _rows_cols(shape)
    density = src.numel_selected / src.numel if src.numel else 0.0
    kind = _kind(src)
    if kind == "tensor" or numel == 0:
        chosen = torch.ones(1, dtype=torch.bool) if src.num_selected else torch.zeros(1, dtype=torch.bool)
        return MaskEntry(tuple(shape), max(numel, 1), torch.nonzero(chosen).reshape(-1).to(torch.int32))
    s_rows, s_cols = _rows_cols(src.shape)
    dense = src.to_dense().reshape(s_rows, s_cols).float()
    row_map = torch.arange(rows) * s_rows // rows
    if kind == "row":
        score = dense.mean(1)[row_map]
        k = round(density * rows)
        block, count = cols, rows
    else:
        col_map = torch.arange(cols) * s_cols // cols
        score = dense[row_map][:, col_map].reshape(-1)
        k = round(density * numel)
        block, count = 1, numel
    if gen is not None:  # the budget alone
        score = torch.rand(count, generator=gen)
    order = torch.argsort(score, descending=True, stable=True)[:k]
    idx = torch.sort(order).values.to(index_dtype(count))
    return MaskEntry(tuple(shape), block, idx)


def transfer_core(core: CoreMask, target: nn.Module | Mapping[str, tuple[int, ...]],
                  positions: str = "rescale", seed: int = 0) -> tuple[CoreMask, list[dict]]:
    """Map `core` (found on a small model; its entries carry the small shapes) onto the
    parameters of `target` (a model or {name: shape}). Returns the new core and one report
    row per target tensor that got a source.

    positions: "rescale" (the small core's positions, rescaled) or "random" (only the
    per-layer, per-module budget carries over; positions drawn with `seed`).
    """
    if positions not in ("rescale", "random"):
        raise ValueError(f"positions must be 'rescale' or 'random', got {positions!r}")
    gen = torch.Generator().manual_seed(seed) if positions == "random" else None
    shapes = ({n: tuple(p.shape) for n, p in target.named_parameters()}
              if isinstance(target, nn.Module) else {n: tuple(s) for n, s in target.items()})
    by_key: dict[str, dict[int | None, str]] = {}
    for n in core:
        key, layer = split_layer(n)
        by_key.setdefault(key, {})[layer] = n
    target_layers: dict[str, list[int]] = {}
    for n in shapes:
        key, layer = split_layer(n)
        if key in by_key and layer is not None:
            target_layers.setdefault(key, []).append(layer)
    entries, report = {}, []
    for n, shape in shapes.items():
        key, layer = split_layer(n)
        sources = by_key.get(key)
        if not sources:
            continue
        if layer is None:
            src_name = sources.get(None)
            if src_name is None:
                continue
        else:
            src_layers = sorted(x for x in sources if x is not None)
            if not src_layers:
                continue
            big = sorted(set(target_layers[key]))
            src_name = sources[src_layers[big.index(layer) * len(src_layers) // len(big)]]
        src = core[src_name]
        if len(shape) != len(src.shape):
            raise ValueError(f"{n!r} has {len(shape)} dimensions, its source {src_name!r} has "
                             f"{len(src.shape)}: not the same model family")
        entry = _map_entry(src, shape, gen)
        entries[n] = entry
        report.append({"name": n, "source": src_name, "granularity": _kind(src),
                       "source_shape": list(src.shape), "shape": list(shape),
                       "source_density": src.numel_selected / max(src.numel, 1),
                       "density": entry.numel_selected / max(entry.numel, 1),
                       "selected": entry.numel_selected})
    if not entries:
        raise ValueError("no parameter of the target model matches the core's parameter names: "
                         "not the same model family")
    return CoreMask(entries), report


def format_report(report: list[dict]) -> str:
    lines = [f"{'target tensor':44s} {'from':44s} {'gran':>7s} {'src %':>7s} {'new %':>7s} {'selected':>10s}"]
    for r in report:
        lines.append(f"{r['name'][-44:]:44s} {r['source'][-44:]:44s} {r['granularity']:>7s} "
                     f"{100 * r['source_density']:7.2f} {100 * r['density']:7.2f} {r['selected']:10,d}")
    total = sum(r["selected"] for r in report)
    numel = sum(math.prod(r["shape"]) for r in report)
    lines.append(f"core: {total:,} of {numel:,} elements ({total / max(numel, 1):.2%})")
    return "\n".join(lines)


__all__ = ["transfer_core", "split_layer", "format_report"]
