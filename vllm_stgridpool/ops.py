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

Two paths compute the same formulas in the same precisions: on CPU the
fused kernels of :mod:`vllm_stgridpool.native` (NSP reading each window
once, the resize writing straight into the mosaics, the plan's steps walked
in C++, one call per video), elsewhere PyTorch ops
(and on CPU where the kernels cannot be built); the tests run both. On
CUDA the Triton kernels of :mod:`vllm_stgridpool.triton_stage` run the
whole stage in L + 1 launches; :mod:`vllm_stgridpool.backend` chooses. Under
``torch.compile`` the CPU stage and the Triton stage are each one opaque op;
elsewhere the pooling of every frame is left to the compiler (it fuses it
into two passes) and the pyramid with its mosaics' pooling runs as one
opaque op, the eager code.

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

import contextlib
import functools

import torch
import torch.nn.functional as F

from vllm_stgridpool import backend, native, triton_stage
from vllm_stgridpool.config import STGridPoolConfig
from vllm_stgridpool.plan import Plan, PoolFrames, PoolMosaics, Resize, area_window, chunk_frames, make_plan

__all__ = ["st_gridpool", "apply_plan", "norm_pool"]


def st_gridpool(x: torch.Tensor, config: STGridPoolConfig | None = None) -> torch.Tensor:
    """ST-GridPool of (T, H, W, D) or (B, T, H, W, D) features -> (.., T, H', W', D).

    Each video of a batch is pooled on its own: PTG never mixes videos.
    The stage is training-free and computes no gradients, whatever the grad
    mode (vLLM's CPU warm-up runs the model with grad enabled; the stage's
    in-place writes and opaque op have no backward): the output never
    requires grad.
    """
    config = STGridPoolConfig() if config is None else config
    _check_features(x, config)
    batched = x.dim() == 5
    videos = x if batched else x.unsqueeze(0)
    with torch.no_grad():
        chosen = _backend(videos.device.type)  # backend.py: the CPU kernels, Triton or PyTorch ops
        if torch.compiler.is_compiling():
            out = _compiled_stage(videos, config)
        elif chosen == backend.TRITON:
            out = triton_stage.run(videos, config)
        else:
            with _ops_only(chosen):
                out = apply_plan(videos, _eager_plan(videos, config), config.temperature, config.norm_p)
    return out if batched else out.squeeze(0)


def apply_plan(
    videos: torch.Tensor, plan: Plan, temperature: float, norm_p: float, mosaics_only: bool = False
) -> torch.Tensor:
    """Run PTG then NSP on ``videos`` (B, T, H, W, D) following ``plan``'s steps, one video after another.

    (B, T, H', W', D); with ``mosaics_only``, (B, len(plan.replaced), H', W', D): the pooled mosaics alone.
    """
    batch, num_frames, _, _, dim = videos.shape
    out = videos.new_empty(batch, len(plan.replaced) if mosaics_only else num_frames, *plan.out_grid, dim)
    pool = dict(kernel_size=plan.kernel_size, temperature=temperature, norm_p=norm_p)
    for frames, pooled in zip(videos.unbind(0), out.unbind(0)):
        _run_steps(frames, plan, pooled, pool, mosaics_only)
    return out


def _run_steps(frames: torch.Tensor, plan: Plan, pooled: torch.Tensor, pool: dict, mosaics_only: bool) -> None:
    """One video's steps, written into ``pooled`` in place (rows as :func:`apply_plan` says)."""
    buffers = frames.new_empty(plan.num_slots, *frames.shape[1:])  # the mosaics being built or read
    if native.runs_plan(frames, pool["norm_p"]):  # the whole video in one kernel call
        native.run_plan(frames, pooled, buffers, plan, mosaics_only=mosaics_only, **pool)
        return
    mosaics = [buffers[slot] for slot in plan.slots]  # (H, W, D), by mosaic
    for step in plan.steps:
        if isinstance(step, PoolFrames) and not mosaics_only:
            _norm_pool_into(frames[step.start : step.stop], pooled[step.start : step.stop], **pool)
        elif isinstance(step, Resize):
            _resize_into(frames if step.from_input else mosaics, step, mosaics)
        elif isinstance(step, PoolMosaics):
            for mosaic, frame in zip(step.mosaics, step.frames):
                _norm_pool_into(mosaics[mosaic], pooled[plan.pooled_row(frame, mosaics_only)], **pool)


def _compiled_stage(videos: torch.Tensor, config: STGridPoolConfig) -> torch.Tensor:
    """Under ``torch.compile``: the eager stage as one opaque op where the fused CPU kernel applies; elsewhere
    NSP of every frame as code the compiler fuses, then the mosaics' rows.

    The compiler turns NSP into two passes over the features (the fused
    kernel takes one), and it schedules the many small steps of PTG poorly
    (every mosaic held at once, the frames read again long after they left
    the cache), so PTG and the pooling of the mosaics run as the eager code.
    """
    plan_args = (list(config.grid_sizes), list(config.grid_strides), config.kernel_size, config.temperature,
                 config.norm_p)
    if _backend(videos.device.type) == backend.TRITON:  # the whole stage: one opaque op, L + 1 launches
        return triton_stage.triton_stage(videos, *plan_args)
    if _fused_kernel_applies(videos.device.type, videos.dtype):
        return eager_stage(videos, *plan_args, False, videos.shape[1])
    pooled = norm_pool(videos, config.kernel_size, config.temperature, config.norm_p)
    replaced = _replaced_frames(*videos.shape[1:4], config)
    if replaced:
        mosaics = eager_stage(videos, *plan_args, True, len(replaced))
        pooled.index_copy_(1, torch.tensor(replaced, device=videos.device), mosaics)
    return pooled


@torch.compiler.assume_constant_result
def _replaced_frames(num_frames: int, height: int, width: int, config: STGridPoolConfig) -> tuple[int, ...]:
    """The frames whose final value is a mosaic: a constant to ``torch.compile`` (shapes and config only)."""
    return make_plan(num_frames, height, width, config).replaced


@torch.compiler.assume_constant_result
def _fused_kernel_applies(device_type: str, dtype: torch.dtype) -> bool:
    """A constant to ``torch.compile``: whether the eager stage would run on the fused CPU kernels."""
    return backend.for_device(device_type) == backend.CPU_KERNELS and native.applies(device_type, dtype)


@torch.compiler.assume_constant_result
def _backend(device_type: str) -> str:
    """A constant to ``torch.compile``: :func:`backend.for_device`."""
    return backend.for_device(device_type)


def _ops_only(chosen: str):
    """With the ``torch`` backend, the CPU kernels stay out (:func:`native.disabled`) inside the block."""
    return native.disabled() if chosen == backend.TORCH else contextlib.nullcontext()


@torch.library.custom_op("stgridpool::eager_stage", mutates_args=())
def eager_stage(
    videos: torch.Tensor, grid_sizes: list[int], grid_strides: list[int], kernel_size: int, temperature: float,
    norm_p: float, mosaics_only: bool, rows: int,
) -> torch.Tensor:
    """The eager stage on (B, T, H, W, D) ``videos`` as one op: (B, rows, H', W', D), every frame (rows = T)
    or, with ``mosaics_only``, the ``rows`` pooled mosaics that replace frames."""
    config = STGridPoolConfig(grid_sizes=tuple(grid_sizes), grid_strides=tuple(grid_strides), kernel_size=kernel_size)
    plan = _eager_plan(videos, config)  # temperature and norm_p do not change the plan
    with _ops_only(backend.for_device(videos.device.type)):
        return apply_plan(videos, plan, temperature, norm_p, mosaics_only=mosaics_only)


@eager_stage.register_fake
def _(videos, grid_sizes, grid_strides, kernel_size, temperature, norm_p, mosaics_only, rows):
    out_grid = STGridPoolConfig(kernel_size=kernel_size).output_grid(videos.shape[2], videos.shape[3])
    return videos.new_empty(videos.shape[0], rows, *out_grid, videos.shape[-1])


def _eager_plan(videos: torch.Tensor, config: STGridPoolConfig) -> Plan:
    """The plan eager code runs on (B, T, H, W, D) ``videos``: segments of a few frames (cached)."""
    _, num_frames, height, width, dim = videos.shape
    return make_plan(num_frames, height, width, config, chunk_frames(height, width, dim, videos.element_size()))


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
    elif native.resizes(frames):  # straight into the places, no tile in between
        for row, places in zip(rows, slots):
            native.area_resize_into(frames[row], places, *size)
        return
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
    if native.pools(x, out, norm_p):
        native.norm_pool_into(x, out, kernel_size, temperature, norm_p)
        return
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
    if x.shape[-1] == 0:
        raise ValueError(f"st_gridpool expects at least one channel (D >= 1), got shape {tuple(x.shape)}")
    height, width = x.shape[-3], x.shape[-2]
    if height < config.kernel_size or width < config.kernel_size:
        raise ValueError(
            f"token grid {height} x {width} is smaller than kernel_size {config.kernel_size}; "
            f"use kernel_size <= {min(height, width)}"
        )
