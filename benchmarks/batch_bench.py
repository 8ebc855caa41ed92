"""Offline batch benchmark: N videos through vLLM's ``LLM``, stock against ST-GridPool (k=2, k=3, budgets).

The job a captioning or scoring pipeline runs: every video of a folder in one
``llm.chat`` call (vLLM decodes each mp4 itself and schedules the batch),
the same KV-cache size and the same sampled frame count for every variant:

- stock: ``VLLM_PLUGINS=`` (no plugin loads), vLLM's own 2x2 bilinear pooling;
- stgridpool-k2: ``hf_overrides={"stgridpool": {}}``;
- stgridpool-k3: ``hf_overrides={"stgridpool": {"kernel_size": 3}}``;
- stgridpool-b4096 and stgridpool-b2048: k=2 with a video-token budget,
  ``hf_overrides={"stgridpool": {"max_video_tokens": 4096}}`` (and 2048).

Each variant runs in its own process (vLLM reads ``VLLM_PLUGINS`` once per
process) and reports videos per second over the ``llm.chat`` call; the
engine's CPU seconds per video (this process, its engine core and worker:
steadier than wall time on a shared machine); prompt tokens per video; the
KV cache's size in tokens (vLLM's own block count); the peaks of vLLM's
``kv_cache_usage_perc`` and ``num_requests_running`` gauges, sampled every
0.1 s from ``llm.get_metrics()`` during the call; and its
``num_preemptions`` counter (requests evicted from a full KV cache and
recomputed).

Writes ``benchmarks/results/batch_bench.json`` (with the git commit, vLLM's
version, the machine, each variant's command line and engine arguments) and
``batch_bench.png``.
Usage: ``python benchmarks/batch_bench.py [--videos 16] [--frames 64] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
from engine_setup import (  # benchmarks/ is on sys.path
    LABELS, ROOT, STYLES, VARIANTS, VIDEO_SIZE, RunFacts, add_report_options, build_checkpoint, chosen_variants, print_ratio_table, publish,
    replot, report_fields, run_facts,
)
from gauge_peaks import KV_CACHE_USAGE, RUNNING_REQUESTS, GaugePeaks

ARTIFACTS = ROOT / "artifacts" / "batch_bench"
RESULTS = ROOT / "benchmarks" / "results"

QUESTION = "Describe the video."
MAX_MODEL_LEN = 16384

RESULT_PREFIX = "BATCH_BENCH_RESULT "


class VariantResult(msgspec.Struct):
    name: str
    vllm_plugins: str
    hf_overrides: dict | None
    startup_s: float
    wall_s: float
    videos: int
    videos_per_s: float
    cpu_s_per_video: float
    output_tokens_per_s: float
    prompt_tokens_per_video: int
    prompt_tokens_total: int
    kv_cache_tokens: int
    max_concurrent_videos: int
    peak_kv_cache_usage: float
    peak_running_requests: int
    preemptions: int
    ratio_to_stock: dict[str, float] = {}
    command: str = ""  # the variant's process, run from the repository root
    llm_kwargs: dict = {}  # the engine's arguments, as LLM(checkpoint, **llm_kwargs)


class Report(RunFacts, kw_only=True):
    mode: str
    kv_cache_memory_bytes: int
    frames: int
    max_tokens: int
    variants: list[VariantResult]
    total_s: float


# ---------------------------------------------------------------- one variant (child process)


def engine_cpu_seconds() -> float:
    """CPU time of this process and every process under it (engine core, worker).

    On a machine shared with other work, wall time stretches with the
    contention; the engine's own CPU time per video stretches much less.
    """
    import psutil

    total = 0.0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def llm_gauges(llm) -> dict[str, float]:
    """The offline engine's KV-cache usage and running requests."""
    return {m.name: float(m.value) for m in llm.get_metrics() if m.name in (KV_CACHE_USAGE, RUNNING_REQUESTS)}


def run_variant(job: dict) -> dict:
    """Build the engine, run every video through ``llm.chat`` once, report (stdout, one JSON line)."""
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(job["checkpoint"], **job["llm_kwargs"])
    startup = time.perf_counter() - started
    conversations = [
        [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": Path(path).as_uri()}},
            {"type": "text", "text": QUESTION},
        ]}]
        for path in job["videos"]
    ]
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True)
    with GaugePeaks(lambda: llm_gauges(llm), interval=0.1) as gauges:
        started, cpu_started = time.perf_counter(), engine_cpu_seconds()
        outputs = llm.chat(conversations, params)  # vLLM's own progress bar
        wall, cpu = time.perf_counter() - started, engine_cpu_seconds() - cpu_started
    counters = {m.name: m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"}
    prompt_tokens = [len(o.prompt_token_ids) for o in outputs]
    if len(set(prompt_tokens)) != 1:
        raise RuntimeError(f"videos of one frame count gave different prompt sizes: {sorted(set(prompt_tokens))}")
    cache = llm.llm_engine.vllm_config.cache_config
    kv_tokens = cache.num_gpu_blocks * cache.block_size
    blocks_per_video = -(-(prompt_tokens[0] + job["max_tokens"]) // cache.block_size)
    return dict(
        startup_s=startup,
        wall_s=wall,
        videos=len(outputs),
        videos_per_s=len(outputs) / wall,
        cpu_s_per_video=cpu / len(outputs),
        output_tokens_per_s=sum(len(o.outputs[0].token_ids) for o in outputs) / wall,
        prompt_tokens_per_video=prompt_tokens[0],
        prompt_tokens_total=sum(prompt_tokens),
        kv_cache_tokens=kv_tokens,
        max_concurrent_videos=cache.num_gpu_blocks // blocks_per_video,
        peak_kv_cache_usage=gauges.peaks[KV_CACHE_USAGE],
        peak_running_requests=int(gauges.peaks[RUNNING_REQUESTS]),
        preemptions=int(counters.get("vllm:num_preemptions", 0)),
    )


# ---------------------------------------------------------------- driver


def build_inputs(args) -> tuple[Path, list[Path]]:
    """The benchmark checkpoint and ``args.videos`` distinct mp4s (vLLM caches by content, so no repeats)."""
    from vllm_stgridpool_testing.sample_videos import write_mp4

    checkpoint = build_checkpoint(ARTIFACTS)
    videos = []
    for i in range(args.videos):
        width = VIDEO_SIZE[0] + 2 * i  # a different clip each; all resized to 378 x 378, same tokens
        path = ARTIFACTS / "videos" / f"clip_{args.frames}f_{width}w.mp4"
        if not path.exists():
            write_mp4(path, args.frames, width, VIDEO_SIZE[1])
        videos.append(path)
    return checkpoint, videos


def bench_variant(name: str, checkpoint: Path, videos: list[Path], args) -> VariantResult:
    overrides, plugins = VARIANTS[name]
    print(f"\n== {name}: VLLM_PLUGINS={plugins!r} hf_overrides={overrides}", flush=True)
    llm_kwargs = dict(
        hf_overrides=overrides,
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=MAX_MODEL_LEN,
        kv_cache_memory_bytes=args.kv_cache_bytes,
        enable_prefix_caching=False,
        limit_mm_per_prompt={"video": 1},
        media_io_kwargs={"video": {"num_frames": args.frames}},
        allowed_local_media_path=str(videos[0].parent),
        disable_log_stats=False,  # the gauges the child reads
        seed=0,
    )
    job = dict(checkpoint=str(checkpoint), llm_kwargs=llm_kwargs, max_tokens=args.max_tokens,
               videos=[str(v) for v in videos])
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # it would override the size
    env["VLLM_PLUGINS"] = plugins
    command = [sys.executable, __file__, "--run-variant", json.dumps(job)]
    log_path = ARTIFACTS / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        # The child's stderr (vLLM's progress bar and logs) goes to the terminal and the log.
        child = subprocess.Popen(
            command,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )
        relay = threading.Thread(target=_tee, args=(child.stderr, log), daemon=True)
        relay.start()
        out = child.stdout.read()
        child.wait()
        relay.join()
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    if child.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed ({child.returncode}); see {log_path}")
    result = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
    print(f"  {result['videos']} videos in {result['wall_s']:.1f} s: {result['videos_per_s']:.3f} videos/s, "
          f"{result['prompt_tokens_per_video']} prompt tokens each, peak KV {100 * result['peak_kv_cache_usage']:.0f}%",
          flush=True)
    return VariantResult(name=name, vllm_plugins=plugins, hf_overrides=overrides, **result,
                         command=command_line(command, plugins), llm_kwargs=_relative(llm_kwargs))


def command_line(command: list[str], plugins: str) -> str:
    """The child's command as a shell line run from the repository root (``python`` for this interpreter)."""
    words = ["python" if word == sys.executable else _relative(word) for word in command]
    return f"VLLM_PLUGINS={shlex.quote(plugins)} " + shlex.join(words)


def _relative(value):
    """``value`` with this repository's absolute paths written relative to its root."""
    return json.loads(json.dumps(value).replace(str(ROOT) + os.sep, ""))


def _tee(stream, log) -> None:
    for line in stream:
        sys.stderr.write(line)
        log.write(line)


def add_ratios(variants: list[VariantResult]) -> None:
    stock = next((v for v in variants if v.name == "stock"), None)
    if stock is None:
        return
    for v in variants:
        v.ratio_to_stock = {
            field: getattr(v, field) / getattr(stock, field)
            for field in ("videos_per_s", "cpu_s_per_video", "output_tokens_per_s", "prompt_tokens_per_video", "max_concurrent_videos",
                          "peak_running_requests", "peak_kv_cache_usage", "wall_s")
            if getattr(stock, field)
        }


ROWS = (
    ("videos / s", "videos_per_s", ".3f"),
    ("engine CPU s per video", "cpu_s_per_video", ".1f"),
    ("wall time, s", "wall_s", ".1f"),
    ("prompt tokens per video", "prompt_tokens_per_video", ",d"),
    ("prompt tokens, all videos", "prompt_tokens_total", ",d"),
    ("KV cache, tokens", "kv_cache_tokens", ",d"),
    ("videos the KV cache holds", "max_concurrent_videos", "d"),
    ("peak running requests", "peak_running_requests", "d"),
    ("peak KV-cache use, %", "peak_kv_cache_usage", ".1%"),
    ("preemptions (recomputed)", "preemptions", "d"),
)


def print_table(variants: list[VariantResult]) -> None:
    print_ratio_table(variants, [(label, operator.attrgetter(field), fmt) for label, field, fmt in ROWS], 28)


def plot(variants: list[VariantResult], path: Path, frames: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {name: color for name, (color, _) in STYLES.items()}
    panels = (
        ("videos / s", "videos_per_s", "{:.3f}"),
        ("engine CPU seconds per video", "cpu_s_per_video", "{:.1f}"),
        ("prompt tokens per video", "prompt_tokens_per_video", "{:,}"),
        ("videos the KV cache holds / peak running", "max_concurrent_videos", "{}"),
        ("peak KV-cache use (%)", "peak_kv_cache_usage", "{:.0%}"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 5))
    names = [LABELS[v.name] for v in variants]
    for ax, (title, field, fmt) in zip(axes, panels):
        values = [getattr(v, field) for v in variants]
        shown = [100 * x for x in values] if field == "peak_kv_cache_usage" else values
        bars = ax.bar(names, shown, color=[colors[v.name] for v in variants])
        for bar, value in zip(bars, values):
            ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9)
        if field == "max_concurrent_videos":
            ax.plot(names, [v.peak_running_requests for v in variants], "k_", markersize=30, label="peak running")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8, labelrotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
        ax.set_ylim(0, 1.15 * max(shown))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Offline batch: {variants[0].videos} videos of {frames} frames, same KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=None, help="videos per variant (default 16; quick 4)")
    parser.add_argument("--frames", type=int, default=None, help="frames per video (default 64; quick 16)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 videos of 16 frames")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    add_report_options(parser, "batch_bench", "video")
    parser.add_argument("--run-variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    args.videos = args.videos or (4 if args.quick else 16)
    args.frames = args.frames or (16 if args.quick else 64)
    args.output = args.output or RESULTS / ("batch_bench_quick.json" if args.quick else "batch_bench.json")
    args.variants = chosen_variants(parser, args.variants)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.run_variant:
        print(RESULT_PREFIX + json.dumps(run_variant(json.loads(args.run_variant))), flush=True)
        return
    if args.replot:
        return replot(args.output, Report, print_table, plot)
    started = time.perf_counter()
    facts = run_facts()  # the code as the run starts
    checkpoint, videos = build_inputs(args)
    variants = [bench_variant(name, checkpoint, videos, args) for name in args.variants]
    add_ratios(variants)
    report = Report(**report_fields(facts, args, variants, started), frames=args.frames)
    publish(report, args.output, print_table, plot)


if __name__ == "__main__":
    main()
