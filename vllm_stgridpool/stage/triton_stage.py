"""The stage on CUDA: the plan run by :mod:`~vllm_stgridpool.stage.triton_kernels`, L + 1 launches for L levels.

The PyTorch-ops path launches 516 (float32) to 1,188 (bfloat16) kernels per 64-frame video, each some
microseconds of host time, so on a GPU that path is bound by launches, not memory. Here a call is one launch per
pyramid level plus one, whatever the number of frames or videos: launch ``l`` resizes every tile of
level ``l`` (from input frames, or from mosaics that earlier launches finished) into the mosaic
buffers and pools every output row that is final by then (the input frames in launch 0, level
``l - 1``'s final mosaics after); the last launch pools the last level's final mosaics.

The step tables come from the :class:`~vllm_stgridpool.stage.plan.Plan`, built once per shape and device
and kept there, with the float parameters once per setting: a call copies nothing from the host,
reads no value back and allocates its output and the mosaic buffers (every mosaic of every video
at once: the plan's buffer reuse is for the CPU's cache), so it can be captured in a CUDA graph.
Under ``torch.compile`` it is one custom op, :func:`triton_stage`. With ``TRITON_INTERPRET=1``
the same kernel runs on CPU tensors through Triton's interpreter (how the tests run it).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from vllm_stgridpool.config import STGridPoolConfig
from vllm_stgridpool.stage.plan import Plan, PoolMosaics, Resize, make_plan

__all__ = ["run", "triton_stage", "launches", "Launch"]

ROW = 8  # int32 columns per step-table row (triton_kernels.ROW)
# Elements a program holds per block (BLOCK_J x BLOCK_W x BLOCK_D): a GPU's, and the interpreter's, which
# runs programs one after another in Python, so fewer and larger ones (a whole frame) run much faster.
TILE, INTERPRETED_TILE = 4096, 1 << 16


class Launch(NamedTuple):
    """One launch's work: tiles to resize into the mosaics, rows to pool."""

    tile: tuple[int, int]  # the tiles' size (0, 0) when the launch resizes nothing
    places: tuple[tuple[int, int, int, int, int, int, int], ...]  # from_input, source, mosaic, top, left, rows, cols
    pools: tuple[tuple[int, int, int], ...]  # from_input, source (frame or mosaic), output row


@functools.lru_cache(maxsize=256)
def launches(plan: Plan) -> tuple[Launch, ...]:
    """The plan's steps grouped into launches: level ``l``'s tiles in launch ``l``, a row pooled in the first
    launch after its value is complete (input frames in launch 0), one more launch for the last level's."""
    mosaic_level = [level for level, lp in enumerate(plan.levels) for _ in lp.targets]
    count = len(plan.levels) + 1
    places: list[list[tuple]] = [[] for _ in range(count)]
    pools: list[list[tuple]] = [[] for _ in range(count)]
    replaced = set(plan.replaced)
    pools[0] = [(1, t, t) for t in range(plan.num_frames) if t not in replaced]
    for step in plan.steps:
        if isinstance(step, Resize):
            for source, step_places in zip(step.sources, step.places):
                for place in step_places:
                    level = mosaic_level[place.mosaic]
                    assert step.size == plan.levels[level].tile
                    assert step.from_input or mosaic_level[source] < level  # finished by an earlier launch
                    places[level].append((int(step.from_input), source, place.mosaic, place.top, place.left,
                                          place.rows, place.cols))
        elif isinstance(step, PoolMosaics):
            for mosaic, frame in zip(step.mosaics, step.frames):
                pools[mosaic_level[mosaic] + 1].append((0, mosaic, frame))
    tiles = [lp.tile for lp in plan.levels] + [(0, 0)]
    return tuple(Launch(tile, tuple(p), tuple(q)) for tile, p, q in zip(tiles, places, pools))


class Prepared(NamedTuple):
    """A shape's launches on one device: the step table there, each launch's scalar arguments and grid."""

    table: torch.Tensor  # int32 (rows, ROW) on the device
    args: tuple[tuple[int, ...], ...]  # per launch: resize_at, resize_tokens, resize_programs, tile_h, tile_w,
    #                                    span_h, span_w, pool_at, pool_tokens
    programs: tuple[int, ...]  # per launch, the grid's first axis
    num_mosaics: int
    blocks: dict  # BLOCK_J, BLOCK_W, BLOCK_D


def _blocks(kernel_size: int, dim: int, tokens: int, tile: int) -> dict:
    """Block sizes: a program holds about ``tile`` elements; channels first, then output tokens."""
    block_w = next_power_of_2(kernel_size * kernel_size)
    block_d = min(next_power_of_2(dim), max(1, tile // block_w))
    block_j = max(1, min(next_power_of_2(tokens), tile // (block_w * block_d)))
    return dict(BLOCK_J=block_j, BLOCK_W=block_w, BLOCK_D=block_d)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _span(size: int, out_size: int) -> int:
    """The widest area window resizing ``size`` to ``out_size``."""
    return max(-(-(j + 1) * size // out_size) - (j * size) // out_size for j in range(out_size))


@functools.lru_cache(maxsize=256)
def prepare(shape: tuple[int, int, int, int], grid_sizes: tuple[int, ...], grid_strides: tuple[int, ...],
            kernel_size: int, device: torch.device) -> Prepared:
    """The step table and launch arguments of (T, H, W, D) videos, built once and kept on ``device``."""
    num_frames, height, width, dim = shape
    config = STGridPoolConfig(grid_sizes=grid_sizes, grid_strides=grid_strides, kernel_size=kernel_size)
    plan = make_plan(num_frames, height, width, config)
    out_h, out_w = plan.out_grid
    steps = launches(plan)
    tokens = max(len(launch.places) * launch.tile[0] * launch.tile[1] + len(launch.pools) * out_h * out_w
                 for launch in steps)
    blocks = _blocks(kernel_size, dim, tokens, INTERPRETED_TILE if device.type == "cpu" else TILE)
    block_j = blocks["BLOCK_J"]
    rows: list[tuple[int, ...]] = []
    args, programs = [], []
    for launch in steps:
        tile_h, tile_w = launch.tile
        resize_at, pool_at = len(rows), len(rows) + len(launch.places)
        rows += [(*place, 0) for place in launch.places] + [(*pool, 0, 0, 0, 0, 0) for pool in launch.pools]
        resize_tokens = len(launch.places) * tile_h * tile_w
        pool_tokens = len(launch.pools) * out_h * out_w
        resize_programs = -(-resize_tokens // block_j)
        spans = (_span(height, tile_h), _span(width, tile_w)) if tile_w else (0, 0)
        args.append((resize_at, resize_tokens, resize_programs, tile_h, tile_w, *spans, pool_at, pool_tokens))
        programs.append(resize_programs + -(-pool_tokens // block_j))
    table = torch.tensor(rows or [(0,) * ROW], dtype=torch.int32).to(device)
    num_mosaics = sum(len(level.targets) for level in plan.levels)
    return Prepared(table, tuple(args), tuple(programs), num_mosaics, blocks)


@functools.lru_cache(maxsize=256)
def parameters(temperature: float, norm_p: float, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernel's float parameters in float64 on ``device``: temperature, ``D ** (-1/p)``, p, the dtype's
    largest value and the smallest normal of the sums' type."""
    compute = torch.promote_types(dtype, torch.float32)
    values = [temperature, dim ** (-1.0 / norm_p), norm_p, torch.finfo(dtype).max, torch.finfo(compute).tiny]
    return torch.tensor(values, dtype=torch.float64).to(device)


@functools.cache
def _kernel():
    from vllm_stgridpool.stage.triton_kernels import stage_level_kernel  # imports triton: only when the stage runs

    return stage_level_kernel


class Call(NamedTuple):
    """Everything a call of one input layout, dtype, device and config passes besides its tensors."""

    out_shape: tuple[int, ...]
    mosaic_shape: tuple[int, ...] | None  # None: no pyramid level builds a mosaic
    table: torch.Tensor
    params: torch.Tensor
    launches: tuple[tuple[tuple[int, int], tuple[int, ...]], ...]  # (grid, scalar arguments) of each launch
    constants: dict  # the kernel's constexprs


@functools.lru_cache(maxsize=256)
def _call(shape: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype, device: torch.device,
          config: STGridPoolConfig) -> Call:
    """A call's arguments, worked out once (a call then costs one cache look-up, two allocations and its
    launches); the output and mosaic buffers are contiguous, so their strides follow from their shapes."""
    batch, num_frames, height, width, dim = shape
    prepared = prepare((num_frames, height, width, dim), config.grid_sizes, config.grid_strides, config.kernel_size,
                       device)
    out_h, out_w = config.output_grid(height, width)
    out_shape = (batch, num_frames, out_h, out_w, dim)
    mosaic_shape = (batch, prepared.num_mosaics, height, width, dim) if prepared.num_mosaics else None
    sizes = (out_h * out_w * dim, out_w * dim, dim)
    out_strides = (num_frames * sizes[0], *sizes)
    frame = height * width * dim
    mosaic_strides = (prepared.num_mosaics * frame, frame, width * dim, dim) if mosaic_shape else out_strides
    common = (*strides, *mosaic_strides, *out_strides, height, width, dim, out_h, out_w)
    launches = tuple(((programs, batch), (*common, *args))
                     for args, programs in zip(prepared.args, prepared.programs) if programs)
    constants = dict(K=config.kernel_size, NORM=int(config.norm_p) if config.norm_p in (1.0, 2.0) else 0,
                     ACC=_triton_type(torch.float64 if dtype == torch.float64 else torch.float32),
                     DTYPE=_triton_type(dtype), BF16=dtype == torch.bfloat16, **prepared.blocks)
    params = parameters(config.temperature, config.norm_p, dim, dtype, device)
    return Call(out_shape, mosaic_shape, prepared.table, params, launches, constants)


def run(videos: torch.Tensor, config: STGridPoolConfig) -> torch.Tensor:
    """ST-GridPool of (B, T, H, W, D) ``videos`` -> (B, T, H', W', D), in L + 1 launches (module docstring)."""
    if videos.device.type == "meta":  # shapes only
        out_h, out_w = config.output_grid(videos.shape[2], videos.shape[3])
        return videos.new_empty(*videos.shape[:2], out_h, out_w, videos.shape[4])
    call = _call(tuple(videos.shape), videos.stride(), videos.dtype, videos.device, config)
    out = videos.new_empty(call.out_shape)
    if out.numel() == 0:
        return out
    mosaics = videos.new_empty(call.mosaic_shape) if call.mosaic_shape else out
    kernel = _kernel()
    for grid, args in call.launches:
        kernel[grid](videos, mosaics, out, call.table, call.params, *args, **call.constants)
    return out


def _triton_type(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16}[dtype]


@torch.library.custom_op("stgridpool::triton_stage", mutates_args=())
def triton_stage(
    videos: torch.Tensor, grid_sizes: list[int], grid_strides: list[int], kernel_size: int, temperature: float,
    norm_p: float,
) -> torch.Tensor:
    """:func:`run` as one op, opaque to ``torch.compile``: (B, T, H, W, D) -> (B, T, H', W', D)."""
    config = STGridPoolConfig(grid_sizes=tuple(grid_sizes), grid_strides=tuple(grid_strides), kernel_size=kernel_size,
                              temperature=temperature, norm_p=norm_p)
    return run(videos, config)


@triton_stage.register_fake
def _(videos, grid_sizes, grid_strides, kernel_size, temperature, norm_p):
    out_grid = STGridPoolConfig(kernel_size=kernel_size).output_grid(videos.shape[2], videos.shape[3])
    return videos.new_empty(videos.shape[0], videos.shape[1], *out_grid, videos.shape[-1])

