"""The most CPU memory a call holds at once, from the profiler's record of every allocation and free.

Shared by the stage-cost tests and the operator benchmark.
"""

from __future__ import annotations

from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn) -> int:
    """Most bytes held at once during ``fn()`` (allocations net of frees, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak
