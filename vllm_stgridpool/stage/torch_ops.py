"""The stage as PyTorch ops: a precomputed :class:`~vllm_stgridpool.stage.plan.Plan` run step by step.

Every shape, frame index and tile position comes from the plan as a Python
int, so this module does no host-device synchronisation, runs on the
``meta`` device and compiles with ``torch.compile(fullgraph=True)``. The
stage is memory-bound, like the stock pooling it replaces, so it is one
sweep over the frames: a few frames at a time are pooled (the norm pass and
the weighted sum find them in cache) and the frames the pyramid samples are
resized into mosaic tiles; mosaics live in a few reused buffers, and only
frames whose final value is their own are pooled from the input. The input
is never copied whole nor modified.

This is the backend of every device without kernels of its own, and of CPU calls the fused kernels
(:mod:`~vllm_stgridpool.stage.cpu_kernels`) do not take (float16, norms other than 1 and 2); those kernels
compute the same formulas in the same precisions, and the tests compare the two. It is pure PyTorch: the
other backends are chosen in :func:`vllm_stgridpool.stage.st_gridpool`, once per call, not here.

Numerics, for every value the config accepts: sums run in at least float32
(area sums and the weighted sum are rounded to the features' dtype once); a
token's score is its p-norm, rounded to the features' dtype, over
``D ** (1/p)``; the softmax sees ``temperature * (score - reference)`` with
the window's largest (``temperature >= 0``) or smallest score as reference,
so every logit is <= 0 and the reference token's is exactly 0; the weights
are rounded to the features' dtype. Finite features give finite outputs: a
norm beyond the dtype's range saturates at its largest value, and what an
overflowing area or weighted sum left (+-inf, or NaN where both signs met)
becomes the dtype's largest value and 0.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from vllm_stgridpool.config import STGridPoolConfig
from vllm_stgridpool.stage.plan import Plan, PoolFrames, PoolMosaics, Resize, area_window, plan_for

__all__ = ["run", "apply_plan", "new_output", "norm_pool"]


def run(videos: torch.Tensor, config: STGridPoolConfig, mosaics_only: bool = False) -> torch.Tensor:
    """The whole stage on (B, T, H, W, D) ``videos``: rows as :func:`apply_plan` says."""
    return apply_plan(videos, plan_for(videos, config), config.temperature, config.norm_p, mosaics_only)


def apply_plan(
    videos: torch.Tensor, plan: Plan, temperature: float, norm_p: float, mosaics_only: bool = False
) -> torch.Tensor:
    """Run PTG then NSP on ``videos`` (B, T, H, W, D) following ``plan``'s steps, one video after another.

    (B, T, H', W', D); with ``mosaics_only``, (B, len(plan.replaced), H', W', D): the pooled mosaics alone.
    """
    out = new_output(videos, plan, mosaics_only)
    pool = dict(kernel_size=plan.kernel_size, temperature=temperature, norm_p=norm_p)
    for frames, pooled in zip(videos.unbind(0), out.unbind(0)):
        _run_steps(frames, plan, pooled, pool, mosaics_only)
    return out


def new_output(videos: torch.Tensor, plan: Plan, mosaics_only: bool) -> torch.Tensor:
    """The (B, rows, H', W', D) output a backend writes: every frame, or with ``mosaics_only`` the mosaics."""
    batch, num_frames, _, _, dim = videos.shape
    return videos.new_empty(batch, len(plan.replaced) if mosaics_only else num_frames, *plan.out_grid, dim)


def _run_steps(frames: torch.Tensor, plan: Plan, pooled: torch.Tensor, pool: dict, mosaics_only: bool) -> None:
    """One video's steps, written into ``pooled`` in place (rows as :func:`apply_plan` says)."""
    buffers = frames.new_empty(plan.num_slots, *frames.shape[1:])  # the mosaics being built or read
    mosaics = [buffers[slot] for slot in plan.slots]  # (H, W, D), by mosaic
    for step in plan.steps:
        if isinstance(step, PoolFrames) and not mosaics_only:
            _norm_pool_into(frames[step.start : step.stop], pooled[step.start : step.stop], **pool)
        elif isinstance(step, Resize):
            _resize_into(frames if step.from_input else mosaics, step, mosaics)
        elif isinstance(step, PoolMosaics):
            for mosaic, frame in zip(step.mosaics, step.frames):
                _norm_pool_into(mosaics[mosaic], pooled[plan.pooled_row(frame, mosaics_only)], **pool)


def _resize_into(frames, step: Resize, mosaics: list[torch.Tensor]) -> None:
    """Area-resize ``step``'s source frames (rows of a tensor, or mosaics) into each tile's places."""
    size = step.size
    if isinstance(frames, list):  # one completed mosaic
        frames, rows = frames[step.sources[0]].unsqueeze(0), (0,)
    else:
        rows = step.sources
    slots = [[mosaics[p.mosaic][p.top : p.top + p.rows, p.left : p.left + p.cols] for p in places]
             for places in step.places]
    if tuple(frames.shape[1:3]) == size:  # a one-frame mosaic is the frame itself
        tiles = [frames[row] for row in rows]
    else:
        tiles = _area_tiles(frames, rows, size[0], size[1])
    for tile, places in zip(tiles, slots):
        for slot in places:
            slot.copy_(tile[: slot.shape[0], : slot.shape[1]])


def _area_tiles(frames: torch.Tensor, rows: tuple[int, ...], height: int, width: int) -> list[torch.Tensor]:
    """``frames[rows]`` (each (H, W, D)) resized to (height, width) by area interpolation: (h, w, D) tiles.

    Tiles are never larger than the frame, so the spec's "area when
    shrinking, else bilinear" is area or nothing (bilinear to the same size
    is the identity). Area interpolation is adaptive average pooling, which
    sums in float32 and rounds once to the input dtype on every device.
    One frame viewed channels-last (D innermost) is pooled in place, without
    the copy a strided batch of frames would need. Where the area windows
    are those of a plain average pooling (:func:`plan.area_window`), that
    op computes the same sums and divisions, faster.
    """
    rows_window, cols_window = area_window(frames.shape[1], height), area_window(frames.shape[2], width)
    if rows_window is None or cols_window is None:
        resize = functools.partial(F.adaptive_avg_pool2d, output_size=(height, width))
    else:
        kernel, stride, padding = zip(rows_window, cols_window)
        resize = functools.partial(F.avg_pool2d, kernel_size=kernel, stride=stride, padding=padding,
                                   count_include_pad=False)
    # (N, D, H, W) with D innermost: one frame of it is channels-last, pooled in place.
    channels = frames.permute(0, 3, 1, 2)
    return [resize(channels[row : row + 1])[0].permute(1, 2, 0) for row in rows]


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
    """NSP of ``x`` (..., H, W, D) written into ``out`` (..., H', W', D).

    Written for few op calls (each costs microseconds of dispatch, and a
    video takes some thirty calls): the scores come from one reduction over
    the token grid, and the window offsets from two ``unbind``.
    """
    k = kernel_size
    out_h, out_w = out.shape[-3], out.shape[-2]
    grid = x[..., : out_h * k, : out_w * k, :]  # the tokens that windows cover
    # (..., H', W', k * k): a small copy of the scores, window by window.
    score = _scores(grid, norm_p).unflatten(-1, (out_w, k)).unflatten(-3, (out_h, k)).transpose(-3, -2).flatten(-2)
    reference = score.amax(-1, keepdim=True) if temperature >= 0 else score.amin(-1, keepdim=True)
    logits = score.sub_(reference).mul_(temperature)  # <= 0 (or -inf), 0 at the reference
    compute = torch.promote_types(out.dtype, torch.float32)
    # k * k of (..., H', W', 1): rounded to the features' dtype, held in the sum's (products are then exact).
    weights = torch.softmax(logits, dim=-1).to(x.dtype).to(compute).unsqueeze(-1).unbind(-2)
    # (..., H', W', D) views, one per window offset, row-major; accumulated in place into ``out``.
    rows = grid.unflatten(-2, (out_w, k)).unflatten(-4, (out_h, k)).unbind(-4)
    tokens = [token for row in rows for token in row.unbind(-2)]
    # The sum runs in at least float32 and is rounded once, as in the fused CPU kernel: bfloat16 and
    # float16 accumulate in a float32 scratch.
    total = out if compute == out.dtype else out.new_empty(out.shape, dtype=compute)
    torch.mul(tokens[0], weights[0], out=total)
    for token, weight in zip(tokens[1:], weights[1:]):
        total.addcmul_(token, weight)
    if total is not out:
        out.copy_(total)
    # The weights may sum to 1 + a few ulps, and an area sum in a mosaic may have overflowed:
    # whatever is not finite becomes the dtype's largest value (with its sign), or 0 for NaN.
    limit = torch.finfo(out.dtype).max
    torch.nan_to_num_(out, nan=0.0, posinf=limit, neginf=-limit)


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
