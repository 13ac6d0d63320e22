"""The Triton backend: masked_adamw_, adamw_fisher_ and delta_stats as Triton kernels.

Optional: importing trace_kernels works without Triton; `available()` says why not.
Launch tables (addresses, block sizes, tile lists) are built once per distinct set of
tensors and reused while the addresses stay the same (rebuilt when grads are reallocated).
Per-step scalars (bias corrections from each parameter's step) go in a small table each
call. Block sizes are chosen by rule, never by autotuning (the kernels update in place).
Under TRITON_INTERPRET=1 the kernels run on CPU tensors, which is how the test suite
checks them on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from ..registry import register_kernel
from .._common import advance_steps, host_lr, inf_found, register_adamw, round_key, split_stats
from .._plan_cache import PLANS

_IMPORT_ERROR: str | None = None
try:
    import triton
    import triton.language as tl

    from . import kernels
except Exception as exc:  # noqa: BLE001 - any failure means the backend is unavailable
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

INSTALL_HINT = "install it with `pip install triton` (or the `triton` extra of trace-kernels)"
TILE = 1024            # compact elements per masked-AdamW program
STATS_COLS_MAX = 2048  # longest block segment one delta_stats program sums
STATS_TILE = 1024      # elements per delta_stats program when blocks are short (4096 spills at R=16)
# Warps per delta_stats program, chosen from tools/gpu_compile_report.py: with fp64
# accumulators, 4 warps spill on 2-D tiles and 8 on some 1-element-block tiles (sm_80).
def _stats_warps(cols: int) -> int:
    return 4 if cols == 1 else 8


def available() -> str | None:
    """None if Triton kernels can run, else why not."""
    if _IMPORT_ERROR is not None:
        return f"Triton is not importable ({_IMPORT_ERROR}); {INSTALL_HINT}"
    return None


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.int32: tl.int32, torch.int64: tl.int64}[dtype]


def _launch_opts() -> dict:
    # No fused multiply-add: the same rounding as the reference and the C++ kernels.
    return {} if os.environ.get("TRITON_INTERPRET") == "1" else {"enable_fp_fusion": False}


def _device_guard(device: torch.device):
    """Launch on the tensors' device (and its current stream), not the current device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor copied to `device` without waiting (from pinned memory)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _coeffs(lr, beta1, beta2, eps, weight_decay, steps: list[float]) -> torch.Tensor:
    """Per-tensor AdamW scalars, in double then rounded to fp32 (as adamw_math.h does), on
    the host."""
    rows = []
    w = float(torch.tensor(1.0 - beta1, dtype=torch.float32))
    wc = float(torch.tensor(1.0, dtype=torch.float32) - torch.tensor(w, dtype=torch.float32))
    for step in steps:
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        rows.append([1.0 - lr * weight_decay, w, wc, beta2, 1.0 - beta2, bc2**0.5, eps, -(lr / bc1)])
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, kernels.NUM_COEFFS.value)


def _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, block_indices, block_sizes,
           steps, fishers, fisher_scale, *, lr, beta1, beta2, eps, weight_decay, amsgrad,
           maximize, grad_scale, found_inf, masters=(), elem_bases=(), stochastic=False, seed=0):
    # With AMP, found_inf is read once on the host (the step's one synchronisation): host
    # step counters must not advance on a skipped step. grad_scale is read by the kernel.
    if inf_found(found_inf):
        return
    step_values = advance_steps(steps)
    lr = host_lr(lr)
    device = params[0].device
    coeffs = _coeffs(lr, beta1, beta2, eps, weight_decay, step_values)
    scale = grad_scale.to(device, torch.float32).reshape(1) if grad_scale is not None else None
    has_master = [bool(masters) and masters[i].numel() > 0 for i in range(len(params))]
    keys = torch.tensor([round_key(seed, st) if stochastic else 0 for st in step_values], dtype=torch.int64)
    prev_keys = torch.tensor([round_key(seed, st - 1) if stochastic else 0 for st in step_values],
                             dtype=torch.int64)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if block_indices[i].numel() == 0:
            continue
        gather = block_sizes[i] < TILE
        sr = stochastic and p.dtype == torch.bfloat16
        groups.setdefault((p.dtype, block_indices[i].dtype, gather, has_master[i], sr), []).append(i)
    for (pdt, idt, gather, master, sr), members in groups.items():
        addr = [(params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                 exp_avg_sqs[i].data_ptr(), max_exp_avg_sqs[i].data_ptr() if amsgrad else 0,
                 fishers[i].data_ptr() if fishers else 0, block_indices[i].data_ptr(),
                 masters[i].data_ptr() if master else 0, elem_bases[i] if elem_bases else 0,
                 block_sizes[i], block_indices[i].numel()) for i in members]
        plan = PLANS.get(("triton", "adamw", device, gather, tuple(addr)), lambda: _adamw_plan(addr, gather, device))
        with _device_guard(device):
            kernels.masked_adamw_kernel[(plan["programs"],)](
                plan["tile_tensor"], plan["tile_start"], *plan["tables"], plan["bsize"], plan["nsel"],
                _to_device(coeffs[members], device),
                scale if scale is not None else plan["nsel"],  # any pointer: unread without a scale
                -1.0 if maximize else 1.0, float(fisher_scale), plan["master"],
                _to_device(keys[members], device), _to_device(prev_keys[members], device), plan["elem_base"],
                PDT=_tl_dtype(pdt), IDT=_tl_dtype(idt), TILE=TILE, GATHER=gather, AMSGRAD=amsgrad,
                FISHER=bool(fishers), LERP_LOW=abs(1.0 - beta1) < 0.5,
                HAS_SCALE=grad_scale is not None, HAS_MASTER=master, STOCHASTIC=sr, **_launch_opts(),
            )


def _adamw_plan(addr, gather: bool, device) -> dict:
    cols = list(zip(*addr))
    tables = [torch.tensor(c, dtype=torch.int64, device=device) for c in cols[:7]]
    master, elem_base = (torch.tensor(c, dtype=torch.int64, device=device) for c in cols[7:9])
    bsize = torch.tensor(cols[9], dtype=torch.int64, device=device)
    nsel = torch.tensor([b * k for b, k in zip(cols[9], cols[10])], dtype=torch.int64, device=device)
    tile_tensor, tile_start = [], []
    for t, (b, kk) in enumerate(zip(cols[9], cols[10])):
        if gather:  # tiles over compact positions
            starts = torch.arange(0, kk * b, TILE, dtype=torch.int64)
        else:  # tiles never cross a block: contiguous parameter runs
            per_block = torch.arange(0, b, TILE, dtype=torch.int64)
            starts = (torch.arange(kk, dtype=torch.int64)[:, None] * b + per_block[None, :]).reshape(-1)
        tile_start.append(starts)
        tile_tensor.append(torch.full((starts.numel(),), t, dtype=torch.int32))
    tile_start = torch.cat(tile_start)
    return {"tables": tables, "master": master, "elem_base": elem_base, "bsize": bsize, "nsel": nsel,
            "programs": tile_start.numel(),
            "tile_start": tile_start.to(device), "tile_tensor": torch.cat(tile_tensor).to(device)}


masked_adamw_, adamw_fisher_ = register_adamw("triton", _adamw)


@register_kernel("delta_stats", "triton")
def delta_stats(post, pre, fishers, refs, block_sizes, num_refs, outputs):
    device = post[0].device
    R = num_refs
    width = 2 + 2 * R
    final = torch.zeros(outputs[0].numel(), width, dtype=torch.float64, device=device)
    row0, groups, splits = 0, {}, []
    for i, t in enumerate(post):
        b = block_sizes[i]
        nb = t.numel() // b
        if nb == 0:
            continue
        rdts = tuple(refs[i * R + r].dtype for r in range(R))
        if len(set(rdts)) > 1:
            raise ValueError(f"delta_stats (triton): the references of post[{i}] must share one dtype")
        if b <= STATS_COLS_MAX:
            cols_ = triton.next_power_of_2(b)
            rows_ = max(1, STATS_TILE // cols_)
            starts = torch.arange(0, nb, rows_, dtype=torch.int64)
            key = (t.dtype, rdts, rows_, cols_)
            groups.setdefault(key, []).append((i, starts * b, row0 + starts, None))
        else:
            pieces = math.ceil(b / STATS_COLS_MAX)
            blocks = torch.arange(nb, dtype=torch.int64)
            starts = (blocks[:, None] * b + torch.arange(pieces)[None, :] * STATS_COLS_MAX).reshape(-1)
            key = (t.dtype, rdts, 1, STATS_COLS_MAX)
            groups.setdefault(key, []).append((i, starts, None, (row0, nb, pieces)))
        row0 += nb
    partial_rows = sum(e[3][1] * e[3][2] for g in groups.values() for e in g if e[3] is not None)
    partials = torch.zeros(max(partial_rows, 1), width, dtype=torch.float64, device=device)
    next_partial = 0
    for (pdt, rdts, rows_, cols_), members in groups.items():
        for split in (False, True):
            part = [m for m in members if (m[3] is not None) == split]
            if not part:
                continue
            tensors = [m[0] for m in part]
            tt, ts, to = [], [], []
            for slot, (i, starts, out_rows, sp) in enumerate(part):
                tt.append(torch.full((starts.numel(),), slot, dtype=torch.int32))
                ts.append(starts)
                if split:
                    row, nb, pieces = sp
                    first = next_partial
                    to.append(torch.arange(first, first + nb * pieces, dtype=torch.int64))
                    splits.append((torch.arange(row, row + nb, dtype=torch.int64),
                                   first + torch.arange(nb, dtype=torch.int64) * pieces, pieces))
                    next_partial += nb * pieces
                else:
                    to.append(out_rows)
            ref_addr = [refs[i * R + r].data_ptr() for i in tensors for r in range(R)] or [0]
            tables = [torch.tensor(col, dtype=torch.int64, device=device) for col in (
                [post[i].data_ptr() for i in tensors], [pre[i].data_ptr() if pre else 0 for i in tensors],
                [fishers[i].data_ptr() if fishers else 0 for i in tensors], ref_addr,
                [block_sizes[i] for i in tensors], [post[i].numel() for i in tensors])]
            with _device_guard(device):
                kernels.delta_stats_kernel[(sum(x.numel() for x in ts),)](
                    torch.cat(tt).to(device), torch.cat(ts).to(device), torch.cat(to).to(device),
                    *tables, partials if split else final,
                    PDT=_tl_dtype(pdt), RDT=_tl_dtype(rdts[0]) if R else tl.float32, R=R, ROWS=rows_,
                    COLS=cols_, HAS_PRE=bool(pre), HAS_FISHER=bool(fishers), num_warps=_stats_warps(cols_),
                    **_launch_opts(),
                )
    if splits:
        dest = torch.cat([s[0] for s in splits]).to(device)
        first = torch.cat([s[1] for s in splits]).to(device)
        count = torch.cat([torch.full((s[0].numel(),), s[2], dtype=torch.int64) for s in splits]).to(device)
        with _device_guard(device):
            kernels.sum_partials_kernel[(dest.numel(),)](
                partials, first, count, dest, final, WIDTH=width, WP=triton.next_power_of_2(width),
                **_launch_opts())
    split_stats(final, outputs, R)
