"""Follow-up questions about one video reuse its KV blocks; other settings and other videos never do.

A real ``vllm serve --plugins stgridpool --enable-prefix-caching`` and real
mp4s. vLLM caches a prompt's KV in blocks of ``block_size`` tokens, each
keyed by its tokens, the blocks before it and, for a block holding video
placeholders, the video's multimodal hash, which covers the request's
``mm_processor_kwargs``. So the tokens a request finds cached
(``vllm:prefix_cache_hits_total``) are the full blocks of the longest prefix
it shares with a cached prompt, where two prompts share a video's tokens
only if the video and its settings are the same.

Expected hits come from the prompt's layout, rendered here with the
checkpoint's own chat template: the text before the video (a long system
message, so that whole blocks of text precede it), the video's tokens from
the spec's formula (``T * H' * W' + 1``), then the question.
"""

from __future__ import annotations

import base64
import time

import pytest
from transformers import AutoTokenizer

from tests.support.servers import cpu_server_args, serving

pytestmark = pytest.mark.engine

FRAMES = 16
VIDEO_TOKENS = {2: FRAMES * 13 * 13 + 1, 3: FRAMES * 9 * 9 + 1}  # kernel_size -> tokens (27 x 27 grid)
# Long enough that whole blocks of text come before the video, whatever the block size.
SYSTEM = "You answer questions about videos. " + " ".join(f"Rule {i}: be brief and exact." for i in range(40))
QUESTIONS = ("Describe the video.", "Which colours appear most often?")
HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"


@pytest.fixture(scope="module")
def server(onevision_checkpoint, tmp_path_factory):
    yield from serving(
        onevision_checkpoint, tmp_path_factory, "prefix_cache",
        "--plugins", "stgridpool",
        "--served-model-name", "tiny",
        "--enable-prefix-caching",
        *cpu_server_args(kv_cache_bytes=512 << 20),
    )


@pytest.fixture(scope="module")
def block_size(server) -> int:
    for line in server.get("/metrics").splitlines():
        if line.startswith("vllm:cache_config_info{"):
            return int(line.split('block_size="', 1)[1].split('"', 1)[0])
    raise AssertionError("/metrics has no vllm:cache_config_info")


@pytest.fixture(scope="module")
def layout(onevision_checkpoint):
    """``layout(question) -> (tokens before the video, tokens after it)``, from the chat template."""
    tokenizer = AutoTokenizer.from_pretrained(onevision_checkpoint)

    def split(question: str) -> tuple[list[int], list[int]]:
        chat = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]},
        ]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        before, after = text.split("<video>")  # one video placeholder, a special token: a clean cut
        encode = lambda part: tokenizer(part, add_special_tokens=False)["input_ids"]  # noqa: E731
        return encode(before), encode(after)

    return split


def counters(server) -> tuple[float, float]:
    """vLLM's prefix-cache counters, summed over their label sets."""
    totals = {HITS: 0.0, QUERIES: 0.0}
    for line in server.get("/metrics").splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals[HITS], totals[QUERIES]


def ask(server, client, video, question: str, settings: dict | None = None) -> tuple[int, int]:
    """One chat request; its prompt tokens and the prefix-cache hits it made.

    vLLM records a step's cache statistics after sending that step's tokens,
    so the counters are read until this request's queries have arrived.
    """
    hits, queries = counters(server)
    url = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
    extra = {"mm_processor_kwargs": {"stgridpool": settings}} if settings is not None else {}
    response = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": question}]},
        ],
        max_tokens=2,
        temperature=0.0,
        extra_body=extra,
    )
    prompt_tokens = response.usage.prompt_tokens
    deadline = time.monotonic() + 30
    while True:
        new_hits, new_queries = counters(server)
        if new_queries - queries >= prompt_tokens:
            break
        assert time.monotonic() < deadline, f"/metrics never counted the request's {prompt_tokens} queries"
        time.sleep(0.1)
    assert new_queries - queries == prompt_tokens, "another request ran at the same time"
    return prompt_tokens, int(new_hits - hits)


def full_blocks(tokens: int, block_size: int) -> int:
    return tokens // block_size * block_size


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_follow_up_question_hits_the_video_blocks(server, client, mp4_factory, layout, block_size):
    video = mp4_factory(FRAMES, width=330)
    before, after_first = layout(QUESTIONS[0])
    _, after_second = layout(QUESTIONS[1])
    assert len(before) >= block_size, "the system message must fill a block for this test to mean anything"

    tokens, hits = ask(server, client, video, QUESTIONS[0])
    assert tokens == len(before) + VIDEO_TOKENS[2] + len(after_first)  # the layout is the server's
    assert hits <= full_blocks(len(before), block_size)  # the video was never asked about before

    tokens, hits = ask(server, client, video, QUESTIONS[1])
    video_end = len(before) + VIDEO_TOKENS[2]
    shared = video_end + shared_prefix(after_first, after_second)
    assert hits >= full_blocks(video_end, block_size) > full_blocks(len(before), block_size)
    assert hits == full_blocks(shared, block_size)

    # The same question again: every full block but the one holding the last token.
    tokens, hits = ask(server, client, video, QUESTIONS[0])
    assert hits == full_blocks(tokens - 1, block_size)


@pytest.mark.parametrize(
    "settings, kernel, width",
    [({"kernel_size": 3}, 3, 332), ({"max_video_tokens": 1400}, 3, 334)],
    ids=["kernel_size-3", "max_video_tokens-1400"],
)
def test_other_settings_never_share_the_video_blocks(server, client, mp4_factory, layout, block_size,
                                                     settings, kernel, width):
    """The same video and question with other per-request settings: only the text before the video is shared.

    A budget of 1,400 tokens keeps 16 frames by raising the kernel to 3
    (16 x 169 + 1 does not fit, 16 x 81 + 1 does).
    """
    video = mp4_factory(FRAMES, width=width)  # a clip of its own: no other test cached it
    before, after = layout(QUESTIONS[0])
    text_blocks = full_blocks(len(before), block_size)

    ask(server, client, video, QUESTIONS[0])  # the defaults' blocks are cached now
    tokens, hits = ask(server, client, video, QUESTIONS[0], settings)
    assert tokens == len(before) + VIDEO_TOKENS[kernel] + len(after)
    assert hits == text_blocks, (
        f"settings {settings} found {hits} cached tokens: the video's blocks of other settings were reused"
    )
    # Its own blocks are cached like any other: asked again, it hits them.
    tokens, hits = ask(server, client, video, QUESTIONS[0], settings)
    assert hits == full_blocks(tokens - 1, block_size)


def test_defaults_written_out_share_the_defaults_blocks(server, client, mp4_factory, layout, block_size):
    """``{"kernel_size": 2}`` is the server's default: the same settings, so the same blocks."""
    video = mp4_factory(FRAMES, width=346)
    ask(server, client, video, QUESTIONS[0])
    tokens, hits = ask(server, client, video, QUESTIONS[0], {"kernel_size": 2})
    assert hits == full_blocks(tokens - 1, block_size)


def test_another_video_never_shares_the_video_blocks(server, client, mp4_factory, layout, block_size):
    """Two clips of the same size and token count: the second finds only the text before the video."""
    first, second = mp4_factory(FRAMES, width=348), mp4_factory(FRAMES, width=350)
    before, _ = layout(QUESTIONS[0])
    ask(server, client, first, QUESTIONS[0])
    tokens, hits = ask(server, client, second, QUESTIONS[0])
    assert hits == full_blocks(len(before), block_size)
    # And the first is still cached (the second did not evict it: the cache holds both).
    tokens, hits = ask(server, client, first, QUESTIONS[0])
    assert hits == full_blocks(tokens - 1, block_size)
