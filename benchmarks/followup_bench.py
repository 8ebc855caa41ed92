"""Follow-up questions: several questions about one video, riding on vLLM's prefix cache.

The common production pattern is a caption, then questions about the same
video. With prefix caching on, a follow-up's prompt shares the chat
template's start and the whole video with the first question's, so vLLM
reuses those KV blocks and prefills only the new question. This benchmark
measures how much that saves, with and without ST-GridPool, on the serving
benchmark's checkpoint and server flags (``serve_bench.start_variant`` with
``--enable-prefix-caching``):

- for each variant a fresh server, warmed up with one short video;
- for each of ``--videos`` distinct mp4s, ``--questions`` questions asked one
  after the other (each a new single-turn chat: the video, then the question);
- per request: time to first token and end-to-end latency (streamed),
  prompt tokens, the server's ``vllm:prefix_cache_hits_total`` and
  ``vllm:prefix_cache_queries_total`` deltas, and its own TTFT and prefill
  time (histogram sums) from ``/metrics``;
- with ``--profile``, two more follow-ups under vLLM's torch profiler (not
  in the medians): about the last video, right after its own questions,
  and about the first, after the other videos. Each records its prefill
  step by op, its decode steps, and whether the video was encoded again
  (its encoder output no longer in vLLM's encoder cache;
  ``engine_profile.py``).

Writes ``benchmarks/results/followup_bench.json`` and ``followup_bench.png``.
Usage: ``python benchmarks/followup_bench.py [--quick] [--profile]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import statistics
import time
from pathlib import Path

import msgspec
from engine_profile import PrefillProfile, new_trace, prefill_profile
from engine_setup import (  # benchmarks/ is on sys.path
    LABELS, STYLES, VARIANTS, VIDEO_SIZE, RunFacts, add_report_options, build_checkpoint, chosen_variants, print_ratio_table, publish,
    replot, report_fields, run_facts,
)
from serve_bench import (
    ARTIFACTS as SERVE_ARTIFACTS,
    make_client,
    metric_total,
    one_request,
    server_command_line,
    start_variant,
)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts" / "followup_bench"
RESULTS = ROOT / "benchmarks" / "results"

QUESTIONS = (
    "Describe the video.",
    "What happens at the start of the video?",
    "Which colours appear most often?",
    "How does the scene change towards the end?",
    "Is there any text visible in the video?",
    "How many distinct objects move?",
    "Summarise the video in one sentence.",
    "What is the camera doing?",
)
HITS = "vllm:prefix_cache_hits_total"
QUERIES = "vllm:prefix_cache_queries_total"
SERVER_TTFT = "vllm:time_to_first_token_seconds_sum"  # from the API server's arrival (decode included)
PREFILL = "vllm:request_prefill_time_seconds_sum"  # from the engine's scheduling to the first token
PREFILL_COUNT = "vllm:request_prefill_time_seconds_count"
COUNTERS = (HITS, QUERIES, SERVER_TTFT, PREFILL, PREFILL_COUNT)
PROFILED_QUESTION = "What is the last thing that happens?"  # --profile: asked once more per profiled case


class Question(msgspec.Struct):
    video: int
    index: int  # 0: the first question about this video; 1, 2, ...: follow-ups
    ttft_s: float
    e2e_s: float
    prompt_tokens: int
    prefix_cache_hits: int
    prefix_cache_queries: int
    server_ttft_s: float = 0.0
    prefill_s: float = 0.0  # server_ttft_s - prefill_s: the API server's decode and processing, and the queue


class ProfiledFollowup(msgspec.Struct):
    case: str  # "recent video" (asked right after its questions) or "earlier video" (the first, asked last)
    question: Question
    profile: PrefillProfile


class VariantResult(msgspec.Struct):
    name: str
    vllm_plugins: str
    hf_overrides: dict | None
    server_command: str
    block_size: int
    questions: list[Question]
    first_ttft_p50_s: float
    followup_ttft_p50_s: float
    followup_to_first_ttft: float
    first_hit_fraction: float
    followup_hit_fraction: float
    ratio_to_stock: dict[str, float] = {}
    profiled: list[ProfiledFollowup] = []  # with --profile


class Report(RunFacts, kw_only=True):
    mode: str
    kv_cache_memory_bytes: int
    frames: int
    videos: int
    questions_per_video: int
    max_tokens: int
    variants: list[VariantResult]
    total_s: float


def data_url(path: Path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def write_videos(frames: int, count: int) -> list[Path]:
    """``count`` distinct real mp4s (widths differ; all resize to the same input, so the same tokens)."""
    from vllm_stgridpool_testing.sample_videos import write_mp4

    paths = []
    for i in range(count):
        width = VIDEO_SIZE[0] + 2 * i
        path = ARTIFACTS / "videos" / f"clip_{frames}f_{width}w.mp4"
        if not path.exists():
            write_mp4(path, frames, width, VIDEO_SIZE[1])
        paths.append(path)
    return paths


async def server_counters(server) -> dict[str, float]:
    text = await asyncio.to_thread(server.get, "/metrics")
    return {name: metric_total(text, name) for name in COUNTERS}


async def ask(server, client, url: str, question: str, max_tokens: int) -> tuple:
    """One streamed question and the deltas of the server's counters it caused.

    The counters are read again until the request's queries and prefill time
    show up (vLLM records a step's statistics after sending its tokens).
    """
    before = await server_counters(server)
    result = await one_request(client, url, max_tokens, question=question)
    if not result.ok:
        raise RuntimeError(f"request failed: {result.error}")
    deadline = time.monotonic() + 10.0
    while True:
        delta = {name: value - before[name] for name, value in (await server_counters(server)).items()}
        if (delta[QUERIES] >= result.prompt_tokens and delta[PREFILL_COUNT] >= 1) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    return result, delta


async def ask_and_record(server, client, video: int, index: int, url: str, question: str, max_tokens: int) -> Question:
    result, delta = await ask(server, client, url, question, max_tokens)
    print(f"  video {video} question {index}: TTFT {result.ttft_s:6.2f} s (prefill {delta[PREFILL]:.2f} s), "
          f"{result.prompt_tokens} prompt tokens, {int(delta[HITS])} cache hits", flush=True)
    return Question(video, index, result.ttft_s, result.e2e_s, result.prompt_tokens, int(delta[HITS]),
                    int(delta[QUERIES]), server_ttft_s=delta[SERVER_TTFT], prefill_s=delta[PREFILL])


async def profile_followups(server, client, videos: list[Path], args, profiles: Path) -> list[ProfiledFollowup]:
    """One more follow-up about the last video (its encoder output still cached), then about the first (whose
    output the later videos may have evicted from vLLM's encoder cache)."""
    cases = {"recent video": len(videos) - 1, "earlier video": 0} if len(videos) > 1 else {"recent video": 0}
    profiled = []
    for case, v in cases.items():
        print(f"  profiled, {case}:", flush=True)
        seen = set(profiles.glob("*"))
        await asyncio.to_thread(server.post, "/start_profile")
        row = await ask_and_record(server, client, v, args.questions, data_url(videos[v]), PROFILED_QUESTION,
                                   args.max_tokens)
        await asyncio.to_thread(server.post, "/stop_profile")
        profiled.append(ProfiledFollowup(case, row, prefill_profile(new_trace(profiles, seen))))
    return profiled


async def ask_all(server, videos: list[Path], warmup: Path, args, profiles: Path) -> tuple[list, list]:
    """Every measured question, then (with --profile) the profiled follow-ups."""
    client = make_client(server)
    rows = []
    try:
        await ask(server, client, data_url(warmup), QUESTIONS[0], 1)  # first-request costs, not measured
        for v, path in enumerate(videos):
            url = data_url(path)
            for q in range(args.questions):
                rows.append(await ask_and_record(server, client, v, q, url, QUESTIONS[q % len(QUESTIONS)],
                                                 args.max_tokens))
        profiled = await profile_followups(server, client, videos, args, profiles) if args.profile else []
    finally:
        await client.close()
    return rows, profiled


def block_size(server) -> int:
    for line in server.get("/metrics").splitlines():
        if line.startswith("vllm:cache_config_info{"):
            return int(line.split('block_size="', 1)[1].split('"', 1)[0])
    raise RuntimeError("/metrics has no vllm:cache_config_info")


def bench_variant(name: str, checkpoint: Path, videos: list[Path], warmup: Path, args) -> VariantResult:
    overrides, plugins = VARIANTS[name]
    print(f"\n== {name}: VLLM_PLUGINS={plugins!r} hf_overrides={overrides}, prefix caching on", flush=True)
    profiles = ARTIFACTS / "profiles" / name
    extra_args = ()
    if args.profile:
        shutil.rmtree(profiles, ignore_errors=True)
        extra_args = ("--profiler-config", json.dumps({
            "profiler": "torch", "torch_profiler_dir": str(profiles),
            "torch_profiler_with_stack": False, "torch_profiler_use_gzip": False,
        }))
    server = start_variant(name, checkpoint, args.kv_cache_bytes, prefix_caching=True, logs=ARTIFACTS / "logs",
                           extra_args=extra_args)
    try:
        rows, profiled = asyncio.run(ask_all(server, videos, warmup, args, profiles))
        size = block_size(server)
    finally:
        server.stop()
    first = [r for r in rows if r.index == 0]
    followups = [r for r in rows if r.index > 0]

    def hit_fraction(selected: list[Question]) -> float:
        return sum(r.prefix_cache_hits for r in selected) / max(1, sum(r.prefix_cache_queries for r in selected))

    first_ttft = statistics.median(r.ttft_s for r in first)
    followup_ttft = statistics.median(r.ttft_s for r in followups) if followups else 0.0
    return VariantResult(
        name=name, vllm_plugins=plugins, hf_overrides=overrides,
        server_command=server_command_line(server, name), block_size=size, questions=rows,
        first_ttft_p50_s=first_ttft, followup_ttft_p50_s=followup_ttft,
        followup_to_first_ttft=followup_ttft / first_ttft,
        first_hit_fraction=hit_fraction(first), followup_hit_fraction=hit_fraction(followups),
        profiled=profiled,
    )


RATIO_FIELDS = ("first_ttft_p50_s", "followup_ttft_p50_s")


def add_ratios(variants: list[VariantResult]) -> None:
    stock = next((v for v in variants if v.name == "stock"), None)
    if stock is None:
        return
    for v in variants:
        v.ratio_to_stock = {f: getattr(v, f) / getattr(stock, f) for f in RATIO_FIELDS if getattr(stock, f)}
        v.ratio_to_stock["first_prompt_tokens"] = v.questions[0].prompt_tokens / stock.questions[0].prompt_tokens


ROWS = (
    ("prompt tokens, first question", lambda v: v.questions[0].prompt_tokens, ",d"),
    ("TTFT first question p50, s", lambda v: v.first_ttft_p50_s, ".2f"),
    ("TTFT follow-ups p50, s", lambda v: v.followup_ttft_p50_s, ".2f"),
    ("follow-up prefill p50, s", lambda v: followup_median(v, lambda r: r.prefill_s), ".2f"),
    ("follow-up pre-prefill p50, s", lambda v: followup_median(v, lambda r: r.server_ttft_s - r.prefill_s), ".3f"),
    ("follow-up / first TTFT", lambda v: v.followup_to_first_ttft, ".3f"),
    ("cache hits, first questions", lambda v: v.first_hit_fraction, ".1%"),
    ("cache hits, follow-ups", lambda v: v.followup_hit_fraction, ".1%"),
)


def followup_median(v: VariantResult, get) -> float:
    """The median over the follow-ups of ``get(question)``."""
    values = [get(r) for r in v.questions if r.index > 0]
    return statistics.median(values) if values else 0.0


def print_table(variants: list[VariantResult]) -> None:
    print_ratio_table(variants, ROWS)
    for v in variants:
        for case in v.profiled:
            p = case.profile
            print(f"\n{v.name}, profiled follow-up, {case.case}: TTFT {case.question.ttft_s:.2f} s; "
                  f"prefill step {p.prefill_step_ms:.1f} ms for {p.prefill_tokens} tokens; "
                  f"{p.decode_steps} decode steps {p.decode_steps_ms:.1f} ms; "
                  f"video pooling ops: {p.pooling_ops or 'none'}")
            for op, ms in p.prefill_ops_ms.items():
                print(f"    {ms:9.2f} ms  {op}")


def plot(variants: list[VariantResult], path: Path, frames: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [LABELS[v.name] for v in variants]
    x = range(len(variants))
    for offset, (label, field, alpha) in enumerate((
        ("first question", "first_ttft_p50_s", 1.0), ("follow-ups", "followup_ttft_p50_s", 0.5),
    )):
        values = [getattr(v, field) for v in variants]
        bars = left.bar([i + 0.4 * offset - 0.2 for i in x], values, width=0.4, alpha=alpha, label=label,
                        color=[STYLES[v.name][0] for v in variants])
        for bar, value in zip(bars, values):
            left.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=9)
    left.set_xticks(list(x), names, fontsize=8)
    left.set_ylabel("time to first token, p50 (s)")
    left.set_title(f"First question and follow-ups, {frames}-frame video")
    left.legend()
    for v in variants:
        color, marker = STYLES[v.name]
        indices = sorted({r.index for r in v.questions})
        fractions = [
            sum(r.prefix_cache_hits for r in v.questions if r.index == i)
            / max(1, sum(r.prefix_cache_queries for r in v.questions if r.index == i))
            for i in indices
        ]
        right.plot(indices, [100 * f for f in fractions], color=color, marker=marker, label=LABELS[v.name])
        right.set_xticks(indices)
    right.set_xlabel("question about the same video (0: the first)")
    right.set_ylabel("prompt tokens from the prefix cache (%)")
    right.set_ylim(0, 105)
    right.set_title("Prefix-cache hits (vllm:prefix_cache_hits_total / queries)")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one 16-frame video, 3 questions")
    parser.add_argument("--variants", default="stock,stgridpool-k2",
                        help="comma-separated subset of " + ",".join(VARIANTS) + " (default stock,stgridpool-k2)")
    parser.add_argument("--videos", type=int, default=None, help="distinct videos per variant (default 3; quick 1)")
    parser.add_argument("--questions", type=int, default=None, help="questions per video (default 4; quick 3)")
    parser.add_argument("--frames", type=int, default=None, help="frames per video (default 64; quick 16)")
    parser.add_argument("--profile", action="store_true",
                        help="torch-profile two more follow-ups in the engine (vLLM's --profiler-config)")
    add_report_options(parser, "followup_bench", "question")
    args = parser.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    args.videos = args.videos or (1 if args.quick else 3)
    args.questions = args.questions or (3 if args.quick else 4)
    args.frames = args.frames or (16 if args.quick else 64)
    args.output = args.output or RESULTS / ("followup_bench_quick.json" if args.quick else "followup_bench.json")
    args.variants = chosen_variants(parser, args.variants)
    if args.questions < 2:
        parser.error("--questions must be at least 2 (a first question and a follow-up)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.replot:
        return replot(args.output, Report, print_table, plot)
    started = time.perf_counter()
    facts = run_facts()  # the code as the run starts
    checkpoint = build_checkpoint(SERVE_ARTIFACTS)  # the serving benchmark's, built once
    videos = write_videos(args.frames, args.videos)
    warmup = write_videos(8, 1)[0]
    variants = [bench_variant(name, checkpoint, videos, warmup, args) for name in args.variants]
    add_ratios(variants)
    report = Report(
        **report_fields(facts, args, variants, started),
        frames=args.frames,
        videos=args.videos,
        questions_per_video=args.questions,
    )
    publish(report, args.output, print_table, plot)


if __name__ == "__main__":
    main()
