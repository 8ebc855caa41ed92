"""The video-token budget: which frames and kernel make a video fit ``max_video_tokens``.

ST-GridPool's cost is exact before the model runs, so a video can be fitted
to a budget from shapes alone, on the host: the processor's placeholder
count, the engine's KV-cache allocation and the stage all follow the same
choice. The rule, for a video of ``T`` frames and a budget ``B``:

1. Keep the configured kernel while at least ``min(min_frames, T)`` frames
   fit in ``B``, taking as many frames as fit (all ``T`` if they do).
2. Otherwise raise the kernel one step at a time, up to ``max_kernel_size``,
   until ``min(min_frames, T)`` frames fit, and take as many as fit.
3. If even the largest kernel holds fewer, take as many frames as fit there
   (down to one), at the smallest kernel that holds that many.
4. If not even one frame fits at the largest kernel, the request is refused,
   naming the smallest budget that works.

The rule is idempotent: the video sampled down to its chosen frames gets the
same choice again, which is what lets the processor, the prompt update and
the model each recompute it from the frames they see.

Fewer frames are sampled uniformly over the ``T`` decoded ones, with the
formula vLLM's video loaders use, so a budgeted video looks like the loader
had sampled fewer frames in the first place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from vllm_stgridpool.config import STGridPoolConfigError


class VideoFit(NamedTuple):
    """How one video is run: ``frames`` of its frames at ``kernel_size``, costing ``tokens``."""

    frames: int
    kernel_size: int
    tokens: int
    limited: bool  # the budget changed the frame count or the kernel


TokenCount = Callable[[int, int], int]  # (frames, kernel_size) -> placeholder tokens of the video


def fit_video(
    num_frames: int,
    kernel_size: int,
    budget: int | None,
    *,
    min_frames: int,
    max_kernel_size: int,
    tokens: TokenCount,
    kernel_fits: Callable[[int], bool],
) -> VideoFit:
    """Apply the rule above. ``tokens`` must grow with frames and not grow with the kernel."""
    if budget is None or tokens(num_frames, kernel_size) <= budget:
        return VideoFit(num_frames, kernel_size, tokens(num_frames, kernel_size), False)
    wanted = min(min_frames, num_frames)
    kernels = [k for k in range(kernel_size, max(max_kernel_size, kernel_size) + 1) if kernel_fits(k)]
    for kernel in kernels:
        frames = frames_that_fit(num_frames, kernel, budget, tokens)
        if frames >= wanted:
            return VideoFit(frames, kernel, tokens(frames, kernel), True)
    largest = kernels[-1]
    if frames == 0:
        raise STGridPoolConfigError(
            f"max_video_tokens {budget} cannot hold even one frame of this video at the largest "
            f"kernel_size {largest} (max_kernel_size); use max_video_tokens >= {tokens(1, largest)}"
        )
    # Fewer than wanted fit even at the largest kernel: keep those frames, at the smallest
    # kernel that holds them (the same answer for the video once sampled down to them).
    kernel = next(k for k in kernels if tokens(frames, k) <= budget)
    return VideoFit(frames, kernel, tokens(frames, kernel), True)


def frames_that_fit(num_frames: int, kernel: int, budget: int, tokens: TokenCount) -> int:
    """The most frames (at most ``num_frames``) whose tokens fit ``budget`` (binary search)."""
    low, high = 0, num_frames
    while low < high:
        middle = (low + high + 1) // 2
        if tokens(middle, kernel) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def sample_frames(num_frames: int, keep: int) -> list[int]:
    """``keep`` of ``num_frames`` frame indices, spread as vLLM's loaders spread them."""
    if keep >= num_frames:
        return list(range(num_frames))
    return np.linspace(0, num_frames - 1, keep, dtype=int).tolist()
