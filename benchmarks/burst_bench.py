"""A burst of distinct video uploads sent at once to one ``vllm serve --plugins stgridpool`` with its defaults.

Each upload is a distinct 64-frame 1080p H.264 clip (about 300 KB; 398 MB of
RGB once decoded), all sent at the same moment as chat completions of 2
tokens. Every answer must come within 300 s and be a 200, or a 503 with
``Retry-After`` (the server too busy to start the video within half its
deadline). Measured: each answer's status and time, and the server process
group's resident memory (API server, engine core, decode workers) sampled
every 20 ms, against the frame budget the server uses (a quarter of the
machine's memory unless ``STGRIDPOOL_VIDEO_DECODE_BUDGET_BYTES`` says).

Writes ``benchmarks/results/burst_bench.json``. Usage:
``python benchmarks/burst_bench.py [--uploads 32] [--env NAME=VALUE ...]``.
Not part of ``make test`` nor ``make bench``: about 5 minutes and several GB.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import msgspec

from engine_setup import ROOT, git_state  # benchmarks/ is on sys.path

sys.path.insert(0, str(ROOT))
from tests.support.server_memory import PeakSampler  # noqa: E402
from vllm_stgridpool_testing.launch import start_server  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ANSWER_WITHIN_SECONDS = 300


class Answer(msgspec.Struct):
    status: int
    seconds: float
    retry_after: str | None
    message: str


class BurstReport(msgspec.Struct, kw_only=True):
    git_commit: str
    git_dirty: bool
    cpu_count: int
    memory_gib: float
    uploads: int
    upload_bytes_mean: int
    decoded_bytes_each: int
    server_env: dict[str, str]
    frame_budget_bytes: int
    idle_rss_bytes: int
    peak_rss_rise_bytes: int
    last_answer_seconds: float
    statuses: dict[str, int]
    answers: list[Answer]


def clip(seed: int, frames: int = 64, width: int = 1920, height: int = 1080) -> bytes:
    """A distinct H.264 clip (``seed`` shifts the synthetic pictures): about 300 KB at CRF 45."""
    import av

    from vllm_stgridpool_testing.sample_videos import synthetic_frame

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "45"}
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(index + 997 * seed, width, height), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def ask(base_url: str, model: str, payload: bytes) -> Answer:
    url = "data:video/mp4;base64," + base64.b64encode(payload).decode()
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Describe."}]}],
        "max_tokens": 2,
        "temperature": 0,
    }
    started = time.monotonic()
    try:
        response = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=ANSWER_WITHIN_SECONDS + 60)
    except httpx.HTTPError as error:
        return Answer(0, time.monotonic() - started, None, f"{type(error).__name__}: {error}")
    text = "" if response.status_code == 200 else response.text[:300]
    return Answer(response.status_code, time.monotonic() - started, response.headers.get("retry-after"), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=32)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    parser.add_argument("--output", type=Path, default=RESULTS / "burst_bench.json")
    args = parser.parse_args()
    server_env = dict(item.split("=", 1) for item in args.env)
    os.environ.update(server_env)  # so the budget computed here is the server's
    from vllm_stgridpool.video.limits import VideoLimits
    from vllm_stgridpool_testing.tiny_models import build_llava_onevision

    budget = VideoLimits.from_env().decode_budget_bytes
    folder = Path(tempfile.mkdtemp(prefix="burst-bench-"))
    started = time.monotonic()
    clips = [clip(seed) for seed in range(args.uploads)]
    print(f"{len(clips)} clips, {sum(map(len, clips)) // len(clips):,} bytes each on average "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    checkpoint = build_llava_onevision(folder / "llava_onevision")
    server_args = ("--plugins", "stgridpool", "--max-model-len", "16384", "--kv-cache-memory-bytes", str(1 << 30),
                   "--dtype", "float32", "--enforce-eager")
    with start_server(checkpoint, *server_args, log_path=folder / "server.log", timeout=600, env=server_env) as server:
        warm = ask(server.base_url, str(checkpoint), clip(10_000, frames=2))
        assert warm.status == 200, warm
        answers: list[Answer | None] = [None] * len(clips)

        def send(index: int) -> None:
            answers[index] = ask(server.base_url, str(checkpoint), clips[index])

        senders = [threading.Thread(target=send, args=(i,)) for i in range(len(clips))]
        with PeakSampler(server.process.pid) as memory:
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join()
    statuses: dict[str, int] = {}
    for answer in answers:
        statuses[str(answer.status)] = statuses.get(str(answer.status), 0) + 1
    state = git_state()
    report = BurstReport(
        git_commit=state["git_commit"], git_dirty=state["git_dirty"], cpu_count=os.cpu_count() or 0,
        memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        uploads=len(clips), upload_bytes_mean=sum(map(len, clips)) // len(clips),
        decoded_bytes_each=64 * 1920 * 1080 * 3, server_env=server_env, frame_budget_bytes=budget,
        idle_rss_bytes=memory.idle, peak_rss_rise_bytes=memory.rise,
        last_answer_seconds=max(a.seconds for a in answers), statuses=statuses, answers=answers,
    )
    args.output.write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    late = [a for a in answers if a.seconds > ANSWER_WITHIN_SECONDS]
    bad = [a for a in answers if a.status != 200 and not (a.status == 503 and a.retry_after)]
    print(f"answers: {statuses}; last after {report.last_answer_seconds:.1f} s; "
          f"server group {memory.idle / 2**30:.1f} GiB idle, peak {memory.rise / 2**30:+.2f} GiB "
          f"(frame budget {budget / 2**30:.2f} GiB, margin {(memory.rise - budget) / 2**30:+.2f} GiB); "
          f"late: {len(late)}, neither 200 nor 503 with Retry-After: {len(bad)}; wrote {args.output}")


if __name__ == "__main__":
    main()
