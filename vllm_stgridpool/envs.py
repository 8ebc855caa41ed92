"""Every environment variable the plugin reads, in one place (as vLLM's ``vllm.envs``).

Read them as attributes, ``envs.VLLM_PLUGINS``: each access reads the
environment anew, so a value set after import (``--plugins`` sets
``VLLM_PLUGINS`` while the command line is parsed) is seen. This module
imports nothing heavy: the start-up hooks import it in every process.
"""

from __future__ import annotations

import os
from typing import Any, Callable


def _optional(name: str) -> Callable[[], str | None]:
    return lambda: os.environ.get(name) or None


def _number(name: str, default: float, kind: type = int, minimum: float = 0) -> Callable[[], Any]:
    """A number of at least ``minimum`` from the environment; anything else is a ValueError naming the variable."""

    def read() -> Any:
        raw = os.environ.get(name)
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if value < minimum:
            raise ValueError(f"{name}={raw!r} must be at least {minimum}")
        return value

    return read


environment_variables: dict[str, Callable[[], Any]] = {
    # vLLM's allowlist of general plugins (``--plugins a,b`` sets it). Naming
    # ``stgridpool`` activates ST-GridPool for every model the server loads.
    "VLLM_PLUGINS": _optional("VLLM_PLUGINS"),
    # vLLM's video loader choice. Set, the plugin leaves the server's loader alone.
    "VLLM_VIDEO_LOADER_BACKEND": _optional("VLLM_VIDEO_LOADER_BACKEND"),
    # Limits on uploaded videos, checked from the container's header before decoding
    # (video/limits.py): frame size in pixels (default 3840 x 2160), decoded RGB bytes of
    # the sampled frames (default 64 frames of 3840 x 2160), and the decoded bytes of all
    # videos decoding at once (0: a quarter of the machine's memory).
    "STGRIDPOOL_MAX_VIDEO_PIXELS": _number("STGRIDPOOL_MAX_VIDEO_PIXELS", 3840 * 2160, minimum=1),
    "STGRIDPOOL_MAX_VIDEO_DECODE_BYTES": _number("STGRIDPOOL_MAX_VIDEO_DECODE_BYTES", 64 * 3840 * 2160 * 3, minimum=1),
    "STGRIDPOOL_VIDEO_DECODE_BUDGET_BYTES": _number("STGRIDPOOL_VIDEO_DECODE_BUDGET_BYTES", 0),
    # Packets (mp4 samples, frames) a video's container may declare or hold, all streams
    # together, checked before FFmpeg builds its index (video/container_check.py).
    "STGRIDPOOL_MAX_VIDEO_PACKETS": _number("STGRIDPOOL_MAX_VIDEO_PACKETS", 1_000_000, minimum=1),
    # The decode pool (decode_pool.py): worker processes (0 decodes in the API server
    # itself, without crash containment).
    "STGRIDPOOL_VIDEO_DECODE_WORKERS": _number("STGRIDPOOL_VIDEO_DECODE_WORKERS", min(4, os.cpu_count() or 1)),
    # One deadline per video from its request's arrival (video/admission.py): at most half of
    # it waiting (HTTP 503 with Retry-After; STGRIDPOOL_VIDEO_DECODE_WAIT_SECONDS waits less,
    # 0: half), opening, seeking and decoding within the whole (HTTP 422 past it). And each
    # decode worker's memory limit (RLIMIT_DATA, decode_worker.py).
    "STGRIDPOOL_VIDEO_DEADLINE_SECONDS": _number("STGRIDPOOL_VIDEO_DEADLINE_SECONDS", 60.0, float, 1.0),
    "STGRIDPOOL_VIDEO_DECODE_WAIT_SECONDS": _number("STGRIDPOOL_VIDEO_DECODE_WAIT_SECONDS", 0.0, float),
    "STGRIDPOOL_VIDEO_WORKER_MEMORY_BYTES": _number("STGRIDPOOL_VIDEO_WORKER_MEMORY_BYTES", 2**30, minimum=2**28),
    # What runs the stage (backend.py): auto (the CPU kernels on CPU, Triton on CUDA where it
    # imports, PyTorch ops otherwise), cpu-kernels, triton or torch.
    "STGRIDPOOL_STAGE_BACKEND": lambda: (os.environ.get("STGRIDPOOL_STAGE_BACKEND") or "auto").strip().lower(),
    # Set by the plugin once it has said that this vLLM is unsupported, so the
    # processes a server spawns do not say it again.
    "STGRIDPOOL_UNSUPPORTED_VLLM_REPORTED": lambda: os.environ.get("STGRIDPOOL_UNSUPPORTED_VLLM_REPORTED") == "1",
}


def check() -> None:
    """Read every variable once: a malformed value stops the server at start-up, naming it, rather than
    failing each request that reads it."""
    for name in environment_variables:
        environment_variables[name]()


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
