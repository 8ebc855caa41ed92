"""Model aliases: ``vllm serve llava-video`` serves the published LLaVA-Video checkpoint.

vLLM takes the name it is given as a local path, a name mapped by its
redirect file (``VLLM_MODEL_REDIRECT_PATH``) or a hub repository id; a bare
``llava-video`` is none of these, so the hub is asked for a repository that
does not exist. This resolves the names in :data:`ALIASES` to the checkpoints
vLLM can load (the Hugging Face conversions, architecture
``LlavaOnevisionForConditionalGeneration`` / ``LlavaNextVideoForConditionalGeneration``)
and logs ``llava-video -> llava-hf/LLaVA-Video-7B-Qwen2-hf`` before anything
is fetched. A redirect file that maps the name, or a local path of that name,
wins; resolving redirect-file names here, before vLLM's speculators probe,
is also what makes ``VLLM_MODEL_REDIRECT_PATH`` work at all for
``vllm serve NAME`` on 0.32 and 0.33 (the probe asks the hub for the typed
name before ``ModelConfig`` applies the redirect). Ledger entry:
patches/README.md, P7 (which absorbed P4).

vLLM reads the typed name first in two places of ``vllm.engine.arg_utils``,
both before it builds the ``ModelConfig``: ``get_model_path`` (under
``HF_HUB_OFFLINE``, for the hub cache) and ``maybe_override_with_speculators``
(the speculators probe, which fetches ``config.json``). Those two module
globals are wrapped; the names they return become the engine's model and
tokenizer, while the served model name stays what the user typed.
"""

from __future__ import annotations

import functools
import logging
import os

from vllm_stgridpool.compat import Feature, Guard

logger = logging.getLogger("vllm.stgridpool")

ALIASES = {
    "llava-video": "llava-hf/LLaVA-Video-7B-Qwen2-hf",
    "llava-onevision": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "llava-next-video": "llava-hf/LLaVA-NeXT-Video-7B-hf",
}

GUARD = Guard(
    "P7",
    "model aliases",
    (
        Feature("vllm.engine.arg_utils", "maybe_override_with_speculators", ("model", "tokenizer")),
        Feature("vllm.engine.arg_utils", "get_model_path"),
        Feature("vllm.transformers_utils.utils", "maybe_model_redirect"),
    ),
)

_WRAPPED = "_stgridpool_alias"
_logged: set[str] = set()


def resolve(name: str) -> str:
    """The checkpoint ``name`` stands for: the redirect file's, a local path itself, else its alias's."""
    from vllm.transformers_utils.utils import maybe_model_redirect

    redirected = maybe_model_redirect(name)
    if redirected != name or os.path.exists(name) or name not in ALIASES:
        return redirected
    target = ALIASES[name]
    if name not in _logged:
        _logged.add(name)
        logger.info("model alias: %s -> %s", name, target)
    return target


def apply(vllm_version: str) -> bool:
    """Wrap the two name readers where :data:`GUARD` holds; returns whether it did."""
    if not GUARD.applies(vllm_version):
        return False
    from vllm.engine import arg_utils

    if not getattr(arg_utils.get_model_path, _WRAPPED, False):
        arg_utils.get_model_path = _resolving_get_model_path(arg_utils.get_model_path)
    if not getattr(arg_utils.maybe_override_with_speculators, _WRAPPED, False):
        arg_utils.maybe_override_with_speculators = _resolving_probe(arg_utils.maybe_override_with_speculators)
    return True


# The wrappers resolve the one or two names they know and pass every other argument through
# untouched: a parameter upstream adds must not become a TypeError at start-up.
def _resolving_get_model_path(get_model_path):
    @functools.wraps(get_model_path)
    def get_model_path_resolved(model, *args, **kwargs):
        return get_model_path(resolve(model) if isinstance(model, str) else model, *args, **kwargs)

    setattr(get_model_path_resolved, _WRAPPED, True)
    return get_model_path_resolved


def _resolving_probe(probe):
    @functools.wraps(probe)
    def probe_resolved(*args, **kwargs):
        for name in ("model", "tokenizer"):
            if isinstance(kwargs.get(name), str):
                kwargs[name] = resolve(kwargs[name])
        return probe(*args, **kwargs)

    setattr(probe_resolved, _WRAPPED, True)
    return probe_resolved
