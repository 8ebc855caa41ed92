"""Where an engine step's time went, read from the trace vLLM's torch profiler writes.

``vllm serve --profiler-config '{"profiler": "torch", "torch_profiler_dir": DIR}'``
profiles the worker between ``POST /start_profile`` and ``POST /stop_profile``
and writes ``DIR/rank0.*.pt.trace.json``. vLLM names every model step
``execute_context_<requests>(<tokens>)_generation_<requests>(<tokens>)``;
a step with context tokens is a prefill.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec

STEP = re.compile(r"execute_context_(\d+)\((\d+)\)_generation_(\d+)\((\d+)\)")
# Ops that run only when a video is encoded: stock's 2x2 bilinear pooling and ST-GridPool's own
# ops, after the vision tower (checked on first questions: aten::upsample_bilinear2d, and
# stgridpool::run_plan, area_resize_into, norm_pool_into).
POOLING_OP_MARKS = ("upsample_bilinear", "stgridpool::")
TOP_OPS = 6


class PrefillProfile(msgspec.Struct):
    """One request's profiled engine steps: its prefill step, by op, and its decode steps."""

    prefill_tokens: int  # the tokens the prefill step computed (the part not found in the prefix cache)
    prefill_step_ms: float
    prefill_ops_ms: dict[str, float]  # the step's costliest ops, inclusive time
    decode_steps: int
    decode_steps_ms: float
    pooling_ops: list[str]  # video pooling ops anywhere in the profile: none if the video was not encoded


def new_trace(folder: Path, seen: set[Path]) -> Path:
    """The worker trace written to ``folder`` since its files were ``seen`` (one per profiled window)."""
    traces = [path for path in folder.glob("rank0.*.pt.trace.json") if path not in seen]
    if len(traces) != 1:
        raise RuntimeError(f"expected one new worker trace in {folder}, found {[p.name for p in traces]}")
    return traces[0]


def prefill_profile(trace: Path) -> PrefillProfile:
    """The breakdown of the single prefill step in a worker trace."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    steps = [(e, STEP.fullmatch(e["name"])) for e in events]
    steps = [(e, m) for e, m in steps if m]
    prefills = [(e, m) for e, m in steps if int(m.group(2)) > 0]
    if len(prefills) != 1:
        raise RuntimeError(f"expected one prefill step in the profile, found {[e['name'] for e, _ in prefills]}")
    step, match = prefills[0]
    start, end = step["ts"], step["ts"] + step["dur"]
    totals: dict[str, float] = {}
    for e in events:
        if e is not step and e.get("tid") == step.get("tid") and start <= e["ts"] and e["ts"] + e["dur"] <= end:
            totals[e["name"]] = totals.get(e["name"], 0.0) + e["dur"] / 1e3
    top = sorted(totals.items(), key=lambda item: -item[1])[:TOP_OPS]
    decodes = [e for e, m in steps if int(m.group(2)) == 0 and int(m.group(4)) > 0]
    return PrefillProfile(
        prefill_tokens=int(match.group(2)),
        prefill_step_ms=step["dur"] / 1e3,
        prefill_ops_ms={name: round(ms, 2) for name, ms in top},
        decode_steps=len(decodes),
        decode_steps_ms=sum(e["dur"] for e in decodes) / 1e3,
        pooling_ops=sorted({e["name"] for e in events if any(mark in e["name"] for mark in POOLING_OP_MARKS)}),
    )
