"""Token-saving counters on the server's ``/metrics`` endpoint.

A video is counted once vLLM has accepted its request (patch P8 in
patches/README.md): the processor only attaches a :class:`VideoRecord` per
video to the engine input it returns. Both run in the API server process,
which serves ``/metrics`` from prometheus_client's registry (or, with
several API servers, from its multiprocess directory, which
prometheus_client counters write to by themselves), so plain
prometheus_client counters need no change to vLLM's metrics code.
"""

from __future__ import annotations

import logging
import threading
from typing import NamedTuple

logger = logging.getLogger("vllm.stgridpool")

# Where the processor puts a request's VideoRecords in the engine input it returns; P8 counts them
# once vLLM has accepted the request.
RECORDS_KEY = "stgridpool_videos"

_lock = threading.Lock()
_counters = None


def _get_counters():
    global _counters
    with _lock:
        if _counters is None:
            from prometheus_client import Counter

            _counters = (
                Counter(
                    "stgridpool_video_tokens",
                    "Video placeholder tokens emitted with ST-GridPool",
                ),
                Counter(
                    "stgridpool_video_tokens_saved",
                    "Video tokens saved against the model's stock pooling",
                ),
                Counter("stgridpool_videos", "Videos processed with ST-GridPool"),
                Counter(
                    "stgridpool_budget_limited_videos",
                    "Videos whose frames or kernel the max_video_tokens budget changed",
                ),
            )
        return _counters


class VideoRecord(NamedTuple):
    """One video as the processor emitted it, counted once vLLM accepts its request."""

    num_frames: int  # as decoded
    tokens: int
    stock_tokens: int  # what the model's stock pooling would have cost for num_frames
    frames_kept: int  # after the token budget (num_frames without one)
    kernel_size: int
    budget_limited: bool = False


def record_video(record: VideoRecord) -> None:
    emitted, saved, videos, limited = _get_counters()
    emitted.inc(record.tokens)
    saved.inc(max(record.stock_tokens - record.tokens, 0))
    videos.inc()
    if record.budget_limited:
        limited.inc()
    logger.debug(
        "stgridpool: video of %d frames -> %d tokens (stock %d, saved %d); kept %d frames at kernel_size %d%s",
        record.num_frames,
        record.tokens,
        record.stock_tokens,
        record.stock_tokens - record.tokens,
        record.frames_kept,
        record.kernel_size,
        " (budget-limited)" if record.budget_limited else "",
    )


def read_counter(metrics_text: str, name: str) -> float:
    """A counter's value in a ``/metrics`` page (0 when absent): how clients read the savings back."""
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
