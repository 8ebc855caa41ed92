"""After the engine's start-up, the Triton stage compiles nothing and copies nothing to the device.

A fresh process runs the stage's launcher under Triton's own JIT with a stand-in sm_90 driver
(tests/support/triton_aot.py: compiles for real, launches nothing): ``triton_stage.warm_up`` for a server's
settings, as the model runs it when the engine starts (models/common.py), then the calls requests can make
of that server: every frame count up to ``max_frames``, every kernel size and norm a request may pick (each
checked by the API server's own rules, serving/request_rules.py), temperatures from -1e4 to 1e4, the
server's pyramid and none, and the kernel a token budget raises to. Counted after the warm-up: Triton's
JIT cache misses (its ``jit_cache_hook``: each one a compile) and, with a TorchDispatchMode, tensors made
from host data and copies (``lift_fresh``, ``_to_copy``, ``copy_``; a step table's upload is one of each).
Expected: none. A pyramid the warm-up could not know is one upload, once, and no compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

AUDIT = r"""
import json, sys
import msgspec
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tests.support.triton_aot import compile_counter, cuda_target
from vllm_stgridpool.config import STGridPoolSettings
from vllm_stgridpool.serving.request_rules import StageShape, request_settings
from vllm_stgridpool.stage import triton_stage

HOST_DATA = {"lift_fresh", "lift_fresh_copy", "_to_copy", "copy_", "_local_scalar_dense"}


class Copies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_DATA:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def configs(settings, shape):
    # What requests may run on this server, each passed by the request rules, and the kernels a token
    # budget raises the server's to (models/common.py's with_kernel).
    pool = settings.pool
    found = [pool] + [msgspec.structs.replace(pool, kernel_size=k)
                      for k in range(pool.kernel_size, min(settings.max_kernel_size, shape.height) + 1)]
    if settings.allow_request_overrides:
        for k in range(pool.kernel_size, shape.height + 1):
            for p in (2.0, 1.0, 0.5, 3.0, 1000.0):
                for t in (1.0, -1e4, 0.0, 1e4):
                    for pyramid in ({}, {"grid_sizes": [], "grid_strides": []}):
                        asked = {"kernel_size": k, "norm_p": p, "temperature": t, **pyramid}
                        found.append(request_settings(settings, {"stgridpool": asked}, shape).config)
    return found


settings = STGridPoolSettings.from_dict(json.loads(sys.argv[1]))
height, dim = 6, 64
shape = StageShape(settings.max_frames, height, height, dim, 2)
report = {}
with cuda_target(90):
    with compile_counter() as warm:
        warmed = triton_stage.warm_up(settings, height, height, [dim], torch.bfloat16, "cpu")
    report["warm_up"] = {"calls": warmed.variants, "compiles": len(warm), "tables": warmed.tables,
                         "seconds": round(warmed.seconds, 1)}
    todo = [(config, torch.randn(1, frames, height, height, dim).to(torch.bfloat16))
            for config in configs(settings, shape) for frames in range(1, settings.max_frames + 1, 3)]
    with compile_counter() as misses, Copies() as copies:
        for config, videos in todo:
            triton_stage.run(videos, config)
    report["after"] = {"calls": len(todo), "compiles": len(misses), "host_data_ops": len(copies.seen)}
    if settings.allow_request_overrides:  # a pyramid the warm-up did not know: one upload, then none
        asked = {"grid_sizes": [2], "grid_strides": [3]}
        new = request_settings(settings, {"stgridpool": asked}, shape).config
        videos = torch.randn(1, 9, height, height, dim).to(torch.bfloat16)
        with compile_counter() as misses, Copies() as first:
            triton_stage.run(videos, new)
        with Copies() as second:
            triton_stage.run(videos, new)
        report["new_pyramid"] = {"compiles": len(misses), "first": sorted(first.seen), "second": sorted(second.seen)}
print("\n" + json.dumps(report))
"""


def audit(settings: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    with tempfile.TemporaryDirectory() as cache:
        done = subprocess.run([sys.executable, "-c", AUDIT, json.dumps(settings)], cwd=ROOT, capture_output=True,
                              text=True, timeout=900, env={**env, "TRITON_CACHE_DIR": cache})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_after_start_up_no_request_compiles_or_copies():
    """A server with request overrides allowed (kernel sizes 2 to 6 on a 6 x 6 grid: windows of 4, 16 and
    64; three norm kinds) warms 9 variants; then no request's call compiles or copies anything."""
    report = audit({"max_frames": 8})
    print(report)
    assert report["warm_up"]["compiles"] == report["warm_up"]["calls"] == 9
    assert report["warm_up"]["tables"] == 16  # frames 1 to 8, the server's pyramid and none
    assert report["after"]["calls"] > 300
    assert report["after"]["compiles"] == 0 and report["after"]["host_data_ops"] == 0
    assert report["new_pyramid"]["compiles"] == 0
    assert report["new_pyramid"]["first"] == ["_to_copy", "lift_fresh"] and report["new_pyramid"]["second"] == []


def test_a_server_without_overrides_warms_its_own_variants_only():
    """No request overrides: the server's norm at its kernel and at the kernels its token budget may raise
    it to (up to max_kernel_size 4: windows of 4 and 16), two variants; nothing compiles after."""
    report = audit({"max_frames": 8, "allow_request_overrides": False, "max_video_tokens": 100, "norm_p": 1.0})
    assert report["warm_up"]["compiles"] == report["warm_up"]["calls"] == 2
    assert report["after"]["compiles"] == 0 and report["after"]["host_data_ops"] == 0
