"""Which code runs the stage, chosen in one place: ``STGRIDPOOL_STAGE_BACKEND``.

- ``cpu-kernels``: the fused C++ kernels (:mod:`vllm_stgridpool.stage.cpu_kernels`) where they apply (CPU tensors of
  float32, bfloat16 or float64, norms 1 and 2), PyTorch ops elsewhere.
- ``triton``: the Triton kernels (:mod:`vllm_stgridpool.stage.triton_stage`), L + 1 launches per call. They run on
  CUDA (and ROCm) tensors; on CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``), which is
  how the tests run them.
- ``torch``: PyTorch ops on every device (the kernels of neither kind).
- ``auto`` (the default): ``cpu-kernels`` on CPU, ``triton`` on CUDA where Triton imports, else ``torch``.

A choice that cannot run on the engine's device is refused when the engine starts (:func:`announce`),
with the reason, rather than on the first video.
"""

from __future__ import annotations

import functools
import logging

from vllm_stgridpool import envs

__all__ = ["AUTO", "CPU_KERNELS", "TRITON", "TORCH", "CHOICES", "for_device", "for_call", "announce"]

logger = logging.getLogger("vllm.stgridpool")  # under vLLM's logger: its handlers print it

AUTO, CPU_KERNELS, TRITON, TORCH = "auto", "cpu-kernels", "triton", "torch"
CHOICES = (AUTO, CPU_KERNELS, TRITON, TORCH)

_announced = False


def chosen() -> str:
    """``STGRIDPOOL_STAGE_BACKEND``, checked."""
    choice = envs.STGRIDPOOL_STAGE_BACKEND
    if choice not in CHOICES:
        raise ValueError(f"STGRIDPOOL_STAGE_BACKEND={choice!r} is not one of {', '.join(CHOICES)}")
    return choice


def for_device(device_type: str) -> str:
    """The backend that runs the stage on features of this device type: cpu-kernels, triton or torch."""
    choice = chosen()
    if choice == AUTO:
        if device_type == "cpu":
            return CPU_KERNELS
        return TRITON if device_type == "cuda" and _triton_imports() else TORCH
    if choice == TRITON:
        reason = _triton_cannot_run(device_type)
        if reason:
            raise ValueError(f"STGRIDPOOL_STAGE_BACKEND=triton cannot run the stage on {device_type} tensors: "
                             f"{reason}; choose one of auto, cpu-kernels, torch")
    return choice


def for_call(videos, norm_p: float) -> str:
    """The backend that runs this whole call on (B, T, H, W, D) ``videos``: the device's, except that CPU
    calls the fused kernels do not take (float16, norms other than 1 and 2, D not innermost) run as PyTorch
    ops. Chosen once per call: the chosen backend never asks another one for a step."""
    choice = for_device(videos.device.type)
    if choice == CPU_KERNELS:
        from vllm_stgridpool.stage import cpu_kernels

        return CPU_KERNELS if cpu_kernels.takes_call(videos, norm_p) else TORCH
    return choice


def announce(device_type: str) -> str:
    """The backend for the engine's device, logged once per process (the model calls this at start-up)."""
    global _announced
    backend = for_device(device_type)
    if not _announced:
        _announced = True
        logger.info("ST-GridPool stage backend: %s on %s (STGRIDPOOL_STAGE_BACKEND=%s)", backend, device_type,
                    chosen())
    return backend


def _triton_cannot_run(device_type: str) -> str | None:
    """Why the Triton kernels cannot run on tensors of this device type, or None."""
    if not _triton_imports():
        return "triton does not import here"
    if device_type == "cuda" or device_type == "meta":  # meta: shapes only, nothing launched
        return None
    if device_type == "cpu":
        import triton

        return None if triton.knobs.runtime.interpret else "on CPU it runs only under TRITON_INTERPRET=1"
    return "Triton kernels run on CUDA tensors"


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or a broken install: the other backends serve
        return False
    return True
