"""Accept the plugin's own per-request key without ``--trust-request-mm-kwargs``.

vLLM 0.32 refuses every per-request ``mm_processor_kwargs`` (and
``media_io_kwargs``) unless the server runs with ``--trust-request-mm-kwargs``,
a blanket flag that opens every processor option (image sizes, frame counts)
to every client. The ``stgridpool`` object is capped by the plugin itself (a
request can only make a video cheaper, see ``request_rules.request_settings``), so
it needs no such trust. This wraps vLLM's ``validate_request_mm_kwargs``: when
ST-GridPool is active for the model this process serves and the request's
``mm_processor_kwargs`` hold the ``stgridpool`` key and nothing else, the
request passes; anything else goes to vLLM's own check unchanged.

The same holds for ``media_io_kwargs`` that only choose which frames to
sample, ``{"video": {"num_frames": n}}`` with a whole ``n`` from 1 to the
server's ``max_frames``, optionally with ``"fps": f`` (0 < f <= 1000): what
evaluation harnesses send with every video request (lmms-eval's ``openai``
model sends the count; the authors' protocol samples 1 fps up to the
count). The loaders take ``min(n, floor(duration * f))`` frames, so ``fps``
can only lower the count the server profiled for; alone (without ``n``)
vLLM would drop the server's count, so it is not admitted. Any other key, or
a larger ``n``, needs the flag.
Ledger entry: patches/README.md, P6.
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
_max_frames = 0  # the served model's max_frames: the most frames a request may ask the loader for


def mark_active(max_frames: int = 0) -> None:
    """Called where the served model's config is verified with ST-GridPool active."""
    global _active, _max_frames
    _active = True
    _max_frames = max(_max_frames, max_frames)


def own_key_only(mm_processor_kwargs, media_io_kwargs, key: str, max_frames: int = 0) -> bool:
    """True for a request whose multimodal overrides are the plugin's ``key`` object and at most
    a frame count from 1 to ``max_frames`` (and a sampling rate), and that sends at least one of them."""
    if not (mm_processor_kwargs or media_io_kwargs):
        return False
    own_processor_kwargs = not mm_processor_kwargs or (
        isinstance(mm_processor_kwargs, dict) and set(mm_processor_kwargs) == {key}
    )
    return own_processor_kwargs and (not media_io_kwargs or frame_sampling_only(media_io_kwargs, max_frames))


MAX_REQUEST_FPS = 1000.0  # far above any video's rate; keeps duration * fps a finite number


def frame_sampling_only(media_io_kwargs, max_frames: int) -> bool:
    """True for exactly ``{"video": {"num_frames": n}}`` with a whole ``n`` from 1 to ``max_frames``, or that
    plus ``"fps": f`` with a real ``f`` in (0, ``MAX_REQUEST_FPS``] (fps only ever lowers the count)."""
    if not isinstance(media_io_kwargs, dict) or set(media_io_kwargs) != {"video"}:
        return False
    video = media_io_kwargs["video"]
    if not isinstance(video, dict) or set(video) not in ({"num_frames"}, {"num_frames", "fps"}):
        return False
    n, fps = video["num_frames"], video.get("fps", 1.0)
    whole = isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= max_frames
    real = isinstance(fps, (int, float)) and not isinstance(fps, bool) and 0 < fps <= MAX_REQUEST_FPS
    return whole and real


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
    from vllm_stgridpool.serving.request_rules import REQUEST_KEY

    @functools.wraps(validate)
    def validate_trusting_own_key(*args, **kwargs):
        # The three keywords this reads are keyword-only in vLLM; any other argument (a new
        # upstream keyword, a positional call) is passed on to vLLM's check as it came.
        if (
            not args
            and not kwargs.get("trust_request_mm_kwargs", True)
            and _active
            and own_key_only(
                kwargs.get("mm_processor_kwargs"), kwargs.get("media_io_kwargs"), REQUEST_KEY, _max_frames
            )
        ):
            return None
        return validate(*args, **kwargs)

    validate_trusting_own_key._stgridpool_trust = True
    return validate_trusting_own_key
