"""Triton kernels: masked AdamW (optionally accumulating Fisher) and the delta_stats pass.

Multi-tensor: every launch covers a group of tensors through tables of addresses (int64)
cast to pointers in the kernel. The per-element math follows
csrc/include/trace_kernels/adamw_math.h: correctly rounded division and square root
(div_rn, sqrt_rn), and launches pass enable_fp_fusion=False so no multiply-add is fused,
as the C++ kernels are compiled with -ffp-contract=off.
"""

import triton
import triton.language as tl

# Per-tensor coefficient table (float32), one row per tensor, made by the host code
# (`_coeffs`): decay, lerp weight, its complement, beta2, 1 - beta2, sqrt of bias
# correction 2, eps, -lr / bias correction 1 (the order _adamw_element reads them in).
NUM_COEFFS = tl.constexpr(8)


@triton.jit
def _round_to(x, PDT: tl.constexpr):
    """fp32 -> parameter dtype, rounding to nearest even. bf16 is rounded by hand (as
    float_convert.h does): Triton's interpreter truncates on that cast."""
    if PDT == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)  # NaN: canonical quiet NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(PDT)


@triton.jit
def _mix32(x):
    """rounding.h's mix32 on uint32 (multiplication wraps modulo 2**32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _round_bf16_stochastic(x, key, elem):
    """rounding.h's float_to_bf16_stochastic with round_bits(key, elem) (elem: int64)."""
    e = elem.to(tl.uint64)
    hi = _mix32((e >> 32).to(tl.uint32) + 0x9E3779B9)
    bits = _mix32(key ^ e.to(tl.uint32) ^ hi) & 0xFFFF
    u = x.to(tl.uint32, bitcast=True)
    mag = u & 0x7FFFFFFF
    r = (u + bits) >> 16
    r = tl.where(mag == 0x7F800000, u >> 16, r)
    r = tl.where(mag > 0x7F800000, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _adamw_element(p, g, m, v, vmax, coeff_row, AMSGRAD: tl.constexpr, LERP_LOW: tl.constexpr):
    decay = tl.load(coeff_row + 0)
    w = tl.load(coeff_row + 1)
    wc = tl.load(coeff_row + 2)
    beta2 = tl.load(coeff_row + 3)
    gsq_w = tl.load(coeff_row + 4)
    bc2_sqrt = tl.load(coeff_row + 5)
    eps = tl.load(coeff_row + 6)
    neg_step = tl.load(coeff_row + 7)
    p = p * decay
    if LERP_LOW:
        m = m + w * (g - m)
    else:
        m = g - (g - m) * wc
    v = v * beta2 + (gsq_w * g) * g
    second = v
    if AMSGRAD:
        vmax = tl.where((v > vmax) | (v != v), v, vmax)
        second = vmax
    denom = tl.math.div_rn(tl.math.sqrt_rn(second), bc2_sqrt) + eps
    p = p + tl.math.div_rn(neg_step * m, denom)
    return p, m, v, vmax


@triton.jit
def masked_adamw_kernel(
    tile_tensor, tile_start,                  # per program: tensor id, first compact position
    P, G, M, V, VMAX, F, IDX,                 # per tensor: addresses (int64)
    BSIZE, NSEL,                              # per tensor: block size, selected elements
    COEFFS,                                   # per tensor: NUM_COEFFS float32
    GRAD_SCALE, grad_sign, fisher_scale,      # GRAD_SCALE: one fp32 (read when HAS_SCALE)
    MASTER, KEYS, PREV_KEYS, ELEM_BASE,       # per tensor: fp32 masters, this and the last
                                              # step's rounding keys, element base
    PDT: tl.constexpr, IDT: tl.constexpr, TILE: tl.constexpr, GATHER: tl.constexpr,
    AMSGRAD: tl.constexpr, FISHER: tl.constexpr, LERP_LOW: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    c0 = tl.load(tile_start + pid)
    B = tl.load(BSIZE + t)
    nsel = tl.load(NSEL + t)
    param = tl.load(P + t).to(tl.pointer_type(PDT))
    grad = tl.load(G + t).to(tl.pointer_type(PDT))
    m_ptr = tl.load(M + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(V + t).to(tl.pointer_type(tl.float32))
    idx = tl.load(IDX + t).to(tl.pointer_type(IDT))
    offs = tl.arange(0, TILE)
    c = c0 + offs
    if GATHER:
        # small blocks: each lane finds its block, then its element
        mask = c < nsel
        j = c // B
        blk = tl.load(idx + j, mask=mask, other=0).to(tl.int64)
        elem = blk * B + (c - j * B)
    else:
        # one tile inside one block: a contiguous run of the parameter
        j = c0 // B
        w0 = c0 - j * B
        mask = offs < tl.minimum(B - w0, TILE)
        blk = tl.load(idx + j).to(tl.int64)
        elem = blk * B + w0 + offs
    grad_divisor = grad_sign
    if HAS_SCALE:  # read on the device: no host synchronisation
        grad_divisor = grad_sign * tl.load(GRAD_SCALE)
    if HAS_MASTER:  # the update runs on the fp32 masters; the parameter gets them rounded
        w_ptr = tl.load(MASTER + t).to(tl.pointer_type(tl.float32))
        master = tl.load(w_ptr + c, mask=mask, other=0.0)
        # rounding.h's master_or_weight: the weight wins where it no longer holds what the
        # last step wrote from the master (something else wrote it since)
        weight = tl.load(param + elem, mask=mask, other=0.0)
        if STOCHASTIC:
            wrote = _round_bf16_stochastic(master, tl.load(PREV_KEYS + t).to(tl.uint32),
                                           elem + tl.load(ELEM_BASE + t))
        else:
            wrote = _round_to(master, PDT)
        same = wrote.to(tl.int16, bitcast=True) == weight.to(tl.int16, bitcast=True)
        p = tl.where(same, master, weight.to(tl.float32))
    else:
        p = tl.load(param + elem, mask=mask, other=0.0).to(tl.float32)
    g = tl.math.div_rn(tl.load(grad + elem, mask=mask, other=0.0).to(tl.float32), grad_divisor)
    m = tl.load(m_ptr + c, mask=mask, other=0.0)
    v = tl.load(v_ptr + c, mask=mask, other=0.0)
    vmax = v
    if AMSGRAD:
        vmax_ptr = tl.load(VMAX + t).to(tl.pointer_type(tl.float32))
        vmax = tl.load(vmax_ptr + c, mask=mask, other=0.0)
    if FISHER:
        f_ptr = tl.load(F + t).to(tl.pointer_type(tl.float32))
        f = tl.load(f_ptr + c, mask=mask, other=0.0)
        tl.store(f_ptr + c, f + (fisher_scale * g) * g, mask=mask)
    p, m, v, vmax = _adamw_element(p, g, m, v, vmax, COEFFS + t * NUM_COEFFS, AMSGRAD, LERP_LOW)
    if HAS_MASTER:
        tl.store(w_ptr + c, p, mask=mask)
    if STOCHASTIC:
        key = tl.load(KEYS + t).to(tl.uint32)
        out = _round_bf16_stochastic(p, key, elem + tl.load(ELEM_BASE + t))
    else:
        out = _round_to(p, PDT)
    tl.store(param + elem, out, mask=mask)
    tl.store(m_ptr + c, m, mask=mask)
    tl.store(v_ptr + c, v, mask=mask)
    if AMSGRAD:
        tl.store(vmax_ptr + c, vmax, mask=mask)


@triton.jit
def delta_stats_kernel(
    tile_tensor, tile_start, tile_out,        # per program: tensor, first element, output slot
    POST, PRE, FISH, REFS,                    # per tensor: addresses; REFS has R per tensor
    BSIZE, NUMEL,
    OUT,                                      # fp64 (slots, 2 + 2R): sums or partial sums
    PDT: tl.constexpr, RDT: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr,
    COLS: tl.constexpr, HAS_PRE: tl.constexpr, HAS_FISHER: tl.constexpr,
):
    """A program sums ROWS consecutive blocks of at most COLS elements each, or (ROWS = 1)
    one COLS-long segment of a longer block, in fp64, writing one output row per block."""
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    e0 = tl.load(tile_start + pid)
    slot = tl.load(tile_out + pid)
    B = tl.load(BSIZE + t)
    numel = tl.load(NUMEL + t)
    post = tl.load(POST + t).to(tl.pointer_type(PDT))
    rows = tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, COLS)[None, :]
    if ROWS == 1:
        seg_end = tl.minimum(e0 - (e0 % B) + B, e0 + COLS)  # stay inside the block
        elem = e0 + rows * 0 + cols
        mask = elem < seg_end
    else:
        elem = e0 + rows * B + cols
        mask = (cols < B) & (elem < numel)
    d = tl.load(post + elem, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE:
        pre = tl.load(PRE + t).to(tl.pointer_type(PDT))
        d = d - tl.load(pre + elem, mask=mask, other=0.0).to(tl.float32)
    d64 = d.to(tl.float64)
    width = 2 + 2 * R
    out_rows = OUT + (slot + tl.arange(0, ROWS)) * width
    row_ok = (e0 + tl.arange(0, ROWS) * B) < numel
    tl.store(out_rows + 0, tl.sum(d64 * d64, axis=1), mask=row_ok)
    if HAS_FISHER:
        fish = tl.load(FISH + t).to(tl.pointer_type(tl.float32))
        f = tl.load(fish + elem, mask=mask, other=0.0).to(tl.float64)
        tl.store(out_rows + 1, tl.sum(f, axis=1), mask=row_ok)
    else:
        tl.store(out_rows + 1, tl.zeros([ROWS], dtype=tl.float64), mask=row_ok)
    for r in range(R):  # not unrolled: unrolling hoists every reference load and spills
        ref_ptr = tl.load(REFS + t * R + r).to(tl.pointer_type(RDT))
        ref = tl.load(ref_ptr + elem, mask=mask, other=0.0).to(tl.float32).to(tl.float64)
        tl.store(out_rows + 2 + r, tl.sum(d64 * ref, axis=1), mask=row_ok)
        tl.store(out_rows + 2 + R + r, tl.sum(ref * ref, axis=1), mask=row_ok)


@triton.jit
def sum_partials_kernel(PART, first_part, count, dest_row, OUT, WIDTH: tl.constexpr,
                        WP: tl.constexpr):
    """Stage two: split block b adds its `count[b]` partial rows in order (no atomics) into
    output row `dest_row[b]`."""
    b = tl.program_id(0)
    start = tl.load(first_part + b)
    n = tl.load(count + b)
    row = tl.load(dest_row + b)
    cols = tl.arange(0, WP)
    acc = tl.zeros([WP], dtype=tl.float64)
    for s in range(0, n):
        acc += tl.load(PART + (start + s) * WIDTH + cols, mask=cols < WIDTH, other=0.0)
    tl.store(OUT + row * WIDTH + cols, acc, mask=cols < WIDTH)
