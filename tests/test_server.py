"""A real ``vllm serve llava-video --plugins stgridpool`` and the ``openai`` client.

The server is started the way the README tells users to: the ``vllm``
command, ``--plugins``, and ``llava-video`` resolved through vLLM's model
redirect file. Expected counts: text tokens from the checkpoint's own chat
template, plus ``T * H' * W' + 1`` from the spec's formula.
"""

from __future__ import annotations

import base64
import json

import openai
import pytest
from transformers import AutoTokenizer

from vllm_stgridpool.launch import start_server
from vllm_stgridpool.metrics import read_counter

pytestmark = pytest.mark.engine

QUESTION = "What happens in this video?"


def data_url(path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def messages(video_url: str) -> list[dict]:
    return [{
        "role": "user",
        "content": [{"type": "video_url", "video_url": {"url": video_url}}, {"type": "text", "text": QUESTION}],
    }]


@pytest.fixture(scope="module")
def server(onevision_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    redirect = folder / "redirect.json"
    redirect.write_text(json.dumps({"llava-video": str(onevision_checkpoint)}))
    with start_server(
        "llava-video",
        "--plugins", "stgridpool",
        "--max-model-len", "16384",
        "--kv-cache-memory-bytes", str(1 << 30),
        "--dtype", "float32",
        "--enforce-eager",
        "--trust-request-mm-kwargs",  # vLLM refuses per-request mm_processor_kwargs without it
        env={"VLLM_MODEL_REDIRECT_PATH": str(redirect), "VLLM_LOGGING_LEVEL": "DEBUG"},
        log_path=folder / "server.log",
        timeout=600,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0)


@pytest.fixture(scope="module")
def text_tokens(onevision_checkpoint) -> int:
    """Prompt tokens of the chat request other than the one ``<video>`` placeholder."""
    tokenizer = AutoTokenizer.from_pretrained(onevision_checkpoint)
    chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.count("<video>") == 1
    return len(tokenizer(rendered)["input_ids"]) - 1


def ask(client, video_path, **extra):
    return client.chat.completions.create(
        model="llava-video", messages=messages(data_url(video_path)), max_tokens=4, temperature=0.0, **extra
    )


def metric(server, name: str) -> float:
    return read_counter(server.get("/metrics"), name)


def test_video_request_costs_the_formula(client, mp4_factory, text_tokens):
    response = ask(client, mp4_factory(16))
    assert response.usage.prompt_tokens == text_tokens + 16 * 169 + 1
    assert response.choices[0].message.content is not None


def test_long_video_is_sampled_to_max_frames(client, mp4_factory, text_tokens):
    """No extra flag: a 100-frame mp4 is sampled down to the paper's 64 frames."""
    response = ask(client, mp4_factory(100))
    assert response.usage.prompt_tokens == text_tokens + 64 * 169 + 1


def test_request_override_changes_the_count(client, mp4_factory, text_tokens):
    extra = {"mm_processor_kwargs": {"stgridpool": {"kernel_size": 3}}}
    response = ask(client, mp4_factory(16), extra_body=extra)
    assert response.usage.prompt_tokens == text_tokens + 16 * 81 + 1


def test_override_that_costs_more_is_a_400_and_the_server_keeps_serving(client, mp4_factory, text_tokens):
    extra = {"mm_processor_kwargs": {"stgridpool": {"kernel_size": 1}}}
    with pytest.raises(openai.BadRequestError, match="more than this server"):
        ask(client, mp4_factory(8), extra_body=extra)
    assert ask(client, mp4_factory(8)).usage.prompt_tokens == text_tokens + 8 * 169 + 1


def test_metrics_count_emitted_and_saved_tokens(server, client, mp4_factory):
    emitted = metric(server, "stgridpool_video_tokens_total")
    saved = metric(server, "stgridpool_video_tokens_saved_total")
    ask(client, mp4_factory(16))
    ask(client, mp4_factory(5))
    assert metric(server, "stgridpool_video_tokens_total") - emitted == (16 + 5) * 169 + 2
    assert metric(server, "stgridpool_video_tokens_saved_total") - saved == (16 + 5) * (196 - 169)
    assert "stgridpool: video of 5 frames -> 846 tokens (stock 981, saved 135)" in server.log()
