"""Operator benchmark: ST-GridPool against vLLM's stock LLaVA-OneVision pooling.

One video of T=64 frames of 27 x 27 tokens (SigLIP-384/14), in two settings:
D=896 float32 and D=3584 bfloat16. Variants, timed side by side in one run:

- stock: vLLM's ``LlavaOnevisionForConditionalGeneration.apply_pooling``, the
  real method called unbound; it reads nothing from ``self`` but
  ``config.vision_config.image_size`` / ``patch_size``, so a plain stand-in
  object carries those two numbers.
- eager: ``st_gridpool`` as is: on CPU, the fused kernels of ``cpu_kernels.py``.
- compiled: ``torch.compile(st_gridpool, fullgraph=True)``, timed after warm-up
  (on CPU the eager stage as one opaque op, the compiler's own code elsewhere).
- eager, PyTorch ops: ``st_gridpool`` with the fused kernels off, the path
  every other device takes, for comparison.
- plain reference: ``tests/reference_stgridpool.py``, a literal loop
  implementation written from the spec, one softmax per window, in the
  style of the authors' published code. It is the stand-in for "the
  authors' code" (which this repository does not ship), not that code.

The machine may be shared: variants are timed in interleaved rounds (one
call of each per round, the order rotating) and every ratio is the median of
the per-round ratios, so a slow stretch hits all variants alike. Also
reported: where eager time goes (``torch.profiler``, grouped into the norm
pass, softmax weights, weighted sum, resize, tiling and allocation), the
tokens stock and stage read per video (the work their times follow), peak
memory beyond the input (from the profiler's allocation events), and batches
of B = 1, 4, 8 videos at T = 32. Writes ``benchmarks/results/op_bench.json``
and ``op_bench.png``.

Outputs of tens of MB cost their first touch: with glibc's default
allocator an allocation it cannot serve from its heap comes as fresh pages,
and each 4 KB page faults once (about 17 ms for 39 MB here), for stock and
stage alike; whether a call gets fresh or recycled pages depends on the
process's heap history. Every variant's minor page faults per call are
reported so a run says which it measured, and ``make bench-op`` runs the
cases a second time with glibc told to recycle (``MALLOC_MMAP_THRESHOLD_``
and ``MALLOC_TRIM_THRESHOLD_`` at 4 GB), as tcmalloc (which vLLM recommends
on CPU) and GPU caching allocators do: there the ratios are compute alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from types import SimpleNamespace

import msgspec
import torch
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tests.support: the float64 reference and the peak-memory gauge

from tests.support.memory_peak import peak_bytes  # noqa: E402
from tests.support.reference_stgridpool import st_gridpool_reference  # noqa: E402

from vllm_stgridpool import STGridPoolConfig, st_gridpool
from vllm_stgridpool.stage import cpu_kernels  # noqa: E402
from vllm_stgridpool.stage.plan import PoolFrames, PoolMosaics, Resize, chunk_frames, make_plan  # noqa: E402
from vllm_stgridpool.stage.cost import stage_cost  # noqa: E402

NUM_FRAMES = 64
GRID = 27
SETTINGS = [(896, torch.float32), (3584, torch.bfloat16)]
BATCH_FRAMES = 32
BATCHES = (1, 4, 8)
TARGETS = {"eager": 2.0, "compiled": 1.5, "eager_aim": 1.5, "compiled_aim": 1.2, "reference_speedup": 10.0,
           "peak_extra_of_input": 0.5}
RESULTS = os.path.join(ROOT, "benchmarks", "results")
RECYCLED = "MALLOC_MMAP_THRESHOLD_" in os.environ and "MALLOC_TRIM_THRESHOLD_" in os.environ
ALLOCATOR = ("glibc told to recycle pages (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_)" if RECYCLED
             else "glibc default")


class Variant(msgspec.Struct):
    name: str
    median_ms: float
    ratio_to_stock: float  # median over rounds of (this variant / stock in the same round)
    rounds: int
    page_faults: int  # minor page faults of one call after the timed rounds (fresh pages touched)


class Case(msgspec.Struct):
    dim: int
    dtype: str
    shape: list[int]
    input_mb: float
    variants: list[Variant]
    compile_s: float
    reference_speedup: float  # plain reference / eager, medians
    breakdown_ms: dict[str, float]  # eager, one profiled call
    ops_breakdown_ms: dict[str, float]  # eager on the PyTorch-ops path (every other device's), one profiled call
    stock_breakdown_ms: dict[str, float]
    peak_extra_mb: dict[str, float]  # beyond the input: with and without the output
    stage_cost_mb: float
    token_reads: dict[str, int]  # tokens read from the features per video, see token_reads()
    targets_met: dict[str, bool]


class BatchRow(msgspec.Struct):
    variant: str
    dim: int
    dtype: str
    batch: int
    median_ms: float
    per_video_ms: float
    ratio_to_batch_of_one: float  # time(B) / (B * time(1)); <= 1 is the target
    page_faults: int  # minor page faults of one call after the timed rounds (fresh pages touched)


class Report(msgspec.Struct):
    torch_version: str
    vllm_version: str
    threads: int
    machine: str
    allocator: str
    stock: str
    reference: str
    config: dict
    targets: dict
    cases: list[Case]
    batches: list[BatchRow]


def stock_pooling():
    """vLLM's LLaVA-OneVision video pooling, called unbound with a stand-in ``self``."""
    from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration

    # SigLIP-384/14 as configured by llava-onevision-qwen2: 384 // 14 = 27.
    vision = SimpleNamespace(image_size=384, patch_size=14)
    stand_in = SimpleNamespace(config=SimpleNamespace(vision_config=vision))
    method = LlavaOnevisionForConditionalGeneration.apply_pooling
    return lambda feats: method(stand_in, feats)


def ops_path(fn, *args):
    """``fn`` on the PyTorch-ops path, the one every device but the CPU takes (the fused CPU kernels off)."""
    with cpu_kernels.disabled():
        return fn(*args)


def interleaved(fns: dict, rounds: int, only_some: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, one call of each per round, the order rotating each round."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if only_some and name in only_some and r % only_some[name]:
                continue
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def page_faults(fn) -> int:
    """Minor page faults of one call of ``fn``: pages it touched for the first time (244 per MB with 4 KB pages)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def ratio(times: dict[str, list[float]], name: str) -> float:
    pairs = list(zip(times[name], times["stock"]))
    return statistics.median(a / b for a, b in pairs)


def token_reads(cfg: STGridPoolConfig, dim: int, itemsize: int) -> dict[str, int]:
    """The tokens (D channels each) a video's pooling reads from its frames: the work its time follows.

    Stock's bilinear pooling reads 2 x 2 taps per output token. NSP reads
    each k x k window once (the fused kernel weights the window from L1).
    The area resize reads every token of each output's window, rows
    ``[floor(i * H / h), ceil((i + 1) * H / h))`` and likewise columns, so
    windows overlap where h does not divide H; outputs no place keeps (the
    crop) are skipped, as in the kernel. The plan is the one the stage runs
    for these features (its segments follow their size).
    """
    plan = make_plan(NUM_FRAMES, GRID, GRID, cfg, chunk_frames(GRID, GRID, dim, itemsize))

    def window(size: int, out: int, i: int) -> int:
        return -(-(i + 1) * size // out) - i * size // out

    out_h, out_w = plan.out_grid
    k = plan.kernel_size
    nsp = resize = 0
    for step in plan.steps:
        if isinstance(step, PoolFrames):
            nsp += (step.stop - step.start) * out_h * out_w * k * k
        elif isinstance(step, PoolMosaics):
            nsp += len(step.mosaics) * out_h * out_w * k * k
        elif isinstance(step, Resize):
            h, w = step.size
            for places in step.places:
                resize += sum(window(GRID, h, i) * window(GRID, w, j) for i in range(h) for j in range(w)
                              if any(i < p.rows and j < p.cols for p in places))
    stock_side = -(-GRID // 2)
    return {"stock": NUM_FRAMES * stock_side * stock_side * 4, "stage": nsp + resize, "nsp": nsp, "resize": resize}


PARTS = (
    ("fused NSP (CPU kernel)", ("stgridpool::norm_pool_into",)),
    ("fused resize (CPU kernel)", ("stgridpool::area_resize_into",)),
    ("norm pass", ("linalg_vector_norm", "amax", "amin", "maximum", "pow", "mean", "div", "abs", "clamp")),
    ("weights", ("softmax", "sub")),
    ("weighted sum", ("addcmul", "mul", "nan_to_num")),
    ("resize", ("adaptive_avg_pool2d", "avg_pool2d", "upsample_bilinear2d")),
    ("tiling", ("copy", "index_copy", "index_select", "index_put", "stack")),
    ("allocation", ("empty", "empty_strided", "new_empty", "empty_like", "resize")),
)


def breakdown(fn) -> dict[str, float]:
    """Self CPU milliseconds of one call, grouped by the part of the stage each aten op belongs to.

    ``weighted sum`` includes the first touch of the freshly allocated
    output (its page faults), as the stock's ``resize`` does.
    """
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    parts = {name: 0.0 for name, _ in PARTS}
    parts["other"] = 0.0
    for event in prof.key_averages():
        if event.key.startswith("stgridpool::"):
            op = event.key
        elif event.key.startswith("aten::"):
            op = event.key.removeprefix("aten::").strip("_")
        else:
            continue
        part = next((name for name, ops in PARTS if op in ops), "other")
        parts[part] += event.self_cpu_time_total / 1e3
    parts["total"] = sum(parts.values())
    return {k: round(v, 2) for k, v in parts.items()}


def run_case(dim: int, dtype: torch.dtype, cfg: STGridPoolConfig, stock, rounds: int) -> Case:
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(NUM_FRAMES, GRID, GRID, dim, generator=gen).to(dtype)
    flat = x.reshape(NUM_FRAMES, GRID * GRID, dim)
    input_bytes = x.numel() * x.element_size()

    torch._dynamo.reset()
    compiled = torch.compile(lambda v: st_gridpool(v, cfg), fullgraph=True, dynamic=False)
    reference = lambda: st_gridpool_reference(  # noqa: E731
        x, cfg.grid_sizes, cfg.grid_strides, cfg.kernel_size, cfg.temperature, cfg.norm_p
    )
    with torch.inference_mode():
        expected = st_gridpool(x, cfg)
        start = time.perf_counter()
        got = compiled(x)
        compile_s = time.perf_counter() - start
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
        print(f"  D={dim} {dtype}: first compiled call (compile) {compile_s:.0f} s", flush=True)
        fns = {
            "stock": lambda: stock(flat),
            "eager": lambda: st_gridpool(x, cfg),
            "compiled": lambda: compiled(x),
            "eager, PyTorch ops": lambda: ops_path(st_gridpool, x, cfg),
            "reference": reference,
        }
        for fn in fns.values():
            fn()
        times = interleaved(fns, rounds, only_some={"reference": 3})
        faults = {name: page_faults(fn) for name, fn in fns.items() if name != "reference"}
        parts = breakdown(fns["eager"])
        ops_parts = breakdown(fns["eager, PyTorch ops"])
        stock_parts = breakdown(fns["stock"])
        output_bytes = expected.numel() * expected.element_size()
        peak = peak_bytes(fns["eager"])
    cost = stage_cost(NUM_FRAMES, GRID, GRID, dim, cfg, x.element_size())
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    variants = [Variant(name, medians[name] * 1e3, ratio(times, name), len(times[name]), faults.get(name, -1))
                for name in fns]
    speedup = medians["reference"] / medians["eager"]
    extra = (peak - output_bytes) / input_bytes
    return Case(
        dim=dim,
        dtype=str(dtype).removeprefix("torch."),
        shape=list(x.shape),
        input_mb=input_bytes / 1e6,
        variants=variants,
        compile_s=compile_s,
        reference_speedup=speedup,
        breakdown_ms=parts,
        ops_breakdown_ms=ops_parts,
        stock_breakdown_ms=stock_parts,
        peak_extra_mb={"with_output": peak / 1e6, "beyond_output": (peak - output_bytes) / 1e6,
                       "beyond_output_of_input": extra},
        stage_cost_mb=cost.peak_bytes / 1e6,
        token_reads=token_reads(cfg, dim, x.element_size()),
        targets_met={
            "eager": ratio(times, "eager") <= TARGETS["eager"],
            "compiled": ratio(times, "compiled") <= TARGETS["compiled"],
            "eager_aim": ratio(times, "eager") <= TARGETS["eager_aim"],
            "compiled_aim": ratio(times, "compiled") <= TARGETS["compiled_aim"],
            "reference_speedup": speedup >= TARGETS["reference_speedup"],
            "peak_extra": extra <= TARGETS["peak_extra_of_input"],
        },
    )


def run_batches(dim: int, dtype: torch.dtype, cfg: STGridPoolConfig, stock, rounds: int) -> list[BatchRow]:
    """B videos of T=32 frames in one call, eager and stock side by side (stock pools all B*T frames at once)."""
    gen = torch.Generator().manual_seed(dim + 1)
    videos = torch.randn(max(BATCHES), BATCH_FRAMES, GRID, GRID, dim, generator=gen).to(dtype)
    fns = {}
    for b in BATCHES:
        fns[f"eager B={b}"] = lambda b=b: st_gridpool(videos[:b], cfg)
        fns[f"stock B={b}"] = lambda b=b: stock(videos[:b].reshape(b * BATCH_FRAMES, GRID * GRID, dim))
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        times = interleaved(fns, rounds)
        faults = {name: page_faults(fn) for name, fn in fns.items()}
    rows = []
    for variant in ("eager", "stock"):
        one = statistics.median(times[f"{variant} B=1"])
        for b in BATCHES:
            med = statistics.median(times[f"{variant} B={b}"])
            rows.append(BatchRow(variant, dim, str(dtype).removeprefix("torch."), b, med * 1e3, med * 1e3 / b,
                                 med / (b * one), faults[f"{variant} B={b}"]))
    return rows


def print_case(case: Case) -> None:
    print(f"\nT={NUM_FRAMES}, {GRID}x{GRID} tokens, D={case.dim}, {case.dtype} ({case.input_mb:.0f} MB)")
    print(f"  {'variant':<20} {'median ms':>10} {'x stock':>8} {'faults/call':>12}  target")
    goals = {"eager": TARGETS["eager"], "compiled": TARGETS["compiled"]}
    for v in case.variants:
        goal = f"<= {goals[v.name]}x ({'met' if v.ratio_to_stock <= goals[v.name] else 'NOT met'})" if v.name in goals else ""
        faults = "" if v.page_faults < 0 else v.page_faults
        print(f"  {v.name:<20} {v.median_ms:>10.1f} {v.ratio_to_stock:>8.2f} {faults:>12}  {goal}")
    ok = {True: "met", False: "NOT met"}
    print(f"  eager is {case.reference_speedup:.0f}x faster than the plain reference "
          f"(>= {TARGETS['reference_speedup']:g}x: {ok[case.targets_met['reference_speedup']]})")
    print(f"  aims: eager <= {TARGETS['eager_aim']}x {ok[case.targets_met['eager_aim']]}, "
          f"compiled <= {TARGETS['compiled_aim']}x {ok[case.targets_met['compiled_aim']]}; "
          f"first compiled call {case.compile_s:.0f} s")
    peak = case.peak_extra_mb
    print(f"  peak memory beyond the input: {peak['with_output']:.1f} MB, of which output "
          f"{peak['with_output'] - peak['beyond_output']:.1f} MB; the rest is "
          f"{peak['beyond_output_of_input']:.2f}x the input (<= {TARGETS['peak_extra_of_input']}x: "
          f"{ok[case.targets_met['peak_extra']]}); stage_cost bound {case.stage_cost_mb:.1f} MB")
    print("  eager breakdown, ms (one profiled call): "
          + ", ".join(f"{k} {v:.1f}" for k, v in case.breakdown_ms.items() if v))
    print("  eager on PyTorch ops, breakdown, ms: "
          + ", ".join(f"{k} {v:.1f}" for k, v in case.ops_breakdown_ms.items() if v))
    print("  stock breakdown, ms: " + ", ".join(f"{k} {v:.1f}" for k, v in case.stock_breakdown_ms.items() if v))
    reads = case.token_reads
    print(f"  tokens read per video: stock {reads['stock']:,}, stage {reads['stage']:,} (NSP {reads['nsp']:,}, "
          f"resize {reads['resize']:,}), {reads['stage'] / reads['stock']:.2f}x stock")


def plot(cases: list[Case], batches: list[BatchRow], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = [f"D={c.dim} {c.dtype}" for c in cases]
    for i, name in enumerate(("eager", "compiled", "eager, PyTorch ops")):
        values = [next(v.ratio_to_stock for v in c.variants if v.name == name) for c in cases]
        left.bar([j + 0.27 * i for j in range(len(cases))], values, width=0.27, label=name)
    left.axhline(TARGETS["eager"], color="C0", linestyle="--", linewidth=1, label=f"eager target {TARGETS['eager']}x")
    left.axhline(TARGETS["compiled"], color="C1", linestyle="--", linewidth=1,
                 label=f"compiled target {TARGETS['compiled']}x")
    left.set_xticks([j + 0.27 for j in range(len(cases))], labels)
    left.set_ylabel("time / stock pooling (median of rounds)")
    left.set_title(f"T={NUM_FRAMES}, {GRID}x{GRID}; {'recycled pages' if RECYCLED else 'glibc default'}")
    left.legend(fontsize=8)
    parts = [p for p in cases[0].breakdown_ms if p != "total"]
    bottom = [0.0] * len(cases)
    for part in parts:
        values = [c.breakdown_ms.get(part, 0.0) for c in cases]
        middle.bar(labels, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    middle.set_ylabel("eager ms (profiled call)")
    middle.set_title("where eager time goes")
    middle.legend(fontsize=8)
    for key in sorted({(r.variant, r.dim, r.dtype) for r in batches}):
        rows = [r for r in batches if (r.variant, r.dim, r.dtype) == key]
        right.plot([r.batch for r in rows], [r.ratio_to_batch_of_one for r in rows], marker="o",
                   linestyle="-" if key[0] == "eager" else ":", label=f"{key[0]} D={key[1]} {key[2]}")
    right.set_xlabel(f"videos per call (T={BATCH_FRAMES})")
    right.axhline(1.0, color="grey", linewidth=1)
    right.set_ylabel("time(B) / (B x time(1))")
    right.set_title("batches" if batches else "batches: not run (--skip-batches)")
    if batches:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per case (default 9)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--output", default=os.path.join(RESULTS, "op_bench.json"))
    parser.add_argument("--skip-batches", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import vllm

    cfg = STGridPoolConfig()
    stock = stock_pooling()
    print(f"torch {torch.__version__}, vllm {vllm.__version__}, {torch.get_num_threads()} threads, "
          f"allocator: {ALLOCATOR}", flush=True)
    cases = []
    for dim, dtype in SETTINGS:
        case = run_case(dim, dtype, cfg, stock, args.rounds)
        print_case(case)
        cases.append(case)
    batches = []
    if not args.skip_batches:
        print(f"\nbatches of videos, T={BATCH_FRAMES}, eager (time(B) / (B x time(1)) <= 1 is the target)")
        for dim, dtype in SETTINGS:
            for row in run_batches(dim, dtype, cfg, stock, args.rounds):
                batches.append(row)
                print(f"  {row.variant:<6} D={dim} {row.dtype} B={row.batch}: {row.median_ms:.1f} ms, "
                      f"{row.per_video_ms:.1f} ms per video, {row.ratio_to_batch_of_one:.2f}x B x one video, "
                      f"{row.page_faults} page faults per call")
    report = Report(
        torch_version=str(torch.__version__),
        vllm_version=str(vllm.__version__),
        threads=torch.get_num_threads(),
        machine=f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} cpus",
        allocator=ALLOCATOR,
        stock="LlavaOnevisionForConditionalGeneration.apply_pooling (unbound, stand-in self)",
        reference="tests/reference_stgridpool.py (plain per-window loops, the stand-in for the authors' code)",
        config=cfg.to_dict(),
        targets=TARGETS,
        cases=cases,
        batches=batches,
    )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(report), indent=2))
    png = os.path.splitext(args.output)[0] + ".png"
    plot(cases, batches, png)
    print(f"\nwrote {os.path.relpath(args.output, ROOT)} and {os.path.relpath(png, ROOT)}")


if __name__ == "__main__":
    main()
