"""Send ``Retry-After`` with the plugin's HTTP 503 answers (a busy video decoder).

vLLM 0.32 (and 0.33) turns a ``GracefulHTTPError`` into a JSON answer with
its status code and no header a client could schedule a retry from. The
plugin's loader answers 503 when the server is too busy to start a video
in time, with a hint in seconds on the error (``retry_after``); this wraps
the handler vLLM's ``VLLMError`` handler delegates to, and copies the hint
into the response's ``Retry-After`` header. An error without the attribute
is answered exactly as before.

It acts in the API server, where the handler module is imported before the
plugin registers; other processes have no HTTP handler and are left alone.
Ledger entry: patches/README.md, P11.
"""

from __future__ import annotations

import functools
import sys

from vllm_stgridpool.compat import Feature, Guard

HANDLER_MODULE = "vllm.entrypoints.serve.exception_handling.handlers.vllm_error"
FUNCTION = "exception_handler"

GUARD = Guard(
    "P11",
    "Retry-After on the plugin's 503 answers",
    (Feature(HANDLER_MODULE, FUNCTION, ("req", "exc")),),
)


def apply(vllm_version: str) -> bool:
    """Wrap the handler where :data:`GUARD` holds, in a process that serves HTTP; returns whether it did."""
    module = sys.modules.get(HANDLER_MODULE)
    if module is None or not GUARD.applies(vllm_version):
        return False
    original = getattr(module, FUNCTION)
    if not getattr(original, "_stgridpool", False):
        setattr(module, FUNCTION, with_retry_after(original))
    return True


def with_retry_after(handler):
    @functools.wraps(handler)
    async def exception_handler_with_retry_after(req, exc, *args, **kwargs):
        response = await handler(req, exc, *args, **kwargs)
        seconds = getattr(exc, "retry_after", None)
        if isinstance(seconds, int) and not isinstance(seconds, bool) and seconds > 0:
            response.headers["Retry-After"] = str(seconds)
        return response

    exception_handler_with_retry_after._stgridpool = True
    return exception_handler_with_retry_after
