"""The stage's fused CPU kernels (``csrc/``): NSP reading each window once, area resize into the mosaics,
and a video's whole plan in one call.

PyTorch ops take five passes over the tokens for NSP (norms, one
multiply-add per window offset, a finishing pass) and cost about three reads
of the features; the kernel costs about one. The resize kernel writes each
tile straight into its places in the mosaics instead of resizing and
copying. ``run_plan`` walks a video's plan in C++: one call per video
instead of one per step. They are built by torch's C++ extension loader on
first use and cached per machine (about 20 s once; ``make setup`` builds
them ahead). They need GCC 12 or later, or Clang (vector extensions,
``__builtin_shufflevector``). Where they cannot be built (no such
compiler), one warning says why and the stage keeps its PyTorch-ops path,
which is also the path of every other device; the tests run both.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import threading
from pathlib import Path

import torch

from vllm_stgridpool.config import STGridPoolConfig
from vllm_stgridpool.stage.plan import Plan, PoolFrames, PoolMosaics, Resize, plan_for

__all__ = ["applies", "takes", "takes_call", "run", "norm_pool_into", "area_resize_into", "run_plan", "load",
           "disabled"]

logger = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
NORMS = (1.0, 2.0)

_lock = threading.Lock()
_kernels = None  # torch.ops.stgridpool once built
_tried = False
_disabled = False


def load():
    """The kernels' op namespace (``norm_pool_into``, ``area_resize_into``, ``run_plan``), building them on the
    first call; None (and one warning) where they cannot be built."""
    global _kernels, _tried
    if _tried:  # the stage asks once per step: no lock once the build has been tried
        return _kernels
    with _lock:
        if not _tried:
            try:
                _kernels = _build()
            except Exception as error:  # a missing compiler, a failed build: the PyTorch-ops path stays
                reason = " ".join(str(error).split())[-400:]  # a failed build's message ends with its cause
                logger.warning("ST-GridPool: the fused CPU kernels could not be built (%s: %s); the stage runs "
                               "as PyTorch ops, 1.6x to 3x slower", type(error).__name__, reason)
            _tried = True  # after _kernels: a thread that skips the lock never sees a build in progress
    return _kernels


def _build():
    from torch.utils.cpp_extension import load as load_extension

    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "DEFAULT", ...
    flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else [])
    # The capability is in the name, so a cache shared by machines of different CPUs never mixes builds,
    # and so is a digest of every source and header (torch's loader rebuilds on a changed source only).
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in SOURCES + HEADERS)).hexdigest()[:12]
    name = f"stgridpool_kernels_{capability.lower()}_{digest}"
    load_extension(name, [str(path) for path in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                   is_python_module=False, verbose=False)
    return torch.ops.stgridpool


def applies(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the kernels take features of this device and dtype (they are built here on the first yes)."""
    return not _disabled and device_type == "cpu" and dtype in DTYPES and load() is not None


def takes(device_type: str, dtype: torch.dtype, norm_p: float) -> bool:
    """Whether the kernels take a call on features of this device, dtype and norm (1 or 2)."""
    return norm_p in NORMS and applies(device_type, dtype)


def takes_call(videos: torch.Tensor, norm_p: float) -> bool:
    """Whether :func:`run` takes these (B, T, H, W, D) ``videos`` now: :func:`takes`, D innermost, and the code
    is not being traced (``torch.compile`` sees the kernels through ``compiled.eager_stage``)."""
    return (videos.stride(-1) == 1 and not torch.compiler.is_compiling()
            and takes(videos.device.type, videos.dtype, norm_p))


def run(videos: torch.Tensor, config: STGridPoolConfig, mosaics_only: bool = False) -> torch.Tensor:
    """The whole stage on (B, T, H, W, D) ``videos``, one :func:`run_plan` call per video, where
    :func:`takes_call` said yes: rows as ``torch_ops.apply_plan`` says."""
    from vllm_stgridpool.stage.torch_ops import new_output

    plan = plan_for(videos, config)
    out = new_output(videos, plan, mosaics_only)
    for frames, pooled in zip(videos.unbind(0), out.unbind(0)):
        buffers = frames.new_empty(plan.num_slots, *frames.shape[1:])  # the mosaics being built or read
        run_plan(frames, pooled, buffers, plan, config.kernel_size, config.temperature, config.norm_p,
                 mosaics_only)
    return out


def norm_pool_into(x: torch.Tensor, out: torch.Tensor, kernel_size: int, temperature: float, norm_p: float) -> None:
    """NSP of ``x`` (N, H, W, D) or (H, W, D), D innermost, written into ``out`` (the kernel on its own)."""
    if x.dim() == 3:
        x, out = x.unsqueeze(0), out.unsqueeze(0)
    load().norm_pool_into(x, out, kernel_size, temperature, norm_p)


def area_resize_into(frame: torch.Tensor, places: list[torch.Tensor], height: int, width: int) -> None:
    """``frame`` (H, W, D) resized to (height, width) by area interpolation, written into each of ``places``
    ((rows, cols, D) views, rows <= height and cols <= width: the tile's top-left part); the kernel on its own."""
    load().area_resize_into(frame, places, height, width)


def run_plan(
    frames: torch.Tensor, pooled: torch.Tensor, buffers: torch.Tensor, plan: Plan, kernel_size: int,
    temperature: float, norm_p: float, mosaics_only: bool = False,
) -> None:
    """One video's ``plan`` in one call: ``frames`` (T, H, W, D) pooled into
    ``pooled`` (rows as ``torch_ops.apply_plan`` says), mosaics built in ``buffers`` (plan.num_slots, H, W, D).

    The steps are those ``torch_ops.apply_plan`` otherwise walks in Python, a kernel call each; here the C++ side
    walks them, which saves about a hundred calls per 64-frame video.
    """
    load().run_plan(frames, pooled, buffers, _program(plan, mosaics_only), kernel_size, temperature, norm_p)


POOL_FRAMES, RESIZE, POOL_MOSAIC = 0, 1, 2  # run_plan's step codes (csrc/run_plan.cpp)


@functools.lru_cache(maxsize=256)
def _program(plan: Plan, mosaics_only: bool) -> tuple[int, ...]:
    """``plan``'s steps as the flat integers run_plan reads, mosaics named by their buffers:
    POOL_FRAMES start stop; RESIZE from_input source height width count (slot top left rows cols) x count;
    POOL_MOSAIC slot row."""
    program: list[int] = []
    for step in plan.steps:
        if isinstance(step, PoolFrames) and not mosaics_only:
            program += [POOL_FRAMES, step.start, step.stop]
        elif isinstance(step, Resize):
            for source, places in zip(step.sources, step.places):
                program += [RESIZE, int(step.from_input), source if step.from_input else plan.slots[source],
                            *step.size, len(places)]
                for place in places:
                    program += [plan.slots[place.mosaic], place.top, place.left, place.rows, place.cols]
        elif isinstance(step, PoolMosaics):
            for mosaic, frame in zip(step.mosaics, step.frames):
                program += [POOL_MOSAIC, plan.slots[mosaic], plan.pooled_row(frame, mosaics_only)]
    return tuple(program)


@contextlib.contextmanager
def disabled():
    """The PyTorch-ops path on CPU too, inside the block (tests compare the two paths)."""
    global _disabled
    before, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = before


if __name__ == "__main__":  # make setup: build ahead, say where things stand
    logging.basicConfig(level=logging.WARNING)
    print("ST-GridPool CPU kernels:", "built" if load() is not None else "not built (the PyTorch-ops path serves)")
