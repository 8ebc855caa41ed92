"""Helpers that start real vLLM engines for the integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

RUNNER = Path(__file__).with_name("engine_runner.py")

# float32 so vLLM and transformers agree token for token; a KV cache sized
# explicitly (the default 92% of memory fails on these machines).
ENGINE_KWARGS = {
    "max_model_len": 16384,
    "dtype": "float32",
    "kv_cache_memory_bytes": 256 << 20,
    "enforce_eager": True,
    "limit_mm_per_prompt": {"video": 1},
}


def run_engine(
    model, batches, *, plugins: str | None, hf_overrides=None, expect_errors=(), timeout=900, **extra
) -> list:
    """Start ``vllm.LLM`` in a subprocess with ``VLLM_PLUGINS=plugins`` (None: unset) and run ``batches``.

    A batch whose index is in ``expect_errors`` must fail (its result is
    ``{"error": message}``); any other failure fails the test here, so two
    failing runs can never compare equal.
    """
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    env.update(extra.pop("env", {}))
    llm_kwargs = {**ENGINE_KWARGS, **extra.pop("llm_kwargs", {})}
    if hf_overrides is not None:
        llm_kwargs["hf_overrides"] = hf_overrides
    job = {"model": str(model), "llm_kwargs": llm_kwargs, "batches": batches, **extra}
    done = subprocess.run(
        [sys.executable, str(RUNNER)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=RUNNER.parent,
    )
    for line in done.stdout.splitlines():
        if line.startswith("ENGINE_RESULT "):
            return _checked(json.loads(line.removeprefix("ENGINE_RESULT ")), set(expect_errors))
    raise AssertionError(f"engine run failed ({done.returncode}):\n{done.stderr[-6000:]}")


def _checked(results: list, expect_errors: set[int]) -> list:
    for index, result in enumerate(results):
        failed = isinstance(result, dict) and "error" in result
        if failed and index not in expect_errors:
            raise AssertionError(f"batch {index} failed: {result['error']}")
        if not failed and index in expect_errors:
            raise AssertionError(f"batch {index} was expected to fail but gave {result}")
    return results


def two_at_a_time(*calls) -> list[Future]:
    """Run zero-argument ``calls`` two at a time; their finished futures, in order.

    An engine's start-up is mostly one core importing Python in three
    processes one after another, so on these 2-core machines two start-ups
    side by side take little longer than one. ``future.result()`` is a call's
    result or raises its failure, in the test that reads it.
    """
    with ThreadPoolExecutor(max_workers=2) as pool:
        return [pool.submit(call) for call in calls]


@contextmanager
def servers_started(*launches):
    """Run zero-argument ``launches`` (``start_server`` calls, or other runs) two at a time.

    Yields their finished futures, in order (``.result()``: the server, or the
    failure); stops every server that started when done.
    """
    from vllm_stgridpool_testing.launch import Server

    futures = two_at_a_time(*launches)
    try:
        yield futures
    finally:
        for future in futures:
            if future.exception() is None and isinstance(future.result(), Server):
                future.result().stop()
