"""The stage on CUDA: the plan run by :mod:`~vllm_stgridpool.stage.triton_kernels`, L + 1 launches for L levels.

The PyTorch-ops path launches 516 (float32) to 1,188 (bfloat16) kernels per 64-frame video, each some
microseconds of host time, so on a GPU that path is bound by launches, not memory. Here a call is one launch per
pyramid level plus one, whatever the number of frames or videos: launch ``l`` resizes every tile of
level ``l`` (from input frames, or from mosaics that earlier launches finished) into the mosaic
buffers and pools every output row that is final by then (the input frames in launch 0, level
``l - 1``'s final mosaics after); the last launch pools the last level's final mosaics.

Nothing is compiled or copied in a forward pass once :func:`warm_up` ran (the engine calls it while it
starts): it compiles every kernel variant the server's settings let a request reach and puts the step
tables of the server's pyramid at every frame count on the device. A call then reads its step table from
a cache that never frees one (a CUDA graph may hold it), passes the float parameters as kernel arguments,
reads no value back and allocates only its output and the mosaic buffers (every mosaic of every video at
once: the plan's buffer reuse is for the CPU's cache), so it can be captured in a CUDA graph. It launches
on the input's device, on that device's current stream. Under ``torch.compile`` it is one custom op,
:func:`triton_stage`. With ``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors through Triton's
interpreter (how the tests run it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import struct
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch

from vllm_stgridpool.config import MAX_KERNEL_SIZE, STGridPoolConfig, STGridPoolSettings
from vllm_stgridpool.stage.plan import Plan, PoolMosaics, Resize, make_plan

__all__ = ["run", "triton_stage", "launches", "Launch", "warm_up", "reachable_variants", "Blocks", "blocks"]

logger = logging.getLogger("vllm.stgridpool")

ROW = 8  # int32 columns per step-table row (triton_kernels.ROW)
# What a program holds per block on a GPU: features of BLOCK_J x BLOCK_W x BLOCK_D, and of BLOCK_J x BLOCK_D
# (a resize's sums, a pooled row), in bytes; the interpreter, which runs programs one after another in
# Python, takes fewer and larger ones (a whole frame), elements.
TILE_BYTES, ROW_BYTES, INTERPRETED_TILE = 8192, 2048, 1 << 16
# Step tables kept per process (each about 32 bytes per frame and mosaic: 2.7 KB at 64 frames). Beyond
# this many (frames, pyramid) pairs a call builds its table for itself, never evicting one.
MAX_TABLES = 4096
NORM_KINDS = {1.0: 1, 2.0: 2}  # NORM of norm_p; every other p is 0
OPTIONS = dict(enable_fp_fusion=False)  # every float32 multiply and add rounded, as under the interpreter


class Launch(NamedTuple):
    """One launch's work: tiles to resize into the mosaics, rows to pool."""

    tile: tuple[int, int]  # the tiles' size (0, 0) when the launch resizes nothing
    places: tuple[tuple[int, int, int, int, int, int, int], ...]  # from_input, source, mosaic, top, left, rows, cols
    pools: tuple[tuple[int, int, int], ...]  # from_input, source (frame or mosaic), output row


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


class Blocks(NamedTuple):
    """A variant's block sizes: output tokens, window tokens and channels a program holds."""

    BLOCK_J: int
    BLOCK_W: int
    BLOCK_D: int


def blocks(kernel_size: int, dim: int, itemsize: int, tokens: int | None = None) -> Blocks:
    """A GPU's: about :data:`TILE_BYTES` of features per program and :data:`ROW_BYTES` per row block (16
    bytes per thread of 4 warps: one 128-bit access), channels first, then output tokens, from the dtype,
    the kernel size's class and D alone (windows padded to a power of 4: 1, 4, 16, 64, 256 or 1,024
    tokens), so that neither the frame count nor the pyramid makes a variant. With ``tokens`` (the
    launch's largest count), the interpreter's: :data:`INTERPRETED_TILE` elements, BLOCK_J at most
    ``tokens``."""
    if tokens is None:
        tile, row_tile = TILE_BYTES // itemsize, ROW_BYTES // itemsize
    else:
        tile = row_tile = INTERPRETED_TILE
    block_w = 1 << 2 * (kernel_size - 1).bit_length()
    block_d = min(next_power_of_2(dim), max(1, tile // block_w), row_tile)
    block_j = max(1, min(tile // (block_w * block_d), row_tile // block_d))
    if tokens is not None:
        block_j = min(block_j, next_power_of_2(tokens))
    return Blocks(block_j, block_w, block_d)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _span(size: int, out_size: int) -> int:
    """The widest area window resizing ``size`` to ``out_size``."""
    return max(-(-(j + 1) * size // out_size) - (j * size) // out_size for j in range(out_size))


class Steps(NamedTuple):
    """A (frames, pyramid) shape's launches: the step table's rows, each launch's counts and spans."""

    rows: tuple[tuple[int, ...], ...]
    # per launch: resize_at, resize_tokens, tile_h, tile_w, span_h, span_w, pool_at, pooled rows
    launches: tuple[tuple[int, ...], ...]
    num_mosaics: int


@functools.lru_cache(maxsize=1024)
def steps(num_frames: int, height: int, width: int, grid_sizes: tuple[int, ...],
          grid_strides: tuple[int, ...]) -> Steps:
    """The step table and launch counts of (T, H, W) videos; the same for every kernel size."""
    config = STGridPoolConfig(grid_sizes=grid_sizes, grid_strides=grid_strides, kernel_size=1)
    plan = make_plan(num_frames, height, width, config)
    rows: list[tuple[int, ...]] = []
    counts = []
    for launch in launches(plan):
        tile_h, tile_w = launch.tile
        resize_at, pool_at = len(rows), len(rows) + len(launch.places)
        rows += [(*place, 0) for place in launch.places] + [(*pool, 0, 0, 0, 0, 0) for pool in launch.pools]
        spans = (_span(height, tile_h), _span(width, tile_w)) if tile_w else (0, 0)
        counts.append((resize_at, len(launch.places) * tile_h * tile_w, tile_h, tile_w, *spans, pool_at,
                       len(launch.pools)))
    num_mosaics = sum(len(level.targets) for level in plan.levels)
    return Steps(tuple(rows) or ((0,) * ROW,), tuple(counts), num_mosaics)


_tables: dict[tuple, torch.Tensor] = {}  # (steps' arguments, device) -> int32 step table; never freed


def step_table(key: tuple, device: torch.device) -> torch.Tensor:
    """The step table of ``steps(*key)`` on ``device``: uploaded once and kept for the process's life (a
    captured CUDA graph may read it), at most :data:`MAX_TABLES` of them; past that, a table of the call's
    own. Under CUDA-graph capture a table must already be there (warm_up puts the server's there)."""
    table = _tables.get((key, device))
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"ST-GridPool: no step table for {key[0]} frames of {key[1]} x {key[2]} with grid_sizes "
                f"{list(key[3])}, grid_strides {list(key[4])} on {device} while a CUDA graph is captured; run the "
                f"stage once, or triton_stage.warm_up, before capturing")
        table = torch.tensor(steps(*key).rows, dtype=torch.int32).to(device)
        if len(_tables) < MAX_TABLES:
            _tables[key, device] = table
    return table


def _interpreted() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def _halves(value: float) -> tuple[int, int]:
    """The float64 ``value``'s bits as two signed int32: (upper, lower) (the kernel's ``_float64``)."""
    low, high = struct.unpack("<ii", struct.pack("<d", value))
    return high, low


def _vector_width(videos: torch.Tensor) -> int:
    """VEC: elements per 16 bytes where the input allows 128-bit accesses (channels innermost, every other
    stride and D multiples of it, a 16-byte aligned address), else 1."""
    vec = max(1, 16 // videos.element_size())
    strides = [s for s, n in zip(videos.stride()[:-1], videos.shape[:-1]) if n > 1]
    aligned = videos.data_ptr() % 16 == 0 and videos.shape[-1] % vec == 0 and all(s % vec == 0 for s in strides)
    return vec if aligned and (videos.stride(-1) == 1 or videos.shape[-1] == 1) else 1


class Call(NamedTuple):
    """Everything a call of one input layout, dtype, device and config passes besides its tensors."""

    out_shape: tuple[int, ...]
    mosaic_shape: tuple[int, ...] | None  # None: no pyramid level builds a mosaic
    table_key: tuple
    launches: tuple[tuple[tuple[int, int], tuple[int, ...]], ...]  # (grid, scalar arguments) of each launch
    constants: dict  # the kernel's constexprs and compile options


@functools.lru_cache(maxsize=1024)
def _call(shape: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype, vec: int, interpreted: bool,
          config: STGridPoolConfig) -> Call:
    """A call's arguments, worked out once (a call then costs one cache look-up, two allocations and its
    launches); the output and mosaic buffers are contiguous, so their strides follow from their shapes.
    Host-side values only: evicting one frees nothing on a device."""
    batch, num_frames, height, width, dim = shape
    table_key = (num_frames, height, width, config.grid_sizes, config.grid_strides)
    plan = steps(*table_key)
    out_h, out_w = config.output_grid(height, width)
    tokens = max(resize + pooled * out_h * out_w for _, resize, *_, pooled in plan.launches)
    block = blocks(config.kernel_size, dim, dtype.itemsize, tokens if interpreted else None)
    out_shape = (batch, num_frames, out_h, out_w, dim)
    mosaic_shape = (batch, plan.num_mosaics, height, width, dim) if plan.num_mosaics else None
    sizes = (out_h * out_w * dim, out_w * dim, dim)
    out_strides = (num_frames * sizes[0], *sizes)
    frame = height * width * dim
    mosaic_strides = (plan.num_mosaics * frame, frame, width * dim, dim) if mosaic_shape else out_strides
    # A stride along a dimension of size 1 is never used: 0 keeps it an int32 whatever the layout.
    used = [stride if size > 1 else 0 for stride, size in zip(strides, shape)]
    if batch == 1:
        mosaic_strides, out_strides = (0, *mosaic_strides[1:]), (0, *out_strides[1:])
    floats = (*_halves(config.temperature), *_halves(config.norm_p), *_halves(dim ** (-1.0 / config.norm_p)))
    common = (*used, *mosaic_strides, *out_strides, height, width, dim, out_h, out_w, config.kernel_size)
    launched = []
    for resize_at, resize_tokens, tile_h, tile_w, span_h, span_w, pool_at, pooled in plan.launches:
        pool_tokens = pooled * out_h * out_w
        resize_programs = -(-resize_tokens // block.BLOCK_J)
        programs = resize_programs + -(-pool_tokens // block.BLOCK_J)
        if programs:
            args = (resize_at, resize_tokens, resize_programs, tile_h, tile_w, span_h, span_w, pool_at, pool_tokens)
            launched.append(((programs, batch), (*common, *args, *floats)))
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    constants = dict(NORM=NORM_KINDS.get(config.norm_p, 0), **block._asdict(), VEC=vec,
                     ACC=_triton_type(compute), DTYPE=_triton_type(dtype), BF16=dtype == torch.bfloat16,
                     LIMIT=float(torch.finfo(dtype).max), TINY=float(torch.finfo(compute).tiny), **OPTIONS)
    return Call(out_shape, mosaic_shape, table_key, tuple(launched), constants)


def run(videos: torch.Tensor, config: STGridPoolConfig) -> torch.Tensor:
    """ST-GridPool of (B, T, H, W, D) ``videos`` -> (B, T, H', W', D), in L + 1 launches (module docstring)."""
    if videos.device.type == "meta":  # shapes only
        out_h, out_w = config.output_grid(videos.shape[2], videos.shape[3])
        return videos.new_empty(*videos.shape[:2], out_h, out_w, videos.shape[4])
    call = _call(tuple(videos.shape), videos.stride(), videos.dtype, _vector_width(videos), _interpreted(), config)
    out = videos.new_empty(call.out_shape)
    if out.numel() == 0:
        return out
    mosaics = videos.new_empty(call.mosaic_shape) if call.mosaic_shape else out
    kernel = _kernel()
    # On the input's device and its current stream, whichever device is current.
    with torch.cuda.device(videos.device) if videos.device.type == "cuda" else contextlib.nullcontext():
        table = step_table(call.table_key, videos.device)
        for grid, args in call.launches:
            kernel[grid](videos, mosaics, out, table, *args, **call.constants)
    return out


@functools.cache
def _kernel():
    from vllm_stgridpool.stage.triton_kernels import stage_level_kernel  # imports triton: only when the stage runs

    return stage_level_kernel


def _triton_type(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16}[dtype]


# --------------------------------------------------------------------------
# start-up: every variant a server can reach, compiled before the first request
# --------------------------------------------------------------------------


def reachable_kernel_sizes(settings: STGridPoolSettings, height: int, width: int) -> tuple[int, ...]:
    """Kernel sizes a video can run with: the server's; with request overrides, any larger one that fits
    the grid (a request may not shrink it); a token budget raises it up to ``max_kernel_size``."""
    k = settings.pool.kernel_size
    fits = min(height, width, MAX_KERNEL_SIZE)
    largest = fits if settings.allow_request_overrides else k
    if settings.allow_request_overrides or settings.max_video_tokens is not None:
        largest = max(largest, min(settings.max_kernel_size, fits))
    return tuple(range(k, largest + 1))


def reachable_variants(settings: STGridPoolSettings, height: int, width: int) -> tuple[STGridPoolConfig, ...]:
    """One config per kernel variant the server can reach (a kernel size of each block class, each norm
    kind), without a pyramid (a variant does not depend on it)."""
    norms = (2.0, 1.0, 3.0) if settings.allow_request_overrides else (settings.pool.norm_p,)
    by_class = {blocks(k, 1, 1).BLOCK_W: k for k in reachable_kernel_sizes(settings, height, width)}
    return tuple(STGridPoolConfig(grid_sizes=(), grid_strides=(), kernel_size=k, norm_p=p)
                 for k in by_class.values() for p in norms)


class WarmUp(NamedTuple):
    variants: int  # calls run to compile (none under the interpreter)
    tables: int  # step tables put on the device
    seconds: float


def warm_up(settings: STGridPoolSettings, height: int, width: int, dims: Sequence[int], dtype: torch.dtype,
            device: torch.device | str) -> WarmUp:
    """What the engine runs while it starts, so that no request compiles or copies: one call on a one-frame
    video per reachable variant (:func:`reachable_variants`) at each of ``dims`` (D values the stage may see;
    Triton compiles a variant on its first call, or loads it from its cache on disk) and the step tables of
    the server's pyramid, and of none, at every frame count up to ``max_frames``. Under the interpreter
    nothing compiles: the tables only."""
    started = time.perf_counter()
    device = torch.empty(0, device=device).device  # with its index, as a tensor's
    calls = 0
    if not _interpreted():
        for dim in dims:
            frame = torch.zeros(1, 1, height, width, dim, dtype=dtype, device=device)
            for config in reachable_variants(settings, height, width):
                run(frame, config)
                calls += 1
    pool = settings.pool
    keys = {(t, height, width, grid_sizes, grid_strides) for t in range(1, settings.max_frames + 1)
            for grid_sizes, grid_strides in ((pool.grid_sizes, pool.grid_strides), ((), ()))}
    for key in sorted(keys):
        step_table(key, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    logger.info("ST-GridPool's Triton stage warmed up on %s in %.1f s: %d kernel calls (D=%s, %s), %d step tables",
                device, seconds, calls, "/".join(map(str, dims)), str(dtype).removeprefix("torch."), len(keys))
    return WarmUp(calls, len(keys), seconds)


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
