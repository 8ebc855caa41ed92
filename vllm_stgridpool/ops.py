"""The ST-GridPool stage: moves values along a precomputed :class:`~vllm_stgridpool.plan.Plan`.

Every shape, frame index and tile position comes from the plan as a Python
int, so this module does no host-device synchronisation, runs on the
``meta`` device and compiles with ``torch.compile(fullgraph=True)``. Two
choices keep its cost down (it is memory-bound, like the stock pooling):

- PTG reads the frames a level samples through strided views where it can,
  and builds all of a level's mosaics with one resize and one tiling copy;
  the input is never copied whole (nor modified).
- NSP pools every input frame once, then overwrites the few frames whose
  final value is a mosaic with the pooled mosaics.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from vllm_stgridpool.config import STGridPoolConfig
from vllm_stgridpool.plan import INPUT, Plan, make_plan

__all__ = ["st_gridpool", "apply_plan", "norm_pool"]


def st_gridpool(x: torch.Tensor, config: STGridPoolConfig | None = None) -> torch.Tensor:
    """ST-GridPool of (T, H, W, D) or (B, T, H, W, D) features -> (.., T, H', W', D).

    Each video of a batch is pooled on its own: PTG never mixes videos.
    """
    config = STGridPoolConfig() if config is None else config
    _check_features(x, config)
    batched = x.dim() == 5
    videos = x if batched else x.unsqueeze(0)
    _, num_frames, height, width, _ = videos.shape
    plan = _constant_plan(num_frames, height, width, config)
    out = apply_plan(videos, plan, config.temperature, config.norm_p)
    return out if batched else out.squeeze(0)


@torch.compiler.assume_constant_result
def _constant_plan(num_frames: int, height: int, width: int, config: STGridPoolConfig) -> Plan:
    """The plan, seen by ``torch.compile`` as a constant (it depends on shapes and config only)."""
    return make_plan(num_frames, height, width, config)


def apply_plan(videos: torch.Tensor, plan: Plan, temperature: float, norm_p: float) -> torch.Tensor:
    """Run PTG then NSP on ``videos`` (B, T, H, W, D) following ``plan``."""
    out = norm_pool(videos, plan.kernel_size, temperature, norm_p)
    if not plan.levels:
        return out
    stores = _build_mosaics(videos, plan)
    final = _read(stores, plan.final_reads, videos.device)
    pooled = norm_pool(final, plan.kernel_size, temperature, norm_p)
    return out.index_copy_(1, _index(plan.replaced, videos.device), pooled)


def _build_mosaics(videos: torch.Tensor, plan: Plan) -> dict[int, torch.Tensor]:
    """The frame stores: the input (``INPUT``) and each level's (B, chunks, H, W, D) mosaics.

    A level reads the frames it samples as they were before it wrote
    anything (neither the input nor an earlier level's mosaics is ever
    modified), resizes each store's share in one call, and tiles all of its
    mosaics in one copy: a handful of large kernels rather than many small ones.
    """
    batch, _, height, width, dim = videos.shape
    stores = {INPUT: videos}
    for number, level in enumerate(plan.levels):
        tile_h, tile_w = level.tile
        parts = [
            _resize(_take(stores[store], rows, videos.device), tile_h, tile_w)
            for store, rows in level.reads
        ]
        tiles = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if level.order is not None:
            tiles = tiles.index_select(1, _index(level.order, videos.device))
        grid = tiles.reshape(batch, level.chunks, level.rows, level.cols, tile_h, tile_w, dim)
        mosaics = grid.permute(0, 1, 2, 4, 3, 5, 6).reshape(
            batch, level.chunks, level.rows * tile_h, level.cols * tile_w, dim
        )
        stores[number] = mosaics[:, :, :height, :width]
    return stores


def _read(stores: dict[int, torch.Tensor], reads, device: torch.device) -> torch.Tensor:
    parts = [_take(stores[store], rows, device) for store, rows in reads]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _take(frames: torch.Tensor, rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``frames[:, rows]``: a strided slice when the rows are evenly spaced (the usual case), else a gather."""
    step = rows[1] - rows[0] if len(rows) > 1 else 1
    if step > 0 and all(b - a == step for a, b in zip(rows, rows[1:])):
        return frames[:, rows[0] : rows[-1] + 1 : step]
    return frames.index_select(1, _index(rows, device))


def _resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, H, W, D) -> (B, N, h, w, D) by area interpolation.

    Tiles are never larger than the frame, so the spec's "area when
    shrinking, else bilinear" is area or nothing (bilinear to the same size
    is the identity). Area interpolation is adaptive average pooling, a
    linear map per axis, applied as two matrix products: they read strided
    frames in place, where ``F.interpolate`` would first copy them. CPUs
    without native bfloat16/float16 matrix units run those products slower
    than the copy, so reduced precision on the CPU takes ``F.interpolate``,
    and so does ``torch.compile``, which fuses the copy away.
    """
    batch, count, in_h, in_w, dim = frames.shape
    if (in_h, in_w) == (height, width):
        return frames
    slow_matmul = frames.device.type == "cpu" and frames.dtype not in (torch.float32, torch.float64)
    if slow_matmul or torch.compiler.is_compiling():
        flat = frames.reshape(batch * count, in_h, in_w, dim).permute(0, 3, 1, 2)  # channels-last view
        resized = F.interpolate(flat, size=(height, width), mode="area").permute(0, 2, 3, 1)
        return resized.reshape(batch, count, height, width, dim)
    rows = _area_matrix(in_h, height, frames.dtype, frames.device)
    cols = _area_matrix(in_w, width, frames.dtype, frames.device)
    pooled_rows = torch.matmul(rows, frames.flatten(-2)).unflatten(-1, (in_w, dim))
    return torch.matmul(cols, pooled_rows)


def _area_matrix(size: int, out_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _constant(_area_rows(size, out_size), dtype, device)


@functools.lru_cache(maxsize=256)
def _area_rows(size: int, out_size: int) -> tuple[tuple[float, ...], ...]:
    """(out_size, size) matrix of adaptive average pooling: row i averages [floor(i*n/m), ceil((i+1)*n/m))."""
    rows = []
    for i in range(out_size):
        start, end = (i * size) // out_size, -(-(i + 1) * size // out_size)
        rows.append(tuple(1.0 / (end - start) if start <= j < end else 0.0 for j in range(size)))
    return tuple(rows)


def _index(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return _constant(values, torch.int64, device)


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` (a plan-derived tuple) as a tensor on ``device``.

    Cached in eager mode so that steady-state calls copy nothing from the
    host; under ``torch.compile`` it becomes a graph constant.
    """
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    key = (values, dtype, device)
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        if len(_CONSTANTS) >= 4096:
            _CONSTANTS.clear()
        tensor = _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return tensor


def norm_pool(x: torch.Tensor, kernel_size: int, temperature: float, norm_p: float) -> torch.Tensor:
    """NSP: each k x k window (stride k, floor) -> one token, softmax(temperature * norm score) weighted.

    ``x`` is (..., H, W, D). The softmax runs in at least float32. For bfloat16
    and float16 inputs the norms are reduced by PyTorch with float accumulation
    and the weighted sum runs in the input dtype: converting the features
    themselves to float32 would cost more than the whole stock pooling.
    """
    k = kernel_size
    height, width, dim = x.shape[-3:]
    out_h, out_w = (height - k) // k + 1, (width - k) // k + 1
    x = x[..., : out_h * k, : out_w * k, :]
    weight_dtype = torch.promote_types(x.dtype, torch.float32)
    score = torch.linalg.vector_norm(x, ord=norm_p, dim=-1).to(weight_dtype)
    score = score * (temperature / float(dim) ** (1.0 / norm_p))
    lead = score.shape[:-2]
    windows = score.reshape(*lead, out_h, k, out_w, k).transpose(-3, -2)
    weights = torch.softmax(windows.reshape(*lead, out_h, out_w, k * k), dim=-1).to(x.dtype)
    # One strided view per window offset, accumulated in place: no k*k-sized
    # intermediate is ever allocated.
    out = x[..., 0::k, 0::k, :] * weights[..., 0, None]
    for j in range(1, k * k):
        a, b = divmod(j, k)
        out = out.addcmul_(x[..., a::k, b::k, :], weights[..., j, None])
    return out


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
