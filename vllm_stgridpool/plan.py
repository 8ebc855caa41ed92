"""The host-side plan of ST-GridPool: everything that depends only on shapes.

Which frames each pyramid level samples, how its mosaics are laid out, which
frames they replace and the output grid are functions of (T, H, W) and the
config alone. Computing them once on the host (and caching them) is what
lets the stage run with static shapes and no host-device synchronisation,
and lets the vLLM processor know the token count before the model runs.

Frames live in "stores": store -1 is the input video, store ``l`` holds the
mosaics built by level ``l`` (in chunk order). Every read the stage makes
is a (store, rows) pair.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from vllm_stgridpool.config import STGridPoolConfig

INPUT = -1  # the store holding the input frames

Reads = tuple[tuple[int, tuple[int, ...]], ...]  # ((store, rows), ...)


@dataclass(frozen=True)
class LevelPlan:
    """One PTG level: ``chunks`` mosaics of ``grid`` frames each.

    Plain fields only, so ``torch.compile`` reads them as constants.
    """

    rows: int
    cols: int
    tile: tuple[int, int]  # (h, w) each frame is resized to
    reads: Reads  # the used sampled frames, grouped by store, as they were before this level
    order: tuple[int, ...] | None  # puts the grouped reads back in chunk order (None: already)
    targets: tuple[int, ...]  # frame replaced by each mosaic
    chunks: int


@dataclass(frozen=True)
class Plan:
    """The full static plan for one (T, H, W) and config."""

    num_frames: int
    height: int
    width: int
    kernel_size: int
    levels: tuple[LevelPlan, ...]  # only the levels that build at least one mosaic
    final_reads: Reads  # the mosaics that are some frame's final value, grouped by level
    replaced: tuple[int, ...]  # the frames they replace, in the same order
    out_grid: tuple[int, int]


def sample_indices(num_frames: int, stride: int) -> tuple[int, ...]:
    """Frames a level samples: float32 linspace, round half to even, clamped."""
    n = num_frames // stride
    if n == 0:
        return ()
    points = torch.linspace(0, num_frames, n + 1, dtype=torch.float32)[1:] - 1
    return tuple(torch.round(points).clamp(0, num_frames - 1).to(torch.int64).tolist())


def mosaic_layout(grid: int) -> tuple[int, int]:
    """(rows, cols) of a ``grid``-frame mosaic: the most square factor pair, tall side first."""
    best = (1, grid)
    for a in range(1, math.isqrt(grid) + 1):
        if grid % a == 0 and abs(a - grid // a) < abs(best[0] - best[1]):
            best = (a, grid // a)
    return max(best), min(best)


@functools.lru_cache(maxsize=1024)
def make_plan(num_frames: int, height: int, width: int, config: STGridPoolConfig) -> Plan:
    """Plan ST-GridPool for a (num_frames, height, width) video; cached per shape and config."""
    out_grid = config.output_grid(height, width)
    current = [(INPUT, t) for t in range(num_frames)]  # where each frame's value lives now
    levels = []
    for grid, stride in config.levels:
        sampled = sample_indices(num_frames, stride)
        chunks = len(sampled) // grid
        if chunks == 0:
            continue
        used = sampled[: chunks * grid]
        reads, order = _group_reads([current[i] for i in used])  # snapshot before this level writes
        rows, cols = mosaic_layout(grid)
        targets = tuple(used[(c + 1) * grid - 1] for c in range(chunks))
        level_store = len(levels)
        levels.append(
            LevelPlan(
                rows=rows,
                cols=cols,
                tile=(math.ceil(height / rows), math.ceil(width / cols)),
                reads=reads,
                order=order,
                targets=targets,
                chunks=chunks,
            )
        )
        for c, target in enumerate(targets):
            current[target] = (level_store, c)
    replaced = [t for t, (store, _) in enumerate(current) if store != INPUT]
    final_reads, order = _group_reads([current[t] for t in replaced])
    if order is not None:
        replaced = [replaced[i] for i in _inverse(order)]
    return Plan(
        num_frames=num_frames,
        height=height,
        width=width,
        kernel_size=config.kernel_size,
        levels=tuple(levels),
        final_reads=final_reads,
        replaced=tuple(replaced),
        out_grid=out_grid,
    )


def _group_reads(sources: list[tuple[int, int]]) -> tuple[Reads, tuple[int, ...] | None]:
    """Group (store, row) reads by store; ``order[i]`` is where read ``i`` lands in the grouping."""
    stores = sorted({store for store, _ in sources})
    reads = tuple((store, tuple(row for s, row in sources if s == store)) for store in stores)
    position, offset = {}, 0
    for store, rows in reads:
        position[store], offset = offset, offset + len(rows)
    order = []
    for store, _ in sources:
        order.append(position[store])
        position[store] += 1
    identity = all(i == j for i, j in enumerate(order))
    return reads, None if identity else tuple(order)


def _inverse(order: tuple[int, ...]) -> list[int]:
    inverse = [0] * len(order)
    for i, j in enumerate(order):
        inverse[j] = i
    return inverse
