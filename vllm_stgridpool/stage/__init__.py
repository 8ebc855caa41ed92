"""The ST-GridPool stage: :func:`st_gridpool` chooses one backend per call and hands it the whole call.

Every backend runs the same shape-only :class:`~vllm_stgridpool.stage.plan.Plan` and computes the same
formulas in the same precisions (:mod:`~vllm_stgridpool.stage.torch_ops` states them):

- :mod:`~vllm_stgridpool.stage.cpu_kernels`: fused C++ kernels, one call per video (CPU; float32,
  bfloat16, float64; norms 1 and 2);
- :mod:`~vllm_stgridpool.stage.triton_stage`: L + 1 Triton launches per call for L pyramid levels (CUDA);
- :mod:`~vllm_stgridpool.stage.torch_ops`: PyTorch ops, every device and every call the others do not take.

:mod:`~vllm_stgridpool.stage.backend` chooses (``STGRIDPOOL_STAGE_BACKEND``);
:mod:`~vllm_stgridpool.stage.compiled` is what ``torch.compile`` sees; :mod:`~vllm_stgridpool.stage.cost`
prices a call for the request rules.
"""

from __future__ import annotations

import torch

from vllm_stgridpool.config import STGridPoolConfig
from vllm_stgridpool.stage import backend, compiled, cpu_kernels, torch_ops, triton_stage

__all__ = ["st_gridpool"]

RUNNERS = {backend.CPU_KERNELS: cpu_kernels.run, backend.TRITON: triton_stage.run, backend.TORCH: torch_ops.run}


def st_gridpool(x: torch.Tensor, config: STGridPoolConfig | None = None) -> torch.Tensor:
    """ST-GridPool of (T, H, W, D) or (B, T, H, W, D) features -> (.., T, H', W', D).

    Each video of a batch is pooled on its own: PTG never mixes videos.
    The stage is training-free and computes no gradients, whatever the grad
    mode (vLLM's CPU warm-up runs the model with grad enabled; the stage's
    in-place writes and opaque ops have no backward): the output never
    requires grad.
    """
    config = STGridPoolConfig() if config is None else config
    _check_features(x, config)
    batched = x.dim() == 5
    videos = x if batched else x.unsqueeze(0)
    with torch.no_grad():
        if torch.compiler.is_compiling():
            out = compiled.compiled_stage(videos, config)
        else:
            out = RUNNERS[backend.for_call(videos, config.norm_p)](videos, config)
    return out if batched else out.squeeze(0)


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
