"""The ST-GridPool stage: runs a precomputed :class:`~vllm_stgridpool.plan.Plan`.

Every shape, frame index and tile position comes from the plan as a Python
int, so this module does no host-device synchronisation, runs on the
``meta`` device and compiles with ``torch.compile(fullgraph=True)``. The
stage is memory-bound, like the stock pooling it replaces, so it is one
sweep over the frames: a few frames at a time are pooled (the norm pass and
the weighted sum find them in cache) and the frames the pyramid samples are
resized into mosaic tiles; mosaics live in a few reused buffers, and only
frames whose final value is their own are pooled from the input. The input
is never copied whole nor modified.

Numerics, the same on every device and for every value the config accepts:
sums run in at least float32 (PyTorch's reductions and area pooling
accumulate there); a token's score is its p-norm over ``D ** (1/p)``, and the
softmax sees ``temperature * (score - reference)`` with the window's largest
(``temperature >= 0``) or smallest score as reference, so every logit is
<= 0 and the reference token's is exactly 0. Finite features give finite
outputs: a norm or area sum beyond the accumulator's range saturates at the
dtype's largest value (it never turns into inf or NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_stgridpool.config import STGridPoolConfig
from vllm_stgridpool.plan import Complete, Plan, PoolFrames, PoolMosaics, Resize, chunk_frames, make_plan

__all__ = ["st_gridpool", "apply_plan", "norm_pool"]


def st_gridpool(x: torch.Tensor, config: STGridPoolConfig | None = None) -> torch.Tensor:
    """ST-GridPool of (T, H, W, D) or (B, T, H, W, D) features -> (.., T, H', W', D).

    Each video of a batch is pooled on its own: PTG never mixes videos.
    """
    config = STGridPoolConfig() if config is None else config
    _check_features(x, config)
    batched = x.dim() == 5
    videos = x if batched else x.unsqueeze(0)
    _, num_frames, height, width, dim = videos.shape
    # Eager: a few frames per segment, so each segment's passes find it in cache.
    # Compiled: one segment, so the graph stays small (the compiler fuses the passes).
    eager = not torch.compiler.is_compiling()
    chunk = chunk_frames(height, width, dim, videos.element_size()) if eager else num_frames
    plan = _constant_plan(num_frames, height, width, config, chunk)
    out = apply_plan(videos, plan, config.temperature, config.norm_p)
    return out if batched else out.squeeze(0)


@torch.compiler.assume_constant_result
def _constant_plan(num_frames: int, height: int, width: int, config: STGridPoolConfig, chunk: int) -> Plan:
    """The plan, seen by ``torch.compile`` as a constant (it depends on shapes and config only)."""
    return make_plan(num_frames, height, width, config, chunk)


def apply_plan(videos: torch.Tensor, plan: Plan, temperature: float, norm_p: float) -> torch.Tensor:
    """Run PTG then NSP on ``videos`` (B, T, H, W, D) following ``plan``'s steps, one video after another."""
    batch, num_frames, height, width, dim = videos.shape
    # Eager code writes into the output in place; compiled code gets each video's output
    # as a fresh tensor, which the compiler fuses better than writes into views.
    out = None if torch.compiler.is_compiling() else videos.new_empty(batch, num_frames, *plan.out_grid, dim)
    pool = dict(kernel_size=plan.kernel_size, temperature=temperature, norm_p=norm_p)
    free: list[torch.Tensor] = []  # buffers of consumed mosaics, reused for later ones
    results = []
    for index, frames in enumerate(videos.unbind(0)):
        pooled = None if out is None else out[index]
        mosaics: dict[int, torch.Tensor] = {}  # (H, W, D) buffer of each mosaic being built or read
        for step in plan.steps:
            if isinstance(step, PoolFrames) and pooled is None:  # compiled: the whole video, one step
                pooled = norm_pool(frames, **pool)
            elif isinstance(step, PoolFrames):
                _norm_pool_into(frames[step.start : step.stop], pooled[step.start : step.stop], **pool)
            elif isinstance(step, Resize):
                for place in (place for places in step.places for place in places):
                    if place.mosaic not in mosaics:  # its first tile: take a buffer
                        mosaics[place.mosaic] = free.pop() if free else frames.new_empty(height, width, dim)
                _resize_into(frames if step.from_input else mosaics, step, mosaics)
            elif isinstance(step, Complete):
                _saturate(mosaics[step.mosaic])
            elif isinstance(step, PoolMosaics) and len(step.mosaics) == 1:
                _norm_pool_into(mosaics[step.mosaics[0]], pooled[step.frames[0]], **pool)
            elif isinstance(step, PoolMosaics):
                _put(pooled, step.frames, norm_pool(torch.stack([mosaics[m] for m in step.mosaics]), **pool))
            else:
                free.extend(mosaics.pop(mosaic) for mosaic in step.mosaics)
        results.append(pooled)
    return out if out is not None else torch.stack(results)


def _resize_into(frames, step: Resize, mosaics: dict[int, torch.Tensor]) -> None:
    """Area-resize ``step``'s source frames (rows of a tensor, or mosaics) and copy each tile into its places."""
    size = step.size
    if isinstance(frames, dict):  # one completed mosaic
        frames, rows = frames[step.sources[0]].unsqueeze(0), (0,)
    else:
        rows = step.sources
    if tuple(frames.shape[1:3]) == size:  # a one-frame mosaic is the frame itself
        tiles = [frames[row] for row in rows]
    else:
        tiles = area_tiles(frames, list(rows), size[0], size[1])
    for tile, places in zip(tiles, step.places):
        for p in places:
            mosaics[p.mosaic][p.top : p.top + p.rows, p.left : p.left + p.cols].copy_(tile[: p.rows, : p.cols])


@torch.library.custom_op("stgridpool::area_tiles", mutates_args=())
def area_tiles(frames: torch.Tensor, rows: list[int], height: int, width: int) -> list[torch.Tensor]:
    """``frames[rows]`` (each (H, W, D)) resized to (height, width) by area interpolation: (h, w, D) tiles.

    Tiles are never larger than the frame, so the spec's "area when
    shrinking, else bilinear" is area or nothing (bilinear to the same size
    is the identity). Area interpolation is adaptive average pooling, which
    sums in float32 and rounds once to the input dtype on every device.
    One frame viewed channels-last (D innermost) is pooled in place, without
    the copy a strided batch of frames would need. An
    opaque op, so compiled code runs this kernel rather than a generated one
    (several times slower in bfloat16).
    """
    return [
        F.adaptive_avg_pool2d(frames[row].unsqueeze(0).permute(0, 3, 1, 2), (height, width))[0].permute(1, 2, 0)
        for row in rows  # (1, D, H, W) with D innermost: channels-last, pooled in place
    ]


@area_tiles.register_fake
def _(frames: torch.Tensor, rows: list[int], height: int, width: int) -> list[torch.Tensor]:
    return [frames.new_empty(height, width, frames.shape[-1]) for _ in rows]


def _saturate(mosaic: torch.Tensor) -> None:
    """Make a mosaic finite in place: an area sum beyond the accumulator's range saturates.

    Only features within 1/(window area) of the dtype's largest value
    overflow a window sum (27 -> 14 windows hold up to 9 tokens): the sum
    becomes +-inf, or NaN where overflows of both signs meet. Those become
    the dtype's largest value (with the sign) and 0; every other value is
    untouched.
    """
    limit = torch.finfo(mosaic.dtype).max
    torch.nan_to_num_(mosaic, nan=0.0, posinf=limit, neginf=-limit)


def _take(frames: torch.Tensor, rows: tuple[int, ...]) -> torch.Tensor:
    """``frames[rows]``: a strided view when the rows are evenly spaced, else a gather."""
    step = rows[1] - rows[0] if len(rows) > 1 else 1
    if step > 0 and all(b - a == step for a, b in zip(rows, rows[1:])):
        return frames[rows[0] : rows[-1] + 1 : step]
    return frames.index_select(0, torch.tensor(rows, device=frames.device))


def _put(out: torch.Tensor, rows: tuple[int, ...], values: torch.Tensor) -> None:
    """``out[rows] = values``, in place (compiled code writes these rows only, not a copy of ``out``)."""
    out.index_put_((torch.tensor(rows, device=out.device),), values)


def norm_pool(x: torch.Tensor, kernel_size: int, temperature: float, norm_p: float) -> torch.Tensor:
    """NSP: each k x k window (stride k, floor) of (..., H, W, D) ``x`` -> one softmax-weighted token."""
    height, width, dim = x.shape[-3:]
    k = kernel_size
    out = x.new_empty(*x.shape[:-3], (height - k) // k + 1, (width - k) // k + 1, dim)
    _norm_pool_into(x, out, k, temperature, norm_p)
    return out


def _norm_pool_into(
    x: torch.Tensor, out: torch.Tensor, kernel_size: int, temperature: float, norm_p: float
) -> None:
    """NSP of ``x`` (..., H, W, D) written into ``out`` (..., H', W', D)."""
    k = kernel_size
    out_h, out_w = out.shape[-3], out.shape[-2]
    x = x[..., : out_h * k, : out_w * k, :]
    score = _scores(x, norm_p)
    lead = score.shape[:-2]
    windows = score.reshape(*lead, out_h, k, out_w, k).transpose(-3, -2).reshape(*lead, out_h, out_w, k * k)
    reference = windows.amax(-1, keepdim=True) if temperature >= 0 else windows.amin(-1, keepdim=True)
    logits = (windows - reference).mul_(temperature)  # <= 0 (or -inf), 0 at the reference
    weights = torch.softmax(logits, dim=-1).to(x.dtype)
    # One strided view per window offset, accumulated in place into ``out``.
    torch.mul(x[..., 0::k, 0::k, :], weights[..., 0, None], out=out)
    for j in range(1, k * k):
        a, b = divmod(j, k)
        out.addcmul_(x[..., a::k, b::k, :], weights[..., j, None])
    limit = torch.finfo(out.dtype).max
    out.clamp_(-limit, limit)  # weights may sum to 1 + a few ulps: a window at the dtype's max stays finite


def _scores(x: torch.Tensor, norm_p: float) -> torch.Tensor:
    """Each token's ``||x||_p / D ** (1/p)`` in at least float32, finite and >= 0 for finite ``x``.

    p = 1 and p = 2 take one pass: the plain norm, accumulated in float32
    (float64 for float64 input) and saturating at the input dtype's largest
    value, which only norms beyond it (1.8e19 for float32 and bfloat16
    sums of squares, 65504 for float16) ever reach. Other p raise the features
    to the power p, which would overflow or underflow for ordinary values,
    so they scale each token by its largest |x_i| first:
    ``a * mean(|x / a| ** p) ** (1/p)`` with every term in [0, 1].
    """
    dim = x.shape[-1]
    compute = torch.promote_types(x.dtype, torch.float32)
    if norm_p in (1.0, 2.0):
        norm = torch.linalg.vector_norm(x, ord=norm_p, dim=-1).to(compute)
        return norm.clamp_(max=torch.finfo(x.dtype).max).mul_(dim ** (-1.0 / norm_p))
    largest = torch.maximum(x.amax(-1), x.amin(-1).neg()).to(compute)
    scale = largest.clamp_(min=torch.finfo(compute).tiny)
    unit = x.to(compute, copy=True).div_(scale[..., None])  # |unit| <= 1
    if norm_p >= 1:  # sum of |unit| ** p is in [1, D]: its p-th root cannot overflow
        mean_norm = torch.linalg.vector_norm(unit, ord=norm_p, dim=-1).mul_(dim ** (-1.0 / norm_p))
    else:  # D ** (1/p) can overflow: take the mean, in [1/D, 1], before the root
        mean_norm = unit.abs_().pow_(norm_p).mean(-1).pow_(1.0 / norm_p)
    return mean_norm.mul_(scale)


def _check_features(x: torch.Tensor, config: STGridPoolConfig) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"st_gridpool expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (4, 5):
        raise ValueError(
            f"st_gridpool expects features of 4 dims (T, H, W, D) or 5 dims "
            f"(B, T, H, W, D), got {x.dim()} dims with shape {tuple(x.shape)}"
        )
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"st_gridpool expects a floating dtype (float32, bfloat16, float16, float64), got {x.dtype}"
        )
    height, width = x.shape[-3], x.shape[-2]
    if height < config.kernel_size or width < config.kernel_size:
        raise ValueError(
            f"token grid {height} x {width} is smaller than kernel_size {config.kernel_size}; "
            f"use kernel_size <= {min(height, width)}"
        )
