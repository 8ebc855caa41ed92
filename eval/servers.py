"""The ``vllm serve`` flags for the device this machine has, and why a server died, read from its log."""

from __future__ import annotations

import re

KV_CACHE_BYTES_CPU = 1 << 30  # vLLM's CPU default (most of the machine's memory) leaves none for the rest
# Lines of a vLLM log that name a cause, most telling first.
CAUSES = (
    re.compile(r"out of memory|OutOfMemoryError|Cannot allocate memory|MemoryError", re.IGNORECASE),
    re.compile(r"died unexpectedly|exit ?code[ =:]*-9\b|exitcode=-9|signal 9|SIGKILL", re.IGNORECASE),
    re.compile(r"\b[A-Z]\w*(Error|Exception): "),
)
NOTICES = re.compile(r"\] ?(WARNING|INFO|DEBUG)\b| (WARNING|INFO|DEBUG) \d\d-\d\d ")
# Error lines that only point elsewhere ("See root cause above"): the first specific one is the cause.
POINTERS = re.compile(r"root cause|see stack trace|initialization failed|Failed core proc", re.IGNORECASE)


def device() -> str:
    """``cuda`` when vLLM here can use a GPU, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def server_flags(device_type: str, checkpoint_dtype: str) -> list[str]:
    """GPU: the checkpoints' float16 (the authors' harness ran float16), a 32k context.
    CPU: float32 for a float32 checkpoint, else bfloat16 (vLLM's CPU backend has no float16 kernels), an
    explicit 1 GiB KV cache and a 16k context (a 64-frame stock LLaVA-Video prompt is about 13.5k tokens)."""
    if device_type == "cuda":
        return ["--dtype", "float16", "--max-model-len", "32768"]
    dtype = "float32" if checkpoint_dtype == "float32" else "bfloat16"
    return ["--dtype", dtype, "--max-model-len", "16384", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES_CPU),
            "--enforce-eager"]


def failure_cause(log: str, returncode: int | None) -> str:
    """One line on why ``vllm serve`` stopped: its exit status and the log line that names the cause."""
    status = "still running" if returncode is None else f"exit status {returncode}"
    if returncode in (-9, 137):
        status += " (killed: SIGKILL, most often the kernel's out-of-memory killer)"
    lines = [line for line in log.splitlines()[-400:] if not NOTICES.search(line)]
    for pattern in CAUSES:
        matches = [line.strip() for line in lines if pattern.search(line)]
        specific = [line for line in matches if not POINTERS.search(line)]
        if matches:
            return f"{status}; log: {(specific or matches)[0 if specific else -1][:300]}"
    tail = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return f"{status}; last log line: {tail[:300]}"
