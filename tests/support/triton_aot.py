"""Triton's JIT for a CUDA GPU on a machine without one.

:func:`cuda_target` puts a stand-in CUDA driver in Triton's place for one architecture (sm_80, sm_90):
Triton's own JIT then specialises, caches and compiles every launch exactly as on that GPU (its passes,
then the ptxas its wheel ships), and the launch itself does nothing. The stage's launcher runs unchanged
on CPU tensors (only their addresses and dtypes reach the JIT), so what compiles here is what a GPU would
compile for the same call. :func:`compiled` reads back each variant: its PTX, registers and local memory
(ptxas's own report), and the vector width of its feature loads and stores.

Import triton only with ``TRITON_INTERPRET`` unset (the kernels must be JIT functions, not interpreted).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import time
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

# The device properties a launch's checks read (shared memory per block opt-in, threads per block).
SHARED_MEMORY = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class _Utils:
    def __init__(self, capability: int) -> None:
        self.capability = capability

    def get_device_properties(self, device):
        return {"max_shared_mem": SHARED_MEMORY[self.capability], "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1, "mem_clock_rate": 1, "mem_bus_width": 1}

    def load_binary(self, name, kernel, shared, device):
        return object(), object(), 0, 0, 1024  # module, function, registers, spills, threads per block

    def unload_module(self, module):
        pass


class _NoLaunch:
    """The launcher: takes every launch and runs nothing."""

    def __init__(self, src, metadata) -> None:
        pass

    def __call__(self, *args, **kwargs) -> None:
        pass


class CudaTarget:
    """Triton's driver interface as the JIT uses it, for a GPU of ``capability`` that is not there."""

    def __init__(self, capability: int) -> None:
        self.target = GPUTarget("cuda", capability, 32)
        self.utils = _Utils(capability)
        self.launcher_cls = _NoLaunch

    def is_active(self) -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch  # one JIT cache per architecture

    def get_current_stream(self, device=None) -> int:
        return 0


@contextlib.contextmanager
def cuda_target(capability: int):
    """Triton's JIT compiles for sm_<capability> inside."""
    previous = driver._active
    driver.set_active(CudaTarget(capability))
    try:
        yield
    finally:
        driver._active = previous


class Miss(NamedTuple):
    """One JIT cache miss: the variant's constexprs by name, and ptxas's report if it compiled here."""

    constants: dict
    ptxas_log: str


@contextlib.contextmanager
def compile_counter():
    """Counts the JIT's cache misses inside (each one a compile, or a load from Triton's cache on disk);
    yields a dict: each missed key -> :class:`Miss`. ptxas's own report (``-v``, with Triton's flags) is
    captured from Triton's log dump."""
    misses: dict = {}
    order: list = []
    output = io.StringIO()
    knobs = triton.knobs
    previous = knobs.runtime.jit_cache_hook, knobs.nvidia.dump_ptxas_log

    def hook(*, key, fn, compile, **kwargs):
        names = fn.jit_function.arg_names
        order.append((key, {names[index[0]]: value for index, value in compile["constants"].items()}, output.tell()))
        return False

    knobs.runtime.jit_cache_hook, knobs.nvidia.dump_ptxas_log = hook, True
    try:
        with contextlib.redirect_stdout(output):
            yield misses
    finally:
        knobs.runtime.jit_cache_hook, knobs.nvidia.dump_ptxas_log = previous
        text = output.getvalue()
        ends = [start for _, _, start in order[1:]] + [len(text)]
        for (key, constants, start), end in zip(order, ends):
            misses[key] = Miss(constants, text[start:end])


class Variant(NamedTuple):
    """One compiled variant, as read from its PTX and ptxas's report."""

    constants: dict  # the constexprs it was compiled for
    registers: int
    spill_bytes: int  # spill stores + spill loads, from ptxas's report
    approximations: dict  # CUDA's approximate instructions by full name (div.full.f32, ex2.approx.ftz.f32 ...)
    ieee: dict  # div.rn, sqrt.rn, fma.rn by full name (fma.rn.f32 would be a contracted multiply-add)
    loads: dict  # global loads by instruction (ld.global.v4.b32 ...); the step table's too (int32)
    stores: dict


APPROXIMATE = r"\b(?:div\.full|[a-z0-9]+\.approx)(?:\.[a-z0-9]+)*"
IEEE = r"\b(?:div|sqrt|fma)\.rn(?:\.[a-z0-9]+)*"


def compiled(kernel, misses: dict) -> list[Variant]:
    """The variants ``kernel`` compiled on the cache misses ``misses`` (:func:`compile_counter`), for the
    stand-in device of :func:`cuda_target`; each must have been compiled here (not loaded from the cache on
    disk), so that ptxas's report is there."""
    kernel_cache = kernel.device_caches[driver.active.get_current_device()][0]
    return [_read(kernel_cache[key], miss) for key, miss in misses.items()]


def _read(compiled_kernel, miss: Miss) -> Variant:
    ptx = compiled_kernel.asm["ptx"]
    registers = re.search(r"Used (\d+) registers", miss.ptxas_log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", miss.ptxas_log)
    if not (registers and spills):
        raise AssertionError(f"no ptxas report for {miss.constants} (loaded from Triton's cache on disk?)")
    return Variant(miss.constants, int(registers.group(1)), int(spills.group(1)) + int(spills.group(2)),
                   _count(APPROXIMATE, ptx), _count(IEEE, ptx), _count(r"\bld\.global(?:\.[a-z0-9]+)*", ptx),
                   _count(r"\bst\.global(?:\.[a-z0-9]+)*", ptx))


def _count(pattern: str, text: str) -> dict:
    found: dict = {}
    for match in re.finditer(pattern, text):
        found[match.group(0)] = found.get(match.group(0), 0) + 1
    return found


def interpret_unset() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


# Every kernel variant a server or a request can reach, at the production shapes: each dtype, a kernel size
# of each block class (windows of 1, 4, 16, 64, 256, 1,024 tokens: kernel sizes 1, 2, 3-4, 5-8, 9-16, 17-32)
# and each norm kind (2, 1, any other p); float16 and float64 up to kernel size 4. D=3584 and D=896 take
# the same block classes (every D from 513 up does). "production": kernel size 2, bfloat16 and float32.
NORMS = (2.0, 1.0, 3.0)
MATRICES = {
    "all": [("bfloat16", 3584, (1, 2, 3, 5, 9, 17)), ("float32", 896, (1, 2, 3, 5, 9, 17)),
            ("float16", 3584, (1, 2, 3)), ("float64", 896, (1, 2, 3))],
    "production": [("bfloat16", 3584, (2,)), ("float32", 896, (2,))],
}


def compile_every_variant(capability: int, matrix: str) -> list[dict]:
    """Runs the stage's launcher once per variant of ``MATRICES[matrix]`` on a stand-in sm_<capability> and
    reads what each call compiled."""
    import torch

    from vllm_stgridpool.config import STGridPoolConfig
    from vllm_stgridpool.stage import triton_stage
    from vllm_stgridpool.stage.triton_kernels import stage_level_kernel

    rows = []
    with cuda_target(capability):
        for dtype, dim, kernel_sizes in MATRICES[matrix]:
            for kernel_size in kernel_sizes:
                for norm_p in NORMS:
                    videos = torch.zeros(1, 2, kernel_size, kernel_size, dim, dtype=getattr(torch, dtype))
                    config = STGridPoolConfig(grid_sizes=(), grid_strides=(), kernel_size=kernel_size, norm_p=norm_p)
                    started = time.perf_counter()
                    with compile_counter() as misses:
                        triton_stage.run(videos, config)
                    seconds = round(time.perf_counter() - started, 2)
                    for variant in compiled(stage_level_kernel, misses):
                        constants = {k: str(v) for k, v in variant.constants.items()}
                        rows.append(dict(variant._asdict(), constants=constants, arch=capability, dtype=dtype,
                                         dim=dim, kernel_size=kernel_size, norm_p=norm_p, seconds=seconds))
    return rows


if __name__ == "__main__":  # python -m tests.support.triton_aot ARCH MATRIX: one JSON line on stdout, last
    import json
    import sys

    assert interpret_unset(), "unset TRITON_INTERPRET: the kernels must be JIT functions"
    variants = compile_every_variant(int(sys.argv[1]), sys.argv[2])
    print("\n" + json.dumps({"triton": triton.__version__, "variants": variants}))
