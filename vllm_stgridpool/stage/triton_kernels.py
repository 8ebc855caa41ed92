"""The stage's Triton kernel: one launch runs one pyramid level's area resizes and the pooling of every
output row whose value is final by then.

A program computes ``BLOCK_J`` neighbouring output tokens of one row, channels ``BLOCK_D`` at a time,
and is one of two kinds, told apart by its program id:

- a resize program writes tokens of one tile, area-resized from a source frame (an input frame or a
  finished mosaic), straight into its place in a mosaic buffer, cropped to the frame;
- a pool program writes NSP of a source frame's k x k windows into an output row.

What each program reads and writes comes from the launch's rows of a step table (int32, ``ROW``
columns, built from the plan once per shape, kept on the device): a resize row is ``from_input,
source, mosaic, top, left, rows, cols``; a pool row is ``from_input, source, output row``. The batch
is the grid's second axis. The float parameters (temperature, the norm's scale and p, the dtype's
largest value) come from a small float64 device tensor: Triton passes Python floats as float32.

Numerics are the CPU kernels' (``csrc/``): area sums in float32 (float64 for float64) added row by row
in window order and divided by the window's height then width (area interpolation's bits); a score
is the p-norm rounded to the dtype, capped at its largest value, times ``D ** (-1/p)`` (other p:
``a * mean(|x / a| ** p) ** (1/p)`` with ``a`` the token's largest ``|x_i|``, as the PyTorch-ops
path); the softmax sees ``temperature * (score - reference)``; the weights are rounded to the dtype;
sums are rounded once, NaN becomes 0 and values beyond the dtype's range its largest value. Rounding
to bfloat16 is done on the bits (round to nearest even), so the interpreter, whose own conversion
truncates, rounds as a GPU does. Division and square root are the IEEE ones (:func:`_div`, ``sqrt_rn``),
not CUDA's fast float32 approximations; ``exp`` and ``log`` are the fast ones in float32 (the weights and
scores they give are rounded or compared, not summed into mosaics).
"""

from __future__ import annotations

import triton
import triton.language as tl

ROW: tl.constexpr = tl.constexpr(8)  # int32 columns per step-table row


@triton.jit
def _rounded(value, DTYPE: tl.constexpr, BF16: tl.constexpr):
    """``value`` (finite, or an overflowing +inf) rounded to nearest even in ``DTYPE``."""
    if BF16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        result = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        result = value.to(DTYPE)
    return result


# Reductions go through tl.reduce with Triton's own combine functions: the code tl.sum, tl.max and tl.min
# compile to, and under the interpreter they stay numpy's even where triton was imported before
# TRITON_INTERPRET was set (its standard library's jit functions then cannot run interpreted; so the kernel
# uses tl.full, not tl.zeros).
@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _min(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_min)


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    """IEEE division: float32's ``/`` compiles to an approximation on CUDA, float64's is already exact (and
    ``ieee_rounding`` does not compile for it)."""
    if ACC == tl.float64:
        result = a / b
    else:
        result = tl.fdiv(a, b, ieee_rounding=True)
    return result


@triton.jit
def _finite(value, limit):
    """NaN becomes 0, values beyond +-limit become +-limit (the CPU kernels' store_finite)."""
    value = tl.where(value == value, value, 0.0)
    return tl.minimum(tl.maximum(value, -limit), limit)


@triton.jit
def _resize_tokens(src, s_h, s_w, s_d, dst, t_h, t_w, q, keep, height, width, dim, tile_h, tile_w, span_h, span_w,
                   limit, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, DTYPE: tl.constexpr,
                   BF16: tl.constexpr):
    """Token ``q`` (row-major) of each of BLOCK_J (tile_h, tile_w) area resizes: of frame ``src`` into the
    tile at ``dst``, where ``keep`` (inside its place's crop)."""
    i = q // tile_w
    j = q % tile_w
    h0 = (i * height) // tile_h
    h1 = ((i + 1) * height + tile_h - 1) // tile_h
    w0 = (j * width) // tile_w
    w1 = ((j + 1) * width + tile_w - 1) // tile_w
    rows_in = (h1 - h0).to(ACC)[:, None]
    cols_in = (w1 - w0).to(ACC)[:, None]
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = keep[:, None] & (d < dim)[None, :]
        channels = src[:, None] + d[None, :] * s_d[:, None]
        acc = tl.full([BLOCK_J, BLOCK_D], 0.0, ACC)
        for r in range(0, span_h):  # each window row by row, column by column: ATen's order
            h = h0 + r
            row_mask = mask & (h < h1)[:, None]
            row = channels + (h * s_h)[:, None]
            for c in range(0, span_w):
                w = w0 + c
                acc += tl.load(row + (w * s_w)[:, None], mask=row_mask & (w < w1)[:, None], other=0.0).to(ACC)
        mean = _div(_div(acc, rows_in, ACC), cols_in, ACC)
        tl.store(dst[:, None] + (i * t_h + j * t_w)[:, None] + d[None, :],
                 _rounded(_finite(mean, limit), DTYPE, BF16), mask=mask)


@triton.jit
def _pool_tokens(src, s_h, s_w, s_d, dst, o_h, o_w, q, live, out_w, dim, params, K: tl.constexpr,
                 NORM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
                 ACC: tl.constexpr, DTYPE: tl.constexpr, BF16: tl.constexpr):
    """NSP of window ``q`` (row-major) of each of BLOCK_J frames ``src``, written into output frames ``dst``
    where ``live``."""
    temperature = tl.load(params)
    beta = temperature.to(ACC)
    scale = tl.load(params + 1).to(ACC)
    p = tl.load(params + 2).to(ACC)
    limit = tl.load(params + 3).to(ACC)
    tiny = tl.load(params + 4).to(ACC)
    i = q // out_w
    j = q % out_w
    a = tl.arange(0, BLOCK_W)  # window offset, row-major
    valid = live[:, None] & (a < K * K)[None, :]
    token = src[:, None] + ((i * K)[:, None] + (a // K)[None, :]) * s_h[:, None] \
        + ((j * K)[:, None] + (a % K)[None, :]) * s_w[:, None]  # (BLOCK_J, BLOCK_W) pointers
    s_d = s_d[:, None, None]
    # Pass 1: each token's score.
    if NORM == 0:  # any p: scaled by the token's largest |x_i|, so that no power over- or underflows
        largest = tl.full([BLOCK_J, BLOCK_W], 0.0, ACC)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            inside = valid[:, :, None] & (d < dim)[None, None, :]
            v = tl.load(token[:, :, None] + d[None, None, :] * s_d, mask=inside, other=0.0).to(ACC)
            largest = tl.maximum(largest, _max(tl.abs(v), 2))
        unit = tl.maximum(largest, tiny)
        total = tl.full([BLOCK_J, BLOCK_W], 0.0, ACC)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            inside = valid[:, :, None] & (d < dim)[None, None, :]
            v = tl.load(token[:, :, None] + d[None, None, :] * s_d, mask=inside, other=0.0).to(ACC)
            u = _div(tl.abs(v), unit[:, :, None], ACC)  # in [0, 1]
            total += _sum(tl.where(u > 0, tl.exp(p * tl.log(tl.where(u > 0, u, 1.0))), 0.0), 2)
        mean = tl.where(total > 0, _div(total, dim, ACC), 1.0)  # in [1/D, 1] for a token that is not 0
        score = tl.where(total > 0, unit * tl.exp(_div(tl.log(mean), p, ACC)), 0.0)
    else:
        norm = tl.full([BLOCK_J, BLOCK_W], 0.0, ACC)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            inside = valid[:, :, None] & (d < dim)[None, None, :]
            v = tl.load(token[:, :, None] + d[None, None, :] * s_d, mask=inside, other=0.0).to(ACC)
            if NORM == 1:
                norm += _sum(tl.abs(v), 2)
            else:
                norm += _sum(v * v, 2)
        if NORM == 2:
            if ACC == tl.float64:
                norm = tl.sqrt(norm)  # IEEE in float64
            else:
                norm = tl.sqrt_rn(norm)
        # Rounded to the dtype (+inf past its range), capped at its largest value.
        score = tl.minimum(_rounded(norm, DTYPE, BF16).to(ACC), limit) * scale
    # The softmax over each window, shifted by its largest score (smallest for a negative temperature):
    # every logit is <= 0 and the reference token's is 0.
    top = _max(tl.where(valid, score, -float("inf")), 1)
    bottom = _min(tl.where(valid, score, float("inf")), 1)
    reference = tl.where(live, tl.where(temperature >= 0, top, bottom), 0.0)
    logit = tl.where(valid, (score - reference[:, None]) * beta, -float("inf"))
    weight = tl.exp(logit)
    total = tl.where(live, _sum(weight, 1), 1.0)
    weight = _rounded(_div(weight, total[:, None], ACC), DTYPE, BF16).to(ACC)
    # Pass 2: the weighted sum, rounded once.
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        inside = valid[:, :, None] & (d < dim)[None, None, :]
        v = tl.load(token[:, :, None] + d[None, None, :] * s_d, mask=inside, other=0.0).to(ACC)
        pooled = _sum(weight[:, :, None] * v, 1)
        tl.store(dst[:, None] + (i * o_h + j * o_w)[:, None] + d[None, :],
                 _rounded(_finite(pooled, limit), DTYPE, BF16), mask=live[:, None] & (d < dim)[None, :])


@triton.jit
def stage_level_kernel(
    x_ptr, mosaic_ptr, out_ptr, table_ptr, params_ptr,
    x_sb, x_st, x_sh, x_sw, x_sd,  # input videos (B, T, H, W, D), any strides
    m_sb, m_sm, m_sh, m_sw,  # mosaic buffers (B, M, H, W, D), D contiguous
    o_sb, o_st, o_sh, o_sw,  # output (B, rows, H', W', D), D contiguous
    height, width, dim, out_h, out_w,
    resize_at, resize_tokens, resize_programs, tile_h, tile_w, span_h, span_w,  # this launch's resizes
    pool_at, pool_tokens,  # this launch's pooled rows
    K: tl.constexpr, NORM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr, DTYPE: tl.constexpr, BF16: tl.constexpr,
):
    """One launch (module docstring): programs below ``resize_programs`` take BLOCK_J of the launch's
    ``resize_tokens`` tile tokens each (tile after tile), the others BLOCK_J of its ``pool_tokens``
    output tokens (output frame after output frame); each token finds its step-table row."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < resize_programs:
        g = pid * BLOCK_J + tl.arange(0, BLOCK_J)
        live = g < resize_tokens
        per_item = tile_h * tile_w
        row = table_ptr + (resize_at + g // per_item) * ROW
    else:
        g = (pid - resize_programs) * BLOCK_J + tl.arange(0, BLOCK_J)
        live = g < pool_tokens
        per_item = out_h * out_w
        row = table_ptr + (pool_at + g // per_item) * ROW
    q = g % per_item
    from_input = tl.load(row, mask=live, other=0) != 0
    source = tl.load(row + 1, mask=live, other=0).to(tl.int64)
    src = tl.where(from_input, x_ptr + b * x_sb + source * x_st, mosaic_ptr + b * m_sb + source * m_sm)
    s_h = tl.where(from_input, x_sh, m_sh).to(tl.int64)
    s_w = tl.where(from_input, x_sw, m_sw).to(tl.int64)
    s_d = tl.where(from_input, x_sd, 1).to(tl.int64)
    third = tl.load(row + 2, mask=live, other=0).to(tl.int64)  # the target mosaic, or output row
    if pid < resize_programs:
        top = tl.load(row + 3, mask=live, other=0)
        left = tl.load(row + 4, mask=live, other=0)
        keep = live & (q // tile_w < tl.load(row + 5, mask=live, other=0)) \
            & (q % tile_w < tl.load(row + 6, mask=live, other=0))
        dst = mosaic_ptr + b * m_sb + third * m_sm + top.to(tl.int64) * m_sh + left.to(tl.int64) * m_sw
        limit = tl.load(params_ptr + 3).to(ACC)
        _resize_tokens(src, s_h, s_w, s_d, dst, m_sh, m_sw, q, keep, height, width, dim, tile_h, tile_w, span_h,
                       span_w, limit, BLOCK_J, BLOCK_D, ACC, DTYPE, BF16)
    else:
        dst = out_ptr + b * o_sb + third * o_st
        _pool_tokens(src, s_h, s_w, s_d, dst, o_sh, o_sw, q, live, out_w, dim, params_ptr, K, NORM, BLOCK_J,
                     BLOCK_W, BLOCK_D, ACC, DTYPE, BF16)
