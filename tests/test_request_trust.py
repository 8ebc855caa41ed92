"""P6 against a real server: a frame count up to ``max_frames`` (and a sampling rate with it) needs no trust
flag, nothing else does.

``vllm serve ... --plugins stgridpool`` without ``--trust-request-mm-kwargs``,
``max_frames`` 12. Expected counts: text tokens from the checkpoint's chat
template plus ``T * H' * W' + 1`` with H' = W' = (27 - 2) // 2 + 1 = 13. The
clip is 24 frames at 10 fps (2.4 s): at ``fps`` f the loader takes
``min(n, floor(2.4 * f))`` frames.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.support.servers import cpu_server_args, serving

pytestmark = pytest.mark.engine

MAX_FRAMES = 12
QUESTION = "What happens in this video?"


@pytest.fixture(scope="module")
def server(onevision_checkpoint, mp4_factory, tmp_path_factory):
    yield from serving(
        onevision_checkpoint, tmp_path_factory, "request_trust",
        "--plugins", "stgridpool",
        "--served-model-name", "tiny",
        "--hf-overrides", json.dumps({"stgridpool": {"max_frames": MAX_FRAMES}}),
        *cpu_server_args(max_model_len=8192, kv_cache_bytes=1 << 29),
        "--allowed-local-media-path", str(mp4_factory(24).parent),
    )


def ask(client, video, **extra_body):
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": video.as_uri()}},
            {"type": "text", "text": QUESTION},
        ]}],
        max_tokens=2,
        temperature=0.0,
        extra_body=extra_body,
    )


@pytest.mark.parametrize("frames", [1, 5, MAX_FRAMES])
def test_a_frame_count_up_to_max_frames_needs_no_trust_flag(client, mp4_factory, text_tokens, frames):
    response = ask(client, mp4_factory(24), media_io_kwargs={"video": {"num_frames": frames}})
    assert response.usage.prompt_tokens == text_tokens + frames * 13 * 13 + 1


def test_a_frame_count_goes_with_the_own_key(client, mp4_factory, text_tokens):
    response = ask(
        client, mp4_factory(24),
        media_io_kwargs={"video": {"num_frames": 6}},
        mm_processor_kwargs={"stgridpool": {"kernel_size": 3}},
    )
    assert response.usage.prompt_tokens == text_tokens + 6 * 9 * 9 + 1


@pytest.mark.parametrize(("fps", "frames"), [(1, 2), (2.5, 6), (1000, MAX_FRAMES)])
def test_a_sampling_rate_with_the_frame_count_only_lowers_it(client, mp4_factory, text_tokens, fps, frames):
    response = ask(client, mp4_factory(24), media_io_kwargs={"video": {"num_frames": MAX_FRAMES, "fps": fps}})
    assert response.usage.prompt_tokens == text_tokens + frames * 13 * 13 + 1


@pytest.mark.parametrize(
    "media_io_kwargs",
    [
        {"video": {"num_frames": MAX_FRAMES + 1}},
        {"video": {"num_frames": 0}},
        {"video": {"fps": 2}},  # alone, vLLM would drop the server's frame count
        {"video": {"num_frames": 4, "fps": 0}},
        {"video": {"num_frames": 4, "fps": -1}},
        {"video": {"num_frames": 4, "fps": 1001}},
        {"video": {"num_frames": 4, "fps": True}},
        {"video": {"num_frames": 4, "fps": "2"}},
        {"video": {"video_backend": "opencv"}},
        {"image": {"num_frames": 4}},
    ],
)
def test_anything_else_gets_vllms_400(client, server, mp4_factory, media_io_kwargs):
    with pytest.raises(openai.BadRequestError, match="trust-request-mm-kwargs"):
        ask(client, mp4_factory(24), media_io_kwargs=media_io_kwargs)
    with pytest.raises(openai.BadRequestError, match="trust-request-mm-kwargs"):
        ask(client, mp4_factory(24), mm_processor_kwargs={"num_frames": 4})
    assert server.alive()
