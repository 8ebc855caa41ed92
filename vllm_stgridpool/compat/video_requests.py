"""Tell the plugin's video loader which request a video belongs to, and when that request's media loading began.

vLLM 0.32 (and 0.33) resolves a chat request's media concurrently
(``AsyncMultiModalItemTracker.resolve_items`` gathers its items), each on
its media thread pool (``vllm.multimodal.media.connector.global_thread_pool``,
8 threads, an unbounded queue). A loader then sees one video at a time: not
the request's other videos, nor how long the job waited in that queue. This
makes both visible, for ``video/admission.py``:

* ``resolve_items`` gives each video item a ``Member`` of one
  ``VideoRequest`` (stamped with the time media loading began) in a context
  variable of that item's task;
* the media pool runs each job in the context of the task that submitted
  it, as ``asyncio.to_thread`` does, so the loader reads the variable.

Nothing else changes: a job runs on the same threads, in the same order.
Ledger entry: patches/README.md, P10.
"""

from __future__ import annotations

import atexit
import contextvars
import functools
from concurrent.futures import ThreadPoolExecutor

from vllm_stgridpool.compat import Feature, Guard


class ContextThreadPool(ThreadPoolExecutor):
    """A thread pool whose jobs run in a copy of the submitter's context (as ``asyncio.to_thread``'s do)."""

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)


TRACKER_MODULE = "vllm.renderers.chat_utils"
CONNECTOR_MODULE = "vllm.multimodal.media.connector"
GUARD = Guard(
    "P10",
    "a request's videos known to the loader, from the request's arrival",
    (
        Feature(TRACKER_MODULE, "AsyncMultiModalItemTracker.resolve_items"),
        Feature(CONNECTOR_MODULE, "global_thread_pool"),
    ),
)


def apply(vllm_version: str) -> bool:
    """Wrap ``resolve_items`` and swap the media pool where :data:`GUARD` holds; returns whether it did."""
    if not GUARD.applies(vllm_version):
        return False
    import importlib

    from vllm import envs as vllm_envs

    tracker = importlib.import_module(TRACKER_MODULE).AsyncMultiModalItemTracker
    if not getattr(tracker.resolve_items, "_stgridpool", False):
        tracker.resolve_items = _as_one_video_request(tracker.resolve_items)
    connector = importlib.import_module(CONNECTOR_MODULE)
    old = connector.global_thread_pool
    if not isinstance(old, ContextThreadPool):
        pool = ContextThreadPool(vllm_envs.VLLM_MEDIA_LOADING_THREAD_COUNT, thread_name_prefix="stgridpool-media")
        connector.global_thread_pool = pool
        atexit.register(pool.shutdown)
        old.shutdown(wait=False)  # (its threads start with the first job: none yet)
    return True


def _as_one_video_request(resolve_items):
    @functools.wraps(resolve_items)
    async def resolve_items_as_one_video_request(self, *args, **kwargs):
        from vllm_stgridpool.video.admission import VideoRequest

        items = getattr(self, "_items_by_modality", None)
        videos = items.get("video") if isinstance(items, dict) else None
        if not videos:
            return await resolve_items(self, *args, **kwargs)
        request = VideoRequest()
        items["video"] = [_as_member(item, request.add_member()) for item in videos]
        try:
            return await resolve_items(self, *args, **kwargs)
        finally:
            items["video"] = videos

    resolve_items_as_one_video_request._stgridpool = True
    return resolve_items_as_one_video_request


def _as_member(item, member):
    """``item`` (a coroutine function) run as ``member``: the loader sees it; its end, however, settles it."""
    from vllm_stgridpool.video.admission import CURRENT_MEMBER

    async def load():
        CURRENT_MEMBER.set(member)  # gather runs each item as a task of its own: this is its context only
        try:
            return await item()
        except BaseException as error:
            member.fail(error)
            raise
        finally:
            member.done()

    return load
