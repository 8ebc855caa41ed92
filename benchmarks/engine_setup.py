"""What the serving and the batch benchmark share, so that their figures describe the same thing.

Both serve one checkpoint and clips of one size, and both reports begin
with the same facts of the run.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import msgspec

# A text model big enough that prefill and KV size follow the prompt length,
# small enough that a 64-frame request takes seconds on two CPU cores.
CHECKPOINT_ARGS = dict(text_hidden=512, text_layers=6, text_heads=8, text_kv_heads=2)
VISION = {"vision_hidden": 32, "vision_layers": 2, "grid": "27x27", "dtype": "float32"}  # the builder's defaults
VIDEO_SIZE = (320, 240)


class RunFacts(msgspec.Struct, kw_only=True):
    """The fields every engine benchmark report starts with."""

    vllm_version: str
    machine: str
    cpu_count: int
    checkpoint: dict
    video_size: list[int]


def run_facts() -> dict:
    """This run's :class:`RunFacts`, as keyword arguments of a report."""
    import vllm

    return dict(
        vllm_version=vllm.__version__,
        machine=f"{platform.machine()} {platform.processor() or platform.system()}",
        cpu_count=os.cpu_count() or 0,
        checkpoint={**CHECKPOINT_ARGS, **VISION},
        video_size=list(VIDEO_SIZE),
    )


def build_checkpoint(artifacts: Path) -> Path:
    """The benchmark checkpoint, built once into ``artifacts`` (a git-ignored folder)."""
    from vllm_stgridpool_testing.tiny_models import build_llava_onevision

    started = time.perf_counter()
    checkpoint = build_llava_onevision(artifacts / "llava-onevision-bench", **CHECKPOINT_ARGS)
    print(f"checkpoint: {checkpoint} ({time.perf_counter() - started:.1f} s)", flush=True)
    return checkpoint
