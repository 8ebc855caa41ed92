"""The ST-GridPool stage: moves values along a precomputed :class:`~vllm_stgridpool.plan.Plan`.

Every shape and every gather index comes from the plan, so this module does
no host-device synchronisation, runs on the ``meta`` device and compiles
with ``torch.compile(fullgraph=True)``. Two choices keep it close to the cost
of vLLM's stock bilinear pooling:

- PTG only materialises the frames a level samples and the mosaics it
  builds; the input is never copied whole (nor modified).
- NSP pools every input frame once, then overwrites the few frames whose
  final value is a mosaic with the pooled mosaics.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F

from vllm_stgridpool.config import STGridPoolConfig
from vllm_stgridpool.plan import FrameSource, LevelPlan, Plan, make_plan

Rows = TypeVar("Rows")

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
    batch, num_frames, height, width, dim = videos.shape
    out = norm_pool(videos, plan.kernel_size, temperature, norm_p)
    if not plan.levels:
        return out
    index = _plan_indices(plan, batch, videos.device)
    frames = videos.reshape(batch * num_frames, height, width, dim)
    mosaics: list[torch.Tensor] = []
    for level, level_index in zip(plan.levels, index.levels):
        mosaics.append(_tile(_gather(frames, mosaics, level_index), level, height, width))
    out = out.reshape(batch * num_frames, *out.shape[2:])
    for level_mosaics, final_index in zip(mosaics, index.final):
        if final_index is not None:
            rows, targets = final_index
            final = level_mosaics[rows]
            out.index_copy_(0, targets, norm_pool(final, plan.kernel_size, temperature, norm_p))
    return out.reshape(batch, num_frames, *out.shape[1:])


def norm_pool(x: torch.Tensor, kernel_size: int, temperature: float, norm_p: float) -> torch.Tensor:
    """NSP: each k x k window (stride k, floor) -> one token, softmax(temperature * norm score) weighted.

    ``x`` is (..., H, W, D). Scores and weights are computed in at least float32;
    the output keeps the input dtype.
    """
    k = kernel_size
    height, width, dim = x.shape[-3:]
    out_h, out_w = (height - k) // k + 1, (width - k) // k + 1
    x = x[..., : out_h * k, : out_w * k, :]
    weight_dtype = torch.promote_types(x.dtype, torch.float32)
    score = torch.linalg.vector_norm(x, ord=norm_p, dim=-1, dtype=weight_dtype)
    score = score * (temperature / float(dim) ** (1.0 / norm_p))
    lead = score.shape[:-2]
    windows = score.reshape(*lead, out_h, k, out_w, k).transpose(-3, -2)
    weights = torch.softmax(windows.reshape(*lead, out_h, out_w, k * k), dim=-1)
    # One strided view per window offset, accumulated in place: no k*k-sized
    # intermediate is ever allocated.
    out = x[..., 0::k, 0::k, :] * weights[..., 0, None]
    for j in range(1, k * k):
        a, b = divmod(j, k)
        out = out.addcmul_(x[..., a::k, b::k, :], weights[..., j, None])
    return out.to(x.dtype)


@dataclass(frozen=True)
class _LevelIndices(Generic[Rows]):
    """Rows of flattened (B*T or B*G) frame tensors one level reads, grouped by tensor."""

    parts: tuple[tuple[int, Rows], ...]  # (-1 for the input, else level number, rows)
    order: Rows | None  # puts the concatenated parts back in chunk order


@dataclass(frozen=True)
class _PlanIndices(Generic[Rows]):
    levels: tuple[_LevelIndices[Rows], ...]
    # Per level: rows of its mosaics that are some frame's final value, and those frames.
    final: tuple[tuple[Rows, Rows] | None, ...]


_INDEX_CACHE: dict[tuple[Plan, int, torch.device], _PlanIndices[torch.Tensor]] = {}


def _plan_indices(plan: Plan, batch: int, device: torch.device) -> _PlanIndices[torch.Tensor]:
    """Index tensors of a plan for a batch on ``device``, cached: eager calls copy nothing to the device.

    Under ``torch.compile`` they become graph constants instead.
    """
    if torch.compiler.is_compiling():
        return _to_tensors(_index_rows(plan, batch), device)
    key = (plan, batch, device)
    cached = _INDEX_CACHE.get(key)
    if cached is None:
        if len(_INDEX_CACHE) > 4096:
            _INDEX_CACHE.clear()
        cached = _INDEX_CACHE[key] = _to_tensors(_index_rows(plan, batch), device)
    return cached


def _to_tensors(rows: _PlanIndices[tuple[int, ...]], device: torch.device) -> _PlanIndices[torch.Tensor]:
    def as_tensor(values):
        return None if values is None else torch.tensor(values, dtype=torch.int64, device=device)

    return _PlanIndices(
        levels=tuple(
            _LevelIndices(
                parts=tuple((kind, as_tensor(r)) for kind, r in level.parts),
                order=as_tensor(level.order),
            )
            for level in rows.levels
        ),
        final=tuple(None if f is None else (as_tensor(f[0]), as_tensor(f[1])) for f in rows.final),
    )


@torch.compiler.assume_constant_result
def _index_rows(plan: Plan, batch: int) -> _PlanIndices[tuple[int, ...]]:
    return _index_rows_cached(plan, batch)


@functools.lru_cache(maxsize=1024)
def _index_rows_cached(plan: Plan, batch: int) -> _PlanIndices[tuple[int, ...]]:
    """The plan's gathers and scatters as rows of flattened tensors, for a batch of ``batch`` videos.

    Mosaic ``m`` (global build order) is row ``b * chunks + c`` of its level's tensor.
    """
    where = {}
    for number, level in enumerate(plan.levels):
        first = len(where)
        for c in range(len(level.targets)):
            where[first + c] = (number, c, len(level.targets))

    def locate(source: FrameSource, b: int) -> tuple[int, int]:
        if source.from_input:
            return -1, b * plan.num_frames + source.index
        number, c, chunks = where[source.index]
        return number, b * chunks + c

    levels = []
    for level in plan.levels:
        reads = [locate(source, b) for b in range(batch) for source in level.sources]
        kinds = sorted({kind for kind, _ in reads})
        parts = tuple((kind, tuple(row for k, row in reads if k == kind)) for kind in kinds)
        order = None
        if len(kinds) > 1:
            position, offset = {}, 0
            for kind, rows in parts:
                position[kind], offset = offset, offset + len(rows)
            order = []
            for kind, _ in reads:
                order.append(position[kind])
                position[kind] += 1
            order = tuple(order)
        levels.append(_LevelIndices(parts=parts, order=order))

    final_rows = [[] for _ in plan.levels]
    final_targets = [[] for _ in plan.levels]
    for b in range(batch):
        for frame, mosaic in zip(plan.replaced, plan.replaced_from):
            number, row = locate(FrameSource(False, mosaic), b)
            final_rows[number].append(row)
            final_targets[number].append(b * plan.num_frames + frame)
    final = tuple(
        (tuple(rows), tuple(targets)) if rows else None
        for rows, targets in zip(final_rows, final_targets)
    )
    return _PlanIndices(levels=tuple(levels), final=final)


def _gather(frames: torch.Tensor, mosaics: list[torch.Tensor], index: _LevelIndices) -> torch.Tensor:
    """The frames one level reads, as they were before it wrote anything."""
    parts = [(frames if kind < 0 else mosaics[kind])[rows] for kind, rows in index.parts]
    if index.order is None:
        return parts[0]
    return torch.cat(parts, dim=0)[index.order]


def _tile(frames: torch.Tensor, level: LevelPlan, height: int, width: int) -> torch.Tensor:
    """(N*g, H, W, D) chunk frames -> (N, H, W, D) mosaics, cropped top-left.

    Tiles are never larger than the frame, so the spec's "area when shrinking,
    else bilinear" is area or nothing (bilinear to the same size is the identity).
    """
    dim = frames.shape[-1]
    tile_h, tile_w = level.tile
    if (tile_h, tile_w) != (height, width):
        channels_first = frames.permute(0, 3, 1, 2)  # a channels-last view, no copy
        frames = F.interpolate(channels_first, size=(tile_h, tile_w), mode="area").permute(0, 2, 3, 1)
    grid = frames.reshape(-1, level.rows, level.cols, tile_h, tile_w, dim)
    mosaic = grid.permute(0, 1, 3, 2, 4, 5).reshape(
        -1, level.rows * tile_h, level.cols * tile_w, dim
    )
    return mosaic[:, :height, :width, :]


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
