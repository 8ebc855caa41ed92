"""Operator benchmark: ST-GridPool against vLLM's stock LLaVA-OneVision pooling.

One video of T=64 frames of 27 x 27 tokens (SigLIP-384/14), in two settings:
D=896 float32 and D=3584 bfloat16. Variants, timed in one run:

- stock: vLLM's ``LlavaOnevisionForConditionalGeneration.apply_pooling``, the
  real method called unbound; it reads nothing from ``self`` but
  ``config.vision_config.image_size`` / ``patch_size``, so a plain stand-in
  object carries those two numbers.
- eager: ``st_gridpool`` as is.
- compiled: ``torch.compile(st_gridpool, fullgraph=True)``, timed after warm-up.
- reference: the plain loop implementation from ``tests/reference_stgridpool.py``.

Prints a table (median seconds, ratio to stock) and writes
``benchmarks/results/op_bench.json``.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import msgspec
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from reference_stgridpool import st_gridpool_reference  # noqa: E402

from vllm_stgridpool import STGridPoolConfig, st_gridpool  # noqa: E402

NUM_FRAMES = 64
GRID = 27
SETTINGS = [(896, torch.float32), (3584, torch.bfloat16)]
WARMUP = 2
RUNS = 9
REFERENCE_RUNS = 3
TARGET_EAGER = 1.5
TARGET_COMPILED = 1.2
TARGET_REFERENCE_SPEEDUP = 20.0
OUT_PATH = os.path.join(ROOT, "benchmarks", "results", "op_bench.json")


class Timing(msgspec.Struct):
    variant: str
    median_s: float
    runs: int
    ratio_to_stock: float


class Case(msgspec.Struct):
    dim: int
    dtype: str
    shape: list[int]
    timings: list[Timing]
    eager_target_met: bool
    compiled_target_met: bool
    reference_speedup: float
    reference_target_met: bool


class Report(msgspec.Struct):
    torch_version: str
    vllm_version: str
    threads: int
    machine: str
    stock: str
    config: dict
    targets: dict
    cases: list[Case]


def stock_pooling():
    """vLLM 0.32's LLaVA-OneVision video pooling, called unbound with a stand-in ``self``."""
    from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration

    # SigLIP-384/14 as configured by llava-onevision-qwen2: 384 // 14 = 27.
    vision = SimpleNamespace(image_size=384, patch_size=14)
    stand_in = SimpleNamespace(config=SimpleNamespace(vision_config=vision))
    method = LlavaOnevisionForConditionalGeneration.apply_pooling
    return lambda feats: method(stand_in, feats)


def median_time(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(dim: int, dtype: torch.dtype, cfg: STGridPoolConfig, stock) -> Case:
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(NUM_FRAMES, GRID, GRID, dim, generator=gen).to(dtype)
    flat = x.reshape(NUM_FRAMES, GRID * GRID, dim)

    torch._dynamo.reset()
    compiled = torch.compile(lambda v: st_gridpool(v, cfg), fullgraph=True, dynamic=False)
    with torch.inference_mode():
        expected = st_gridpool(x, cfg)
        start = time.perf_counter()
        try:
            got = compiled(x)
        except Exception as exc:  # reported in the table, the other variants still run
            compiled = None
            print(f"  D={dim} {dtype}: torch.compile failed: {type(exc).__name__}", flush=True)
        else:
            compile_s = time.perf_counter() - start
            torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
            print(f"  D={dim} {dtype}: first compiled call (compile) {compile_s:.1f}s", flush=True)

        medians = {
            "stock": (median_time(lambda: stock(flat), RUNS, WARMUP), RUNS),
            "st_gridpool eager": (median_time(lambda: st_gridpool(x, cfg), RUNS, WARMUP), RUNS),
        }
        if compiled is not None:
            medians["st_gridpool compiled"] = (median_time(lambda: compiled(x), RUNS, WARMUP), RUNS)
        else:
            medians["st_gridpool compiled"] = (float("nan"), 0)
        ref = lambda: st_gridpool_reference(  # noqa: E731
            x, cfg.grid_sizes, cfg.grid_strides, cfg.kernel_size, cfg.temperature, cfg.norm_p
        )
        medians["reference"] = (median_time(ref, REFERENCE_RUNS, 1), REFERENCE_RUNS)

    base = medians["stock"][0]
    timings = [Timing(name, t, n, t / base) for name, (t, n) in medians.items()]
    eager = medians["st_gridpool eager"][0]
    speedup = medians["reference"][0] / eager
    return Case(
        dim=dim,
        dtype=str(dtype).replace("torch.", ""),
        shape=list(x.shape),
        timings=timings,
        eager_target_met=eager <= TARGET_EAGER * base,
        compiled_target_met=bool(medians["st_gridpool compiled"][0] <= TARGET_COMPILED * base),
        reference_speedup=speedup,
        reference_target_met=speedup >= TARGET_REFERENCE_SPEEDUP,
    )


def print_case(case: Case) -> None:
    print(f"\nT={NUM_FRAMES}, {GRID}x{GRID} tokens, D={case.dim}, {case.dtype}")
    print(f"  {'variant':<22} {'median ms':>11} {'x stock':>9} {'runs':>5}")
    for t in case.timings:
        print(f"  {t.variant:<22} {t.median_s * 1e3:>11.2f} {t.ratio_to_stock:>9.2f} {t.runs:>5}")
    ok = {True: "met", False: "NOT met"}
    print(f"  eager <= {TARGET_EAGER}x stock: {ok[case.eager_target_met]}")
    print(f"  compiled <= {TARGET_COMPILED}x stock: {ok[case.compiled_target_met]}")
    print(
        f"  eager >= {TARGET_REFERENCE_SPEEDUP:g}x faster than reference "
        f"({case.reference_speedup:.0f}x): {ok[case.reference_target_met]}"
    )


def main() -> None:
    import vllm

    cfg = STGridPoolConfig()
    stock = stock_pooling()
    print(f"torch {torch.__version__}, vllm {vllm.__version__}, {torch.get_num_threads()} threads", flush=True)
    cases = []
    for dim, dtype in SETTINGS:
        case = run_case(dim, dtype, cfg, stock)
        print_case(case)
        cases.append(case)
    report = Report(
        torch_version=str(torch.__version__),
        vllm_version=str(vllm.__version__),
        threads=torch.get_num_threads(),
        machine=f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} cpus",
        stock="LlavaOnevisionForConditionalGeneration.apply_pooling (unbound, stand-in self)",
        config=cfg.to_dict(),
        targets={
            "eager_max_ratio": TARGET_EAGER,
            "compiled_max_ratio": TARGET_COMPILED,
            "min_speedup_vs_reference": TARGET_REFERENCE_SPEEDUP,
        },
        cases=cases,
    )
    os.makedirs(os.path.dirname(OUT_PATH), exist_ok=True)
    with open(OUT_PATH, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(report), indent=2))
    print(f"\nwrote {os.path.relpath(OUT_PATH, ROOT)}")


if __name__ == "__main__":
    main()
