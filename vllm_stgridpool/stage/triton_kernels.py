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
is the grid's second axis.

Variants: only the constexprs make one (the norm's kind, the block sizes, ``VEC``, the dtypes). Every
int argument, the kernel size among them, is one Triton never specialises on (:data:`RUNTIME_INTS`), and
the float parameters travel as the two int32 halves of their float64 bits (Triton passes Python floats as
float32), so a new shape, frame count, pyramid, kernel size, temperature or p never compiles a new variant
and copies nothing to the device. ``VEC`` > 1 (elements per 16 bytes) says the launcher checked that the
input's channels are innermost, its strides and D multiples of ``VEC`` and its address 16-byte aligned:
the kernel then tells the compiler so (``tl.multiple_of`` on the pointers, channel masks whole ``VEC``
groups), which is what lets the feature loads and stores be 128-bit vectors.

Numerics (the CPU kernels' formulas, ``csrc/``): area sums in float32 (float64 for float64) added row by
row in window order and divided by the window's height then width (area interpolation's bits); a score is
the p-norm rounded to the dtype, capped at its largest value, times ``D ** (-1/p)`` (other p:
``a * mean(|x / a| ** p) ** (1/p)`` with ``a`` the token's largest ``|x_i|``, as the PyTorch-ops path);
the softmax sees ``temperature * (score - reference)``; the weights are rounded to the dtype; sums are
rounded once, NaN becomes 0 and values beyond the dtype's range its largest value. Rounding to bfloat16 is
done on the bits (round to nearest even), so the interpreter, whose own conversion truncates, rounds as a
GPU does. On CUDA every float32 operation is an IEEE-rounded one, as under the interpreter: division is
``div_rn``, square root ``sqrt_rn``, the launcher turns FMA contraction off, and the softmax (its logits,
``exp``, sum and division) and each score's final root run in float64, rounded once to float32. The one
place that uses CUDA's fast approximations is the per-channel power ``u ** p`` of norms other than 1 and 2
in float32 (``ex2.approx`` / ``lg2.approx``: scores, compared and fed to the softmax, never summed into a
mosaic).
"""

from __future__ import annotations

import triton
import triton.language as tl

ROW: tl.constexpr = tl.constexpr(8)  # int32 columns per step-table row

# Arguments whose value changes with the shape, the pyramid, the kernel size or the request: Triton would
# otherwise compile a variant for each value equal to 1 and for each multiple of 16.
RUNTIME_INTS = (
    "x_sb", "x_st", "x_sh", "x_sw", "x_sd", "m_sb", "m_sm", "m_sh", "m_sw", "o_sb", "o_st", "o_sh", "o_sw",
    "height", "width", "dim", "out_h", "out_w", "kernel_size",
    "resize_at", "resize_tokens", "resize_programs", "tile_h", "tile_w", "span_h", "span_w", "pool_at",
    "pool_tokens", "temperature_hi", "temperature_lo", "norm_p_hi", "norm_p_lo", "scale_hi", "scale_lo",
)


@triton.jit
def _float64(high, low):
    """The float64 whose bits are ``high`` (upper 32) and ``low`` (lower 32), int32 kernel arguments."""
    bits = (high.to(tl.int64) << 32) | (low.to(tl.int64) & 0xFFFFFFFF)
    return bits.to(tl.float64, bitcast=True)


@triton.jit
def _rounded(value, DTYPE: tl.constexpr, BF16: tl.constexpr):
    """``value`` (float32 or float64; finite, or an overflowing +inf) rounded to nearest even in ``DTYPE``."""
    if BF16:
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
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
    """IEEE division of two floats: float32's ``/`` is an approximation on CUDA (``div.full``, as is
    ``tl.fdiv(..., ieee_rounding=True)`` before Triton 3.8), float64's is already exact."""
    if ACC == tl.float64:
        result = a / b
    else:
        result = tl.math.div_rn(a, b)
    return result


@triton.jit
def _finite(value, LIMIT: tl.constexpr):
    """NaN becomes 0, values beyond +-LIMIT become +-LIMIT (the CPU kernels' store_finite)."""
    value = tl.where(value == value, value, 0.0)
    return tl.minimum(tl.maximum(value, -LIMIT), LIMIT)


@triton.jit
def _aligned(base, offsets, VEC: tl.constexpr):
    """The 2-D pointers ``base + offsets``, told 16-byte aligned where the launcher checked it (VEC > 1).
    (The hint must be set where the pointers are computed: on a function argument it would be lost.)"""
    pointers = base + offsets
    if VEC > 1:
        pointers = tl.multiple_of(pointers, [16, 16])
    return pointers


@triton.jit
def _channels(d, dim, VEC: tl.constexpr):
    """Which of channels ``d`` exist, decided per group of VEC (D is a multiple of VEC): a mask a vector
    load or store can take whole."""
    return (d // VEC) < (dim // VEC)


@triton.jit
def _resize_tokens(src, s_h, s_w, s_d, dst, t_h, t_w, q, keep, height, width, dim, tile_h, tile_w, span_h, span_w,
                   LIMIT: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, VEC: tl.constexpr,
                   ACC: tl.constexpr, DTYPE: tl.constexpr, BF16: tl.constexpr):
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
    target = (dst + i * t_h + j * t_w)[:, None]
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = keep[:, None] & _channels(d, dim, VEC)[None, :]
        acc = tl.full([BLOCK_J, BLOCK_D], 0.0, ACC)
        for r in range(0, span_h):  # each window row by row, column by column: ATen's order
            h = h0 + r
            for c in range(0, span_w):
                w = w0 + c
                token = _aligned((src + h * s_h + w * s_w)[:, None], d[None, :] * s_d[:, None], VEC)
                acc += tl.load(token, mask=mask & ((h < h1) & (w < w1))[:, None], other=0.0).to(ACC)
        mean = _div(_div(acc, rows_in, ACC), cols_in, ACC)
        tl.store(_aligned(target, d[None, :], VEC), _rounded(_finite(mean, LIMIT), DTYPE, BF16), mask=mask)


@triton.jit
def _pool_tokens(src, s_h, s_w, s_d, dst, o_h, o_w, q, live, out_w, dim, kernel_size, beta, p, scale,
                 NORM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
                 VEC: tl.constexpr, ACC: tl.constexpr, DTYPE: tl.constexpr, BF16: tl.constexpr,
                 LIMIT: tl.constexpr, TINY: tl.constexpr):
    """NSP of window ``q`` (row-major) of each of BLOCK_J frames ``src``, written into output frames ``dst``
    where ``live``; ``beta`` (the temperature) and ``p`` are float64, ``scale`` ``D ** (-1/p)`` in ACC."""
    i = q // out_w
    j = q % out_w
    a = tl.arange(0, BLOCK_W)  # window offset, row-major
    valid = live[:, None] & (a < kernel_size * kernel_size)[None, :]
    token = _aligned(src[:, None], ((i * kernel_size)[:, None] + (a // kernel_size)[None, :]) * s_h[:, None]
                     + ((j * kernel_size)[:, None] + (a % kernel_size)[None, :]) * s_w[:, None], VEC)
    s_d = s_d[:, None, None]
    # Pass 1: each token's score.
    if NORM == 0:  # any p: scaled by the token's largest |x_i|, so that no power over- or underflows
        largest = tl.full([BLOCK_J, BLOCK_W], 0.0, ACC)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            inside = valid[:, :, None] & _channels(d, dim, VEC)[None, None, :]
            v = tl.load(token[:, :, None] + d[None, None, :] * s_d, mask=inside, other=0.0).to(ACC)
            largest = tl.maximum(largest, _max(tl.abs(v), 2))
        unit = tl.maximum(largest, TINY)
        p_acc = p.to(ACC)
        total = tl.full([BLOCK_J, BLOCK_W], 0.0, ACC)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            inside = valid[:, :, None] & _channels(d, dim, VEC)[None, None, :]
            v = tl.load(token[:, :, None] + d[None, None, :] * s_d, mask=inside, other=0.0).to(ACC)
            u = _div(tl.abs(v), unit[:, :, None], ACC)  # in [0, 1]
            total += _sum(tl.where(u > 0, tl.exp2(p_acc * tl.log2(tl.where(u > 0, u, 1.0))), 0.0), 2)
        mean = tl.where(total > 0, _div(total, dim.to(ACC), ACC), 1.0).to(tl.float64)  # in [1/D, 1]
        score = tl.where(total > 0, unit * tl.exp2(tl.log2(mean) / p).to(ACC), 0.0)
    else:
        norm = tl.full([BLOCK_J, BLOCK_W], 0.0, ACC)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            inside = valid[:, :, None] & _channels(d, dim, VEC)[None, None, :]
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
        score = tl.minimum(_rounded(norm, DTYPE, BF16).to(ACC), LIMIT) * scale
    # The softmax over each window, shifted by its largest score (smallest for a negative temperature):
    # every logit is <= 0 and the reference token's is 0. In float64: exact logits, no fast exp.
    top = _max(tl.where(valid, score, -float("inf")), 1)
    bottom = _min(tl.where(valid, score, float("inf")), 1)
    reference = tl.where(live, tl.where(beta >= 0, top, bottom), 0.0).to(tl.float64)
    logit = tl.where(valid, (score.to(tl.float64) - reference[:, None]) * beta, -float("inf"))
    weight = tl.exp(logit)
    total = tl.where(live, _sum(weight, 1), 1.0)
    weight = _rounded((weight / total[:, None]).to(ACC), DTYPE, BF16).to(ACC)
    # Pass 2: the weighted sum, rounded once.
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        channels = _channels(d, dim, VEC)
        inside = valid[:, :, None] & channels[None, None, :]
        v = tl.load(token[:, :, None] + d[None, None, :] * s_d, mask=inside, other=0.0).to(ACC)
        pooled = _sum(weight[:, :, None] * v, 1)
        target = _aligned((dst + i * o_h + j * o_w)[:, None], d[None, :], VEC)
        tl.store(target, _rounded(_finite(pooled, LIMIT), DTYPE, BF16), mask=live[:, None] & channels[None, :])


@triton.jit(do_not_specialize=RUNTIME_INTS, do_not_specialize_on_alignment=["x_ptr"])
def stage_level_kernel(
    x_ptr, mosaic_ptr, out_ptr, table_ptr,
    x_sb, x_st, x_sh, x_sw, x_sd,  # input videos (B, T, H, W, D), any strides
    m_sb, m_sm, m_sh, m_sw,  # mosaic buffers (B, M, H, W, D), D contiguous
    o_sb, o_st, o_sh, o_sw,  # output (B, rows, H', W', D), D contiguous
    height, width, dim, out_h, out_w, kernel_size,
    resize_at, resize_tokens, resize_programs, tile_h, tile_w, span_h, span_w,  # this launch's resizes
    pool_at, pool_tokens,  # this launch's pooled rows
    temperature_hi, temperature_lo, norm_p_hi, norm_p_lo, scale_hi, scale_lo,  # float64 bits (_float64)
    NORM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, VEC: tl.constexpr,
    ACC: tl.constexpr, DTYPE: tl.constexpr, BF16: tl.constexpr, LIMIT: tl.constexpr, TINY: tl.constexpr,
):
    """One launch (module docstring): programs below ``resize_programs`` take BLOCK_J of the launch's
    ``resize_tokens`` tile tokens each (tile after tile), the others BLOCK_J of its ``pool_tokens``
    output tokens (output frame after output frame); each token finds its step-table row. NORM is 1, 2 or
    0 (any other p); LIMIT is the dtype's largest value, TINY the smallest normal of ACC."""
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
    if VEC > 1:  # the input's channels are innermost, as the mosaics'
        s_d = tl.full([BLOCK_J], 1, tl.int64)
    else:
        s_d = tl.where(from_input, x_sd, 1).to(tl.int64)
    third = tl.load(row + 2, mask=live, other=0).to(tl.int64)  # the target mosaic, or output row
    if pid < resize_programs:
        top = tl.load(row + 3, mask=live, other=0)
        left = tl.load(row + 4, mask=live, other=0)
        keep = live & (q // tile_w < tl.load(row + 5, mask=live, other=0)) \
            & (q % tile_w < tl.load(row + 6, mask=live, other=0))
        dst = mosaic_ptr + b * m_sb + third * m_sm + top.to(tl.int64) * m_sh + left.to(tl.int64) * m_sw
        _resize_tokens(src, s_h, s_w, s_d, dst, m_sh, m_sw, q, keep, height, width, dim, tile_h, tile_w, span_h,
                       span_w, LIMIT, BLOCK_J, BLOCK_D, VEC, ACC, DTYPE, BF16)
    else:
        dst = out_ptr + b * o_sb + third * o_st
        beta = _float64(temperature_hi, temperature_lo)
        p = _float64(norm_p_hi, norm_p_lo)
        scale = _float64(scale_hi, scale_lo).to(ACC)
        _pool_tokens(src, s_h, s_w, s_d, dst, o_sh, o_sw, q, live, out_w, dim, kernel_size, beta, p, scale, NORM,
                     BLOCK_J, BLOCK_W, BLOCK_D, VEC, ACC, DTYPE, BF16, LIMIT, TINY)
