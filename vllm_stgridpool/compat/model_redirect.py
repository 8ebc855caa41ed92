"""Apply ``VLLM_MODEL_REDIRECT_PATH`` before vLLM 0.32 probes a model for speculators.

``vllm serve ALIAS`` with ALIAS mapped to a local folder in the redirect file
fails under vLLM 0.32: ``EngineArgs.create_engine_config`` first calls
``maybe_override_with_speculators(model=ALIAS)``, which asks the hub for
``ALIAS/config.json``, and only afterwards builds the ``ModelConfig`` that
would have applied the redirect. This wraps that one module global of
``vllm.engine.arg_utils`` so the model and tokenizer names are redirected
first, exactly as ``ModelConfig`` would. Ledger entry: patches/README.md, P4.
"""

from __future__ import annotations

import functools
import logging

from vllm_stgridpool.compat import Feature, Guard

logger = logging.getLogger("vllm.stgridpool")

# vLLM 0.32 and 0.33 both probe for speculators before they redirect.
GUARD = Guard(
    "P4",
    "model redirect before the speculators probe",
    (
        Feature("vllm.engine.arg_utils", "maybe_override_with_speculators", ("model", "tokenizer")),
        Feature("vllm.transformers_utils.utils", "maybe_model_redirect"),
    ),
)


def apply(vllm_version: str) -> bool:
    """Install the wrapper where :data:`GUARD` holds; returns whether it did."""
    if not GUARD.applies(vllm_version):
        return False
    from vllm.engine import arg_utils

    original = arg_utils.maybe_override_with_speculators
    if getattr(original, "_stgridpool_redirect", False):
        return True
    arg_utils.maybe_override_with_speculators = redirect_first(original)
    return True


def redirect_first(probe):
    from vllm.transformers_utils.utils import maybe_model_redirect

    @functools.wraps(probe)
    def probe_redirected(*, model, tokenizer, **kwargs):
        model = maybe_model_redirect(model)
        tokenizer = maybe_model_redirect(tokenizer) if isinstance(tokenizer, str) else tokenizer
        return probe(model=model, tokenizer=tokenizer, **kwargs)

    probe_redirected._stgridpool_redirect = True
    return probe_redirected
