"""The stage under ``torch.compile``: what the compiler sees of each backend.

The Triton stage and the fused CPU kernels are each one opaque op (the compiler cannot trace into
either). On other devices the pooling of every frame is left to the compiler, which fuses NSP into two
passes over the features; the pyramid and its mosaics' pooling run as one opaque op, the eager code:
the compiler schedules PTG's many small steps poorly (every mosaic held at once, the frames read again
long after they left the cache).
"""

from __future__ import annotations

import torch

from vllm_stgridpool.config import STGridPoolConfig
from vllm_stgridpool.stage import backend, cpu_kernels, torch_ops, triton_stage
from vllm_stgridpool.stage.plan import make_plan

__all__ = ["compiled_stage", "eager_stage"]


def compiled_stage(videos: torch.Tensor, config: STGridPoolConfig) -> torch.Tensor:
    """(B, T, H, W, D) -> (B, T, H', W', D) as the compiler should see it."""
    plan_args = (list(config.grid_sizes), list(config.grid_strides), config.kernel_size, config.temperature,
                 config.norm_p)
    chosen = _backend(videos.device.type)
    if chosen == backend.TRITON:  # the whole stage: one opaque op, L + 1 launches
        return triton_stage.triton_stage(videos, *plan_args)
    if chosen == backend.CPU_KERNELS and _kernels_take(videos.dtype, config.norm_p):
        return eager_stage(videos, *plan_args, False, videos.shape[1])
    pooled = torch_ops.norm_pool(videos, config.kernel_size, config.temperature, config.norm_p)
    replaced = _replaced_frames(*videos.shape[1:4], config)
    if replaced:
        mosaics = eager_stage(videos, *plan_args, True, len(replaced))
        pooled.index_copy_(1, torch.tensor(replaced, device=videos.device), mosaics)
    return pooled


@torch.library.custom_op("stgridpool::eager_stage", mutates_args=())
def eager_stage(
    videos: torch.Tensor, grid_sizes: list[int], grid_strides: list[int], kernel_size: int, temperature: float,
    norm_p: float, mosaics_only: bool, rows: int,
) -> torch.Tensor:
    """The eager stage on (B, T, H, W, D) ``videos`` as one op: (B, rows, H', W', D), every frame (rows = T)
    or, with ``mosaics_only``, the ``rows`` pooled mosaics that replace frames; the CPU kernels' backend where
    they take the call, else PyTorch ops."""
    config = STGridPoolConfig(grid_sizes=tuple(grid_sizes), grid_strides=tuple(grid_strides),
                              kernel_size=kernel_size, temperature=temperature, norm_p=norm_p)
    eager = cpu_kernels if backend.for_call(videos, norm_p) == backend.CPU_KERNELS else torch_ops
    return eager.run(videos, config, mosaics_only=mosaics_only)


@eager_stage.register_fake
def _(videos, grid_sizes, grid_strides, kernel_size, temperature, norm_p, mosaics_only, rows):
    out_grid = STGridPoolConfig(kernel_size=kernel_size).output_grid(videos.shape[2], videos.shape[3])
    return videos.new_empty(videos.shape[0], rows, *out_grid, videos.shape[-1])


@torch.compiler.assume_constant_result
def _replaced_frames(num_frames: int, height: int, width: int, config: STGridPoolConfig) -> tuple[int, ...]:
    """The frames whose final value is a mosaic: a constant to ``torch.compile`` (shapes and config only)."""
    return make_plan(num_frames, height, width, config).replaced


@torch.compiler.assume_constant_result
def _kernels_take(dtype: torch.dtype, norm_p: float) -> bool:
    """A constant to ``torch.compile``: whether the fused CPU kernels take features of this dtype and norm."""
    return cpu_kernels.takes("cpu", dtype, norm_p)


@torch.compiler.assume_constant_result
def _backend(device_type: str) -> str:
    """A constant to ``torch.compile``: :func:`backend.for_device`."""
    return backend.for_device(device_type)
