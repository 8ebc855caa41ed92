"""Token-saving counters on the server's ``/metrics`` endpoint.

The vLLM processor runs in the API server process, which serves
``/metrics`` from prometheus_client's registry (or, with several API
servers, from its multiprocess directory, which prometheus_client counters
write to by themselves), so plain prometheus_client counters are enough:
no patch to vLLM's metrics is needed.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading

logger = logging.getLogger("vllm.stgridpool")

_lock = threading.Lock()
_counters = None
_profiling = contextvars.ContextVar("stgridpool_profiling", default=False)


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
            )
        return _counters


@contextlib.contextmanager
def profiling():
    """Dummy inputs built for memory profiling are not user traffic: don't count them."""
    token = _profiling.set(True)
    try:
        yield
    finally:
        _profiling.reset(token)


def record_video(*, num_frames: int, tokens: int, stock_tokens: int) -> None:
    if _profiling.get():
        return
    emitted, saved, videos = _get_counters()
    emitted.inc(tokens)
    saved.inc(max(stock_tokens - tokens, 0))
    videos.inc()
    logger.debug(
        "stgridpool: video of %d frames -> %d tokens (stock %d, saved %d)",
        num_frames,
        tokens,
        stock_tokens,
        stock_tokens - tokens,
    )



def read_counter(metrics_text: str, name: str) -> float:
    """A counter's value in a ``/metrics`` page (0 when absent): how clients read the savings back."""
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
