"""benchmarks/engine_profile.py reads vLLM's worker traces: a hand-made trace with known times."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from engine_profile import new_trace, prefill_profile  # noqa: E402


def op(name, ts, dur, tid=1):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid}


def write_trace(folder: Path, events, stem="rank0.1") -> Path:
    path = folder / f"{stem}.pt.trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    return path


# times in microseconds: a 2 ms prefill of 78 tokens, two decode steps of 1 ms, one empty step
STEPS = [
    op("execute_context_1(78)_generation_0(0)", 1000, 2000),
    op("_C::cpu_attention_with_kv_cache", 1100, 600),
    op("_C::cpu_attention_with_kv_cache", 1800, 600),
    op("_C::onednn_mm", 2500, 300),
    op("_C::onednn_mm", 2900, 50, tid=2),  # another thread: not the step's
    op("execute_context_0(0)_generation_1(1)", 4000, 1000),
    op("_C::cpu_attention_with_kv_cache", 4100, 500),  # inside a decode step: not the prefill's
    op("execute_context_0(0)_generation_1(1)", 6000, 1000),
    op("execute_context_0(0)_generation_0(0)", 8000, 100),
    {"ph": "i", "name": "marker", "ts": 1500},
]


def test_prefill_step_is_broken_down_by_op(tmp_path):
    profile = prefill_profile(write_trace(tmp_path, STEPS))
    assert profile.prefill_tokens == 78
    assert profile.prefill_step_ms == 2.0
    assert profile.prefill_ops_ms == {"_C::cpu_attention_with_kv_cache": 1.2, "_C::onednn_mm": 0.3}
    assert (profile.decode_steps, profile.decode_steps_ms) == (2, 2.0)
    assert profile.pooling_ops == []


def test_an_encoded_video_shows_its_pooling_ops(tmp_path):
    encoded = [op("aten::upsample_bilinear2d", 100, 200), op("stgridpool::run_plan", 400, 200)]
    profile = prefill_profile(write_trace(tmp_path, encoded + STEPS))
    assert profile.pooling_ops == ["aten::upsample_bilinear2d", "stgridpool::run_plan"]


def test_a_trace_with_no_single_prefill_is_refused(tmp_path):
    two = [op("execute_context_1(5)_generation_0(0)", 0, 10), op("execute_context_1(7)_generation_0(0)", 20, 10)]
    with pytest.raises(RuntimeError, match="one prefill step"):
        prefill_profile(write_trace(tmp_path, two))


def test_new_trace_is_the_one_written_since(tmp_path):
    old = write_trace(tmp_path, [], stem="rank0.1")
    seen = set(tmp_path.glob("*"))
    new = write_trace(tmp_path, [], stem="rank0.2")
    write_trace(tmp_path, [], stem="vm_1.async_llm.3")  # the API server's trace: not the worker's
    assert new_trace(tmp_path, seen) == new
    assert old in seen
    with pytest.raises(RuntimeError, match="one new worker trace"):
        new_trace(tmp_path, set())  # two worker traces unseen: which one is ambiguous
