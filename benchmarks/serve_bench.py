"""Serving benchmark: stock LLaVA-OneVision against ST-GridPool (k=2, k=3, budgets) behind vLLM's OpenAI server.

Five servers run one after the other on the same benchmark checkpoint, with
the same KV-cache size and the same 64 sampled frames per video:

- stock: ``VLLM_PLUGINS=`` (no plugin loads), vLLM's own 2x2 bilinear pooling;
- stgridpool-k2: ``VLLM_PLUGINS=stgridpool --hf-overrides '{"stgridpool": {}}'``;
- stgridpool-k3: the same with ``{"stgridpool": {"kernel_size": 3}}``;
- stgridpool-b4096 and stgridpool-b2048: k=2 with a video-token budget,
  ``{"stgridpool": {"max_video_tokens": 4096}}`` (and 2048).

For each server it measures

- prompt tokens per video at 8, 16, 32 and 64 frames (``usage.prompt_tokens``
  of one request each, sent one at a time: stock vLLM cannot batch videos of
  different lengths);
- the KV-cache size in tokens as vLLM itself reports it (the start-up line
  "KV cache size: N tokens", cross-checked against ``num_gpu_blocks x
  block_size`` of the ``vllm:cache_config_info`` gauge on ``/metrics``), and
  from it how many 64-frame requests fit at once;
- closed-loop load with 64-frame videos at several concurrency levels, driven
  by vLLM's own ``vllm bench serve`` (``random-mm`` dataset, a video bucket):
  requests/s, output tokens/s, time to first token and end-to-end latency
  (p50, p99) as that tool reports them, plus the peak of
  ``vllm:num_requests_running`` and ``vllm:kv_cache_usage_perc`` sampled from
  ``/metrics`` during the level (which ``vllm bench serve`` does not record).

Writes ``benchmarks/results/serve_bench.json`` (with the git commit, vLLM's
version, the machine, each server's and each client's command line) and two
PNG plots next to it. Usage: ``python benchmarks/serve_bench.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec

from engine_setup import (  # benchmarks/ is on sys.path
    LABELS, ROOT, STYLES, VARIANTS, VIDEO_SIZE, RunFacts, build_checkpoint, chosen_variants, report_fields,
    run_facts, write_report,
)
from gauge_peaks import KV_CACHE_USAGE, RUNNING_REQUESTS, GaugePeaks
from vllm_stgridpool_testing.launch import Server, start_server, vllm_command

ARTIFACTS = ROOT / "artifacts" / "serve_bench"
RESULTS = ROOT / "benchmarks" / "results"

FRAME_COUNTS = (8, 16, 32, 64)
SAMPLED_FRAMES = 64  # --media-io-kwargs num_frames, for every server
KV_FRAMES = 64  # the request size the KV capacity is quoted for
PROMPT_TEXT = "Describe the video."
MAX_MODEL_LEN = 16384
MAX_BATCHED_TOKENS = 16384
SERVED_NAME = "llava-bench"
LOAD_TEXT_TOKENS = 8  # random text tokens per load request (vllm bench serve's random-mm prompt)
# Load levels of a default run: 8, 8, 8 and 16 requests of 64 frames, about 40 minutes on 2 idle
# cores for the five variants (README: benchmarks/README.md, "Duration").
DEFAULT_CONCURRENCY = (1, 4, 8, 16)
DEFAULT_REQUESTS = 8

KV_LOG_LINE = re.compile(
    r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"
)


class LevelResult(msgspec.Struct):
    concurrency: int
    requests: int
    failed: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    prompt_tokens: int
    peak_running_requests: int
    peak_kv_cache_usage: float
    first_error: str | None = None
    command: str = ""  # the exact client command line, run from the repository root


class KVCapacity(msgspec.Struct):
    """KV-cache size from vLLM's own accounting, and what it means for 64-frame requests."""

    log_tokens: int
    log_max_concurrency_at_max_model_len: float
    num_gpu_blocks: int
    block_size: int
    tokens_per_request: int
    max_concurrent_requests: int
    max_concurrent_requests_by_blocks: int


class VariantResult(msgspec.Struct):
    name: str
    vllm_plugins: str
    hf_overrides: dict | None
    startup_s: float
    prompt_tokens_by_frames: dict[int, int]
    kv: KVCapacity
    levels: list[LevelResult]
    ratio_to_stock: dict[str, float] = {}
    server_command: str = ""  # the exact server command line, run from the repository root
    request_s_by_frames: dict[int, float] = {}  # each token-count request's end-to-end time, alone on the server


class Report(RunFacts, kw_only=True):
    mode: str
    kv_cache_memory_bytes: int
    max_tokens: int
    load_frames: int
    variants: list[VariantResult]
    total_s: float
    requests_per_level: dict[int, int] = {}  # concurrency -> requests sent


# ---------------------------------------------------------------- inputs


def video_url(frames: int, width: int = VIDEO_SIZE[0]) -> str:
    """A real mp4 (content changing every frame) as a base64 data URL, for the token counts."""
    from vllm_stgridpool_testing.sample_videos import write_mp4

    path = write_mp4(ARTIFACTS / "videos" / f"clip_{frames}f_{width}w.mp4", frames, width, VIDEO_SIZE[1])
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


# ---------------------------------------------------------------- server


def start_variant(name: str, checkpoint: Path, kv_bytes: int, *, prefix_caching: bool = False,
                  logs: Path = ARTIFACTS / "logs", extra_args: tuple[str, ...] = ()) -> Server:
    """``vllm serve`` for one variant, with the same sizing flags for every variant.

    Prefix caching is off for the load benchmark (every load request
    carries a new video, so only the chat template's first tokens could be
    shared) and on for the follow-up benchmark, which measures that reuse.
    """
    overrides, plugins = VARIANTS[name]
    args = [
        "--served-model-name", SERVED_NAME,
        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS),
        "--kv-cache-memory-bytes", str(kv_bytes), "--dtype", "float32",
        "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching", "--seed", "0",
        "--media-io-kwargs", json.dumps({"video": {"num_frames": SAMPLED_FRAMES}}),
    ]
    if overrides is not None:
        args += ["--hf-overrides", json.dumps(overrides)]
    args += extra_args
    return start_server(
        checkpoint, *args, env={"VLLM_PLUGINS": plugins},
        log_path=logs / f"{name}.log", timeout=900,
    )


def command_line(command: list[str], env: dict[str, str]) -> str:
    """``command`` as a shell line run from the repository root: ``vllm`` for the venv's script, relative paths."""
    words = ["vllm" if word == vllm_command()[0] else word for word in command]
    words = [word.replace(str(ROOT) + os.sep, "") for word in words]
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(words)])


def server_command_line(server: Server, name: str) -> str:
    return command_line(list(server.process.args), {"VLLM_PLUGINS": VARIANTS[name][1]})


def kv_capacity(server: Server, tokens_per_request: int) -> KVCapacity:
    """Read the KV size from the start-up log and /metrics; they must agree."""
    found = KV_LOG_LINE.search(server.log())
    if found is None:
        raise RuntimeError(f"no 'KV cache size' line in {server.log_path}")
    log_tokens = int(found.group(1).replace(",", ""))
    info = _cache_config_info(server.get("/metrics"))
    blocks, block_size = int(info["num_gpu_blocks"]), int(info["block_size"])
    if blocks * block_size != log_tokens:
        print(f"  note: log says {log_tokens} KV tokens, /metrics {blocks} x {block_size}", flush=True)
    blocks_per_request = -(-tokens_per_request // block_size)
    return KVCapacity(
        log_tokens=log_tokens,
        log_max_concurrency_at_max_model_len=float(found.group(3)),
        num_gpu_blocks=blocks,
        block_size=block_size,
        tokens_per_request=tokens_per_request,
        max_concurrent_requests=log_tokens // tokens_per_request,
        max_concurrent_requests_by_blocks=blocks // blocks_per_request,
    )


def _cache_config_info(metrics_text: str) -> dict[str, str]:
    for line in metrics_text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            return dict(re.findall(r'(\w+)="([^"]*)"', line))
    raise RuntimeError("/metrics has no vllm:cache_config_info")


def _server_gauges(server: Server) -> dict[str, float]:
    """The server's KV-cache usage and running requests, from its /metrics."""
    text = server.get("/metrics")
    return {name: metric_total(text, name) for name in (KV_CACHE_USAGE, RUNNING_REQUESTS)}


def metric_total(metrics_text: str, name: str) -> float:
    """A gauge or counter of a ``/metrics`` page, summed over its label sets (vLLM labels by engine and model)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------- client


class RequestResult(msgspec.Struct):
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


async def one_request(client, video_url: str, max_tokens: int, question: str = PROMPT_TEXT) -> RequestResult:
    """One streamed chat completion; TTFT is the first chunk that carries a choice.

    vLLM sends its first chunk (the role) only once the first token exists, so
    that chunk marks the end of prefill.
    """
    import openai

    started = time.perf_counter()
    ttft = None
    usage = None
    try:
        stream = await client.chat.completions.create(
            model=SERVED_NAME,
            messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": video_url}},
                {"type": "text", "text": question},
            ]}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if ttft is None and chunk.choices:
                ttft = time.perf_counter() - started
            if chunk.usage is not None:
                usage = chunk.usage
    except openai.APIError as exc:
        body = getattr(exc, "body", None)
        return RequestResult(ok=False, e2e_s=time.perf_counter() - started, error=f"{type(exc).__name__}: {exc} {body or ''}")
    e2e = time.perf_counter() - started
    if usage is None or ttft is None:
        return RequestResult(ok=False, e2e_s=e2e, error="stream ended without a token or usage")
    return RequestResult(True, ttft, e2e, usage.prompt_tokens, usage.completion_tokens)


def make_client(server: Server):
    import openai

    http = httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(1800.0),
                             limits=httpx.Limits(max_connections=64))
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, http_client=http)


async def count_tokens(server: Server, name: str, urls: dict[int, str]) -> tuple[dict[int, int], dict[int, float]]:
    """Prompt tokens per video and each request's time, one request at a time (also warms the server up)."""
    client = make_client(server)
    counts, seconds = {}, {}
    try:
        for frames, url in urls.items():
            result = await one_request(client, url, max_tokens=1)
            if not result.ok:
                raise RuntimeError(f"{name}: {frames}-frame request failed: {result.error}")
            counts[frames], seconds[frames] = result.prompt_tokens, result.e2e_s
            print(f"  {frames:2d} frames: {result.prompt_tokens:6d} prompt tokens ({result.e2e_s:.1f} s)", flush=True)
    finally:
        await client.close()
    return counts, seconds


def run_level(server: Server, name: str, checkpoint: Path, concurrency: int, requests: int, seed: int,
              args) -> LevelResult:
    """Closed-loop load from vLLM's own client, ``vllm bench serve`` with its ``random-mm`` dataset.

    ``--max-concurrency`` keeps ``concurrency`` requests in flight (no rate
    limit); each carries one synthetic mp4 of ``args.load_frames`` frames of
    random pixels, new for every request (``seed`` differs per level, so
    vLLM's multimodal cache never serves a repeat), a random text prompt of
    ``LOAD_TEXT_TOKENS`` tokens and ``ignore_eos``. vLLM's bench prints its own
    progress bar and writes its result JSON; /metrics is sampled meanwhile.
    """
    out_dir = ARTIFACTS / "vllm_bench_serve" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    result_file = out_dir / f"c{concurrency}.json"
    result_file.unlink(missing_ok=True)
    height_width_frames = (VIDEO_SIZE[1], VIDEO_SIZE[0], args.load_frames)
    command = [
        *vllm_command(), "bench", "serve",
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--base-url", server.base_url, "--model", SERVED_NAME, "--tokenizer", str(checkpoint),
        "--dataset-name", "random-mm",
        "--random-mm-bucket-config", f"{{{height_width_frames}: 1.0}}",
        "--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "0",
        "--random-mm-limit-mm-per-prompt", json.dumps({"image": 0, "video": 1}),
        "--random-input-len", str(LOAD_TEXT_TOKENS), "--random-range-ratio", "0",
        "--random-output-len", str(args.max_tokens), "--ignore-eos", "--temperature", "0",
        "--num-prompts", str(requests), "--max-concurrency", str(concurrency), "--request-rate", "inf",
        "--seed", str(seed),
        "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--save-detailed", "--result-dir", str(out_dir), "--result-filename", result_file.name,
    ]
    print(f"  {name} c={concurrency}: vllm bench serve, {requests} requests", flush=True)
    client_env = {"VLLM_PLUGINS": "", "NO_PROXY": "127.0.0.1,localhost"}  # a client: no plugin needed
    with GaugePeaks(lambda: _server_gauges(server), interval=0.25) as gauges:
        done = subprocess.run(command, env={**os.environ, **client_env}, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0 or not result_file.exists():
        print(done.stdout[-4000:], file=sys.stderr)
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}) for {name} c={concurrency}")
    result = json.loads(result_file.read_text())
    errors = [e for e in result.get("errors", []) if e]
    lens = [n for n, e in zip(result.get("input_lens", []), result.get("errors", [])) if not e]
    return LevelResult(
        concurrency=concurrency,
        requests=result["completed"] + result.get("failed", 0),
        failed=result.get("failed", 0),
        wall_s=result["duration"],
        requests_per_s=result["request_throughput"],
        output_tokens_per_s=result["output_throughput"],
        ttft_p50_s=result["p50_ttft_ms"] / 1000,
        ttft_p99_s=result["p99_ttft_ms"] / 1000,
        e2e_p50_s=result["p50_e2el_ms"] / 1000,
        e2e_p99_s=result["p99_e2el_ms"] / 1000,
        prompt_tokens=max(lens, default=0),
        peak_running_requests=int(gauges.peaks[RUNNING_REQUESTS]),
        peak_kv_cache_usage=gauges.peaks[KV_CACHE_USAGE],
        first_error=errors[0] if errors else None,
        command=command_line(command, client_env),
    )


def requests_at(concurrency: int, requests: int) -> int:
    """Requests sent at one level: ``requests`` rounded up to whole waves of ``concurrency``."""
    return -(-requests // concurrency) * concurrency


def bench_variant(name, checkpoint, urls, args) -> VariantResult:
    overrides, plugins = VARIANTS[name]
    print(f"\n== {name}: VLLM_PLUGINS={plugins!r} hf_overrides={overrides}", flush=True)
    started = time.perf_counter()
    server = start_variant(name, checkpoint, args.kv_cache_bytes)
    startup = time.perf_counter() - started
    try:
        print(f"  ready in {startup:.0f} s (log: {server.log_path.relative_to(ROOT)})", flush=True)
        counts, seconds = asyncio.run(count_tokens(server, name, urls))
        kv = kv_capacity(server, counts[KV_FRAMES] + args.max_tokens)
        print(f"  KV cache: {kv.log_tokens} tokens -> {kv.max_concurrent_requests} concurrent "
              f"{KV_FRAMES}-frame requests of {kv.tokens_per_request} tokens", flush=True)
        levels = []
        for seed, concurrency in enumerate(args.concurrency, start=1):
            requests = requests_at(concurrency, args.requests)
            level = run_level(server, name, checkpoint, concurrency, requests, seed, args)
            if level.failed:
                print(f"  {level.failed} failed requests; first error: {level.first_error}", flush=True)
            levels.append(level)
    except BaseException:
        print("\n".join(server.log().splitlines()[-40:]), file=sys.stderr)
        raise
    finally:
        server.stop()
    return VariantResult(name, plugins, overrides, startup, counts, kv, levels,
                         server_command=server_command_line(server, name), request_s_by_frames=seconds)


# ---------------------------------------------------------------- report


def add_ratios(variants: list[VariantResult]) -> None:
    stock = next((v for v in variants if v.name == "stock"), None)
    if stock is None:
        return
    for variant in variants:
        ratios = {
            f"prompt_tokens_{KV_FRAMES}f": variant.prompt_tokens_by_frames[KV_FRAMES]
            / stock.prompt_tokens_by_frames[KV_FRAMES],
            "max_concurrent_requests": variant.kv.max_concurrent_requests / max(1, stock.kv.max_concurrent_requests),
        }
        for level, base in zip(variant.levels, stock.levels):
            for field in ("requests_per_s", "output_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s"):
                ratios[f"c{level.concurrency}_{field}"] = getattr(level, field) / getattr(base, field)
        variant.ratio_to_stock = ratios


def print_tables(variants: list[VariantResult]) -> None:
    """One row per measure, one column per variant, each with its ratio to stock."""
    stock = next((v for v in variants if v.name == "stock"), variants[0])
    rows = [(f"prompt tokens, {f} frames", lambda v, f=f: v.prompt_tokens_by_frames[f], "d") for f in FRAME_COUNTS]
    rows += [
        ("KV cache tokens (vLLM)", lambda v: v.kv.log_tokens, "d"),
        (f"max concurrent {KV_FRAMES}f reqs", lambda v: v.kv.max_concurrent_requests, "d"),
    ]
    for i, level in enumerate(stock.levels):
        c = level.concurrency
        rows += [
            (f"c={c} requests/s", lambda v, i=i: v.levels[i].requests_per_s, ".3f"),
            (f"c={c} output tokens/s", lambda v, i=i: v.levels[i].output_tokens_per_s, ".2f"),
            (f"c={c} TTFT p50 s", lambda v, i=i: v.levels[i].ttft_p50_s, ".2f"),
            (f"c={c} TTFT p99 s", lambda v, i=i: v.levels[i].ttft_p99_s, ".2f"),
            (f"c={c} E2E p50 s", lambda v, i=i: v.levels[i].e2e_p50_s, ".2f"),
            (f"c={c} E2E p99 s", lambda v, i=i: v.levels[i].e2e_p99_s, ".2f"),
            (f"c={c} peak running reqs", lambda v, i=i: v.levels[i].peak_running_requests, "d"),
            (f"c={c} peak KV usage %", lambda v, i=i: 100 * v.levels[i].peak_kv_cache_usage, ".1f"),
        ]
    header = f"{'':28}" + "".join(f"{v.name:>20}" for v in variants)
    print("\n" + header + "\n" + "-" * len(header))
    for label, get, fmt in rows:
        base = get(stock)
        line = f"{label:28}"
        for variant in variants:
            value = get(variant)
            ratio = f"({value / base:5.2f}x)" if variant is not stock and base else ""
            line += f"{format(value, fmt):>11} {ratio:>8}"
        print(line)


def plot(variants: list[VariantResult], stem: Path, load_frames: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = STYLES
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        color, marker = styles[v.name]
        frames = sorted(v.prompt_tokens_by_frames)
        tokens = [v.prompt_tokens_by_frames[f] for f in frames]
        ax.plot(frames, tokens, color=color, marker=marker, label=LABELS[v.name])
        ax.annotate(f"{tokens[-1]:,}", (frames[-1], tokens[-1]), textcoords="offset points",
                    xytext=(-8, 6), ha="right", color=color, fontsize=9)
    ax.set_xlabel("frames per video")
    ax.set_ylabel("prompt tokens per request")
    ax.set_xticks(list(FRAME_COUNTS))
    ax.set_ylim(0, 1.12 * max(max(v.prompt_tokens_by_frames.values()) for v in variants))
    ax.set_title("Prompt tokens per video request (measured, usage.prompt_tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = stem.with_name(stem.name + "_tokens.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4.5))
    for v in variants:
        color, marker = styles[v.name]
        c = [level.concurrency for level in v.levels]
        left.plot(c, [level.requests_per_s for level in v.levels], color=color, marker=marker, label=LABELS[v.name])
        mid.plot(c, [level.ttft_p50_s for level in v.levels], color=color, marker=marker)
        mid.plot(c, [level.ttft_p99_s for level in v.levels], color=color, marker=marker, linestyle="--", alpha=0.6)
        right.plot(c, [level.e2e_p50_s for level in v.levels], color=color, marker=marker)
        right.plot(c, [level.e2e_p99_s for level in v.levels], color=color, marker=marker, linestyle="--", alpha=0.6)
    for ax, title, ylabel in (
        (left, "Throughput", "requests / s"),
        (mid, "Time to first token (solid p50, dashed p99)", "seconds"),
        (right, "End-to-end latency (solid p50, dashed p99)", "seconds"),
    ):
        ax.set_title(f"{title}, {load_frames}-frame videos", fontsize=10)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks([level.concurrency for level in variants[0].levels])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    path = stem.with_name(stem.name + "_concurrency.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="smoke run: 16-frame load at concurrency 1 and 2, 2 requests per level")
    mode.add_argument("--full", action="store_true", help="full run (the default)")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="comma-separated concurrency levels (default: 1,4,8,16; quick: 1,2)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per level, rounded up to whole waves of the concurrency "
                             "(default 8: 8, 8, 8 and 16 requests at 1, 4, 8 and 16; quick 2)")
    parser.add_argument("--load-frames", type=int, choices=FRAME_COUNTS, default=None,
                        help="frames per video in the load phase (default 64; quick 16)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--kv-cache-bytes", type=int, default=512 << 20, help="KV cache for every server (default 512 MiB)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--replot", action="store_true",
                        help="redraw the tables and plots from an existing result JSON, run nothing")
    parser.add_argument("--output", type=Path, default=None,
                        help="result JSON; plots go next to it (default results/serve_bench.json, quick: "
                             "results/serve_bench_quick.json)")
    args = parser.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    if args.concurrency is None:
        args.concurrency = [1, 2] if args.quick else list(DEFAULT_CONCURRENCY)
    if args.requests is None:
        args.requests = 2 if args.quick else DEFAULT_REQUESTS
    if args.load_frames is None:
        args.load_frames = 16 if args.quick else 64
    if args.output is None:
        args.output = RESULTS / ("serve_bench_quick.json" if args.quick else "serve_bench.json")
    args.variants = chosen_variants(parser, args.variants)
    return args


def full_run_minutes(variants: list[VariantResult]) -> float:
    """What a default run would take at this run's speeds: per variant, start-up, the token counts,
    and the default levels' 64-frame requests at the time one took alone (the cores are the
    bottleneck at any concurrency; preemptions at a full cache come on top)."""
    requests = sum(requests_at(c, DEFAULT_REQUESTS) for c in DEFAULT_CONCURRENCY)
    return sum(
        v.startup_s + sum(v.request_s_by_frames.values()) + requests * v.request_s_by_frames[KV_FRAMES]
        for v in variants if v.request_s_by_frames
    ) / 60


def replot(path: Path) -> None:
    report = msgspec.json.decode(path.read_bytes(), type=Report)
    print_tables(report.variants)
    for written in plot(report.variants, path.with_suffix(""), report.load_frames):
        print(f"wrote {written}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.replot:
        replot(args.output)
        return
    started = time.perf_counter()
    facts = run_facts()  # the code as the run starts
    checkpoint = build_checkpoint(ARTIFACTS)
    urls = {frames: video_url(frames) for frames in FRAME_COUNTS}
    variants = [bench_variant(name, checkpoint, urls, args) for name in args.variants]
    add_ratios(variants)
    report = Report(
        **report_fields(facts, args, variants, started),
        load_frames=args.load_frames,
        requests_per_level={c: requests_at(c, args.requests) for c in args.concurrency},
    )
    total = report.total_s
    write_report(report, args.output)
    print_tables(variants)
    for path in plot(variants, args.output.with_suffix(""), args.load_frames):
        print(f"wrote {path}")
    print(f"wrote {args.output} ({total / 60:.1f} min in all)")
    if args.mode == "quick":
        print(f"a full run of these variants at this run's speeds: about {full_run_minutes(variants):.0f} min "
              f"(start-ups, token counts, {DEFAULT_CONCURRENCY} x {DEFAULT_REQUESTS} requests of 64 frames)")


if __name__ == "__main__":
    main()
