"""Accept the plugin's own per-request key without ``--trust-request-mm-kwargs``.

vLLM 0.32 refuses every per-request ``mm_processor_kwargs`` (and
``media_io_kwargs``) unless the server runs with ``--trust-request-mm-kwargs``,
a blanket flag that opens every processor option (image sizes, frame counts)
to every client. The ``stgridpool`` object is capped by the plugin itself (a
request can only make a video cheaper, see ``request_rules.request_settings``), so
it needs no such trust. This wraps vLLM's ``validate_request_mm_kwargs``: when
ST-GridPool is active for the model this process serves and the request's
``mm_processor_kwargs`` hold the ``stgridpool`` key and nothing else (and it
sends no ``media_io_kwargs``), the request passes; anything else goes to
vLLM's own check unchanged. Ledger entry: patches/README.md, P6.
"""

from __future__ import annotations

import functools
import sys

from vllm_stgridpool.compat import Feature, Guard

PROTOCOL_MODULE = "vllm.entrypoints.generate.base.protocol"
FUNCTION = "validate_request_mm_kwargs"
# Modules that bind the function by name at import time (vLLM 0.32 and 0.33).
IMPORTERS = ("vllm.renderers.online_renderer", "vllm.entrypoints.pooling.base.serving")

# The same function, with the same keyword-only signature, in vLLM 0.32 and 0.33.
GUARD = Guard(
    "P6",
    "the stgridpool request key without --trust-request-mm-kwargs",
    (Feature(PROTOCOL_MODULE, FUNCTION, ("mm_processor_kwargs", "media_io_kwargs", "trust_request_mm_kwargs")),),
)

_active = False  # set once the served model's config has ST-GridPool active


def mark_active() -> None:
    """Called where the served model's config is verified with ST-GridPool active."""
    global _active
    _active = True


def own_key_only(mm_processor_kwargs, media_io_kwargs, key: str) -> bool:
    """True for a request whose only multimodal override is the plugin's ``key`` object."""
    return (
        isinstance(mm_processor_kwargs, dict)
        and set(mm_processor_kwargs) == {key}
        and not media_io_kwargs
    )


def apply(vllm_version: str) -> bool:
    """Wrap vLLM's check on a version it was written for; returns whether it did."""
    if not GUARD.applies(vllm_version):
        return False
    import importlib

    protocol = importlib.import_module(PROTOCOL_MODULE)
    original = getattr(protocol, FUNCTION)
    wrapped = original if getattr(original, "_stgridpool_trust", False) else trust_own_key(original)
    setattr(protocol, FUNCTION, wrapped)
    for name in IMPORTERS:  # already imported: rebind their copy of the name
        module = sys.modules.get(name)
        if module is not None and getattr(module, FUNCTION, None) is not None:
            setattr(module, FUNCTION, wrapped)
    return True


def trust_own_key(validate):
    from vllm_stgridpool.request_rules import REQUEST_KEY

    @functools.wraps(validate)
    def validate_trusting_own_key(*, mm_processor_kwargs, media_io_kwargs, trust_request_mm_kwargs):
        if not trust_request_mm_kwargs and _active and own_key_only(
            mm_processor_kwargs, media_io_kwargs, REQUEST_KEY
        ):
            return None
        return validate(
            mm_processor_kwargs=mm_processor_kwargs,
            media_io_kwargs=media_io_kwargs,
            trust_request_mm_kwargs=trust_request_mm_kwargs,
        )

    validate_trusting_own_key._stgridpool_trust = True
    return validate_trusting_own_key
