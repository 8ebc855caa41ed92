"""The host-side plan of ST-GridPool: everything that depends only on shapes.

Which frames each pyramid level samples, how its mosaics are laid out, which
frames they replace and the output grid are functions of (T, H, W) and the
config alone. Computing them once on the host (and caching them) is what
lets the stage run with static shapes and no host-device synchronisation,
and lets the vLLM processor know the token count (and the stage's cost,
:mod:`vllm_stgridpool.stage.cost`) before the model runs.

The plan is a short program the stage runs in order, one sweep over the
frames. A mosaic's buffer is taken at its first tile and handed on once the
mosaic is complete, fed to the levels above and pooled if it is a frame's
final value, so the stage holds a few mosaics at a time whatever the
video's length. At frame ``t`` the pyramid levels run in order: a level that samples ``t``
reads the frame's current value (the input, or the mosaic a lower level
completed at ``t``), which is exactly the spec's "snapshot before the level
writes", because a mosaic only ever replaces its own last sampled frame.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch

from vllm_stgridpool.config import STGridPoolConfig

INPUT = -1  # a step's source: the input frames (else a slot number)

# Frames pooled per step: the features of a step stay in the CPU's cache
# between its passes (norm, weighted sum, and the resizes of the same frames).
CHUNK_BYTES = 8 << 20


class Place(NamedTuple):
    """Where a tile lands: ``mosaic[top : top + rows, left : left + cols]`` (the crop to H x W applied)."""

    mosaic: int
    top: int
    left: int
    rows: int
    cols: int


class Resize(NamedTuple):
    """Resize frames to ``size``; the tile of ``sources[i]`` becomes each place of ``places[i]``.

    ``sources`` are input frames when ``from_input``, else mosaics.
    """

    from_input: bool
    sources: tuple[int, ...]
    size: tuple[int, int]
    places: tuple[tuple[Place, ...], ...]


class PoolFrames(NamedTuple):
    """NSP of input frames ``start .. stop - 1`` into the same output frames."""

    start: int
    stop: int


class PoolMosaics(NamedTuple):
    """``mosaics`` are the final values of ``frames``: NSP them there."""

    mosaics: tuple[int, ...]
    frames: tuple[int, ...]


class Drop(NamedTuple):
    """``mosaics`` have been consumed: their buffers may hold later mosaics."""

    mosaics: tuple[int, ...]


Step = Union[Resize, PoolFrames, PoolMosaics, Drop]


@dataclass(frozen=True)
class LevelPlan:
    """One PTG level: ``len(targets)`` mosaics of ``rows * cols`` frames, each ``tile`` = (h, w)."""

    rows: int
    cols: int
    tile: tuple[int, int]
    frames: tuple[int, ...]  # the sampled frames it uses, chunk after chunk
    targets: tuple[int, ...]  # the frame each mosaic replaces


@dataclass(frozen=True)
class Plan:
    """The full static plan for one (T, H, W) and config. Plain fields: constants to ``torch.compile``."""

    num_frames: int
    height: int
    width: int
    kernel_size: int
    out_grid: tuple[int, int]
    levels: tuple[LevelPlan, ...]  # only the levels that build at least one mosaic
    replaced: tuple[int, ...]  # frames whose final value is a mosaic
    steps: tuple[Step, ...]
    slots: tuple[int, ...]  # each mosaic's buffer (an index); a mosaic reuses the buffer of one already dropped
    num_slots: int  # (H, W, D) mosaic buffers the stage holds at once

    def pooled_row(self, frame: int, mosaics_only: bool) -> int:
        """The output row of a replaced ``frame``'s pooled mosaic: the frame itself, or with ``mosaics_only``
        its place among the replaced frames."""
        return self.replaced.index(frame) if mosaics_only else frame


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


@functools.lru_cache(maxsize=256)
def area_window(size: int, out_size: int) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) whose average pooling has the windows of area interpolation, or None.

    Area interpolation from ``size`` to ``out_size`` averages the window
    ``[floor(i * size / out_size), ceil((i + 1) * size / out_size))``. When
    these windows are those of a plain average pooling (padding excluded
    from the count), that op gives the same sums and the same divisions,
    and ATen's pooling kernel for it is about twice as fast on CPU:
    27 -> 14 is kernel 3, stride 2, padding 1; 27 -> 7 is 5, 4, 1; 27 -> 9 is 3, 3, 0.
    """
    windows = [((i * size) // out_size, -((-(i + 1) * size) // out_size)) for i in range(out_size)]
    kernel = max(end - start for start, end in windows)
    strides = {b[0] - a[0] for a, b in zip(windows, windows[1:])} or {1}  # the first window may be clipped
    for stride in sorted(strides):
        for padding in range(kernel // 2 + 1):
            clipped = [(max(0, i * stride - padding), min(size, i * stride - padding + kernel)) for i in range(out_size)]
            if clipped == windows and (size + 2 * padding - kernel) // stride + 1 == out_size:
                return kernel, stride, padding
    return None


def chunk_frames(height: int, width: int, dim: int, itemsize: int) -> int:
    """Frames per pooling step: about :data:`CHUNK_BYTES` of one video's features, at least one."""
    return max(1, CHUNK_BYTES // max(1, height * width * dim * itemsize))


def plan_for(videos, config: STGridPoolConfig) -> Plan:
    """The plan the eager backends run on (B, T, H, W, D) ``videos`` (a tensor): segments of a few frames."""
    _, num_frames, height, width, dim = videos.shape
    return make_plan(num_frames, height, width, config, chunk_frames(height, width, dim, videos.element_size()))


@functools.lru_cache(maxsize=1024)
def make_plan(
    num_frames: int, height: int, width: int, config: STGridPoolConfig, chunk: int = 1 << 30
) -> Plan:
    """Plan ST-GridPool for a (num_frames, height, width) video, ``chunk`` frames per segment; cached.

    Per segment of frames: pool the frames that stay input frames (a single
    segment pools them all in one step), resize
    the segment's sampled input frames into their mosaics' tiles, then, frame
    by frame, feed each completed mosaic to the levels above, and last pool
    the mosaics that are final values. Slots are taken in this order and
    released once their mosaic is consumed, so they never clash.
    """
    out_grid = config.output_grid(height, width)
    levels, mosaic_level, uses = _levels(num_frames, height, width, config)

    def is_last(mosaic: int, j: int) -> bool:
        level = levels[mosaic_level[mosaic]]
        return j == level.rows * level.cols - 1

    # Each frame's value as the levels run in order; it is the source of the next level's tile.
    sources: list[list[tuple[int, int, int]]] = [[] for _ in range(num_frames)]  # (source, mosaic, j)
    final = [INPUT] * num_frames
    for frame, frame_uses in enumerate(uses):
        value = INPUT
        for mosaic, j in frame_uses:
            sources[frame].append((value, mosaic, j))
            if is_last(mosaic, j):
                value = mosaic  # the mosaic replaces this frame from the next level on
        final[frame] = value

    def places(frame: int, from_input: bool) -> dict[tuple[int, tuple[int, int]], list[Place]]:
        """This frame's tiles taken from the input (or from mosaics), by (source, tile size)."""
        groups: dict[tuple[int, tuple[int, int]], list[Place]] = {}
        for source, mosaic, j in sources[frame]:
            level = levels[mosaic_level[mosaic]]
            top, left = (j // level.cols) * level.tile[0], (j % level.cols) * level.tile[1]
            if (source == INPUT) != from_input or top >= height or left >= width:
                continue  # the other kind, or a tile that falls outside the crop
            place = Place(mosaic, top, left, min(level.tile[0], height - top), min(level.tile[1], width - left))
            groups.setdefault((source, level.tile), []).append(place)
        return groups

    steps: list[Step] = []
    for start in range(0, num_frames, chunk):
        stop = min(num_frames, start + chunk)
        steps.extend(PoolFrames(a, b) for a, b in _input_runs(final, start, stop))
        by_size: dict[tuple[int, int], tuple[list[int], list[tuple[Place, ...]]]] = {}
        for frame in range(start, stop):
            for (_, size), frame_places in places(frame, from_input=True).items():
                frames, per_frame = by_size.setdefault(size, ([], []))
                frames.append(frame)
                per_frame.append(tuple(frame_places))
        for size, (frames, per_frame) in by_size.items():
            steps.append(Resize(True, tuple(frames), size, tuple(per_frame)))
        finals: list[tuple[int, int]] = []
        for frame in range(start, stop):
            # In level order: each mosaic completed here is complete before the levels above read it.
            mosaic_places = places(frame, from_input=False)
            for source, mosaic, j in sources[frame]:
                key = (source, levels[mosaic_level[mosaic]].tile)
                if key in mosaic_places:
                    steps.append(Resize(False, (source,), key[1], (tuple(mosaic_places.pop(key)),)))
            dead = [m for _, m, j in sources[frame] if is_last(m, j) and m != final[frame]]
            if dead:
                steps.append(Drop(tuple(dead)))  # fed to the levels above: no longer needed
            if final[frame] != INPUT:
                finals.append((final[frame], frame))
        if finals:
            steps.append(PoolMosaics(tuple(m for m, _ in finals), tuple(f for _, f in finals)))
            steps.append(Drop(tuple(m for m, _ in finals)))
    slots, num_slots = _assign_slots(steps, len(mosaic_level))
    return Plan(
        num_frames=num_frames,
        height=height,
        width=width,
        kernel_size=config.kernel_size,
        out_grid=out_grid,
        levels=tuple(levels),
        replaced=tuple(t for t in range(num_frames) if final[t] != INPUT),
        steps=tuple(steps),
        slots=slots,
        num_slots=num_slots,
    )


def _assign_slots(steps: list[Step], num_mosaics: int) -> tuple[tuple[int, ...], int]:
    """Each mosaic's buffer, taken at its first tile (the last one dropped if any, else a new one), and how
    many buffers that makes."""
    slots = [INPUT] * num_mosaics
    free: list[int] = []
    count = 0
    for step in steps:
        if isinstance(step, Resize):
            for place in (place for places in step.places for place in places):
                if slots[place.mosaic] != INPUT:
                    continue
                if free:
                    slots[place.mosaic] = free.pop()
                else:
                    slots[place.mosaic], count = count, count + 1
        elif isinstance(step, Drop):
            free.extend(slots[mosaic] for mosaic in step.mosaics)
    return tuple(slots), count


def _input_runs(final: list[int], start: int, stop: int) -> list[tuple[int, int]]:
    """Runs of frames in [start, stop) whose final value is the input frame, as (first, stop) pairs.

    A segment that is the whole video (a small one) is one run: one pooling
    call over every frame costs less than several, and the mosaics overwrite
    their frames after.
    """
    if start == 0 and stop == len(final):
        return [(0, stop)]
    runs, run = [], start
    for frame in range(start, stop + 1):
        if frame == stop or final[frame] != INPUT:
            if frame > run:
                runs.append((run, frame))
            run = frame + 1
    return runs


def _levels(num_frames: int, height: int, width: int, config: STGridPoolConfig):
    """The levels that build mosaics; each mosaic's level; per frame its (mosaic, position) uses in level order."""
    levels: list[LevelPlan] = []
    mosaic_level: list[int] = []
    uses: list[list[tuple[int, int]]] = [[] for _ in range(num_frames)]
    for grid, stride in config.levels:
        sampled = sample_indices(num_frames, stride)
        chunks = len(sampled) // grid
        if chunks == 0:
            continue
        used = sampled[: chunks * grid]
        rows, cols = mosaic_layout(grid)
        for c in range(chunks):
            mosaic = len(mosaic_level)
            mosaic_level.append(len(levels))
            for j, frame in enumerate(used[c * grid : (c + 1) * grid]):
                uses[frame].append((mosaic, j))
        targets = tuple(used[(c + 1) * grid - 1] for c in range(chunks))
        tile = (math.ceil(height / rows), math.ceil(width / cols))
        levels.append(LevelPlan(rows=rows, cols=cols, tile=tile, frames=used, targets=targets))
    return levels, mosaic_level, uses
