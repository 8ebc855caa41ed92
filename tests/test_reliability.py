"""A real ``vllm serve --plugins stgridpool`` under edge inputs, bad inputs and a soak.

One server for the whole module, started as the README tells users plus the
CPU sizing flags, and ``--trust-request-mm-kwargs``: vLLM 0.32 refuses every
per-request ``mm_processor_kwargs`` / ``media_io_kwargs`` (HTTP 400, "disabled
by default") unless the server trusts them, so without the flag the plugin's
own checks of request overrides would never be reached.

Expected prompt sizes are not taken from the plugin: the text part is measured
once (a 1-frame video minus its ``169 + 1`` video tokens) and cross-checked
against the checkpoint's chat template; every video then costs
``T * ((27 - k) // k + 1) ** 2 + 1`` tokens, ``T`` capped at ``max_frames``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import random
import time
from collections import Counter
from collections.abc import Mapping

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.support.server_memory import group_rss_bytes
from tests.support.servers import cpu_server_args, serving

from tests.support.hostile_videos import offsets_past_the_end

pytestmark = pytest.mark.engine

GRID = 27
MAX_FRAMES = 64  # the plugin's default, which the server samples long videos down to
SERVE_ARGS = ("--plugins", "stgridpool", *cpu_server_args(), "--trust-request-mm-kwargs")
QUESTION = "Describe the video."
UNREACHABLE_URL = "http://127.0.0.1:9/x.mp4"  # discard port on loopback: nothing listens

WARMUP_REQUESTS = 200
SOAK_REQUESTS = 600
SOAK_CLIENTS = 4
# The server group's RSS may grow by at most this per request, fitted over the soak's requests (least
# squares of RSS against requests answered, after a warm-up of 200: with 40 the arenas still grew,
# +731 KiB per request). Measured here: -20 KiB per request. A leak of 1 MiB kept for every request
# body over 10 kB (45% of this mix) measured +439 KiB per request and was refused.
RSS_SLOPE_BOUND = 256 * 2**10


def frame_tokens(kernel_size: int = 2) -> int:
    return ((GRID - kernel_size) // kernel_size + 1) ** 2


def video_tokens(num_frames: int, kernel_size: int = 2) -> int:
    """The spec's cost of one video: pooled frames plus LLaVA-OneVision's newline token."""
    return min(num_frames, MAX_FRAMES) * frame_tokens(kernel_size) + 1


def data_url(payload: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(payload).decode()


def messages(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": url}},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]


def stgridpool(override) -> dict:
    return {"mm_processor_kwargs": {"stgridpool": override}}


def num_frames(count) -> dict:
    return {"media_io_kwargs": {"video": {"num_frames": count}}}


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of ``(x, y)`` points."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


# --- the server and its clients --------------------------------------------------


@pytest.fixture(scope="module")
def server(onevision_checkpoint, tmp_path_factory):
    yield from serving(onevision_checkpoint, tmp_path_factory, "reliability", *SERVE_ARGS, timeout=420)


@pytest.fixture(scope="module")
def model(onevision_checkpoint) -> str:
    return str(onevision_checkpoint)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=180)


def prompt_tokens(client: openai.OpenAI, model: str, url: str, **extra_body) -> int:
    """``usage.prompt_tokens`` of one greedy 2-token chat completion about the video at ``url``."""
    response = client.chat.completions.create(
        model=model,
        messages=messages(url),
        max_tokens=2,
        temperature=0,
        extra_body=extra_body or None,
    )
    return response.usage.prompt_tokens


@pytest.fixture(scope="module")
def ask(client, model):
    """``ask(url, **extra_body) -> prompt_tokens`` on the module's client."""
    return lambda url, **extra_body: prompt_tokens(client, model, url, **extra_body)


@pytest.fixture(scope="module")
def video(mp4_factory):
    """``video(frames, width=, height=) -> data URL`` of a real encoded mp4."""

    def make(frames: int, width: int = 160, height: int = 120) -> str:
        return data_url(mp4_factory(frames, width=width, height=height).read_bytes())

    return make


@pytest.fixture(scope="module")
def text_tokens(ask, video) -> int:
    """Prompt tokens that are not the video's: a 1-frame video's prompt minus ``169 + 1``."""
    return ask(video(1)) - video_tokens(1)


@pytest.fixture(scope="module")
def expect_recovery(ask, video, text_tokens, server):
    """After a bad request: the server is up and the next valid request is counted right."""

    def check() -> None:
        assert server.alive(), server.log()[-3000:]
        assert ask(video(2)) == text_tokens + video_tokens(2)

    return check


def chat_template_tokens(checkpoint) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
        tokenize=True,
    )
    return list(rendered["input_ids"] if isinstance(rendered, Mapping) else rendered)


# --- valid edge inputs ---------------------------------------------------------------


def test_text_baseline_matches_the_chat_template(text_tokens, onevision_checkpoint):
    """The measured baseline is the template's tokens minus the one ``<video>`` placeholder."""
    ids = chat_template_tokens(onevision_checkpoint)
    video_id = AutoTokenizer.from_pretrained(onevision_checkpoint).convert_tokens_to_ids("<video>")
    assert ids.count(video_id) == 1
    assert text_tokens == len(ids) - 1


@pytest.mark.parametrize("frames", [2, 3, 5, 7, 13, 33])
def test_short_and_indivisible_frame_counts(ask, video, text_tokens, frames):
    """Fewer frames than one 4-frame mosaic, and counts no pyramid level divides."""
    assert ask(video(frames)) == text_tokens + video_tokens(frames)


@pytest.mark.parametrize(
    ("width", "height"), [(1, 1), (7, 1000), (1000, 7), (4000, 16), (16, 4000)]
)
def test_extreme_frame_sizes(ask, video, text_tokens, width, height):
    """Every frame is resized to the 27x27 patch grid, whatever its own shape."""
    assert ask(video(3, width, height)) == text_tokens + video_tokens(3)


def test_long_video_is_sampled_down_to_max_frames(ask, video, text_tokens):
    assert ask(video(100)) == text_tokens + MAX_FRAMES * frame_tokens() + 1


def test_explicit_num_frames_at_the_limit(ask, video, text_tokens):
    assert ask(video(100), **num_frames(MAX_FRAMES)) == text_tokens + MAX_FRAMES * frame_tokens() + 1


def test_cheaper_request_override_is_honoured(ask, video, text_tokens):
    """kernel_size 3 costs 81 tokens a frame instead of 169: allowed per request."""
    assert ask(video(5), **stgridpool({"kernel_size": 3})) == text_tokens + video_tokens(5, 3)


# --- bad inputs ------------------------------------------------------------------------


def zero_frame_mp4(tmp_path) -> bytes:
    """An mp4 container that holds no frame: what OpenCV writes when no frame arrives."""
    import cv2

    path = tmp_path / "empty.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (160, 120))
    writer.release()
    payload = path.read_bytes()
    assert payload, "OpenCV wrote no container at all"
    return payload


@pytest.fixture(scope="module")
def bad_inputs(video, mp4_factory, tmp_path_factory) -> dict[str, tuple[str, dict, str]]:
    """name -> (video URL, extra body, word the error message must contain)."""
    ten_frames = mp4_factory(10).read_bytes()
    two = video(2)
    return {
        "zero_bytes": ("data:video/mp4;base64,", {}, "empty"),
        "zero_frames": (data_url(zero_frame_mp4(tmp_path_factory.mktemp("zero"))), {}, "0 frames"),
        "corrupt_bytes": (data_url(os.urandom(4096)), {}, "decode"),
        "truncated_mp4": (data_url(ten_frames[: len(ten_frames) // 2]), {}, "decode"),
        "offsets_past_the_end": (data_url(offsets_past_the_end(ten_frames)), {}, "decode"),
        "not_a_url": ("not a url", {}, "not a url"),
        "bad_base64": ("data:video/mp4;base64,!!!", {}, "base64"),
        "unreachable_url": (UNREACHABLE_URL, {}, "could not fetch media from url http://127.0.0.1:9"),
        "unknown_video_backend": (
            two, {"media_io_kwargs": {"video": {"video_backend": "no-such-backend"}}}, "video_backend"
        ),
        "decord_video_backend": (  # the plugin's loader answers to pyav only
            two, {"media_io_kwargs": {"video": {"video_backend": "decord"}}}, "video_backend 'decord' is not a video loader"
        ),
        "num_frames_not_a_number": (two, num_frames("all"), "num_frames"),
        "num_frames_over_max": (video(300), num_frames(200), "max_frames"),
        "num_frames_all": (video(300), num_frames(-1), "max_frames"),
        "override_string": (two, stgridpool("kernel_size=3"), "JSON object"),
        "override_list": (two, stgridpool([3]), "JSON object"),
        "override_unknown_key": (two, stgridpool({"kernel": 3}), "unknown field"),
        "override_raises_max_frames": (two, stgridpool({"max_frames": 1024}), "unknown field"),
        "override_disables": (two, stgridpool({"enabled": False}), "unknown field"),
        "kernel_size_zero": (two, stgridpool({"kernel_size": 0}), "kernel_size"),
        "kernel_size_negative": (two, stgridpool({"kernel_size": -2}), "kernel_size"),
        "kernel_size_huge": (two, stgridpool({"kernel_size": 10**9}), "kernel_size"),
        "kernel_size_over_grid": (two, stgridpool({"kernel_size": 28}), "kernel_size"),
        "kernel_size_costlier": (two, stgridpool({"kernel_size": 1}), "kernel_size >= 2"),
        "temperature_nan_string": (two, stgridpool({"temperature": "nan"}), "temperature"),
        "norm_p_zero": (two, stgridpool({"norm_p": 0}), "norm_p"),
        "levels_mismatched": (two, stgridpool({"grid_sizes": [4, 4], "grid_strides": [2]}), "same length"),
        "levels_enormous": (
            two,
            stgridpool({"grid_sizes": [4] * 10**5, "grid_strides": [2] * 10**5}),
            "pyramid levels",
        ),
        "mm_processor_kwargs_string": (two, {"mm_processor_kwargs": "stgridpool"}, "dictionary"),
    }


BAD_INPUT_NAMES = [
    "zero_bytes", "zero_frames", "corrupt_bytes", "truncated_mp4", "offsets_past_the_end", "not_a_url",
    "bad_base64", "unreachable_url", "unknown_video_backend", "decord_video_backend", "num_frames_not_a_number", "num_frames_over_max", "num_frames_all", "override_string", "override_list",
    "override_unknown_key", "override_raises_max_frames", "override_disables",
    "kernel_size_zero", "kernel_size_negative", "kernel_size_huge", "kernel_size_over_grid",
    "kernel_size_costlier", "temperature_nan_string", "norm_p_zero", "levels_mismatched",
    "levels_enormous", "mm_processor_kwargs_string",
]


@pytest.mark.parametrize("name", BAD_INPUT_NAMES)
def test_bad_input_is_a_clear_client_error(ask, bad_inputs, expect_recovery, name):
    url, extra_body, keyword = bad_inputs[name]
    with pytest.raises(openai.APIStatusError) as caught:
        ask(url, **extra_body)
    error = caught.value
    assert 400 <= error.status_code < 500, f"{name}: HTTP {error.status_code}: {error.message}"
    assert keyword.lower() in error.message.lower(), f"{name}: {error.message}"
    expect_recovery()


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_temperature_is_rejected(server, model, video, expect_recovery, literal):
    """The openai client cannot send NaN; a raw body with JSON's non-standard literals can."""
    body = json.dumps({"model": model, "messages": messages(video(2)), "max_tokens": 2, "temperature": 0})
    body = body[:-1] + ', "mm_processor_kwargs": {"stgridpool": {"temperature": %s}}}' % literal
    response = httpx.post(
        server.base_url + "/v1/chat/completions",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=120,
    )
    assert response.status_code == 400, response.text
    assert "temperature" in response.json()["error"]["message"]
    expect_recovery()


# --- soak --------------------------------------------------------------------------------


def test_soak_mixed_traffic(server, model, video, text_tokens, bad_inputs):
    """A fixed number of concurrent valid and bad requests: no valid request fails or is
    miscounted, every bad one is a 4xx, the server stays healthy, and its memory does not grow
    with the requests answered (RSS against requests, fitted after a warm-up)."""
    valid = [
        (video(frames, *size), extra, text_tokens + video_tokens(frames, kernel))
        for frames, size, extra, kernel in [
            (1, (160, 120), {}, 2),
            (2, (160, 120), {}, 2),
            (5, (160, 120), {}, 2),
            (7, (7, 1000), {}, 2),
            (13, (160, 120), {}, 2),
            (3, (1, 1), {}, 2),
            (33, (160, 120), {}, 2),
            (100, (160, 120), {}, 2),
            (5, (160, 120), stgridpool({"kernel_size": 3}), 3),
        ]
    ]
    bad = [
        bad_inputs[name]
        for name in (
            "zero_bytes", "zero_frames", "corrupt_bytes", "truncated_mp4", "offsets_past_the_end", "not_a_url",
            "bad_base64", "num_frames_over_max", "override_list", "override_unknown_key",
            "kernel_size_zero", "kernel_size_costlier", "levels_enormous", "temperature_nan_string",
        )
    ]
    mix = [("valid", case) for case in valid] * 2 + [("bad", case) for case in bad]
    random.Random(0).shuffle(mix)

    async def send(aclient, kind, case, log):
        url, extra_body, expected = case
        try:
            response = await aclient.chat.completions.create(
                model=model, messages=messages(url), max_tokens=2, temperature=0,
                extra_body=extra_body or None,
            )
        except openai.APIStatusError as error:
            ok = kind == "bad" and 400 <= error.status_code < 500 and expected.lower() in error.message.lower()
            log.append((kind, ok, f"HTTP {error.status_code}: {error.message[:200]}"))
            return
        except Exception as error:  # connection dropped, timeout: a failure of either kind
            log.append((kind, False, repr(error)))
            return
        tokens = response.usage.prompt_tokens
        ok = kind == "valid" and tokens == expected
        log.append((kind, ok, f"prompt_tokens {tokens}, expected {expected if kind == 'valid' else 'a 4xx'}"))

    async def run(cases, rss_series):
        log: list = []
        feed = iter(cases)
        async with openai.AsyncOpenAI(
            base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=180
        ) as aclient:

            async def worker():
                for kind, case in feed:
                    await send(aclient, kind, case, log)
                    rss_series.append((len(log), group_rss_bytes(server.process.pid)))  # after each answer

            await asyncio.gather(*(worker() for _ in range(SOAK_CLIENTS)))
        return log

    # Warm-up: the same traffic, so caches, pools and allocator arenas reach their size.
    warmup = asyncio.run(run(itertools.islice(itertools.cycle(mix), WARMUP_REQUESTS), []))
    rss_series: list[tuple[int, int]] = []
    started = time.monotonic()
    soak = asyncio.run(run(itertools.islice(itertools.cycle(mix), SOAK_REQUESTS), rss_series))
    elapsed = time.monotonic() - started
    assert server.get("/health") == ""

    counts = Counter((kind, ok) for kind, ok, _ in soak)
    per_request = slope(rss_series)
    rss_before, rss_after = rss_series[0][1], rss_series[-1][1]
    figures = (
        f"soak {elapsed:.0f}s x {SOAK_CLIENTS} clients: {len(soak)} requests "
        f"({counts['valid', True] + counts['valid', False]} valid, "
        f"{counts['bad', True] + counts['bad', False]} bad; warm-up {len(warmup)} requests); "
        f"server group RSS {rss_before / 2**20:.0f} MiB -> {rss_after / 2**20:.0f} MiB, fitted "
        f"{per_request / 2**10:+.1f} KiB per request over {len(rss_series)} samples "
        f"(bound {RSS_SLOPE_BOUND / 2**10:.0f} KiB; every 50 requests: "
        f"{', '.join(f'{rss / 2**20:.0f}' for answered, rss in rss_series if answered % 50 == 0)} MiB)"
    )
    print("\n" + figures)
    failures = [entry for entry in warmup + soak if not entry[1]]
    assert not failures, f"{figures}\nfailed: {failures[:10]}"
    assert counts["valid", True] > 0 and counts["bad", True] > 0, figures
    assert per_request < RSS_SLOPE_BOUND, figures
