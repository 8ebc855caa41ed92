"""Damaged copies of a clip in every accepted container, through the worker's decoder, in a process of their own.

``python -m tests.support.container_fuzz CASES_PER_CONTAINER SEED`` prints
one JSON line: for each container, how the damaged copies ended
(``decoded``, ``refused``: the decoder's own error, or ``other``: any other
exception, listed), and the largest memory growth and time of one copy.
The process runs under a 2 GiB address-space limit, so a bomb that got past
the checks fails here instead of taking the machine.

Damage, from a seeded generator: random 32-bit values written over the
first kilobyte (where the headers and their counts are), random bytes
flipped anywhere, and truncation.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def damaged(data: bytes, rng: random.Random) -> bytes:
    copy = bytearray(data)
    kind = rng.randrange(3)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            offset = rng.randrange(0, max(1, min(len(copy), 1024) - 4))
            copy[offset : offset + 4] = rng.getrandbits(32).to_bytes(4, "big")
    elif kind == 1:
        for _ in range(rng.randint(1, 16)):
            copy[rng.randrange(len(copy))] = rng.randrange(256)
    else:
        del copy[rng.randrange(16, len(copy)) :]
    return bytes(copy)


def run(cases: int, seed: int) -> dict:
    from tests.support.hostile_videos import CONTAINERS, clip
    from vllm_stgridpool.video.decoder import FrameSizeMismatch, UndecodableVideo, decode_frames, open_video

    rng = random.Random(seed)
    report = {}
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "upload"
        for container in CONTAINERS:
            valid = clip(container, num_frames=12, gop=4)
            counts = {"decoded": 0, "refused": 0, "other": []}
            slowest = 0.0
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for _ in range(cases):
                path.write_bytes(damaged(valid, rng))
                started = time.monotonic()
                try:
                    video = open_video(str(path), 3840 * 2160)
                    try:
                        header = video.header
                        wanted = list(range(0, header.total_frames, max(1, header.total_frames // 4)))
                        decode_frames(video, wanted, np.zeros((len(wanted), header.height, header.width, 3), np.uint8))
                    finally:
                        video.close()
                    counts["decoded"] += 1
                except (UndecodableVideo, FrameSizeMismatch):
                    counts["refused"] += 1
                except Exception as error:  # noqa: BLE001 - what the fuzz run is for
                    counts["other"].append(f"{type(error).__name__}: {error}"[:200])
                slowest = max(slowest, time.monotonic() - started)
            growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
            report[container] = {**counts, "slowest_seconds": round(slowest, 3), "peak_growth_kib": growth}
    return report


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    print(json.dumps(run(int(sys.argv[1]), int(sys.argv[2]))))
