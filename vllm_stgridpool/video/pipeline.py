"""One video from its upload to its frames: a decoder, the caller's checks of the header, admission, decoding.

The loader hands :func:`decode_video` the upload's path and a ``plan``
(its checks of the header: the server's limits, the frames to sample and
their bytes). A video alone in its request whose bytes fit the budget now
keeps its decoder from header to frames. Otherwise it gives the decoder
back and waits without one: for its bytes, or (with siblings) for the
request's other headers (:class:`~vllm_stgridpool.video.admission.VideoRequest`),
the request being admitted or refused as a whole before any of its videos
is decoded; then it opens again for its frames. Either way the bytes stay
reserved until the frames are garbage.

The process's pool, budget and parking are made on first use from the
environment (``STGRIDPOOL_VIDEO_DECODE_WORKERS`` 0: decoding in this
process, under the same deadline and budget).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from vllm_stgridpool import envs
from vllm_stgridpool.video.admission import Deadline, FrameBudget, Member, Parking
from vllm_stgridpool.video.decode_pool import DecodePool, LocalDecoders, WorkerMisbehaved
from vllm_stgridpool.video.decoder import VideoHeader
from vllm_stgridpool.video.limits import VideoLimits

__all__ = ["decode_video", "shared_budget", "shared_decode_pool", "shared_parking"]

# plan(header) -> (frame indices, decoded bytes, anything the caller wants back); raises to refuse the video.
Plan = Callable[[VideoHeader], tuple[list[int], int, Any]]


def decode_video(
    path: str, limits: VideoLimits, plan: Plan, deadline: Deadline, member: Member | None
) -> tuple[np.ndarray, Any]:
    """``(frames, planned)``: the frames ``plan`` chose, held in the budget until they are garbage."""
    decoders, budget = shared_decode_pool(), shared_budget(limits)
    alone = member is None or len(member.request.members) == 1
    try:
        deadline.check_not_late()
        if member is not None:
            member.check_outcome()  # another video of the request failed already: no work for this one
        with decoders.worker(deadline) as decoder:
            header = decoder.open(path, limits.max_video_pixels, limits.max_video_packets, deadline)
            indices, nbytes, planned = plan(header)
            if alone and budget.try_acquire(nbytes):  # its bytes are free: decode with the worker it has
                return _decode_held(decoder, indices, header, nbytes, deadline, budget), planned
            decoder.close(deadline)  # wait for the budget (and the request's other videos) without a worker
        if member is not None:
            member.admit(nbytes, budget, deadline, shared_parking())
        else:
            budget.acquire(nbytes, deadline)
    except BaseException as error:
        if member is not None:
            member.fail(error)
        raise
    try:
        with decoders.worker(deadline) as decoder:
            again = decoder.open(path, limits.max_video_pixels, limits.max_video_packets, deadline)
            if again != header:
                decoder.retire()
                raise WorkerMisbehaved(f"the video decoder process read {again} where it had read {header}")
            frames = decoder.decode(indices, header, nbytes, deadline)
    except BaseException:
        budget.release(nbytes)
        raise
    budget.hold_until_released(frames, nbytes)
    return frames, planned


def _decode_held(decoder, indices: list[int], header: VideoHeader, nbytes: int, deadline: Deadline, budget):
    """Decode with ``nbytes`` already reserved: given back if decoding fails, else held until the frames go."""
    try:
        frames = decoder.decode(indices, header, nbytes, deadline)
    except BaseException:
        budget.release(nbytes)
        raise
    budget.hold_until_released(frames, nbytes)
    return frames


_lock = threading.Lock()
_pools: dict[int, DecodePool | LocalDecoders] = {}
_budget: FrameBudget | None = None
_parking: Parking | None = None


def shared_decode_pool() -> DecodePool | LocalDecoders:
    """This process's decoders: a pool of ``STGRIDPOOL_VIDEO_DECODE_WORKERS`` workers started on first use.

    (A server reads the variable once; a benchmark that changes it gets a
    second pool, to compare decoding in workers with decoding in-process.)
    """
    size = envs.STGRIDPOOL_VIDEO_DECODE_WORKERS
    with _lock:
        if size not in _pools:
            # As many videos may wait for a worker as vLLM runs loaders at once (or 2 per worker): the
            # bound bites when VLLM_MEDIA_LOADING_THREAD_COUNT is raised; the deadline bounds the wait.
            waiting = max(2 * size, _media_threads())
            memory = envs.STGRIDPOOL_VIDEO_WORKER_MEMORY_BYTES
            _pools[size] = DecodePool(size, memory, max_waiting=waiting) if size else LocalDecoders()
        return _pools[size]


def shared_budget(limits: VideoLimits) -> FrameBudget:
    """This process's budget of decoded frames (its capacity follows ``limits``)."""
    global _budget
    with _lock:
        if _budget is None:
            _budget = FrameBudget(limits.decode_budget_bytes)
        _budget.capacity = limits.decode_budget_bytes
        return _budget


def shared_parking() -> Parking:
    """Room for videos waiting for their siblings: one less than vLLM's media threads."""
    global _parking
    with _lock:
        if _parking is None:
            _parking = Parking(_media_threads())
        return _parking


def _media_threads() -> int:
    """How many loaders vLLM runs at once: its media thread pool's size."""
    from vllm import envs as vllm_envs

    return vllm_envs.VLLM_MEDIA_LOADING_THREAD_COUNT
