"""Answer an unreachable media URL with HTTP 422 instead of 500.

vLLM 0.32 treats a ``video_url`` it cannot connect to (refused connection,
unknown host, timeout) as a transient server error: the request fails with
HTTP 500 after retries, and the error escapes to uvicorn, which also drops
the client's keep-alive connection. For a server fed user-supplied URLs the
URL is the problem, so this connector reports it as vLLM's own 422
"unprocessable entity" error, naming the URL and the reason. It is vLLM's
``http`` connector with that one change, registered under the same name
(vLLM chooses connectors by ``VLLM_MEDIA_CONNECTOR``, default ``http``).
Ledger entry: patches/README.md, P5.
"""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger("vllm.stgridpool")

PATCHED_VERSIONS = ("0.32.",)
CONNECTOR_NAME = "http"


def apply(vllm_version: str) -> bool:
    if not vllm_version.startswith(PATCHED_VERSIONS):
        logger.info("vllm_stgridpool: media-fetch fix (P5) not applied to vLLM %s", vllm_version)
        return False
    from vllm.multimodal.media.connector import MEDIA_CONNECTOR_REGISTRY

    MEDIA_CONNECTOR_REGISTRY.register(CONNECTOR_NAME)(_connector_class())
    return True


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
        """vLLM's HTTP media connector; an unreachable URL is the client's error."""

        def load_from_url(self, url, media_io, *, fetch_timeout=None):
            try:
                return super().load_from_url(url, media_io, fetch_timeout=fetch_timeout)
            except unreachable as error:
                raise client_error(url, error) from error

        async def load_from_url_async(self, url, media_io, *, fetch_timeout=None):
            try:
                return await super().load_from_url_async(url, media_io, fetch_timeout=fetch_timeout)
            except unreachable as error:
                raise client_error(url, error) from error

    return ClientErrorMediaConnector
