"""GPU check of the Triton stage: what no test here can run. On one or two CUDA GPUs, in under 10 minutes.

Needs PyTorch, Triton and this repository (its stage imports ``msgspec``, nothing of vLLM), so it runs on
a bare GPU machine: ``pip install torch triton msgspec``, then from the repository root
``python benchmarks/gpu_check.py``. Each row runs on its own: one that fails is recorded with its error and
the others still run, and the JSON report (``--output``, default ``benchmarks/results/gpu_check.json``) is
rewritten after every row, so a crash loses nothing already measured. Rows:

1. ``start-up``: ``triton_stage.warm_up`` as the engine runs it for the default server settings (27 x 27,
   bfloat16 at D=3584, float32 at D=896): every reachable variant compiled, seconds per dtype.
2. ``reference``: the stage against the float64 reference (tests/support/reference_stgridpool.py) on small
   shapes, every dtype, norms 2, 1, 0.5 and 3 at temperatures from -2 to 1: float64 within 1e-9, float32
   within 4 and bfloat16/float16 within 1 unit of the dtype's eps times the window's largest |x|
   (docs/operator.md).
3. ``production``: B=2, T=64, 27 x 27, D=3584 bfloat16 and D=896 float32, norms 2 and 1, against the
   PyTorch-ops backend run in float64 on the same input (the same bounds); the PyTorch-ops backend's own
   error for comparison.
4. ``layouts``: a non-contiguous input (channels not innermost) equals the contiguous one bit for bit;
   extreme values (zeros, +-the dtype's largest, subnormals, 1e30) give finite outputs.
5. ``torch.compile``: the stage inside ``torch.compile(fullgraph=True)`` equals eager.
6. ``cuda graph``: after the warm-up only (no eager call of the stage, as vLLM captures), a 61-frame
   bfloat16 call captured, replayed on new input, equal to eager; a pyramid the warm-up did not know is
   refused under capture with a message.
7. ``cuda:1`` (when there is one): the stage on cuda:1 while cuda:0 is current equals it on cuda:0.
8. ``timings``: vLLM's stock pooling, the stage eager and replayed from a CUDA graph, the PyTorch-ops
   backend: medians of CUDA-event timings, side by side.

``--dry-run`` runs the rows that can on CPU under Triton's interpreter at small shapes, to check the
script, not the GPU.
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
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ULPS_ALLOWED = {"float32": 4.0, "bfloat16": 1.0, "float16": 1.0}


class Report:
    """The JSON report, rewritten after every row; each row guarded."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path = path
        self.data = {**header, "rows": []}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def row(self, section: str, name: str, check) -> dict:
        """Runs ``check()`` (a dict of results, with ``ok`` when it judges): an exception is the row's
        error, never the end of the run."""
        started = time.perf_counter()
        try:
            row = {"section": section, "name": name, **check()}
            row.setdefault("ok", True)
        except Exception as error:  # noqa: BLE001 (a GPU fault, an assertion, a compile error: all recorded)
            row = {"section": section, "name": name, "ok": False, "error": f"{type(error).__name__}: {error}",
                   "traceback": traceback.format_exc(limit=6)}
        row["seconds"] = round(time.perf_counter() - started, 2)
        self.data["rows"].append(row)
        self.write()
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        return row

    def write(self) -> None:
        rows = self.data["rows"]
        self.data["ok"] = all(row["ok"] for row in rows)
        self.data["failed"] = [f"{row['section']}: {row['name']}" for row in rows if not row["ok"]]
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(self.data, indent=2) + "\n")
        partial.replace(self.path)


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
    output = args.output or ROOT / "benchmarks" / "results" / ("gpu_check_dry_run.json" if args.dry_run
                                                              else "gpu_check.json")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if device == "cuda" else []
    report = Report(output, {"dry_run": args.dry_run, "devices": gpus or [platform.processor() or "cpu"],
                             "capability": list(torch.cuda.get_device_capability()) if gpus else None,
                             "torch": torch.__version__, "triton": triton.__version__,
                             "python": platform.python_version()})
    started = time.perf_counter()
    run_rows(report, device, args.dry_run, args.repeats)
    report.data["seconds"] = round(time.perf_counter() - started, 1)
    report.data["vllm_imported"] = "vllm" in sys.modules  # the check runs where vLLM is not installed
    report.write()
    print(f"{'OK' if report.data['ok'] else 'FAILED: ' + ', '.join(report.data['failed'])}: {output} "
          f"({report.data['seconds']} s)")
    sys.exit(0 if report.data["ok"] else 1)


def run_rows(report: Report, device: str, dry_run: bool, repeats: int) -> None:
    import torch

    from vllm_stgridpool import STGridPoolConfig

    small = dry_run
    for dtype, dim in (("bfloat16", 32 if small else 3584), ("float32", 16 if small else 896)):
        report.row("start-up", f"warm_up {dtype} D={dim}", lambda: warm(dtype, dim, device))
    for values in ({}, {"norm_p": 1.0}, {"kernel_size": 3, "temperature": -2.0, "norm_p": 0.5},
                   {"grid_sizes": [3, 6], "grid_strides": [1, 2], "kernel_size": 4, "temperature": 0.5, "norm_p": 3.0}):
        for dtype in ("float64", "float32", "bfloat16", "float16"):
            report.row("reference", f"{dtype} {values or 'defaults'}",
                       lambda: against_reference(STGridPoolConfig.from_dict(values), dtype, device))
    for dtype, dim in (("bfloat16", 3584), ("float32", 896)):
        for norm_p in (2.0, 1.0):
            shape = (2, 8, 9, 9, 32) if small else (2, 64, 27, 27, dim)
            report.row("production", f"{dtype} D={shape[-1]} B=2 T={shape[1]} p={norm_p}",
                       lambda: against_torch_ops(shape, dtype, norm_p, device))
    report.row("layouts", "non-contiguous input equals contiguous", lambda: strided(device, small))
    for dtype in ("float64", "float32", "bfloat16", "float16"):
        report.row("layouts", f"extreme values {dtype}: finite", lambda: extremes(dtype, device))
    if device != "cuda":
        return  # compile and graphs on CUDA only
    report.row("torch.compile", "fullgraph, equal to eager", lambda: compiled(device))
    report.row("cuda graph", "captured after the warm-up only, replayed", lambda: graph_after_warm_up(device))
    report.row("cuda graph", "an unknown pyramid is refused under capture", lambda: capture_refused(device))
    if torch.cuda.device_count() > 1:
        report.row("cuda:1", "on cuda:1 while cuda:0 is current", second_device)
    bandwidth = report.row("timings", "device copy bandwidth", lambda: {"GBps": copy_bandwidth()})
    for frames, dim, dtype, batch in ((64, 896, "float32", 1), (64, 896, "float32", 8), (64, 3584, "bfloat16", 1),
                                      (64, 3584, "bfloat16", 8)):
        report.row("timings", f"{dtype} D={dim} B={batch} T={frames}",
                   lambda: timings(frames, dim, dtype, batch, repeats, bandwidth.get("GBps")))


def stage(x, config):
    from vllm_stgridpool import st_gridpool

    return st_gridpool(x, config)


def torch_ops(x, config):
    """The PyTorch-ops backend on the same device."""
    os.environ["STGRIDPOOL_STAGE_BACKEND"] = "torch"
    try:
        return stage(x, config)
    finally:
        os.environ["STGRIDPOOL_STAGE_BACKEND"] = "triton"


def warm(dtype: str, dim: int, device: str) -> dict:
    import torch

    from vllm_stgridpool.config import STGridPoolSettings
    from vllm_stgridpool.stage import triton_stage

    done = triton_stage.warm_up(STGridPoolSettings(), 27, 27, [dim], getattr(torch, dtype), device)
    return {"kernel_calls": done.variants, "step_tables": done.tables, "warm_up_seconds": round(done.seconds, 2)}


def ulps_of_window_largest(got, x, reference, config) -> float:
    """|got - reference| in units of the dtype's eps times the window's largest |x| after the pyramid, video
    by video of (B, T, H, W, D) or one (T, H, W, D), on the tensors' device."""
    import torch

    from tests.support.reference_stgridpool import ptg

    if x.dim() == 5:
        return max(ulps_of_window_largest(g, v, r, config) for g, v, r in zip(got, x, reference))
    frames = ptg(x.double(), config.grid_sizes, config.grid_strides)
    out_h, out_w = reference.shape[1:3]
    k = config.kernel_size
    windows = frames[:, : out_h * k, : out_w * k].abs()
    largest = windows.unflatten(1, (out_h, k)).unflatten(3, (out_w, k)).amax(dim=(2, 4))
    error = (got.double() - reference.double().to(got.device)).abs()
    return (error / (torch.finfo(x.dtype).eps * largest.to(got.device))).max().item()


def against_reference(config, dtype: str, device: str) -> dict:
    import torch

    from tests.support.reference_stgridpool import st_gridpool_reference

    x = torch.randn(16, 13, 11, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x.to(getattr(torch, dtype))
    got = stage(x.to(device), config).cpu()
    want = st_gridpool_reference(x.double(), config.grid_sizes, config.grid_strides, config.kernel_size,
                                 config.temperature, config.norm_p)
    if dtype == "float64":
        error = (got - want).abs().max().item()
        return {"max_abs_error": error, "bound": 1e-9, "ok": error <= 1e-9}
    ulps = ulps_of_window_largest(got, x, want, config)
    return {"ulps": round(ulps, 3), "bound": ULPS_ALLOWED[dtype], "ok": ulps <= ULPS_ALLOWED[dtype]}


def against_torch_ops(shape, dtype: str, norm_p: float, device: str) -> dict:
    """The Triton stage and the PyTorch-ops backend (same dtype) against the PyTorch-ops backend in float64."""
    import torch

    from vllm_stgridpool import STGridPoolConfig

    config = STGridPoolConfig(norm_p=norm_p)
    x = torch.randn(*shape, device=device, generator=None).to(getattr(torch, dtype))
    want = torch_ops(x.double(), config)
    triton_ulps = ulps_of_window_largest(stage(x, config), x, want, config)
    torch_ulps = ulps_of_window_largest(torch_ops(x, config), x, want, config)
    bound = ULPS_ALLOWED[dtype]
    return {"triton_ulps": round(triton_ulps, 3), "torch_ops_ulps": round(torch_ulps, 3), "bound": bound,
            "ok": triton_ulps <= bound}


def strided(device: str, small: bool) -> dict:
    import torch

    from vllm_stgridpool import STGridPoolConfig

    dim = 32 if small else 3584
    base = torch.randn(2, 16, dim, 27, 27, device=device).to(torch.bfloat16)  # (B, T, D, W, H) storage
    x = base.permute(0, 1, 4, 3, 2)
    config = STGridPoolConfig()
    return {"bit_for_bit": (equal := torch.equal(stage(x, config), stage(x.contiguous(), config))), "ok": equal}


def extremes(dtype: str, device: str) -> dict:
    """Tokens of zeros, +-the dtype's largest value, its subnormals, 1e30 (clipped) and ordinary values."""
    import torch

    from vllm_stgridpool import STGridPoolConfig

    info = torch.finfo(getattr(torch, dtype))
    gen = torch.Generator().manual_seed(3)
    normal = torch.randn(12, 9, 7, 16, generator=gen, dtype=torch.float64)
    scales = torch.tensor([0.0, info.max, info.tiny / 4, 1e30, 1.0], dtype=torch.float64)
    which = torch.randint(0, len(scales), (12, 9, 7, 1), generator=gen)
    x = (normal.sign() * scales[which] + (which == 4) * normal).clamp(-info.max, info.max).to(getattr(torch, dtype))
    finite = []
    for temperature, norm_p in ((1e4, 2.0), (-1e4, 0.5), (0.0, 1.0)):
        config = STGridPoolConfig(grid_sizes=(4, 2), grid_strides=(1, 3), temperature=temperature, norm_p=norm_p)
        finite.append(bool(torch.isfinite(stage(x.to(device), config)).all()))
    return {"finite": finite, "ok": all(finite)}


def compiled(device: str) -> dict:
    import torch

    from vllm_stgridpool import STGridPoolConfig

    torch._dynamo.reset()
    config = STGridPoolConfig()
    x = torch.randn(1, 32, 27, 27, 896, device=device)
    got = torch.compile(lambda v: stage(v, config), fullgraph=True)(x)
    return {"equal": (equal := torch.equal(got, stage(x, config))), "ok": equal}


def graph_after_warm_up(device: str) -> dict:
    """As vLLM: the engine's warm-up, then capture; the stage never ran eagerly on this shape before."""
    import torch

    from vllm_stgridpool import STGridPoolConfig
    from vllm_stgridpool.config import STGridPoolSettings
    from vllm_stgridpool.stage import triton_stage

    triton_stage.warm_up(STGridPoolSettings(), 27, 27, [1152], torch.bfloat16, device)
    config = STGridPoolConfig()
    static = torch.randn(1, 61, 27, 27, 1152, device=device).to(torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = stage(static, config)
    fresh = torch.randn_like(static)
    static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    return {"equal": (equal := torch.equal(out, stage(fresh, config))), "ok": equal}


def capture_refused(device: str) -> dict:
    import torch

    from vllm_stgridpool import STGridPoolConfig

    config = STGridPoolConfig(grid_sizes=(5,), grid_strides=(3,))
    static = torch.randn(1, 37, 27, 27, 64, device=device)
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            stage(static, config)
    except RuntimeError as error:
        return {"message": str(error)[:300], "ok": "before capturing" in str(error)}
    return {"ok": False, "message": "captured: the step table was uploaded during capture"}


def second_device() -> dict:
    import torch

    from vllm_stgridpool import STGridPoolConfig

    config = STGridPoolConfig()
    x = torch.randn(1, 16, 27, 27, 896, device="cuda:0").to(torch.bfloat16)
    torch.cuda.set_device(0)
    on_one = stage(x.to("cuda:1"), config)
    torch.cuda.synchronize("cuda:1")
    equal = on_one.device.index == 1 and torch.equal(on_one.cpu(), stage(x, config).cpu())
    return {"equal": equal, "ok": equal}


def stock_pool(frames):
    """vLLM's LLaVA-OneVision ``apply_pooling`` on (frames, H*W, D) features: bilinear to ceil(H/2)."""
    import torch.nn.functional as F

    count, tokens, dim = frames.shape
    side = math.isqrt(tokens)
    grid = frames.view(count, side, side, dim).permute(0, 3, 1, 2)
    pooled = F.interpolate(grid, size=[math.ceil(side / 2), math.ceil(side / 2)], mode="bilinear")
    return pooled.permute(0, 2, 3, 1).view(count, -1, dim)


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` CUDA-event-timed calls after two warm-ups."""
    import torch

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read plus bytes written over time)."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return round(2 * src.numel() / (timed(lambda: dst.copy_(src), 20) * 1e-3) / 1e9, 1)


def timings(frames: int, dim: int, dtype: str, batch: int, repeats: int, bandwidth: float | None) -> dict:
    """Stock, the stage eager and graph-replayed, the PyTorch-ops backend at B = 1; memory-floor fractions."""
    import torch

    from vllm_stgridpool import STGridPoolConfig

    config = STGridPoolConfig()
    x = torch.randn(batch, frames, 27, 27, dim, device="cuda").to(getattr(torch, dtype))
    flat = x.flatten(0, 1).flatten(1, 2)  # (B*T, H*W, D), what vLLM's pooling sees
    row = {"stock_ms": timed(lambda: stock_pool(flat), repeats),
           "stage_eager_ms": timed(lambda: stage(x, config), repeats)}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stage(x, config)
    row["stage_graph_ms"] = timed(graph.replay, repeats)
    if batch == 1:
        row["pytorch_ops_ms"] = timed(lambda: torch_ops(x, config), max(2, repeats // 4))
    row["stage_vs_stock"] = round(row["stage_graph_ms"] / row["stock_ms"], 2)
    if bandwidth:
        size = x.element_size()
        moved = x.numel() * size + batch * frames * 13 * 13 * dim * size
        row["stage_floor_fraction"] = round(moved / (bandwidth * 1e9) * 1e3 / row["stage_graph_ms"], 3)
    return row


if __name__ == "__main__":
    main()
