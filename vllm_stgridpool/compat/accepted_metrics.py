"""Count a video in ``/metrics`` only once vLLM has accepted its request.

The plugin's processor knows each video's token count, but it runs before
vLLM's own checks of the processed prompt (``--max-model-len``, sampling
parameters): counting there also counted videos of requests that vLLM then
rejected. The processor now attaches its per-video records to the engine
input it returns (key ``metrics.RECORDS_KEY``), and this wraps
``InputProcessor.process_inputs``: the records are counted after that method
returns, i.e. after every validation vLLM makes before it queues the request.
Ledger entry: patches/README.md, P8.
"""

from __future__ import annotations

import functools

from vllm_stgridpool.compat import Feature, Guard

# The same method, taking the request id and the processed prompt first, in vLLM 0.32 and 0.33.
GUARD = Guard(
    "P8",
    "video metrics counted once a request is accepted",
    (Feature("vllm.v1.engine.input_processor", "InputProcessor.process_inputs", ("request_id", "prompt")),),
)


def apply(vllm_version: str) -> bool:
    """Wrap ``InputProcessor.process_inputs`` on a version it was written for."""
    if not GUARD.applies(vllm_version):
        return False
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if not getattr(original, "_stgridpool_metrics", False):
        InputProcessor.process_inputs = count_when_accepted(original)
    return True


def count_when_accepted(process_inputs):
    from vllm_stgridpool.serving import metrics

    @functools.wraps(process_inputs)
    def process_inputs_counted(self, request_id, prompt, *args, **kwargs):
        request = process_inputs(self, request_id, prompt, *args, **kwargs)
        records = prompt.get(metrics.RECORDS_KEY) if isinstance(prompt, dict) else None
        for record in records or ():
            metrics.record_video(record)
        return request

    process_inputs_counted._stgridpool_metrics = True
    return process_inputs_counted
