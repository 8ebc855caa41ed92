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

from tests.support.servers import cpu_server_args
from vllm_stgridpool_testing.launch import start_server
from vllm_stgridpool.serving.metrics import read_counter

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
        # An unknown name in the allowlist is ignored (test_plugins_option_reaches_every_server_process).
        "--plugins", "stgridpool,no_such_plugin",
        *cpu_server_args(),
        "--limit-mm-per-prompt", json.dumps({"video": 2, "image": 1}),
        # No --trust-request-mm-kwargs: the plugin's own key needs no blanket trust (P6).
        # VLLM_PLUGINS from the environment is overridden by --plugins (P3) in every process.
        env={"VLLM_MODEL_REDIRECT_PATH": str(redirect), "VLLM_LOGGING_LEVEL": "DEBUG", "VLLM_PLUGINS": "overridden"},
        log_path=folder / "server.log",
        timeout=600,
    ) as running:
        yield running


def ask(client, video_path, **extra):
    return client.chat.completions.create(
        model="llava-video", messages=messages(data_url(video_path)), max_tokens=4, temperature=0.0, **extra
    )


def metric(server, name: str) -> float:
    return read_counter(server.get("/metrics"), name)


def test_plugins_option_reaches_every_server_process(server):
    """``--plugins`` (P3) is the allowlist of the engine core and the worker too, over ``VLLM_PLUGINS``.

    The API server process loads plugins before its logging is set up:
    test_cli.py checks the CLI process through the modules it imports.
    """
    text = server.log()
    for line_prefix in ("(EngineCore pid=", "(VllmWorker-0 pid="):
        assert any(
            line.startswith(line_prefix) and "Loading plugin stgridpool" in line
            for line in text.splitlines()
        ), f"no allowlisted load logged by {line_prefix}...):\n{text[-4000:]}"
    assert "Loading plugin no_such_plugin" not in text
    assert "All plugins in this group will be loaded" not in text
    assert "Loading plugin lora" not in text


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


# --- Per-request settings from untrusted clients (no --trust-request-mm-kwargs) ---


def chat(client, content: list[dict], **extra):
    return client.chat.completions.create(
        model="llava-video", messages=[{"role": "user", "content": content}], max_tokens=4, temperature=0.0, **extra
    )


def video_part(path) -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(path)}}


def rendered_tokens(checkpoint, parts: list[str]) -> tuple[str, int]:
    """The chat prompt for ``parts`` ("video", "image", then the question) and its token count."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    content = [{"type": part} for part in parts] + [{"type": "text", "text": QUESTION}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return text, len(tokenizer(text)["input_ids"])


@pytest.mark.parametrize(
    "extra_body, parameter",
    [
        ({"mm_processor_kwargs": {"num_frames": 4}}, "mm_processor_kwargs"),
        ({"mm_processor_kwargs": {"stgridpool": {"kernel_size": 3}, "num_frames": 4}}, "mm_processor_kwargs"),
        # Not the own key and a frame count up to max_frames (64) alone: vLLM's own check answers,
        # naming its first refused field.
        ({"mm_processor_kwargs": {"stgridpool": {}}, "media_io_kwargs": {"video": {"num_frames": 65}}}, "mm_processor_kwargs"),
        ({"media_io_kwargs": {"video": {"num_frames": 4, "fps": 0}}}, "media_io_kwargs"),
    ],
)
def test_other_processor_keys_still_need_the_trust_flag(client, mp4_factory, text_tokens, extra_body, parameter):
    with pytest.raises(openai.BadRequestError, match="trust-request-mm-kwargs") as error:
        ask(client, mp4_factory(8), extra_body=extra_body)
    assert parameter in str(error.value)
    assert ask(client, mp4_factory(8)).usage.prompt_tokens == text_tokens + 8 * 169 + 1


def test_completions_accept_the_own_key_too(server, client, mp4_factory, onevision_checkpoint):
    """The completions endpoint goes through the same check (P6 wraps it once for every endpoint)."""
    import requests

    text, length = rendered_tokens(onevision_checkpoint, ["video"])
    body = {
        "model": "llava-video",
        "prompt": text,
        "max_tokens": 2,
        "mm_processor_kwargs": {"stgridpool": {"kernel_size": 3}},
    }
    # A text-only completion with the own key: the object is checked, then ignored (no video).
    reply = requests.post(server.base_url + "/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    body["mm_processor_kwargs"] = {"num_frames": 4}
    reply = requests.post(server.base_url + "/v1/completions", json=body, timeout=120)
    assert reply.status_code == 400 and "trust-request-mm-kwargs" in reply.text


# Settings at and beyond the limits, each asserted on its own side: the field ranges (norm_p from
# 0.01 to 1000, |temperature| at most 1e4, kernel_size within the 27 x 27 grid and at least the
# server's 2), and pyramids against the server's at 64 frames (8 levels at stride 1 resize 512 frames
# where the paper's resize 44; stride 1024 samples no frame at all).
MUST_REFUSE = [  # (override, the field the 400 names)
    ({"norm_p": 1e-3}, "norm_p"), ({"norm_p": 1e4}, "norm_p"), ({"norm_p": 1e300}, "norm_p"),
    ({"norm_p": 5e-324}, "norm_p"), ({"norm_p": 0}, "norm_p"), ({"norm_p": -2}, "norm_p"),
    ({"temperature": 1e5}, "temperature"), ({"temperature": 1e308}, "temperature"),
    ({"kernel_size": 28}, "kernel_size"),
    ({"grid_sizes": [4] * 8, "grid_strides": [1] * 8}, "grid_sizes"),
    ({"grid_sizes": [4, 4, 4], "grid_strides": [2, 4, 8], "norm_p": 1e-3, "temperature": -1e4}, "norm_p"),
]
MUST_SERVE = [
    {"norm_p": 1e-2}, {"norm_p": 0.05}, {"norm_p": 100.0}, {"norm_p": 1e3},
    {"temperature": 5e-324}, {"temperature": -5e-324}, {"temperature": 1e4}, {"temperature": -1e4},
    {"temperature": 0},
    {"kernel_size": 27}, {"kernel_size": 13, "norm_p": 1e3, "temperature": 1e4},
    {"grid_sizes": [64], "grid_strides": [1]},  # one level: every frame resized once, into one mosaic
    {"grid_sizes": [1] * 8, "grid_strides": [1024] * 8}, {"grid_sizes": [2], "grid_strides": [8]},
]


@pytest.mark.parametrize("override, field", MUST_REFUSE, ids=lambda o: json.dumps(o))
def test_settings_beyond_the_limits_are_a_400_naming_the_field(client, mp4_factory, text_tokens, override, field):
    extra = {"mm_processor_kwargs": {"stgridpool": override}}
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, mp4_factory(16), extra_body=extra)
    assert field in str(error.value), error.value
    assert ask(client, mp4_factory(8)).usage.prompt_tokens == text_tokens + 8 * 169 + 1


@pytest.mark.parametrize("override", MUST_SERVE, ids=lambda o: json.dumps(o))
def test_settings_at_the_limits_are_served_with_finite_logprobs(client, mp4_factory, text_tokens, override):
    import math

    extra = {"mm_processor_kwargs": {"stgridpool": override}, "logprobs": True, "top_logprobs": 3}
    response = ask(client, mp4_factory(16), extra_body=extra)
    kernel = override.get("kernel_size", 2)
    assert response.usage.prompt_tokens == text_tokens + 16 * ((27 - kernel) // kernel + 1) ** 2 + 1
    logprobs = [entry.logprob for entry in response.choices[0].logprobs.content[0].top_logprobs]
    assert len(logprobs) == 3 and all(math.isfinite(value) for value in logprobs), logprobs


@pytest.fixture(scope="module")
def decoded(mp4_factory):
    """The frames the server decodes from an 8-frame mp4 (same loader, same sampling)."""
    from vllm_stgridpool.video.loader import PyAVVideoLoader

    path = mp4_factory(8)
    frames, _ = PyAVVideoLoader.load_bytes(path.read_bytes(), num_frames=64)
    return path, frames


SETTINGS = [  # (request settings, the baseline they must differ from)
    ({"temperature": 1000.0}, {}),
    ({"temperature": 1000.0, "norm_p": 32.0}, {"temperature": 1000.0}),
    ({"grid_sizes": [4], "grid_strides": [4]}, {}),
    ({"kernel_size": 3, "temperature": -1000.0}, {"kernel_size": 3}),
]
MATCH = 5e-4  # vLLM against transformers, both float32 on the CPU


@pytest.mark.parametrize("settings, baseline", SETTINGS, ids=lambda o: json.dumps(o))
def test_request_settings_reach_the_model(client, decoded, onevision_checkpoint, settings, baseline):
    """Each answer equals transformers with the reference pooling at the same settings, and not at the baseline.

    The tiny random model's logits move little with the pooling weights, so
    the settings are strong ones and the baseline differs in exactly the
    field under test.
    """
    from tests.support.hf_reference import first_step_logprobs

    path, frames = decoded
    text, _ = rendered_tokens(onevision_checkpoint, ["video"])
    extra = {"logprobs": True, "top_logprobs": 5, "mm_processor_kwargs": {"stgridpool": settings}}
    reply = ask(client, path, extra_body=extra)
    served = sorted((e.logprob for e in reply.choices[0].logprobs.content[0].top_logprobs), reverse=True)
    reference = first_step_logprobs(onevision_checkpoint, text, frames, settings)
    other = first_step_logprobs(onevision_checkpoint, text, frames, baseline)
    assert served == pytest.approx(reference, abs=MATCH)
    assert max(abs(a - b) for a, b in zip(served, other)) > 4 * MATCH


def test_two_videos_of_different_lengths_in_one_prompt(client, mp4_factory, onevision_checkpoint):
    _, text = rendered_tokens(onevision_checkpoint, ["video", "video"])
    response = chat(client, [video_part(mp4_factory(16)), video_part(mp4_factory(5)), {"type": "text", "text": QUESTION}])
    assert response.usage.prompt_tokens == text - 2 + (16 * 169 + 1) + (5 * 169 + 1)


def test_an_image_and_a_video_in_one_prompt(client, mp4_factory, onevision_checkpoint, tmp_path):
    """The image keeps stock anyres tokens (counted by transformers' own processor); the video is pooled."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(picture)
    processor = AutoProcessor.from_pretrained(onevision_checkpoint)
    text, _ = rendered_tokens(onevision_checkpoint, ["image", "video"])
    processor.replace_video_token = lambda inputs, video_idx, **_: processor.video_token * (
        len(inputs["pixel_values_videos"][video_idx]) * 169 + 1
    )
    frames = np.zeros((5, 120, 160, 3), dtype=np.uint8)
    expected = processor(text=text, images=[Image.open(picture)], videos=[frames], return_tensors="pt")
    image_url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    response = chat(
        client,
        [{"type": "image_url", "image_url": {"url": image_url}}, video_part(mp4_factory(5)), {"type": "text", "text": QUESTION}],
    )
    assert response.usage.prompt_tokens == expected["input_ids"].shape[1]


def concurrent_prompt_tokens(server, requests: list[tuple]) -> list[int]:
    """Send every (mp4 path, stgridpool object) request at once; their prompt token counts, in order."""
    import asyncio

    async def run() -> list[int]:
        aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0)
        async with aclient:
            replies = await asyncio.gather(*(
                aclient.chat.completions.create(
                    model="llava-video", messages=messages(data_url(path)), max_tokens=2,
                    temperature=0.0, extra_body={"mm_processor_kwargs": {"stgridpool": override}},
                )
                for path, override in requests
            ))
        return [reply.usage.prompt_tokens for reply in replies]

    return asyncio.run(run())


def test_eight_concurrent_requests_mixing_frames_and_kernels(server, mp4_factory, text_tokens):
    cases = [(1, 2), (5, 3), (16, 2), (33, 3), (7, 2), (16, 3), (2, 2), (64, 3)]
    per_frame = {2: 169, 3: 81}

    counts = concurrent_prompt_tokens(
        server, [(mp4_factory(frames), {"kernel_size": kernel}) for frames, kernel in cases]
    )
    assert counts == [text_tokens + frames * per_frame[kernel] + 1 for frames, kernel in cases]


def test_metrics_skip_requests_vllm_rejects(server, client, mp4_factory):
    """A request over --max-model-len is refused after processing; its video is not counted."""
    videos = metric(server, "stgridpool_videos_total")
    long_text = " ".join(["video"] * 9000)
    content = [video_part(mp4_factory(64)), {"type": "text", "text": long_text}]
    with pytest.raises(openai.BadRequestError):
        chat(client, content)
    assert metric(server, "stgridpool_videos_total") == videos
    ask(client, mp4_factory(5))
    assert metric(server, "stgridpool_videos_total") == videos + 1


def test_token_budgets_in_one_concurrent_batch(server, mp4_factory, text_tokens):
    """Several budgets and lengths at once: each video's tokens are what the README's rule predicts."""
    cases = [  # (mp4 frames, max_video_tokens, video tokens by the rule, budget-limited)
        (64, 4096, 24 * 169 + 1, True),  # 24 frames fit at kernel 2 (>= min_frames 16)
        (100, 4096, 24 * 169 + 1, True),  # sampled to 64 frames by the loader first
        (16, 2048, 16 * 81 + 1, True),  # only 12 fit at kernel 2: kernel 3 holds all 16
        (5, 500, 5 * 81 + 1, True),  # 2 fit at kernel 2, all 5 at kernel 3
        (64, 1000, 27 * 36 + 1, True),  # 12 fit at kernel 3: kernel 4 holds 27
        (8, 20000, 8 * 169 + 1, False),
    ]
    limited_before = metric(server, "stgridpool_budget_limited_videos_total")

    counts = concurrent_prompt_tokens(
        server, [(mp4_factory(frames), {"max_video_tokens": budget}) for frames, budget, _, _ in cases]
    )
    assert [count - text_tokens for count in counts] == [tokens for _, _, tokens, _ in cases]
    limited = sum(case[3] for case in cases)
    assert metric(server, "stgridpool_budget_limited_videos_total") - limited_before == limited
    assert "kept 24 frames at kernel_size 2 (budget-limited)" in server.log()


def test_a_budget_below_one_frame_is_a_400_naming_the_smallest(client, mp4_factory, text_tokens):
    extra = {"mm_processor_kwargs": {"stgridpool": {"max_video_tokens": 20}}}
    with pytest.raises(openai.BadRequestError, match="use max_video_tokens >= 37"):
        ask(client, mp4_factory(8), extra_body=extra)
    assert ask(client, mp4_factory(8)).usage.prompt_tokens == text_tokens + 8 * 169 + 1
