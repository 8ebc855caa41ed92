"""GPU check of the Triton stage: parity, CUDA-graph capture and timings against stock, on one CUDA GPU.

Needs PyTorch, Triton and this repository (its stage imports ``msgspec``, nothing of vLLM), so it runs on
a bare GPU machine: ``pip install torch triton msgspec``, then from the repository root
``python benchmarks/gpu_check.py`` (under 5 minutes). What it does, in one run:

1. Parity: the stage on CUDA in float64, float32, bfloat16 and float16 against the float64 reference
   (``tests/support/reference_stgridpool.py``, written from the spec) on the same rounded input:
   float64 within 1e-9; float32 within 4, bfloat16 and float16 within 1 unit of the dtype's eps times the
   window's largest |x| (the CPU kernels' contract); with kernel_size 1 (NSP the identity), mosaics equal
   bit for bit to the float32 reference rounded to the dtype level by level.
2. CUDA graphs: the stage captured in a graph (after a warm-up call builds its step tables), replayed on
   new input in the same buffer, equal to eager bit for bit.
3. Timings, side by side: vLLM's stock LLaVA-OneVision video pooling (``F.interpolate`` bilinear to
   ceil(H/2) on the (frames, D, H, W) view, as its ``apply_pooling``), the stage eager, the stage replayed
   from a CUDA graph, and the PyTorch-ops path (what CUDA ran before the Triton kernels) at B = 1; T=64,
   27 x 27, D=896 float32 and D=3584 bfloat16, B = 1 and 8. Each time is the median of CUDA-event timings.
   The memory floor of a variant is its input read once plus its output written once, at the device's
   copy bandwidth (measured with a 1 GiB device-to-device copy); the fraction reported is floor / time.

Writes JSON (``--output``, default ``benchmarks/results/gpu_check.json``). ``--dry-run`` runs every step
on CPU under Triton's interpreter at small shapes (no graphs: CPU cannot capture them), to check the
script, not to measure anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DTYPE_NAMES = ("float64", "float32", "bfloat16", "float16")
ULPS_ALLOWED = {"float32": 4.0, "bfloat16": 1.0, "float16": 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, small shapes")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per variant (median)")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    os.environ["STGRIDPOOL_STAGE_BACKEND"] = "triton"
    sys.path.insert(0, str(ROOT))

    import torch
    import triton

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --dry-run")
    started = time.perf_counter()
    result = {
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    result["copy_bandwidth_GBps"] = copy_bandwidth(device, args.dry_run)
    result["parity"] = parity(device, args.dry_run)
    result["cuda_graph"] = graph_replay(device) if device == "cuda" else "skipped: no CUDA in a dry run"
    result["timings"] = timings(device, args.dry_run, args.repeats, result["copy_bandwidth_GBps"])
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["vllm_imported"] = "vllm" in sys.modules  # the check runs where vLLM is not installed
    if args.dry_run:
        result["note"] = ("dry run: CPU tensors through Triton's interpreter (Python, one program after another); "
                          "the parity rows check the kernels, the timings measure nothing")
    ok = not result["vllm_imported"] and all(row["ok"] for row in result["parity"]) and (
        not isinstance(result["cuda_graph"], list) or all(row["equal"] for row in result["cuda_graph"]))
    result["ok"] = ok
    output = args.output or ROOT / "benchmarks" / "results" / ("gpu_check_dry_run.json" if args.dry_run
                                                              else "gpu_check.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"{'OK' if ok else 'FAILED'}: {output} ({result['seconds']} s)")
    sys.exit(0 if ok else 1)


def stage(x, config):
    from vllm_stgridpool import st_gridpool

    return st_gridpool(x, config)


def stock_pool(frames):
    """vLLM's LLaVA-OneVision ``apply_pooling`` on (frames, H*W, D) features: bilinear to ceil(H/2)."""
    import torch.nn.functional as F

    count, tokens, dim = frames.shape
    side = math.isqrt(tokens)
    grid = frames.view(count, side, side, dim).permute(0, 3, 1, 2)
    pooled = F.interpolate(grid, size=[math.ceil(side / 2), math.ceil(side / 2)], mode="bilinear")
    return pooled.permute(0, 2, 3, 1).view(count, -1, dim)


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after two warm-ups."""
    import torch

    for _ in range(2):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, dry_run) -> float:
    """GB/s of a device-to-device copy (bytes read plus bytes written over time)."""
    import torch

    size = (64 << 20) if dry_run else (1 << 30)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), device, 3 if dry_run else 20)
    return round(2 * size / (ms * 1e-3) / 1e9, 1)


def parity(device, dry_run) -> list[dict]:
    """The stage on ``device`` against the float64 reference, four dtypes, two settings; mosaics bit for bit."""
    import torch

    from tests.support.reference_stgridpool import ptg, ptg_level, st_gridpool_reference
    from vllm_stgridpool import STGridPoolConfig

    rows = []
    settings = [({}, (16, 27, 27, 16 if dry_run else 64)),
                ({"kernel_size": 3, "temperature": -2.0, "norm_p": 0.5}, (16, 24, 24, 8 if dry_run else 32))]
    gen = torch.Generator().manual_seed(0)
    for values, shape in settings:
        config = STGridPoolConfig.from_dict(values)
        base = torch.randn(*shape, generator=gen, dtype=torch.float64)
        for name in DTYPE_NAMES:
            dtype = getattr(torch, name)
            x = base.to(dtype)
            got = stage(x.to(device), config).cpu().double()
            want = st_gridpool_reference(x.double(), config.grid_sizes, config.grid_strides, config.kernel_size,
                                         config.temperature, config.norm_p)
            row = {"setting": values or "defaults", "shape": list(shape), "dtype": name}
            if name == "float64":
                row.update(max_abs_error=(got - want).abs().max().item(), bound=1e-9)
                row["ok"] = row["max_abs_error"] <= 1e-9
            else:
                k = config.kernel_size
                frames = ptg(x.double(), config.grid_sizes, config.grid_strides)
                out_h, out_w = want.shape[1:3]
                windows = frames[:, : out_h * k, : out_w * k].abs()
                largest = windows.unflatten(1, (out_h, k)).unflatten(3, (out_w, k)).amax(dim=(2, 4))
                ulps = ((got - want).abs() / (torch.finfo(dtype).eps * largest)).max().item()
                row.update(max_ulps_of_window_largest=ulps, bound=ULPS_ALLOWED[name], ok=ulps <= ULPS_ALLOWED[name])
            rows.append(row)
    # kernel_size 1: the mosaics themselves, bit for bit
    config = STGridPoolConfig.from_dict({"kernel_size": 1})
    base = torch.randn(24, 27, 27, 16, generator=gen)
    for name in DTYPE_NAMES[1:]:
        dtype = getattr(torch, name)
        x = base.to(dtype)
        want = x
        for grid, stride in zip(config.grid_sizes, config.grid_strides):
            want = ptg_level(want.float(), grid, stride).to(dtype)
        equal = torch.equal(stage(x.to(device), config).cpu(), want)
        rows.append({"setting": "kernel_size 1: mosaics", "shape": list(x.shape), "dtype": name,
                     "bit_for_bit": equal, "ok": equal})
    return rows


def graph_replay(device) -> list[dict]:
    """The stage captured in a CUDA graph, replayed on new input in the same buffer: equal to eager."""
    import torch

    from vllm_stgridpool import STGridPoolConfig

    rows = []
    config = STGridPoolConfig()
    for name, batch in [("float32", 1), ("bfloat16", 2)]:
        dtype = getattr(torch, name)
        static = torch.randn(batch, 64, 27, 27, 128, device=device, dtype=dtype)
        graph, out = capture(lambda: stage(static, config))
        fresh = torch.randn_like(static)
        static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        rows.append({"dtype": name, "shape": list(static.shape), "equal": torch.equal(out, stage(fresh, config))})
    return rows


def capture(fn):
    """A CUDA graph of ``fn`` (warmed up on a side stream first, as PyTorch asks) and its output."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def timings(device, dry_run, repeats, bandwidth) -> list[dict]:
    """Stock, stage eager, stage graph-replayed (and the PyTorch-ops path at B=1), with memory-floor fractions."""
    import torch

    from vllm_stgridpool import STGridPoolConfig
    from vllm_stgridpool.stage.plan import make_plan
    from vllm_stgridpool.stage.triton_stage import launches

    config = STGridPoolConfig()
    cases = ([(16, 32, "float32", 1), (16, 32, "bfloat16", 2)] if dry_run
             else [(64, 896, "float32", 1), (64, 896, "float32", 8), (64, 3584, "bfloat16", 1),
                   (64, 3584, "bfloat16", 8)])
    repeats = 2 if dry_run else repeats
    rows = []
    for frames, dim, name, batch in cases:
        dtype = getattr(torch, name)
        x = torch.randn(batch, frames, 27, 27, dim, device=device, dtype=dtype)
        flat = x.flatten(0, 1).flatten(1, 2)  # (B*T, H*W, D), what vLLM's pooling sees
        size = x.element_size()
        read = x.numel() * size
        stage_bytes = read + batch * frames * 13 * 13 * dim * size
        stock_bytes = read + batch * frames * 14 * 14 * dim * size
        row = {"frames": frames, "dim": dim, "dtype": name, "batch": batch,
               "launches_per_call": len(launches(make_plan(frames, 27, 27, config)))}
        row["stock_ms"] = timed(lambda: stock_pool(flat), device, repeats)
        row["stage_eager_ms"] = timed(lambda: stage(x, config), device, repeats)
        if device == "cuda":
            graph, _ = capture(lambda: stage(x, config))
            row["stage_graph_ms"] = timed(graph.replay, device, repeats)
        if batch == 1:
            os.environ["STGRIDPOOL_STAGE_BACKEND"] = "torch"
            try:
                row["pytorch_ops_path_ms"] = timed(lambda: stage(x, config), device, max(2, repeats // 4))
            finally:
                os.environ["STGRIDPOOL_STAGE_BACKEND"] = "triton"
        floor = lambda nbytes: nbytes / (bandwidth * 1e9) * 1e3  # noqa: E731 (ms)
        row["stock_floor_fraction"] = round(floor(stock_bytes) / row["stock_ms"], 3)
        best = row.get("stage_graph_ms", row["stage_eager_ms"])
        row["stage_floor_fraction"] = round(floor(stage_bytes) / best, 3)
        row["stage_vs_stock"] = round(best / row["stock_ms"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del x, flat
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
