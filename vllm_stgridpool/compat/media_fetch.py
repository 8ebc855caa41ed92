"""Answer an unreachable media URL, or unusable video options, with a 4xx instead of a 500.

vLLM 0.32 (and 0.33) treats a ``video_url`` it cannot connect to (refused connection,
unknown host, timeout) as a transient server error: the request fails with
HTTP 500 after retries, and the error escapes to uvicorn, which also drops
the client's keep-alive connection. For a server fed user-supplied URLs the
URL is the problem, so this connector reports it as vLLM's own 422
"unprocessable entity" error, naming the URL and the reason. Likewise a
request's ``media_io_kwargs`` naming a video loader that does not exist
(HTTP 500 "Extension class ... not found") or a ``num_frames`` that is not a
number (HTTP 400 with a bare ``TypeError`` text) get a 400 naming the
option. It is vLLM's ``http`` connector with those changes, registered
under the same name (vLLM chooses connectors by ``VLLM_MEDIA_CONNECTOR``,
default ``http``).
Ledger entry: patches/README.md, P5.
"""

from __future__ import annotations

import asyncio
import logging

from vllm_stgridpool.compat import Feature, Guard

logger = logging.getLogger("vllm.stgridpool")

CONNECTOR_NAME = "http"
_CONNECTOR = "vllm.multimodal.media.connector"
# vLLM 0.32 and 0.33 both let connection errors through (0.33 adds download and decode
# budgets, which the subclass inherits untouched).
GUARD = Guard(
    "P5",
    "unreachable media URLs and unusable video options as client errors",
    (
        Feature(_CONNECTOR, "MEDIA_CONNECTOR_REGISTRY.register"),
        Feature(_CONNECTOR, "MediaConnector.load_from_url", ("url",)),
        Feature(_CONNECTOR, "MediaConnector.load_from_url_async", ("url",)),
        Feature(_CONNECTOR, "MediaConnector.fetch_video", ("video_url",)),
        Feature(_CONNECTOR, "MediaConnector.fetch_video_async", ("video_url",)),
        Feature("vllm.exceptions", "VLLMUnprocessableEntityError"),
        Feature("vllm.multimodal.video", "VIDEO_LOADER_REGISTRY.name2class"),
    ),
)


def apply(vllm_version: str) -> bool:
    """Register the connector where :data:`GUARD` holds; returns whether it did."""
    if not GUARD.applies(vllm_version):
        return False
    from vllm.multimodal.media.connector import MEDIA_CONNECTOR_REGISTRY

    MEDIA_CONNECTOR_REGISTRY.register(CONNECTOR_NAME)(_connector_class())
    return True


def check_video_options(options) -> None:
    """Reject ``media_io_kwargs["video"]`` values vLLM would only fail on deep inside."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    backend = options.get("video_backend")
    if backend is not None and backend not in VIDEO_LOADER_REGISTRY.name2class:
        known = ", ".join(sorted(VIDEO_LOADER_REGISTRY.name2class))
        raise ValueError(f"media_io_kwargs video_backend {backend!r} is not a video loader; use one of: {known}")
    num_frames = options.get("num_frames")
    if num_frames is not None and (
        isinstance(num_frames, bool) or not isinstance(num_frames, int) or not (num_frames == -1 or num_frames >= 1)
    ):
        raise ValueError(f"media_io_kwargs num_frames must be -1 (all) or a whole number >= 1, got {num_frames!r}")
    fps = options.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps != fps):
        raise ValueError(f"media_io_kwargs fps must be a number, got {fps!r}")


def _connector_class():
    import aiohttp
    import requests
    from vllm.exceptions import VLLMUnprocessableEntityError
    from vllm.multimodal.media.connector import MediaConnector

    unreachable = (
        aiohttp.ClientConnectionError,  # async fetch: refused, unknown host, reset
        requests.ConnectionError,  # sync fetch
        requests.Timeout,
        asyncio.TimeoutError,
        TimeoutError,
        ConnectionError,
    )

    def client_error(url: str, error: Exception) -> VLLMUnprocessableEntityError:
        reason = str(error) or type(error).__name__
        return VLLMUnprocessableEntityError(
            f"Could not fetch media from URL {url}: {reason}", parameter="url", value=url
        )

    class ClientErrorMediaConnector(MediaConnector):
        """vLLM's HTTP media connector; an unreachable URL or unusable video options are the client's error."""

        def fetch_video(self, video_url, **kwargs):
            check_video_options(self.media_io_kwargs.get("video", {}))
            return super().fetch_video(video_url, **kwargs)

        async def fetch_video_async(self, video_url, **kwargs):
            check_video_options(self.media_io_kwargs.get("video", {}))
            return await super().fetch_video_async(video_url, **kwargs)

        # Arguments pass through untouched: a keyword upstream adds must not become a TypeError.
        def load_from_url(self, url, *args, **kwargs):
            try:
                return super().load_from_url(url, *args, **kwargs)
            except unreachable as error:
                raise client_error(url, error) from error

        async def load_from_url_async(self, url, *args, **kwargs):
            try:
                return await super().load_from_url_async(url, *args, **kwargs)
            except unreachable as error:
                raise client_error(url, error) from error

    return ClientErrorMediaConnector
