"""The host-side plan of ST-GridPool: everything that depends only on shapes.

Which frames each pyramid level samples, how its mosaics are laid out, which
frames they replace and the output grid are functions of (T, H, W) and the
config alone. Computing them once on the host (and caching them) is what
lets the stage run with static shapes and no host-device synchronisation,
and lets the vLLM processor know the token count before the model runs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from vllm_stgridpool.config import STGridPoolConfig


@dataclass(frozen=True)
class FrameSource:
    """Where a frame's current value lives: the input, or an earlier mosaic."""

    from_input: bool
    index: int  # frame index into the input, or row into the stack of mosaics


@dataclass(frozen=True)
class LevelPlan:
    """One PTG level: ``chunks`` mosaics of ``grid`` frames each."""

    grid: int
    stride: int
    sampled: tuple[int, ...]  # frame indices sampled at this level (all n of them)
    rows: int
    cols: int
    tile: tuple[int, int]  # (h, w) each frame is resized to
    sources: tuple[FrameSource, ...]  # value of each used sampled frame, in chunk order
    targets: tuple[int, ...]  # frame replaced by each mosaic

    @property
    def chunks(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class Plan:
    """The full static plan for one (T, H, W) and config."""

    num_frames: int
    height: int
    width: int
    kernel_size: int
    levels: tuple[LevelPlan, ...]  # only the levels that build at least one mosaic
    replaced: tuple[int, ...]  # frames whose final value is a mosaic, ascending
    replaced_from: tuple[int, ...]  # row of each replaced frame's mosaic in the stack
    out_grid: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.out_grid[0] * self.out_grid[1]


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
    current = [FrameSource(True, t) for t in range(num_frames)]
    mosaics = 0
    levels = []
    for grid, stride in config.levels:
        sampled = sample_indices(num_frames, stride)
        chunks = len(sampled) // grid
        if chunks == 0:
            continue
        used = sampled[: chunks * grid]
        rows, cols = mosaic_layout(grid)
        targets = tuple(used[(c + 1) * grid - 1] for c in range(chunks))
        levels.append(
            LevelPlan(
                grid=grid,
                stride=stride,
                sampled=sampled,
                rows=rows,
                cols=cols,
                tile=(math.ceil(height / rows), math.ceil(width / cols)),
                sources=tuple(current[i] for i in used),  # snapshot before this level writes
                targets=targets,
            )
        )
        for c, target in enumerate(targets):
            current[target] = FrameSource(False, mosaics + c)
        mosaics += chunks
    replaced = tuple(t for t, src in enumerate(current) if not src.from_input)
    return Plan(
        num_frames=num_frames,
        height=height,
        width=width,
        kernel_size=config.kernel_size,
        levels=tuple(levels),
        replaced=replaced,
        replaced_from=tuple(current[t].index for t in replaced),
        out_grid=out_grid,
    )
